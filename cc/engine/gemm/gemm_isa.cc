// The batched small-GEMM kernels. This file is compiled once per instruction set
// (setup.py: -DSMALLMM_ISA=avx512 / avx2 / baseline with the matching -m flags) and the
// dispatcher (../isa.cc) picks one table at run time, so the shipped library runs on any
// x86-64.
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
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#if defined(__SSE2__)
#include <immintrin.h>  // static inline intrinsics only: nothing here can leak as a COMDAT
#endif

#include "cc/engine/float16_bits.h"
#include "cc/engine/gemm/gemm_kernels.h"
#include "cc/engine/smallmm.h"

#ifndef SMALLMM_ISA
#error "compile with -DSMALLMM_ISA=<name>"
#endif

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

// ---------------------------------------------------------------- micro-kernels
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
  bool stream;  // store the finished tile with non-temporal stores (see Run)
};

template <typename R, int L>
struct VecOf {
  typedef R type __attribute__((vector_size(sizeof(R) * L)));
};

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

// Outputs at least this large are written with non-temporal stores where whole lines
// are stored at once (bigger than the last-level cache share of a core, so the consumer
// reads them back from memory anyway).
constexpr uint64_t kStreamBytes = uint64_t(16) << 20;

// Non-temporal store of one whole cache line: the line goes to memory without first
// being read into the cache (a normal store to a line not in cache reads it: a second
// memory transfer) and without evicting the operands. Used for outputs far larger than the
// cache, which the consumer reads back from memory anyway. Partial lines would be
// written back piecemeal, so anything but a 64-byte vector at a 64-byte boundary takes a
// normal store.
template <typename V, typename R>
inline void StreamVec(R* p, const V& v) {
#if defined(__SSE2__)
  if constexpr (sizeof(V) == 64) {
    if (reinterpret_cast<uintptr_t>(p) % 64 == 0) {
      char* dst = reinterpret_cast<char*>(p);
#if defined(__AVX512F__)
      __m512i x;
      memcpy(&x, &v, 64);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), x);
#elif defined(__AVX__)
      __m256i x[2];
      memcpy(x, &v, 64);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), x[0]);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 32), x[1]);
#else
      __m128i x[4];
      memcpy(x, &v, 64);
      for (int q = 0; q < 4; ++q) _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16 * q), x[q]);
#endif
      return;
    }
  }
#endif
  StoreVec(p, v);
}

// Orders earlier non-temporal stores before whatever the caller does next (they are
// weakly ordered: another thread reading C must see them).
inline void StreamFence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

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
        for (int v = 0; v < L; ++v) c[s * L + v] += sp[l * s_ls + s * s_ss] * vp[l * v_ls + v * v_vs];
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

