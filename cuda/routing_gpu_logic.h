// routing_gpu_logic.h — the GPU implementation of the fused dynamic routing (the contract of
// cc/engine/routing.h: same inputs, outputs and maths), written like smallmm_gpu_logic.h: a
// block program of `__host__ __device__` code over plain pointers, run by an executor, so
// that the CUDA kernels (routing_gpu.cu.cc) and the host simulation
// (testing/smallmm_gpu_sim.h) execute the same code.
//
// Work decomposition:
//   row        one batch index b, as on the CPU. Block k handles rows k, k + blocks, ...;
//              all routing iterations of a row run in one block, so no other block ever
//              reads what it writes.
//   workspace  what a row keeps between phases (s, v, Σv, coupling coefficients, the
//              backward pass's per-iteration values), `ws_elems` elements of the dtype per
//              block. The launcher puts it in shared memory when it fits, else in a global
//              scratch buffer (blocks × ws_elems elements); the block program sees one
//              pointer either way, `ex.shared()`, and the simulation checks its accesses
//              like shared memory.
//   chunk      input capsules are taken `chunk` at a time: the chunk's coupling
//              coefficients c[i, :] are formed (one thread per (i, j) for the agreement
//              logits, one per i for the softmax over j), then every thread adds the chunk's
//              c[i, j]·û[i, j, :] into the elements of s it owns (thread t owns the
//              elements x = t, t + threads, ... of every J·K array: no atomics, and each
//              sum runs in a fixed order).
// Phases are separated by barriers; between them a thread reads only what it wrote itself.
// The summation order differs from the CPU kernel's (vector lanes, its own exp): results
// agree within rounding, not bit for bit (tests/test_gpu_simulation.py compares them).
//
// Forward, per row (R iterations, logits start at 0, as in routing.h):
//   s = (1/J)·Σ_i û[i]; v = squash(s); Σv = v
//   for t = 1 .. R-1: per chunk: logits[i, j] = <û[i, j], Σv[j]> (linearity: the running
//   sum of the agreements), c = softmax_j(logits), s += c·û; then v = squash(s), Σv += v.
// Backward: the forward again keeping c_t, s_t, v_t; then, from gv = dL/dv, for t = R-1
// .. 1: gs_t = squash'(s_t)·gv; per chunk gc = <gs_t, û>, G += c_t·(gc - Σ_j c_t·gc)
// (dL/dlogits, which flow unchanged into earlier iterations), alpha_t = G, and
// gv = Σ_i G·û (dL/dv_(t-1)); gs_0 = squash'(s_0)·gv. Last, without reading û (so dû may
// overwrite it): dû[i, j] = gs_0[j]/J + Σ_t (c_t[i, j]·gs_t[j] + alpha_t[i, j]·v_(t-1)[j]).
#ifndef TF_SMALLMM_CUDA_ROUTING_GPU_LOGIC_H_
#define TF_SMALLMM_CUDA_ROUTING_GPU_LOGIC_H_

#include <cmath>
#include <cstdint>

#include "cc/engine/routing.h"
#include "cuda/smallmm_gpu_logic.h"

