// streaming.h — memory traffic of the GEMM kernels: non-temporal stores for outputs far
// larger than the cache, and software prefetch of operand panels whose K steps are pages
// apart. Used by the stationary and packed families. Included only by gemm_isa.cc
// (compiled once per ISA and dtype): everything has internal linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_STREAMING_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_STREAMING_H_

#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>  // static inline intrinsics only: nothing here can leak as a COMDAT
#endif

#include "cc/engine/gemm/common.h"

namespace smallmm {
namespace {

// Outputs at least this large are written with non-temporal stores where whole lines
// are stored at once (bigger than the last-level cache share of a core, so the consumer
// reads them back from memory anyway). d94c004 (2026-11-25): the capsule prediction (37 MB
// output, 2 threads) 2.4 -> 1.1-1.3 ms together with the stationary kernels. Timed
// 2026-12-01 (../README.md, one thread): 4, 16 and 64 MiB give the capsule prediction with
// 8 and 21 MiB outputs and a 35 MiB row-kernel output within 0.90-1.01× of each other.
constexpr uint64_t kStreamBytes = uint64_t(16) << 20;

// Whether an output of `bytes` whose vectors are stored `step_bytes` apart is written with
// non-temporal stores: large enough, and each store a whole cache line of its own. Where
// rows are not whole lines apart (20 floats = 80 bytes) the streamed lines alternate with
// partly written cached ones, which costs far more than it saves: [65536, 20, 20] outputs
// ran at 0.34× tf.matmul that way, 1.12× without (2026-12-02, Zen 5; 16×16, whose rows are
// whole lines, 1.9× streamed).
inline bool StreamOutput(uint64_t bytes, int64_t step_bytes) {
  return bytes >= kStreamBytes && step_bytes % 64 == 0;
}

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

// A run of products whose outputs lie back to back (batched n×n: C[t] follows C[t-1])
// but whose stores are not whole lines (rows of 5..15, 20 or 24 floats) cannot stream
// store by store. Such a run is computed in chunks into a buffer laid out like the
// destination's cache lines, and each whole line is then streamed from it: the output
// costs one memory transfer instead of two (read for ownership, write back), for an extra
// pass through L1. The partial lines at either end of the run take normal stores.
constexpr int64_t kStageBytes = 8 << 10;

// Whether products of `product_bytes` are staged. Paired in one process against the
// kernel's own stores (2026-12-03, Xeon AVX-512, one thread, core.matmul of batched n×n
// float32 with ~8M elements per operand, 15 rounds): n = 8 1.10× and n = 12 1.06× faster
// staged; n = 20..24, whose products are bound by arithmetic rather than memory,
// 0.97-1.01× (n = 16 and 32 stream store by store). n = 5..7 were level too (0.98-1.02×)
// until their products ran straight through (stationary.h OneStripRun); since, with the
// same timing, 1.03× (n = 5, 6) and 1.05× (n = 7). n = 20 and 24 again with RunAhead
// (2026-12-04, 2 threads, the TF op, 15 shuffled rounds against the floor): 0.96× (1.70
// and 1.75× the floor staged, 1.63 and 1.69× not), so they are still not staged.
inline bool StageFits(int64_t product_bytes) {
  return product_bytes >= 64 && product_bytes <= 1024;
}

// run(t0, n, buf) writes the outputs of products t0 .. t0+n-1 back to back at buf;
// together they are the `count` · `product_bytes` bytes at dst.
template <typename Run>
void StagedStream(char* dst, int64_t product_bytes, int64_t count, Run&& run) {
  typedef char Line __attribute__((vector_size(64)));
  alignas(64) char buf[kStageBytes + 64];
  const int64_t per_chunk = kStageBytes / product_bytes;
  const int64_t lead = int64_t(reinterpret_cast<uintptr_t>(dst) % 64);
  char* line = dst - lead;  // the destination line that buf[0] stands for
  int64_t start = lead;     // bytes of buf[0, start) are not ours: never stored
  int64_t fill = lead;
  for (int64_t t0 = 0; t0 < count; t0 += per_chunk) {
    const int64_t n = count - t0 < per_chunk ? count - t0 : per_chunk;
    run(t0, n, buf + fill);
    fill += n * product_bytes;
    const int64_t whole = fill / 64 * 64;
    if (whole == 0) continue;
    int64_t s = 0;
    if (start > 0) {  // the run's first line is shared with whatever precedes it
      memcpy(line + start, buf + start, 64 - start);
      s = 64;
      start = 0;
    }
    for (; s < whole; s += 64) StreamVec(line + s, LoadVec<Line>(buf + s));
    memcpy(buf, buf + whole, fill - whole);
    line += whole;
    fill -= whole;
  }
  memcpy(line + start, buf + start, fill - start);
  StreamFence();
}

// A stride (in elements) at least this long is "far": consecutive steps along it land on
// different pages, so the hardware prefetchers do not follow them. Far operands are
// packed rather than read in place (packed.h), streamed columns copied to a buffer
// (stationary.h), and both prefetched by software (below).
// 002f432 (2026-11-25): the capsule dW read in place, K steps 737 KB apart: 3.1 -> 8.2 ms.
// Timed 2026-12-01 (../README.md, one thread, dW- and du-shaped g[1000, i, 160, 1]): 256
// takes 1.45-1.7× as long at stride 800; reading in place takes 0.35-0.57× of packing's
// time for dW-shaped products with K strides of 1,600-16,000 elements (du-shaped 0.67-1.0×),
// but at 25,600 the results swing from 0.8 to 1.9×. A larger value would win below ~16K; it
// also moves the prefetch and far-tile decisions, so it waits for those to be timed together.
constexpr int64_t kNearStride = 1024;

// Whether a stride is not far (either sign).
inline bool NearStride(int64_t stride) { return stride > -kNearStride && stride < kNearStride; }

// Software prefetch of one operand panel X[off + r*rs + l*ls] (r < rows, l < k). A batch
// axis folded into K or N puts every K step (or column) of a panel on its own page, often
// dozens of them: more concurrent streams than the hardware prefetchers follow, so each
// line would be a demand miss. Prefetching the next product's panels while computing
// this one overlaps those misses with work. Panels over kPrefetchMaxBytes are left alone.
// d94c004 (2026-11-25): ~7% on the capsule dW (2 threads). Timed 2026-12-01 (../README.md,
// one thread): 0, 64 and 256 KiB give the capsule dW and du within 3% of each other.
constexpr int64_t kPrefetchMaxBytes = 64 << 10;

template <DType D>
void PrefetchPanel(const void* x, int64_t off, int64_t rows, int64_t k, int64_t rs, int64_t ls) {
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
  if (n_in <= 0 || n_out <= 0 || NearStride(s_out) || __builtin_mul_overflow(n_in, n_out, &bytes) ||
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

// Software prefetch along a run of products whose operands and outputs lie one after
// another (batched n×n: A[t], B[t] and C[t] follow A[t-1], B[t-1], C[t-1]). A product of
// 20×20 floats is about 200 ns of FMAs, and the hardware prefetchers did not keep its
// three streams far enough ahead: its loads missed and the FMAs waited, so memory and
// arithmetic took turns instead of overlapping. RunAhead keeps one cursor per stream that
// runs kRunAheadBytes (of A, B and C together) ahead of the product being computed,
// spreading the lines over the product (a burst of 50 prefetches at once fills the
// line-fill buffers and stalls the loads behind them) and issuing the rest at Flush():
// OneStripRun issues one line per stream per block of 4 rows (Step()); BlockRun, before
// each block of rows, the lines due in proportion to the rows done (Upto()). BlockRun
// stepped once per k at first: the cursor checks in its inner loop cost it 9-12% in cache
// at n = 20-32. Upto() against that: 1.05-1.14× faster in cache and 1.02-1.17× out of cache
// (a C++ harness of BlockRun, 2026-12-04, Xeon AVX-512, one thread, float32 n×n, 200 and
// 8M/n² products); the TF op (2 threads, 8M elements, 21 shuffled rounds against the
// floor) 1.03-1.07× at n = 20, 24, level at 32. In OneStripRun, whose products are a few
// dozen FMAs, Upto()'s divisions cost 1-8% against Step() (n = 5-12, same harness). Output
// lines are prefetched for writing, unless the output is streamed (those are never read)
// or staged (the buffer is in L1). Paired in one process against no prefetch (2026-12-04,
// Xeon AVX-512, 2 threads, the TF op in tf.function, batched n×n float32 with ~8M elements
// per operand, 15 rounds in shuffled order; time over the bandwidth floor of the same
// rounds): n = 20 2.47 -> 1.89, 24 2.28 -> 1.85, 32 2.11 -> 1.67 (BlockRun); n = 5 2.11 ->
// 1.67, 8 1.84 -> 1.53, 12 1.77 -> 1.56 (OneStripRun); n = 16 1.55 -> 1.41 (the strip
// layers). Distances of 1 and 2 products at n = 20-32, and 1-4 KiB of A at n = 5-12, came
// out alike; prefetching to L2 instead of L1 too; prefetching C's lines for writing
// 1.03-1.05× more at n = 20, 24. Prefetching the whole of the next products at their start
// was level. An AMD EPYC (Zen 4) follows these runs with its own prefetchers, and there
// the software prefetches only cost instructions: paired in one process against no
// prefetch (2026-12-06, 2 threads, a C++ harness of StationaryRun, batched n×n float32
// with ~8M elements per operand, 25-40 rounds in shuffled order, time over a floor of the
// same traffic: A and B read, C written with non-temporal stores), without: n = 5 1.44 ->
// 1.32 and 1.57 -> 1.47, 8 1.61 -> 1.56 and 1.27 -> 1.13, 12 1.28 -> 1.15 and 1.48 ->
// 1.36, 24 1.46 -> 1.31 and 1.47 -> 1.32, 20 1.45 -> 1.33 and 1.41 -> 1.39; with the output
// streamed store by store, n = 32 lost 1.53 -> 1.60, 1.67 -> 1.83 and 1.83 -> 1.93 (and
// was level twice), n = 16 was level. So on AMD RunAhead runs only with streamed outputs
// (RunAheadPays below).
constexpr int64_t kRunAheadBytes = 4 << 10;
// Only outputs this large: smaller runs are mostly in cache, where the prefetches cost
// time and win none. Paired the same way, one thread (_smallmm_core.matmul with
// set_run_prefetch): [200000/n², n, n] operands (2.4 MB in all) 0.89-0.99× for n = 5-16,
// 1.04× for n = 20, 32; [4M/n², n, n] (16 MiB outputs) 0.98× at n = 5, 1.04-1.10× n = 8-32.
constexpr uint64_t kRunAheadMinOutputBytes = kStreamBytes;

// Whether a run writing `output_bytes` (stored non-temporally: `streamed`) prefetches by
// software: large outputs only, and on CPUs whose own prefetchers follow the runs (AMD,
// above) only streamed ones.
inline bool RunAheadPays(uint64_t output_bytes, bool streamed) {
  return RunPrefetch() && output_bytes >= kRunAheadMinOutputBytes &&
         (streamed || !HardwareFollowsRuns());
}

template <DType D>
class RunAhead {
 public:
  // Products t = 0 .. avail-1 of a run: operand X's product t starts at element
  // x_off + t * x_step, its rows x_rs and columns x_cs apart. `on`: prefetch at all;
  // `write`: C's lines too.
  RunAhead(const GemmPlan& p, const void* a, int64_t ao, int64_t sa, const void* b, int64_t bo,
           int64_t sb, const void* c, int64_t co, int64_t sc, int64_t avail, bool on, bool write)
      : avail_(avail) {
    if (!on) return;
    Stream(0, a, ao, sa, p.m, p.k, p.a_rs, p.a_cs);
    Stream(1, b, bo, sb, p.k, p.n, p.b_rs, p.b_cs);
    if (write) Stream(2, c, co, sc, p.m, p.n, p.c_rs, p.c_cs);
    int64_t per_product = 0;
    for (int j = 0; j < 3; ++j) per_product += span_[j];
    ahead_ = per_product > 0 ? (kRunAheadBytes + per_product - 1) / per_product : 0;
  }

  // Aim the cursors at product t + ahead (nothing past the run's last product).
  void Product(int64_t t) {
    const int64_t u = t + ahead_;
    if (ahead_ == 0 || u >= avail_) return;
    for (int j = 0; j < 3; ++j) {
      if (span_[j] == 0) continue;
      const uintptr_t begin = base_[j] + uintptr_t(u * step_[j]);
      // A cursor behind the product (the first, or products apart) jumps to it.
      if (next_[j] < begin || next_[j] > begin + uintptr_t(span_[j])) {
        next_[j] = begin & ~uintptr_t(63);
      }
      end_[j] = begin + uintptr_t(span_[j]);
    }
  }
  // One line of each stream not yet prefetched.
  __attribute__((always_inline)) void Step() {
    Line<0>();
    Line<1>();
    Line<2>();
  }
  // The lines due once `done` of the product's `total` rows are computed: each stream's
  // cursor goes that fraction of the way to its target.
  void Upto(int64_t done, int64_t total) {
    Due<0>(done, total);
    Due<1>(done, total);
    Due<2>(done, total);
  }
  // Every line up to the cursors' targets.
  void Flush() {
    while (next_[0] < end_[0]) Line<0>();
    while (next_[1] < end_[1]) Line<1>();
    while (next_[2] < end_[2]) Line<2>();
  }

 private:
  static constexpr int64_t kBytes = int64_t(DTypeInfo<D>::kBytes);
  // X[r * rs + l * ls] for r < rows, l < cols, as one span of bytes: only where the span
  // is dense enough (at most twice the elements it holds) that its lines are worth having.
  void Stream(int j, const void* x, int64_t off, int64_t step, int64_t rows, int64_t cols,
              int64_t rs, int64_t ls) {
    if (rows <= 0 || cols <= 0 || rs < 0 || ls < 0 || step < 0) return;
    const int64_t span = (rows - 1) * rs + (cols - 1) * ls + 1;
    if (span > 2 * rows * cols) return;
    base_[j] = reinterpret_cast<uintptr_t>(x) + uintptr_t(off * kBytes);
    step_[j] = step * kBytes;
    span_[j] = span * kBytes;
  }
  template <int J>
  __attribute__((always_inline)) void Line() {
    if (next_[J] >= end_[J]) return;
    __builtin_prefetch(reinterpret_cast<const char*>(next_[J]), J == 2 ? 1 : 0, 3);
    next_[J] += 64;
  }
  template <int J>
  void Due(int64_t done, int64_t total) {
    if (next_[J] >= end_[J]) return;
    const uintptr_t due = end_[J] - uintptr_t(span_[J] * (total - done) / total);
    while (next_[J] < due) Line<J>();
  }

  int64_t avail_, ahead_ = 0;
  uintptr_t base_[3] = {0, 0, 0}, next_[3] = {0, 0, 0}, end_[3] = {0, 0, 0};
  int64_t step_[3] = {0, 0, 0}, span_[3] = {0, 0, 0};
};

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_STREAMING_H_
