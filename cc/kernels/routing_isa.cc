// Fused dynamic-routing kernels (routing.h). Compiled once per instruction set like
// gemm_isa.cc (setup.py: -DSMALLMM_ISA=avx512 / avx2 / baseline with the matching -m
// flags); routing.cc picks the table of the ISA the GEMM kernels dispatched to.
//
// Same rules as gemm_isa.cc: everything lives in an anonymous namespace and no std::
// templates or inline library functions are used (only the C math library's expf / exp /
// sqrt), so no AVX-512 code can be merged into the baseline build as a COMDAT.
//
// Per row, with û [I, J, K] in cache:
//   forward   R passes over û. Pass 0 sums û (c = 1/J); pass t >= 1 does, per input
//             capsule i: logits[i, :] += <û[i, j, :], v[j]>, c = softmax, s += c·û.
//   backward  recomputes the forward passes keeping c of every iteration (R-1 arrays of
//             I·J), then R-1 backward passes (one per iteration with an agreement step),
//             each fused per i: gc = <gs[j], û[i, j, :]>, softmax backward into the logits'
//             gradient G, and G·û for the previous iteration's dL/dv. A last pass writes
//             dû[i, j, :] = Σ_t c_t[i, j]·gs_t[j] + Σ_t G_(t+1)[i, j]·v_t[j] once.
// Vector loops are over K (contiguous); K = 8 and 16 (CapsNet's capsule sizes) have
// compile-time instantiations the compiler fully unrolls, other K a run-time loop.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cc/kernels/routing.h"

#ifndef SMALLMM_ISA
#error "compile with -DSMALLMM_ISA=<name>"
#endif

