// Fused dynamic-routing kernels (routing.h). Compiled once per instruction set like
// gemm_isa.cc (setup.py: -DSMALLMM_ISA=avx512 / avx2 / baseline with the matching -m
// flags); the one ISA dispatcher (isa.cc) picks the same ISA for the routing and the GEMM
// kernels.
//
// Same rules as gemm_isa.cc: everything lives in an anonymous namespace and no std::
// templates or inline library functions are used (only the C math library's expf / exp /
// sqrt), so no AVX-512 code can be merged into the baseline build as a COMDAT.
//
// Per row, with û [I, J, K] in cache:
//   forward   R passes over û. Pass 0 sums û (c = 1/J). Pass t >= 1 works on blocks of L
//             input capsules (L = vector lanes): agreement logits[i, j] = <û[i, j], Σ_τ<t v_τ[j]>
//             (the logits' running sum, by linearity), a softmax over j vectorised across
//             the block's capsules, then s[j] += c[i, j]·û[i, j].
//   backward  recomputes the forward passes keeping c of every iteration, then R-1
//             backward passes, each per block: gc = <gs[j], û[i, j]>, the softmax backward
//             into the logits' gradient G, and G·û for the previous iteration's dL/dv. A
//             last pass writes dû[i, j] = Σ_t c_t[i, j]·gs_t[j] + Σ_t G_(t+1)[i, j]·v_t[j]
//             once, without reading û (so dû may overwrite it).
// Per-(i, j) scalars (c, G) are stored block-transposed, (i, j) at
// (i / L)·L·J + j·L + i % L, so the softmax runs on whole vectors. The L dot products of a
// block for one j are reduced together by a transposing shuffle tree (TransposeSum):
// ~3 vector instructions per dot instead of ~8 for a horizontal sum each.
// K = 8 and 16 (CapsNet's capsule sizes) have compile-time instantiations; other K use
// scalar dot products with the same layout.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cc/engine/isa.h"
#include "cc/engine/routing.h"

#ifndef SMALLMM_ISA
#error "compile with -DSMALLMM_ISA=<name>"
#endif

