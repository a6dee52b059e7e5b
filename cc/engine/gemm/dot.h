// dot.h — the "dot" kernel family: products with N = 1..4 columns of B, each contiguous
// along K, and contiguous rows of A (no reduction; float16 / bfloat16 widen to float32 a
// vector at a time, complex types run as their (re, im) scalars). Each output element is a
// dot product along K, vectorised along K, so A is streamed once in its own layout instead
// of being transposed into a packed panel: matvecs, products with a transposed B of few
// rows, and batches of vectors folded into N columns against a shared matrix.
// Included only by gemm_isa.cc (compiled once per ISA and dtype): everything has internal
// linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_

#include <cstdint>
#include <cstring>
#include <utility>

#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/stationary.h"

namespace smallmm {
namespace {

// Shortest K for the dot kernel; shorter products go to the other families. Timed
// 2026-12-01 (../README.md) on matvecs x[20000, M, K] · y[20000, K, 1] against the packed
// kernels: K = 4..7 0.64-0.97× on AVX-512 (M = 16..64), 0.27-0.55× on AVX2 and the baseline
// (M = 1..64); K = 1..3 1.2-3.3× (AVX-512, M = 16). Was 8 (c8448cc, 2026-11-25: 100k 20×20
// matvecs 46 -> 17 ms), not timed below that.
constexpr int64_t kDotMinK = 4;

// The sums of four vectors' lanes, s[q] = Σ a_q: fold each vector to half its lanes while
// packing two into one (a0 | a1 halves), then to a quarter packing all four, then within
// the quarters, so four rows cost six shuffles and five adds instead of four chains.
template <typename R, int L, typename V>
inline void Sum4(const V& a0, const V& a1, const V& a2, const V& a3, R* s) {
  if constexpr (L < 4) {
    const V* v[4] = {&a0, &a1, &a2, &a3};
    for (int q = 0; q < 4; ++q) {
      s[q] = R(0);
      for (int i = 0; i < L; ++i) s[q] += (*v[q])[i];
    }
  } else {
    using I = typename VecOf<typename SameSizeInt<R>::type, L>::type;
    constexpr auto lanes = std::make_integer_sequence<int, L>();
    constexpr int H = L / 2, Q = L / 4;
    // Lane r < H: lane r of the first vector + lane r + H; lane r >= H: the second's.
    constexpr I lo = MakeMask<I>([](int r) { return r < H ? r : L + r - H; }, lanes);
    constexpr I hi = MakeMask<I>([](int r) { return r < H ? r + H : L + r; }, lanes);
    const V t01 = __builtin_shuffle(a0, a1, lo) + __builtin_shuffle(a0, a1, hi);
    const V t23 = __builtin_shuffle(a2, a3, lo) + __builtin_shuffle(a2, a3, hi);
    // Quarter g of the result: half g % 2 of t01 (g < 2) or t23, folded.
    constexpr I lo2 =
        MakeMask<I>([](int r) { return (r / Q < 2 ? 0 : L) + (r / Q % 2) * H + r % Q; }, lanes);
    constexpr I hi2 =
        MakeMask<I>([](int r) { return (r / Q < 2 ? 0 : L) + (r / Q % 2) * H + r % Q + Q; }, lanes);
    V u = __builtin_shuffle(t01, t23, lo2) + __builtin_shuffle(t01, t23, hi2);
    // Within each quarter: every lane ends up holding the quarter's sum.
    for (int w = Q / 2; w >= 1; w /= 2) {
      const I swap = MakeMask<I>([](int r) { return r; }, lanes) ^ w;
      u += __builtin_shuffle(u, swap);
    }
    for (int q = 0; q < 4; ++q) s[q] = u[q * Q];
  }
}

// Columns a dot product run takes: N = 1..kDotMaxN, each contiguous along K (B's columns
// as rows of Bᵀ: matvecs, transpose_b products, and batches folded into N columns).
constexpr int64_t kDotMaxN = 4;

// Rows a block takes against N columns: four where their accumulators (one vector per row
// and column, kScalars = two for complex types) fit in half the vector registers (32 with
// AVX-512, 16 otherwise), so that the columns' and rows' loads keep the other half.
template <DType D, int N>
constexpr int kDotRowsFit = (kVecBytes == 64 ? 16 : 8) / (N * kScalars<D>);
template <DType D, int N>
constexpr int kDotRows = kDotRowsFit<D, N> >= 4 ? 4 : (kDotRowsFit<D, N> >= 2 ? 2 : 1);

// What every block of one product shares: the N columns (x, column j at x + j·xcs), A's row
// stride and K in storage scalars (kv of them in whole vectors, then `tail` in one partial
// vector), C's strides in elements, and for complex types the signs that turn the two
// accumulators' lane sums into the real and imaginary parts (DotBlock).
template <DType D>
struct DotArgs {
  using V = AccVec<D, kVecBytes / sizeof(typename Traits<D>::R)>;
  const StorageOf<D>* x;
  int64_t xcs, ars, kv;
  int tail;
  void* c;
  int64_t crs, ccs;
  V re_sign, im_sign;
};

// RB rows of A (row r at a + r·ars) against the N columns: RB·N independent FMA chains along
// K, each column loaded once per step for all RB rows, summed by Sum4 four at a time, and
// written to C from element co. Complex types keep two accumulators per output: P = Σ a·x
// lane by lane (even lanes ar·xr, odd ai·xi) and Q = Σ swap(a)·x (even ai·xr, odd ar·xi),
// one shuffle per row and step, no shuffle in the sums; then re = Σ P·(1, -sa·sb) and
// im = Σ Q·(sa, sb) with sa, sb = -1 for a conjugated operand.
template <DType D, int RB, int N>
__attribute__((always_inline)) inline void DotBlock(const DotArgs<D>& g, const StorageOf<D>* a,
                                                    int64_t co) {
  using R = typename Traits<D>::R;
  constexpr int L = kVecBytes / sizeof(R);
  constexpr int E = kScalars<D>;
  using V = AccVec<D, L>;
  using I = typename VecOf<typename SameSizeInt<R>::type, L>::type;
  V acc[RB * N * E] = {};
  auto step = [&](int64_t l, int lanes) __attribute__((always_inline)) {
    V xv[N];
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) xv[j] = LoadLanes<D, L>(g.x + j * g.xcs + l, lanes);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const V av = LoadLanes<D, L>(a + r * g.ars + l, lanes);
#pragma GCC unroll 4
      for (int j = 0; j < N; ++j) acc[(r * N + j) * E] += av * xv[j];
      if constexpr (E == 2) {
        constexpr I swap =
            MakeMask<I>([](int q) { return q ^ 1; }, std::make_integer_sequence<int, L>());
        const V as = __builtin_shuffle(av, swap);
#pragma GCC unroll 4
        for (int j = 0; j < N; ++j) acc[(r * N + j) * E + 1] += as * xv[j];
      }
    }
  };
  for (int64_t l = 0; l < g.kv; l += L) step(l, L);
  if (g.tail > 0) step(g.kv, g.tail);
  constexpr int kSums = RB * N * E, kPadded = (kSums + 3) / 4 * 4;
  V v[kPadded];
#pragma GCC unroll 16
  for (int q = 0; q < kPadded; ++q) {
    if constexpr (E == 2) {
      v[q] = q < kSums ? acc[q] * (q % 2 ? g.im_sign : g.re_sign) : V{};
    } else {
      v[q] = q < kSums ? acc[q] : V{};
    }
  }
  R s[kPadded];
#pragma GCC unroll 4
  for (int q = 0; q < kPadded; q += 4) Sum4<R, L>(v[q], v[q + 1], v[q + 2], v[q + 3], s + q);
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) {
      const int64_t o = co + r * g.crs + j * g.ccs;
      if constexpr (E == 2) {
        Traits<D>::Store(g.c, 2 * o, s[(r * N + j) * 2]);
        Traits<D>::Store(g.c, 2 * o + 1, s[(r * N + j) * 2 + 1]);
      } else {
        Traits<D>::Store(g.c, o, s[r * N + j]);
      }
    }
  }
}

