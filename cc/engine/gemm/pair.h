// pair.h — both gradients of a shared-operand product in one pass over the upstream
// gradient X (smallmm.h FusedPair): per output, P = X·Y (S×n_p) and Q = Xᵀ·Z (R×n_q).
// Each element of X is loaded once, broadcast, and multiplied into a row of P and a row of
// Q; kSb rows of P (with their rows of Z) stay in registers while the rows of Q (with their
// rows of Y) stream past. X (16 KiB at a time), Y and Z are staged as rows of the
// accumulation type (Y and Z padded to a vector) once per output, so the inner loop does no
// conversions and no partial loads; Z and P stay where they lie when their rows already are
// whole vectors of it (One). Included by gemm_isa.cc (compiled once per ISA and dtype) and by
// benchmarks/pair_kernel.cc, a program of its own built for one ISA.
// The capsule's pair (X = g[:, i]: 50 rows of 160, n = 8) takes ~3.7 µs per output in cache
// (AVX-512 float32, one thread, Xeon), a third of it staging X, and ~1.2-1.7× that out of
// cache. On an AMD EPYC (Zen 4) 4.7 µs in cache: the multiply-adds ~2.95 (1.5 ymm FMAs a
// cycle of 2), staging X 0.65, the rows of W and dW ~0.7 (2026-12-05, pair_kernel.cc with
// parts switched off).
// Timed against it and not kept (2026-12-04, Xeon, a C++ harness of RunPair, in and out of
// cache, one and two processes): rows of 8 floats paired lane-interleaved into full 16-lane
// vectors, a 2×2 tile of X per four FMAs from a row-interleaved second copy of X (half the
// FMAs, but 1.2-1.25× slower: the second copy doubled the staging, and its blocks ran at
// ~55% of the FMA peak on passes of 12 row pairs). The next output's rows, prefetched a
// few before each block (One), came out level there with issuing them while staging, and
// win on AMD EPYC (see One). benchmarks/pair_kernel.cc times Run on its own.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_PAIR_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_PAIR_H_

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cc/engine/gemm/common.h"
#include "cc/engine/smallmm.h"

namespace smallmm {
namespace {

constexpr int kVecRegisters = kVecBytes == 64 ? 32 : 16;

template <DType D, int W>
struct PairKernel {
  using R = typename Traits<D>::R;
  using S = StorageOf<D>;
  using V = typename VecOf<R, W>::type;
  // Registers per row vector (a row wider than the ISA's vectors takes several).
  static constexpr int kPerRow = (W * int(sizeof(R)) + kVecBytes - 1) / kVecBytes;
  // The multiply-adds hold a row as kPerRow vectors of one register each (kLanes lanes, all
  // W where a row fits one). A vector type wider than the ISA's (16 doubles on AVX-512, 16
  // floats or 8 doubles on AVX2) has no machine mode, and GCC ran its arithmetic through the
  // stack: benchmarks/pair_kernel.cc, B = 50, S = 160, one thread, in cache (2026-12-07,
  // Xeon): float64 N = 16 136 -> 17 µs per output with AVX-512; with AVX2 float32 N = 16
  // 305 -> 12, float64 N = 8 285 -> 16, N = 16 398 -> 53. Rows of one register compile
  // to the same code as before (the flat index keeps their address arithmetic).
  static constexpr int kLanes = W / kPerRow;
  using VR = typename VecOf<R, kLanes>::type;
  // 2·kSb (P, Z) + 2·kRb (Q, Y) + 1 broadcast row vectors fit the register file.
  static constexpr int kSb = (kVecRegisters == 32 ? 6 : 3) / kPerRow > 0
                                 ? (kVecRegisters == 32 ? 6 : 3) / kPerRow
                                 : 1;
  static constexpr int kRb = (kVecRegisters == 32 ? 4 : 2) / kPerRow > 0
                                 ? (kVecRegisters == 32 ? 4 : 2) / kPerRow
                                 : 1;

  // Rows of X staged per pass: 16 KiB, which stay in L1 next to the rows of Y, Z, P and Q
  // they meet. Staged, X's rows are contiguous and in the accumulation type: in place they
  // lie a batch row apart, often a multiple of 4 KiB, all in one L1 set, and 16-bit
  // elements would be converted once per use.
  static constexpr int64_t kStageElems = (16 << 10) / int64_t(sizeof(R));
  static constexpr int kL = kVecBytes / int(sizeof(R));  // staging copies in vectors of kL
  using VL = typename VecOf<R, kL>::type;

