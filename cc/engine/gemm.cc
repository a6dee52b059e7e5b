// The GEMM engine's entry points: a plan goes to the active ISA's kernels for its dtype.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cc/engine/gemm/gemm_kernels.h"
#include "cc/engine/isa.h"
#include "cc/engine/scalars.h"
#include "cc/engine/smallmm.h"

namespace smallmm {
namespace {

// The active ISA's kernels for dtype d: bfloat16 on the ISA's build for the CPU's bfloat16
// instructions where it has one and Bf16Dot() is on.
const GemmDTypeKernels& Kernels(int d) {
  const IsaKernels& isa = ActiveIsaKernels();
  if (d == int(DType::kBFloat16) && isa.gemm_bf16 != nullptr && Bf16Dot()) return *isa.gemm_bf16;
  return *isa.gemm->dtype[d];
}

// ---------------------------------------------------------------- reductions as items
// A sum over one reduction loop (Σ_b g[b]·B[b]ᵀ, the gradient of a weight shared by a
// batch) goes to the packed kernels, the only family that sums products, and they pack
// both operands afresh for every item. Where another family takes the items themselves
// (the stationary and dot kernels read them in place), the plan runs as those items
// instead: a window of items at a time into a scratch that stays in cache, added into a
// sum in the accumulation type, which goes to C once. Timed against the packed sum
// (benchmarks/core_ab.py --grid reduce: g[B, M, N] · y[B, K, N]ᵀ summed over B, and over
// 4 per group, M 1-160, N 8 and 32, K 3-32; 2026-12-07, AMD EPYC Zen 4, one thread),
// median / min by dtype: float16 1.47 / 0.88, bfloat16 2.64 / 1.24, float32 1.56 / 1.01,
// float64 2.08 / 1.03, complex64 2.02 / 1.18, complex128 1.67 / 0.96; with AVX2 2.5-4.7×
// medians. A float16 / bfloat16 item is rounded to its type before the sum, as the
// built-in rounds each product of the batch.
constexpr int64_t kItemBlockBytes = 64 << 10;  // item outputs summed at a time (L2)

// The items of p's reduction as a plan of their own: the reduction loop becomes the
// innermost output loop, and item u (in the flattened order: output u / R, item u % R of
// the R summed) writes a dense M×N block at u·M·N of a scratch. False where p has no such
// single loop or no room for one more loop. The scratch is column-major where C's rows
// are shorter than a vector (`lanes`: elements in 64 bytes of the accumulation type) and
// C has more rows than columns, so that the stationary kernels hold whole vectors of rows
// rather than a partial strip of columns (float32 / float16 g[B, 16, 32] · y[B, 3, 32]ᵀ:
// items 0.63 / 0.94 ms row-major, 0.29 / 0.35 ms column-major, the packed sum 0.54 /
// 0.67 ms; with 16 or more columns row-major was as fast or faster: float32 [160, 16]
// outputs 0.71 against 1.94 ms).
bool ItemsPlan(const GemmPlan& p, int lanes, GemmPlan* q) {
  const int64_t r = p.red[0].size;
  int64_t mn, all;
  if (p.num_red != 1 || p.num_out >= kMaxBatchDims || r < 2 || p.m < 1 || p.n < 1 ||
      __builtin_mul_overflow(p.m, p.n, &mn) || __builtin_mul_overflow(p.output_elements, r, &all)) {
    return false;
  }
  *q = p;
  const bool col = p.n < lanes && p.m > p.n;
  q->c_rs = col ? 1 : p.n;
  q->c_cs = col ? p.m : 1;
  int64_t weight = r * mn;
  q->out[p.num_out] = {r, p.red[0].a, p.red[0].b, mn};
  for (int j = p.num_out - 1; j >= 0; --j) {
    q->out[j].c = weight;
    weight *= p.out[j].size;
  }
  q->num_out = p.num_out + 1;
  q->num_red = 0;
  q->num_outputs = p.num_outputs * r;
  q->num_reduced = 1;
  q->output_elements = all;
  return true;
}

// Elements of dtype in a 64-byte vector of its accumulation scalars.
int ItemLanes(DType dtype) {
  switch (dtype) {
#define SMALLMM_LANES_CASE(e, name, bytes, S, A) \
  case DType::e:                                 \
    return int(64 / sizeof(A)) / DTypeInfo<DType::e>::kComponents;
    SMALLMM_DTYPES(SMALLMM_LANES_CASE)
#undef SMALLMM_LANES_CASE
    default:
      return 1;
  }
}

// Whether p of dtype d runs as its items (*items) on kernels k. With AVX-512, float32
// outputs 8 columns wide (half a vector) stay on the packed sum from 8 rows up, where
// their items ran at 0.89-0.92× of it with K = 8 and 4 items a sum, 0.90× for 8×8 with
// K = 32 (both the row and the column kernel run half vectors there; 2026-12-07, AMD EPYC
// Zen 4); with AVX2, a whole vector, they ran at 1.4× and more.
bool RunsAsItems(const GemmDTypeKernels& k, DType d, const GemmPlan& p, GemmPlan* items) {
  const char* packed = k.families[k.num_families - 1];  // the family that sums
  const bool half_vector =
      d == DType::kFloat && p.n == 8 && p.m >= 8 && std::strcmp(ActiveIsa(), "avx512") == 0;
  if (!ReductionItems() || half_vector) return false;
  return ItemsPlan(p, ItemLanes(d), items) && std::strcmp(k.kernel_for(p), packed) == 0 &&
         std::strcmp(k.kernel_for(*items), packed) != 0;
}

// sum[e] += x[e] for e < n, widened to the accumulation type: one item's output into the
// running sum. This file is compiled for the baseline ISA, whose loop adds 4 float lanes
// at a time and converts float16 bit by bit; that took longer than the float16 and
// float32 kernels themselves on large outputs (AMD EPYC Zen 4: 0.2-0.6× the packed sum
// for M >= 32). The AVX2 build (8 lanes, F16C conversion) runs on the AVX2 and AVX-512 ISAs.
// Either adds each element in item order, so both give the same sums.
template <DType D>
void AddItem(typename DTypeInfo<D>::Acc* sum, const typename DTypeInfo<D>::Storage* x, int64_t n) {
  for (int64_t e = 0; e < n; ++e) sum[e] += Widen<D>(x[e]);
}

#if defined(__x86_64__)
template <DType D>
__attribute__((target("avx2,fma,f16c"))) void AddItemAvx2(typename DTypeInfo<D>::Acc* sum,
                                                          const typename DTypeInfo<D>::Storage* x,
                                                          int64_t n) {
  int64_t e = 0;
  if constexpr (D == DType::kHalf) {
    for (; e + 8 <= n; e += 8) {
      const __m256 h = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + e)));
      _mm256_storeu_ps(sum + e, _mm256_add_ps(_mm256_loadu_ps(sum + e), h));
    }
  }
  for (; e < n; ++e) sum[e] += Widen<D>(x[e]);
}

