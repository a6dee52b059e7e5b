// matvec.h — the "matvec" kernel family: matrix-vector products (N = 1) with a short K
// (<= kMatvecMaxK), real types, no reduction. y = A·x is vectorised across A's rows, L
// rows at a time (L = lanes of this build's float or double vector; float16 / bfloat16 widen
// to float as they load), with K a compile-time size and x's K elements broadcast once per
// product, so A streams once in its own layout:
//  - rows contiguous (plain row-major A, A[i, l] at i·K + l): a block of L rows is K
//    contiguous vectors, and column l of the block is picked out of them with two-source
//    shuffles (vpermt2ps on AVX-512; no gather instruction);
//  - columns contiguous (a transposed A, A[i, l] at i + l·a_cs): column l of the block is
//    one vector load.
// The dot family (dot.h) takes the longer K, where a row is a whole vector. Included only
// by gemm_isa.cc (compiled once per ISA and dtype): everything has internal linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_MATVEC_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_MATVEC_H_

#include <cstdint>
#include <utility>

#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/streaming.h"

namespace smallmm {
namespace {

// The longest K of the matvec kernels; longer ones go to the dot kernels.
constexpr int kMatvecMaxK = 7;

// Column l of a block of L rows × K elements held in K vectors v[0..K) (element e of the
// block is lane e % L of v[e / L]; row r's element l is e = r·K + l). Lane r of the result
// comes from v[(r·K + l) / L]: the column starts as a two-source shuffle of the first two
// vectors it touches and takes each further vector with one more shuffle that keeps the
// lanes it already has.
template <typename I, int L, int K, int l>
struct ColumnMasks {
  static constexpr int kFirst = l / L;                 // first vector the column touches
  static constexpr int kLast = ((L - 1) * K + l) / L;  // last one
  // Shuffle index of lane r when vector q joins (q == kFirst + 1 also takes kFirst).
  static constexpr int Lane(int q, int r) {
    const int e = r * K + l, src = e / L, lane = e % L;
    if (q == kFirst + 1 || kFirst == kLast) {
      return src == kFirst ? lane : src == q ? L + lane : 0;
    }
    return src == q ? L + lane : r;
  }
  template <int q, int... r>
  static constexpr I Mask(std::integer_sequence<int, r...>) {
    return I{Lane(q, r)...};
  }
};

template <typename V, typename I, int L, int K, int l, int... q>
inline V ColumnFrom(const V* v, std::integer_sequence<int, q...>) {
  using Masks = ColumnMasks<I, L, K, l>;
  constexpr auto lanes = std::make_integer_sequence<int, L>();
  constexpr int first = Masks::kFirst;
  if constexpr (Masks::kLast == first) {
    return __builtin_shuffle(v[first], v[first], Masks::template Mask<first + 1>(lanes));
  } else {
    V t = __builtin_shuffle(v[first], v[first + 1], Masks::template Mask<first + 1>(lanes));
    ((t = __builtin_shuffle(t, v[first + 2 + q], Masks::template Mask<first + 2 + q>(lanes))), ...);
    return t;
  }
}

template <typename V, typename I, int L, int K, int l>
inline V Column(const V* v) {
  using Masks = ColumnMasks<I, L, K, l>;
  // The vectors after the first two.
  constexpr int extra = Masks::kLast - Masks::kFirst > 1 ? Masks::kLast - Masks::kFirst - 1 : 0;
  return ColumnFrom<V, I, L, K, l>(v, std::make_integer_sequence<int, extra>());
}

// Σ_l column(l) · x[l] over a block.
template <typename V, typename I, int L, int K, int... l>
inline V BlockProduct(const V* v, const V* x, std::integer_sequence<int, l...>) {
  V acc = V{};  // from +0 like every GEMM (-0 · 1 = +0)
  ((acc += Column<V, I, L, K, l>(v) * x[l]), ...);
  return acc;
}

template <DType D, int K>
void MatvecRun(const GemmPlan& p, const void* a, const void* b, void* c, int64_t count, int64_t ao,
               int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc) {
  using R = typename Traits<D>::R;
  using S = StorageOf<D>;
  constexpr int L = kVecBytes / sizeof(R);
  using V = AccVec<D, L>;
  using I = typename VecOf<typename SameSizeInt<R>::type, L>::type;
  const S* A = static_cast<const S*>(a);
  S* Y = static_cast<S*>(c);
  const int64_t m = p.m, a_rs = p.a_rs, a_cs = p.a_cs, b_rs = p.b_rs;
  const bool rows = a_cs == 1 && a_rs == K;  // else a_rs == 1: columns contiguous
  for (int64_t t = 0; t < count; ++t, ao += sa, bo += sb, co += sc) {
    V xv[K];
#pragma GCC unroll 8
    for (int l = 0; l < K; ++l) xv[l] = Traits<D>::Load(b, bo + l * b_rs) - V{};  // a splat
    const S* A0 = A + ao;
    S* y = Y + co;
    int64_t i = 0;
    if (rows) {
      for (; i + L <= m; i += L) {
        V v[K];
#pragma GCC unroll 8
        for (int q = 0; q < K; ++q) v[q] = LoadLanes<D, L>(A0 + i * K + q * L, L);
        StoreLanes<D, L>(y + i,
                         BlockProduct<V, I, L, K>(v, xv, std::make_integer_sequence<int, K>()), L);
      }
      if (i < m) {  // the last rows: a partial block
        const int rest = int((m - i) * K);
        V v[K];
#pragma GCC unroll 8
        for (int q = 0; q < K; ++q) {
          const int n = rest - q * L;
          v[q] = LoadLanes<D, L>(A0 + i * K + q * L, n >= L ? L : n > 0 ? n : 0);
        }
        StoreLanes<D, L>(y + i,
                         BlockProduct<V, I, L, K>(v, xv, std::make_integer_sequence<int, K>()),
                         int(m - i));
      }
    } else {
      for (; i + L <= m; i += L) {
        V acc = V{};
#pragma GCC unroll 8
        for (int l = 0; l < K; ++l) acc += LoadLanes<D, L>(A0 + i + l * a_cs, L) * xv[l];
        StoreLanes<D, L>(y + i, acc, L);
      }
      if (i < m) {
        V acc = V{};
#pragma GCC unroll 8
        for (int l = 0; l < K; ++l) acc += LoadLanes<D, L>(A0 + i + l * a_cs, int(m - i)) * xv[l];
        StoreLanes<D, L>(y + i, acc, int(m - i));
      }
    }
  }
}

template <DType D>
bool CanMatvec(const GemmPlan& p) {
  return !Traits<D>::kComplex && p.n == 1 && p.num_reduced == 1 && p.k >= 1 && p.k <= kMatvecMaxK &&
         p.c_rs == 1 && ((p.a_cs == 1 && p.a_rs == p.k) || p.a_rs == 1);
}

// Every K in [1, kMatvecMaxK], at index K - 1.
template <DType D, int... I>
struct MatvecTable {
  static constexpr DirectFn<D> fns[] = {&MatvecRun<D, I + 1>...};
};
template <DType D, int... I>
MatvecTable<D, I...> MakeMatvecTable(std::integer_sequence<int, I...>);  // type only
template <DType D>
using MatvecFns = decltype(MakeMatvecTable<D>(std::make_integer_sequence<int, kMatvecMaxK>()));

template <DType D>
bool RunMatvec(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin,
               int64_t end) {
  if constexpr (Traits<D>::kComplex) {
    return false;  // never chosen (CanMatvec)
  } else {
    return RunDirect<D>(MatvecFns<D>::fns[p.k - 1], p, a, b, c, begin, end);
  }
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_MATVEC_H_