  // RB rows of Q from r on, against the SB rows of P in pa (staged X columns at xs). Row
  // vectors are indexed flat: row i's v-th vector is [i·kPerRow + v], at i·W + v·kLanes.
  template <int SB, int RB>
  static inline void Rows(const R* xs, int64_t xs_r, const R* ys, R* qacc, int64_t r,
                          const VR (&zr)[SB * kPerRow], VR (&pa)[SB * kPerRow]) {
    constexpr int kQ = RB * kPerRow;
    VR yr[kQ], qa[kQ];
    for (int u = 0; u < kQ; ++u) {
      yr[u] = LoadVec<VR>(ys + (r * kPerRow + u) * kLanes);
      qa[u] = LoadVec<VR>(qacc + (r * kPerRow + u) * kLanes);
    }
    for (int j = 0; j < SB; ++j) {
      for (int u = 0; u < kQ; ++u) {
        // vector * scalar: one broadcast from memory. (V{} + x would add 0.0 in scalar first,
        // which is not an identity for -0.0, on the ports the multiply-adds need.)
        const R b = xs[(r + u / kPerRow) * xs_r + j];
        pa[j * kPerRow + u % kPerRow] += yr[u] * b;
        qa[u] += zr[j * kPerRow + u % kPerRow] * b;
      }
    }
    for (int u = 0; u < kQ; ++u) StoreVec(qacc + (r * kPerRow + u) * kLanes, qa[u]);
  }

  // Rows s0 .. s0 + SB of P (accumulated in pacc) against `rows` rows of Q.
  // first: the first pass over X, which sets P's rows instead of adding to them.
  template <int SB>
  static void Block(int64_t rows, const R* xs, int64_t xs_r, const R* ys, const R* zs, R* qacc,
                    R* pacc, bool first) {
    VR zr[SB * kPerRow], pa[SB * kPerRow];
    for (int t = 0; t < SB * kPerRow; ++t) {
      zr[t] = LoadVec<VR>(zs + t * kLanes);
      pa[t] = first ? VR{} : LoadVec<VR>(pacc + t * kLanes);
    }
    int64_t r = 0;
    for (; r + kRb <= rows; r += kRb) Rows<SB, kRb>(xs, xs_r, ys, qacc, r, zr, pa);
    for (; r < rows; ++r) Rows<SB, 1>(xs, xs_r, ys, qacc, r, zr, pa);
    for (int t = 0; t < SB * kPerRow; ++t) StoreVec(pacc + t * kLanes, pa[t]);
  }

  // The last rows of P, fewer than kSb: one block of exactly that many.
  template <int SB>
  static void Tail(int64_t left, int64_t rows, const R* xs, int64_t xs_r, const R* ys, const R* zs,
                   R* qacc, R* pacc, bool first) {
    if constexpr (SB > 0) {
      if (left == SB) return Block<SB>(rows, xs, xs_r, ys, zs, qacc, pacc, first);
      Tail<SB - 1>(left, rows, xs, xs_r, ys, zs, qacc, pacc, first);
    }
  }

  // Rows of X from which One prefetches the next output's rows.
  static constexpr int64_t kPrefetchMinRows = 6;

  static int64_t StageRows(const FusedPair& f) {
    return f.s >= kStageElems ? 1 : kStageElems / f.s;
  }
  // Scratch elements: Y, Q (R×W), Z, P (S×W), a pass of X and a vector of slack.
  static bool ScratchElems(const FusedPair& f, int64_t* elems) {
    int64_t rw, sw, xs;
    return !__builtin_mul_overflow(f.r, int64_t(2 * W), &rw) &&
           !__builtin_mul_overflow(f.s, int64_t(2 * W), &sw) &&
           !__builtin_mul_overflow(StageRows(f), f.s, &xs) &&
           !__builtin_add_overflow(rw, sw, elems) && !__builtin_add_overflow(*elems, xs, elems) &&
           !__builtin_add_overflow(*elems, int64_t(kL), elems) &&
           uint64_t(*elems) <= SIZE_MAX / sizeof(R);
  }

  // The next output's rows of X, Y and Q, which One prefetches: they are more streams, a
  // batch row apart, than the hardware prefetcher follows (x null: no next output).
  struct Next {
    const S* x;
    const S* y;
    const S* q;
  };

