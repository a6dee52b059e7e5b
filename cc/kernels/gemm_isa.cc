// The batched small-GEMM kernels. This file is compiled once per instruction set
// (setup.py: -DSMALLMM_ISA=avx512 / avx2 / baseline with the matching -m flags) and
// dispatch.cc picks one table at run time, so the shipped library runs on any x86-64.
//
// Everything here lives in an anonymous namespace and uses no std:: templates: an inline
// function compiled with -mavx512f must never be merged (as a COMDAT) into the baseline
// build, or a CPU without AVX-512 would execute AVX-512 code.
//
// Algorithm, for each output matrix C[o] (see smallmm.h for the terminology):
//   for each reduction item r:
//     pack op(A[o, r]) into M-tiles [tile][k][MT] and op(B[o, r]) into N-tiles
//     [tile][k][NT] in the accumulation type (conjugate and fp16 -> fp32 applied here,
//     zero-padded to whole tiles), skipping the pack when the operand is the same
//     matrix as last time (a broadcast operand is packed once and stays in L1);
//     for each (M-tile, N-tile): acc += micro-kernel(packed A tile, packed B tile)
//   store acc to C[o] (fp32 -> fp16 rounding applied here).
// Micro-kernels have compile-time tile sizes MT×NT ∈ {1,2,3,4,8,16}² so the compiler
// fully unrolls them and keeps the accumulators in vector registers; K is a run-time loop.
#include <cstdlib>
#include <cstring>

#include "cc/kernels/smallmm.h"

#ifndef SMALLMM_ISA
#error "compile with -DSMALLMM_ISA=<name>"
#endif

namespace smallmm {
namespace {

// ---------------------------------------------------------------- 16-bit floats
// Branch-light conversions (F. Giesen's public-domain half<->float, round to nearest
// even; same results as Eigen::half / Eigen::bfloat16, NaN stays NaN).
inline uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // Inf / NaN
  } else if (exp == 0) {      // zero / subnormal: renormalise
    o += 1u << 23;
    o = FloatBits(BitsFloat(o) - BitsFloat(113u << 23));
  }
  return BitsFloat(o | ((uint32_t(h) & 0x8000u) << 16));
}

inline uint16_t FloatToHalf(float f) {
  uint32_t u = FloatBits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= ((127u + 16u) << 23)) {
    o = (u > (255u << 23)) ? 0x7e00 : 0x7c00;  // NaN -> qNaN, overflow -> Inf
  } else if (u < (113u << 23)) {               // subnormal or zero
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = uint16_t(FloatBits(BitsFloat(u) + BitsFloat(magic)) - magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    o = uint16_t(u >> 13);
  }
  return uint16_t(o | (sign >> 16));
}

inline float BF16ToFloat(uint16_t h) { return BitsFloat(uint32_t(h) << 16); }

inline uint16_t FloatToBF16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // qNaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---------------------------------------------------------------- element traits
// R: accumulation type; kComplex: interleaved (re, im) storage, split planes when packed.
template <DType D>
struct Traits;
template <>
struct Traits<DType::kHalf> {
  using R = float;
  static constexpr bool kComplex = false;
  static R Load(const void* p, int64_t i) { return HalfToFloat(static_cast<const uint16_t*>(p)[i]); }
  static void Store(void* p, int64_t i, R v) { static_cast<uint16_t*>(p)[i] = FloatToHalf(v); }
};
template <>
struct Traits<DType::kBFloat16> {
  using R = float;
  static constexpr bool kComplex = false;
  static R Load(const void* p, int64_t i) { return BF16ToFloat(static_cast<const uint16_t*>(p)[i]); }
  static void Store(void* p, int64_t i, R v) { static_cast<uint16_t*>(p)[i] = FloatToBF16(v); }
};
template <typename S, bool C>
struct PlainTraits {
  using R = S;
  static constexpr bool kComplex = C;
  static R Load(const void* p, int64_t i) { return static_cast<const S*>(p)[i]; }
  static void Store(void* p, int64_t i, R v) { static_cast<S*>(p)[i] = v; }
};
template <>
struct Traits<DType::kFloat> : PlainTraits<float, false> {};
template <>
struct Traits<DType::kDouble> : PlainTraits<double, false> {};
template <>
struct Traits<DType::kComplex64> : PlainTraits<float, true> {};
template <>
struct Traits<DType::kComplex128> : PlainTraits<double, true> {};