// Run-time size -> index into kTileSizes (smallmm.h).
constexpr int kNumTiles = kNumTileSizes;
inline int TileClass(int64_t n) {
  if (n <= 4) return n <= 1 ? 0 : int(n - 1);
  return n <= 8 ? 4 : 5;
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

template <typename R, bool C, int MI, int kCol>
struct MicroRow {
  static constexpr MicroFn<R, C> fns[kNumTiles] = {
      MicroFor<R, C, kTileSizes[MI], 1, kCol>(), MicroFor<R, C, kTileSizes[MI], 2, kCol>(),
      MicroFor<R, C, kTileSizes[MI], 3, kCol>(), MicroFor<R, C, kTileSizes[MI], 4, kCol>(),
      MicroFor<R, C, kTileSizes[MI], 8, kCol>(), MicroFor<R, C, kTileSizes[MI], 16, kCol>()};
};

template <typename R, bool C, int kCol>
MicroFn<R, C> SelectMicroMode(int mi, int ni) {
  switch (mi) {
    case 0: return MicroRow<R, C, 0, kCol>::fns[ni];
    case 1: return MicroRow<R, C, 1, kCol>::fns[ni];
    case 2: return MicroRow<R, C, 2, kCol>::fns[ni];
    case 3: return MicroRow<R, C, 3, kCol>::fns[ni];
    case 4: return MicroRow<R, C, 4, kCol>::fns[ni];
    default: return MicroRow<R, C, 5, kCol>::fns[ni];
  }
}

template <typename R, bool C>
MicroFn<R, C> SelectMicro(int mi, int ni, bool col, bool scalar_in_place) {
  if constexpr (C) {
    return SelectMicroMode<R, C, 0>(mi, ni);
  } else {
    switch (int(col) | (int(scalar_in_place) << 1)) {
      case 0: return SelectMicroMode<R, C, 0>(mi, ni);
      case 1: return SelectMicroMode<R, C, 1>(mi, ni);
      case 2: return SelectMicroMode<R, C, 2>(mi, ni);
      default: return SelectMicroMode<R, C, 3>(mi, ni);
    }
  }
}

// ---------------------------------------------------------------- packing
// Packs op(X) restricted to a [rows × k] panel (rows = M for A, N for B; for B the
// roles of the strides are swapped by the caller) into tiles [tile][l][width] (+ imag
// plane per tile). Every tile is `tile` wide except the last, which is `edge` wide (the
// smallest tile size that holds the remaining rows), zero-padded.
template <DType D>
void PackPanel(const void* x, int64_t off, int64_t rows, int64_t k, int64_t row_stride,
               int64_t k_stride, bool conj, int tile, int edge, typename Traits<D>::R* out) {
  using T = Traits<D>;
  using R = typename T::R;
  constexpr int kPlanes = T::kComplex ? 2 : 1;
  constexpr int kElem = T::kComplex ? 2 : 1;  // storage scalars per element
  const int64_t ntiles = (rows + tile - 1) / tile;
  const R sign = conj ? R(-1) : R(1);
  // Walk memory in its own order (the smaller stride innermost): a folded batch axis can
  // make one of the strides huge, and crossing a page per element thrashes the TLB.
  const bool rows_inner = !(k_stride >= 0 && row_stride >= 0 && k_stride < row_stride);
  for (int64_t t = 0; t < ntiles; ++t) {
    R* dst = out + t * kPlanes * k * tile;
    const int64_t r0 = t * tile;
    const int64_t w = t == ntiles - 1 ? edge : tile;
    const int64_t valid = rows - r0 < w ? rows - r0 : w;
    auto put = [&](int64_t i, int64_t l) {
      const int64_t idx = kElem * (off + (r0 + i) * row_stride + l * k_stride);
      dst[l * w + i] = T::Load(x, idx);
      if constexpr (T::kComplex) dst[k * w + l * w + i] = sign * T::Load(x, idx + 1);
    };
    if (rows_inner) {
      for (int64_t l = 0; l < k; ++l)
        for (int64_t i = 0; i < valid; ++i) put(i, l);
    } else {
      for (int64_t i = 0; i < valid; ++i)
        for (int64_t l = 0; l < k; ++l) put(i, l);
    }
    for (int64_t l = 0; l < k; ++l) {
      for (int64_t i = valid; i < w; ++i) {
        dst[l * w + i] = R(0);
        if constexpr (T::kComplex) dst[k * w + l * w + i] = R(0);
      }
    }
  }
}

// Writes the valid rows × cols of an accumulator tile to C, in C's own memory order.
template <DType D>
void StoreTile(const typename Traits<D>::R* t, int mt, int nt, bool col, int64_t rows,
               int64_t cols, void* c, int64_t off, int64_t rs, int64_t cs) {
  using T = Traits<D>;
  const int64_t ti = col ? 1 : nt, tj = col ? mt : 1;
  auto put = [&](int64_t i, int64_t j) {
    const int64_t idx = off + i * rs + j * cs;
    if constexpr (T::kComplex) {
      T::Store(c, 2 * idx, t[i * ti + j * tj]);
      T::Store(c, 2 * idx + 1, t[mt * nt + i * ti + j * tj]);
    } else {
      T::Store(c, idx, t[i * ti + j * tj]);
    }
  };
  if (rs >= 0 && cs >= 0 && rs < cs) {
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = 0; i < rows; ++i) put(i, j);
  } else {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) put(i, j);
  }
}

// ---------------------------------------------------------------- tiny products
// M, N, K <= 4 with real types and no reduction: packing would cost more than the product
// itself, so each product is computed straight from memory with compile-time sizes (fully
// unrolled, operands in registers), walking a run of the innermost batch loop.
constexpr int kTinyMax = 4;

