// TF adapter: op registrations, shape functions and the one base OpKernel. It only
// validates, broadcasts (through the kernel core's planner), allocates and shards; the
// math is in cc/engine/.
#include <algorithm>
#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "cc/engine/smallmm.h"
#include "cc/tf/smallmm_matmul_op.h"
#include "cc/tf/smallmm_types.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// `shape` read through the permutation attr `attr` (tf.transpose(t, perm); empty: as it is).
absl::Status Permuted(InferenceContext* c, ShapeHandle shape, const std::string& attr,
                      ShapeHandle* out) {
  std::vector<int32> perm;
  TF_RETURN_IF_ERROR(c->GetAttr(attr, &perm));
  TF_RETURN_IF_ERROR(CheckPermutation(perm, attr));
  if (perm.empty()) {
    *out = shape;
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(c->WithRank(shape, int64_t(perm.size()), &shape));
  std::vector<DimensionHandle> dims;
  for (int32 axis : perm) dims.push_back(c->Dim(shape, axis));
  *out = c->MakeShape(dims);
  return absl::OkStatus();
}

// Same inference as TF's BatchMatMulV2Shape (so static shapes match tf.matmul exactly,
// unknown dims and rank included), with our transpose attrs; with a batch_shape input,
// the output batch shape comes from it instead of the broadcast; operands and output
// permuted by the perm attrs. Product `p` of an op: inputs x, y[, batch_shape] at
// `first`, attrs with `suffix`, output p.
absl::Status MatMulShape(InferenceContext* c, int p, int first, bool reduce,
                         const std::string& suffix) {
  ShapeHandle x, y;
  TF_RETURN_IF_ERROR(Permuted(c, c->input(first), "perm_x" + suffix, &x));
  TF_RETURN_IF_ERROR(Permuted(c, c->input(first + 1), "perm_y" + suffix, &y));
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(x, 2, &x));
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(y, 2, &y));
  bool tx, ty;
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_x" + suffix, &tx));
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_y" + suffix, &ty));
  DimensionHandle rows = c->Dim(x, tx ? -1 : -2);
  DimensionHandle cols = c->Dim(y, ty ? -2 : -1);
  DimensionHandle inner;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, tx ? -2 : -1), c->Dim(y, ty ? -1 : -2), &inner));
  ShapeHandle xb, yb, batch;
  TF_RETURN_IF_ERROR(c->Subshape(x, 0, -2, &xb));
  TF_RETURN_IF_ERROR(c->Subshape(y, 0, -2, &yb));
  TF_RETURN_IF_ERROR(BroadcastBinaryOpOutputShapeFnHelper(c, xb, yb, true, &batch));
  if (reduce) {
    ShapeHandle target, unused;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(first + 2), 1, &unused));
    TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(first + 2, &target));
    TF_RETURN_IF_ERROR(BroadcastBinaryOpOutputShapeFnHelper(c, batch, target, true, &unused));
    batch = target;
  }
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->Concatenate(batch, c->Matrix(rows, cols), &out));
  TF_RETURN_IF_ERROR(Permuted(c, out, "perm_output" + suffix, &out));
  c->set_output(p, out);
  return absl::OkStatus();
}

// "T: {half, bfloat16, ...}" spelled from the one dtype list.
std::string TypeAttr() { return smallmm_tf::TypeAttr({SMALLMM_TF_DTYPES(SMALLMM_TF_DATATYPE)}); }

REGISTER_OP("SmallMMBatchMatMul")
    .Input("x: T")
    .Input("y: T")
    .Output("output: T")
    .Attr(TypeAttr())
    .Attr("transpose_x: bool = false")
    .Attr("conjugate_x: bool = false")
    .Attr("transpose_y: bool = false")
    .Attr("conjugate_y: bool = false")
    .Attr("perm_x: list(int) = []")
    .Attr("perm_y: list(int) = []")
    .Attr("perm_output: list(int) = []")
    .SetShapeFn([](InferenceContext* c) { return MatMulShape(c, 0, 0, false, ""); })
    .Doc(R"doc(
Batched small matrix product with numpy-style batch broadcasting:
output[..., :, :] = op(x[..., :, :]) · op(y[..., :, :]), where op transposes and/or
conjugates as the attrs say (adjoint = both). Like BatchMatMulV2, but the transposes are
separate from conjugation and broadcast operands are never copied.

perm_x, perm_y, perm_output: axis permutations, empty (the default) for none. With them
the op computes C = op(X) · op(Y) for X = tf.transpose(x, perm_x) and
Y = tf.transpose(y, perm_y), and returns tf.transpose(C, perm_output); the kernels read
and write through strides, nothing is transposed in memory.
)doc");

