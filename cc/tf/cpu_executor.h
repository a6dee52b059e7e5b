// The engine's executor (cc/engine/execute.h) on TF's CPU device: work sharded over the
// op's intra-op thread pool with TF's Shard. Scratch is left to the kernel, which owns
// the TF allocations.
#ifndef TF_SMALLMM_CC_TF_CPU_EXECUTOR_H_
#define TF_SMALLMM_CC_TF_CPU_EXECUTOR_H_

#include "cc/engine/execute.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/util/work_sharder.h"

namespace smallmm_tf {

inline smallmm::Executor CpuExecutor(tensorflow::OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  smallmm::Executor ex;
  ex.threads = workers->num_threads;
  ex.parallel_for = [workers](int64_t units, int64_t cost_per_unit, const smallmm::RangeFn& fn) {
    tensorflow::Shard(workers->num_threads, workers->workers, units, cost_per_unit, fn);
  };
  return ex;
}

}  // namespace smallmm_tf

#endif  // TF_SMALLMM_CC_TF_CPU_EXECUTOR_H_
