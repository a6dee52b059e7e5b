// Batched n×n float32 products (cc/engine/gemm/stationary.h StationaryRun) timed on their
// own, without TensorFlow or Python around them, against the floor of their own memory
// traffic: the same threads reading A and B and writing C with non-temporal stores
// (C = A + B), which is what the kernel moves at best. Each round runs the kernel with
// RunAhead's software prefetch as this CPU gets it (streaming.h, HardwareFollowsRuns), on
// and off, and the floor, in an order shuffled each round; the figures are medians over the
// rounds of each time over the floor of its round. The batch is split over the threads in
// contiguous halves, as the op's shards do. At n = 32 with AVX-512 a fourth run takes
// BlockRun with B's strips copied before each product (kInPlace off, as before B's rows were
// read where they lie), prefetching as the CPU gets it.
//
//   g++ -O3 -std=c++17 -pthread -I. -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma
//       -mf16c -DSMALLMM_ISA=avx512 benchmarks/nn_kernel.cc -o /tmp/nn_kernel
//   /tmp/nn_kernel [n=32] [threads=2] [rounds=30] [elements per operand=8000000]
//
// n is one of kSizes below (5 to 32). Checks the products against a double-precision loop first
// (exit status 1 if they differ: tests/test_kernels.py builds and runs it on small runs).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "cc/engine/gemm/stationary.h"

namespace smallmm {
namespace {
int prefetch_mode = 0;  // 0: as the CPU gets it, 1: on everywhere, 2: off (3: as 0)
}  // namespace
// The engine's switches (cc/engine/isa.cc, which this program does not link).
bool OutputStaging() { return true; }
bool OneStripRuns() { return true; }
bool FusedPairs() { return true; }
bool RunPrefetch() { return prefetch_mode != 2; }
bool HardwareFollowsRuns() {
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return (prefetch_mode == 0 || prefetch_mode == 3) && amd;
}
bool Bf16Dot() { return false; }
}  // namespace smallmm

namespace {

using smallmm::DType;
using smallmm::GemmPlan;

// The sizes the stationary family runs (smaller ones go to the tiny kernels).
constexpr int kSizes[] = {5, 6, 7, 8, 12, 16, 20, 24, 32};

template <int N>
void Run(const GemmPlan& p, const float* a, const float* b, float* c, int64_t t0, int64_t t1) {
  if constexpr (N <= smallmm::kStationaryMaxKOf<DType::kFloat>) {
    constexpr int64_t s = int64_t(N) * N;
    smallmm::StationaryRun<DType::kFloat, N>(p, a, b, c, t1 - t0, t0 * s, s, t0 * s, s, t0 * s, s);
  }
}

// BlockRun with B's strips copied: n = 32 float32, two AVX-512 strips, as StationaryRun
// runs it but for the copies.
constexpr bool kCopiedRuns =
    smallmm::kBlockRun<DType::kFloat> && smallmm::kStripLanes<DType::kFloat> == 16;
template <bool kOn = kCopiedRuns>  // a template, so that other ISAs never instantiate it
void RunCopied(const GemmPlan& p, const float* a, const float* b, float* c, int64_t t0,
               int64_t t1) {
  if constexpr (kOn) {
    constexpr int64_t s = 32 * 32;
    const bool stream = smallmm::StreamOutput(uint64_t(p.output_elements) * sizeof(float),
                                              32 * int64_t(sizeof(float)));
    smallmm::RunAhead<DType::kFloat> ahead(
        p, a, t0 * s, s, b, t0 * s, s, c, t0 * s, s, p.num_outputs - t0,
        smallmm::RunAheadPays(uint64_t(p.output_elements) * sizeof(float), stream), !stream);
    smallmm::BlockRun<DType::kFloat, 16, 2, 32, true, false>(p, a, t0 * s, s, b, t0 * s, s, c,
                                                             t0 * s, s, t1 - t0, stream, ahead);
    if (stream) smallmm::StreamFence();
  }
}

template <int... I>
bool RunN(int n, const GemmPlan& p, const float* a, const float* b, float* c, int64_t t0,
          int64_t t1, std::integer_sequence<int, I...>) {
  return ((n == kSizes[I] ? (Run<kSizes[I]>(p, a, b, c, t0, t1), true) : false) || ...);
}

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  auto arg = [&](int k, long d) { return argc > k ? std::atol(argv[k]) : d; };
  const int n = int(arg(1, 32)), threads = int(arg(2, 2)), rounds = int(arg(3, 30));
  const int64_t elements = arg(4, 8000000);
  constexpr int kNumSizes = int(sizeof(kSizes) / sizeof(kSizes[0]));
  if (std::find(kSizes, kSizes + kNumSizes, n) == kSizes + kNumSizes || threads < 1 || rounds < 1 ||
      elements < int64_t(n) * n * threads) {
    std::fprintf(stderr,
                 "need n in {5, 6, 7, 8, 12, 16, 20, 24, 32}, threads, rounds >= 1 "
                 "and elements >= n² · threads\n");
    return 2;
  }
  const int64_t count = elements / (int64_t(n) * n), total = count * n * n;
  // 64-byte aligned, like TensorFlow's buffers.
  auto buffer = [&] {
    const size_t bytes = (size_t(total) * sizeof(float) + 63) / 64 * 64;
    return std::unique_ptr<float, decltype(&std::free)>(
        static_cast<float*>(std::aligned_alloc(64, bytes)), &std::free);
  };
  auto a = buffer(), b = buffer(), c = buffer(), floor_c = buffer();
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(-1, 1);
  for (int64_t i = 0; i < total; ++i) a.get()[i] = uniform(rng), b.get()[i] = uniform(rng);
  GemmPlan p;
  p.m = p.n = p.k = n;
  p.a_rs = p.b_rs = p.c_rs = n;
  p.a_cs = p.b_cs = p.c_cs = 1;
  p.num_out = 1;
  p.out[0] = smallmm::Loop{count, int64_t(n) * n, int64_t(n) * n, int64_t(n) * n};
  p.num_outputs = count;
  p.output_elements = total;
  if (!smallmm::CanStationary<DType::kFloat>(p)) {
    std::fprintf(stderr, "%d×%d products run on another kernel family with this ISA\n", n, n);
    return 3;
  }

