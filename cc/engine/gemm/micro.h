// micro.h — the micro-kernels of the "packed" family (packed.h): one MT×NT output tile
// per call, with compile-time tile sizes from kTileSizes (smallmm.h) so the compiler fully
// unrolls them and keeps the accumulators in vector registers; K is a run-time loop.
// Included only by gemm_isa.cc (compiled once per ISA and dtype): everything has internal linkage,
// see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_MICRO_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_MICRO_H_

#include <cstdint>
#include <utility>

#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/streaming.h"

namespace smallmm {
namespace {

// One MT×NT output tile: out (+)= Σ_l A[:, l] ⊗ B[l, :] (overwrites unless `accumulate`).
// The operands and the output are strided views, so a micro-kernel reads the caller's
// matrices directly when their layout suits (no packing), or packed panels:
//   A(i, l) = a[l*a_ls + i*a_is], B(l, j) = b[l*b_ls + j*b_js], out(i, j) = out[i*o_is + j*o_js].
//
// Real types vectorise along the longer tile side with GCC vector extensions (lowered to
// zmm / ymm / xmm by each ISA build): with MT > NT the accumulators are MT-lane column
// vectors (needs a_is = 1 and o_is = 1); otherwise NT-lane row vectors (needs b_js = 1 and
// o_js = 1). Each k step is one vector load and MT or NT broadcast-FMAs with every
// accumulator in a register. ColumnMode picks the direction per problem; packed panels
// suit both.

// Column vectors when C's columns are contiguous (the tile then goes to C with vector
// stores), row vectors when its rows are; otherwise along the longer tile side. A side
// of 1 or 3 is not a vector, so the other side wins when it is one. Complex: row-major.
bool ColumnMode(int mt, int nt, bool complex, int64_t c_rs, int64_t c_cs) {
  if (complex) return false;
  auto vec = [](int t) { return t != 1 && t != 3; };
  if (vec(mt) != vec(nt)) return vec(mt);
  if (c_rs == 1 && c_cs != 1) return true;
  if (c_cs == 1 && c_rs != 1) return false;
  return mt > nt;
}

template <typename R>
struct TileArgs {
  const R* a;
  int64_t a_ls, a_is;
  const R* b;
  int64_t b_ls, b_js;
  R* out;
  int64_t o_is, o_js;
  bool stream;  // store the finished tile with non-temporal stores (see RunPacked)
};

template <typename R, int MT, int NT, bool kAlongM, bool kScalarPacked>
void MicroReal(int64_t k, const TileArgs<R>& t, bool accumulate) {
  constexpr int L = kAlongM ? MT : NT;  // vector lanes
  constexpr int S = kAlongM ? NT : MT;  // accumulators
  const R* __restrict vp = kAlongM ? t.a : t.b;
  const int64_t v_ls = kAlongM ? t.a_ls : t.b_ls;
  // The broadcast (scalar) side: a packed panel [l][S] (compile-time strides keep the
  // FMA addresses simple) or the caller's matrix in place.
  const R* __restrict sp = kAlongM ? t.b : t.a;
  const int64_t s_ls = kScalarPacked ? S : (kAlongM ? t.b_ls : t.a_ls);
  const int64_t s_ss = kScalarPacked ? 1 : (kAlongM ? t.b_js : t.a_is);
  R* __restrict out = t.out;
  const int64_t o_ss = kAlongM ? t.o_js : t.o_is, o_vs = kAlongM ? t.o_is : t.o_js;
  const int64_t v_vs = kAlongM ? t.a_is : t.b_js;
  if constexpr (L == 1 || L == 3) {  // not a vector size: plain loops
    R c[S * L];
    for (int s = 0; s < S; ++s)
      for (int v = 0; v < L; ++v) c[s * L + v] = accumulate ? out[s * o_ss + v * o_vs] : R(0);
    for (int64_t l = 0; l < k; ++l)
      for (int s = 0; s < S; ++s)
        for (int v = 0; v < L; ++v)
          c[s * L + v] += sp[l * s_ls + s * s_ss] * vp[l * v_ls + v * v_vs];
    for (int s = 0; s < S; ++s)
      for (int v = 0; v < L; ++v) out[s * o_ss + v * o_vs] = c[s * L + v];
  } else {
    using V = typename VecOf<R, L>::type;
    // Fully unrolled so every accumulator lives in a register (no stack array).
    V c[S];
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) c[s] = accumulate ? LoadVec<V>(out + s * o_ss) : V{};
    for (int64_t l = 0; l < k; ++l) {
      const V v = LoadVec<V>(vp + l * v_ls);
      const R* __restrict sl = sp + l * s_ls;
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) c[s] += sl[s * s_ss] * v;
    }
    if (t.stream) {
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) StreamVec(out + s * o_ss, c[s]);
    } else {
#pragma GCC unroll 16
      for (int s = 0; s < S; ++s) StoreVec(out + s * o_ss, c[s]);
    }
  }
}