namespace smallmm {
namespace gpu {

// Threads per routing block; a chunk holds about 2 (i, j) pairs per thread. Not yet
// measured on hardware (no GPU was available): 256 threads keep 8 warps per row in flight.
constexpr int kRoutingThreads = 256;
constexpr int kRoutingPairsPerThread = 2;

SMALLMM_HD SMALLMM_INLINE float SqrtOf(float x) { return ::sqrtf(x); }
SMALLMM_HD SMALLMM_INLINE double SqrtOf(double x) { return ::sqrt(x); }
SMALLMM_HD SMALLMM_INLINE float ExpOf(float x) { return ::expf(x); }
SMALLMM_HD SMALLMM_INLINE double ExpOf(double x) { return ::exp(x); }

// The launch and the workspace layout (offsets in elements of the dtype); a POD kernel
// argument. Forward: s, vsum [J·K], f [J], cb [chunk·J]. Backward: s, v, gs [R][J·K],
// vsum, gv, gv_next [J·K], f, f2 [J], G [I·J], c, alpha [R-1][I·J].
struct RoutingConfig {
  RoutingShape shape;
  bool backward = false;
  int threads = 0;
  int chunk = 1;
  int64_t blocks = 0;
  int64_t s = 0, v = 0, gs = 0, vsum = 0, gv = 0, gv_next = 0, f = 0, f2 = 0, cb = 0;
  int64_t g = 0, c = 0, alpha = 0;
  int64_t ws_elems = 0;
};

// Lays out the workspace for `threads` threads and at most `max_blocks` blocks. Returns
// nullptr or a static message; the shape must have passed CheckRouting.
inline const char* MakeRoutingConfig(const RoutingShape& sh, bool backward, int threads,
                                     int64_t max_blocks, RoutingConfig* out) {
  if (threads < 1 || threads > 1024) return "threads per block must be in [1, 1024]";
  if (max_blocks < 1) return "max_blocks must be positive";
  RoutingConfig c;
  c.shape = sh;
  c.backward = backward;
  c.threads = threads;
  const int64_t I = sh.in_caps, J = sh.out_caps, JK = sh.out_caps * sh.out_dim;
  const int64_t R = sh.iterations;
  c.chunk = int(Max<int64_t>(
      1, Min<int64_t>(Max<int64_t>(I, 1), kRoutingPairsPerThread * threads / Max<int64_t>(J, 1))));
  c.blocks = Max<int64_t>(1, Min<int64_t>(sh.batch, max_blocks));
  int64_t at = 0;
  auto take = [&](int64_t n) {
    const int64_t here = at;
    at += n;
    return here;
  };
  const int64_t per_t = backward ? R : 1;  // s, v, gs are kept per iteration backward
  c.s = take(per_t * JK);
  c.vsum = take(JK);
  c.f = take(J);
  if (backward) {
    c.v = take(R * JK);
    c.gs = take(R * JK);
    c.gv = take(JK);
    c.gv_next = take(JK);
    c.f2 = take(J);
    c.g = take(I * J);
    c.c = take((R - 1) * I * J);
    c.alpha = take((R - 1) * I * J);
  } else {
    c.cb = take(int64_t(c.chunk) * J);
  }
  c.ws_elems = at;
  *out = c;
  return nullptr;
}

// The block program's shorthand for the workspace: element x of the array at offset `off`.
template <typename T, class Ex>
struct Workspace {
  Ex& ex;
  T* base;
  SMALLMM_HD SMALLMM_INLINE T Get(int64_t off, int64_t x) { return ex.Read(base + off + x); }
  SMALLMM_HD SMALLMM_INLINE void Set(int64_t off, int64_t x, T v) { ex.Write(base + off + x, v); }
};

// v = squash(s) over J capsules of K values: f[j] = |s_j|² / ((1 + |s_j|²)·√(|s_j|² + ε)),
// then v[x] = f[j]·s[x]; Σv gets v (t = 0) or += v; the last iteration also writes v_out.
// With `v_keep` >= 0 v is also kept there.
template <typename T, class Ex>
SMALLMM_HD SMALLMM_INLINE void SquashPhase(Ex& ex, Workspace<T, Ex>& w, const RoutingConfig& cfg,
                                           int64_t s_off, int64_t v_keep, bool first, T* v_out,
                                           int64_t out_base) {
  const int T_ = cfg.threads;
  const int64_t J = cfg.shape.out_caps, K = cfg.shape.out_dim;
  const T eps = T(cfg.shape.epsilon);
  ex.ForEachThread([&](int t, auto&) {
    for (int64_t j = t; j < J; j += T_) {
      T n2 = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T x = w.Get(s_off, j * K + k);
        n2 += x * x;
      }
      w.Set(cfg.f, j, n2 / ((T(1) + n2) * SqrtOf(n2 + eps)));
    }
  });
  ex.Barrier();
  ex.ForEachThread([&](int t, auto&) {
    for (int64_t x = t; x < J * K; x += T_) {
      const T v = w.Get(cfg.f, x / K) * w.Get(s_off, x);
      w.Set(cfg.vsum, x, first ? v : w.Get(cfg.vsum, x) + v);
      if (v_keep >= 0) w.Set(v_keep, x, v);
      if (v_out != nullptr) {
        ex.OnStore(out_base + x);
        v_out[out_base + x] = v;
      }
    }
  });
  ex.Barrier();
}

// gs = squash'(s)·gv (routing_isa.cc's SquashGrad): with n2 = |s|², g = 1/((1+n2)·√(n2+ε)),
// gs = n2·g·gv + 2·g·(1/(1+n2) - n2/(2(n2+ε)))·<gv, s>·s.
template <typename T, class Ex>
SMALLMM_HD SMALLMM_INLINE void SquashGradPhase(Ex& ex, Workspace<T, Ex>& w,
                                               const RoutingConfig& cfg, int64_t s_off,
                                               int64_t gs_off) {
  const int T_ = cfg.threads;
  const int64_t J = cfg.shape.out_caps, K = cfg.shape.out_dim;
  const T eps = T(cfg.shape.epsilon);
  ex.ForEachThread([&](int t, auto&) {
    for (int64_t j = t; j < J; j += T_) {
      T n2 = T(0), gd = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T s = w.Get(s_off, j * K + k);
        n2 += s * s;
        gd += w.Get(cfg.gv, j * K + k) * s;
      }
      const T g = T(1) / ((T(1) + n2) * SqrtOf(n2 + eps));
      const T fprime = g * (T(1) / (T(1) + n2) - n2 / (T(2) * (n2 + eps)));
      w.Set(cfg.f, j, n2 * g);
      // A non-finite <gv, s> makes gs[j] NaN in all K, never ±Inf (routing.h's NaN/Inf
      // rule): gd - gd is 0 exactly when gd is finite, and NaN otherwise.
      w.Set(cfg.f2, j, gd - gd == T(0) ? T(2) * fprime * gd : gd - gd);
    }
  });
  ex.Barrier();
  ex.ForEachThread([&](int t, auto&) {
    for (int64_t x = t; x < J * K; x += T_) {
      const int64_t j = x / K;
      w.Set(gs_off, x, w.Get(cfg.f, j) * w.Get(cfg.gv, x) + w.Get(cfg.f2, j) * w.Get(s_off, x));
    }
  });
  ex.Barrier();
}

