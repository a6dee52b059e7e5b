// dot.h — the "dot" kernel family: matrix-vector products (N = 1) with contiguous rows of
// A and a contiguous vector (real types, no reduction; float16 / bfloat16 widen to float32
// a vector at a time). Each output element is a dot product along K, vectorised along K,
// so A is streamed once in its own layout instead of being transposed into a packed panel.
// Included only by gemm_isa.cc (compiled once per ISA and dtype): everything has internal linkage,
// see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_

#include <cstdint>
#include <cstring>
#include <utility>

#include "cc/engine/gemm/common.h"

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

// Out of line on purpose: inlined into RunDirect's walk (which knows the pointer), it runs
// short of registers and spills in the inner loop; 100k 20×20 matvecs took 16.1 instead of
// 13.3 ms (single thread, AVX-512, 2026-12-01).
//
// Four rows at a time, each with its own accumulator (independent FMA chains, one load of
// x per four rows), summed together by Sum4; K's last partial vector is a partial load.
template <DType D>
__attribute__((noinline)) void DotRun(const GemmPlan& p, const void* a, const void* b, void* c,
                                      int64_t count, int64_t ao, int64_t sa, int64_t bo, int64_t sb,
                                      int64_t co, int64_t sc) {
  using R = typename Traits<D>::R;
  using S = StorageOf<D>;
  constexpr int L = kVecBytes / sizeof(R);
  using V = AccVec<D, L>;
  const S* A = static_cast<const S*>(a);
  const S* X = static_cast<const S*>(b);
  const int64_t m = p.m, k = p.k, ars = p.a_rs, crs = p.c_rs;
  const int64_t kv = k - k % L;
  const int tail = int(k % L);
  for (int64_t t = 0; t < count; ++t, ao += sa, bo += sb, co += sc) {
    const S* x = X + bo;
    const V xt = LoadLanes<D, L>(x + kv, tail);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      const S* r0 = A + ao + i * ars;
      const S* r1 = r0 + ars;
      const S* r2 = r1 + ars;
      const S* r3 = r2 + ars;
      V a0 = V{}, a1 = V{}, a2 = V{}, a3 = V{};
      for (int64_t l = 0; l < kv; l += L) {
        const V vx = LoadLanes<D, L>(x + l, L);
        a0 += LoadLanes<D, L>(r0 + l, L) * vx;
        a1 += LoadLanes<D, L>(r1 + l, L) * vx;
        a2 += LoadLanes<D, L>(r2 + l, L) * vx;
        a3 += LoadLanes<D, L>(r3 + l, L) * vx;
      }
      if (tail > 0) {
        a0 += LoadLanes<D, L>(r0 + kv, tail) * xt;
        a1 += LoadLanes<D, L>(r1 + kv, tail) * xt;
        a2 += LoadLanes<D, L>(r2 + kv, tail) * xt;
        a3 += LoadLanes<D, L>(r3 + kv, tail) * xt;
      }
      R s[4];
      Sum4<R, L>(a0, a1, a2, a3, s);
      for (int q = 0; q < 4; ++q) Traits<D>::Store(c, co + (i + q) * crs, s[q]);
    }
    for (; i < m; ++i) {
      const S* row = A + ao + i * ars;
      V acc = V{};
      for (int64_t l = 0; l < kv; l += L)
        acc += LoadLanes<D, L>(row + l, L) * LoadLanes<D, L>(x + l, L);
      if (tail > 0) acc += LoadLanes<D, L>(row + kv, tail) * xt;
      R s[4];
      Sum4<R, L>(acc, V{}, V{}, V{}, s);
      Traits<D>::Store(c, co + i * crs, s[0]);
    }
  }
}

template <DType D>
bool CanDot(const GemmPlan& p) {
  return !Traits<D>::kComplex && p.n == 1 && p.num_reduced == 1 && p.a_cs == 1 && p.b_rs == 1 &&
         p.k >= kDotMinK && p.m >= 1;
}

template <DType D>
bool RunDot(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin, int64_t end) {
  if constexpr (Traits<D>::kComplex) {
    return false;  // never chosen (CanDot)
  } else {
    return RunDirect<D>(&DotRun<D>, p, a, b, c, begin, end);
  }
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_