// Out of line on purpose: inlined into RunDirect's walk (which knows the pointer), it runs
// short of registers and spills in the inner loop; 100k 20×20 matvecs took 16.1 instead of
// 13.3 ms (single thread, AVX-512, 2026-12-01).
//
// Blocks of kDotRows rows, then the rows left over one at a time.
template <DType D, int N>
__attribute__((noinline)) void DotRun(const GemmPlan& p, const void* a, const void* b, void* c,
                                      int64_t count, int64_t ao, int64_t sa, int64_t bo, int64_t sb,
                                      int64_t co, int64_t sc) {
  using R = typename Traits<D>::R;
  using S = StorageOf<D>;
  constexpr int L = kVecBytes / sizeof(R);
  constexpr int E = kScalars<D>;
  constexpr int RB = kDotRows<D, N>;
  const S* A = static_cast<const S*>(a);
  DotArgs<D> g;
  g.xcs = E * p.b_cs;
  g.ars = E * p.a_rs;
  g.kv = E * p.k - E * p.k % L;
  g.tail = int(E * p.k % L);
  g.c = c;
  g.crs = p.c_rs;
  g.ccs = p.c_cs;
  if constexpr (E == 2) {
    const R sa_ = p.conj_a ? R(-1) : R(1), sb_ = p.conj_b ? R(-1) : R(1);
    for (int q = 0; q < L; ++q) {
      g.re_sign[q] = q % 2 ? -sa_ * sb_ : R(1);
      g.im_sign[q] = q % 2 ? sb_ : sa_;
    }
  }
  const int64_t m = p.m;
  for (int64_t t = 0; t < count; ++t, ao += sa, bo += sb, co += sc) {
    g.x = static_cast<const S*>(b) + E * bo;
    int64_t i = 0;
    for (; i + RB <= m; i += RB) DotBlock<D, RB, N>(g, A + E * (ao + i * p.a_rs), co + i * p.c_rs);
    for (; i < m; ++i) DotBlock<D, 1, N>(g, A + E * (ao + i * p.a_rs), co + i * p.c_rs);
  }
}