template <DType D>
__attribute__((target("avx2,fma,f16c"))) void NarrowAvx2(const typename DTypeInfo<D>::Acc* sum,
                                                         typename DTypeInfo<D>::Storage* x,
                                                         int64_t n) {
  int64_t e = 0;
  if constexpr (D == DType::kHalf) {
    for (; e + 8 <= n; e += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(sum + e), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(x + e), h);
    }
  }
  for (; e < n; ++e) x[e] = Narrow<D>(sum[e]);
}

#endif

template <DType D>
void NarrowAll(const typename DTypeInfo<D>::Acc* sum, typename DTypeInfo<D>::Storage* x,
               int64_t n) {
  for (int64_t e = 0; e < n; ++e) x[e] = Narrow<D>(sum[e]);
}

template <DType D>
bool RunItems(const GemmDTypeKernels& k, const GemmPlan& p, const GemmPlan& items, const void* a,
              const void* b, void* c, int64_t begin, int64_t end) {
  using S = typename DTypeInfo<D>::Storage;
  using A = typename DTypeInfo<D>::Acc;
  constexpr int kC = DTypeInfo<D>::kComponents;
  constexpr int kBytes = DTypeInfo<D>::kBytes;
  const int64_t r = p.red[0].size;
  const int64_t mn = p.m * p.n, scalars = kC * mn;
  // Items per window: a window may end inside one output's items and span several outputs.
  const int64_t window = std::max<int64_t>(1, kItemBlockBytes / (kBytes * mn));
  std::unique_ptr<S[]> outs(new (std::nothrow) S[size_t(window * scalars)]);
  std::unique_ptr<A[]> sum(new (std::nothrow) A[size_t(scalars)]);
  if (!outs || !sum) return false;
  S* pc = static_cast<S*>(c);
  void (*add)(A*, const S*, int64_t) = &AddItem<D>;
  void (*narrow)(const A*, S*, int64_t) = &NarrowAll<D>;
#if defined(__x86_64__)
  // The AVX2 and AVX-512 ISAs are chosen only where the CPU has AVX2 and FMA, and their
  // kernels are built with F16C too (setup.py ISA_FLAGS).
  if (std::strcmp(ActiveIsa(), "baseline") != 0) {
    add = &AddItemAvx2<D>;
    narrow = &NarrowAvx2<D>;
  }
#endif
  // The kernels see the window as their whole output: it stays in cache, so they must
  // not stream it past the cache or prefetch for a large output (streaming.h).
  GemmPlan run = items;
  run.output_elements = std::min(items.output_elements, window * mn);
  for (int64_t u0 = begin * r; u0 < end * r; u0 += window) {
    const int64_t u1 = std::min(end * r, u0 + window);
    // The kernel writes item u at u·M·N past its C: the scratch, moved back by u0 items
    // (an address computed as an integer: it lies before the scratch and is never read).
    const uintptr_t shift = uintptr_t(u0) * uintptr_t(mn) * kBytes;
    if (!k.run(run, a, b, reinterpret_cast<void*>(uintptr_t(outs.get()) - shift), u0, u1)) {
      return false;
    }
    for (int64_t u = u0; u < u1; ++u) {
      if (u % r == 0) std::fill(sum.get(), sum.get() + scalars, A(0));
      add(sum.get(), outs.get() + (u - u0) * scalars, scalars);
      if (u % r != r - 1) continue;
      // Output u / r is summed: round it (into this item's slot) and place it in C.
      S* rounded = outs.get() + (u - u0) * scalars;
      narrow(sum.get(), rounded, scalars);
      int64_t co = 0;  // its offset in C, out loops outermost first
      for (int64_t j = p.num_out - 1, rest = u / r; j >= 0; --j) {
        co += (rest % p.out[j].size) * p.out[j].c;
        rest /= p.out[j].size;
      }
      for (int64_t i = 0; i < p.m; ++i) {
        for (int64_t j = 0; j < p.n; ++j) {
          const S* from = rounded + kC * (i * items.c_rs + j * items.c_cs);
          S* to = pc + kC * (co + i * p.c_rs + j * p.c_cs);
          for (int e = 0; e < kC; ++e) to[e] = from[e];
        }
      }
    }
  }
  return true;
}

}  // namespace

