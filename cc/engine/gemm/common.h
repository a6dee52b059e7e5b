// common.h — what every GEMM kernel family shares: element traits, GCC vector types, the
// loop-nest cursor, and the walk that feeds direct kernels runs of the innermost output
// loop. Included only by gemm_isa.cc (compiled once per ISA and dtype): everything has internal
// linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_COMMON_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_COMMON_H_

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>  // static inline intrinsics only: nothing here can leak as a COMDAT
#endif

#include "cc/engine/float16_bits.h"
#include "cc/engine/smallmm.h"

namespace smallmm {
namespace {

// ---------------------------------------------------------------- 16-bit floats
using f16::BF16ToFloat;
using f16::FloatToBF16;
using f16::FloatToHalf;
using f16::HalfToFloat;

// ---------------------------------------------------------------- element traits
// R: accumulation type; kComplex: interleaved (re, im) storage, split planes when packed.
// Load / Store take the index of a storage scalar. float16 / bfloat16 convert on the way.
template <DType D>
struct Traits {
  using S = typename DTypeInfo<D>::Storage;
  using R = typename DTypeInfo<D>::Acc;
  static_assert(std::is_same<S, R>::value, "a converting dtype needs its own Traits");
  static constexpr bool kComplex = DTypeInfo<D>::kComponents == 2;
  static R Load(const void* p, int64_t i) { return static_cast<const S*>(p)[i]; }
  static void Store(void* p, int64_t i, R v) { static_cast<S*>(p)[i] = v; }
};
// 16-bit storage, float accumulation, converted by these two functions on the way.
template <float (*kToFloat)(uint16_t), uint16_t (*kFromFloat)(float)>
struct Traits16 {
  using R = float;
  static constexpr bool kComplex = false;
  static R Load(const void* p, int64_t i) { return kToFloat(static_cast<const uint16_t*>(p)[i]); }
  static void Store(void* p, int64_t i, R v) { static_cast<uint16_t*>(p)[i] = kFromFloat(v); }
};
#if defined(__F16C__)
// One instruction each way where the build has F16C (the AVX2 and AVX-512 builds): the
// same values as the bit conversions (round to nearest even; NaN stays NaN).
inline float HalfToFloatF16C(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t FloatToHalfF16C(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
template <>
struct Traits<DType::kHalf> : Traits16<&HalfToFloatF16C, &FloatToHalfF16C> {};
#else
template <>
struct Traits<DType::kHalf> : Traits16<&HalfToFloat, &FloatToHalf> {};
#endif
template <>
struct Traits<DType::kBFloat16> : Traits16<&BF16ToFloat, &FloatToBF16> {};

// A real dtype stored as its accumulation type (float, double): kernels may read and write
// its elements in place, as vectors of R.
template <DType D>
constexpr bool kPlainReal =
    !Traits<D>::kComplex &&
    std::is_same<typename DTypeInfo<D>::Storage, typename DTypeInfo<D>::Acc>::value;

// ---------------------------------------------------------------- vectors
// GCC vector extensions, lowered to zmm / ymm / xmm by each ISA build.
template <typename R, int L>
struct VecOf {
  typedef R type __attribute__((vector_size(sizeof(R) * L)));
};

// This build's vector width in bytes.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// The signed integer as wide as R: the lane type of R's shuffle masks.
template <typename R>
struct SameSizeInt {
  using type = typename std::conditional<sizeof(R) == 8, int64_t, int32_t>::type;
};

// A shuffle mask of L lanes, lane r = f(r) (f constexpr: the mask is a constant).
template <typename I, typename F, int... r>
constexpr I MakeMask(F f, std::integer_sequence<int, r...>) {
  return I{f(r)...};
}

// Unaligned vector load / store (memcpy compiles to one vmovups).
template <typename V, typename R>
inline V LoadVec(const R* p) {
  V v;
  memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename R>
inline void StoreVec(R* p, const V& v) {
  memcpy(p, &v, sizeof(V));
}

// The first n lanes of a vector (0 <= n <= its lanes): the other lanes read as zero and
// are never written. With AVX-512 these are masked loads and stores, which touch no byte
// past p + n; elsewhere the lanes are moved one at a time. The masked forms also keep
// the load from waiting on the narrower stores of a copy (store forwarding fails there):
// through a copy, float16 matvecs with K = 8..15 on the dot kernel (every row one partial
// vector) ran 3× slower per element than K = 16.
template <typename V, typename R>
inline V LoadPartial(const R* p, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (sizeof(R) == 2 && sizeof(V) >= 16) {
    const uint32_t k = uint32_t((uint64_t(1) << n) - 1);
    if constexpr (sizeof(V) == 64) return (V)_mm512_maskz_loadu_epi16(k, p);
    if constexpr (sizeof(V) == 32) return (V)_mm256_maskz_loadu_epi16(k, p);
    if constexpr (sizeof(V) == 16) return (V)_mm_maskz_loadu_epi16(k, p);
  }
#endif
#if defined(__AVX512F__)
  constexpr bool kMasked = (sizeof(R) == 4 || sizeof(R) == 8) && sizeof(V) >= 16;
  if constexpr (kMasked) {
    const unsigned k = (1u << n) - 1;
    if constexpr (sizeof(R) == 4 && sizeof(V) == 64) return (V)_mm512_maskz_loadu_ps(k, p);
    if constexpr (sizeof(R) == 4 && sizeof(V) == 32) return (V)_mm256_maskz_loadu_ps(k, p);
    if constexpr (sizeof(R) == 4 && sizeof(V) == 16) return (V)_mm_maskz_loadu_ps(k, p);
    if constexpr (sizeof(R) == 8 && sizeof(V) == 64) return (V)_mm512_maskz_loadu_pd(k, p);
    if constexpr (sizeof(R) == 8 && sizeof(V) == 32) return (V)_mm256_maskz_loadu_pd(k, p);
    if constexpr (sizeof(R) == 8 && sizeof(V) == 16) return (V)_mm_maskz_loadu_pd(k, p);
  }
#endif
  R lanes[sizeof(V) / sizeof(R)] = {};
  for (int i = 0; i < n; ++i) lanes[i] = p[i];
  return LoadVec<V>(lanes);
}
template <typename V, typename R>
inline void StorePartial(R* p, const V& v, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (sizeof(R) == 2 && sizeof(V) >= 16) {
    const uint32_t k = uint32_t((uint64_t(1) << n) - 1);
    if constexpr (sizeof(V) == 64) return _mm512_mask_storeu_epi16(p, k, __m512i(v));
    if constexpr (sizeof(V) == 32) return _mm256_mask_storeu_epi16(p, k, __m256i(v));
    if constexpr (sizeof(V) == 16) return _mm_mask_storeu_epi16(p, k, __m128i(v));
  }
#endif
#if defined(__AVX512F__)
  constexpr bool kMasked = (sizeof(R) == 4 || sizeof(R) == 8) && sizeof(V) >= 16;
  if constexpr (kMasked) {
    const unsigned k = (1u << n) - 1;
    if constexpr (sizeof(R) == 4 && sizeof(V) == 64) return _mm512_mask_storeu_ps(p, k, __m512(v));
    if constexpr (sizeof(R) == 4 && sizeof(V) == 32) return _mm256_mask_storeu_ps(p, k, __m256(v));
    if constexpr (sizeof(R) == 4 && sizeof(V) == 16) return _mm_mask_storeu_ps(p, k, __m128(v));
    if constexpr (sizeof(R) == 8 && sizeof(V) == 64) return _mm512_mask_storeu_pd(p, k, __m512d(v));
    if constexpr (sizeof(R) == 8 && sizeof(V) == 32) return _mm256_mask_storeu_pd(p, k, __m256d(v));
    if constexpr (sizeof(R) == 8 && sizeof(V) == 16) return _mm_mask_storeu_pd(p, k, __m128d(v));
  }
#endif
  R lanes[sizeof(V) / sizeof(R)];
  memcpy(lanes, &v, sizeof(V));
  for (int i = 0; i < n; ++i) p[i] = lanes[i];
}
// The first n lanes of v at p: the whole vector in one store where n is all of them.
template <typename V, typename R>
inline void StoreFirst(R* p, const V& v, int n) {
  if (n == int(sizeof(V) / sizeof(R))) return StoreVec(p, v);
  StorePartial(p, v, n);
}

// float16 / bfloat16 elements p[0..n) widened to a vector of W floats, and a vector of W
// floats rounded into p[0..n) (0 <= n <= W; the other lanes read as zero and are never
// written): whole-vector conversions, with the same values as Traits' scalar ones (round
// to nearest even, NaN stays NaN). bfloat16 is a shift either way; float16 uses F16C's
// vcvtph2ps / vcvtps2ph where the build has it (the zero-masked AVX-512 forms: GCC 12's
// unmasked ones start from an undefined register and warn).
template <DType D, int W>
inline typename VecOf<float, W>::type Widened(const typename VecOf<uint16_t, W>::type& v) {
  using F = typename VecOf<float, W>::type;
  if constexpr (D == DType::kBFloat16) {
    return (F)(__builtin_convertvector(v, typename VecOf<uint32_t, W>::type) << 16);
  }
#if defined(__AVX512F__)
  if constexpr (W == 16) return (F)_mm512_maskz_cvtph_ps(0xffff, (__m256i)v);
#endif
#if defined(__F16C__)
  if constexpr (W == 8) return (F)_mm256_cvtph_ps((__m128i)v);
#endif
  F f;
  for (int i = 0; i < W; ++i) f[i] = Traits<D>::Load(&v, i);
  return f;
}
template <DType D, int W>
inline typename VecOf<uint16_t, W>::type Rounded(const typename VecOf<float, W>::type& f) {
  using U16 = typename VecOf<uint16_t, W>::type;
  using U32 = typename VecOf<uint32_t, W>::type;
  if constexpr (D == DType::kBFloat16) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
    // The CPU's own conversion where this build has it (gemm_isa.cc's bfloat16 build,
    // SMALLMM_BF16_ONLY): one instruction against the dozen below, the same values (to
    // nearest even, NaN kept quiet) except that it reads subnormal inputs as zero, so a
    // vector holding one (vfpclassps; rare) takes the integer path.
    if constexpr (W == 16) {
      if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)f, 0x20) == 0, 1)) {
        return (U16)_mm512_cvtneps_pbh((__m512)f);
      }
    } else if constexpr (W == 8) {
      if (__builtin_expect(_mm256_fpclass_ps_mask((__m256)f, 0x20) == 0, 1)) {
        return (U16)_mm256_cvtneps_pbh((__m256)f);
      }
    }
#endif
    // A select, not and/or with the comparison's lanes: GCC built those all-ones lanes
    // with a masked load of a constant on AVX-512, which stalled an AMD EPYC (CPU class
    // avx512+bf16) on every store (bfloat16 [B, 32, 32] · [32, 16] 5× slower than
    // float16); the select is one masked move.
    const U32 u = (U32)f;
    const U32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const U32 quiet = (u >> 16) | 0x0040u;  // NaN stays NaN
    return __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded, U16);
  }
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    return (U16)_mm512_maskz_cvtps_ph(0xffff, (__m512)f, _MM_FROUND_TO_NEAREST_INT);
  }
