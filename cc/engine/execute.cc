// Running whole plans over threads (execute.h): the sharding policy of the TF kernels and
// the XLA custom calls.
#include "cc/engine/execute.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <utility>

namespace smallmm {

namespace {

// Below this many cost units (about cycles: CostPerOutput) a product runs on the calling
// thread: waking a pool thread costs tens of microseconds on a VM, more than the work.
// 4d29bbe (2026-11-25). Timed 2026-12-01 (cc/engine/README.md; SmallMMBatchMatMul on B
// 20×20 matvecs, 2 intra-op threads, eager): always sharding takes 2.0× as long at B = 300
// (0.25M units) and 1.13× at 900 (0.74M); running inline up to 16M units takes 1.36-1.75×
// as long from B = 2500 (2M) up: the cross-over lies between 1.2M and 2M.
constexpr int64_t kInlineCost = 1 << 20;
// A pair runs interleaved in chunks of outputs that together touch about this many
// elements, so the second product finds the shared operand in L1/L2. 4d29bbe (2026-11-25):
// capsule dW + du, 2 threads, 3.7 ms as two ops -> 3.3 ms as a pair. Timed 2026-12-01 (same
// setup, capsule backward pair, B = 50, two runs): 4K-element chunks take 0.95-1.07× as
// long, 64K 1.08-1.25×.
constexpr int64_t kPairChunkElements = 16 << 10;

int64_t SatAdd(int64_t a, int64_t b) { return a > INT64_MAX - b ? INT64_MAX : a + b; }

int64_t TotalCost(const GemmPlan& p) {
  const int64_t per = CostPerOutput(p);
  return p.num_outputs > 0 && per > INT64_MAX / p.num_outputs ? INT64_MAX : per * p.num_outputs;
}

// Elements one output of the plan reads and writes (saturating; a rough footprint).
int64_t Footprint(const GemmPlan& p) {
  const double e =
      double(std::max<int64_t>(p.num_reduced, 1)) * (double(p.m) * p.k + double(p.k) * p.n) +
      double(p.m) * p.n;
  return e > 1e15 ? int64_t(1e15) : int64_t(e);
}

}  // namespace

ExecuteStatus ExecuteBatchMatMul(DType dtype, const Product* in, int count, const Executor& ex) {
  Product products[2];
  for (int i = 0; i < count; ++i) {
    products[i] = in[i];
    FoldForCpuKernels(&products[i].plan);
  }
  // Whether each product's kernel could allocate its scratch, reported per product.
  std::atomic<bool> ran[2] = {{true}, {true}};
  auto run = [&](int i, const GemmPlan& p, void* dst, int64_t begin, int64_t end) {
    if (!RunBatchMatMul(dtype, p, products[i].a, products[i].b, dst, begin, end)) {
      ran[i].store(false, std::memory_order_relaxed);
    }
  };
  // Shards [0, units) over the threads, or runs it here when the whole job is small.
  auto shard = [&](int64_t units, int64_t cost_per_unit, int64_t total_cost, const RangeFn& fn) {
    if (total_cost < kInlineCost || ex.threads < 2) {
      fn(0, units);
    } else {
      ex.parallel_for(units, cost_per_unit, fn);
    }
  };
  auto failed = [&](int i) {
    ExecuteStatus s;
    s.error = ExecuteStatus::kKernelScratch;
    s.product = i;
    return s;
  };
  // Both gradients of a broadcast-weight product, each element of the upstream gradient
  // read once for both (smallmm.h FusedPair; planned from the unfolded plans), where the
  // pair has that form and enough outputs to keep every thread busy (otherwise the split
  // reductions below do).
  FusedPair fused;
  if (count == 2 && FusedPairs() &&
      PlanFusedPair(dtype, in[0].plan, in[0].a, in[0].b, in[1].plan, in[1].a, in[1].b, &fused)) {
    const int64_t per = FusedPairCostPerOutput(fused);
    const int64_t total = per > INT64_MAX / fused.num_outputs ? INT64_MAX : per * fused.num_outputs;
    if (total < kInlineCost || ex.threads < 2 || fused.num_outputs >= 2 * int64_t(ex.threads)) {
      void* const c[2] = {in[0].c, in[1].c};
      shard(fused.num_outputs, per, total, [&](int64_t begin, int64_t end) {
        if (!RunFusedPair(dtype, fused, c, begin, end)) ran[0].store(false);
      });
      return ran[0].load() ? ExecuteStatus() : failed(0);
    }
  }
  const int parts[2] = {SuggestReductionSplit(dtype, products[0].plan, ex.threads),
                        count > 1 ? SuggestReductionSplit(dtype, products[1].plan, ex.threads) : 1};

  // Both products of a pair together: the same output index of each (both gradients of a
  // capsule prediction, per input capsule) reads the same slice of the upstream gradient.
  if (count == 2 && parts[0] == 1 && parts[1] == 1 &&
      products[0].plan.num_outputs == products[1].plan.num_outputs) {
    const GemmPlan& p0 = products[0].plan;
    const GemmPlan& p1 = products[1].plan;
    const int64_t per = SatAdd(CostPerOutput(p0), CostPerOutput(p1));
    const int64_t total = SatAdd(TotalCost(p0), TotalCost(p1));
    const int64_t chunk = std::max<int64_t>(
        1, kPairChunkElements / std::max<int64_t>(1, Footprint(p0) + Footprint(p1)));
    shard(p0.num_outputs, per, total, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; o += chunk) {
        const int64_t e = std::min(end, o + chunk);
        run(0, p0, products[0].c, o, e);
        run(1, p1, products[1].c, o, e);
      }
    });
    for (int i = 0; i < 2; ++i) {
      if (!ran[i].load()) return failed(i);
    }
    return ExecuteStatus();
  }

  for (int i = 0; i < count; ++i) {
    const GemmPlan& plan = products[i].plan;
    void* c = products[i].c;
    // A long reduction into few outputs is split into partial sums so every thread works.
    if (parts[i] > 1) {
      const ReductionParts sp = SplitReduction(plan, parts[i]);
      void* pc = ex.scratch(sp.partials * plan.output_elements * DTypeSize(dtype));
      if (pc == nullptr) {
        ExecuteStatus s;
        s.error = ExecuteStatus::kPartialsScratch;
        s.product = i;
        return s;
      }
      shard(sp.units, CostPerOutput(sp.split), TotalCost(plan), [&](int64_t begin, int64_t end) {
        if (!RunReductionParts(dtype, sp, products[i].a, products[i].b, pc, begin, end)) {
          ran[i].store(false, std::memory_order_relaxed);
        }
      });
      if (!ran[i].load()) return failed(i);
      const int n = sp.partials;
      shard(plan.output_elements, n + 1, TotalCost(plan), [&](int64_t begin, int64_t end) {
        SumPartials(dtype, pc, n, plan.output_elements, c, begin, end);
      });
      continue;
    }
    // Shard over output matrices; the cost estimate keeps tiny problems on the calling
    // thread instead of paying the thread-pool hand-off.
    shard(plan.num_outputs, CostPerOutput(plan), TotalCost(plan),
          [&](int64_t begin, int64_t end) { run(i, plan, c, begin, end); });
    if (!ran[i].load()) return failed(i);
  }
  return ExecuteStatus();
}

