// bf16dot.h — bfloat16 products of the stationary row kernel on the CPU's own bfloat16
// dot product (AVX512-BF16 vdpbf16ps: each of 16 float32 lanes += the sum of two
// bfloat16 products), where the CPU has it (Bf16Dot(), smallmm.h). Elsewhere bfloat16
// widens to float32 on every load, like float16, and multiplies in float32: one
// conversion and one FMA per multiply-add, where vdpbf16ps does two multiply-adds in one
// instruction straight from the stored values. Accumulation stays float32 and C is
// rounded once at the end, as on every kernel.
//
// Layout: B's K rows become K/2 "pair vectors" per strip of 16 output columns, lane v
// holding (B[2l][v], B[2l+1][v]) as the low and high half of a 32-bit lane; each row of A
// gives (A[i][2l], A[i][2l+1]) as one 32-bit word, broadcast to every lane. An odd K pairs
// its last element with zero. The strips sit in L1 while A's rows go past them in blocks,
// like BlockRun (stationary.h), whose shape of loop this is.
//
// The instruction treats subnormal inputs and results as zero (it ignores MXCSR), as
// TensorFlow's own bfloat16 matmul does on these CPUs (oneDNN uses it): tf.matmul of
// bfloat16 1e-39 · 1 gives 0 there (TF 2.21, AMD EPYC with AVX512-BF16, 2026-12-05).
//
// The column kernel's products (C contiguous along M: the capsule prediction, W[i]
// (160×8) · u[:, i]ᵀ per input capsule) run the same loop as Cᵀ = Bᵀ·Aᵀ (Transposed):
// strips of A's rows, B's columns streamed past them. They widened their streamed columns
// into a float32 copy and ran one FMA per multiply-add. Against that (2026-12-05, AMD
// EPYC Zen 4, 2 threads, capsule_predict with W[1152, 10, 16, 8] in tf.function, builds
// before and after in alternate processes, medians of 80 calls): batch 50 1.84-1.98 ->
// 1.42-1.49 ms, batch 10 0.67-0.69 -> 0.56 ms (one run 0.71, its 25th percentile 0.48).
//
// The packed family's bfloat16 plans take the same instruction (packed.h RunPackedPairs,
// with the tiles and micro-kernel here).
//
// Compiled only into the AVX-512 build's bfloat16 kernels (gemm_isa.cc built once more with
// -mavx512bf16 and SMALLMM_BF16_ONLY), which run bfloat16 where the CPU reports the
// extension and Bf16Dot() is on (../gemm.cc); the AVX-512 build itself must still run on
// CPUs without it. Included only by stationary.h and packed.h.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_BF16DOT_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_BF16DOT_H_

#include <cstdint>
#include <cstring>
#include <utility>

#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/streaming.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SMALLMM_BF16_DOT 1
#else
#define SMALLMM_BF16_DOT 0
#endif