// ---------------------------------------------------------------- micro-kernels
// acc[MT][NT] += Σ_l ap[l][0..MT) ⊗ bp[l][0..NT). For complex operands ap/bp/acc hold
// a real plane followed by an imaginary plane (ap_im = ap + k*MT, acc_im = acc + MT*NT).
template <typename R, int MT, int NT>
void MicroReal(int64_t k, const R* __restrict ap, const R* __restrict bp, R* __restrict acc) {
  R c[MT * NT];
  for (int x = 0; x < MT * NT; ++x) c[x] = acc[x];
  for (int64_t l = 0; l < k; ++l) {
    const R* __restrict a = ap + l * MT;
    const R* __restrict b = bp + l * NT;
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) c[i * NT + j] += a[i] * b[j];
  }
  for (int x = 0; x < MT * NT; ++x) acc[x] = c[x];
}

template <typename R, int MT, int NT>
void MicroComplex(int64_t k, const R* __restrict ap, const R* __restrict bp,
                  R* __restrict acc) {
  R cr[MT * NT], ci[MT * NT];
  for (int x = 0; x < MT * NT; ++x) {
    cr[x] = acc[x];
    ci[x] = acc[MT * NT + x];
  }
  const R* __restrict api = ap + k * MT;
  const R* __restrict bpi = bp + k * NT;
  for (int64_t l = 0; l < k; ++l) {
    for (int i = 0; i < MT; ++i) {
      const R ar = ap[l * MT + i], ai = api[l * MT + i];
      for (int j = 0; j < NT; ++j) {
        const R br = bp[l * NT + j], bi = bpi[l * NT + j];
        cr[i * NT + j] += ar * br - ai * bi;
        ci[i * NT + j] += ar * bi + ai * br;
      }
    }
  }
  for (int x = 0; x < MT * NT; ++x) {
    acc[x] = cr[x];
    acc[MT * NT + x] = ci[x];
  }
}

// Run-time size -> index into kTileSizes (smallmm.h).
constexpr int kNumTiles = kNumTileSizes;
inline int TileClass(int64_t n) {
  if (n <= 4) return n <= 1 ? 0 : int(n - 1);
  return n <= 8 ? 4 : 5;
}

template <typename R, bool C>
using MicroFn = void (*)(int64_t, const R*, const R*, R*);

template <typename R, bool C, int MT, int NT>
constexpr MicroFn<R, C> MicroFor() {
  if constexpr (C) {
    return &MicroComplex<R, MT, NT>;
  } else {
    return &MicroReal<R, MT, NT>;
  }
}

template <typename R, bool C, int MI>
struct MicroRow {
  static constexpr MicroFn<R, C> fns[kNumTiles] = {
      MicroFor<R, C, kTileSizes[MI], 1>(), MicroFor<R, C, kTileSizes[MI], 2>(),
      MicroFor<R, C, kTileSizes[MI], 3>(), MicroFor<R, C, kTileSizes[MI], 4>(),
      MicroFor<R, C, kTileSizes[MI], 8>(), MicroFor<R, C, kTileSizes[MI], 16>()};
};

template <typename R, bool C>
MicroFn<R, C> SelectMicro(int mi, int ni) {
  switch (mi) {
    case 0: return MicroRow<R, C, 0>::fns[ni];
    case 1: return MicroRow<R, C, 1>::fns[ni];
    case 2: return MicroRow<R, C, 2>::fns[ni];
    case 3: return MicroRow<R, C, 3>::fns[ni];
    case 4: return MicroRow<R, C, 4>::fns[ni];
    default: return MicroRow<R, C, 5>::fns[ni];
  }
}