// Complex: always packed operands with split real/imaginary planes (a_im = a + k*MT) and
// a row-major tile (out_im = out + MT*NT).
template <typename R, int MT, int NT>
void MicroComplex(int64_t k, const TileArgs<R>& t, bool accumulate) {
  const R* __restrict ap = t.a;
  const R* __restrict bp = t.b;
  R* __restrict acc = t.out;
  R cr[MT * NT], ci[MT * NT];
  for (int x = 0; x < MT * NT; ++x) {
    cr[x] = accumulate ? acc[x] : R(0);
    ci[x] = accumulate ? acc[MT * NT + x] : R(0);
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

// ---------------------------------------------------------------- the tile table
// Every micro-kernel, generated from the one tile list kTileSizes (smallmm.h): a run-time
// size goes to the smallest tile that holds it (the largest tile for anything longer).
constexpr int kNumTiles = kNumTileSizes;
static_assert(kTileSizes[0] == 1, "every size >= 1 needs a tile");

inline int TileClass(int64_t n) {
  int i = 0;
  while (i + 1 < kNumTiles && kTileSizes[i] < n) ++i;
  return i;
}

template <typename R, bool C>
using MicroFn = void (*)(int64_t, const TileArgs<R>&, bool);

// kMode bit 0: column vectors; bit 1: scalar side read in place.
template <typename R, bool C, int MT, int NT, int kMode>
constexpr MicroFn<R, C> MicroFor() {
  if constexpr (C) {
    return &MicroComplex<R, MT, NT>;
  } else {
    return &MicroReal<R, MT, NT, (kMode & 1) != 0, (kMode & 2) == 0>;
  }
}

// One mode's micro-kernels for every pair of tile sizes, at index mi·kNumTiles + ni.
template <typename R, bool C, int kMode, int... I>
struct MicroTable {
  static constexpr MicroFn<R, C> fns[] = {
      MicroFor<R, C, kTileSizes[I / kNumTiles], kTileSizes[I % kNumTiles], kMode>()...};
};
template <typename R, bool C, int kMode, int... I>
MicroTable<R, C, kMode, I...> MakeMicroTable(std::integer_sequence<int, I...>);  // type only
template <typename R, bool C, int kMode>
using MicroFns =
    decltype(MakeMicroTable<R, C, kMode>(std::make_integer_sequence<int, kNumTiles * kNumTiles>()));

// The micro-kernel for tiles kTileSizes[mi] × kTileSizes[ni].
template <typename R, bool C>
MicroFn<R, C> SelectMicro(int mi, int ni, bool col, bool scalar_in_place) {
  const int i = mi * kNumTiles + ni;
  if constexpr (C) {
    return MicroFns<R, C, 0>::fns[i];
  } else {
    switch (int(col) | (int(scalar_in_place) << 1)) {
      case 0:
        return MicroFns<R, C, 0>::fns[i];
      case 1:
        return MicroFns<R, C, 1>::fns[i];
      case 2:
        return MicroFns<R, C, 2>::fns[i];
      default:
        return MicroFns<R, C, 3>::fns[i];
    }
  }
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_MICRO_H_