bool ExecuteRouting(DType dtype, const RoutingShape& shape, const void* u_hat, const void* grad_v,
                    void* out, const Executor& ex) {
  std::atomic<bool> ok{true};
  const bool backward = grad_v != nullptr;
  // One row is the unit of work: its routing iterations run with its û in cache.
  ex.parallel_for(shape.batch, RoutingCostPerRow(shape, backward), [&](int64_t begin, int64_t end) {
    const bool done = backward ? RunRoutingBackward(dtype, shape, u_hat, grad_v, out, begin, end)
                               : RunRoutingForward(dtype, shape, u_hat, out, begin, end);
    if (!done) ok.store(false);
  });
  return ok.load();
}

void DenseStrides(int rank, const int64_t* dims, int64_t* strides) {
  bool empty = false;
  for (int i = 0; i < rank; ++i) empty = empty || dims[i] == 0;
  int64_t run = 1;
  for (int i = rank - 1; i >= 0; --i) {
    strides[i] = empty ? 0 : run;
    if (!empty) run *= dims[i];  // <= the element count of an existing tensor: no overflow
  }
}

bool PlanDenseBatchMatMul(int a_rank, const int64_t* a_dims, bool transpose_a, bool conjugate_a,
                          int b_rank, const int64_t* b_dims, bool transpose_b, bool conjugate_b,
                          const int64_t* target_batch, int target_rank, GemmPlan* plan,
                          int* out_rank, int64_t out_dims[kMaxBatchDims + 2], std::string* error) {
  // Ranks above the planner's limit are rejected by it before it reads any stride.
  constexpr int kMaxRank = kMaxBatchDims + 2;
  int64_t as[kMaxRank] = {}, bs[kMaxRank] = {};
  if (a_rank <= kMaxRank) DenseStrides(a_rank, a_dims, as);
  if (b_rank <= kMaxRank) DenseStrides(b_rank, b_dims, bs);
  const Operand a{a_rank, a_dims, as, transpose_a, conjugate_a};
  const Operand b{b_rank, b_dims, bs, transpose_b, conjugate_b};
  return PlanBatchMatMul(a, b, target_batch, target_rank, plan, out_rank, out_dims, error);
}