REGISTER_OP("SmallMMBatchMatMulReduce")
    .Input("x: T")
    .Input("y: T")
    .Input("batch_shape: Tshape")
    .Output("output: T")
    .Attr(TypeAttr())
    .Attr("Tshape: {int32, int64} = DT_INT32")
    .Attr("transpose_x: bool = false")
    .Attr("conjugate_x: bool = false")
    .Attr("transpose_y: bool = false")
    .Attr("conjugate_y: bool = false")
    .Attr("perm_x: list(int) = []")
    .Attr("perm_y: list(int) = []")
    .Attr("perm_output: list(int) = []")
    .SetShapeFn([](InferenceContext* c) { return MatMulShape(c, 0, 0, true, ""); })
    .Doc(R"doc(
SmallMMBatchMatMul whose output has batch shape `batch_shape`: batch axes of the
broadcast product that `batch_shape` lacks or has as 1 are summed over inside the kernel.
This is the gradient of a broadcast operand without a per-batch intermediate.
`batch_shape` is C's batch shape, before perm_output.
)doc");

REGISTER_OP("SmallMMBatchMatMulPair")
    .Input("x_1: T")
    .Input("y_1: T")
    .Input("batch_shape_1: Tshape")
    .Input("x_2: T")
    .Input("y_2: T")
    .Input("batch_shape_2: Tshape")
    .Output("output_1: T")
    .Output("output_2: T")
    .Attr(TypeAttr())
    .Attr("Tshape: {int32, int64} = DT_INT32")
    .Attr("transpose_x_1: bool = false")
    .Attr("conjugate_x_1: bool = false")
    .Attr("transpose_y_1: bool = false")
    .Attr("conjugate_y_1: bool = false")
    .Attr("perm_x_1: list(int) = []")
    .Attr("perm_y_1: list(int) = []")
    .Attr("perm_output_1: list(int) = []")
    .Attr("transpose_x_2: bool = false")
    .Attr("conjugate_x_2: bool = false")
    .Attr("transpose_y_2: bool = false")
    .Attr("conjugate_y_2: bool = false")
    .Attr("perm_x_2: list(int) = []")
    .Attr("perm_y_2: list(int) = []")
    .Attr("perm_output_2: list(int) = []")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(MatMulShape(c, 0, 0, true, "_1"));
      return MatMulShape(c, 1, 3, true, "_2");
    })
    .Doc(R"doc(
Two SmallMMBatchMatMulReduce products in one op: output_p is product p of
(x_p, y_p, batch_shape_p) with the attrs ending in _p. Both gradients of a product read
the upstream gradient; computed together, each slice of it is read from memory once and
used by both while it is in cache.
)doc");

using CPUDevice = Eigen::ThreadPoolDevice;

}  // namespace

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

int64_t TotalCost(const smallmm::GemmPlan& p) {
  const int64_t per = smallmm::CostPerOutput(p);
  return p.num_outputs > 0 && per > INT64_MAX / p.num_outputs ? INT64_MAX : per * p.num_outputs;
}

// Elements one output of the plan reads and writes (saturating; a rough footprint).
int64_t Footprint(const smallmm::GemmPlan& p) {
  const double e =
      double(std::max<int64_t>(p.num_reduced, 1)) * (double(p.m) * p.k + double(p.k) * p.n) +
      double(p.m) * p.n;
  return e > 1e15 ? int64_t(1e15) : int64_t(e);
}

}  // namespace