// ---------------------------------------------------------------- packing
// Packs op(X) restricted to a [rows × k] panel (rows = M for A, N for B; for B the
// roles of the strides are swapped by the caller) into tiles [tile][l][T] (+ imag plane
// per tile), zero-padding rows up to a whole tile.
template <DType D>
void PackPanel(const void* x, int64_t off, int64_t rows, int64_t k, int64_t row_stride,
               int64_t k_stride, bool conj, int tile, typename Traits<D>::R* out) {
  using T = Traits<D>;
  using R = typename T::R;
  constexpr int kPlanes = T::kComplex ? 2 : 1;
  const int64_t ntiles = (rows + tile - 1) / tile;
  const R sign = conj ? R(-1) : R(1);
  for (int64_t t = 0; t < ntiles; ++t) {
    R* dst = out + t * kPlanes * k * tile;
    const int64_t r0 = t * tile;
    const int64_t valid = rows - r0 < tile ? rows - r0 : tile;
    for (int64_t l = 0; l < k; ++l) {
      for (int64_t i = 0; i < tile; ++i) {
        if (i < valid) {
          const int64_t idx = off + (r0 + i) * row_stride + l * k_stride;
          if constexpr (T::kComplex) {
            dst[l * tile + i] = T::Load(x, 2 * idx);
            dst[k * tile + l * tile + i] = sign * T::Load(x, 2 * idx + 1);
          } else {
            dst[l * tile + i] = T::Load(x, idx);
          }
        } else {
          dst[l * tile + i] = R(0);
          if constexpr (T::kComplex) dst[k * tile + l * tile + i] = R(0);
        }
      }
    }
  }
}

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

// a * b + c for scratch sizes; false on int64 overflow.
inline bool MulAdd(int64_t a, int64_t b, int64_t c, int64_t* out) {
  int64_t ab;
  return !__builtin_mul_overflow(a, b, &ab) && !__builtin_add_overflow(ab, c, out);
}

