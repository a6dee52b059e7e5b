// smallmm_gpu_logic.h — the GPU implementation of the kernel-core contract (smallmm.h),
// written once as `__host__ __device__` code over plain pointers so that the same block
// program runs on the GPU (smallmm_gpu.cu.cc) and in the host simulation
// (testing/smallmm_gpu_sim.h, exercised by tests/test_gpu_simulation.py on machines without a
// GPU). Compiles with nvcc and with a plain C++17 compiler; includes no CUDA header when
// not compiled by nvcc.
//
// Work decomposition (terminology as in smallmm.h):
//   tile       an output matrix C[o] (M×N) is cut into bm×bn tiles; for the small
//              matrices this engine is for, one tile is the whole matrix.
//   group      `group` consecutive output matrices (in the plan's flattened out-loop
//              order) handled together by one block. When the innermost out loop
//              broadcasts an operand (stride 0), groups never straddle that loop, so the
//              whole group shares that operand: it is staged once per group ("shared"),
//              and not at all when the block's previous work item staged the same matrix
//              (capsules: W[i] is staged once for all data-batch rows a block handles).
//   work item  (tile, group). Block b handles the contiguous work items
//              [b·items_per_block, (b+1)·items_per_block), so consecutive items of one
//              block usually share the broadcast operand.
//   KR axis    reduction loops and K are one combined axis of num_reduced·K products,
//              ordered (r, l) exactly like the CPU engine, staged through shared memory
//              in chunks of `kc` (= nrc whole reduction items of K when K is small, or a
//              K-slice of one reduction item when K is large). The sum over it happens in
//              each thread's registers: no atomics, no per-batch intermediate.
//   threads    thread t owns the group-tile elements e = t + s·threads, s < elements per
//              thread, e = ((g·bm) + i)·bn + j when C's columns are its shorter stride
//              (dense row-major C), else e = ((g·bn) + j)·bm + i: consecutive threads
//              write consecutive addresses either way (coalesced stores; the capsule
//              prediction's C has unit row stride).
//   kernel     one of the variants of SMALLMM_GPU_KERNELS: a compile-time shape (threads,
//              elements per thread, largest tile and K chunk) of the one block program.
//              The first variant in the table that can implement a plan runs it; the last,
//              `generic`, implements every plan.
// fp16/bf16 are converted to fp32 when staged and accumulate in fp32; complex operands
// are staged as a real plane followed by an imaginary plane, conjugation applied when
// staged.
//
// The block program is a template on an executor `Ex` that supplies:
//   shared()                       the block's dynamic shared memory
//   Barrier()                      __syncthreads()
//   ForEachThread(f)               f(thread index, this thread's Acc&): on the GPU each
//                                  thread runs it once for itself; the simulation runs it
//                                  for every thread in turn
//   Read(p) / Write(p, v)          shared-memory accesses made by the current thread
//   ReadUniform(p)                 a shared-memory read that every thread makes alike
//                                  (block-uniform control flow)
//   OnLoad(operand, index), OnStore(index)
//                                  global-memory accesses (checked by the simulation)
// Code outside ForEachThread is block-uniform: every thread computes the same values.
#ifndef TF_SMALLMM_CUDA_SMALLMM_GPU_LOGIC_H_
#define TF_SMALLMM_CUDA_SMALLMM_GPU_LOGIC_H_

#include <cstdint>
#include <cstring>

#include "cc/engine/float16_bits.h"
#include "cc/engine/smallmm.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SMALLMM_HD __host__ __device__
#define SMALLMM_INLINE __forceinline__
#define SMALLMM_UNROLL _Pragma("unroll")
#define SMALLMM_UNROLL_BY(n) _Pragma(SMALLMM_STR(unroll(n)))
#define SMALLMM_STR(x) #x
#else
#define SMALLMM_HD
#define SMALLMM_INLINE inline
#define SMALLMM_UNROLL
#define SMALLMM_UNROLL_BY(n)
#endif

