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
#include <type_traits>
#include <utility>

#include "cc/engine/gemm/bf16dot.h"
#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/streaming.h"

namespace smallmm {
namespace {

// The longest K of the stationary kernels: the strip takes K vector registers, plus four
// accumulators and a broadcast.
// - AVX-512: 24 + 5 of 32 registers at first. 0ee665a (2026-11-25): 20000 20×20×20 products 5.2 ->
//   3.5 ms single-threaded against the packed micro-kernels; bench 20000 × 20×20@20×20
//   forward+backward 14.4 -> 10.9 ms. Now 32, some of the strip spilled to the stack
//   (kernel_grid.py, 2026-12-01, Zen 5, a busy shared machine; tf.matmul forward ratios,
//   packed -> stationary): 12×32·32×16 0.67× -> 1.22×, 5×32·32×5 0.57× -> 1.14×, 32³
//   float64 0.56× -> 1.11×, float16 1.14× -> 2.25×, float32 0.98× -> 0.50× and 1.14× in
//   two runs.
// - AVX2: 11 + 5 of 16. Timed 2026-12-01 (../README.md): K = 9..11 products (M = 8..20,
//   N = 8..64) take 0.16-0.95× the packed time (it was 8, d94c004).
// - Baseline (SSE2): 8 (d94c004); K = 9..11 took 1.3-1.8× the packed time (same run).
#if defined(__AVX512F__)
constexpr int kStationaryMaxK = 32;
#elif defined(__AVX__)
constexpr int kStationaryMaxK = 11;
#else
constexpr int kStationaryMaxK = 8;
#endif

// Complex products: the strip holds W / 2 complex lanes as interleaved (re, im) pairs, and
// a second copy turned by 90° (i·s: (-im, re) pairs), so a streamed value x = xr + i·xi
// adds xr·s + xi·(i·s): two FMAs per complex lane pair, no shuffles in the loop. The two
// copies take 2K registers, so complex products stop at half the real K.
template <DType D>
constexpr int kStationaryMaxKOf = Traits<D>::kComplex ? kStationaryMaxK / 2 : kStationaryMaxK;

// Storage scalars per element (2 for complex).
template <DType D>
constexpr int kScalars = Traits<D>::kComplex ? 2 : 1;

// A finished column (row) of a strip to out element o (W storage scalars): vector stores
// for float/double (non-temporal when asked and a whole line), rounded as a vector for
// fp16/bf16. A partial strip (the last one of a side that is not a whole number of
// vectors) writes its first `lanes` storage scalars only. A 16-bit column of a strip is
// half a line, so it is never streamed. Timed against it and not kept (2026-12-05, AMD
// EPYC Zen 4, 2 threads, a C++ harness of RunBatchMatMul): float16 / bfloat16 strips in
// pairs, each column of a pair one whole line stored non-temporally: the bfloat16 capsule
// prediction (W[1152, 160, 8], B = 50) 1.48-1.51 -> 1.60-1.65 ms. Its 18 MB output fits
// the 32 MB L3, where normal stores' reads for ownership hit; non-temporal ones always go
// to memory.
template <DType D, int W, bool kPartial>
inline void PutLanes(void* out, int64_t o, const AccVec<D, W>& v, bool stream, int lanes) {
  StorageOf<D>* p = static_cast<StorageOf<D>*>(out) + kScalars<D> * o;
  if constexpr (!kPartial && kStoredAsAcc<D> && sizeof(v) == 64) {
    if (stream) return StreamVec(p, v);
  }
  StoreLanes<D, W>(p, v, kPartial ? lanes : W);
}

// The strip in registers: s[l] holds s(v, l) for the strip's lanes v; complex also i·s.
template <DType D, int W, int K>
struct StripRegs {
  using T = Traits<D>;
  using R = typename T::R;
  using V = typename VecOf<R, W>::type;
  V s[K];
  V is[T::kComplex ? K : 1];
  // c += x · s[l] for the streamed element x at index e (conjugated when x_sign is -1),
  // x of dtype DX (StationaryRows' float copy of 16-bit columns, or D).
  template <DType DX>
  __attribute__((always_inline)) void Fma(V& c, int l, const void* x, int64_t e, R x_sign) const {
    using TX = Traits<DX>;
    if constexpr (T::kComplex) {
      // One sum of two products, rounded like the packed micro-kernel and the GPU block
      // program (re += ar·br - ai·bi): the same bits on every family at the baseline ISA.
      c += s[l] * TX::Load(x, 2 * e) + is[l] * (x_sign * TX::Load(x, 2 * e + 1));
    } else {
      c += s[l] * TX::Load(x, e);
    }
  }
};

// Streamed columns per step: one FMA chain each, all on the strip's registers. Eight keep
// both FMA pipes busy through the FMA latency where the strip leaves room for eight
// accumulators (AVX-512: the strip's K registers, twice K for complex, + 8 + a broadcast
// of 32); otherwise four.
template <DType D, int K>
constexpr int kStreamColumns = kVecBytes == 64 && K * kScalars<D> <= 20 ? 8 : 4;

// A single streamed column sums K products in kSplitChains chains (l mod 4) where K is
// long enough, added at the end: one chain of K dependent FMAs waits out the FMA latency
// at every step (a [1, K] · [K, N] row times a matrix, and the last columns of a strip).
// AVX-512 only, where it was measured (kRowKernelMaxFewRows); the baseline build keeps
// the one sequential sum that the GPU block program reproduces bit for bit.
template <int C, int K>
constexpr int kSplitChains = kVecBytes == 64 && C == 1 && K >= 8 ? 4 : 1;

// C streamed columns j..j+C-1 of a strip, C independent FMA chains (or one split in
// kSplitChains). The streamed side holds dtype DX (StripRegs::Fma).
template <int C, DType D, int W, int K, bool kPartial, DType DX>
__attribute__((always_inline)) inline void StreamStep(const StripRegs<D, W, K>& sr, const void* x,
                                                      int64_t xj, int64_t ls, int64_t x_js,
                                                      typename Traits<D>::R x_sign, void* out,
                                                      int64_t oj, int64_t o_js, bool stream,
                                                      int lanes) {
  using V = typename VecOf<typename Traits<D>::R, W>::type;
  constexpr int S = kSplitChains<C, K>;
  V c[C * S];
#pragma GCC unroll 8
  for (int q = 0; q < C * S; ++q) c[q] = V{};  // from +0 like every GEMM (-0 · 1 = +0)
#pragma GCC unroll 32
  for (int l = 0; l < K; ++l) {
#pragma GCC unroll 8
    for (int q = 0; q < C; ++q)
      sr.template Fma<DX>(c[q * S + l % S], l, x, xj + q * x_js + l * ls, x_sign);
  }
  if constexpr (S == 4) c[0] = (c[0] + c[1]) + (c[2] + c[3]);
#pragma GCC unroll 8
  for (int q = 0; q < C; ++q) PutLanes<D, W, kPartial>(out, oj + q * o_js, c[q * S], stream, lanes);
}

// The streamed side of a strip: out(:, j) = Σ_l s(:, l) · x(l, j), x(l, j) = x[xo + l *
// x_ls + j * x_js]. kUnit: x_ls == 1, so every load is a constant offset from one index per
// column.
template <DType D, int W, int K, bool kUnit, bool kPartial, DType DX>
__attribute__((always_inline)) inline void StationaryStream(const StripRegs<D, W, K>& sr,
                                                            const void* x, int64_t xo, int64_t x_ls,
                                                            int64_t x_js,
                                                            typename Traits<D>::R x_sign, void* out,
                                                            int64_t oo, int64_t o_js, int64_t count,
                                                            bool stream, int lanes) {
  constexpr int C = kStreamColumns<D, K>;
  const int64_t ls = kUnit ? 1 : x_ls;
  int64_t j = 0;
  for (; j + C <= count; j += C) {
    StreamStep<C, D, W, K, kPartial, DX>(sr, x, xo + j * x_js, ls, x_js, x_sign, out, oo + j * o_js,
                                         o_js, stream, lanes);
  }
  if constexpr (C > 4) {
    if (j + 4 <= count) {
      StreamStep<4, D, W, K, kPartial, DX>(sr, x, xo + j * x_js, ls, x_js, x_sign, out,
                                           oo + j * o_js, o_js, stream, lanes);
      j += 4;
    }
  }
  for (; j < count; ++j) {
    StreamStep<1, D, W, K, kPartial, DX>(sr, x, xo + j * x_js, ls, x_js, x_sign, out, oo + j * o_js,
                                         o_js, stream, lanes);
  }
}

// Where one side of the product lives: element (v, l) at off + v * vs + l * ls, conjugated
// when conj (complex only).
struct Side {
  const void* p;
  int64_t off, vs, ls;
  bool conj;
};

// A real strip whose lanes are rows of contiguous elements (s.ls == 1: the capsule weights
// W[i] are 160 rows of 8, each strip 16 of them), gathered with vector loads and an
// in-register transpose instead of K·W scalar moves through memory: each group of 8
// columns loads 8 vectors, each holding row j of every 8-row block of the strip in its
// 8-lane group (rows j and 8 + j for a 16-lane float strip), and three stages of
// two-source shuffles move column c of every block into vector c. Stage b swaps bit b of
// the vector index with bit b of the lane index: 24 shuffles per 8 columns.
// Paired in one process against the scalar copy (2026-12-02, Zen 5, 2 threads, in
// tf.function): capsule_predict with W[1152, 10, 16, 8] 1.42× faster at batch 10, 1.27×
// at 25, 1.04× at 50 (its output writes bound it); float32 [B, M, K] · [B, N, K]ᵀ forward
// 1.11-1.32× for n³ = 8³-32³, float64 / float16 0.93-1.18× (0.98-1.11× measured again
// with 21 rounds: level within the noise).
template <DType D, int W>
constexpr bool kShuffleStrip = !Traits<D>::kComplex && (W == 8 || W == 16);

template <DType D, int W, int K>
__attribute__((always_inline)) inline void ShuffleStrip(const StorageOf<D>* p, int64_t vs, int rows,
                                                        AccVec<D, W>* s) {
#pragma GCC unroll 4
  for (int c0 = 0; c0 < K; c0 += 8) {
    const int n = K - c0 < 8 ? K - c0 : 8;
    AccVec<D, W> x[8];
    TransposeRows<D, W>(p, vs, rows, c0, n, x);
#pragma GCC unroll 8
    for (int c = 0; c < n; ++c) s[c0 + c] = x[c];
  }
}

// The strip's K vectors s(v, l) of a Side (W storage scalars; `lanes` of them when
// kPartial, the rest zero): read in place where lanes are contiguous, transposed in
// registers where each lane's K elements are (ShuffleStrip), gathered otherwise.
template <DType D, int W, int K, bool kPartial>
__attribute__((always_inline)) inline void LoadStrip(const Side& s, AccVec<D, W>* out,
                                                     int lanes) {
  using T = Traits<D>;
  using R = typename T::R;
  constexpr int kS = kScalars<D>;
  if (s.vs == 1) {  // lanes contiguous: read in place
    const StorageOf<D>* p = static_cast<const StorageOf<D>*>(s.p) + kS * s.off;
#pragma GCC unroll 32
    for (int l = 0; l < K; ++l) {
      out[l] = LoadLanes<D, W>(p + kS * l * s.ls, kPartial ? lanes : W);
    }
  } else if (kShuffleStrip<D, W> && s.ls == 1) {
    if constexpr (kShuffleStrip<D, W>) {
      ShuffleStrip<D, W, K>(static_cast<const StorageOf<D>*>(s.p) + s.off, s.vs,
                            kPartial ? lanes : W, out);
    }
  } else {  // gather (and widen) the strip through a small transposed copy
    R tmp[K][W];
    if constexpr (kPartial) memset(tmp, 0, sizeof(tmp));
    for (int v = 0; v < (kPartial ? lanes : W) / kS; ++v)
#pragma GCC unroll 32
      for (int l = 0; l < K; ++l)
        for (int q = 0; q < kS; ++q)
          tmp[l][kS * v + q] = T::Load(s.p, kS * (s.off + v * s.vs + l * s.ls) + q);
#pragma GCC unroll 32
    for (int l = 0; l < K; ++l) out[l] = LoadVec<AccVec<D, W>>(tmp[l]);
  }
}

// One strip: s(v, l) for v < W / kScalars lanes (fewer when kPartial: `lanes` storage
// scalars, the rest zero and never stored), l < K; the streamed side x(l, j) = x(j, l) of
// its Side, of dtype DX; out(v, j) = out[oo + v + j * o_js]; j < count. Offsets in elements.
template <DType D, int W, int K, bool kPartial, DType DX = D>
void StationaryStrip(const Side& s, const Side& x, void* out, int64_t oo, int64_t o_js,
                     int64_t count, bool stream, int lanes) {
  using T = Traits<D>;
  using R = typename T::R;
  using V = typename VecOf<R, W>::type;
  StripRegs<D, W, K> sr;
  LoadStrip<D, W, K, kPartial>(s, sr.s, lanes);
  if constexpr (T::kComplex) {
    // Conjugate: negate the imaginary lanes. i·s: swap each (re, im) pair to (im, re), then
    // negate the new real lanes.
    using I = typename VecOf<typename SameSizeInt<R>::type, W>::type;
    constexpr auto seq = std::make_integer_sequence<int, W>();
    constexpr I swap = MakeMask<I>([](int r) { return r ^ 1; }, seq);
    const V conj = MakeMask<V>([](int r) { return r % 2 ? R(-1) : R(1); }, seq);
    const V turn = MakeMask<V>([](int r) { return r % 2 ? R(1) : R(-1); }, seq);
#pragma GCC unroll 32
    for (int l = 0; l < K; ++l) {
      if (s.conj) sr.s[l] *= conj;
      sr.is[l] = __builtin_shuffle(sr.s[l], swap) * turn;
    }
  }
  const R x_sign = x.conj ? R(-1) : R(1);
  if (x.ls == 1) {  // the usual case: each streamed column is contiguous along K
    StationaryStream<D, W, K, true, kPartial, DX>(sr, x.p, x.off, 1, x.vs, x_sign, out, oo, o_js,
                                                  count, stream, lanes);
  } else {
    StationaryStream<D, W, K, false, kPartial, DX>(sr, x.p, x.off, x.ls, x.vs, x_sign, out, oo,
                                                   o_js, count, stream, lanes);
  }
}

// All `rows` strips of one product: whole vector strips, then one partial strip for the
// rest (20 rows of floats with AVX-512: 16 + 4 lanes of 16). The streamed side holds DX.
template <DType D, int W, int K, DType DX = D>
void StationaryStrips(Side s, const Side& x, void* out, int64_t oo, int64_t o_js, int64_t rows,
                      int64_t count, bool stream) {
  constexpr int kLanes = W / kScalars<D>;  // elements per strip (W storage scalars)
  const int64_t first = s.off;
  int64_t v = 0;
  for (; v + kLanes <= rows; v += kLanes) {
    s.off = first + v * s.vs;
    StationaryStrip<D, W, K, false, DX>(s, x, out, oo + v, o_js, count, stream, W);
  }
  if (v < rows) {
    s.off = first + v * s.vs;
    StationaryStrip<D, W, K, true, DX>(s, x, out, oo + v, o_js, count, stream,
                                       int(kScalars<D> * (rows - v)));
  }
}

// Every strip reads all of the streamed side. Where its columns are far apart, each strip
// would fetch them again from L2: the capsule prediction streams u[b, i, :], 36,864 bytes
// (9 pages) apart, so all its columns fall in one L1 set. There the columns are first
// copied, a block at a time, into a contiguous buffer that stays in L1 for every strip.
// Paired in one process against reading in place (2026-12-02, Zen 5, 2 threads, in
// tf.function, 15 rounds): capsule_predict with W[1152, 10, 16, 8] float32 1.21× faster at
// batch 50 and 1.05× at batch 10, float64 1.30× and 1.10×.
// The copy holds the accumulation type: float16 / bfloat16 columns are widened once there
// instead of at every multiply-add of every strip (a scalar load, shift or conversion and
// broadcast each, where a float column feeds the multiply-add straight from memory), so
// 16-bit products of several strips take the copy wherever their columns lie.
constexpr int64_t kStreamBufferBytes = 16 << 10;

// Columns j0 .. j0 + count - 1 of x (K elements each) one after another at buf, in the
// accumulation type.
template <DType D, int K>
void CopyColumns(const Side& x, int64_t j0, int64_t count, typename Traits<D>::R* buf) {
  constexpr int kS = kScalars<D>, kL = 8;  // storage scalars per column, per vector
  for (int64_t j = 0; j < count; ++j) {
    const int64_t col = kS * (x.off + (j0 + j) * x.vs);
    typename Traits<D>::R* dst = buf + j * K * kS;
    if (x.ls == 1) {
      const StorageOf<D>* src = static_cast<const StorageOf<D>*>(x.p) + col;
#pragma GCC unroll 8
      for (int l = 0; l < K * kS; l += kL) {
        const int n = K * kS - l < kL ? K * kS - l : kL;
        StoreFirst(dst + l, LoadLanes<D, kL>(src + l, n), n);
      }
    } else {
      for (int l = 0; l < K; ++l)
        for (int q = 0; q < kS; ++q)
          dst[l * kS + q] = Traits<D>::Load(x.p, col + kS * l * x.ls + q);
    }
  }
}

template <DType D, int W, int K>
void StationaryRows(const Side& s, const Side& x, void* out, int64_t oo, int64_t o_js, int64_t rows,
                    int64_t count, bool stream) {
  if (rows <= W / kScalars<D> || (kStoredAsAcc<D> && NearStride(x.vs))) {
    return StationaryStrips<D, W, K>(s, x, out, oo, o_js, rows, count, stream);
  }
  using R = typename Traits<D>::R;
  constexpr DType DX = kStoredAsAcc<D> ? D : DType::kFloat;  // the copy's dtype
  static_assert(std::is_same<typename Traits<DX>::R, R>::value, "the copy is read as R");
  constexpr int64_t kBlock = kStreamBufferBytes / (int64_t(sizeof(R)) * K * kScalars<D>);
  static_assert(kBlock >= 8, "a block holds at least one step of streamed columns");
  alignas(64) R buf[kStreamBufferBytes / sizeof(R)];
  for (int64_t j0 = 0; j0 < count; j0 += kBlock) {
    const int64_t n = count - j0 < kBlock ? count - j0 : kBlock;
    CopyColumns<D, K>(x, j0, n, buf);
    StationaryStrips<D, W, K, DX>(s, Side{buf, 0, K, 1, x.conj}, out, oo + j0 * o_js, o_js, rows, n,
                                  stream);
  }
}

// Which kernel suits C: the column kernel when C's columns are contiguous, the row kernel
// when its rows are. The column kernel needs enough streamed columns to pay for loading the
// strip, and a strip side that is a vector: from d94c004 (2026-11-25, chosen for the
// capsule's 160×8 · 8×50). The row kernel took M >= 8 and N >= 4 (d94c004); timed
// 2026-12-01 (../README.md, AVX-512, 20000 products) fewer rows lost to the packed kernels
// only with several strips and a long K (N = 64 with K >= 16: 1.2-2.4× the packed time).
// Its last strip is now a partial vector, so it also takes any M and N >= 2 (N = 1 is a
// matvec) where N fits one strip: the packed kernels' wide tiles are mostly padding there
// (5×7 · 7×12 and 32×12 · 12×3 ran 0.84× and 0.78× tf.matmul on them, 1.1-2.0× on this
// kernel; kernel_grid.py, 2026-12-01, Zen 5 AVX-512), also where the strip is gathered
// (B transposed, as in every gradient g·Bᵀ): keeping those on the packed kernels for M < 8
// took forward+backward of 6×8·8×16, 32×12·12×3 and 12×16·(3×16)ᵀ from 1.28-1.71× down to
// 0.69-0.83× tf.matmul (same tool and day). Complex products take the row kernel at any N
// (but for the few columns that the dot kernels take first, dot.h CanDot).
constexpr int kStationaryMinStreamed = 8;
constexpr int kStationaryMinStrip = 4;
constexpr int kRowKernelMinN = 2;
// AVX-512 (kernel_grid-style A/B in tf.function, 2026-12-02, Zen 5): [B, M, K] · [B, K, N]
// with M = 1..3, N = 32 or 64, K = 8..32 moved from the packed kernels to this one (with
// split chains): float16 0.55-0.99× -> 1.04-1.42× tf.matmul, bfloat16 0.49-0.71× ->
// 0.95-1.26×, float32 0.91-1.26× -> 0.99-1.22×. Not measured on the narrower ISAs.
constexpr int kRowKernelMaxFewRows = kVecBytes == 64 ? 3 : 0;
// Elements per strip.
template <DType D>
constexpr int kStripLanes = kVecBytes / sizeof(typename Traits<D>::R) / kScalars<D>;
// A strip of at most half a vector's lanes (OneStripRun's N <= 8 floats, BlockRun's last
// strip) is held in half-width registers on AVX-512: Zen 4 executes a 512-bit FMA as two
// 256-bit halves on its two FMA pipes, so a zmm whose upper half is masked off costs as
// much as a full one and a ymm half of that; where the 512-bit units are full width (Intel
// server cores) ymm FMAs issue at the same rate as zmm ones. B transposed needs the
// half-width register transpose (float32; float64 keeps full strips there). Not for
// float16 / bfloat16, whose widening conversions bound them: float16 20³ level (0.98×).
// Against full strips (2026-12-05, AMD EPYC Zen 4, one thread, _smallmm_core.matmul, ~2M
// elements per operand, ns per product): float32 20³ 288 -> 215, 24³ 409 -> 301, with Bᵀ
// 433 -> 334, 32×16·16×24 356 -> 270, 8³ 26 -> 23, 32×8·8×8 77 -> 61, 7³ 21 -> 18;
// float64 12³ 126 -> 106. The TF op (2 threads, 8M elements per operand, 11 rounds against
// the bandwidth floor): n = 20 1.81 -> 1.61-1.68× the floor, 24 1.90 -> 1.54-1.61×, 8
// 1.64 -> 1.40-1.46×, 7 1.67 -> 1.49-1.55×.
template <DType D, int W>
constexpr bool kHalfStrip =
    kVecBytes == 64 && kStoredAsAcc<D> && W * sizeof(typename Traits<D>::R) == 32;
template <DType D>
inline bool HalfStripFits(const GemmPlan& p, int64_t lanes) {
  constexpr int kHalf = kStripLanes<D> / 2;
  return kHalfStrip<D, kHalf> && lanes <= kHalf && (p.b_cs == 1 || kShuffleStrip<D, kHalf>);
}
// BlockRun's products: N of two to four strips (17-64 floats or 16-bit elements, 9-32
// doubles), at least 4 rows (fewer wait on their few FMA chains, where the general path
// splits each column's sum in four), real types, AVX-512 (where it was measured).
constexpr int kBlockStrips = 4;
template <DType D>
constexpr bool kBlockRun = !Traits<D>::kComplex && kVecBytes == 64;
template <DType D>
inline bool StripBlocks(const GemmPlan& p) {
  return kBlockRun<D> && OneStripRuns() && p.n > kStripLanes<D> &&
         p.n <= kBlockStrips * kStripLanes<D> && p.m >= 4;
}
inline bool ColumnKernelFits(const GemmPlan& p) {
  return p.c_rs == 1 && p.n >= kStationaryMinStreamed && p.m >= kStationaryMinStrip;
}
template <DType D>
inline bool RowKernelFits(const GemmPlan& p) {
  const bool many_rows = p.m >= kStationaryMinStreamed || p.m <= kRowKernelMaxFewRows;
  const bool one_strip = p.n >= kRowKernelMinN && p.n <= kStripLanes<D>;
  return p.c_cs == 1 && ((many_rows && p.n >= kStationaryMinStrip) || one_strip ||
                         StripBlocks<D>(p) || Traits<D>::kComplex);
}

template <DType D>
bool CanStationary(const GemmPlan& p) {
  return p.num_reduced == 1 && p.k >= 1 && p.k <= kStationaryMaxKOf<D> &&
         (ColumnKernelFits(p) || RowKernelFits<D>(p));
}

// Rows i..i+R-1 of one product against its strip s, A's row i at `a`: R FMA chains side
// by side, so that a long K does not leave the FMA units waiting on one chain. kUnit: A's
// K stride is 1 (a row-major A), so every load is a constant offset from its row. The K
// loop unrolls fully so that the strip stays in registers: unrolled by 8 only, GCC kept a
// K = 16 strip on the stack and reloaded a vector per step, which lost to the general
// path (64×3·3×16 0.69×).
template <int R, bool kUnit, DType D, int W, int K>
__attribute__((always_inline)) inline void OneStripRows(const AccVec<D, W>* s,
                                                        const StorageOf<D>* a, int64_t ars,
                                                        int64_t acs, StorageOf<D>* c,
                                                        int64_t crs, int n) {
  const int64_t ls = kUnit ? 1 : acs;
  AccVec<D, W> acc[R] = {};  // from +0 like every GEMM (-0 · 1 = +0)
#pragma GCC unroll 32
  for (int l = 0; l < K; ++l) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] += s[l] * Traits<D>::Load(a + r * ars, l * ls);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) StoreLanes<D, W>(c + r * crs, acc[r], n);
}