// Vectors are passed by value between functions with internal linkage only, so GCC's note
// that such an ABI differs between ISA builds does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace smallmm {
namespace {

constexpr int64_t kBlock = kRoutingBlock;

inline float Sqrt(float x) { return sqrtf(x); }
inline double Sqrt(double x) { return sqrt(x); }

// K as a compile-time constant when KT > 0.
template <int KT>
inline int64_t Dim(int64_t k) {
  return KT > 0 ? KT : k;
}

// GCC vector extensions, as in gemm_isa.cc, at this build's native width (a wider generic
// vector would be split through the stack).
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

// Lanes used for a compile-time K: one native vector, or K itself when that is shorter.
template <typename T, int KT>
constexpr int Lanes() {
  return KT * int(sizeof(T)) < kVectorBytes ? KT : kVectorBytes / int(sizeof(T));
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

// Sum of the L lanes: add the two halves until two lanes are left (L a power of two).
template <typename T, int L>
inline T HorizontalSum(const typename VecOf<T, L>::type& v) {
  if constexpr (L == 2) {
    return v[0] + v[1];
  } else {
    typedef typename VecOf<T, L / 2>::type H;
    H lo, hi;
    memcpy(&lo, &v, sizeof(H));
    memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    const H sum = lo + hi;
    return HorizontalSum<T, L / 2>(sum);
  }
}

// <x, y> over K values: native-width vector products summed into one vector, then a
// halving tree, for KT = 8 or 16; four scalar partial sums for a run-time K. (No
// -ffast-math: the order is fixed either way.)
template <typename T, int KT>
inline T Dot(const T* __restrict x, const T* __restrict y, int64_t k) {
  if constexpr (KT > 0) {
    constexpr int W = Lanes<T, KT>();
    typedef typename VecOf<T, W>::type V;
    V acc = LoadV<T, W>(x) * LoadV<T, W>(y);
    for (int c = W; c < KT; c += W) acc += LoadV<T, W>(x + c) * LoadV<T, W>(y + c);
    return HorizontalSum<T, W>(acc);
  } else {
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
}

// y += a·x over K values.
template <typename T, int KT>
inline void Axpy(T a, const T* __restrict x, T* __restrict y, int64_t k) {
  if constexpr (KT > 0) {
    constexpr int W = Lanes<T, KT>();
    for (int c = 0; c < KT; c += W) {
      StoreV<T, W>(y + c, LoadV<T, W>(y + c) + a * LoadV<T, W>(x + c));
    }
  } else {
    for (int64_t q = 0; q < k; ++q) y[q] += a * x[q];
  }
}

// ---------------------------------------------------------------- exp for softmax
// x[0..n) = exp(x[0..n)) for x <= 0 (softmax after subtracting the maximum), NaN stays NaN.
// float: Cephes' expf on a native vector at a time — n = round(x·log2 e), r = x - n·ln 2 (in two
// parts), exp(r) by a degree-7 polynomial, times 2^n through the exponent bits; within
// 2 ulp of expf, the same as Eigen's vectorised exp that tf.nn.softmax uses. Below -87.3 the
// result is clamped to ~1e-38 instead of flushing to 0: irrelevant next to the maximum's 1.
// double: the C library's exp (float64 routing is for accuracy, not speed).
constexpr int kExpLanes = kVectorBytes / 4;
typedef VecOf<float, kExpLanes>::type ExpV;
typedef VecOf<int32_t, kExpLanes>::type ExpVi;

inline ExpV ExpNonPositive(ExpV x) {
  const ExpV lo = ExpV{} - 87.3f;
  const ExpV hi = ExpV{};
  ExpV y = x < lo ? lo : x;  // comparisons with NaN are false: NaN passes through
  y = y > hi ? hi : y;
  const ExpV magic = ExpV{} + 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const ExpV t = y * 1.44269504088896341f + magic;
  const ExpV n = t - magic;
  const ExpVi ni = (ExpVi)t - (ExpVi)magic;
  ExpV r = y - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  ExpV p = ExpV{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ExpV e = (ExpV)((ExpVi)p + (ni << 23));
  return x == x ? e : x;
}

inline void ExpInPlace(float* x, int64_t n) {
  int64_t q = 0;
  for (; q + kExpLanes <= n; q += kExpLanes) {
    StoreV<float, kExpLanes>(x + q, ExpNonPositive(LoadV<float, kExpLanes>(x + q)));
  }
  if (q < n) {
    float tail[kExpLanes] = {};
    for (int64_t e = q; e < n; ++e) tail[e - q] = x[e];
    StoreV<float, kExpLanes>(tail, ExpNonPositive(LoadV<float, kExpLanes>(tail)));
    for (int64_t e = q; e < n; ++e) x[e] = tail[e - q];
  }
}

inline void ExpInPlace(double* x, int64_t n) {
  for (int64_t q = 0; q < n; ++q) x[q] = exp(x[q]);
}

// c[i, :] = softmax(logits[i, :]) for the `rows` rows of a block (row length J),
// max-subtracted like tf.nn.softmax; the exps run over the whole block at once.
template <typename T>
inline void SoftmaxRows(const T* __restrict logits, T* __restrict c, int64_t rows, int64_t J) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* li = logits + i * J;
    T m = li[0];
    for (int64_t j = 1; j < J; ++j) m = li[j] > m ? li[j] : m;
    for (int64_t j = 0; j < J; ++j) c[i * J + j] = li[j] - m;
  }
  ExpInPlace(c, rows * J);
  for (int64_t i = 0; i < rows; ++i) {
    T* ci = c + i * J;
    T sum = 0;
    for (int64_t j = 0; j < J; ++j) sum += ci[j];
    const T inv = T(1) / sum;
    for (int64_t j = 0; j < J; ++j) ci[j] *= inv;
  }
}

// v[j] = squash(s[j]) for all J capsules of K values.
template <typename T, int KT>
void Squash(const T* __restrict s, T* __restrict v, int64_t J, int64_t k, T eps) {
  const int64_t K = Dim<KT>(k);
  for (int64_t j = 0; j < J; ++j) {
    const T* sj = s + j * K;
    const T n2 = Dot<T, KT>(sj, sj, K);
    const T f = n2 / ((T(1) + n2) * Sqrt(n2 + eps));
    for (int64_t q = 0; q < K; ++q) v[j * K + q] = f * sj[q];
  }
}

// gs = dL/ds given gv = dL/dv for v = squash(s): with n2 = |s|², g = 1/((1+n2)·√(n2+ε)),
// v = n2·g·s, so gs = n2·g·gv + 2·f'(n2)·<gv, s>·s with f' = g·(1/(1+n2) - n2/(2(n2+ε)))
// (no 1/|s| term: finite at s = 0).
template <typename T, int KT>
void SquashGrad(const T* __restrict s, const T* __restrict gv, T* __restrict gs, int64_t J,
                int64_t k, T eps) {
  const int64_t K = Dim<KT>(k);
  for (int64_t j = 0; j < J; ++j) {
    const T* sj = s + j * K;
    const T* gj = gv + j * K;
    const T n2 = Dot<T, KT>(sj, sj, K);
    const T g = T(1) / ((T(1) + n2) * Sqrt(n2 + eps));
    const T fprime = g * (T(1) / (T(1) + n2) - n2 / (T(2) * (n2 + eps)));
    const T a = n2 * g;
    const T b = T(2) * fprime * Dot<T, KT>(gj, sj, K);
    for (int64_t q = 0; q < K; ++q) gs[j * K + q] = a * gj[q] + b * sj[q];
  }
}

// One row's forward iterations. Scratch: logits [I·J], c_buf [kBlock·J]. When c_keep / s_keep /
// v_keep are given (backward), c of iterations 1..R-1 ([R-1][I·J]) and s, v of every
// iteration ([R][J·K]) are kept there; v_out receives the last v.
template <typename T, int KT>
void ForwardRow(const T* __restrict u, T* __restrict v_out, int64_t I, int64_t J, int64_t k,
                int R, T eps, T* __restrict logits, T* __restrict c_buf, T* __restrict s_buf,
                T* __restrict c_keep, T* __restrict s_keep, T* __restrict v_keep) {
  const int64_t K = Dim<KT>(k);
  const int64_t JK = J * K, IJ = I * J;
  // Iteration 0: c = 1/J for every pair, so s = (1/J)·Σ_i û[i].
  T* s = s_keep ? s_keep : s_buf;
  for (int64_t x = 0; x < JK; ++x) s[x] = T(0);
  for (int64_t i = 0; i < I; ++i) {
    const T* ui = u + i * JK;
    for (int64_t x = 0; x < JK; ++x) s[x] += ui[x];
  }
  const T uniform = J > 0 ? T(1) / T(J) : T(0);
  for (int64_t x = 0; x < JK; ++x) s[x] *= uniform;
  T* v = (R == 1 || !v_keep) ? v_out : v_keep;
  Squash<T, KT>(s, v, J, K, eps);
  for (int t = 1; t < R; ++t) {
    const T* v_prev = v;
    s = s_keep ? s_keep + t * JK : s_buf;
    v = (t == R - 1 || !v_keep) ? v_out : v_keep + t * JK;
    T* c_t = c_keep ? c_keep + (t - 1) * IJ : nullptr;
    for (int64_t x = 0; x < JK; ++x) s[x] = T(0);
    // Blocks of kBlock input capsules: agreement, then one vectorised softmax for the
    // block, then the weighted sum, while the block's û is still in L1.
    for (int64_t i0 = 0; i0 < I; i0 += kBlock) {
      const int64_t rows = I - i0 < kBlock ? I - i0 : kBlock;
      for (int64_t i = i0; i < i0 + rows; ++i) {
        const T* ui = u + i * JK;
        T* li = logits + i * J;
        for (int64_t j = 0; j < J; ++j) {
          const T a = Dot<T, KT>(ui + j * K, v_prev + j * K, K);
          li[j] = (t == 1 ? T(0) : li[j]) + a;
        }
      }
      T* c_blk = c_t ? c_t + i0 * J : c_buf;
      SoftmaxRows(logits + i0 * J, c_blk, rows, J);
      for (int64_t i = i0; i < i0 + rows; ++i) {
        const T* ui = u + i * JK;
        const T* ci = c_blk + (i - i0) * J;
        for (int64_t j = 0; j < J; ++j) Axpy<T, KT>(ci[j], ui + j * K, s + j * K, K);
      }
    }
    // Without v_keep, v and v_prev are both v_out: safe, the pass above is done with v_prev.
    Squash<T, KT>(s, v, J, K, eps);
  }
  if (v_keep && R > 1) {
    // The last v went to v_out; keep a copy with the others.
    for (int64_t x = 0; x < JK; ++x) v_keep[(R - 1) * JK + x] = v_out[x];
  } else if (v_keep) {
    for (int64_t x = 0; x < JK; ++x) v_keep[x] = v_out[x];
  }
}

template <typename T, int KT>
bool Forward(const RoutingShape& sh, const void* u_hat, void* v_out, int64_t begin,
             int64_t end) {
  if (begin >= end) return true;
  const int64_t I = sh.in_caps, J = sh.out_caps, K = Dim<KT>(sh.out_dim);
  T* scratch = static_cast<T*>(malloc(sizeof(T) * (RoutingScratchElements(sh, false) + 1)));
  if (scratch == nullptr) return false;
  T* logits = scratch;  // layout of RoutingScratchElements(sh, false)
  T* c_buf = logits + I * J;
  T* s = c_buf + kBlock * J;
  const T* u = static_cast<const T*>(u_hat);
  T* v = static_cast<T*>(v_out);
  const T eps = T(sh.epsilon);
  for (int64_t b = begin; b < end; ++b) {
    ForwardRow<T, KT>(u + b * I * J * K, v + b * J * K, I, J, K, sh.iterations, eps, logits,
                      c_buf, s, nullptr, nullptr, nullptr);
  }
  free(scratch);
  return true;
}

template <typename T, int KT>
bool Backward(const RoutingShape& sh, const void* u_hat, const void* grad_v, void* grad_u,
              int64_t begin, int64_t end) {
  if (begin >= end) return true;
  const int64_t I = sh.in_caps, J = sh.out_caps, K = Dim<KT>(sh.out_dim);
  const int R = sh.iterations;
  const int64_t IJ = I * J, JK = J * K;
  T* scratch = static_cast<T*>(malloc(sizeof(T) * (RoutingScratchElements(sh, true) + 1)));
  if (scratch == nullptr) return false;
  // Layout of RoutingScratchElements(sh, true).
  T* G = scratch;                      // logits in the forward pass, then dL/dlogits
  T* c_keep = G + IJ;                  // [R-1][I·J]: c of iterations 1..R-1
  T* alpha = c_keep + (R - 1) * IJ;    // [R-1][I·J]: dL/d(agreement of iteration t)
  T* gc = alpha + (R - 1) * IJ;        // [J]
  T* s_keep = gc + J;                  // [R][J·K]
  T* v_keep = s_keep + R * JK;         // [R][J·K]
  T* gs_keep = v_keep + R * JK;        // [R][J·K]
  T* gv = gs_keep + R * JK;            // [J·K]
  T* gv_next = gv + JK;                // [J·K]
  T* v_last = gv_next + JK;            // [J·K]
  const T* u_all = static_cast<const T*>(u_hat);
  const T* gv_all = static_cast<const T*>(grad_v);
  T* du_all = static_cast<T*>(grad_u);
  const T eps = T(sh.epsilon);
  const T uniform = J > 0 ? T(1) / T(J) : T(0);

  for (int64_t b = begin; b < end; ++b) {
    const T* u = u_all + b * I * JK;
    T* du = du_all + b * I * JK;
    // c_buf is unused when c_keep is given.
    ForwardRow<T, KT>(u, v_last, I, J, K, R, eps, G, nullptr, nullptr, c_keep, s_keep, v_keep);

    for (int64_t x = 0; x < JK; ++x) gv[x] = gv_all[b * JK + x];
    for (int64_t x = 0; x < IJ; ++x) G[x] = T(0);
    for (int t = R - 1; t >= 1; --t) {
      T* gs = gs_keep + t * JK;
      SquashGrad<T, KT>(s_keep + t * JK, gv, gs, J, K, eps);
      const T* c_t = c_keep + (t - 1) * IJ;
      T* alpha_t = alpha + (t - 1) * IJ;
      for (int64_t x = 0; x < JK; ++x) gv_next[x] = T(0);
      for (int64_t i = 0; i < I; ++i) {
        const T* ui = u + i * JK;
        const T* ci = c_t + i * J;
        T* Gi = G + i * J;
        T dot = 0;
        for (int64_t j = 0; j < J; ++j) {
          gc[j] = Dot<T, KT>(gs + j * K, ui + j * K, K);
          dot += ci[j] * gc[j];
        }
        for (int64_t j = 0; j < J; ++j) {
          // logits_(t+1) = logits_t + agreement_t: G flows through unchanged, plus the
          // softmax backward of c_t.
          Gi[j] += ci[j] * (gc[j] - dot);
          alpha_t[i * J + j] = Gi[j];
          Axpy<T, KT>(Gi[j], ui + j * K, gv_next + j * K, K);
        }
      }
      for (int64_t x = 0; x < JK; ++x) gv[x] = gv_next[x];
    }
    SquashGrad<T, KT>(s_keep, gv, gs_keep, J, K, eps);

    // dû written once: every iteration's c_t·gs_t plus every agreement's alpha_t·v_t.
    // This pass must not read û: dû may be û's buffer (in place, see routing.h).
    for (int64_t i = 0; i < I; ++i) {
      for (int64_t j = 0; j < J; ++j) {
        T* d = du + i * JK + j * K;
        const T* gs0 = gs_keep + j * K;
        for (int64_t q = 0; q < K; ++q) d[q] = uniform * gs0[q];
        for (int t = 1; t < R; ++t) {
          Axpy<T, KT>(c_keep[(t - 1) * IJ + i * J + j], gs_keep + t * JK + j * K, d, K);
          Axpy<T, KT>(alpha[(t - 1) * IJ + i * J + j], v_keep + (t - 1) * JK + j * K, d, K);
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
    case 8: return Forward<T, 8>(sh, u, v, begin, end);
    case 16: return Forward<T, 16>(sh, u, v, begin, end);
    default: return Forward<T, 0>(sh, u, v, begin, end);
  }
}

template <typename T>
bool BackwardAnyK(const RoutingShape& sh, const void* u, const void* gv, void* gu,
                  int64_t begin, int64_t end) {
  switch (sh.out_dim) {
    case 8: return Backward<T, 8>(sh, u, gv, gu, begin, end);
    case 16: return Backward<T, 16>(sh, u, gv, gu, begin, end);
    default: return Backward<T, 0>(sh, u, gv, gu, begin, end);
  }
}

}  // namespace

#define SMALLMM_CAT2(a, b) a##b
#define SMALLMM_CAT(a, b) SMALLMM_CAT2(a, b)
extern const RoutingTable SMALLMM_CAT(kRoutingTable_, SMALLMM_ISA);
const RoutingTable SMALLMM_CAT(kRoutingTable_, SMALLMM_ISA) = {
    {&ForwardAnyK<float>, &ForwardAnyK<double>},
    {&BackwardAnyK<float>, &BackwardAnyK<double>}};

}  // namespace smallmm
