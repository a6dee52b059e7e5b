// stationary.h — the "stationary" kernel family (operand-stationary products): short K
// (<= kStationaryMaxK) and C contiguous along one side. The operand on that side stays in
// registers, one K-vector strip at a time, while the other operand streams past it one
// column (or row) at a time, each finished column going straight to C. Nothing is packed,
// and each output line is written once, whole. Column kernel (C contiguous along M): the
// strip is VL rows of A, the stream is B's columns. Row kernel: the strip is VL columns of
// B, the stream is A's rows. The capsule prediction (160×8 · 8×50 per input capsule) and
// 8×8 · 8×64 products are this shape. Included only by gemm_isa.cc (compiled once per
// ISA): everything has internal linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_STATIONARY_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_STATIONARY_H_

#include <cstdint>
#include <cstring>
#include <utility>

#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/streaming.h"

namespace smallmm {
namespace {

// The longest K of the stationary kernels: the strip takes K vector registers, plus four accumulators and a broadcast.
// - AVX-512: 24 + 5 of 32 registers. 0ee665a (2026-11-25): 20000 20×20×20 products 5.2 ->
//   3.5 ms single-threaded against the packed micro-kernels; bench 20000 × 20×20@20×20
//   forward+backward 14.4 -> 10.9 ms.
// - AVX2: 11 + 5 of 16. Timed 2026-12-01 (../README.md): K = 9..11 products (M = 8..20,
//   N = 8..64) take 0.16-0.95× the packed time (it was 8, d94c004).
// - Baseline (SSE2): 8 (d94c004); K = 9..11 took 1.3-1.8× the packed time (same run).
#if defined(__AVX512F__)
constexpr int kStationaryMaxK = 24;
#elif defined(__AVX__)
constexpr int kStationaryMaxK = 11;
#else
constexpr int kStationaryMaxK = 8;
#endif

// Lane type: a W-lane vector, or the scalar itself for W = 1.
template <typename R, int W>
struct Lanes {
  using type = typename VecOf<R, W>::type;
};
template <typename R>
struct Lanes<R, 1> {
  using type = R;
};

// A finished column (row) of W lanes to out[o..o+W): vector stores for float/double
// (non-temporal when asked and a whole line), rounded lane by lane for fp16/bf16.
template <DType D, int W>
inline void PutLanes(void* out, int64_t o, const typename Lanes<typename Traits<D>::R, W>::type& v,
                     bool stream) {
  using R = typename Traits<D>::R;
  if constexpr (kPlainReal<D>) {
    R* p = static_cast<R*>(out) + o;
    if constexpr (W * sizeof(R) == 64) {
      if (stream) {
        StreamVec(p, v);
        return;
      }
    }
    StoreVec(p, v);
  } else {
    R lanes[W];
    memcpy(lanes, &v, sizeof(lanes));
    for (int i = 0; i < W; ++i) Traits<D>::Store(out, o + i, lanes[i]);
  }
}

// The streamed side of a strip: out(:, j) = Σ_l sv[l] · x(l, j), x(l, j) = x[xo + l * x_ls +
// j * x_js]. kUnit: x_ls == 1, so every load is a constant offset from one index per column.
template <DType D, int W, int K, bool kUnit>
__attribute__((always_inline)) inline void StationaryStream(
    const typename Lanes<typename Traits<D>::R, W>::type* __restrict sv, const void* x, int64_t xo,
    int64_t x_ls, int64_t x_js, void* out, int64_t oo, int64_t o_js, int64_t count, bool stream) {
  using T = Traits<D>;
  using V = typename Lanes<typename T::R, W>::type;
  const int64_t ls = kUnit ? 1 : x_ls;
  int64_t j = 0;
  // Four columns at a time: four independent FMA chains.
  for (; j + 4 <= count; j += 4) {
    const int64_t x0 = xo + j * x_js, x1 = x0 + x_js, x2 = x1 + x_js, x3 = x2 + x_js;
    V c0 = V{}, c1 = V{}, c2 = V{}, c3 = V{};  // from +0 like every GEMM (-0 · 1 = +0)
#pragma GCC unroll 16
    for (int l = 0; l < K; ++l) {
      c0 += sv[l] * T::Load(x, x0 + l * ls);
      c1 += sv[l] * T::Load(x, x1 + l * ls);
      c2 += sv[l] * T::Load(x, x2 + l * ls);
      c3 += sv[l] * T::Load(x, x3 + l * ls);
    }
    PutLanes<D, W>(out, oo + j * o_js, c0, stream);
    PutLanes<D, W>(out, oo + (j + 1) * o_js, c1, stream);
    PutLanes<D, W>(out, oo + (j + 2) * o_js, c2, stream);
    PutLanes<D, W>(out, oo + (j + 3) * o_js, c3, stream);
  }
  for (; j < count; ++j) {
    const int64_t xj = xo + j * x_js;
    V c0 = V{};
#pragma GCC unroll 16
    for (int l = 0; l < K; ++l) c0 += sv[l] * T::Load(x, xj + l * ls);
    PutLanes<D, W>(out, oo + j * o_js, c0, stream);
  }
}

// One strip: s(v, l) = s[so + v * s_vs + l * s_ls] for v < W, l < K; the streamed side as
// in StationaryStream; out(v, j) = out[oo + v + j * o_js]; j < count. Offsets in elements.
template <DType D, int W, int K>
void StationaryStrip(const void* s, int64_t so, int64_t s_vs, int64_t s_ls, const void* x,
                     int64_t xo, int64_t x_ls, int64_t x_js, void* out, int64_t oo, int64_t o_js,
                     int64_t count, bool stream) {
  using T = Traits<D>;
  using R = typename T::R;
  using V = typename Lanes<R, W>::type;
  V sv[K];
  bool loaded = false;
  if constexpr (kPlainReal<D>) {
    if (s_vs == 1) {  // lanes contiguous: read in place
      const R* sr = static_cast<const R*>(s) + so;
#pragma GCC unroll 16
      for (int l = 0; l < K; ++l) sv[l] = LoadVec<V>(sr + l * s_ls);
      loaded = true;
    }
  }
  if (!loaded) {  // gather (and widen) the strip through a small transposed copy
    R tmp[K][W];
    for (int v = 0; v < W; ++v)
#pragma GCC unroll 16
      for (int l = 0; l < K; ++l) tmp[l][v] = T::Load(s, so + v * s_vs + l * s_ls);
#pragma GCC unroll 16
    for (int l = 0; l < K; ++l) sv[l] = LoadVec<V>(tmp[l]);
  }
  if (x_ls == 1) {  // the usual case: each streamed column is contiguous along K
    StationaryStream<D, W, K, true>(sv, x, xo, 1, x_js, out, oo, o_js, count, stream);
  } else {
    StationaryStream<D, W, K, false>(sv, x, xo, x_ls, x_js, out, oo, o_js, count, stream);
  }
}

// All `rows` strips of one product: full vector strips, then the rest in halving widths
// (20 rows of floats with AVX-512: 16 + 4).
template <DType D, int W, int K>
void StationaryRows(const void* s, int64_t so, int64_t s_vs, int64_t s_ls, const void* x,
                    int64_t xo, int64_t x_ls, int64_t x_js, void* out, int64_t oo, int64_t o_js,
                    int64_t rows, int64_t count, bool stream) {
  using R = typename Traits<D>::R;
  int64_t v = 0;
  constexpr bool kWidest = W * sizeof(R) == kVecBytes;
  for (; v + W <= rows && (kWidest || v == 0); v += W) {
    StationaryStrip<D, W, K>(s, so + v * s_vs, s_vs, s_ls, x, xo, x_ls, x_js, out, oo + v, o_js,
                             count, stream);
  }
  if constexpr (W > 1) {
    if (v < rows) {
      StationaryRows<D, W / 2, K>(s, so + v * s_vs, s_vs, s_ls, x, xo, x_ls, x_js, out, oo + v,
                                  o_js, rows - v, count, stream);
    }
  }
}

// Which kernel suits C: the column kernel when C's columns are contiguous, the row kernel
// when its rows are; each needs enough streamed columns (rows) to pay for loading the
// strip, and a strip side that is a vector. From d94c004 (2026-11-25, chosen for the
// capsule's 160×8 · 8×50 and for 8×8 · 8×64). Timed 2026-12-01 (../README.md, AVX-512, row
// kernel, 20000 products): streaming from 4 rows instead of 8 takes 0.23-0.92× the packed
// time for most M = 4..7, but 1.2-2.4× with a wide strip and long K (N = 64 with K >= 16,
// or K = 24 with N <= 8); at N = 64 with K >= 16 even M = 8 and 12 take 1.1-2.1× the packed
// time today. The count wants a cost in K·N to replace it; until then it stays.
constexpr int kStationaryMinStreamed = 8;
constexpr int kStationaryMinStrip = 4;
inline bool ColumnKernelFits(const GemmPlan& p) {
  return p.c_rs == 1 && p.n >= kStationaryMinStreamed && p.m >= kStationaryMinStrip;
}
inline bool RowKernelFits(const GemmPlan& p) {
  return p.c_cs == 1 && p.m >= kStationaryMinStreamed && p.n >= kStationaryMinStrip;
}

template <DType D>
bool CanStationary(const GemmPlan& p) {
  return !Traits<D>::kComplex && p.num_reduced == 1 && p.k >= 1 && p.k <= kStationaryMaxK &&
         (ColumnKernelFits(p) || RowKernelFits(p));
}

// float16 / bfloat16 accumulate in float32 like every other kernel: loads widen, stores
// round (lane by lane, to nearest even).
template <DType D, int K>
void StationaryRun(const GemmPlan& p, const void* a, const void* b, void* c, int64_t count,
                   int64_t ao, int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc) {
  using R = typename Traits<D>::R;
  constexpr int VL = kVecBytes / sizeof(R);
  const bool col = ColumnKernelFits(p);
  const bool stream =
      uint64_t(p.output_elements) * sizeof(R) >= kStreamBytes && (col ? p.c_cs : p.c_rs) != 1;
  for (int64_t t = 0; t < count; ++t, ao += sa, bo += sb, co += sc) {
    if (col) {
      StationaryRows<D, VL, K>(a, ao, p.a_rs, p.a_cs, b, bo, p.b_rs, p.b_cs, c, co, p.c_cs, p.m,
                               p.n, stream);
    } else {
      StationaryRows<D, VL, K>(b, bo, p.b_cs, p.b_rs, a, ao, p.a_cs, p.a_rs, c, co, p.c_rs, p.n,
                               p.m, stream);
    }
  }
}

// Every K in [1, kStationaryMaxK], at index K - 1.
template <DType D, int... I>
struct StationaryTable {
  static constexpr DirectFn<D> fns[] = {&StationaryRun<D, I + 1>...};
};
template <DType D, int... I>
StationaryTable<D, I...> MakeStationaryTable(std::integer_sequence<int, I...>);  // type only
template <DType D>
using StationaryFns =
    decltype(MakeStationaryTable<D>(std::make_integer_sequence<int, kStationaryMaxK>()));

template <DType D>
bool RunStationary(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin,
                   int64_t end) {
  if constexpr (Traits<D>::kComplex) {
    return false;  // never chosen (CanStationary)
  } else {
    return RunDirect<D>(StationaryFns<D>::fns[p.k - 1], p, a, b, c, begin, end);
  }
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_STATIONARY_H_