// --------------------------------------------------------------- pool parallel-for
namespace {

// Eigen's cost model (unsupported/Eigen/CXX11/src/Tensor/TensorCostModel.h), which TF's
// Shard applies to the TF kernels through ThreadPoolDevice::parallelFor: a thread is
// worth starting per kPerThreadCycles of work beyond kStartupCycles, and a chunk should
// hold at least kTaskSize cycles, with at most kOversharding chunks per thread.
constexpr double kStartupCycles = 100000, kPerThreadCycles = 100000, kTaskSize = 40000;
constexpr int64_t kOversharding = 4;

// The chunks of one PoolParallelFor call, shared by the caller and its helper tasks.
struct PoolRun {
  int64_t units = 0, chunks = 0;
  const RangeFn* fn = nullptr;  // dereferenced only while a chunk is held
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;

  // Takes and runs chunks until none is left.
  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) {
      const int64_t base = units / chunks, extra = units % chunks;
      const int64_t begin = i * base + std::min(i, extra);
      (*fn)(begin, begin + base + (i < extra ? 1 : 0));
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

}  // namespace

ParallelFor PoolParallelFor(ScheduleFn schedule, int threads) {
  return [schedule = std::move(schedule), threads](int64_t units, int64_t cost_per_unit,
                                                   const RangeFn& fn) {
    if (units <= 0) return;
    const double cost = double(units) * double(std::max<int64_t>(cost_per_unit, 1));
    const double worth = (cost - kStartupCycles) / kPerThreadCycles + 0.9;
    if (units == 1 || threads < 2 || worth < 2) {
      fn(0, units);
      return;
    }
    const int64_t per_chunk =
        std::max<int64_t>((units + kOversharding * threads - 1) / (kOversharding * threads),
                          int64_t(kTaskSize / double(std::max<int64_t>(cost_per_unit, 1))));
    auto state = std::make_shared<PoolRun>();
    state->units = units;
    state->chunks = (units + std::min(per_chunk, units) - 1) / std::min(per_chunk, units);
    state->fn = &fn;
    const int64_t helpers =
        std::min<int64_t>({int64_t(threads) - 1, int64_t(worth) - 1, state->chunks - 1});
    for (int64_t h = 0; h < helpers; ++h) schedule([state] { state->Work(); });
    state->Work();
    // Every chunk is taken now; wait for those still running on helpers.
    std::unique_lock<std::mutex> lock(state->mu);
    state->all_done.wait(lock, [&] { return state->done.load() == state->chunks; });
  };
}

}  // namespace smallmm