// The row kernel for products whose output rows each fit one strip (N <= W lanes), real
// types, B's rows or columns contiguous: per product, the strip (B's K rows, N lanes each)
// is loaded and A's rows stream past it, one product straight after another. The general
// path (StationaryRows -> StationaryStrips -> StationaryStrip -> StationaryStream) spends
// more on its layers than on a 5×5×5 product's 25 FMAs. Paired in one process against it
// (see kOneStripMaxK). Half-width strips (kHalfStrip) take 8 rows at a time: ymm FMAs
// issue two per cycle, so 8 chains cover their latency where 4 covered a zmm's.
template <DType D, int W, int K, bool kUnit>
void OneStripRun(const GemmPlan& p, const void* a, int64_t ao, int64_t sa, const void* b,
                 int64_t bo, int64_t sb, void* c, int64_t co, int64_t sc, int64_t count,
                 RunAhead<D>& ahead) {
  const int n = int(p.n);
  const int64_t m = p.m, ars = p.a_rs, acs = p.a_cs, crs = p.c_rs;
  const StorageOf<D>* ap = static_cast<const StorageOf<D>*>(a) + ao;
  StorageOf<D>* cp = static_cast<StorageOf<D>*>(c) + co;
  for (int64_t t = 0; t < count; ++t, ap += sa, cp += sc) {
    ahead.Product(t);
    AccVec<D, W> s[K];
    LoadStrip<D, W, K, true>(Side{b, bo + t * sb, p.b_cs, p.b_rs, false}, s, n);
    int64_t i = 0;
    if constexpr (kHalfStrip<D, W>) {
      for (; i + 8 <= m; i += 8) {
        ahead.Step();
        ahead.Step();
        OneStripRows<8, kUnit, D, W, K>(s, ap + i * ars, ars, acs, cp + i * crs, crs, n);
      }
    }
    for (; i + 4 <= m; i += 4) {
      ahead.Step();
      OneStripRows<4, kUnit, D, W, K>(s, ap + i * ars, ars, acs, cp + i * crs, crs, n);
    }
    for (; i < m; ++i) {
      OneStripRows<1, kUnit, D, W, K>(s, ap + i * ars, ars, acs, cp + i * crs, crs, n);
    }
    ahead.Flush();
  }
}