template <DType D, int M, int N, int K>
void TinyRun(const GemmPlan& p, const void* a, const void* b, void* c, int64_t count,
             int64_t ao, int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc) {
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

template <DType D>
using TinyFn = void (*)(const GemmPlan&, const void*, const void*, void*, int64_t, int64_t,
                        int64_t, int64_t, int64_t, int64_t, int64_t);

template <DType D, int M, int N>
struct TinyRow {
  static constexpr TinyFn<D> fns[kTinyMax] = {&TinyRun<D, M, N, 1>, &TinyRun<D, M, N, 2>,
                                              &TinyRun<D, M, N, 3>, &TinyRun<D, M, N, 4>};
};

template <DType D, int M>
TinyFn<D> SelectTinyN(int n, int k) {
  switch (n) {
    case 1: return TinyRow<D, M, 1>::fns[k - 1];
    case 2: return TinyRow<D, M, 2>::fns[k - 1];
    case 3: return TinyRow<D, M, 3>::fns[k - 1];
    default: return TinyRow<D, M, 4>::fns[k - 1];
  }
}

template <DType D>
TinyFn<D> SelectTiny(const GemmPlan& p) {
  if (Traits<D>::kComplex || p.num_reduced != 1 || p.m < 1 || p.n < 1 || p.k < 1 ||
      p.m > kTinyMax || p.n > kTinyMax || p.k > kTinyMax) {
    return nullptr;
  }
  if constexpr (Traits<D>::kComplex) {
    return nullptr;
  } else {
    switch (p.m) {
      case 1: return SelectTinyN<D, 1>(int(p.n), int(p.k));
      case 2: return SelectTinyN<D, 2>(int(p.n), int(p.k));
      case 3: return SelectTinyN<D, 3>(int(p.n), int(p.k));
      default: return SelectTinyN<D, 4>(int(p.n), int(p.k));
    }
  }
}

// ---------------------------------------------------------------- matrix-vector products
// N = 1 with contiguous rows of A and a contiguous vector (float/double, no reduction):
// each output element is a dot product along K, vectorised along K, so A is streamed once
// in its own layout instead of being transposed into a packed panel.
template <DType D>
void DotRun(const GemmPlan& p, const void* a, const void* b, void* c, int64_t count,
            int64_t ao, int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc) {
  using R = typename Traits<D>::R;
  constexpr int L = 64 / sizeof(R);
  using V = typename VecOf<R, L>::type;
  const R* A = static_cast<const R*>(a);
  const R* X = static_cast<const R*>(b);
  R* C = static_cast<R*>(c);
  const int64_t m = p.m, k = p.k, ars = p.a_rs, crs = p.c_rs;
  const int64_t kv = k - k % L;
  for (int64_t t = 0; t < count; ++t, ao += sa, bo += sb, co += sc) {
    const R* x = X + bo;
    for (int64_t i = 0; i < m; ++i) {
      const R* row = A + ao + i * ars;
      V acc = V{};
      for (int64_t l = 0; l < kv; l += L) {
        V va, vx;
        memcpy(&va, row + l, sizeof(V));
        memcpy(&vx, x + l, sizeof(V));
        acc += va * vx;
      }
      R sum = R(0);
      for (int v = 0; v < L; ++v) sum += acc[v];
      for (int64_t l = kv; l < k; ++l) sum += row[l] * x[l];
      C[co + i * crs] = sum;
    }
  }
}

template <DType D>
bool UseDot(const GemmPlan& p) {
  return (D == DType::kFloat || D == DType::kDouble) && p.n == 1 && p.num_reduced == 1 &&
         p.a_cs == 1 && p.b_rs == 1 && p.k >= 8 && p.m >= 1;
}

// ---------------------------------------------------------------- operand-stationary products
// Short K (<= 24 with AVX-512, <= 8 otherwise) and C contiguous along one side: the operand on that side stays in
// registers, one K-vector strip at a time, while the other operand streams past it one
// column (or row) at a time, each finished column going straight to C. Nothing is
// packed, and each output line is written once, whole. Column kernel (C contiguous along
// M): the strip is VL rows of A, the stream is B's columns. Row kernel: the strip is VL
// columns of B, the stream is A's rows. The capsule prediction (160×8 · 8×50 per input
// capsule) and 8×8 · 8×64 products are this shape.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kVecRegs = 32;
#elif defined(__AVX__)
constexpr int kVecBytes = 32, kVecRegs = 16;
#else
constexpr int kVecBytes = 16, kVecRegs = 16;
#endif
// The strip needs K registers plus four accumulators and a broadcast: 24 + 5 of AVX-512's
// 32 (20×20×20 products: 5.2 -> 3.5 ms single-threaded against the packed micro-kernels);
// 8 + 5 of AVX2's 16.
constexpr int kStationaryMaxK = kVecRegs == 32 ? 24 : kVecRegs / 2;

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
  if constexpr (D == DType::kFloat || D == DType::kDouble) {
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
    const typename Lanes<typename Traits<D>::R, W>::type* __restrict sv, const void* x,
    int64_t xo, int64_t x_ls, int64_t x_js, void* out, int64_t oo, int64_t o_js,
    int64_t count, bool stream) {
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
                     int64_t xo, int64_t x_ls, int64_t x_js, void* out, int64_t oo,
                     int64_t o_js, int64_t count, bool stream) {
  using T = Traits<D>;
  using R = typename T::R;
  using V = typename Lanes<R, W>::type;
  V sv[K];
  bool loaded = false;
  if constexpr (D == DType::kFloat || D == DType::kDouble) {
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
                    int64_t xo, int64_t x_ls, int64_t x_js, void* out, int64_t oo,
                    int64_t o_js, int64_t rows, int64_t count, bool stream) {
  using R = typename Traits<D>::R;
  int64_t v = 0;
  constexpr bool kWidest = W * sizeof(R) == kVecBytes;
  for (; v + W <= rows && (kWidest || v == 0); v += W) {
    StationaryStrip<D, W, K>(s, so + v * s_vs, s_vs, s_ls, x, xo, x_ls, x_js, out, oo + v,
                             o_js, count, stream);
  }
  if constexpr (W > 1) {
    if (v < rows) {
      StationaryRows<D, W / 2, K>(s, so + v * s_vs, s_vs, s_ls, x, xo, x_ls, x_js, out,
                                  oo + v, o_js, rows - v, count, stream);
    }
  }
}

// Which kernel suits C: the column kernel when C's columns are contiguous, the row kernel
// when its rows are; each needs enough streamed columns (rows) to pay for loading the
// strip, and a strip side that is a vector.
inline bool ColumnKernelFits(const GemmPlan& p) { return p.c_rs == 1 && p.n >= 8 && p.m >= 4; }
inline bool RowKernelFits(const GemmPlan& p) { return p.c_cs == 1 && p.m >= 8 && p.n >= 4; }

template <DType D>
bool UseStationary(const GemmPlan& p) {
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
      StationaryRows<D, VL, K>(a, ao, p.a_rs, p.a_cs, b, bo, p.b_rs, p.b_cs, c, co, p.c_cs,
                               p.m, p.n, stream);
    } else {
      StationaryRows<D, VL, K>(b, bo, p.b_cs, p.b_rs, a, ao, p.a_cs, p.a_rs, c, co, p.c_rs,
                               p.n, p.m, stream);
    }
  }
}