namespace smallmm {
namespace gpu {

// Tuning constants (not yet measured on hardware: no GPU was available when they were
// chosen; they follow from the shapes the engine is for, M, N, K ≤ 32, and H100 limits).
constexpr int kElemsPerThread = 4;        // output elements a thread owns (generic kernel)
constexpr int kThreads = 256;             // threads per block of the generic kernel
constexpr int kSmemBudget = 24 * 1024;    // bytes: 8+ blocks of 256 threads per H100 SM
constexpr int kMaxSmemBytes = 48 * 1024;  // dynamic shared memory without an opt-in
constexpr int kMaxKChunk = 128;           // KR products staged per step (before shrinking)
constexpr int kMaxTileN = 32;

// The kernel variants, in the order they are tried (smallmm_gpu.cu.cc instantiates each
// for every dtype; the simulation and the tests loop over the same list):
//   X(name, threads, elements per thread, max tile rows, max tile columns, max K chunk,
//     tiles)
// A variant with `tiles` false takes only plans whose whole C matrix is one tile
// (M ≤ rows, N ≤ columns); one with `tiles` true cuts larger matrices into such tiles. K
// longer than the chunk is staged in several chunks; 0 means "any" (the generic kernel).
// Like MAGMA's batched small-size kernels, the square ones pack several matrices per block
// (threads × elements per thread / (M·N)) and stage a broadcast operand once per block.
// Sizes (not yet measured on hardware): square buckets up to CPU-engine's largest
// interesting n (32); `k8` and `k16` for the capsule prediction, 160×8 · 8×B with B folded
// into N (CapsNet's u is 8-dimensional, its second layer's 16); the products of the capsule
// gradients (K = batch or 160) go to `generic`.
#define SMALLMM_GPU_KERNELS(X)       \
  X(sq4, 128, 2, 4, 4, 4, false)     \
  X(sq8, 128, 2, 8, 8, 8, false)     \
  X(sq16, 256, 2, 16, 16, 16, false) \
  X(sq32, 256, 4, 32, 32, 32, false) \
  X(k8, 256, 4, 32, 32, 8, true)     \
  X(k16, 256, 4, 32, 32, 16, true)   \
  X(generic, kThreads, kElemsPerThread, 0, 0, 0, true)

// One variant's shape as compile-time constants (0 = run-time value from LaunchConfig).
template <int Threads, int Ept, int MaxBm, int MaxBn, int MaxKc, bool Tiles>
struct GpuShape {
  static constexpr int kEpt = Ept, kMaxKc = MaxKc;
  // A specialised variant (bounded K chunk) runs with exactly its own threads; the generic
  // one with any number (the simulation tries several).
  static constexpr bool kFixed = MaxKc > 0;
  static constexpr int kThreads = kFixed ? Threads : 0;
  static constexpr int kLaunchThreads = Threads;  // what the CUDA launch uses
};

// Calls f(GpuShape<...>{}) for variant `kernel` (an index into kGpuKernels); host code.
template <class F>
inline void WithGpuShape(int kernel, F&& f) {
  int i = 0;
#define SMALLMM_GPU_SHAPE_CASE(name, t, e, bm, bn, kc, tiles) \
  if (kernel == i++) return f(GpuShape<t, e, bm, bn, kc, tiles>());
  SMALLMM_GPU_KERNELS(SMALLMM_GPU_SHAPE_CASE)
#undef SMALLMM_GPU_SHAPE_CASE
}

// The run-time view of a variant (the launcher's and simulation's table).
struct GpuKernelInfo {
  const char* name;
  int threads, ept, max_bm, max_bn, max_kc;
  bool tiles;
};
constexpr GpuKernelInfo kGpuKernels[] = {
#define SMALLMM_GPU_KERNEL_INFO(name, t, e, bm, bn, kc, tiles) {#name, t, e, bm, bn, kc, tiles},
    SMALLMM_GPU_KERNELS(SMALLMM_GPU_KERNEL_INFO)
#undef SMALLMM_GPU_KERNEL_INFO
};
constexpr int kNumGpuKernels = int(sizeof(kGpuKernels) / sizeof(kGpuKernels[0]));

template <typename T>
SMALLMM_HD SMALLMM_INLINE constexpr T Min(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
SMALLMM_HD SMALLMM_INLINE constexpr T Max(T a, T b) {
  return a < b ? b : a;
}
SMALLMM_HD SMALLMM_INLINE int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- 16-bit floats
// Round to nearest even, NaN stays NaN (same results as Eigen::half / Eigen::bfloat16
// and the CPU engine). The GPU uses the hardware conversions instead.
// Host code (the simulation) uses cc/engine/float16_bits.h, the CPU engine's own.
#if defined(__CUDA_ARCH__)
#define SMALLMM_DEVICE_OR_HOST(device, host) device
#else
#define SMALLMM_DEVICE_OR_HOST(device, host) host
#endif
struct HalfBits {
  static SMALLMM_HD SMALLMM_INLINE float ToFloat(uint16_t h) {
    return SMALLMM_DEVICE_OR_HOST(__half2float(__ushort_as_half(h)), f16::HalfToFloat(h));
  }
  static SMALLMM_HD SMALLMM_INLINE uint16_t FromFloat(float f) {
    return SMALLMM_DEVICE_OR_HOST(__half_as_ushort(__float2half_rn(f)), f16::FloatToHalf(f));
  }
};
struct BF16Bits {
  static SMALLMM_HD SMALLMM_INLINE float ToFloat(uint16_t h) {
    return SMALLMM_DEVICE_OR_HOST(__uint_as_float(uint32_t(h) << 16), f16::BF16ToFloat(h));
  }
  static SMALLMM_HD SMALLMM_INLINE uint16_t FromFloat(float f) {
    return SMALLMM_DEVICE_OR_HOST(__bfloat16_as_ushort(__float2bfloat16_rn(f)),
                                  f16::FloatToBF16(f));
  }
};
#undef SMALLMM_DEVICE_OR_HOST

// ---------------------------------------------------------------- element types
// R: accumulation type. Complex values are interleaved (re, im) in memory and staged as
// two planes; Load/Store take the index of a storage scalar. float16 / bfloat16 convert.
template <DType D>
struct Elem {
  using S = typename DTypeInfo<D>::Storage;
  using R = typename DTypeInfo<D>::Acc;
  static constexpr int kPlanes = DTypeInfo<D>::kComponents;
  static SMALLMM_HD SMALLMM_INLINE R Load(const void* p, int64_t i) {
    return static_cast<const S*>(p)[i];
  }
  static SMALLMM_HD SMALLMM_INLINE void Store(void* p, int64_t i, R v) {
    static_cast<S*>(p)[i] = v;
  }
};
// 16-bit storage, float accumulation, converted by Bits (HalfBits or BF16Bits).
template <class Bits>
struct Elem16 {
  using R = float;
  static constexpr int kPlanes = 1;
  static SMALLMM_HD SMALLMM_INLINE R Load(const void* p, int64_t i) {
    return Bits::ToFloat(static_cast<const uint16_t*>(p)[i]);
  }
  static SMALLMM_HD SMALLMM_INLINE void Store(void* p, int64_t i, R v) {
    static_cast<uint16_t*>(p)[i] = Bits::FromFloat(v);
  }
};
template <>
struct Elem<DType::kHalf> : Elem16<HalfBits> {};
template <>
struct Elem<DType::kBFloat16> : Elem16<BF16Bits> {};

// Per-thread accumulators: E elements, one plane per real component.
template <typename R, int P, int E>
struct Acc {
  R v[E * P];
};

// ---------------------------------------------------------------- launch configuration
// Everything the block program needs besides the plan; a POD kernel argument.
struct LaunchConfig {
  int threads = 0;
  int bm = 1, bn = 1;     // output tile rows × columns
  int group = 1;          // output matrices per work item
  int kl = 1, nrc = 1;    // a KR chunk = nrc reduction items × a K-slice of kl
  int kc = 1;             // = nrc·kl, the K extent of a staged operand
  bool a_shared = false;  // one staged op(A) tile serves the whole group
  bool b_shared = false;
  bool a_kfast = true;   // staging order: consecutive threads walk K (else rows)
  bool b_jfast = true;   // consecutive threads walk columns (else K)
  bool c_ifast = false;  // consecutive threads own consecutive rows of C (else columns)
  int64_t span = 1;      // groups never straddle a span of this many outputs
  int64_t groups_per_span = 1;
  int64_t groups = 0;
  int64_t tiles_m = 1, tiles_n = 1;
  int64_t l_chunks = 0, r_chunks = 0;  // KR chunks: r_chunks × l_chunks, (r, l) order
  int64_t items = 0;                   // groups × tiles_m × tiles_n
  int64_t items_per_block = 1;
  int64_t blocks = 0;
  // Shared memory, byte offsets: [off_a, off_b, off_c: int64 × group][A][B].
  int smem_a = 0, smem_b = 0, smem_bytes = 0;
  int a_slot = 0, b_slot = 0;  // R elements per staged operand copy (all planes)
};

// Bytes of one accumulation scalar, and staged planes (storage scalars per element), of a
// run-time dtype.
inline int ElemRealSize(DType d) {
  switch (d) {
#define SMALLMM_REAL_SIZE(e, name, bytes, S, A) \
  case DType::e:                                \
    return int(sizeof(A));
    SMALLMM_DTYPES(SMALLMM_REAL_SIZE)
#undef SMALLMM_REAL_SIZE
    default:
      return 4;
  }
}
inline int ElemPlanes(DType d) {
  switch (d) {
#define SMALLMM_PLANES(e, name, bytes, S, A) \
  case DType::e:                             \
    return DTypeInfo<DType::e>::kComponents;
    SMALLMM_DTYPES(SMALLMM_PLANES)
#undef SMALLMM_PLANES
    default:
      return 1;
  }
}

inline int AlignUp(int x, int a) { return (x + a - 1) / a * a; }

// Whether variant `kernel` (an index into kGpuKernels) can run the plan.
inline bool GpuKernelCanImplement(int kernel, const GemmPlan& p) {
  const GpuKernelInfo& k = kGpuKernels[kernel];
  if (k.tiles) return k.max_kc == 0 || p.k <= k.max_kc;
  return p.m <= k.max_bm && p.n <= k.max_bn && p.k <= k.max_kc;
}

// The variant that runs the plan: the first in the table that can implement it.
inline int ChooseGpuKernel(const GemmPlan& p) {
  for (int i = 0; i < kNumGpuKernels; ++i) {
    if (GpuKernelCanImplement(i, p)) return i;
  }
  return kNumGpuKernels - 1;
}

// Chooses tiles, group size, K chunk and grid for the plan on variant `kernel`, whose
// blocks have `threads` threads (the variant's own, unless it is the generic one).
// Shared memory at most `smem_budget` bytes, at most `max_blocks` blocks. Returns nullptr,
// or a static message when no configuration fits (only for unrealistic budgets).
inline const char* MakeLaunchConfig(const GemmPlan& p, DType dtype, int kernel, int threads,
                                    int smem_budget, int64_t max_blocks, LaunchConfig* out) {
  if (kernel < 0 || kernel >= kNumGpuKernels) return "no such GPU kernel variant";
  const GpuKernelInfo& kv = kGpuKernels[kernel];
  if (kv.max_kc != 0 && threads != kv.threads) {
    return "a specialised GPU kernel runs with its own number of threads";
  }
  if (threads < 1 || threads > 1024) return "threads per block must be in [1, 1024]";
  if (smem_budget > kMaxSmemBytes) return "shared-memory budget above 48 KiB";
  if (max_blocks < 1) return "max_blocks must be positive";
  if (!GpuKernelCanImplement(kernel, p)) return "the GPU kernel variant cannot run this plan";
  LaunchConfig c;
  c.threads = threads;
  const int64_t te = int64_t(threads) * kv.ept;  // elements a block owns
  const int64_t m = Max<int64_t>(p.m, 1), n = Max<int64_t>(p.n, 1);
  const int64_t max_bn = kv.max_bn > 0 ? kv.max_bn : kMaxTileN;
  // Balanced tiles: as few as fit te elements, then equal sizes.
  c.tiles_n = CeilDiv(n, Min<int64_t>(max_bn, te));
  c.bn = int(CeilDiv(n, c.tiles_n));
  const int64_t max_bm = Max<int64_t>(1, te / c.bn);
  c.tiles_m = CeilDiv(m, kv.max_bm > 0 ? Min<int64_t>(kv.max_bm, max_bm) : max_bm);
  c.bm = int(CeilDiv(m, c.tiles_m));
  const int64_t tile_elems = int64_t(c.bm) * c.bn;
  int64_t group = Min<int64_t>(Max<int64_t>(1, te / tile_elems), threads);

  // Groups stay inside the innermost out loop when it broadcasts an operand, unless that
  // loop is so short that more than half of the threads would idle.
  const Loop* inner = p.num_out > 0 ? &p.out[p.num_out - 1] : nullptr;
  const bool bcast = inner != nullptr && (inner->a == 0 || inner->b == 0);
  const bool span_inner =
      bcast && (inner->size >= group || 2 * inner->size * tile_elems >= threads);
  c.span = span_inner ? inner->size : Max<int64_t>(p.num_outputs, 1);
  group = Min<int64_t>(group, c.span);
  c.a_shared = span_inner && inner->a == 0;
  c.b_shared = span_inner && inner->b == 0;

  const int64_t k = Max<int64_t>(p.k, 1), nr = Max<int64_t>(p.num_reduced, 1);
  const int rsize = ElemRealSize(dtype), planes = ElemPlanes(dtype);
  int64_t kc_target = Min<int64_t>(kv.max_kc > 0 ? kv.max_kc : kMaxKChunk, k * nr);
  for (;;) {
    c.group = int(group);
    c.kl = int(Min<int64_t>(k, kc_target));
    c.nrc = int(Min<int64_t>(Max<int64_t>(1, kc_target / c.kl), nr));
    c.kc = c.nrc * c.kl;
    c.a_slot = planes * c.kc * c.bm;
    c.b_slot = planes * c.kc * c.bn;
    const int a_slots = c.a_shared ? 1 : c.group, b_slots = c.b_shared ? 1 : c.group;
    c.smem_a = AlignUp(3 * 8 * c.group, 16);
    c.smem_b = AlignUp(c.smem_a + a_slots * c.a_slot * rsize, 16);
    c.smem_bytes = c.smem_b + b_slots * c.b_slot * rsize;
    if (c.smem_bytes <= smem_budget) break;
    if (kc_target > 16) {
      kc_target = (kc_target + 1) / 2;
    } else if (group > 1) {
      group = (group + 1) / 2;
    } else if (kc_target > 1) {
      kc_target = (kc_target + 1) / 2;
    } else {
      return "no tile configuration fits the shared-memory budget";
    }
  }
  c.groups_per_span = CeilDiv(c.span, c.group);
  c.groups = (Max<int64_t>(p.num_outputs, 1) / c.span) * c.groups_per_span;
  c.l_chunks = p.k > 0 ? CeilDiv(p.k, c.kl) : 0;
  c.r_chunks = p.num_reduced > 0 ? CeilDiv(p.num_reduced, c.nrc) : 0;
  c.items = p.output_elements > 0 ? c.groups * c.tiles_m * c.tiles_n : 0;
  // Coalesced staging: consecutive threads walk the operand's smaller stride.
  auto mag = [](int64_t s) { return s < 0 ? -s : s; };
  c.a_kfast = mag(p.a_cs) <= mag(p.a_rs);
  c.b_jfast = mag(p.b_cs) <= mag(p.b_rs);
  c.c_ifast = mag(p.c_rs) < mag(p.c_cs);
  if (c.items > 0) {
    const int64_t blocks = Min<int64_t>(c.items, max_blocks);
    c.items_per_block = CeilDiv(c.items, blocks);
    c.blocks = CeilDiv(c.items, c.items_per_block);
  }
  *out = c;
  return nullptr;
}

// ---------------------------------------------------------------- the block program
// Offsets in A, B and C of index `flat` of a loop nest (flattened in row-major order).
SMALLMM_HD SMALLMM_INLINE void NestOffsets(const Loop* loops, int n, int64_t flat, int64_t* oa,
                                           int64_t* ob, int64_t* oc) {
  int64_t a = 0, b = 0, c = 0;
  for (int d = n - 1; d >= 0; --d) {
    const Loop& l = loops[d];
    const int64_t idx = flat % l.size;
    flat /= l.size;
    a += idx * l.a;
    b += idx * l.b;
    c += idx * l.c;
  }
  *oa = a;
  *ob = b;
  *oc = c;
}

// Offsets of output matrix `o` (flattened out-loop index) in A, B and C.
SMALLMM_HD SMALLMM_INLINE void OutputOffsets(const GemmPlan& p, int64_t o, int64_t* oa, int64_t* ob,
                                             int64_t* oc) {
  NestOffsets(p.out, p.num_out, o, oa, ob, oc);
}

// Offsets of reduction item `r` in A and B.
SMALLMM_HD SMALLMM_INLINE void ReductionOffsets(const GemmPlan& p, int64_t r, int64_t* ra,
                                                int64_t* rb) {
  if (p.num_red == 1) {  // the common case: one reduction loop, no division
    *ra = r * p.red[0].a;
    *rb = r * p.red[0].b;
    return;
  }
  int64_t rc;  // 0: reduction loops do not move C
  NestOffsets(p.red, p.num_red, r, ra, rb, &rc);
}

// Stages op(A) (rows i0.., KR chunk) or op(B) into shared memory for slots [0, nslots).
// Layout per slot: plane-major, then [kk][row] so that the compute loop's reads are
// consecutive across threads. Positions outside the matrix or chunk are zero-filled.
//   rows_stride, k_stride: the operand's strides along its tile axis and along K.
//   tile, valid: tile extent (bm or bn) and how much of it lies inside the matrix.
//   kfast: linear staging index walks K fastest (coalesced when |k_stride| is small).
template <DType D, int kT, class Ex>
SMALLMM_HD SMALLMM_INLINE void StageOperand(Ex& ex, int t, const GemmPlan& p,
                                            const LaunchConfig& cfg, int operand, const void* x,
                                            const int64_t* slot_off, int nslots, int tile,
                                            int valid, int64_t row0, int64_t rows_stride,
                                            int64_t k_stride, bool kfast, int64_t r0, int nr,
                                            int64_t l0, int nl, bool conj,
                                            typename Elem<D>::R* dst) {
  using E = Elem<D>;
  using R = typename E::R;
  constexpr int P = E::kPlanes;
  const int kc = cfg.kc, kl = cfg.kl;
  const int per_slot = tile * kc;
  const int total = nslots * per_slot;
  const int threads = kT > 0 ? kT : cfg.threads;
  for (int idx = t; idx < total; idx += threads) {
    const int slot = idx / per_slot;
    const int rem = idx - slot * per_slot;
    int row, kk;
    if (kfast) {
      row = rem / kc;
      kk = rem - row * kc;
    } else {
      kk = rem / tile;
      row = rem - kk * tile;
    }
    const int rr = kk / kl;  // reduction item within the chunk
    const int l = kk - rr * kl;
    R* d = dst + slot * (P * per_slot) + kk * tile + row;
    R re = R(0), im = R(0);
    if (row < valid && rr < nr && l < nl) {
      int64_t ra, rb;
      ReductionOffsets(p, r0 + rr, &ra, &rb);
      const int64_t gi = ex.Read(&slot_off[slot]) + (operand == 0 ? ra : rb) +
                         (row0 + row) * rows_stride + (l0 + l) * k_stride;
      ex.OnLoad(operand, gi);
      if constexpr (P == 2) {
        re = E::Load(x, 2 * gi);
        im = E::Load(x, 2 * gi + 1);
        if (conj) im = -im;
      } else {
        re = E::Load(x, gi);
      }
    }
    ex.Write(d, re);
    if constexpr (P == 2) ex.Write(d + per_slot, im);
  }
}

// Element s (< elements per thread) of thread t in a work item: output matrix g of the
// group, row i and column j of the tile (e = t + s·threads = (g·bm + i)·bn + j, or
// (g·bn + j)·bm + i when `ifast`; see the top of the file). `ok` is false past the group's
// `count` matrices or the tile's valid rows × cols.
struct Owned {
  int g, i, j;
  bool ok;
};
SMALLMM_HD SMALLMM_INLINE Owned OwnedElement(int t, int s, int threads, int bm, int bn, bool ifast,
                                             int count, int rows, int cols) {
  const int e = t + s * threads;
  const int tile_elems = bm * bn;
  const int g = e / tile_elems;
  const int rem = e - g * tile_elems;
  const int fast = ifast ? bm : bn;
  const int slow_idx = rem / fast, fast_idx = rem - slow_idx * fast;
  const int i = ifast ? fast_idx : slow_idx, j = ifast ? slow_idx : fast_idx;
  return {g, i, j, g < count && i < rows && j < cols};
}

// One block's work: its contiguous range of work items, on variant Shape (a GpuShape).
template <DType D, class Shape, class Ex>
SMALLMM_HD void RunBlock(Ex& ex, const GemmPlan& p, const LaunchConfig& cfg, const void* a,
                         const void* b, void* c, int64_t block) {
  using E = Elem<D>;
  using R = typename E::R;
  constexpr int P = E::kPlanes;
  constexpr int kEpt = Shape::kEpt;
  constexpr int kT = Shape::kThreads;
  using A = Acc<R, P, kEpt>;
  unsigned char* smem = ex.shared();
  int64_t* off_a = reinterpret_cast<int64_t*>(smem);
  int64_t* off_b = off_a + cfg.group;
  int64_t* off_c = off_b + cfg.group;
  R* sa = reinterpret_cast<R*>(smem + cfg.smem_a);
  R* sb = reinterpret_cast<R*>(smem + cfg.smem_b);
  const int T = kT > 0 ? kT : cfg.threads, bm = cfg.bm, bn = cfg.bn;
  const bool ifast = cfg.c_ifast;
  const int64_t chunks = cfg.r_chunks * cfg.l_chunks;
  const int64_t w_begin = block * cfg.items_per_block;
  const int64_t w_end = Min(cfg.items, w_begin + cfg.items_per_block);
  // What the block's shared memory holds from its previous work item (uniform).
  bool have_a = false, have_b = false;
  int64_t staged_a = 0, staged_ti = 0, staged_b = 0, staged_tj = 0;

  for (int64_t w = w_begin; w < w_end; ++w) {
    const int64_t tile = w / cfg.groups, grp = w - tile * cfg.groups;
    const int64_t ti = tile / cfg.tiles_n, tj = tile - ti * cfg.tiles_n;
    const int64_t q = grp / cfg.groups_per_span, gi = grp - q * cfg.groups_per_span;
    const int64_t o0 = q * cfg.span + gi * cfg.group;
    const int count = int(Min<int64_t>(cfg.group, cfg.span - gi * cfg.group));
    const int64_t i0 = ti * bm, j0 = tj * bn;
    const int rows = int(Min<int64_t>(bm, p.m - i0)), cols = int(Min<int64_t>(bn, p.n - j0));

    ex.Barrier();  // the previous item is done with off_* and the staged operands
    ex.ForEachThread([&](int t, A& acc) {
      for (int g = t; g < count; g += T) {
        int64_t oa, ob, oc;
        OutputOffsets(p, o0 + g, &oa, &ob, &oc);
        ex.Write(&off_a[g], oa);
        ex.Write(&off_b[g], ob);
        ex.Write(&off_c[g], oc);
      }
      SMALLMM_UNROLL
      for (int s = 0; s < kEpt * P; ++s) acc.v[s] = R(0);
    });
    ex.Barrier();

    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t rc = ch / cfg.l_chunks, lc = ch - rc * cfg.l_chunks;
      const int64_t r0 = rc * cfg.nrc, l0 = lc * cfg.kl;
      const int nr = int(Min<int64_t>(cfg.nrc, p.num_reduced - r0));
      const int nl = int(Min<int64_t>(cfg.kl, p.k - l0));
      const int kcv = (nr - 1) * cfg.kl + nl;  // valid KR products in this chunk
      // A single-chunk item whose shared operand tile is already staged skips the load.
      bool load_a = true, load_b = true;
      if (chunks == 1) {
        const int64_t ka = ex.ReadUniform(&off_a[0]), kb = ex.ReadUniform(&off_b[0]);
        load_a = !(have_a && ka == staged_a && ti == staged_ti);
        load_b = !(have_b && kb == staged_b && tj == staged_tj);
        have_a = cfg.a_shared;
        have_b = cfg.b_shared;
        staged_a = ka;
        staged_ti = ti;
        staged_b = kb;
        staged_tj = tj;
      } else {
        have_a = have_b = false;
      }
      ex.CountStage(load_a, load_b);
      if (ch > 0) ex.Barrier();  // everyone is done computing on the previous chunk
      ex.ForEachThread([&](int t, A&) {
        if (load_a) {
          StageOperand<D, kT>(ex, t, p, cfg, 0, a, off_a, cfg.a_shared ? 1 : count, bm, rows, i0,
                              p.a_rs, p.a_cs, cfg.a_kfast, r0, nr, l0, nl, p.conj_a, sa);
        }
        if (load_b) {
          StageOperand<D, kT>(ex, t, p, cfg, 1, b, off_b, cfg.b_shared ? 1 : count, bn, cols, j0,
                              p.b_cs, p.b_rs, !cfg.b_jfast, r0, nr, l0, nl, p.conj_b, sb);
        }
      });
      ex.Barrier();
      ex.ForEachThread([&](int t, A& acc) {
        SMALLMM_UNROLL
        for (int s = 0; s < kEpt; ++s) {
          const Owned o = OwnedElement(t, s, T, bm, bn, ifast, count, rows, cols);
          if (!o.ok) continue;
          const int g = o.g, i = o.i, j = o.j;
          const R* pa = sa + (cfg.a_shared ? 0 : g) * cfg.a_slot + i;
          const R* pb = sb + (cfg.b_shared ? 0 : g) * cfg.b_slot + j;
          R cr = acc.v[s], ci = P == 2 ? acc.v[kEpt * (P - 1) + s] : R(0);
          const int pla = cfg.kc * bm, plb = cfg.kc * bn;  // plane sizes
          // A specialised variant's K loop has a compile-time bound (unrolled, predicated).
          auto step = [&](int kk) {
            const R ar = ex.Read(pa + kk * bm), br = ex.Read(pb + kk * bn);
            if constexpr (P == 2) {
              const R ai = ex.Read(pa + pla + kk * bm), bi = ex.Read(pb + plb + kk * bn);
              cr += ar * br - ai * bi;
              ci += ar * bi + ai * br;
            } else {
              cr += ar * br;
            }
          };
          if constexpr (Shape::kFixed) {
            // Unrolled 8 deep (4 for complex), not fully: K = 32 with 4 complex elements
            // in flight would hold more loads than registers (k8 complex128 spilled 24
            // bytes unrolled 8 deep: ptxas -v, sm_90, CUDA 13.0, 2026-12-01).
            [[maybe_unused]] constexpr int kUnroll = 8 / P;
            SMALLMM_UNROLL_BY(kUnroll)
            for (int kk = 0; kk < Shape::kMaxKc; ++kk) {
              if (kk < kcv) step(kk);
            }
          } else {
            for (int kk = 0; kk < kcv; ++kk) step(kk);
          }
          acc.v[s] = cr;
          if constexpr (P == 2) acc.v[kEpt + s] = ci;
        }
      });
    }

    ex.ForEachThread([&](int t, A& acc) {
      SMALLMM_UNROLL
      for (int s = 0; s < kEpt; ++s) {
        const Owned o = OwnedElement(t, s, T, bm, bn, ifast, count, rows, cols);
        if (!o.ok) continue;
        const int64_t idx = ex.Read(&off_c[o.g]) + (i0 + o.i) * p.c_rs + (j0 + o.j) * p.c_cs;
        ex.OnStore(idx);
        if constexpr (P == 2) {
          E::Store(c, 2 * idx, acc.v[s]);
          E::Store(c, 2 * idx + 1, acc.v[kEpt + s]);
        } else {
          E::Store(c, idx, acc.v[s]);
        }
      }
    });
  }
}

}  // namespace gpu
}  // namespace smallmm

#endif  // TF_SMALLMM_CUDA_SMALLMM_GPU_LOGIC_H_
