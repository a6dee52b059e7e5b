// The fused gradient pair (cc/engine/gemm/pair.h) timed on its own, without TensorFlow or
// Python around it: the capsule prediction's backward pair dW[i] = Σ_b g[b,i]·u[b,i]ᵀ and
// du[b,i] = W[i]ᵀ·g[b,i] for W[I, S, N], u[B, I, N], g[B, I, S], outputs split over threads
// like the op's shards. "hot" reads the same slice of g and u for every output (the
// operands stay in cache), to tell the kernel's own cost from its memory stalls.
//
//   g++ -O3 -std=c++17 -pthread -I. -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma
//       -mf16c -DSMALLMM_ISA=avx512 benchmarks/pair_kernel.cc -o /tmp/pair_kernel
//   /tmp/pair_kernel [threads=1] [hot=0] [B=50] [I=1152] [S=160] [N=8] [float32|float64]
//                    [runs=31]
//
// Prints the median of `runs` (default 31) runs and the time per output per thread, after
// checking dW and du against a plain double-precision loop (exit status 1 if they differ:
// tests/test_kernels.py builds and runs it on small shapes).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "cc/engine/gemm/pair.h"

namespace {

// Whether dW and du match a double-precision loop over the same strides, each element
// within 64 ulps of T of the sum of its terms' magnitudes.
template <typename T>
bool Matches(const smallmm::FusedPair& f, const std::vector<T>& g, const std::vector<T>& u,
             const std::vector<T>& w, const std::vector<T>& dw, const std::vector<T>& du) {
  const smallmm::PairLoop& l = f.out[0];
  const double ulps = 64 * double(std::numeric_limits<T>::epsilon());
  // Whether got is Σ_j a[j·as]·b[j·bs] over j < count.
  auto near = [&](T got, const T* a, int64_t as, const T* b, int64_t bs, int64_t count) {
    double sum = 0, size = 0;
    for (int64_t j = 0; j < count; ++j) {
      const double t = double(a[j * as]) * double(b[j * bs]);
      sum += t;
      size += std::fabs(t);
    }
    return std::fabs(double(got) - sum) <= ulps * size;
  };
  for (int64_t o = 0; o < f.num_outputs; ++o) {
    const T* x = g.data() + o * l.x;     // X[s, r] = x[s + r·x_r]
    const T* y = u.data() + o * l.y;     // Y[r, n] = y[r·y_r + n]
    const T* z = w.data() + o * l.z;     // Z[s, n] = z[s·z_s + n]
    for (int64_t a = 0; a < f.s; ++a) {  // P = X·Y
      for (int64_t k = 0; k < f.n_p; ++k) {
        if (!near(dw[o * l.p + a * f.p_s + k], x + a, f.x_r, y + k, f.y_r, f.r)) return false;
      }
    }
    for (int64_t r = 0; r < f.r; ++r) {  // Q = Xᵀ·Z
      for (int64_t k = 0; k < f.n_q; ++k) {
        if (!near(du[o * l.q + r * f.q_r + k], x + r * f.x_r, 1, z + k, f.z_s, f.s)) return false;
      }
    }
  }
  return true;
}

template <smallmm::DType D, typename T>
int Time(int threads, bool hot, int64_t b, int64_t i, int64_t s, int64_t n, int runs) {
  std::vector<T> g(b * i * s), u(b * i * n), w(i * s * n), dw(i * s * n), du(b * i * n);
  std::mt19937 rng(0);
  std::uniform_real_distribution<T> uniform(-1, 1);
  for (auto* v : {&g, &u, &w})
    for (T& x : *v) x = uniform(rng);
  smallmm::FusedPair f;
  f.s = s;
  f.r = b;
  f.n_p = f.n_q = n;
  f.x = g.data();
  f.y = u.data();
  f.z = w.data();
  f.x_r = i * s;
  f.y_r = f.q_r = i * n;
  f.z_s = f.p_s = n;
  f.p_index = 0;  // P = dW, Q = du
  f.num_out = 1;
  f.out[0] = smallmm::PairLoop{i, hot ? 0 : s, hot ? 0 : n, s * n, s * n, n};
  f.num_outputs = i;
  void* c[2] = {dw.data(), du.data()};
  std::vector<double> times;
  for (int rep = 0; rep < runs; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int k = 0; k < threads; ++k) {
      pool.emplace_back([&, k] {
        if (!smallmm::RunPair<D>(f, c, i * k / threads, i * (k + 1) / threads)) std::abort();
      });
    }
    for (auto& t : pool) t.join();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (!Matches(f, g, u, w, dw, du)) {
    std::fprintf(stderr, "dW or du differs from the reference\n");
    return 1;
  }
  std::sort(times.begin(), times.end());
  const double t = times[times.size() / 2];
  std::printf("B=%ld I=%ld S=%ld N=%ld threads=%d hot=%d: %.3f ms, %.2f us per output per thread\n",
              long(b), long(i), long(s), long(n), threads, int(hot), t * 1e3,
              t * 1e6 * threads / double(i));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  auto arg = [&](int k, long d) { return argc > k ? std::atol(argv[k]) : d; };
  const int threads = int(arg(1, 1));
  const bool hot = arg(2, 0) != 0;
  const int64_t b = arg(3, 50), i = arg(4, 1152), s = arg(5, 160), n = arg(6, 8);
  const int runs = int(arg(8, 31));
  if (threads < 1 || b < 1 || i < 1 || s < 1 || n < 1 || n > smallmm::kFusedPairMaxN || runs < 1) {
    std::fprintf(stderr, "need threads, B, I, S, runs >= 1 and 1 <= N <= %d\n",
                 smallmm::kFusedPairMaxN);
    return 2;
  }
  if (argc > 7 && std::strcmp(argv[7], "float64") == 0) {
    return Time<smallmm::DType::kDouble, double>(threads, hot, b, i, s, n, runs);
  }
  return Time<smallmm::DType::kFloat, float>(threads, hot, b, i, s, n, runs);
}