  // One output: X at x, Y at y, Z at z, P to p, Q to q.
  static void One(const FusedPair& f, const S* x, const Next& next, const S* y, const S* z, S* p,
                  S* q, R* scratch) {
    R* ys = scratch;
    R* qacc = ys + f.r * W;
    R* z_staged = qacc + f.r * W;
    R* p_staged = z_staged + f.s * W;
    R* xs = p_staged + f.s * W;
    // Z and P are used where they lie when their rows already are whole vectors of R one
    // after another (float32 / float64, n = W, as the capsule's W[i] and dW[i]), and P's
    // first pass sets its rows: staging Z, zeroing P and copying it out took 14-18% of each
    // output. pair_kernel.cc, the capsule's pair (2026-12-06, AMD EPYC; builds before and
    // after in a shuffled order, 10-12 rounds, two runs): 0.86-0.89× on two threads out of
    // cache (9-11 of 12 faster), 0.82-0.83× on one in cache (all faster).
    constexpr bool kInPlace = std::is_same_v<S, R>;
    const bool z_in_place = kInPlace && f.n_q == W && f.z_s == W;
    const bool p_in_place = kInPlace && f.n_p == W && f.p_s == W;
    const R* zs = z_in_place ? reinterpret_cast<const R*>(z) : z_staged;
    R* pacc = p_in_place ? reinterpret_cast<R*>(p) : p_staged;
    for (int64_t r = 0; r < f.r; ++r) {
      StoreVec(ys + r * W, LoadLanes<D, W>(y + r * f.y_r, int(f.n_p)));
      StoreVec(qacc + r * W, V{});
    }
    for (int64_t s = 0; s < f.s; ++s) {
      if (!z_in_place) StoreVec(z_staged + s * W, LoadLanes<D, W>(z + s * f.z_s, int(f.n_q)));
      if (f.r == 0) StoreVec(pacc + s * W, V{});  // no pass sets P (PlanFusedPair has r >= 1)
    }
    const int64_t pass = StageRows(f);
    // The next output's rows are prefetched a few at a time before each block, so that
    // their misses overlap this output's multiply-adds. Issued all at once while staging
    // (the capsule's 50 rows of X: 500 lines, and 100 of Y and Q), they filled the miss
    // buffers and stalled the staging copy. benchmarks/pair_kernel.cc, the capsule's pair
    // (B = 50, W[1152, 160, 8], float32; 2026-12-05, AMD EPYC Zen 4; builds before and
    // after run alternately, medians of 31): 7.3-7.9 -> 5.7-6.5 µs per output on one
    // thread, 4.1-4.2 -> 3.2-3.3 ms for all on two; in cache 4.6 -> 4.7 µs. With fewer
    // than kPrefetchMinRows rows the hardware prefetcher follows them on its own: B = 4,
    // S = 20 took 0.13 µs per output without prefetches and 0.14 with them; B = 6 and 8
    // (S = 24) 0.30 -> 0.28-0.30 and 0.41 -> 0.35 with them.
    // The rows of X go to L2 (prefetcht1), not L1: the next output's X is as large as L1
    // (the capsule's 50 rows of 160 floats, 32 KiB) and evicted this output's staged rows
    // and accumulators from it; the staging copy reads them from L2. pair_kernel.cc as
    // above (2026-12-06, builds before and after run alternately): 4.0-4.25 -> 3.46-3.59 ms
    // on two threads, 7.14-7.41 -> 6.46-6.52 µs per output on one. Paired in one process
    // against it, prefetcht2 came out the same, and Y's and Q's rows to L2 too 1-3% slower.
    const int64_t blocks = (f.r + pass - 1) / pass * ((f.s + kSb - 1) / kSb);
    const int64_t per_block = (f.r + blocks - 1) / blocks;
    const int64_t row_bytes = f.s * int64_t(sizeof(S));
    int64_t ahead = 0;  // the next output's rows prefetched so far
    auto prefetch_next = [&] {
      if (next.x == nullptr || f.r < kPrefetchMinRows) return;
      const int64_t end = ahead + per_block < f.r ? ahead + per_block : f.r;
      for (; ahead < end; ++ahead) {
        // Every line the row touches, from the one its first element lies in.
        const uintptr_t row = reinterpret_cast<uintptr_t>(next.x + ahead * f.x_r);
        for (uintptr_t l = row & ~uintptr_t(63); l < row + row_bytes; l += 64) {
          __builtin_prefetch(reinterpret_cast<const void*>(l), 0, 2);
        }
        __builtin_prefetch(next.y + ahead * f.y_r, 0, 3);
        __builtin_prefetch(next.q + ahead * f.q_r, 1, 3);
      }
    };
    for (int64_t r0 = 0; r0 < f.r; r0 += pass) {
      const int64_t rows = f.r - r0 < pass ? f.r - r0 : pass;
      // Stage X[:, r0 .. r0 + rows) as rows of S (a row's last vector spills zeros into the
      // next row's start, overwritten by that row, or into the slack).
      for (int64_t r = 0; r < rows; ++r) {
        const S* row = x + (r0 + r) * f.x_r;
        for (int64_t s = 0; s < f.s; s += kL) {
          const int n = f.s - s < kL ? int(f.s - s) : kL;
          StoreVec(xs + r * f.s + s, LoadLanes<D, kL>(row + s, n));
        }
      }
      int64_t s0 = 0;
      for (; s0 + kSb <= f.s; s0 += kSb) {
        prefetch_next();
        Block<kSb>(rows, xs + s0, f.s, ys + r0 * W, zs + s0 * W, qacc + r0 * W, pacc + s0 * W,
                   r0 == 0);
      }
      prefetch_next();
      Tail<kSb - 1>(f.s - s0, rows, xs + s0, f.s, ys + r0 * W, zs + s0 * W, qacc + r0 * W,
                    pacc + s0 * W, r0 == 0);
    }
    for (int64_t s = 0; !p_in_place && s < f.s; ++s) {
      StoreLanes<D, W>(p + s * f.p_s, LoadVec<V>(pacc + s * W), int(f.n_p));
    }
    for (int64_t r = 0; r < f.r; ++r) {
      StoreLanes<D, W>(q + r * f.q_r, LoadVec<V>(qacc + r * W), int(f.n_q));
    }
  }