// One row's forward iterations. Keeps s_t, v_t and c_t in the workspace when backward.
template <typename T, class Ex>
SMALLMM_HD SMALLMM_INLINE void RoutingForwardRow(Ex& ex, Workspace<T, Ex>& w,
                                                 const RoutingConfig& cfg, const T* u_all,
                                                 int64_t row, T* v_out) {
  const RoutingShape& sh = cfg.shape;
  const int T_ = cfg.threads;
  const int64_t I = sh.in_caps, J = sh.out_caps, K = sh.out_dim, JK = J * K;
  const int R = sh.iterations;
  const bool keep = cfg.backward;
  const int64_t ubase = row * I * JK;
  auto u = [&](int64_t i, int64_t x) {
    ex.OnLoad(0, ubase + i * JK + x);
    return u_all[ubase + i * JK + x];
  };
  T* out = keep ? nullptr : v_out;
  // Iteration 0: c = 1/J everywhere.
  const T uniform = J > 0 ? T(1) / T(J) : T(0);
  ex.ForEachThread([&](int t, auto&) {
    for (int64_t x = t; x < JK; x += T_) {
      T acc = T(0);
      for (int64_t i = 0; i < I; ++i) acc += u(i, x);
      w.Set(cfg.s, x, acc * uniform);
    }
  });
  ex.Barrier();
  SquashPhase<T>(ex, w, cfg, cfg.s, keep ? cfg.v : -1, true, R == 1 ? out : nullptr, row * JK);

  for (int it = 1; it < R; ++it) {
    const int64_t s_off = keep ? cfg.s + it * JK : cfg.s;
    for (int64_t i0 = 0; i0 < I; i0 += cfg.chunk) {
      const int64_t n = Min<int64_t>(cfg.chunk, I - i0);
      // Where this chunk's coefficients live: kept per iteration backward, else scratch.
      const int64_t cb = keep ? cfg.c + (it - 1) * I * J + i0 * J : cfg.cb;
      ex.ForEachThread([&](int t, auto&) {  // agreement logits, one (i, j) per thread
        for (int64_t q = t; q < n * J; q += T_) {
          const int64_t i = i0 + q / J, j = q - (q / J) * J;
          T a = T(0);
          for (int64_t k = 0; k < K; ++k) a += u(i, j * K + k) * w.Get(cfg.vsum, j * K + k);
          w.Set(cb, q, a);
        }
      });
      ex.Barrier();
      ex.ForEachThread([&](int t, auto&) {  // softmax over j, one capsule per thread
        for (int64_t q = t; q < n; q += T_) {
          // As on the CPU: a NaN logit never becomes the maximum but makes its exps NaN.
          T m = w.Get(cb, q * J);
          for (int64_t j = 1; j < J; ++j) {
            const T a = w.Get(cb, q * J + j);
            m = a > m ? a : m;
          }
          T sum = T(0);
          for (int64_t j = 0; j < J; ++j) {
            const T e = ExpOf(w.Get(cb, q * J + j) - m);
            w.Set(cb, q * J + j, e);
            sum += e;
          }
          const T inv = T(1) / sum;
          for (int64_t j = 0; j < J; ++j) w.Set(cb, q * J + j, w.Get(cb, q * J + j) * inv);
        }
      });
      ex.Barrier();
      ex.ForEachThread([&](int t, auto&) {  // s += c·û over the chunk
        for (int64_t x = t; x < JK; x += T_) {
          const int64_t j = x / K;
          T acc = i0 == 0 ? T(0) : w.Get(s_off, x);
          for (int64_t q = 0; q < n; ++q) acc += w.Get(cb, q * J + j) * u(i0 + q, x);
          w.Set(s_off, x, acc);
        }
      });
      ex.Barrier();
    }
    if (I == 0) {  // no capsule: s stays 0
      ex.ForEachThread([&](int t, auto&) {
        for (int64_t x = t; x < JK; x += T_) w.Set(s_off, x, T(0));
      });
      ex.Barrier();
    }
    SquashPhase<T>(ex, w, cfg, s_off, keep ? cfg.v + it * JK : -1, false,
                   it == R - 1 ? out : nullptr, row * JK);
  }
}

