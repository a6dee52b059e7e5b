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
// suit both. Complex types vectorise the same way over packed planes (MicroComplex).

// Column vectors when C's columns are contiguous (the tile then goes to C with vector
// stores), row vectors when its rows are; otherwise along the longer tile side. A side
// of 1 or 3 is not a vector, so the other side wins when it is one.
bool ColumnMode(int mt, int nt, int64_t c_rs, int64_t c_cs) {
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

// Complex: packed operands with split real / imaginary planes (A's imaginary plane at
// a + k·MT, B's at b + k·NT) and the tile's imaginary plane at out + MT·NT. Vectorised as
// MicroReal (the vector side's lanes contiguous in the tile, kAlongM: along M), with two
// accumulator planes per line: each K step loads the vector side's two planes and runs four
// broadcast FMAs per accumulator pair, cr += sr·vr − si·vi and ci += sr·vi + si·vr (the
// builds without FMA add each pair's two products first, as the scalar loops do).
template <typename R, int MT, int NT, bool kAlongM>
void MicroComplex(int64_t k, const TileArgs<R>& t, bool accumulate) {
  constexpr int L = kAlongM ? MT : NT;  // vector lanes
  constexpr int S = kAlongM ? NT : MT;  // accumulator pairs
  const R* __restrict vp = kAlongM ? t.a : t.b;
  const R* __restrict sp = kAlongM ? t.b : t.a;
  const R* __restrict vpi = vp + k * L;
  const R* __restrict spi = sp + k * S;
  R* __restrict out = t.out;
  R* __restrict out_im = out + MT * NT;
  const int64_t o_ss = kAlongM ? t.o_js : t.o_is, o_vs = kAlongM ? t.o_is : t.o_js;
  if constexpr (L == 1 || L == 3) {  // not a vector size: plain loops
    R cr[S * L], ci[S * L];
    for (int s = 0; s < S; ++s) {
      for (int v = 0; v < L; ++v) {
        cr[s * L + v] = accumulate ? out[s * o_ss + v * o_vs] : R(0);
        ci[s * L + v] = accumulate ? out_im[s * o_ss + v * o_vs] : R(0);
      }
    }
    for (int64_t l = 0; l < k; ++l) {
      for (int s = 0; s < S; ++s) {
        const R sr = sp[l * S + s], si = spi[l * S + s];
        for (int v = 0; v < L; ++v) {
          const R vr = vp[l * L + v], vi = vpi[l * L + v];
          cr[s * L + v] += sr * vr - si * vi;
          ci[s * L + v] += sr * vi + si * vr;
        }
      }
    }
    for (int s = 0; s < S; ++s) {
      for (int v = 0; v < L; ++v) {
        out[s * o_ss + v * o_vs] = cr[s * L + v];
        out_im[s * o_ss + v * o_vs] = ci[s * L + v];
      }
    }
  } else {
    // A line is P vectors of one register (W lanes) each: GCC lowers a wider vector type
    // through the stack (RunPacked gives two registers to tiles of one or two lines).
    constexpr int kRegLanes = kVecBytes / int(sizeof(R));
    constexpr int W = L < kRegLanes ? L : kRegLanes;
    constexpr int P = L / W;
    using V = typename VecOf<R, W>::type;
#if defined(__FMA__)
    // Few lines: each product of a pair sums into an accumulator of its own (the si·
    // products in dr, di), so that every chain along K is one FMA a step, not two
    // (complex128 W[376, 160, 32]ᴴ · g[376, 160, 1], one line a tile: 1.4× faster). Four
    // accumulators a line while they fit in half the registers.
    constexpr bool kSplit = 4 * S * P * sizeof(V) <= (kVecBytes == 64 ? 16 : 8) * kVecBytes;
#else
    constexpr bool kSplit = false;  // the block program's order, below
#endif
    constexpr int SP = kSplit ? S * P : 1;
    V cr[S * P], ci[S * P], dr[SP], di[SP];
#pragma GCC unroll 16
    for (int x = 0; x < S * P; ++x) {
      const int64_t o = x / P * o_ss + x % P * W;
      cr[x] = accumulate ? LoadVec<V>(out + o) : V{};
      ci[x] = accumulate ? LoadVec<V>(out_im + o) : V{};
      if constexpr (kSplit) dr[x] = di[x] = V{};
    }
    for (int64_t l = 0; l < k; ++l) {
      V vr[P], vi[P];
#pragma GCC unroll 4
      for (int q = 0; q < P; ++q) {
        vr[q] = LoadVec<V>(vp + l * L + q * W);
        vi[q] = LoadVec<V>(vpi + l * L + q * W);
      }
      const R* __restrict sl = sp + l * S;
      const R* __restrict sli = spi + l * S;
#pragma GCC unroll 16
      for (int x = 0; x < S * P; ++x) {
        const int s = x / P, q = x % P;
        if constexpr (kSplit) {
          cr[x] += sl[s] * vr[q];
          dr[x] += sli[s] * vi[q];
          ci[x] += sl[s] * vi[q];
          di[x] += sli[s] * vr[q];
        } else {
#if defined(__FMA__)
          cr[x] += sl[s] * vr[q];
          cr[x] -= sli[s] * vi[q];
          ci[x] += sl[s] * vi[q];
          ci[x] += sli[s] * vr[q];
#else
          // The GPU block program's order (cuda/smallmm_gpu_logic.h), which the simulated
          // grid's tests compare with this build bit for bit.
          cr[x] += sl[s] * vr[q] - sli[s] * vi[q];
          ci[x] += sl[s] * vi[q] + sli[s] * vr[q];
#endif
        }
      }
    }
#pragma GCC unroll 16
    for (int x = 0; x < S * P; ++x) {
      if constexpr (kSplit) {
        cr[x] -= dr[x];
        ci[x] += di[x];
      }
      const int64_t o = x / P * o_ss + x % P * W;
      StoreVec(out + o, cr[x]);
      StoreVec(out_im + o, ci[x]);
    }
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

// kMode bit 0: column vectors; bit 1: scalar side read in place (real types only).
template <typename R, bool C, int MT, int NT, int kMode>
constexpr MicroFn<R, C> MicroFor() {
  if constexpr (C) {
    return &MicroComplex<R, MT, NT, (kMode & 1) != 0>;
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
    return col ? MicroFns<R, C, 1>::fns[i] : MicroFns<R, C, 0>::fns[i];
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
