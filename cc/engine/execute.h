// execute.h — running whole plans over threads: the one place for the engine's sharding
// policy (what runs inline, how a long reduction is split into partial sums, how the two
// products of a pair interleave). The callers bring the threads and the memory: the TF
// kernels (cc/tf/) pass TF's intra-op pool and allocator, the XLA custom calls XLA's FFI
// thread pool and plain heap memory; both run the same code below.
//
// Plans for dense row-major operands (TF tensors and XLA buffers alike) are made by
// PlanDenseBatchMatMul, so shapes, broadcasting and error texts are the planner's
// (smallmm.h) wherever the ops run.
#ifndef TF_SMALLMM_CC_ENGINE_EXECUTE_H_
#define TF_SMALLMM_CC_ENGINE_EXECUTE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "cc/engine/routing.h"
#include "cc/engine/smallmm.h"

namespace smallmm {

// fn(begin, end) over a range of work units.
using RangeFn = std::function<void(int64_t begin, int64_t end)>;
// Runs fn over disjoint ranges that cover [0, units), possibly concurrently, and returns
// when all of them have run. cost_per_unit is about cycles per unit (CostPerOutput,
// RoutingCostPerRow), for deciding how many threads the work pays for.
using ParallelFor = std::function<void(int64_t units, int64_t cost_per_unit, const RangeFn& fn)>;

// What a caller lends the engine to run plans.
struct Executor {
  int threads = 1;  // threads parallel_for may use, the calling one included
  ParallelFor parallel_for;
  // `bytes` of scratch that stay valid until the Execute* call returns (the caller frees
  // them afterwards), or nullptr when they cannot be allocated.
  std::function<void*(int64_t bytes)> scratch;
};

// C = plan(A, B) for one product of an op.
struct Product {
  GemmPlan plan;
  const void* a = nullptr;
  const void* b = nullptr;
  void* c = nullptr;  // dense row-major, plan.output_elements elements
};

struct ExecuteStatus {
  enum Error { kNone, kKernelScratch, kPartialsScratch };
  Error error = kNone;
  int product = 0;  // which product failed
};

// Runs `count` products (1, or 2 for a pair: both gradients of a product) of one dtype on
// the CPU kernels (plans as PlanBatchMatMul gives them; the CPU folds are applied here),
// none with an empty output. On failure the outputs of the failing product (and of those
// after it) are unwritten: kKernelScratch when a kernel could not allocate its packing
// scratch (RunBatchMatMul), kPartialsScratch when ex.scratch returned nullptr.
ExecuteStatus ExecuteBatchMatMul(DType dtype, const Product* products, int count,
                                 const Executor& ex);

// Runs the fused routing over all rows: forward (grad_v == nullptr: u_hat -> v) or
// backward (u_hat, grad_v -> grad_u_hat). Requires CheckRouting to have passed. Returns
// false when a kernel could not allocate its scratch (routing.h).
bool ExecuteRouting(DType dtype, const RoutingShape& shape, const void* u_hat, const void* grad_v,
                    void* out, const Executor& ex);

// Element strides of a dense row-major tensor of shape dims[0..rank); all 0 when it has
// no elements (it is never read, and its strides could overflow int64: [0, 2^62, 2^62]).
void DenseStrides(int rank, const int64_t* dims, int64_t* strides);

// PlanBatchMatMul for dense row-major operands of shapes a_dims / b_dims.
bool PlanDenseBatchMatMul(int a_rank, const int64_t* a_dims, bool transpose_a, bool conjugate_a,
                          int b_rank, const int64_t* b_dims, bool transpose_b, bool conjugate_b,
                          const int64_t* target_batch, int target_rank, GemmPlan* plan,
                          int* out_rank, int64_t out_dims[kMaxBatchDims + 2], std::string* error);

// A ParallelFor over a pool that only takes tasks (XLA's FFI thread pool): it schedules
// at most threads - 1 helper tasks with `schedule` and works on the chunks itself too,
// so it never waits for a task the pool has not started (no deadlock when the caller is
// itself one of the pool's threads, or the pool is busy). It returns once every chunk
// has run; a helper that starts later finds nothing left and touches only state it
// shares with the others. Chunks and threads follow Eigen's ThreadPoolDevice::parallelFor,
// which TF's Shard uses for the TF kernels.
using ScheduleFn = std::function<void(std::function<void()> task)>;
ParallelFor PoolParallelFor(ScheduleFn schedule, int threads);

}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_EXECUTE_H_