// Rows i..i+R-1 of one product against S strips held in memory (s[q][l]: full strip q's
// vector for k step l, q < S - 1; e[l]: the last strip's, `last` of its WL lanes used):
// R·S accumulators, and each k step loads the S strip vectors and one element of each
// row, each element feeding S FMAs.
// kInPlace: the strips are B's rows where they lie (bp, bls elements apart), not s and e.
template <int R, int S, bool kUnit, bool kInPlace, DType D, int W, int WL, int K>
__attribute__((always_inline)) inline void BlockRows(const AccVec<D, W> (*s)[K],
                                                     const AccVec<D, WL>* e, const StorageOf<D>* bp,
                                                     int64_t bls, const StorageOf<D>* a,
                                                     int64_t ars, int64_t acs, void* c, int64_t co,
                                                     int64_t crs, int last, bool stream) {
  using V = AccVec<D, W>;
  using E = AccVec<D, WL>;
  const int64_t ls = kUnit ? 1 : acs;
  V acc[R][S - 1] = {};  // from +0 like every GEMM (-0 · 1 = +0)
  E acc_e[R] = {};
#pragma GCC unroll 2
  for (int l = 0; l < K; ++l) {
    V v[S - 1];
    E u;
    if constexpr (kInPlace) {
#pragma GCC unroll 4
      for (int q = 0; q + 1 < S; ++q) v[q] = LoadVec<V>(bp + l * bls + q * W);
      u = LoadVec<E>(bp + l * bls + (S - 1) * W);
    } else {
#pragma GCC unroll 4
      for (int q = 0; q + 1 < S; ++q) v[q] = s[q][l];
      u = e[l];
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const auto x = Traits<D>::Load(a + r * ars, l * ls);
#pragma GCC unroll 4
      for (int q = 0; q + 1 < S; ++q) acc[r][q] += v[q] * x;
      acc_e[r] += u * x;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q + 1 < S; ++q) PutLanes<D, W, false>(c, co + r * crs + q * W, acc[r][q], stream, W);
    if (last == WL) {
      PutLanes<D, WL, false>(c, co + r * crs + (S - 1) * W, acc_e[r], stream, WL);
    } else {
      PutLanes<D, WL, true>(c, co + r * crs + (S - 1) * W, acc_e[r], stream, last);
    }
  }
}