template <DType D>
bool Run(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin,
         int64_t end) {
  using T = Traits<D>;
  using R = typename T::R;
  constexpr bool kC = T::kComplex;
  constexpr int kPlanes = kC ? 2 : 1;
  // An empty C (M = 0 or N = 0) has nothing to write: return before walking the batch,
  // which for stride-0 operands (pybind11 views) may be astronomically long.
  if (begin >= end || p.m == 0 || p.n == 0) return true;
  // M and N are bounded by C's element count, which the caller allocated; this keeps the
  // tile arithmetic below free of overflow even so.
  if (p.m > (INT64_MAX >> 8) || p.n > (INT64_MAX >> 8)) return false;

  const int mi = TileClass(p.m), ni = TileClass(p.n);
  const int mt = kTileSizes[mi], nt = kTileSizes[ni];
  const int64_t mtiles = (p.m + mt - 1) / mt, ntiles = (p.n + nt - 1) / nt;
  const MicroFn<R, kC> micro = SelectMicro<R, kC>(mi, ni);

  // Scratch: packed A, packed B, accumulators; one allocation per call (a call covers a
  // whole shard). For dense operands (TF tensors) this is bounded by the inputs' own
  // sizes, but a stride-0 view can have a huge K in no memory at all, so the sizes are
  // overflow-checked and a failed allocation is reported, never ignored.
  int64_t a_elems, b_elems, acc_elems, total;
  if (!MulAdd(mtiles * mt * kPlanes, p.k, 0, &a_elems) ||
      !MulAdd(ntiles * nt * kPlanes, p.k, 0, &b_elems) ||
      !MulAdd(mtiles * ntiles, mt * nt * kPlanes, 1, &acc_elems) ||
      __builtin_add_overflow(a_elems, b_elems, &total) ||
      __builtin_add_overflow(total, acc_elems, &total) ||
      uint64_t(total) > SIZE_MAX / sizeof(R)) {
    return false;
  }
  --acc_elems;  // the +1 above keeps the allocation non-empty
  R* scratch = static_cast<R*>(malloc(sizeof(R) * size_t(total)));
  if (scratch == nullptr) return false;
  R* ap = scratch;
  R* bp = ap + a_elems;
  R* acc = bp + b_elems;

  const int64_t a_tile = kPlanes * p.k * mt, b_tile = kPlanes * p.k * nt;
  const int64_t acc_tile = kPlanes * mt * nt;
  // Remember which matrices are packed: a broadcast operand is packed once.
  int64_t packed_a = -1, packed_b = -1;

  NestCursor out;
  out.Seek(p.out, p.num_out, begin);
  NestCursor red;
  for (int64_t o = begin; o < end; ++o, out.Next()) {
    for (int64_t x = 0; x < acc_elems; ++x) acc[x] = R(0);
    if (p.num_reduced > 0 && p.k > 0) {
      red.Seek(p.red, p.num_red, 0);
      for (int64_t r = 0; r < p.num_reduced; ++r, red.Next()) {
        const int64_t ao = out.a + red.a, bo = out.b + red.b;
        if (ao != packed_a) {
          PackPanel<D>(a, ao, p.m, p.k, p.a_rs, p.a_cs, p.conj_a, mt, ap);
          packed_a = ao;
        }
        if (bo != packed_b) {
          PackPanel<D>(b, bo, p.n, p.k, p.b_cs, p.b_rs, p.conj_b, nt, bp);
          packed_b = bo;
        }
        for (int64_t ti = 0; ti < mtiles; ++ti)
          for (int64_t tj = 0; tj < ntiles; ++tj)
            micro(p.k, ap + ti * a_tile, bp + tj * b_tile, acc + (ti * ntiles + tj) * acc_tile);
      }
    }
    // Store the valid part of each tile.
    for (int64_t ti = 0; ti < mtiles; ++ti) {
      for (int64_t tj = 0; tj < ntiles; ++tj) {
        const R* t = acc + (ti * ntiles + tj) * acc_tile;
        const int64_t i_end = p.m - ti * mt < mt ? p.m - ti * mt : mt;
        const int64_t j_end = p.n - tj * nt < nt ? p.n - tj * nt : nt;
        for (int64_t i = 0; i < i_end; ++i) {
          for (int64_t j = 0; j < j_end; ++j) {
            const int64_t idx = out.c + (ti * mt + i) * p.c_rs + (tj * nt + j) * p.c_cs;
            if constexpr (kC) {
              T::Store(c, 2 * idx, t[i * nt + j]);
              T::Store(c, 2 * idx + 1, t[mt * nt + i * nt + j]);
            } else {
              T::Store(c, idx, t[i * nt + j]);
            }
          }
        }
      }
    }
  }
  free(scratch);
  return true;
}

}  // namespace

#define SMALLMM_CAT2(a, b) a##b
#define SMALLMM_CAT(a, b) SMALLMM_CAT2(a, b)
using RunFn = bool (*)(const GemmPlan&, const void*, const void*, void*, int64_t, int64_t);
// Indexed by DType.
extern const RunFn SMALLMM_CAT(kRunTable_, SMALLMM_ISA)[int(DType::kNumDTypes)];
const RunFn SMALLMM_CAT(kRunTable_, SMALLMM_ISA)[int(DType::kNumDTypes)] = {
    &Run<DType::kHalf>,   &Run<DType::kBFloat16>,  &Run<DType::kFloat>,
    &Run<DType::kDouble>, &Run<DType::kComplex64>, &Run<DType::kComplex128>};

}  // namespace smallmm