#endif
#if defined(__F16C__)
  if constexpr (W == 8) return (U16)_mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT);
#endif
  U16 v;
  for (int i = 0; i < W; ++i) Traits<D>::Store(&v, i, f[i]);
  return v;
}
template <DType D, int W>
inline typename VecOf<float, W>::type LoadWidened(const uint16_t* p, int n) {
  using U16 = typename VecOf<uint16_t, W>::type;
  return Widened<D, W>(n == W ? LoadVec<U16>(p) : LoadPartial<U16>(p, n));
}
template <DType D, int W>
inline void StoreRounded(uint16_t* p, const typename VecOf<float, W>::type& f, int n) {
  StoreFirst(p, Rounded<D, W>(f), n);
}

// n <= L storage scalars of dtype D at p as a vector of its accumulation type (the other
// lanes zero), and back: plain vector moves for float, double and the (re, im) scalars of
// complex types, conversions for float16 and bfloat16.
template <DType D, int L>
using AccVec = typename VecOf<typename Traits<D>::R, L>::type;
template <DType D>
using StorageOf = typename DTypeInfo<D>::Storage;
template <DType D>
constexpr bool kStoredAsAcc = std::is_same<StorageOf<D>, typename Traits<D>::R>::value;
template <DType D, int L>
inline AccVec<D, L> LoadLanes(const StorageOf<D>* p, int n) {
  if constexpr (kStoredAsAcc<D>) {
    return n == L ? LoadVec<AccVec<D, L>>(p) : LoadPartial<AccVec<D, L>>(p, n);
  } else {
    return LoadWidened<D, L>(p, n);
  }
}
template <DType D, int L>
inline void StoreLanes(StorageOf<D>* p, const AccVec<D, L>& v, int n) {
  if constexpr (kStoredAsAcc<D>) {
    StoreFirst(p, v, n);
  } else {
    StoreRounded<D, L>(p, v, n);
  }
}