template <DType D, int... Ks>
struct StationaryTable {
  static constexpr TinyFn<D> fns[sizeof...(Ks)] = {&StationaryRun<D, Ks>...};
};

template <DType D>
TinyFn<D> SelectStationary(const GemmPlan& p) {
  if constexpr (!Traits<D>::kComplex) {
    if (!UseStationary<D>(p)) return nullptr;
#if defined(__AVX512F__)
    return StationaryTable<D, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                           20, 21, 22, 23, 24>::fns[p.k - 1];
#else
    return StationaryTable<D, 1, 2, 3, 4, 5, 6, 7, 8>::fns[p.k - 1];
#endif
  } else {
    return nullptr;
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

constexpr int64_t kNearStride = 1024;  // elements
// a * b + c for scratch sizes; false on int64 overflow.
inline bool MulAdd(int64_t a, int64_t b, int64_t c, int64_t* out) {
  int64_t ab;
  return !__builtin_mul_overflow(a, b, &ab) && !__builtin_add_overflow(ab, c, out);
}

// Software prefetch of one operand panel X[off + r*rs + l*ls] (r < rows, l < k). A batch
// axis folded into K or N puts every K step (or column) of a panel on its own page, often
// dozens of them: more concurrent streams than the hardware prefetchers follow, so each
// line would be a demand miss. Prefetching the next product's panels while computing
// this one overlaps those misses with work. Panels over kPrefetchMaxBytes are left alone.
constexpr int64_t kPrefetchMaxBytes = 64 << 10;

template <DType D>
void PrefetchPanel(const void* x, int64_t off, int64_t rows, int64_t k, int64_t rs,
                   int64_t ls) {
  constexpr int64_t kBytes = DTypeInfo<D>::kBytes;
  auto mag = [](int64_t v) { return v < 0 ? -v : v; };
  int64_t n_in = rows, s_in = rs, n_out = k, s_out = ls;
  if (mag(ls) < mag(rs)) {
    n_in = k, s_in = ls, n_out = rows, s_out = rs;
  }
  if (s_in == 0) n_in = 1;
  if (s_out == 0) n_out = 1;
  // Only panels spread over pages, and small enough to sit in L1/L2 until used.
  int64_t bytes;
  if (n_in <= 0 || n_out <= 0 || mag(s_out) < kNearStride ||
      __builtin_mul_overflow(n_in, n_out, &bytes) ||
      __builtin_mul_overflow(bytes, kBytes, &bytes) || bytes > kPrefetchMaxBytes) {
    return;
  }
  const int64_t step = mag(s_in) * kBytes < 64 ? 64 / (mag(s_in) * kBytes) : 1;
  const char* base = static_cast<const char*>(x);
  for (int64_t o = 0; o < n_out; ++o) {
    const char* row = base + (off + o * s_out) * kBytes;
    for (int64_t i = 0; i < n_in; i += step) __builtin_prefetch(row + i * s_in * kBytes);
    __builtin_prefetch(row + (n_in - 1) * s_in * kBytes);  // a run may end on a new line
  }
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

  TinyFn<D> run_fn = SelectTiny<D>(p);
  if (run_fn == nullptr && UseDot<D>(p)) run_fn = &DotRun<D>;
  if (run_fn == nullptr) run_fn = SelectStationary<D>(p);
  if (run_fn != nullptr) {
    // Direct kernels (tiny products, dot products) walk runs of the innermost output
    // loop: one Seek per run, not per product.
    const Loop inner = p.num_out > 0 ? p.out[p.num_out - 1] : Loop{1, 0, 0, 0};
    NestCursor out;
    for (int64_t o = begin; o < end;) {
      out.Seek(p.out, p.num_out, o);
      const int64_t pos = p.num_out > 0 ? out.idx[p.num_out - 1] : 0;
      const int64_t count = inner.size - pos < end - o ? inner.size - pos : end - o;
      run_fn(p, a, b, c, count, out.a, inner.a, out.b, inner.b, out.c, inner.c);
      o += count;
    }
    return true;
  }

  // Tiles: whole mt×nt tiles, and along each side a last "edge" tile of the smallest
  // tile size that holds the rest (M = 20 is a 16-tile and a 4-tile, not two 16-tiles).
  constexpr bool kInPlace = D == DType::kFloat || D == DType::kDouble;
  auto near = [](int64_t stride) { return stride > -kNearStride && stride < kNearStride; };
  int mi = TileClass(p.m), ni = TileClass(p.n);
  if (kInPlace && !kC) {
    // A broadcast (scalar) side read in place takes one pointer per accumulator; when
    // its lines are pages apart (a batch folded into N or M: the capsule's du = Wᵀ·dû
    // reads 50 columns of dû 737 KB apart) 16 pointers do not fit in registers and the
    // kernel spills every step. Four do.
    const bool col0 = ColumnMode(kTileSizes[mi], kTileSizes[ni], kC, p.c_rs, p.c_cs);
    if (col0 && !near(p.b_cs) && near(p.b_rs) && ni > 3) ni = 3;
    if (!col0 && !near(p.a_rs) && near(p.a_cs) && mi > 3) mi = 3;
  }
  const int mt = kTileSizes[mi], nt = kTileSizes[ni];
  const int64_t mtiles = (p.m + mt - 1) / mt, ntiles = (p.n + nt - 1) / nt;
  const int64_t mfull = p.m / mt, nfull = p.n / nt;
  const int mte = p.m % mt ? kTileSizes[TileClass(p.m % mt)] : mt;
  const int nte = p.n % nt ? kTileSizes[TileClass(p.n % nt)] : nt;
  auto mw = [&](int64_t ti) { return ti < mfull ? mt : mte; };
  auto nw = [&](int64_t tj) { return tj < nfull ? nt : nte; };
  const bool col = ColumnMode(mt, nt, kC, p.c_rs, p.c_cs);
  // Pack-free paths (float/double): an operand that fills its tiles exactly is read in place when the micro-kernel can (vector side: contiguous lanes); a full
  // output tile is written straight to C when there is nothing to accumulate across.
  // "Whole": every tile, the edge included, is exactly filled (M = 20 = 16 + 4 is; 12 is not).
  const bool whole_m = p.m % mt == 0 || mte == p.m % mt;
  const bool whole_n = p.n % nt == 0 || nte == p.n % nt;
  // A K step of a page or more (a batch axis folded into K) makes every step a new,
  // unprefetched line: pack those operands (packing streams them in memory order).
  const bool direct_a = kInPlace && whole_m && (!col || p.a_rs == 1) && near(p.a_cs);
  const bool direct_b = kInPlace && whole_n && (col || p.b_cs == 1) && near(p.b_rs);
  const bool scalar_in_place = col ? direct_b : direct_a;
  // [M edge?][N edge?]
  const MicroFn<R, kC> micros[2][2] = {
      {SelectMicro<R, kC>(mi, ni, col, scalar_in_place),
       SelectMicro<R, kC>(mi, TileClass(nte), col, scalar_in_place)},
      {SelectMicro<R, kC>(TileClass(mte), ni, col, scalar_in_place),
       SelectMicro<R, kC>(TileClass(mte), TileClass(nte), col, scalar_in_place)}};
  auto micro = [&](int64_t ti, int64_t tj, const TileArgs<R>& t, bool accumulate) {
    micros[ti >= mfull][tj >= nfull](p.k, t, accumulate);
  };

  // Scratch: packed A, packed B, accumulators; one allocation per call (a call covers a
  // whole shard). For dense operands (TF tensors) this is bounded by the inputs' own
  // sizes, but a stride-0 view can have a huge K in no memory at all, so the sizes are
  // overflow-checked and a failed allocation is reported, never ignored. Without
  // reduction loops one accumulator tile suffices (each tile is stored as soon as it is
  // done); with them, all tiles accumulate across the reduction.
  const bool reducing = p.num_reduced > 1 && p.k > 0;  // K = 0: zeros, whatever the batch
  const int64_t acc_tile = kPlanes * mt * nt;
  int64_t a_elems, b_elems, acc_elems, total;
  if (!MulAdd(mtiles * mt * kPlanes, p.k, 0, &a_elems) ||
      !MulAdd(ntiles * nt * kPlanes, p.k, 0, &b_elems) ||
      !MulAdd(reducing ? mtiles * ntiles : 1, acc_tile, 1, &acc_elems) ||
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
  const bool direct_c = kInPlace && !reducing && (col ? p.c_rs == 1 : p.c_cs == 1);
  // An output far larger than the last-level cache is evicted before anyone reads it:
  // write it with non-temporal stores (saves the read-for-ownership of every line).
  const bool stream_c = direct_c && uint64_t(p.output_elements) * sizeof(R) >= kStreamBytes;
  const R* a_mem = static_cast<const R*>(a);
  const R* b_mem = static_cast<const R*>(b);
  R* c_mem = static_cast<R*>(c);
  // Remember which matrices are packed: a broadcast operand is packed once.
  int64_t packed_a = -1, packed_b = -1;
  auto pack = [&](int64_t ao, int64_t bo) {
    if (!direct_a && ao != packed_a) {
      PackPanel<D>(a, ao, p.m, p.k, p.a_rs, p.a_cs, p.conj_a, mt, mte, ap);
      packed_a = ao;
    }
    if (!direct_b && bo != packed_b) {
      PackPanel<D>(b, bo, p.n, p.k, p.b_cs, p.b_rs, p.conj_b, nt, nte, bp);
      packed_b = bo;
    }
  };
  // The views of tile (ti, tj) for operands at offsets ao, bo, accumulating into `tile`.
  auto args = [&](int64_t ti, int64_t tj, int64_t ao, int64_t bo, R* tile) {
    TileArgs<R> t;
    if (direct_a) {
      t.a = a_mem + ao + ti * mt * p.a_rs;
      t.a_ls = p.a_cs;
      t.a_is = p.a_rs;
    } else {
      t.a = ap + ti * a_tile;
      t.a_ls = mw(ti);
      t.a_is = 1;
    }
    if (direct_b) {
      t.b = b_mem + bo + tj * nt * p.b_cs;
      t.b_ls = p.b_rs;
      t.b_js = p.b_cs;
    } else {
      t.b = bp + tj * b_tile;
      t.b_ls = nw(tj);
      t.b_js = 1;
    }
    t.out = tile;
    t.stream = false;
    t.o_is = col ? 1 : nw(tj);
    t.o_js = col ? mw(ti) : 1;
    return t;
  };
  auto store = [&](const R* t, int64_t ti, int64_t tj, int64_t c_off) {
    const int64_t rows = p.m - ti * mt < mt ? p.m - ti * mt : mt;
    const int64_t cols = p.n - tj * nt < nt ? p.n - tj * nt : nt;
    StoreTile<D>(t, mw(ti), nw(tj), col, rows, cols, c,
                 c_off + ti * mt * p.c_rs + tj * nt * p.c_cs, p.c_rs, p.c_cs);
  };

  // The next product's operands, to prefetch (see PrefetchPanel).
  auto prefetch = [&](int64_t ao, int64_t bo) {
    PrefetchPanel<D>(a, ao, p.m, p.k, p.a_rs, p.a_cs);
    PrefetchPanel<D>(b, bo, p.n, p.k, p.b_cs, p.b_rs);
  };
  NestCursor out;
  out.Seek(p.out, p.num_out, begin);
  NestCursor red;
  for (int64_t o = begin; o < end; ++o, out.Next()) {
    if (!reducing && o + 1 < end) {
      NestCursor next = out;
      next.Next();
      prefetch(next.a, next.b);
    }
    if (!reducing) {
      // One product per output (num_reduced is 1, or 0: an empty sum gives zeros).
      const bool empty = p.num_reduced == 0 || p.k == 0;
      if (!empty) pack(out.a, out.b);  // size-1 reduction loops were simplified away
      for (int64_t ti = 0; ti < mtiles; ++ti) {
        for (int64_t tj = 0; tj < ntiles; ++tj) {
          if (empty) {
            for (int64_t x = 0; x < acc_tile; ++x) acc[x] = R(0);
            store(acc, ti, tj, out.c);
            continue;
          }
          TileArgs<R> t = args(ti, tj, out.a, out.b, acc);
          // Exactly filled (whole tile, or an edge tile of exactly the remaining size).
          const bool full = ti * mt + mw(ti) <= p.m && tj * nt + nw(tj) <= p.n;
          if (direct_c && full) {
            t.out = c_mem + out.c + ti * mt * p.c_rs + tj * nt * p.c_cs;
            t.o_is = p.c_rs;
            t.o_js = p.c_cs;
            t.stream = stream_c;
            micro(ti, tj, t, false);
          } else {
            micro(ti, tj, t, false);
            store(acc, ti, tj, out.c);
          }
        }
      }
      continue;
    }
    red.Seek(p.red, p.num_red, 0);
    for (int64_t r = 0; r < p.num_reduced; ++r, red.Next()) {
      const int64_t ao = out.a + red.a, bo = out.b + red.b;
      if (r + 1 < p.num_reduced) {
        NestCursor next = red;
        next.Next();
        prefetch(out.a + next.a, out.b + next.b);
      }
      pack(ao, bo);
      for (int64_t ti = 0; ti < mtiles; ++ti)
        for (int64_t tj = 0; tj < ntiles; ++tj)
          micro(ti, tj, args(ti, tj, ao, bo, acc + (ti * ntiles + tj) * acc_tile), r > 0);
    }
    for (int64_t ti = 0; ti < mtiles; ++ti)
      for (int64_t tj = 0; tj < ntiles; ++tj) store(acc + (ti * ntiles + tj) * acc_tile, ti, tj, out.c);
  }
  if (stream_c) StreamFence();
  free(scratch);
  return true;
}

}  // namespace

#define SMALLMM_CAT2(a, b) a##b
#define SMALLMM_CAT(a, b) SMALLMM_CAT2(a, b)
// This ISA's entry of the dispatcher's table (../isa.cc).
extern const GemmKernels SMALLMM_CAT(kGemmKernels_, SMALLMM_ISA);
const GemmKernels SMALLMM_CAT(kGemmKernels_, SMALLMM_ISA) = {{
#define SMALLMM_RUN_ENTRY(e, name, bytes, S, A) &Run<DType::e>,
    SMALLMM_DTYPES(SMALLMM_RUN_ENTRY)
#undef SMALLMM_RUN_ENTRY
}};

}  // namespace smallmm
