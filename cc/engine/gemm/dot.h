// dot.h — the "dot" kernel family: matrix-vector products (N = 1) with contiguous rows of
// A and a contiguous vector (float/double, no reduction). Each output element is a dot
// product along K, vectorised along K, so A is streamed once in its own layout instead of
// being transposed into a packed panel. Included only by gemm_isa.cc (compiled once per
// ISA): everything has internal linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_

#include <cstdint>
#include <cstring>

#include "cc/engine/gemm/common.h"

namespace smallmm {
namespace {

// Shortest K for the dot kernel; shorter products go to the other families. Timed
// 2026-12-01 (../README.md) on matvecs x[20000, M, K] · y[20000, K, 1] against the packed
// kernels: K = 4..7 0.64-0.97× on AVX-512 (M = 16..64), 0.27-0.55× on AVX2 and the baseline
// (M = 1..64); K = 1..3 1.2-3.3× (AVX-512, M = 16). Was 8 (c8448cc, 2026-11-25: 100k 20×20
// matvecs 46 -> 17 ms), not timed below that.
constexpr int64_t kDotMinK = 4;

// Out of line on purpose: inlined into RunDirect's walk (which knows the pointer), it runs
// short of registers and spills in the inner loop; 100k 20×20 matvecs took 16.1 instead of
// 13.3 ms (single thread, AVX-512, 2026-12-01).
template <DType D>
__attribute__((noinline)) void DotRun(const GemmPlan& p, const void* a, const void* b, void* c,
                                      int64_t count, int64_t ao, int64_t sa, int64_t bo, int64_t sb,
                                      int64_t co, int64_t sc) {
  using R = typename Traits<D>::R;
  constexpr int L = 64 / sizeof(R);
  using V = typename VecOf<R, L>::type;
  const R* A = static_cast<const R*>(a);
  const R* X = static_cast<const R*>(b);
  R* C = static_cast<R*>(c);
  const int64_t m = p.m, k = p.k, ars = p.a_rs, crs = p.c_rs;
  const int64_t kv = k - k % L;
  for (int64_t t = 0; t < count; ++t, ao += sa, bo += sb, co += sc) {
    const R* x = X + bo;
    for (int64_t i = 0; i < m; ++i) {
      const R* row = A + ao + i * ars;
      V acc = V{};
      for (int64_t l = 0; l < kv; l += L) {
        V va, vx;
        memcpy(&va, row + l, sizeof(V));
        memcpy(&vx, x + l, sizeof(V));
        acc += va * vx;
      }
      R sum = R(0);
      for (int v = 0; v < L; ++v) sum += acc[v];
      for (int64_t l = kv; l < k; ++l) sum += row[l] * x[l];
      C[co + i * crs] = sum;
    }
  }
}

template <DType D>
bool CanDot(const GemmPlan& p) {
  return kPlainReal<D> && p.n == 1 && p.num_reduced == 1 && p.a_cs == 1 && p.b_rs == 1 &&
         p.k >= kDotMinK && p.m >= 1;
}

template <DType D>
bool RunDot(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin, int64_t end) {
  if constexpr (!kPlainReal<D>) {
    return false;  // never chosen (CanDot)
  } else {
    return RunDirect<D>(&DotRun<D>, p, a, b, c, begin, end);
  }
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_DOT_H_