// ---------------------------------------------------------------- register transposes
// Two vectors of H lanes as one of 2H (lo first).
template <typename H, int... I>
__attribute__((always_inline)) inline auto Concat(const H& lo, const H& hi,
                                                  std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(lo, hi, I...);
}

// One stage of an 8-vector transpose in registers (stationary.h ShuffleStrip, bf16dot.h
// LoadPairStrip), which swaps bit kBit of the vector index with bit kBit of the lane
// index: lane L of the new low vector of each pair (bit kBit of its index clear) and of
// the new high one.
template <int kBit, typename V, typename I, int... L>
__attribute__((always_inline)) inline void ShuffleStage(V* x, std::integer_sequence<int, L...>) {
  constexpr int W = sizeof...(L);
  constexpr I to_lo = {(L & kBit ? W + (L & ~kBit) : L)...};
  constexpr I to_hi = {(L & kBit ? W + L : L | kBit)...};
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    if (j & kBit) continue;
    const V lo = __builtin_shuffle(x[j], x[j | kBit], to_lo);
    x[j | kBit] = __builtin_shuffle(x[j], x[j | kBit], to_hi);
    x[j] = lo;
  }
}

// Elements c0 .. c0 + n - 1 (n <= 8) of `rows` (<= W) rows of contiguous elements, row v at
// p + v·vs, transposed in registers: x[c] lane v = row v's element c0 + c (lanes past
// `rows` zero). Each x[j] is loaded with row j of every 8-row block in its 8-lane group
// (rows j and 8 + j for W = 16), then three ShuffleStages move column c of every block into
// x[c]: 8 or 16 loads and 24 shuffles per 8 columns instead of 64-128 scalar moves.
template <DType D, int W>
__attribute__((always_inline)) inline void TransposeRows(const StorageOf<D>* p, int64_t vs,
                                                         int rows, int64_t c0, int n,
                                                         AccVec<D, W>* x) {
  static_assert(W == 8 || W == 16, "one or two 8-row blocks");
  using H = AccVec<D, 8>;
  using I = typename VecOf<typename SameSizeInt<typename Traits<D>::R>::type, W>::type;
  constexpr auto seq = std::make_integer_sequence<int, W>();
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const H lo = j < rows ? LoadLanes<D, 8>(p + j * vs + c0, n) : H{};
    if constexpr (W == 8) {
      x[j] = lo;
    } else {
      const H hi = 8 + j < rows ? LoadLanes<D, 8>(p + (8 + j) * vs + c0, n) : H{};
      x[j] = Concat(lo, hi, seq);
    }
  }
  ShuffleStage<1, AccVec<D, W>, I>(x, seq);
  ShuffleStage<2, AccVec<D, W>, I>(x, seq);
  ShuffleStage<4, AccVec<D, W>, I>(x, seq);
}