// One block's rows of the forward op: v [batch, J, K] from û [batch, I, J, K].
template <typename T, class Ex>
SMALLMM_HD void RunRoutingForwardBlock(Ex& ex, const RoutingConfig& cfg, const T* u_hat, T* v,
                                       int64_t block) {
  Workspace<T, Ex> w{ex, reinterpret_cast<T*>(ex.shared())};
  for (int64_t row = block; row < cfg.shape.batch; row += cfg.blocks) {
    RoutingForwardRow<T>(ex, w, cfg, u_hat, row, v);
  }
}

// One block's rows of the backward op: dû [batch, I, J, K] from û and dL/dv [batch, J, K].
// grad_u may be u_hat (in place): a row's last phase writes dû without reading û.
template <typename T, class Ex>
SMALLMM_HD void RunRoutingBackwardBlock(Ex& ex, const RoutingConfig& cfg, const T* u_hat,
                                        const T* grad_v, T* grad_u, int64_t block) {
  const RoutingShape& sh = cfg.shape;
  const int T_ = cfg.threads;
  const int64_t I = sh.in_caps, J = sh.out_caps, K = sh.out_dim, JK = J * K, IJ = I * J;
  const int R = sh.iterations;
  const T uniform = J > 0 ? T(1) / T(J) : T(0);
  Workspace<T, Ex> w{ex, reinterpret_cast<T*>(ex.shared())};
  for (int64_t row = block; row < sh.batch; row += cfg.blocks) {
    const int64_t ubase = row * I * JK;
    auto u = [&](int64_t i, int64_t x) {
      ex.OnLoad(0, ubase + i * JK + x);
      return u_hat[ubase + i * JK + x];
    };
    RoutingForwardRow<T>(ex, w, cfg, u_hat, row, nullptr);
    ex.ForEachThread([&](int t, auto&) {
      for (int64_t x = t; x < JK; x += T_) {
        ex.OnLoad(1, row * JK + x);
        w.Set(cfg.gv, x, grad_v[row * JK + x]);
      }
      for (int64_t q = t; q < IJ; q += T_) w.Set(cfg.g, q, T(0));
    });
    ex.Barrier();
    for (int it = R - 1; it >= 1; --it) {
      const int64_t gs = cfg.gs + it * JK;
      SquashGradPhase<T>(ex, w, cfg, cfg.s + it * JK, gs);
      const int64_t c_t = cfg.c + (it - 1) * IJ, alpha_t = cfg.alpha + (it - 1) * IJ;
      for (int64_t i0 = 0; i0 < I; i0 += cfg.chunk) {
        const int64_t n = Min<int64_t>(cfg.chunk, I - i0);
        ex.ForEachThread([&](int t, auto&) {  // gc = <gs, û> into alpha_t (scratch here)
          for (int64_t q = t; q < n * J; q += T_) {
            const int64_t i = i0 + q / J, j = q - (q / J) * J;
            T a = T(0);
            for (int64_t k = 0; k < K; ++k) a += u(i, j * K + k) * w.Get(gs, j * K + k);
            w.Set(alpha_t, i * J + j, a);
          }
        });
        ex.Barrier();
        ex.ForEachThread([&](int t, auto&) {  // softmax backward into G, per capsule
          for (int64_t i = i0 + t; i < i0 + n; i += T_) {
            T dot = T(0);
            for (int64_t j = 0; j < J; ++j)
              dot += w.Get(c_t, i * J + j) * w.Get(alpha_t, i * J + j);
            for (int64_t j = 0; j < J; ++j) {
              const T g = w.Get(cfg.g, i * J + j) +
                          w.Get(c_t, i * J + j) * (w.Get(alpha_t, i * J + j) - dot);
              w.Set(cfg.g, i * J + j, g);
              w.Set(alpha_t, i * J + j, g);
            }
          }
        });
        ex.Barrier();
        ex.ForEachThread([&](int t, auto&) {  // dL/dv_(t-1) = Σ_i G·û
          for (int64_t x = t; x < JK; x += T_) {
            const int64_t j = x / K;
            T acc = i0 == 0 ? T(0) : w.Get(cfg.gv_next, x);
            for (int64_t q = 0; q < n; ++q) acc += w.Get(cfg.g, (i0 + q) * J + j) * u(i0 + q, x);
            w.Set(cfg.gv_next, x, acc);
          }
        });
        ex.Barrier();
      }
      ex.ForEachThread([&](int t, auto&) {
        for (int64_t x = t; x < JK; x += T_) w.Set(cfg.gv, x, I > 0 ? w.Get(cfg.gv_next, x) : T(0));
      });
      ex.Barrier();
    }
    SquashGradPhase<T>(ex, w, cfg, cfg.s, cfg.gs);
    // dû, written once per element; û is not read any more (in place allowed).
    ex.ForEachThread([&](int t, auto&) {
      for (int64_t e = t; e < I * JK; e += T_) {
        const int64_t i = e / JK, x = e - i * JK, j = x / K;
        T d = uniform * w.Get(cfg.gs, x);
        for (int it = 1; it < R; ++it) {
          d += w.Get(cfg.c + (it - 1) * IJ, i * J + j) * w.Get(cfg.gs + it * JK, x);
          d += w.Get(cfg.alpha + (it - 1) * IJ, i * J + j) * w.Get(cfg.v + (it - 1) * JK, x);
        }
        ex.OnStore(ubase + e);
        grad_u[ubase + e] = d;
      }
    });
    ex.Barrier();  // the next row reuses the workspace
  }
}

}  // namespace gpu
}  // namespace smallmm

#endif  // TF_SMALLMM_CUDA_ROUTING_GPU_LOGIC_H_