// The row kernel for products whose output rows span two to four strips (StripBlocks), K up
// to kStationaryMaxK. Per product, B's K rows are loaded once into S strips in L1
// (LoadStrip: in place or transposed), then A's rows go past them 8 (S = 2) or 4 at a time:
// each k step loads the S strip vectors and one element of each row, and each element feeds
// S FMAs (12-16 accumulators). The general path runs each strip past all of A's rows on its
// own: one broadcast load (and, for 16-bit types, one conversion) per FMA, and a strip of K
// registers that spills from K = 28. Paired in one process against it (2026-12-04, Xeon
// AVX-512, 2 threads, the TF op in tf.function, ~2M elements per operand, 15-25 rounds in
// shuffled order): float32 32³ 1.03×, 20³ 1.05×, 24³ 1.01×, 32×16·16×32 1.07×, 8×32·32×32
// 1.03×; float16 and bfloat16 1.19-1.29× (32³, 20³, 8×24·24×24, 32×16·16×24); float64
// (N = 12, 16) level. One thread, in cache (_smallmm_core.matmul with set_one_strip_runs):
// float32 8×8·8×64 1.33×, 8×8·8×48 1.64×, 64×8·8×64 1.42×, 16×16·16×64 1.19×, 32×32·32×64
// 1.08×, 12×24·24×36 1.14×; float16 8×8·8×64 2.4×, 32×32·32×64 2.6×. M = 4-7 went to the
// packed kernels before (0.67-0.85× tf.matmul forward in SWEEP.md); against them (same
// timing): float32 5×32·32×32 1.7-2.0×, 7×24·24×24 2.3×, 6×8·8×20 3.6×, 5×16·16×40 2.0×,
// 4×32·32×32 1.05×; float16 3.3-6.6×.
// kInPlace (float / double, B's rows contiguous, N two whole strips; BlockRunFn decides): the
// strips are read where B's rows lie, not loaded into copies first; a copy is K·N loads and
// stores per product, and the in-place loads hit the same L1 lines. Paired in one process
// against the copies (2026-12-06, AMD EPYC Zen 4, 2 threads, 7812 float32 32×32 products,
// 40 shuffled rounds, time over a floor of the same traffic; the "B copied" run of
// benchmarks/nn_kernel.cc): with RunAhead on, as it is there for streamed outputs,
// 1.55-1.87× the floor against 1.66-1.96× (1.02-1.08× faster); without it 1.18-1.28×.
template <DType D, int W, int S, int K, bool kUnit, bool kInPlace, int WL = W>
void BlockRun(const GemmPlan& p, const void* a, int64_t ao, int64_t sa, const void* b, int64_t bo,
              int64_t sb, void* c, int64_t co, int64_t sc, int64_t count, bool stream,
              RunAhead<D>& ahead) {
  constexpr int R = S == 2 ? 8 : 4;  // rows per block: 16 or 12-16 accumulators
  const int last = int(p.n - (S - 1) * W);
  const int64_t m = p.m, ars = p.a_rs, acs = p.a_cs, crs = p.c_rs, bls = p.b_rs;
  const StorageOf<D>* ap = static_cast<const StorageOf<D>*>(a) + ao;
  const StorageOf<D>* bp = static_cast<const StorageOf<D>*>(b) + bo;
  for (int64_t t = 0; t < count; ++t, ap += sa, bp += sb, co += sc) {
    ahead.Product(t);
    AccVec<D, W> s[kInPlace ? 1 : S - 1][K];
    AccVec<D, WL> e[kInPlace ? 1 : K];
    if constexpr (!kInPlace) {
#pragma GCC unroll 4
      for (int q = 0; q + 1 < S; ++q) {
        LoadStrip<D, W, K, false>(Side{b, bo + t * sb + q * W * p.b_cs, p.b_cs, p.b_rs, false},
                                  s[q], W);
      }
      LoadStrip<D, WL, K, true>(Side{b, bo + t * sb + (S - 1) * W * p.b_cs, p.b_cs, p.b_rs, false},
                                e, last);
    }
    int64_t i = 0;
    for (; i + R <= m; i += R) {
      ahead.Upto(i + R, m);
      BlockRows<R, S, kUnit, kInPlace, D, W, WL, K>(s, e, bp, bls, ap + i * ars, ars, acs, c,
                                                    co + i * crs, crs, last, stream);
    }
    if constexpr (R > 4) {
      if (i + 4 <= m) {
        ahead.Upto(i + 4, m);
        BlockRows<4, S, kUnit, kInPlace, D, W, WL, K>(s, e, bp, bls, ap + i * ars, ars, acs, c,
                                                      co + i * crs, crs, last, stream);
        i += 4;
      }
    }
    if (i + 2 <= m) {
      BlockRows<2, S, kUnit, kInPlace, D, W, WL, K>(s, e, bp, bls, ap + i * ars, ars, acs, c,
                                                    co + i * crs, crs, last, stream);
      i += 2;
    }
    if (i < m) {
      BlockRows<1, S, kUnit, kInPlace, D, W, WL, K>(s, e, bp, bls, ap + i * ars, ars, acs, c,
                                                    co + i * crs, crs, last, stream);
    }
    ahead.Flush();
  }
}