namespace smallmm {
namespace {

#if SMALLMM_BF16_DOT

using U16x16 = VecOf<uint16_t, 16>::type;
using U16x32 = VecOf<uint16_t, 32>::type;
using U32x8 = VecOf<uint32_t, 8>::type;
using U32x16 = VecOf<uint32_t, 16>::type;
using I32x16 = VecOf<int32_t, 16>::type;
using F32x16 = VecOf<float, 16>::type;

constexpr int kPairLanes = 16;     // output columns per strip
constexpr int kPairMaxPairs = 16;  // K up to 32
constexpr int kPairMaxStrips = 4;  // a block of up to 64 columns at a time

// The first n (0 < n <= 16) of 16 bfloat16 at p, the rest zero.
inline U16x16 Load16(const uint16_t* p, int n) {
  return n == 16 ? LoadVec<U16x16>(p) : LoadPartial<U16x16>(p, n);
}

// The 16 pair words (lo[v], hi[v]) of two rows of 16 bfloat16.
inline U16x32 Interleave(const U16x16& lo, const U16x16& hi) {
  return __builtin_shufflevector(lo, hi, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8,
                                 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
}

// The pair vectors s[0 .. (k+1)/2) of B's columns 0..n-1 from b (n <= 16, k <= 32):
// column v of B at b + v·cs, its element l at + l·rs; B row-major (cs == 1) or transposed
// (rs == 1). Lanes past n are zero.
inline void LoadPairStrip(const uint16_t* b, int64_t rs, int64_t cs, int k, int n, U16x32* s) {
  if (cs == 1) {  // rows of B contiguous: interleave rows 2l and 2l + 1
    for (int l = 0; 2 * l < k; ++l) {
      const U16x16 lo = Load16(b + 2 * l * rs, n);
      const U16x16 hi = 2 * l + 1 < k ? Load16(b + (2 * l + 1) * rs, n) : U16x16{};
      s[l] = Interleave(lo, hi);
    }
    return;
  }
  // Columns of B contiguous: each column's pairs are 32-bit words already; 16 columns of
  // up to 8 words at a time are transposed in registers (as stationary.h ShuffleStrip).
  const int pairs = (k + 1) / 2;
  constexpr auto seq16 = std::make_integer_sequence<int, 16>();
  for (int c0 = 0; c0 < pairs; c0 += 8) {
    const int e = k - 2 * c0 < 16 ? k - 2 * c0 : 16;  // bfloat16 of each column in this group
    U32x16 x[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const U32x8 lo = j < n ? (U32x8)Load16(b + j * cs + 2 * c0, e) : U32x8{};
      const U32x8 hi = 8 + j < n ? (U32x8)Load16(b + (8 + j) * cs + 2 * c0, e) : U32x8{};
      x[j] = Concat(lo, hi, seq16);
    }
    ShuffleStage<1, U32x16, I32x16>(x, seq16);
    ShuffleStage<2, U32x16, I32x16>(x, seq16);
    ShuffleStage<4, U32x16, I32x16>(x, seq16);
    for (int c = 0; c < 8 && c0 + c < pairs; ++c) s[c0 + c] = (U16x32)x[c];
  }
}

// (X[2l], X[2l + 1]) of a row of X (element l at row[l·cs]) as one 32-bit word, the high
// half zero past K. kUnit: cs == 1, one 32-bit load.
template <bool kUnit>
__attribute__((always_inline)) inline uint32_t PairWord(const uint16_t* row, int64_t cs, int64_t l,
                                                        int64_t k) {
  if (kUnit && 2 * l + 1 < k) {
    uint32_t w;
    memcpy(&w, row + 2 * l, sizeof(w));
    return w;
  }
  const uint32_t hi = 2 * l + 1 < k ? row[(2 * l + 1) * cs] : 0u;
  return row[2 * l * cs] | hi << 16;
}

// acc + Σ of the pair products of v's lanes and the pair word w, in L float32 lanes.
template <int L>
__attribute__((always_inline)) inline typename VecOf<float, L>::type Dot2(
    const typename VecOf<float, L>::type& acc, const typename VecOf<uint16_t, 2 * L>::type& v,
    uint32_t w) {
  if constexpr (L == 16) {
    return (F32x16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)v, (__m512bh)_mm512_set1_epi32(int(w)));
  } else {
    static_assert(L == 8, "a zmm or a ymm of float32");
    return (typename VecOf<float, 8>::type)_mm256_dpbf16_ps((__m256)acc, (__m256bh)v,
                                                            (__m256bh)_mm256_set1_epi32(int(w)));
  }
}

// The first n of L float32 accumulators rounded to bfloat16 at c, by the CPU's own
// conversion (vcvtneps2bf16), as Rounded() (common.h) does in this build but without its
// check for subnormal lanes, which these accumulators never hold: vdpbf16ps flushes its
// results to zero. With the integer rounding (a dozen instructions per vector), products
// of few pairs were bound by their stores: [65536, 2] · [2, 32] took longer than float32,
// which writes twice the bytes (239 against 165 µs). Against it (2026-12-05, AMD EPYC,
// one thread, _smallmm_core.matmul [65536, K] · [K, 32], old and new builds in alternate
// processes): K = 2 239 -> 85-91 µs, 3 279-282 -> 116-121, 4 269-271 -> 100-116, 8 342 ->
// 167-256; the TF op (2 threads) against tf.matmul, [2048, 32, 3] · [3, 32] 0.80 -> 1.06×,
// [3640, 24, 24] · [24, 24] 0.90 -> 1.06×.
template <int L>
__attribute__((always_inline)) inline void StorePairLanes(uint16_t* c,
                                                          const typename VecOf<float, L>::type& acc,
                                                          int n) {
  using U16 = typename VecOf<uint16_t, L>::type;
  if constexpr (L == 16) {
    StoreFirst(c, (U16)_mm512_cvtneps_pbh((__m512)acc), n);
  } else {
    StoreFirst(c, (U16)_mm256_cvtneps_pbh((__m256)acc), n);
  }
}

// Rows i..i+R-1 of one product (A's row i at a) against S strips of pair vectors: R·S
// float32 accumulators, each pair step loading the S strip vectors once and one word of
// each row, each word feeding S dot products. C's row i at c; the last strip `last`
// columns wide. L = 8: one strip of at most 8 columns in ymm registers, its vectors the
// low halves of the strip's (AMD Zen 4 runs a zmm instruction as two ymm halves, so 8
// columns in a zmm would waste half its time).
template <int R, int S, bool kUnit, int L = kPairLanes>
__attribute__((always_inline)) inline void PairRows(const U16x32 (*s)[kPairMaxPairs], int k,
                                                    const uint16_t* a, int64_t ars, int64_t acs,
                                                    uint16_t* c, int64_t crs, int last) {
  static_assert(L == kPairLanes || S == 1, "half-width rows have one strip");
  using F = typename VecOf<float, L>::type;
  using P = typename VecOf<uint16_t, 2 * L>::type;
  F acc[R][S] = {};  // from +0 like every GEMM (-0 · 1 = +0)
  const int pairs = (k + 1) / 2;
#pragma GCC unroll 2
  for (int l = 0; l < pairs; ++l) {
    P v[S];
#pragma GCC unroll 4
    for (int q = 0; q < S; ++q) {
      if constexpr (L == kPairLanes) {
        v[q] = s[q][l];
      } else {
        v[q] = __builtin_shufflevector(s[q][l], s[q][l], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                       13, 14, 15);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint32_t w = PairWord<kUnit>(a + r * ars, acs, l, k);
#pragma GCC unroll 4
      for (int q = 0; q < S; ++q) acc[r][q] = Dot2<L>(acc[r][q], v[q], w);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < S; ++q) {
      StorePairLanes<L>(c + r * crs + q * L, acc[r][q], q + 1 < S ? L : last);
    }
  }
}

// Columns 0..n-1 of one product (16·(S-1) < n <= 16·S; n <= L) for all its m rows: B's
// columns from b, A's rows from a, C's from c.
template <int S, bool kUnit, int L = kPairLanes>
void PairColumns(const GemmPlan& p, const uint16_t* a, const uint16_t* b, uint16_t* c, int n,
                 RunAhead<DType::kBFloat16>& ahead) {
  constexpr int R = S <= 2 ? 8 : 4;  // rows per block: 8-16 accumulators
  const int k = int(p.k);
  const int64_t m = p.m, ars = p.a_rs, acs = p.a_cs, crs = p.c_rs;
  U16x32 s[S][kPairMaxPairs];
#pragma GCC unroll 4
  for (int q = 0; q < S; ++q) {
    const int w = n - q * kPairLanes < kPairLanes ? n - q * kPairLanes : kPairLanes;
    LoadPairStrip(b + q * kPairLanes * p.b_cs, p.b_rs, p.b_cs, k, w, s[q]);
  }
  const int last = n - (S - 1) * kPairLanes;
  int64_t i = 0;
  for (; i + R <= m; i += R) {
    ahead.Upto(i + R, m);
    PairRows<R, S, kUnit, L>(s, k, a + i * ars, ars, acs, c + i * crs, crs, last);
  }
  if constexpr (R > 4) {
    if (i + 4 <= m) {
      PairRows<4, S, kUnit, L>(s, k, a + i * ars, ars, acs, c + i * crs, crs, last);
      i += 4;
    }
  }
  if (i + 2 <= m) {
    PairRows<2, S, kUnit, L>(s, k, a + i * ars, ars, acs, c + i * crs, crs, last);
    i += 2;
  }
  if (i < m) PairRows<1, S, kUnit, L>(s, k, a + i * ars, ars, acs, c + i * crs, crs, last);
}

// `count` products of the plan, the t-th with operands at element offsets ao + t·sa and
// bo + t·sb and its output at co + t·sc (a DirectFn run): each product's columns in
// blocks of up to 64, each block's strips loaded once and A's rows streamed past them.
// A's rows pages apart (the column kernel's streamed columns, see PairDotFits) are
// prefetched a product ahead, as the general path does.
template <bool kUnit>
void PairRun(const GemmPlan& p, const void* a, int64_t ao, int64_t sa, const void* b, int64_t bo,
             int64_t sb, void* c, int64_t co, int64_t sc, int64_t count,
             RunAhead<DType::kBFloat16>& ahead) {
  constexpr int64_t kBlock = kPairMaxStrips * kPairLanes;
  const uint16_t* ap = static_cast<const uint16_t*>(a) + ao;
  const uint16_t* bp = static_cast<const uint16_t*>(b) + bo;
  uint16_t* cp = static_cast<uint16_t*>(c) + co;
  const bool far = !NearStride(p.a_rs);
  for (int64_t t = 0; t < count; ++t, ap += sa, bp += sb, cp += sc) {
    ahead.Product(t);
    if (far && t + 1 < count) {
      PrefetchPanel<DType::kBFloat16>(a, ao + (t + 1) * sa, p.m, p.k, p.a_rs, p.a_cs);
    }
    for (int64_t j = 0; j < p.n; j += kBlock) {
      const int n = int(p.n - j < kBlock ? p.n - j : kBlock);
      const uint16_t* bj = bp + j * p.b_cs;
      switch ((n + kPairLanes - 1) / kPairLanes) {
        case 1:
          if (n <= kPairLanes / 2) {
            PairColumns<1, kUnit, kPairLanes / 2>(p, ap, bj, cp + j, n, ahead);
          } else {
            PairColumns<1, kUnit>(p, ap, bj, cp + j, n, ahead);
          }
          break;
        case 2:
          PairColumns<2, kUnit>(p, ap, bj, cp + j, n, ahead);
          break;
        case 3:
          PairColumns<3, kUnit>(p, ap, bj, cp + j, n, ahead);
          break;
        default:
          PairColumns<4, kUnit>(p, ap, bj, cp + j, n, ahead);
          break;
      }
    }
    ahead.Flush();
  }
}

// ---------------------------------------------------------------- packed tiles
// For the packed family (packed.h RunPackedPairs): A packed into tiles of kPairTileRows
// rows [tile][pair][row] and B into tiles of up to 32 columns [tile][pair][column], both
// as pair words (zero past M, N and K), and a micro-kernel per pair of tiles with its
// float32 accumulators in registers.
constexpr int kPairTileRows = 8;
constexpr int kPairTileCols = 2 * kPairLanes;

// Packs rows [r0, r0 + w) of op(X) (element (r, l) at x[off + r·rs + l·ls]; rows past
// `rows` zero) as pair words dst[pair][r - r0], walking X in its memory order: a folded
// batch makes one stride huge (a weight gradient's K of 65536 rows), and crossing a page
// per element thrashes the TLB. Rows contiguous (rs == 1): two runs of 16 interleaved
// per 16 words; K contiguous: each pair is one 32-bit load.
inline void PackPairs(const uint16_t* x, int64_t off, int64_t rows, int64_t k, int64_t rs,
                      int64_t ls, int64_t r0, int w, uint32_t* dst) {
  const int64_t pairs = (k + 1) / 2;
  const int valid = int(rows - r0 < w ? rows - r0 : w);
  if (rs == 1) {
    for (int64_t l = 0; l < pairs; ++l) {
      const uint16_t* p0 = x + off + r0 + 2 * l * ls;
      for (int i = 0; i < w; i += kPairLanes) {
        const int n = valid - i < kPairLanes ? valid - i : kPairLanes;  // may be <= 0
        U16x32 v{};
        if (n > 0) {
          const U16x16 lo = Load16(p0 + i, n);
          const U16x16 hi = 2 * l + 1 < k ? Load16(p0 + i + ls, n) : U16x16{};
          v = Interleave(lo, hi);
        }
        const int m = w - i < kPairLanes ? w - i : kPairLanes;
        if (m == kPairLanes) {
          StoreVec(dst + l * w + i, (U32x16)v);
        } else {
          StorePartial(dst + l * w + i, (U32x16)v, m);
        }
      }
    }
    return;
  }
  const bool k_inner = !(rs >= 0 && ls >= 0 && rs < ls);
  for (int i = valid; i < w; ++i)
    for (int64_t l = 0; l < pairs; ++l) dst[l * w + i] = 0;
  auto word = [&](const uint16_t* row, int64_t l) {
    return ls == 1 ? PairWord<true>(row, 1, l, k) : PairWord<false>(row, ls, l, k);
  };
  if (k_inner) {
    for (int i = 0; i < valid; ++i)
      for (int64_t l = 0; l < pairs; ++l) dst[l * w + i] = word(x + off + (r0 + i) * rs, l);
  } else {
    for (int64_t l = 0; l < pairs; ++l)
      for (int i = 0; i < valid; ++i) dst[l * w + i] = word(x + off + (r0 + i) * rs, l);
  }
}

// One MT × 16·S tile: acc[i][16q + v] (+)= Σ_pairs a[pair][i] · b[pair][16q + v].
template <int MT, int S>
void PairMicro(int64_t pairs, const uint32_t* a, const uint32_t* b, float* acc, bool accumulate) {
  F32x16 c[MT][S];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) {
#pragma GCC unroll 2
    for (int q = 0; q < S; ++q) {
      c[i][q] = accumulate ? LoadVec<F32x16>(acc + (i * S + q) * kPairLanes) : F32x16{};
    }
  }
  for (int64_t l = 0; l < pairs; ++l) {
    U16x32 v[S];
#pragma GCC unroll 2
    for (int q = 0; q < S; ++q) v[q] = LoadVec<U16x32>(b + (l * S + q) * kPairLanes);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const __m512i w = _mm512_set1_epi32(int(a[l * MT + i]));
#pragma GCC unroll 2
      for (int q = 0; q < S; ++q) {
        c[i][q] = (F32x16)_mm512_dpbf16_ps((__m512)c[i][q], (__m512bh)v[q], (__m512bh)w);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) {
#pragma GCC unroll 2
    for (int q = 0; q < S; ++q) StoreVec(acc + (i * S + q) * kPairLanes, c[i][q]);
  }
}

using PairMicroFn = void (*)(int64_t, const uint32_t*, const uint32_t*, float*, bool);
// [rows 1, 2, 4, 8][16 or 32 columns]
constexpr PairMicroFn kPairMicros[4][2] = {{&PairMicro<1, 1>, &PairMicro<1, 2>},
                                           {&PairMicro<2, 1>, &PairMicro<2, 2>},
                                           {&PairMicro<4, 1>, &PairMicro<4, 2>},
                                           {&PairMicro<8, 1>, &PairMicro<8, 2>}};
// The row class (index into kPairMicros) and width of a tile holding n <= 8 rows.
inline int PairRowClass(int64_t n) { return n <= 1 ? 0 : n <= 2 ? 1 : n <= 4 ? 2 : 3; }

// The column kernel's product C = A·B as the row kernel's Cᵀ = Bᵀ·Aᵀ: C's columns are Cᵀ's
// rows, B's columns the rows streamed past strips of A's rows.
inline GemmPlan Transposed(const GemmPlan& p) {
  GemmPlan t = p;
  t.m = p.n;
  t.n = p.m;
  t.a_rs = p.b_cs;
  t.a_cs = p.b_rs;
  t.b_rs = p.a_cs;
  t.b_cs = p.a_rs;
  t.c_rs = p.c_cs;
  t.c_cs = p.c_rs;
  t.conj_a = p.conj_b;
  t.conj_b = p.conj_a;
  return t;
}

// Whether PairRun computes t, the plan as it would run it: the row kernel's plan, or (`col`)
// the column kernel's Transposed(p). K within the strips, C's rows contiguous, B read along
// rows or columns, and A's rows near each other. Far rows of the row kernel take the general
// path, which copies or prefetches them; the column kernel's streamed columns are often far
// (the capsule prediction's u[b, i, :], 18 KB apart), and PairRun prefetches them a product
// ahead: each is read once per 64 rows of A.
inline bool PairDotFits(const GemmPlan& t, bool col) {
  return t.k <= 2 * kPairMaxPairs && t.c_cs == 1 && (col || NearStride(t.a_rs)) &&
         (t.b_cs == 1 || t.b_rs == 1);
}
#endif  // SMALLMM_BF16_DOT

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_BF16DOT_H_
