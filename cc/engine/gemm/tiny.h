// tiny.h — the "tiny" kernel family: M, N, K <= kTinyMax, real types, no reduction.
// Packing would cost more than the product itself, so each product is computed straight
// from memory with compile-time sizes (fully unrolled, operands in registers), walking a
// run of the innermost batch loop. Included only by gemm_isa.cc (compiled once per ISA and dtype):
// everything has internal linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_TINY_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_TINY_H_

#include <cstdint>
#include <utility>

#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/streaming.h"

namespace smallmm {
namespace {

// Largest M, N, K of the tiny kernels; the table holds kTinyMax³ of them per dtype and ISA.
// 5d1c772 (2026-11-25): 2M 2×2 products 43 -> 2.7 ms single-threaded (packed before).
// Timed 2026-12-01 (../README.md, AVX-512, 200k products): with 3, the 4×4×4 products take
// 1.28× as long (packed). A limit of 5 or 7 would also win where only the packed kernels run
// today (5×5×5 0.31×, 5×3·3×2 0.15×, 3×7·7×3 0.44×, 7×7×7 0.69×); that trade (a table 2-5×
// larger, and the boundary with the stationary kernels) is not settled, so 4 stays.
constexpr int kTinyMax = 4;

// Dense runs: A, B and C row-major and the products back to back, as a [batch, M, K] @
// [batch, K, N] pair is laid out. G products share each vector of C: its lanes are the G
// outputs in memory order, and lane (g, i, j) of the l-th term is A_g[i, l]·B_g[l, j], both
// factors picked out of the products' contiguous elements by a two-vector shuffle (one
// vpermt2ps). A product then costs K/G shuffle pairs and multiply-adds and one store
// instead of M·N·K scalar multiply-adds and M·N scalar stores. AVX-512 only, where that
// shuffle is one instruction. Returns how many of the `count` products it computed
// (whole groups of G; the caller does the rest).
template <DType D, int M, int N, int K>
struct TinyDense {
  using R = typename Traits<D>::R;
  using S = StorageOf<D>;
  static constexpr int L = kVecBytes / sizeof(R);
  static constexpr int Min(int x, int y) { return x < y ? x : y; }
  // Products per vector of C; their A and B elements fit in two vectors each. 0 where one
  // product's C does not fit a vector (float64 from 3×3): those take the scalar loop.
  static constexpr int G = Min(L / (M * N), Min(2 * L / (M * K), 2 * L / (K * N)));
  static constexpr int kA = G * M * K, kB = G * K * N, kC = G * M * N;
  // Whether C can be streamed: a group fills a whole vector of C stored as such.
  static constexpr bool kStreams = kStoredAsAcc<D> && kC == L;
  using V = AccVec<D, L>;
  using I = typename VecOf<typename SameSizeInt<R>::type, L>::type;

  // The lanes of the l-th term's factors: element (g, i, l) of A and (g, l, j) of B for
  // output lane q = (g·M + i)·N + j; unused lanes read element 0.
  template <int l>
  static constexpr I IndexA() {
    return MakeMask<I>([](int q) { return q < kC ? (q / (M * N)) * M * K + (q / N % M) * K + l : 0; },
                       std::make_integer_sequence<int, L>());
  }
  template <int l>
  static constexpr I IndexB() {
    return MakeMask<I>([](int q) { return q < kC ? (q / (M * N)) * K * N + l * N + q % N : 0; },
                       std::make_integer_sequence<int, L>());
  }
  static V Load2(const S* p, int n, V* hi) {
    *hi = n > L ? LoadLanes<D, L>(p + L, n - L) : V{};
    return LoadLanes<D, L>(p, n > L ? L : n);
  }
  template <int... l>
  static V Sum(const V& a0, const V& a1, const V& b0, const V& b1, std::integer_sequence<int, l...>) {
    // From +0 like every GEMM, so -0·1 gives +0 as in tf.matmul.
    V acc = {};
    ((acc += __builtin_shuffle(a0, a1, IndexA<l>()) * __builtin_shuffle(b0, b1, IndexB<l>())), ...);
    return acc;
  }
  static int64_t Run(const S* a, const S* b, S* c, int64_t count, bool stream) {
    int64_t t = 0;
    for (; t + G <= count; t += G, a += kA, b += kB, c += kC) {
      V a1, b1;
      const V a0 = Load2(a, kA, &a1), b0 = Load2(b, kB, &b1);
      const V v = Sum(a0, a1, b0, b1, std::make_integer_sequence<int, K>());
      if constexpr (kStreams) {
        if (stream) {
          StreamVec(c, v);
          continue;
        }
      }
      StoreLanes<D, L>(c, v, kC);
    }
    return t;
  }
  // Whether a run is dense: element (i, l) of a product at i·K + l, products M·K apart.
  static bool Dense(const GemmPlan& p, int64_t sa, int64_t sb, int64_t sc) {
    auto dense = [](int rows, int cols, int64_t rs, int64_t cs, int64_t step) {
      return (rows == 1 || rs == cols) && (cols == 1 || cs == 1) && step == rows * cols;
    };
    return dense(M, K, p.a_rs, p.a_cs, sa) && dense(K, N, p.b_rs, p.b_cs, sb) &&
           dense(M, N, p.c_rs, p.c_cs, sc);
  }
};

template <DType D, int M, int N, int K>
void TinyRun(const GemmPlan& p, const void* a, const void* b, void* c, int64_t count, int64_t ao,
             int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc) {
  using T = Traits<D>;
  using R = typename T::R;
  const int64_t ars = p.a_rs, acs = p.a_cs, brs = p.b_rs, bcs = p.b_cs;
  const int64_t crs = p.c_rs, ccs = p.c_cs;
  int64_t t = 0;
  if constexpr (kVecBytes == 64 && !Traits<D>::kComplex && TinyDense<D, M, N, K>::G > 0) {
    using Dense = TinyDense<D, M, N, K>;
    if (count >= Dense::G && Dense::Dense(p, sa, sb, sc)) {
      using S = StorageOf<D>;
      const bool stream =
          Dense::kStreams && StreamOutput(uint64_t(p.output_elements) * sizeof(S), 64);
      t = Dense::Run(static_cast<const S*>(a) + ao, static_cast<const S*>(b) + bo,
                     static_cast<S*>(c) + co, count, stream);
      if (stream) StreamFence();
      ao += t * sa, bo += t * sb, co += t * sc;
    }
  }
  for (; t < count; ++t, ao += sa, bo += sb, co += sc) {
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