bool RunBatchMatMul(DType dtype, const GemmPlan& plan, const void* a, const void* b, void* c,
                    int64_t begin, int64_t end) {
  const int d = int(dtype);
  if (d < 0 || d >= kNumDTypes) return false;
  const GemmDTypeKernels& k = Kernels(d);
  GemmPlan items;
  if (begin < end && RunsAsItems(k, dtype, plan, &items)) {
    switch (dtype) {
#define SMALLMM_ITEMS_CASE(e, name, bytes, S, A) \
  case DType::e:                                 \
    return RunItems<DType::e>(k, plan, items, a, b, c, begin, end);
      SMALLMM_DTYPES(SMALLMM_ITEMS_CASE)
#undef SMALLMM_ITEMS_CASE
      default:
        return false;
    }
  }
  return k.run(plan, a, b, c, begin, end);
}

bool RunFusedPair(DType dtype, const FusedPair& pair, void* const c[2], int64_t begin,
                  int64_t end) {
  const int d = int(dtype);
  if (d < 0 || d >= kNumDTypes) return false;
  return Kernels(d).pair(pair, c, begin, end);
}

const char* KernelFor(DType dtype, const GemmPlan& plan) {
  const int d = int(dtype);
  if (d < 0 || d >= kNumDTypes) return "invalid";
  const GemmDTypeKernels& k = Kernels(d);
  GemmPlan items;
  return k.kernel_for(RunsAsItems(k, dtype, plan, &items) ? items : plan);
}

const char* const* KernelFamilies(int* count) {
  // (Every dtype's build has the same families; float32's.)
  const GemmDTypeKernels& k = *ActiveIsaKernels().gemm->dtype[int(DType::kFloat)];
  *count = k.num_families;
  return k.families;
}

// Beside RunBatchMatMul, not in the planner: the GPU harness links plan.cc without the CPU
// kernels.
bool RunReductionParts(DType dtype, const ReductionParts& r, const void* a, const void* b,
                       void* partials, int64_t begin, int64_t end) {
  const int64_t head = r.split.num_outputs, e = DTypeSize(dtype);
  bool ok =
      begin >= head || RunBatchMatMul(dtype, r.split, a, b, partials, begin, std::min(end, head));
  if (ok && end > head) {
    // The tail's partial follows the split's (split.output_elements of them).
    ok = RunBatchMatMul(dtype, r.tail, static_cast<const char*>(a) + e * r.tail_a,
                        static_cast<const char*>(b) + e * r.tail_b,
                        static_cast<char*>(partials) + e * r.split.output_elements,
                        std::max(begin, head) - head, end - head);
  }
  return ok;
}

}  // namespace smallmm