  auto parallel = [&](auto&& fn) {
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(fn, t);
    fn(0);
    for (auto& t : pool) t.join();
  };
  auto ours = [&](int t) {
    const int64_t t0 = count * t / threads, t1 = count * (t + 1) / threads;
    if (smallmm::prefetch_mode == 3) {
      RunCopied(p, a.get(), b.get(), c.get(), t0, t1);
    } else {
      RunN(n, p, a.get(), b.get(), c.get(), t0, t1, std::make_integer_sequence<int, kNumSizes>());
    }
  };
  const bool copied = n == 32 && kCopiedRuns;
  // The floor: the same bytes read and written, C streamed past the cache a line at a time
  // (streaming.h StreamVec, as the kernels stream theirs).
  auto floor = [&](int t) {
    typedef float Line __attribute__((vector_size(64)));
    constexpr int kLanes = 16;  // whole lines, each thread's range starting on one
    const int64_t lo = total * t / threads / kLanes * kLanes;
    const int64_t hi = t + 1 == threads ? total : total * (t + 1) / threads / kLanes * kLanes;
    const float *x = a.get(), *y = b.get();
    float* out = floor_c.get();
    int64_t i = lo;
    for (; i + kLanes <= hi; i += kLanes) {
      smallmm::StreamVec(out + i, smallmm::LoadVec<Line>(x + i) + smallmm::LoadVec<Line>(y + i));
    }
    for (; i < hi; ++i) out[i] = x[i] + y[i];
    smallmm::StreamFence();
  };

  auto wrong = [&] {
    for (int64_t t : {int64_t(0), count / 2, count - 1}) {
      for (int i = 0; i < n; ++i) {
        for (int j = 0; j < n; ++j) {
          double want = 0, size = 0;
          for (int l = 0; l < n; ++l) {
            const double term = double(a.get()[(t * n + i) * n + l]) * b.get()[(t * n + l) * n + j];
            want += term;
            size += std::fabs(term);
          }
          const float got = c.get()[(t * n + i) * n + j];
          if (std::fabs(got - want) > 1e-5 * size + 1e-30) {
            std::fprintf(stderr, "product %ld C[%d, %d] = %g, want %g\n", long(t), i, j, got, want);
            return true;
          }
        }
      }
    }
    return false;
  };
  for (int mode : {0, 3}) {
    if (mode == 3 && !copied) continue;
    smallmm::prefetch_mode = mode;
    parallel(ours);
    if (wrong()) return 1;
  }

  // Prefetch modes 0, 1, 2, the copied strips (3) where they run, and the floor (last).
  const int runs = copied ? 5 : 4;
  std::vector<std::vector<double>> ratio(runs - 1), time(runs);
  std::mt19937 order_rng(1);
  std::vector<int> order(runs);
  for (int v = 0; v < runs; ++v) order[v] = v;
  for (int r = 0; r < rounds + 1; ++r) {
    std::shuffle(order.begin(), order.end(), order_rng);
    std::vector<double> t(runs);
    for (int v : order) {
      const double start = Seconds();
      if (v == runs - 1) {
        parallel(floor);
      } else {
        smallmm::prefetch_mode = v;
        parallel(ours);
      }
      t[v] = Seconds() - start;
    }
    if (r == 0) continue;  // warm-up
    for (int v = 0; v < runs; ++v) time[v].push_back(t[v]);
    for (int v = 0; v + 1 < runs; ++v) ratio[v].push_back(t[v] / t[runs - 1]);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double floor_s = median(time[runs - 1]);
  std::printf("n=%d count=%ld threads=%d floor %.3f ms (%.1f GB/s)", n, long(count), threads,
              floor_s * 1e3, 3.0 * double(total) * sizeof(float) / floor_s / 1e9);
  const char* names[] = {"default", "prefetch", "no prefetch", "B copied"};
  for (int v = 0; v + 1 < runs; ++v) {
    std::printf(" | %s %.3f ms %.2fx floor", names[v], median(time[v]) * 1e3, median(ratio[v]));
  }
  std::printf("\n");
  return 0;
}