// Vectors are passed by value between functions with internal linkage only, so GCC's note
// that such an ABI differs between ISA builds does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace smallmm {
namespace {

inline float Sqrt(float x) { return sqrtf(x); }
inline double Sqrt(double x) { return sqrt(x); }

// K as a compile-time constant when KT > 0.
template <int KT>
inline int64_t Dim(int64_t k) {
  return KT > 0 ? KT : k;
}

// ---------------------------------------------------------------- vectors
// GCC vector extensions, as in gemm/common.h, at most this build's native width (a wider
// generic vector would be split through the stack).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename T, int L>
struct VecOf {
  typedef T type __attribute__((vector_size(sizeof(T) * L)));
};

// Lanes for a compile-time K: one native vector, or K itself when that is shorter; for a
// run-time K, a native vector. Also the number of capsules per block. Divides
// kRoutingBlock (16), which the scratch sizes are padded to.
template <typename T, int KT>
constexpr int BlockLanes() {
  constexpr int native = kVectorBytes / int(sizeof(T));
  return (KT > 0 && KT < native) ? KT : native;
}

template <typename T, int L>
inline typename VecOf<T, L>::type LoadV(const T* p) {
  typename VecOf<T, L>::type v;
  memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int L>
inline void StoreV(T* p, const typename VecOf<T, L>::type& v) {
  memcpy(p, &v, sizeof(v));
}

template <typename T, int L>
inline typename VecOf<T, L>::type Splat(T x) {
  // x - 0 is an identity even for -0.0, so it compiles to one broadcast; 0 + x is not, and
  // costs a scalar add before the broadcast.
  return x - typename VecOf<T, L>::type{};
}

// One level of the transposing reduction: a and b each hold L/S segments of S lanes, each
// segment the partial sums of one dot product; the result holds 2L/S segments of S/2 lanes
// (a's, then b's): each segment's lower half plus its upper half.
#define SMALLMM_LEVEL(L, S, LO, HI)                                               \
  template <typename V>                                                           \
  inline V Level##L##_##S(const V& a, const V& b) {                               \
    return __builtin_shufflevector(a, b, LO) + __builtin_shufflevector(a, b, HI); \
  }
#define SMALLMM_ARGS(...) __VA_ARGS__
SMALLMM_LEVEL(16, 16, SMALLMM_ARGS(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
              SMALLMM_ARGS(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
SMALLMM_LEVEL(16, 8, SMALLMM_ARGS(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
              SMALLMM_ARGS(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31))
SMALLMM_LEVEL(16, 4, SMALLMM_ARGS(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
              SMALLMM_ARGS(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31))
SMALLMM_LEVEL(16, 2, SMALLMM_ARGS(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
              SMALLMM_ARGS(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31))
SMALLMM_LEVEL(8, 8, SMALLMM_ARGS(0, 1, 2, 3, 8, 9, 10, 11),
              SMALLMM_ARGS(4, 5, 6, 7, 12, 13, 14, 15))
SMALLMM_LEVEL(8, 4, SMALLMM_ARGS(0, 1, 4, 5, 8, 9, 12, 13),
              SMALLMM_ARGS(2, 3, 6, 7, 10, 11, 14, 15))
SMALLMM_LEVEL(8, 2, SMALLMM_ARGS(0, 2, 4, 6, 8, 10, 12, 14),
              SMALLMM_ARGS(1, 3, 5, 7, 9, 11, 13, 15))
SMALLMM_LEVEL(4, 4, SMALLMM_ARGS(0, 1, 4, 5), SMALLMM_ARGS(2, 3, 6, 7))
SMALLMM_LEVEL(4, 2, SMALLMM_ARGS(0, 2, 4, 6), SMALLMM_ARGS(1, 3, 5, 7))
SMALLMM_LEVEL(2, 2, SMALLMM_ARGS(0, 2), SMALLMM_ARGS(1, 3))
#undef SMALLMM_ARGS
#undef SMALLMM_LEVEL

// p[0..L) are L vectors of L partial products; returns the vector whose lane r is the sum
// of p[r]'s lanes (L dot products, transposed into one vector). p is clobbered.
template <typename T, int L>
inline typename VecOf<T, L>::type TransposeSum(typename VecOf<T, L>::type* p) {
  if constexpr (L == 16) {
    for (int q = 0; q < 8; ++q) p[q] = Level16_16(p[2 * q], p[2 * q + 1]);
    for (int q = 0; q < 4; ++q) p[q] = Level16_8(p[2 * q], p[2 * q + 1]);
    for (int q = 0; q < 2; ++q) p[q] = Level16_4(p[2 * q], p[2 * q + 1]);
    return Level16_2(p[0], p[1]);
  } else if constexpr (L == 8) {
    for (int q = 0; q < 4; ++q) p[q] = Level8_8(p[2 * q], p[2 * q + 1]);
    for (int q = 0; q < 2; ++q) p[q] = Level8_4(p[2 * q], p[2 * q + 1]);
    return Level8_2(p[0], p[1]);
  } else if constexpr (L == 4) {
    for (int q = 0; q < 2; ++q) p[q] = Level4_4(p[2 * q], p[2 * q + 1]);
    return Level4_2(p[0], p[1]);
  } else {
    static_assert(L == 2, "block lanes are 2, 4, 8 or 16");
    return Level2_2(p[0], p[1]);
  }
}

// ---------------------------------------------------------------- exp for softmax
// exp(x) for x <= 0 (softmax after subtracting the maximum), NaN stays NaN. float: Cephes'
// expf on a vector — n = round(x·log2 e), r = x - n·ln 2 (in two parts), exp(r) by a
// degree-7 polynomial, times 2^n through the exponent bits; within 2 ulp of expf, like
// Eigen's vectorised exp that tf.nn.softmax uses. Below -87 it returns ~1e-38 instead of
// flushing to 0: irrelevant next to the maximum's 1. double: the C library's exp per lane
// (float64 routing is for accuracy, not speed).
template <int L>
inline typename VecOf<float, L>::type ExpNonPositive(const typename VecOf<float, L>::type& x) {
  typedef typename VecOf<float, L>::type V;
  typedef typename VecOf<int32_t, L>::type Vi;
  const V lo = Splat<float, L>(-87.0f);
  const V hi = V{};
  V y = x < lo ? lo : x;  // comparisons with NaN are false: NaN passes through
  y = y > hi ? hi : y;
  const V magic = Splat<float, L>(12582912.0f);  // 1.5·2^23: adding it rounds to integer
  const V t = y * 1.44269504088896341f + magic;
  const V n = t - magic;
  const Vi ni = (Vi)t - (Vi)magic;
  V r = y - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = Splat<float, L>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const V e = (V)((Vi)p + (ni << 23));
  return x == x ? e : x;
}

template <typename T, int L>
inline typename VecOf<T, L>::type ExpV(const typename VecOf<T, L>::type& x) {
  if constexpr (sizeof(T) == 4) {
    return ExpNonPositive<L>(x);
  } else {
    typename VecOf<T, L>::type e;
    for (int r = 0; r < L; ++r) e[r] = exp(x[r]);
    return e;
  }
}

// ---------------------------------------------------------------- small helpers
// y += a·x over K values.
template <typename T, int KT>
inline void Axpy(T a, const T* __restrict x, T* __restrict y, int64_t k) {
  if constexpr (KT > 0) {
    constexpr int W = BlockLanes<T, KT>();
    for (int c = 0; c < KT; c += W) {
      StoreV<T, W>(y + c, LoadV<T, W>(y + c) + a * LoadV<T, W>(x + c));
    }
  } else {
    for (int64_t q = 0; q < k; ++q) y[q] += a * x[q];
  }
}

// y[:] += Σ_r a[r]·x[r·stride + :] over the `rows` capsules of a block (one load and
// store of y per block instead of per capsule).
template <typename T, int KT>
inline void BlockAxpy(const T* __restrict a, const T* __restrict x, int64_t stride, int64_t rows,
                      T* __restrict y, int64_t k) {
  if constexpr (KT > 0) {
    constexpr int W = BlockLanes<T, KT>();
    typedef typename VecOf<T, W>::type V;
    V acc[KT / W];
    for (int c = 0; c < KT / W; ++c) acc[c] = LoadV<T, W>(y + c * W);
    for (int64_t r = 0; r < rows; ++r) {
      const V ar = Splat<T, W>(a[r]);
      for (int c = 0; c < KT / W; ++c) acc[c] += ar * LoadV<T, W>(x + r * stride + c * W);
    }
    for (int c = 0; c < KT / W; ++c) StoreV<T, W>(y + c * W, acc[c]);
  } else {
    for (int64_t r = 0; r < rows; ++r) Axpy<T, 0>(a[r], x + r * stride, y, k);
  }
}

template <typename T>
inline T DotScalar(const T* __restrict x, const T* __restrict y, int64_t k) {
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t q = 0;
  for (; q + 4 <= k; q += 4) {
    a0 += x[q] * y[q];
    a1 += x[q + 1] * y[q + 1];
    a2 += x[q + 2] * y[q + 2];
    a3 += x[q + 3] * y[q + 3];
  }
  for (; q < k; ++q) a0 += x[q] * y[q];
  return (a0 + a1) + (a2 + a3);
}

// out[r] = <û[i0 + r, j, :], w[:]> for the `rows` capsules of a block (lanes past `rows`
// are 0). û rows are JK apart.
template <typename T, int KT, int L>
inline typename VecOf<T, L>::type BlockDots(const T* __restrict u_blk, int64_t JK, int64_t j,
                                            const T* __restrict w, int64_t rows, int64_t k) {
  typedef typename VecOf<T, L>::type V;
  const int64_t K = Dim<KT>(k);
  if constexpr (KT > 0) {
    V wv[KT / L];
    for (int c = 0; c < KT / L; ++c) wv[c] = LoadV<T, L>(w + c * L);
    V p[L];
    for (int r = 0; r < L; ++r) {
      if (r < rows) {
        const T* x = u_blk + r * JK + j * K;
        V acc = LoadV<T, L>(x) * wv[0];
        for (int c = 1; c < KT / L; ++c) acc += LoadV<T, L>(x + c * L) * wv[c];
        p[r] = acc;
      } else {
        p[r] = V{};
      }
    }
    return TransposeSum<T, L>(p);
  } else {
    V out = V{};
    for (int64_t r = 0; r < rows; ++r) out[r] = DotScalar(u_blk + r * JK + j * K, w, K);
    return out;
  }
}

// v[j] = squash(s[j]) for all J capsules of K values.
template <typename T>
void Squash(const T* __restrict s, T* __restrict v, int64_t J, int64_t K, T eps) {
  for (int64_t j = 0; j < J; ++j) {
    const T* sj = s + j * K;
    const T n2 = DotScalar(sj, sj, K);
    const T f = n2 / ((T(1) + n2) * Sqrt(n2 + eps));
    for (int64_t q = 0; q < K; ++q) v[j * K + q] = f * sj[q];
  }
}

// gs = dL/ds given gv = dL/dv for v = squash(s): with n2 = |s|², g = 1/((1+n2)·√(n2+ε)),
// v = n2·g·s, so gs = n2·g·gv + 2·f'(n2)·<gv, s>·s with f' = g·(1/(1+n2) - n2/(2(n2+ε)))
// (no 1/|s| term: finite at s = 0). A non-finite <gv, s> makes all of gs[j] NaN, never
// ±Inf (the NaN/Inf rule in routing.h).
template <typename T>
void SquashGrad(const T* __restrict s, const T* __restrict gv, T* __restrict gs, int64_t J,
                int64_t K, T eps) {
  for (int64_t j = 0; j < J; ++j) {
    const T* sj = s + j * K;
    const T* gj = gv + j * K;
    const T n2 = DotScalar(sj, sj, K);
    const T g = T(1) / ((T(1) + n2) * Sqrt(n2 + eps));
    const T fprime = g * (T(1) / (T(1) + n2) - n2 / (T(2) * (n2 + eps)));
    const T a = n2 * g;
    const T dot = DotScalar(gj, sj, K);
    const T b = __builtin_isfinite(dot) ? T(2) * fprime * dot : T(NAN);
    for (int64_t q = 0; q < K; ++q) gs[j * K + q] = a * gj[q] + b * sj[q];
  }
}

// ---------------------------------------------------------------- one row
// Row scratch (RoutingScratchElements; Ipad = I rounded up to kRoutingBlock): forward
// c_blk [kRoutingBlock·J], s and vsum [J·K]; backward G [Ipad·J], c and alpha
// [R-1][Ipad·J], s, v, gs [R][J·K], and gv, gv_next, v_last, vsum [J·K].
struct RowKeep {      // what the backward pass keeps of the forward iterations (or all null)
  void* c = nullptr;  // [R-1][Ipad·J] block-transposed: c of iterations 1..R-1
  void* s = nullptr;  // [R][J·K]
  void* v = nullptr;  // [R][J·K]
};

// One row's forward iterations: v_out [J·K] = the last v.
template <typename T, int KT>
void ForwardRow(const T* __restrict u, T* __restrict v_out, int64_t I, int64_t J, int64_t k, int R,
                T eps, T* __restrict c_blk, T* __restrict s_buf, T* __restrict vsum,
                const RowKeep& keep) {
  constexpr int L = BlockLanes<T, KT>();
  typedef typename VecOf<T, L>::type V;
  const int64_t K = Dim<KT>(k);
  const int64_t JK = J * K;
  const int64_t Ipad = (I + kRoutingBlock - 1) / kRoutingBlock * kRoutingBlock;
  T* c_keep = static_cast<T*>(keep.c);
  T* s_keep = static_cast<T*>(keep.s);
  T* v_keep = static_cast<T*>(keep.v);

  // Iteration 0: c = 1/J for every pair, so s = (1/J)·Σ_i û[i].
  T* s = s_keep ? s_keep : s_buf;
  for (int64_t x = 0; x < JK; ++x) s[x] = T(0);
  for (int64_t i = 0; i < I; ++i) {
    const T* ui = u + i * JK;
    for (int64_t x = 0; x < JK; ++x) s[x] += ui[x];
  }
  const T uniform = J > 0 ? T(1) / T(J) : T(0);
  for (int64_t x = 0; x < JK; ++x) s[x] *= uniform;
  T* v = v_keep ? v_keep : v_out;
  Squash(s, v, J, K, eps);
  for (int64_t x = 0; x < JK; ++x) vsum[x] = v[x];

  for (int t = 1; t < R; ++t) {
    s = s_keep ? s_keep + t * JK : s_buf;
    T* c_t = c_keep ? c_keep + (t - 1) * Ipad * J : nullptr;
    for (int64_t x = 0; x < JK; ++x) s[x] = T(0);
    for (int64_t i0 = 0; i0 < I; i0 += L) {
      const int64_t rows = I - i0 < L ? I - i0 : L;
      const T* u_blk = u + i0 * JK;
      T* cb = c_t ? c_t + i0 * J : c_blk;  // [J][L] for this block
      // logits = <û, Σ_τ<t v_τ>, then softmax over j, lane by lane.
      V m = V{};
      for (int64_t j = 0; j < J; ++j) {
        const V a = BlockDots<T, KT, L>(u_blk, JK, j, vsum + j * K, rows, K);
        StoreV<T, L>(cb + j * L, a);
        // A NaN logit never becomes the max but still makes its lane's exps NaN.
        m = j == 0 ? a : (a > m ? a : m);
      }
      V sum = V{};
      for (int64_t j = 0; j < J; ++j) {
        const V e = ExpV<T, L>(LoadV<T, L>(cb + j * L) - m);
        StoreV<T, L>(cb + j * L, e);
        sum += e;
      }
      const V inv = Splat<T, L>(T(1)) / sum;
      for (int64_t j = 0; j < J; ++j) StoreV<T, L>(cb + j * L, LoadV<T, L>(cb + j * L) * inv);
      for (int64_t j = 0; j < J; ++j) {
        BlockAxpy<T, KT>(cb + j * L, u_blk + j * K, JK, rows, s + j * K, K);
      }
    }
    v = v_keep ? v_keep + t * JK : v_out;  // without v_keep only vsum needs the old v's
    Squash(s, v, J, K, eps);
    for (int64_t x = 0; x < JK; ++x) vsum[x] += v[x];
  }
  if (v_keep) {
    for (int64_t x = 0; x < JK; ++x) v_out[x] = v_keep[(R - 1) * JK + x];
  }
}

template <typename T, int KT>
bool Forward(const RoutingShape& sh, const void* u_hat, void* v_out, int64_t begin, int64_t end) {
  if (begin >= end) return true;
  const int64_t I = sh.in_caps, J = sh.out_caps, K = Dim<KT>(sh.out_dim);
  T* scratch = static_cast<T*>(malloc(sizeof(T) * (RoutingScratchElements(sh, false) + 1)));
  if (scratch == nullptr) return false;
  T* c_blk = scratch;                // [kRoutingBlock·J]
  T* s = c_blk + kRoutingBlock * J;  // [J·K]
  T* vsum = s + J * K;               // [J·K]
  const T* u = static_cast<const T*>(u_hat);
  T* v = static_cast<T*>(v_out);
  const T eps = T(sh.epsilon);
  for (int64_t b = begin; b < end; ++b) {
    ForwardRow<T, KT>(u + b * I * J * K, v + b * J * K, I, J, K, sh.iterations, eps, c_blk, s, vsum,
                      RowKeep());
  }
  free(scratch);
  return true;
}

template <typename T, int KT>
bool Backward(const RoutingShape& sh, const void* u_hat, const void* grad_v, void* grad_u,
              int64_t begin, int64_t end) {
  if (begin >= end) return true;
  constexpr int L = BlockLanes<T, KT>();
  typedef typename VecOf<T, L>::type V;
  const int64_t I = sh.in_caps, J = sh.out_caps, K = Dim<KT>(sh.out_dim);
  const int R = sh.iterations;
  const int64_t JK = J * K;
  const int64_t Ipad = (I + kRoutingBlock - 1) / kRoutingBlock * kRoutingBlock;
  const int64_t IJ = Ipad * J;
  T* scratch = static_cast<T*>(malloc(sizeof(T) * (RoutingScratchElements(sh, true) + 1)));
  if (scratch == nullptr) return false;
  // Layout of RoutingScratchElements(sh, true).
  T* G = scratch;                    // [Ipad·J] dL/dlogits, block-transposed
  T* c_keep = G + IJ;                // [R-1][Ipad·J]
  T* alpha = c_keep + (R - 1) * IJ;  // [R-1][Ipad·J]: dL/d(agreement of iteration t)
  T* s_keep = alpha + (R - 1) * IJ;  // [R][J·K]
  T* v_keep = s_keep + R * JK;       // [R][J·K]
  T* gs_keep = v_keep + R * JK;      // [R][J·K]
  T* gv = gs_keep + R * JK;          // [J·K]
  T* gv_next = gv + JK;              // [J·K]
  T* v_last = gv_next + JK;          // [J·K]
  T* vsum = v_last + JK;             // [J·K]
  const T* u_all = static_cast<const T*>(u_hat);
  const T* gv_all = static_cast<const T*>(grad_v);
  T* du_all = static_cast<T*>(grad_u);
  const T eps = T(sh.epsilon);
  const T uniform = J > 0 ? T(1) / T(J) : T(0);
  RowKeep keep;
  keep.c = c_keep;
  keep.s = s_keep;
  keep.v = v_keep;

  for (int64_t b = begin; b < end; ++b) {
    const T* u = u_all + b * I * JK;
    T* du = du_all + b * I * JK;
    ForwardRow<T, KT>(u, v_last, I, J, K, R, eps, nullptr, nullptr, vsum, keep);

    for (int64_t x = 0; x < JK; ++x) gv[x] = gv_all[b * JK + x];
    for (int64_t x = 0; x < IJ; ++x) G[x] = T(0);
    for (int t = R - 1; t >= 1; --t) {
      T* gs = gs_keep + t * JK;
      SquashGrad(s_keep + t * JK, gv, gs, J, K, eps);
      const T* c_t = c_keep + (t - 1) * IJ;
      T* alpha_t = alpha + (t - 1) * IJ;
      for (int64_t x = 0; x < JK; ++x) gv_next[x] = T(0);
      for (int64_t i0 = 0; i0 < I; i0 += L) {
        const int64_t rows = I - i0 < L ? I - i0 : L;
        const T* u_blk = u + i0 * JK;
        const T* cb = c_t + i0 * J;
        T* Gb = G + i0 * J;
        T* ab = alpha_t + i0 * J;
        // gc[j] = <gs[j], û[i, j]>; softmax backward: G += c·(gc - Σ_j c·gc).
        V dot = V{};
        for (int64_t j = 0; j < J; ++j) {
          const V gc = BlockDots<T, KT, L>(u_blk, JK, j, gs + j * K, rows, K);
          StoreV<T, L>(ab + j * L, gc);  // alpha_t doubles as gc's scratch here
          dot += LoadV<T, L>(cb + j * L) * gc;
        }
        for (int64_t j = 0; j < J; ++j) {
          // logits_(t+1) = logits_t + agreement_t: G flows through unchanged.
          const V c = LoadV<T, L>(cb + j * L);
          const V g = LoadV<T, L>(Gb + j * L) + c * (LoadV<T, L>(ab + j * L) - dot);
          StoreV<T, L>(Gb + j * L, g);
          StoreV<T, L>(ab + j * L, g);
        }
        for (int64_t j = 0; j < J; ++j) {
          BlockAxpy<T, KT>(Gb + j * L, u_blk + j * K, JK, rows, gv_next + j * K, K);
        }
      }
      for (int64_t x = 0; x < JK; ++x) gv[x] = gv_next[x];
    }
    SquashGrad(s_keep, gv, gs_keep, J, K, eps);

    // dû written once: every iteration's c_t·gs_t plus every agreement's alpha_t·v_t.
    // This pass must not read û: dû may be û's buffer (in place, see routing.h).
    for (int64_t i0 = 0; i0 < I; i0 += L) {
      const int64_t rows = I - i0 < L ? I - i0 : L;
      for (int64_t r = 0; r < rows; ++r) {  // dû in memory order
        for (int64_t j = 0; j < J; ++j) {
          const T* gs0 = gs_keep + j * K;
          T* d = du + (i0 + r) * JK + j * K;
          const int64_t p = i0 * J + j * L + r;  // (i0 + r, j), block-transposed
          for (int64_t q = 0; q < K; ++q) d[q] = uniform * gs0[q];
          for (int t = 1; t < R; ++t) {
            Axpy<T, KT>(c_keep[(t - 1) * IJ + p], gs_keep + t * JK + j * K, d, K);
            Axpy<T, KT>(alpha[(t - 1) * IJ + p], v_keep + (t - 1) * JK + j * K, d, K);
          }
        }
      }
    }
  }
  free(scratch);
  return true;
}

// Run-time K -> instantiation.
template <typename T>
bool ForwardAnyK(const RoutingShape& sh, const void* u, void* v, int64_t begin, int64_t end) {
  switch (sh.out_dim) {
    case 8:
      return Forward<T, 8>(sh, u, v, begin, end);
    case 16:
      return Forward<T, 16>(sh, u, v, begin, end);
    default:
      return Forward<T, 0>(sh, u, v, begin, end);
  }
}

template <typename T>
bool BackwardAnyK(const RoutingShape& sh, const void* u, const void* gv, void* gu, int64_t begin,
                  int64_t end) {
  switch (sh.out_dim) {
    case 8:
      return Backward<T, 8>(sh, u, gv, gu, begin, end);
    case 16:
      return Backward<T, 16>(sh, u, gv, gu, begin, end);
    default:
      return Backward<T, 0>(sh, u, gv, gu, begin, end);
  }
}

}  // namespace

namespace {
constexpr RoutingKernels MakeRoutingKernels() {
  RoutingKernels t{};
#define SMALLMM_ROUTING_ENTRY(e)                                                  \
  t.forward[int(DType::e)] = &ForwardAnyK<typename DTypeInfo<DType::e>::Storage>; \
  t.backward[int(DType::e)] = &BackwardAnyK<typename DTypeInfo<DType::e>::Storage>;
  SMALLMM_ROUTING_DTYPES(SMALLMM_ROUTING_ENTRY)
#undef SMALLMM_ROUTING_ENTRY
  return t;
}
}  // namespace

// This ISA's entry of the dispatcher's table (isa.cc).
extern const RoutingKernels SMALLMM_CAT(kRoutingKernels_, SMALLMM_ISA);
const RoutingKernels SMALLMM_CAT(kRoutingKernels_, SMALLMM_ISA) = MakeRoutingKernels();

}  // namespace smallmm