  static bool Run(const FusedPair& f, void* const c[2], int64_t begin, int64_t end) {
    int64_t elems;
    if (!ScratchElems(f, &elems)) return false;
    R* scratch = static_cast<R*>(malloc(sizeof(R) * size_t(elems)));
    if (scratch == nullptr) return false;
    const S* x = static_cast<const S*>(f.x);
    const S* y = static_cast<const S*>(f.y);
    const S* z = static_cast<const S*>(f.z);
    S* p = static_cast<S*>(c[f.p_index]);
    S* q = static_cast<S*>(c[1 - f.p_index]);
    // Offsets of output o along the loop nest.
    auto offsets = [&](int64_t o, int64_t* off) {
      for (int k = 0; k < 5; ++k) off[k] = 0;
      for (int d = f.num_out - 1; d >= 0; --d) {
        const PairLoop& l = f.out[d];
        const int64_t i = o % l.size;
        o /= l.size;
        off[0] += i * l.x;
        off[1] += i * l.y;
        off[2] += i * l.z;
        off[3] += i * l.p;
        off[4] += i * l.q;
      }
    };
    int64_t cur[5], nxt[5] = {};
    offsets(begin, cur);
    for (int64_t o = begin; o < end; ++o) {
      const bool more = o + 1 < end;
      if (more) offsets(o + 1, nxt);
      const Next ahead{more ? x + nxt[0] : nullptr, y + nxt[1], q + nxt[4]};
      One(f, x + cur[0], ahead, y + cur[1], z + cur[2], p + cur[3], q + cur[4], scratch);
      for (int k = 0; k < 5; ++k) cur[k] = nxt[k];
    }
    free(scratch);
    return true;
  }
};

template <DType D>
bool RunPair(const FusedPair& f, void* const c[2], int64_t begin, int64_t end) {
  if constexpr (Traits<D>::kComplex) {
    return false;  // PlanFusedPair never describes a complex pair
  } else {
    if (begin >= end) return true;
    const int64_t n = f.n_p > f.n_q ? f.n_p : f.n_q;
    if (n <= 4) return PairKernel<D, 4>::Run(f, c, begin, end);
    if (n <= 8) return PairKernel<D, 8>::Run(f, c, begin, end);
    return PairKernel<D, kFusedPairMaxN>::Run(f, c, begin, end);
  }
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_PAIR_H_
