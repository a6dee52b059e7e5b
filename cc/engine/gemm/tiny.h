// tiny.h — the "tiny" kernel family: M, N, K <= kTinyMax, real types, no reduction.
// Packing would cost more than the product itself, so each product is computed straight
// from memory with compile-time sizes (fully unrolled, operands in registers), walking a
// run of the innermost batch loop. Included only by gemm_isa.cc (compiled once per ISA):
// everything has internal linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_TINY_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_TINY_H_

#include <cstdint>
#include <utility>

#include "cc/engine/gemm/common.h"

namespace smallmm {
namespace {

// Largest M, N, K of the tiny kernels; the table holds kTinyMax³ of them per dtype and ISA.
// 5d1c772 (2026-11-25): 2M 2×2 products 43 -> 2.7 ms single-threaded (packed before).
// Timed 2026-12-01 (../README.md, AVX-512, 200k products): with 3, the 4×4×4 products take
// 1.28× as long (packed). A limit of 5 or 7 would also win where only the packed kernels run
// today (5×5×5 0.31×, 5×3·3×2 0.15×, 3×7·7×3 0.44×, 7×7×7 0.69×); that trade (a table 2-5×
// larger, and the boundary with the stationary kernels) is not settled, so 4 stays.
constexpr int kTinyMax = 4;

template <DType D, int M, int N, int K>
void TinyRun(const GemmPlan& p, const void* a, const void* b, void* c, int64_t count, int64_t ao,
             int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc) {
  using T = Traits<D>;
  using R = typename T::R;
  const int64_t ars = p.a_rs, acs = p.a_cs, brs = p.b_rs, bcs = p.b_cs;
  const int64_t crs = p.c_rs, ccs = p.c_cs;
  for (int64_t t = 0; t < count; ++t, ao += sa, bo += sb, co += sc) {
    R av[M][K], bv[K][N];
    for (int i = 0; i < M; ++i)
      for (int l = 0; l < K; ++l) av[i][l] = T::Load(a, ao + i * ars + l * acs);
    for (int l = 0; l < K; ++l)
      for (int j = 0; j < N; ++j) bv[l][j] = T::Load(b, bo + l * brs + j * bcs);
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) {
        // From +0 like every GEMM, so -0·1 gives +0 as in tf.matmul.
        R sum = R(0);
        for (int l = 0; l < K; ++l) sum += av[i][l] * bv[l][j];
        T::Store(c, co + i * crs + j * ccs, sum);
      }
    }
  }
}

// Every (M, N, K) in [1, kTinyMax]³, at index ((M - 1)·kTinyMax + N - 1)·kTinyMax + K - 1.
template <DType D, int... I>
struct TinyTable {
  static constexpr DirectFn<D> fns[] = {
      &TinyRun<D, I / (kTinyMax * kTinyMax) + 1, I / kTinyMax % kTinyMax + 1, I % kTinyMax + 1>...};
};
template <DType D, int... I>
TinyTable<D, I...> MakeTinyTable(std::integer_sequence<int, I...>);  // type only
template <DType D>
using TinyFns =
    decltype(MakeTinyTable<D>(std::make_integer_sequence<int, kTinyMax * kTinyMax * kTinyMax>()));

template <DType D>
bool CanTiny(const GemmPlan& p) {
  return !Traits<D>::kComplex && p.num_reduced == 1 && p.m >= 1 && p.n >= 1 && p.k >= 1 &&
         p.m <= kTinyMax && p.n <= kTinyMax && p.k <= kTinyMax;
}

template <DType D>
bool RunTiny(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin, int64_t end) {
  if constexpr (Traits<D>::kComplex) {
    return false;  // never chosen (CanTiny)
  } else {
    const int64_t i = ((p.m - 1) * kTinyMax + p.n - 1) * kTinyMax + p.k - 1;
    return RunDirect<D>(TinyFns<D>::fns[i], p, a, b, c, begin, end);
  }
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_TINY_H_
