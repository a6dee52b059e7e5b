// smallmm.h — the framework-free kernel core of tf_smallmm.
//
// Terminology (used everywhere in cc/, cuda/ and tf_smallmm/):
//   lhs, rhs   the two operands, called A and B here and x, y in the TF ops.
//   op(X)      X, optionally transposed (swap its two matrix axes) and optionally
//              conjugated. adjoint = transpose + conjugate. Transposition is free: it
//              only swaps the two matrix strides.
//   M, N, K    op(A) is M×K, op(B) is K×N, the product C is M×N. N = 1 is a matvec.
//   batch      every axis left of the two matrix axes. Batch axes are right-aligned
//              and broadcast as in numpy / tf.matmul: an operand with size 1 (or no
//              axis) along a batch axis is reused, which the engine expresses as
//              stride 0 — it is never copied.
//   output loop / reduction loop
//              after broadcasting, each batch axis is either kept in the output
//              (an output loop) or summed over inside the kernel (a reduction loop).
//              Reduction loops are how gradients of broadcast operands are formed
//              without materialising a per-batch copy and calling reduce_sum.
//   strides    always in elements, never bytes; 0 means broadcast.
//   layout     TF tensors are dense row-major (the TF ops may read them through an axis
//              permutation, and write C permuted); the pybind11 module passes numpy
//              strides through, so views (including stride 0) work without copies.
//
// The primitive, for every output batch index o:
//   C[o] = Σ_r op(A[ia(o, r)]) · op(B[ib(o, r)])
// Float16 and bfloat16 accumulate in float32, everything else in its own type.
#ifndef TF_SMALLMM_CC_ENGINE_SMALLMM_H_
#define TF_SMALLMM_CC_ENGINE_SMALLMM_H_

#include <cstdint>
#include <string>

#include "cc/engine/dtypes.h"

