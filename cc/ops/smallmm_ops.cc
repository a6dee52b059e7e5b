// TF adapter: op registrations, shape functions and the one base OpKernel. It only
// validates, broadcasts (through the kernel core's planner), allocates and shards; the
// math is in cc/kernels/.
#include <atomic>
#include <string>
#include <vector>

#include "cc/kernels/smallmm.h"
#include "cc/ops/smallmm_matmul_op.h"
#include "cc/ops/smallmm_types.h"
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

// Same inference as TF's BatchMatMulV2Shape (so static shapes match tf.matmul exactly,
// unknown dims and rank included), with our transpose attrs; with `reduce`, the output
// batch shape comes from the `batch_shape` input instead of the broadcast.
absl::Status MatMulShape(InferenceContext* c, bool reduce) {
  ShapeHandle x, y;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 2, &x));
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(1), 2, &y));
  bool tx, ty;
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_x", &tx));
  TF_RETURN_IF_ERROR(c->GetAttr("transpose_y", &ty));
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
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &unused));
    TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(2, &target));
    TF_RETURN_IF_ERROR(BroadcastBinaryOpOutputShapeFnHelper(c, batch, target, true, &unused));
    batch = target;
  }
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->Concatenate(batch, c->Matrix(rows, cols), &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

// "T: {half, bfloat16, ...}" spelled from the one dtype list.
const std::string& TypeAttr() {
  static const std::string attr = [] {
    std::string s;
#define SMALLMM_NAME(T, DT, CORE) s += std::string(s.empty() ? "" : ", ") + DataTypeString(DT);
    SMALLMM_TYPE_LIST(SMALLMM_NAME)
#undef SMALLMM_NAME
    return "T: {" + s + "}";
  }();
  return attr;
}

REGISTER_OP("SmallMMBatchMatMul")
    .Input("x: T")
    .Input("y: T")
    .Output("output: T")
    .Attr(TypeAttr())
    .Attr("transpose_x: bool = false")
    .Attr("conjugate_x: bool = false")
    .Attr("transpose_y: bool = false")
    .Attr("conjugate_y: bool = false")
    .SetShapeFn([](InferenceContext* c) { return MatMulShape(c, false); })
    .Doc(R"doc(
Batched small matrix product with numpy-style batch broadcasting:
output[..., :, :] = op(x[..., :, :]) · op(y[..., :, :]), where op transposes and/or
conjugates as the attrs say (adjoint = both). Like BatchMatMulV2, but the transposes are
separate from conjugation and broadcast operands are never copied.
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
    .SetShapeFn([](InferenceContext* c) { return MatMulShape(c, true); })
    .Doc(R"doc(
SmallMMBatchMatMul whose output has batch shape `batch_shape`: batch axes of the
broadcast product that `batch_shape` lacks or has as 1 are summed over inside the kernel.
This is the gradient of a broadcast operand without a per-batch intermediate.
)doc");

using CPUDevice = Eigen::ThreadPoolDevice;

}  // namespace

template <>
void SmallMMMatMulOp<CPUDevice>::Launch(OpKernelContext* ctx, const smallmm::GemmPlan& plan,
                                        const Tensor& x, const Tensor& y, Tensor* out) {
  const void* a = x.tensor_data().data();
  const void* b = y.tensor_data().data();
  void* c = const_cast<char*>(out->tensor_data().data());
  const smallmm::DType dtype = dtype_;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  std::atomic<bool> ran{true};
  auto run = [&](const smallmm::GemmPlan& p, void* dst, int64_t begin, int64_t end) {
    if (!smallmm::RunBatchMatMul(dtype, p, a, b, dst, begin, end)) {
      ran.store(false, std::memory_order_relaxed);
    }
  };
  // A long reduction into few outputs is split into partial sums so every thread works.
  const int parts = smallmm::SuggestReductionSplit(dtype, plan, workers->num_threads);
  if (parts > 1) {
    const smallmm::GemmPlan split = smallmm::SplitReduction(plan, parts);
    Tensor partials;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(out->dtype(), TensorShape({split.output_elements}),
                                           &partials));
    void* pc = const_cast<char*>(partials.tensor_data().data());
    Shard(workers->num_threads, workers->workers, split.num_outputs,
          smallmm::CostPerOutput(split),
          [&](int64_t begin, int64_t end) { run(split, pc, begin, end); });
    OP_REQUIRES(ctx, ran.load(),
                errors::ResourceExhausted(name(), ": could not allocate the kernel's scratch "
                                          "buffer (M=", plan.m, ", N=", plan.n, ", K=", plan.k,
                                          ")"));
    Shard(workers->num_threads, workers->workers, plan.output_elements, parts + 1,
          [&](int64_t begin, int64_t end) {
            smallmm::SumPartials(dtype, pc, parts, plan.output_elements, c, begin, end);
          });
    return;
  }
  // Shard over output matrices; the cost estimate lets Shard keep tiny problems on the
  // calling thread instead of paying the thread-pool hand-off.
  Shard(workers->num_threads, workers->workers, plan.num_outputs,
        smallmm::CostPerOutput(plan),
        [&](int64_t begin, int64_t end) { run(plan, c, begin, end); });
  OP_REQUIRES(ctx, ran.load(),
              errors::ResourceExhausted(name(), ": could not allocate the kernel's scratch "
                                        "buffer (M=", plan.m, ", N=", plan.n, ", K=", plan.k,
                                        ")"));
}

namespace {

#define SMALLMM_REGISTER_CPU(T, DT, CORE)                                                    \
  REGISTER_KERNEL_BUILDER(                                                           \
      Name("SmallMMBatchMatMul").Device(DEVICE_CPU).TypeConstraint<T>("T"),          \
      SmallMMMatMulOp<CPUDevice>);                                                   \
  REGISTER_KERNEL_BUILDER(Name("SmallMMBatchMatMulReduce")                           \
                              .Device(DEVICE_CPU)                                    \
                              .TypeConstraint<T>("T")                                \
                              .HostMemory("batch_shape"),                            \
                          SmallMMMatMulOp<CPUDevice>);
SMALLMM_TYPE_LIST(SMALLMM_REGISTER_CPU)
#undef SMALLMM_REGISTER_CPU

}  // namespace
}  // namespace tensorflow