// BlockRun for plan p with the last strip full or (half) in half-width registers
// (kHalfStrip), and with B's rows read in place where they are two whole strips of float /
// double and A's rows are contiguous (kUnit). In place only there: where it was measured
// (n = 32 float32), and every other instance is compile time, which the sanitizer build
// pays several times over (all S and A layouts took AVX-512's kernels, then one object,
// past 36 minutes).
template <DType D, int VL, int S, int K, bool kUnit>
auto BlockRunFn(const GemmPlan& p, bool half) {
  if constexpr (kHalfStrip<D, VL / 2>) {
    if (half) return &BlockRun<D, VL, S, K, kUnit, false, VL / 2>;
  }
  if constexpr (kPlainReal<D> && S == 2 && kUnit) {
    if (p.b_cs == 1 && p.n % VL == 0) return &BlockRun<D, VL, S, K, kUnit, true>;
  }
  return &BlockRun<D, VL, S, K, kUnit, false>;
}

// The largest K and M of OneStripRun. Paired in one process against the general path
// (2026-12-03, Xeon AVX-512, one thread, _smallmm_core.matmul with set_one_strip_runs,
// 300K and 8M elements per operand, B and Bᵀ, 7-11 rounds), float32: 5×5×5 1.7-2.4×
// faster, 6×6×6 1.45-1.9×, 7×7×7 1.3-1.6×, 8×8×8 1.2-1.7×, 3×5·5×5 1.7-2.7×, 2×6·6×3
// 2.2-3.4×, 20×8·8×8 1.3-1.5×, 32×5·5×8 1.04-1.33×, 64×8·8×8 1.15-1.24× in cache; with K
// of 9-16 (the strip held in registers, see OneStripRows) 9×9×9 1.36-1.43×, 12×12×12
// 1.3-1.45×, 16×16×16 1.1×, 64×3·3×16 1.04-1.09×, 16×4·4×16 1.2×, 32×8·8×12 1.2×,
// 64×16·16×16 1.03-1.10× in cache and 0.98-1.11× (level) at 8M elements. Steps of 8 rows
// instead of 4 were no faster at any K. Other dtypes (same timing): float16 and bfloat16
// 1.02-2.6× (K <= 8) and 0.98-1.27× (K = 12, 16), float64 1.0-2.5× (K <= 8; 1.0-1.1× at
// 8M elements) and 0.96-1.25× (K = 12, 16). Above 16 the strip and four accumulators
// would crowd out the 32 registers. AVX2 and the baseline stop at their own
// kStationaryMaxK (11 and 8); AVX2 float32 K <= 8: 5×5×5 1.13-1.17×, 8×8×8 1.01-1.31×,
// K = 9-11 (8×8·8×9 to 64×8·8×11) 0.96-1.20×; baseline float32 with B, N = 4: 1.3-2.0×.
constexpr int kOneStripMaxK = 16;
constexpr int64_t kOneStripMaxRows = 64;
// The (dtype, K) instances that have OneStripRun.
template <DType D, int K>
constexpr bool kOneStrip = !Traits<D>::kComplex && K <= kOneStripMaxK;