// ---------------------------------------------------------------- loop nests
// Walks a loop nest: offsets of the current multi-index, advanced in row-major order.
struct NestCursor {
  int n = 0;
  const Loop* loops = nullptr;
  int64_t idx[kMaxBatchDims] = {};
  int64_t a = 0, b = 0, c = 0;

  void Seek(const Loop* l, int count, int64_t flat) {
    n = count;
    loops = l;
    a = b = c = 0;
    for (int d = n - 1; d >= 0; --d) {
      const int64_t s = loops[d].size;
      idx[d] = s > 0 ? flat % s : 0;
      flat = s > 0 ? flat / s : 0;
      a += idx[d] * loops[d].a;
      b += idx[d] * loops[d].b;
      c += idx[d] * loops[d].c;
    }
  }
  void Next() {
    for (int d = n - 1; d >= 0; --d) {
      const Loop& l = loops[d];
      if (++idx[d] < l.size) {
        a += l.a;
        b += l.b;
        c += l.c;
        return;
      }
      a -= (l.size - 1) * l.a;
      b -= (l.size - 1) * l.b;
      c -= (l.size - 1) * l.c;
      idx[d] = 0;
    }
  }
};

// ---------------------------------------------------------------- direct kernels
// A direct kernel computes products straight from the caller's memory, no packing: `count`
// products of the plan, the t-th with operands at element offsets ao + t·sa and bo + t·sb
// and its output at co + t·sc (a run of the innermost output loop).
template <DType D>
using DirectFn = void (*)(const GemmPlan&, const void*, const void*, void*, int64_t count,
                          int64_t ao, int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc);

// Output matrices [begin, end) of the plan through a direct kernel, walking runs of the
// innermost output loop: one Seek per run, not per product.
template <DType D>
bool RunDirect(DirectFn<D> fn, const GemmPlan& p, const void* a, const void* b, void* c,
               int64_t begin, int64_t end) {
  const Loop inner = p.num_out > 0 ? p.out[p.num_out - 1] : Loop{1, 0, 0, 0};
  NestCursor out;
  for (int64_t o = begin; o < end;) {
    out.Seek(p.out, p.num_out, o);
    const int64_t pos = p.num_out > 0 ? out.idx[p.num_out - 1] : 0;
    const int64_t count = inner.size - pos < end - o ? inner.size - pos : end - o;
    fn(p, a, b, c, count, out.a, inner.a, out.b, inner.b, out.c, inner.c);
    o += count;
  }
  return true;
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_COMMON_H_