// Whether N = 2..4 columns run faster here than on the packed kernels (AVX-512, one thread,
// 2026-12-06, AMD EPYC Zen 4; x [I, M, K] · y [N, I, K, 1] with ~2M elements, against the
// previous commit's kernels):
// - float64 and the complex types win everywhere timed (M = 4..64, K = 4..24): 1.2-6.5×.
// - float32 and the 16-bit types (float accumulators) lose where many rows have a short K:
//   each output then costs a horizontal sum for a vector or less of FMAs, and the packed
//   kernels' 16-row tiles run full. N = 4 with M >= 16 and K < 12 0.53-0.78× (float32),
//   0.61-0.94× (float16 / bfloat16), with M = 64 and K = 16 0.96× (float16); N = 2 loses
//   only at M = 64 with K <= 8 (0.91-0.98×). N = 3 is taken as N = 4.
// - Without AVX-512's masked loads (AVX2, SSE2) a row's last partial vector is moved lane
//   by lane through the stack, which stalls store forwarding: N = 4 with K = 4, 5 or 12
//   floats (K = 5 doubles) ran 0.2-0.9× the packed time on AVX2, whole vectors 2.4-12×.
template <DType D>
inline bool DotPays(const GemmPlan& p) {
  using R = typename Traits<D>::R;
  constexpr int L = kVecBytes / sizeof(R);
  if constexpr (kVecBytes < 64) {
    return kScalars<D> * p.k % L == 0;
  } else if constexpr (!Traits<D>::kComplex && sizeof(R) == 4) {
    if (p.n == 2) return p.m < 64 || p.k >= 12;
    return p.m < 16 || p.k >= (p.m < 64 ? 16 : 24);
  } else {
    return true;
  }
}

// N = 1 always (complex too: 8192 complex128 16×16 matvecs 2.0 -> 1.6 ms against the
// stationary kernels, complex64 1.9 -> 0.5 ms). N = 2..4 where DotPays and the stationary
// kernels cannot take the product (it went to the packed family: float64 W[409, 160, 32]
// against 4 columns a product 3.4 -> 1.1 ms, complex128 8.2 -> 3.8 ms), and complex64
// where they can too: its strips take 1.4-2.2× as long (transposed B, K = 7..16). Real and
// complex128 products with transposed B and a short K stay stationary: their per-output
// sums cost more than its strips (float64 [16, 16] · [16, 4] 1.12 against 0.75 ms, float32
// [8, 8] · [8, 3] 0.27 against 0.15). AVX-512, one thread, 2026-12-06 (AMD EPYC Zen 4).
template <DType D>
bool CanDot(const GemmPlan& p) {
  const bool fits = p.n >= 1 && p.n <= kDotMaxN && p.num_reduced == 1 && p.a_cs == 1 &&
                    p.b_rs == 1 && p.k >= kDotMinK && p.m >= 1;
  return fits && (p.n == 1 || (DotPays<D>(p) && (D == DType::kComplex64 || !CanStationary<D>(p))));
}

template <DType D>
bool RunDot(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin, int64_t end) {
  static constexpr DirectFn<D> kRuns[kDotMaxN] = {&DotRun<D, 1>, &DotRun<D, 2>, &DotRun<D, 3>,
                                                  &DotRun<D, 4>};
  return RunDirect<D>(kRuns[p.n - 1], p, a, b, c, begin, end);
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_