// Whether the row kernel can run the plan's products straight through, one after another
// (OneStripRun, BlockRun): A's rows near each other (far ones are prefetched by the general
// path) and B read along rows or (transposed) columns, which LoadStrip reads in place or
// transposes in registers.
template <DType D>
bool StraightThrough(const GemmPlan& p, bool col) {
  return !col && OneStripRuns() && p.c_cs == 1 && NearStride(p.a_rs) &&
         (p.b_cs == 1 || (kShuffleStrip<D, kStripLanes<D>> && p.b_rs == 1));
}

// Whether OneStripRun computes the plan's products: real, K and M short, N within one
// strip, not streaming store by store.
template <DType D, int K>
bool OneStripFits(const GemmPlan& p, bool col, bool stream) {
  return kOneStrip<D, K> && !stream && p.n <= kStripLanes<D> && p.m <= kOneStripMaxRows &&
         StraightThrough<D>(p, col);
}

// Whether BlockRun computes the plan's products (StripBlocks).
template <DType D>
bool BlockFits(const GemmPlan& p, bool col) {
  return StripBlocks<D>(p) && StraightThrough<D>(p, col);
}

// float16 / bfloat16 accumulate in float32 like every other kernel: loads widen, stores
// round (a vector at a time, to nearest even).
template <DType D, int K>
void StationaryRun(const GemmPlan& p, const void* a, const void* b, void* c, int64_t count,
                   int64_t ao, int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc) {
  using R = typename Traits<D>::R;
  constexpr int VL = kVecBytes / sizeof(R);
  const bool col = ColumnKernelFits(p);
  // The streamed side's output vectors are (col ? c_cs : c_rs) elements apart.
  const bool stream =
      StreamOutput(uint64_t(p.output_elements) * sizeof(R),
                   (col ? p.c_cs : p.c_rs) * int64_t(sizeof(StorageOf<D>)) * kScalars<D>);
  // Column kernel: the strip is rows of A (v = i), the stream B's columns (j); row kernel:
  // the strip is columns of B (v = j), the stream A's rows (i).
  // The streamed side of the next product, where its vectors are pages apart
  // (PrefetchPanel): the capsule prediction streams u[b, i, :], 36 KB apart. Paired in
  // one process (2026-12-02, Zen 5, 2 threads), capsule_predict with W[1152, 10, 16, 8]:
  // batch 10 and 25 1.06-1.07× faster, batch 50 level (0.99: its output writes bound it).
  const void* next = col ? b : a;
  const int64_t next_step = col ? sb : sa, next_count = col ? p.n : p.m;
  const int64_t next_vs = col ? p.b_cs : p.a_rs, next_ls = col ? p.b_rs : p.a_cs;
  // Products t0 .. t0+n-1 into out, the first at offset oo.
  const bool one_strip = OneStripFits<D, K>(p, col, stream);
  const bool block = BlockFits<D>(p, col);
  const bool half = HalfStripFits<D>(p, p.n - (p.n - 1) / VL * VL);  // the last strip's lanes
#if SMALLMM_BF16_DOT
  // bfloat16 on the dot product (bf16dot.h PairRun): the row kernel's plan, or the column
  // kernel's as Cᵀ = Bᵀ·Aᵀ, whose A and B swap roles.
  const GemmPlan pair_plan = col ? Transposed(p) : p;
  const bool pair_dot = D == DType::kBFloat16 && PairDotFits(pair_plan, col);
#endif
  constexpr int64_t kElementBytes = int64_t(sizeof(StorageOf<D>)) * kScalars<D>;
  const bool ahead_on = RunAheadPays(uint64_t(p.output_elements) * kElementBytes, stream);
  auto run = [&](int64_t t0, int64_t n, void* out, int64_t oo, int64_t so) {
    // Prefetch along the range's products, their output lines too where stored in place
    // (not streamed, not staged).
    RunAhead<D> ahead(p, a, ao + t0 * sa, sa, b, bo + t0 * sb, sb, c, co + t0 * sc, sc,
                      count - t0, ahead_on, !stream && out == c);
#if SMALLMM_BF16_DOT
    if constexpr (D == DType::kBFloat16) {
      if (pair_dot) {
        auto* fn = pair_plan.a_cs == 1 ? &PairRun<true> : &PairRun<false>;
        if (col)
          return fn(pair_plan, b, bo + t0 * sb, sb, a, ao + t0 * sa, sa, out, oo, so, n, ahead);
        return fn(pair_plan, a, ao + t0 * sa, sa, b, bo + t0 * sb, sb, out, oo, so, n, ahead);
      }
    }
#endif
    if constexpr (kOneStrip<D, K>) {
      if (one_strip) {
        auto* fn = p.a_cs == 1 ? &OneStripRun<D, VL, K, true> : &OneStripRun<D, VL, K, false>;
        if constexpr (kHalfStrip<D, VL / 2>) {
          if (half)
            fn = p.a_cs == 1 ? &OneStripRun<D, VL / 2, K, true> : &OneStripRun<D, VL / 2, K, false>;
        }
        return fn(p, a, ao + t0 * sa, sa, b, bo + t0 * sb, sb, out, oo, so, n, ahead);
      }
    }
    if constexpr (kBlockRun<D>) {
      if (block) {
        const int strips = int((p.n + VL - 1) / VL);
        auto pick = [&](auto unit) {
          constexpr bool kUnit = decltype(unit)::value;
          return strips == 2   ? BlockRunFn<D, VL, 2, K, kUnit>(p, half)
                 : strips == 3 ? BlockRunFn<D, VL, 3, K, kUnit>(p, half)
                               : BlockRunFn<D, VL, 4, K, kUnit>(p, half);
        };
        auto* fn = p.a_cs == 1 ? pick(std::true_type()) : pick(std::false_type());
        return fn(p, a, ao + t0 * sa, sa, b, bo + t0 * sb, sb, out, oo, so, n, stream, ahead);
      }
    }
    Side sa_{a, ao + t0 * sa, p.a_rs, p.a_cs, p.conj_a};
    Side sb_{b, bo + t0 * sb, p.b_cs, p.b_rs, p.conj_b};
    int64_t next_off = (col ? bo : ao) + (t0 + 1) * next_step;
    for (int64_t t = t0; t < t0 + n; ++t, oo += so, next_off += next_step) {
      if (t + 1 < count) PrefetchPanel<D>(next, next_off, next_count, p.k, next_vs, next_ls);
      ahead.Product(t - t0);
      ahead.Flush();
      if (col) {
        StationaryRows<D, VL, K>(sa_, sb_, out, oo, p.c_cs, p.m, p.n, stream);
      } else {
        StationaryRows<D, VL, K>(sb_, sa_, out, oo, p.c_rs, p.n, p.m, stream);
      }
      sa_.off += sa;
      sb_.off += sb;
    }
  };
  const int64_t product = p.m * p.n;  // products back to back, each one dense block
  if (!stream && OutputStaging() && count > 1 &&
      StreamOutput(uint64_t(p.output_elements) * kElementBytes, 64) &&
      sc == product && ((p.c_rs == p.n && p.c_cs == 1) || (p.c_cs == p.m && p.c_rs == 1)) &&
      StageFits(product * kElementBytes)) {
    char* dst = static_cast<char*>(c) + co * kElementBytes;
    StagedStream(dst, product * kElementBytes, count, [&](int64_t t0, int64_t n, char* buf) {
      run(t0, n, buf, 0, product);
    });
    return;
  }
  run(0, count, c, co, sc);
  if (stream) StreamFence();
}

// Every K in [1, kStationaryMaxKOf<D>], at index K - 1.
template <DType D, int... I>
struct StationaryTable {
  static constexpr DirectFn<D> fns[] = {&StationaryRun<D, I + 1>...};
};
template <DType D, int... I>
StationaryTable<D, I...> MakeStationaryTable(std::integer_sequence<int, I...>);  // type only
template <DType D>
using StationaryFns =
    decltype(MakeStationaryTable<D>(std::make_integer_sequence<int, kStationaryMaxKOf<D>>()));

template <DType D>
bool RunStationary(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin,
                   int64_t end) {
  return RunDirect<D>(StationaryFns<D>::fns[p.k - 1], p, a, b, c, begin, end);
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_STATIONARY_H_
