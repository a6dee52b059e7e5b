// TF adapter: op registrations, shape functions and the one base OpKernel. It only
// validates, broadcasts (through the kernel core's planner), allocates and shards; the
// math is in cc/engine/.
#include <string>
#include <vector>

#include "cc/engine/execute.h"
#include "cc/engine/smallmm.h"
#include "cc/tf/cpu_executor.h"
#include "cc/tf/smallmm_matmul_op.h"
#include "cc/tf/smallmm_types.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"

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

// The engine's sharding policy (cc/engine/execute.h) on TF's intra-op pool, with
// partial sums in TF-allocated scratch.
template <>
void SmallMMMatMulOp<CPUDevice>::Launch(OpKernelContext* ctx, const SmallMMPlanned* planned,
                                        int count) {
  smallmm::Product products[2];
  for (int i = 0; i < count; ++i) {
    products[i].plan = planned[i].plan;
    products[i].a = planned[i].x->tensor_data().data();
    products[i].b = planned[i].y->tensor_data().data();
    products[i].c = const_cast<char*>(planned[i].out->tensor_data().data());
  }
  std::vector<Tensor> scratch;
  absl::Status scratch_status;
  smallmm::Executor ex = smallmm_tf::CpuExecutor(ctx);
  ex.scratch = [&](int64_t bytes) -> void* {
    scratch.emplace_back();
    scratch_status = ctx->allocate_temp(DT_UINT8, TensorShape({bytes}), &scratch.back());
    return scratch_status.ok() ? const_cast<char*>(scratch.back().tensor_data().data()) : nullptr;
  };
  const smallmm::ExecuteStatus s = smallmm::ExecuteBatchMatMul(dtype_, products, count, ex);
  OP_REQUIRES_OK(ctx, scratch_status);
  const smallmm::GemmPlan& plan = planned[s.product].plan;
  OP_REQUIRES(ctx, s.error == smallmm::ExecuteStatus::kNone,
              errors::ResourceExhausted(name(),
                                        ": could not allocate the kernel's scratch "
                                        "buffer (M=",
                                        plan.m, ", N=", plan.n, ", K=", plan.k, ")"));
}

namespace {

#define SMALLMM_REGISTER_CPU(CORE, T, DT) SMALLMM_REGISTER_MATMUL_KERNELS(DEVICE_CPU, CPUDevice, T)
SMALLMM_TF_DTYPES(SMALLMM_REGISTER_CPU)
#undef SMALLMM_REGISTER_CPU

}  // namespace
}  // namespace tensorflow