namespace smallmm {

constexpr int kMaxBatchDims = 8;  // after broadcasting, before merging axes

// Compile-time tile sizes of the micro-kernels (gemm/micro.h), ascending: a run-time M (or
// N) is cut into tiles of the smallest size that holds it (the largest for anything
// longer), the last one an edge tile of the smallest size that holds the rest (M = 20 is a
// 16-tile and a 4-tile). Tests and benchmarks loop over this table.
constexpr int kTileSizes[] = {1, 2, 3, 4, 8, 16};
constexpr int kNumTileSizes = int(sizeof(kTileSizes) / sizeof(kTileSizes[0]));

// One loop of the batch nest: `size` iterations, advancing A, B and C by these strides.
// In a reduction loop c is 0.
struct Loop {
  int64_t size;
  int64_t a, b, c;
};

// A fully resolved problem: what the kernels execute. Built by PlanBatchMatMul.
struct GemmPlan {
  int64_t m = 0, n = 0, k = 0;
  // op(A)[i, l] = A[i * a_rs + l * a_cs], op(B)[l, j] = B[l * b_rs + j * b_cs],
  // C[i, j] = C[i * c_rs + j * c_cs].
  int64_t a_rs = 0, a_cs = 0, b_rs = 0, b_cs = 0, c_rs = 0, c_cs = 0;
  bool conj_a = false, conj_b = false;
  int num_out = 0, num_red = 0;
  Loop out[kMaxBatchDims];  // outermost first; flattened order = work-item order
  Loop red[kMaxBatchDims];
  int64_t num_outputs = 1;      // product of out[].size (number of C matrices)
  int64_t num_reduced = 1;      // product of red[].size
  int64_t output_elements = 0;  // num_outputs * m * n
};

// An operand as the caller sees it: shape and element strides (dense or not).
struct Operand {
  int rank = 0;
  const int64_t* dims = nullptr;
  const int64_t* strides = nullptr;
  bool transpose = false;
  bool conjugate = false;
};

// How the planner's error for inner dimensions that differ begins: TensorFlow's own text
// (the TF glue recognises it to extend it the way TF's oneDNN kernels do).
constexpr char kSizeIncompatible[] = "Matrix size-incompatible: ";

// Builds the plan for C = op(A) · op(B) with batch broadcasting. When target_rank >= 0,
// the output batch shape is exactly target_batch[0..target_rank): every
// broadcast batch axis where the target has size 1 or no axis is summed over inside the
// kernel (a reduction loop); target axes must otherwise broadcast with the operands.
// target_rank = -1 means the plain broadcast product. C has shape `out_dims` (batch +
// [M, N]) and is written dense row-major, or, with `out_perm`, as the dense row-major
// tensor tf.transpose(C, out_perm): buffer axis i is C's axis out_perm[i] (out_perm must
// be a permutation of [0, *out_rank), out_perm_rank its length). Returns false and sets
// *error on bad input, with TensorFlow's BatchMatMulV2 texts where it has one (operands
// named In[0] and In[1], shapes as the Operands give them); never aborts. Checks element
// counts for int64 overflow.
bool PlanBatchMatMul(const Operand& a, const Operand& b, const int64_t* target_batch,
                     int target_rank, GemmPlan* plan, int* out_rank,
                     int64_t out_dims[kMaxBatchDims + 2], std::string* error,
                     const int* out_perm = nullptr, int out_perm_rank = 0);

// Rows per product when a batch sharing B folds into M (FoldForCpuKernels; the dispatch
// model is asked about the folded product, tf_smallmm/dropins/linalg.py): enough to load B once per
// many rows, few enough to leave several work items per thread on a batch of ~100. Timed 2026-12-01
// (Zen 5, AVX-512, one thread, _smallmm_core.matmul of x[B, M, K] · y[K, N], B = 30000, which folds
// to 480-512 rows, against B = 30011, prime, which cannot fold): the unfolded batch takes 2.1-2.5×
// as long for 4×4·4×4, 5×7·7×12 and 8×8·8×8, 1.4-1.5× for 16×16·16×4, 16×16·16×16 and
// 20×20·20×20, 1.07× for 32×3·3×1. Other caps not timed.
constexpr int64_t kMaxFoldedRows = 512;

// Columns per folded GEMM (FoldLoopsIntoMatrix; the dispatch model is asked about the folded
// product, tf_smallmm/_core/dispatch.py): enough to amortise packing the shared matrix and fill
// the 16-wide micro-kernels, few enough to leave one work item per thread on a batch of ~100.
// 0b9b741 (2026-11-25). Timed 2026-12-01 (README.md; capsule prediction W[1152,160,8] ·
// u[B,1152,8], B = 100, 128, 256): 32 takes 1.08-1.17× as long on one thread and 1.01-1.02×
// with the TF op on 2 threads; 128 takes 0.87-0.99× and 0.96-1.00×: 64 keeps several work
// items per thread on layers with few input capsules for at most a few percent.
constexpr int64_t kMaxFoldedColumns = 64;

// The CPU kernels' folds, applied by the CPU executors to a plan from PlanBatchMatMul
// before they run it: a batch that shares B joins M up to a few hundred rows, and a
// reduction along which both operands' K axes run on evenly joins K, so the shared
// operand is loaded once for many rows. The GPU kernels take the plan unfolded (their
// size-specialised variants stage a broadcast operand once per block of matrices).
void FoldForCpuKernels(GemmPlan* plan);

// Rough cost of one output matrix in cycles, for sharding work over threads.
int64_t CostPerOutput(const GemmPlan& plan);

// Parallel reductions. A plan with few outputs and a long reduction (the gradient of a
// weight shared by a whole batch is one output summed over the batch) would run on one
// thread. SuggestReductionSplit returns how many independent partial sums to form for
// `threads` threads (1 = none), for every dtype: a float16 / bfloat16 part is summed in
// float32 and rounded to its type like any output, and SumPartials adds the parts in
// float32. SplitReduction (parts >= 2, at most the outermost reduction loop's size S)
// gives `split`, a plan that writes `parts` partial outputs of ⌊S / parts⌋ items each
// into a scratch buffer of partials × plan.output_elements elements (a new outermost
// output loop over the loop's chunks), and where parts does not divide S, `tail`, which
// sums the S mod parts items left into one more partial, its operands read from tail_a /
// tail_b elements past A and B, its output one plan.output_elements past the others.
// SumPartials adds the partials into the real output, elements [begin, end).
// RunReductionParts computes work units [begin, end) of the partials (units: the split's
// outputs, then the tail's) into `partials`; false as RunBatchMatMul.
struct ReductionParts {
  GemmPlan split, tail;
  int64_t tail_a = 0, tail_b = 0;
  int partials = 0;   // parts, or parts + 1 with a tail
  int64_t units = 0;  // split.num_outputs, plus the tail's outputs
};
int SuggestReductionSplit(DType dtype, const GemmPlan& plan, int threads);
ReductionParts SplitReduction(const GemmPlan& plan, int parts);
bool RunReductionParts(DType dtype, const ReductionParts& parts, const void* a, const void* b,
                       void* partials, int64_t begin, int64_t end);
void SumPartials(DType dtype, const void* partials, int parts, int64_t n, void* out, int64_t begin,
                 int64_t end);

// Computes output matrices [begin, end) of the plan (in flattened out-loop order).
// Safe to call concurrently on disjoint ranges. Reduction loops of size 0 and K = 0 give
// zeros. `c` must be a dense row-major buffer for the plan's output shape.
// Returns false, with C unwritten, if the packing scratch (about (M + N + 32)·K elements)
// cannot be allocated: unreachable for dense operands, but a stride-0 view can have a
// huge K in no memory. Callers must report it.
bool RunBatchMatMul(DType dtype, const GemmPlan& plan, const void* a, const void* b, void* c,
                    int64_t begin, int64_t end);

// Both gradients of a shared-operand product in one pass over the upstream gradient X.
// The pair of products P = X·Y and Q = Xᵀ·Z (per output: X is S×R with S contiguous, P is
// S×n_p, Q is R×n_q) is what a product with a broadcast weight leaves for its backward:
// capsule prediction û[b,i] = W[i]·u[b,i] gives dW[i] = Σ_b ĝ[b,i]·u[b,i]ᵀ and
// du[b,i] = W[i]ᵀ·ĝ[b,i], both reading ĝ. Run as two products, each packs X for itself;
// here every element of X is loaded once, broadcast, and fed to both sums.
constexpr int kFusedPairMaxN = 16;  // n_p, n_q: one row of P or Q is one vector of 16
struct PairLoop {
  int64_t size, x, y, z, p, q;  // element strides of X, Y, Z, P, Q along this output loop
};
struct FusedPair {
  int64_t s = 0, r = 0, n_p = 0, n_q = 0;
  // X[s, r] = x[s + r·x_r]; Y[r, n] = y[r·y_r + n]; Z[s, n] = z[s·z_s + n];
  // P[s, n] = p[s·p_s + n]; Q[r, n] = q[r·q_r + n].
  const void* x = nullptr;
  const void* y = nullptr;
  const void* z = nullptr;
  int64_t x_r = 0, y_r = 0, z_s = 0, p_s = 0, q_r = 0;
  int p_index = 0;  // which product of the pair is P (the other is Q)
  int num_out = 0;
  PairLoop out[kMaxBatchDims];
  int64_t num_outputs = 1;
};

// Whether the two products (plans as PlanBatchMatMul gives them, before the CPU folds,
// with their operands a_i, b_i) are such a pair with n_p, n_q <= kFusedPairMaxN, of a dtype
// and size where fusing was measured to pay (float16 and bfloat16; float32 from S = 20; X's
// rows far apart, not one dense [R, S] block; 16-bit rows of 1-2 elements from R = 32), and
// if so the description RunFusedPair runs (a batch axis that a
// product sums over, or that the other operand is broadcast along, joins R when its
// strides run on evenly, as a batch of gradients reads them).
bool PlanFusedPair(DType dtype, const GemmPlan& p0, const void* a0, const void* b0,
                   const GemmPlan& p1, const void* a1, const void* b1, FusedPair* pair);
// Outputs [begin, end) of a fused pair: P written to c[pair.p_index], Q to the other, each
// dense as its plan says. Returns false, unwritten, if its scratch (about (R + S)·32
// elements and 16 KiB) cannot be allocated.
bool RunFusedPair(DType dtype, const FusedPair& pair, void* const c[2], int64_t begin,
                  int64_t end);
// Rough cost of one output of a fused pair in cycles, for sharding.
int64_t FusedPairCostPerOutput(const FusedPair& pair);

// Whether pairs that PlanFusedPair accepts run fused (on by default; switched off for A/B
// timing and tests).
void SetFusedPairs(bool on);
bool FusedPairs();

// Whether a sum over one reduction loop runs as its items, each block of them summed in
// cache (gemm.cc), where another family than the packed one takes the items (on by
// default; switched off for A/B timing and for tests that need the packed kernels'
// running sum, such as the GPU block program's bit-for-bit reference).
void SetReductionItems(bool on);
bool ReductionItems();

// The kernel family RunBatchMatMul runs this plan with on the active ISA (a name from
// KernelFamilies), "none" when the plan has no output elements, "invalid" for a bad dtype.
const char* KernelFor(DType dtype, const GemmPlan& plan);

// The active ISA's kernel families, in the order they are tried (the first that can
// implement a plan runs it; the last implements every plan). Sets *count.
const char* const* KernelFamilies(int* count);

// Which instruction set the running process dispatched to: "avx512", "avx2" or "baseline".
const char* ActiveIsa();
// The instruction sets compiled into this library, e.g. "avx512,avx2,baseline".
const char* CompiledIsas();
// Force an ISA (for tests and benchmarks); returns false if the CPU lacks it.
bool SetIsa(const std::string& name);

// Whether large outputs that cannot be streamed store by store are computed through a
// staging buffer and streamed from it (gemm/streaming.h StagedStream). On by default;
// switched off for A/B timing and tests.
void SetOutputStaging(bool on);
bool OutputStaging();

// Whether the row kernel runs products whose output rows each fit one to four strips
// straight through, one product after another (gemm/stationary.h OneStripRun, BlockRun).
// On by default; switched off for A/B timing and tests.
void SetOneStripRuns(bool on);
bool OneStripRuns();

// Whether the stationary kernels prefetch along runs of products by software
// (gemm/streaming.h RunAhead). On by default; switched off for A/B timing.
void SetRunPrefetch(bool on);
bool RunPrefetch();
// Whether the CPU's own prefetchers keep up with a run of products laid out back to back
// (AMD's do): there RunAhead runs only where the output streams store by store
// (gemm/streaming.h RunAheadPays).
bool HardwareFollowsRuns();

// Whether bfloat16 products run on the CPU's bfloat16 instructions (AVX512-BF16) with the
// AVX-512 kernels: the dot product in the stationary row kernel and the packed family
// (gemm/bf16dot.h), the conversion to bfloat16 in every kernel (gemm/common.h Rounded).
// On by default where the CPU has them; SetBf16Dot(true) elsewhere leaves it off. Returns
// the setting now in force.
bool SetBf16Dot(bool on);
bool Bf16Dot();

}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_SMALLMM_H_