template <>
void SmallMMMatMulOp<CPUDevice>::Launch(OpKernelContext* ctx, const SmallMMPlanned* planned,
                                        int count) {
  const smallmm::DType dtype = dtype_;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  // Whether each product's kernel could allocate its scratch, reported per product.
  std::atomic<bool> ran[2] = {{true}, {true}};
  auto run = [&](int i, const smallmm::GemmPlan& p, void* dst, int64_t begin, int64_t end) {
    if (!smallmm::RunBatchMatMul(dtype, p, planned[i].x->tensor_data().data(),
                                 planned[i].y->tensor_data().data(), dst, begin, end)) {
      ran[i].store(false, std::memory_order_relaxed);
    }
  };
  auto out_ptr = [](const SmallMMPlanned& q) {
    return static_cast<void*>(const_cast<char*>(q.out->tensor_data().data()));
  };
  auto check = [&](int i) {
    const smallmm::GemmPlan& plan = planned[i].plan;
    OP_REQUIRES(ctx, ran[i].load(),
                errors::ResourceExhausted(name(),
                                          ": could not allocate the kernel's scratch "
                                          "buffer (M=",
                                          plan.m, ", N=", plan.n, ", K=", plan.k, ")"));
  };
  // Shards [0, units) over the pool, or runs it here when the whole job is small.
  auto shard = [&](int64_t units, int64_t cost_per_unit, int64_t total_cost,
                   const std::function<void(int64_t, int64_t)>& fn) {
    if (total_cost < kInlineCost || workers->num_threads < 2) {
      fn(0, units);
    } else {
      Shard(workers->num_threads, workers->workers, units, cost_per_unit, fn);
    }
  };
  const int parts[2] = {
      smallmm::SuggestReductionSplit(dtype, planned[0].plan, workers->num_threads),
      count > 1 ? smallmm::SuggestReductionSplit(dtype, planned[1].plan, workers->num_threads) : 1};

  // Both products of a pair together: the same output index of each (both gradients of a
  // capsule prediction, per input capsule) reads the same slice of the upstream gradient.
  if (count == 2 && parts[0] == 1 && parts[1] == 1 &&
      planned[0].plan.num_outputs == planned[1].plan.num_outputs) {
    const smallmm::GemmPlan& p0 = planned[0].plan;
    const smallmm::GemmPlan& p1 = planned[1].plan;
    const int64_t cost0 = smallmm::CostPerOutput(p0), cost1 = smallmm::CostPerOutput(p1);
    const int64_t per = cost0 > INT64_MAX - cost1 ? INT64_MAX : cost0 + cost1;
    const int64_t total =
        TotalCost(p0) > INT64_MAX - TotalCost(p1) ? INT64_MAX : TotalCost(p0) + TotalCost(p1);
    const int64_t chunk = std::max<int64_t>(
        1, kPairChunkElements / std::max<int64_t>(1, Footprint(p0) + Footprint(p1)));
    void* c0 = out_ptr(planned[0]);
    void* c1 = out_ptr(planned[1]);
    shard(p0.num_outputs, per, total, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; o += chunk) {
        const int64_t e = std::min(end, o + chunk);
        run(0, p0, c0, o, e);
        run(1, p1, c1, o, e);
      }
    });
    check(0);
    if (!ctx->status().ok()) return;
    check(1);
    return;
  }

  for (int i = 0; i < count; ++i) {
    const SmallMMPlanned& q = planned[i];
    const smallmm::GemmPlan& plan = q.plan;
    void* c = out_ptr(q);
    // A long reduction into few outputs is split into partial sums so every thread works.
    if (parts[i] > 1) {
      const smallmm::GemmPlan split = smallmm::SplitReduction(plan, parts[i]);
      Tensor partials;
      OP_REQUIRES_OK(
          ctx, ctx->allocate_temp(q.out->dtype(), TensorShape({split.output_elements}), &partials));
      void* pc = const_cast<char*>(partials.tensor_data().data());
      shard(split.num_outputs, smallmm::CostPerOutput(split), TotalCost(split),
            [&](int64_t begin, int64_t end) { run(i, split, pc, begin, end); });
      check(i);
      if (!ctx->status().ok()) return;
      const int n = parts[i];
      shard(plan.output_elements, n + 1, TotalCost(split), [&](int64_t begin, int64_t end) {
        smallmm::SumPartials(dtype, pc, n, plan.output_elements, c, begin, end);
      });
      continue;
    }
    // Shard over output matrices; the cost estimate keeps tiny problems on the calling
    // thread instead of paying the thread-pool hand-off.
    shard(plan.num_outputs, smallmm::CostPerOutput(plan), TotalCost(plan),
          [&](int64_t begin, int64_t end) { run(i, plan, c, begin, end); });
    check(i);
    if (!ctx->status().ok()) return;
  }
}

namespace {

#define SMALLMM_REGISTER_CPU(CORE, T, DT) SMALLMM_REGISTER_MATMUL_KERNELS(DEVICE_CPU, CPUDevice, T)
SMALLMM_TF_DTYPES(SMALLMM_REGISTER_CPU)
#undef SMALLMM_REGISTER_CPU

}  // namespace
}  // namespace tensorflow
