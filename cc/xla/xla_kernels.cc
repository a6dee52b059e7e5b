// The XLA kernels of the SmallMM ops (tf.function(jit_compile=True)): each plans its
// products with the same planner and checks as the TF kernels (so bad shapes are compile
// errors with the same texts) and emits one typed-FFI custom call (custom_calls.h) whose
// operands and results have row-major layouts. The FFI handlers (ffi_handlers.cc) then run
// the engine on XLA's buffers. The only file that includes XLA's compiler headers: they
// are slow to compile.
#include <cstdio>
#include <string>
#include <vector>

#include "cc/engine/execute.h"
#include "cc/engine/routing.h"
#include "cc/tf/routing_op.h"
#include "cc/tf/smallmm_matmul_op.h"
#include "cc/tf/smallmm_types.h"
#include "cc/xla/custom_calls.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "xla/hlo/builder/xla_builder.h"
#include "xla/shape_util.h"

namespace tensorflow {
namespace {

// MLIR attribute syntax for the custom calls' backend_config.
std::string I64Array(const std::vector<int64_t>& values) {
  std::string s = "array<i64";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : ": ") + std::to_string(values[i]);
  return s + ">";
}

std::string DTypeAttr(smallmm::DType dtype) {
  return std::string("dtype = \"") + smallmm::DTypeName(dtype) + "\"";
}

xla::Shape RowMajor(xla::PrimitiveType type, const TensorShape& shape) {
  return xla::ShapeUtil::MakeShapeWithDescendingLayout(type, shape.dim_sizes());
}

// Emits custom call `target` on `operands` (of TF shapes `operand_shapes`) with results of
// shapes `results` (one: an array, two: a tuple) and returns the results.
std::vector<xla::XlaOp> EmitCustomCall(XlaOpKernelContext* ctx, const char* target,
                                       const std::vector<xla::XlaOp>& operands,
                                       const std::vector<TensorShape>& operand_shapes,
                                       const std::vector<TensorShape>& results,
                                       const std::string& attributes) {
  std::vector<xla::Shape> operand_layouts;
  for (size_t i = 0; i < operands.size(); ++i) {
    operand_layouts.push_back(RowMajor(ctx->input_xla_type(0), operand_shapes[i]));
  }
  std::vector<xla::Shape> result_shapes;
  for (const TensorShape& s : results) result_shapes.push_back(RowMajor(ctx->input_xla_type(0), s));
  const xla::Shape result =
      result_shapes.size() == 1 ? result_shapes[0] : xla::ShapeUtil::MakeTupleShape(result_shapes);
  const xla::XlaOp call = xla::CustomCallWithLayout(
      ctx->builder(), target, operands, result, operand_layouts, "{" + attributes + "}",
      /*has_side_effect=*/false, /*output_operand_aliasing=*/{}, /*literal=*/nullptr,
      xla::CustomCallSchedule::SCHEDULE_NONE, xla::CustomCallApiVersion::API_VERSION_TYPED_FFI);
  if (results.size() == 1) return {call};
  std::vector<xla::XlaOp> outs;
  for (size_t p = 0; p < results.size(); ++p)
    outs.push_back(xla::GetTupleElement(call, int64_t(p)));
  return outs;
}

// Input `input` of the op read as tf.transpose(input, perm) (perm empty: as it is), and
// its shape.
xla::XlaOp PermutedInput(XlaOpKernelContext* ctx, int input, const std::vector<int32>& perm,
                         TensorShape* shape) {
  const TensorShape s = ctx->InputShape(input);
  if (perm.empty()) {
    *shape = s;
    return ctx->Input(input);
  }
  *shape = TensorShape();
  for (int32 axis : perm) shape->AddDim(s.dim_size(axis));
  return xla::Transpose(ctx->Input(input), std::vector<int64_t>(perm.begin(), perm.end()));
}

// SmallMMBatchMatMul, SmallMMBatchMatMulReduce and SmallMMBatchMatMulPair.
class SmallMMMatMulXlaOp : public XlaOpKernel {
 public:
  explicit SmallMMMatMulXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSmallMMProducts(ctx, products_, &count_, &dtype_));
  }

  // The perm attrs become XLA transposes around the custom call, which sees dense
  // operands and writes the product dense (XLA fuses or elides the copies as it sees fit).
  void Compile(XlaOpKernelContext* ctx) override {
    std::vector<xla::XlaOp> operands;
    std::vector<TensorShape> operand_shapes(2 * count_), outputs(count_), products(count_);
    std::vector<int64_t> flags, batch_ranks, batch_shapes;
    for (int p = 0; p < count_; ++p) {
      const SmallMMProduct& d = products_[p];
      std::vector<int64_t> target;
      if (d.batch_shape >= 0) {
        OP_REQUIRES_OK(ctx, ctx->ConstantInputAsIntVector(d.batch_shape, &target));
      }
      smallmm::GemmPlan plan;
      OP_REQUIRES_OK(ctx,
                     PlanSmallMMProduct(d, ctx->InputShape(d.x), ctx->InputShape(d.y), target,
                                        /*onednn_flags=*/false, &plan, &outputs[p], &products[p]));
      operands.push_back(PermutedInput(ctx, d.x, d.perm_x, &operand_shapes[2 * p]));
      operands.push_back(PermutedInput(ctx, d.y, d.perm_y, &operand_shapes[2 * p + 1]));
      flags.insert(flags.end(), {d.transpose_x, d.conjugate_x, d.transpose_y, d.conjugate_y});
      batch_ranks.push_back(d.batch_shape >= 0 ? int64_t(target.size()) : -1);
      batch_shapes.insert(batch_shapes.end(), target.begin(), target.end());
    }
    const std::vector<xla::XlaOp> results =
        EmitCustomCall(ctx, smallmm_xla::kBatchMatMulTarget, operands, operand_shapes, products,
                       DTypeAttr(dtype_) + ", flags = " + I64Array(flags) + ", batch_ranks = " +
                           I64Array(batch_ranks) + ", batch_shapes = " + I64Array(batch_shapes));
    for (int p = 0; p < count_; ++p) {
      const std::vector<int32>& perm = products_[p].perm_output;
      ctx->SetOutput(p, perm.empty() ? results[p]
                                     : xla::Transpose(results[p], std::vector<int64_t>(
                                                                      perm.begin(), perm.end())));
    }
  }

 private:
  SmallMMProduct products_[2];
  int count_ = 1;
  smallmm::DType dtype_;
};

// SmallMMDynamicRouting (u_hat -> v) and SmallMMDynamicRoutingGrad (u_hat, grad_v ->
// grad_u_hat).
template <bool kBackward>
class SmallMMDynamicRoutingXlaOp : public XlaOpKernel {
 public:
  explicit SmallMMDynamicRoutingXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSmallMMRoutingAttrs(ctx, &attrs_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape u = ctx->InputShape(0);
    const TensorShape grad_v = kBackward ? ctx->InputShape(1) : TensorShape();
    smallmm::RoutingShape shape;
    OP_REQUIRES_OK(ctx,
                   SmallMMRoutingShape(name(), attrs_, u, kBackward ? &grad_v : nullptr, &shape));
    // "%.8e": nine significant digits, which give back the float32 exactly.
    char epsilon[32];
    std::snprintf(epsilon, sizeof(epsilon), "%.8e", double(attrs_.epsilon));
    const std::vector<xla::XlaOp> results = EmitCustomCall(
        ctx, kBackward ? smallmm_xla::kRoutingGradTarget : smallmm_xla::kRoutingTarget,
        kBackward ? std::vector<xla::XlaOp>{ctx->Input(0), ctx->Input(1)}
                  : std::vector<xla::XlaOp>{ctx->Input(0)},
        kBackward ? std::vector<TensorShape>{u, grad_v} : std::vector<TensorShape>{u},
        {kBackward ? u : TensorShape({shape.batch, shape.out_caps, shape.out_dim})},
        DTypeAttr(attrs_.dtype) + ", iterations = " + std::to_string(attrs_.iterations) +
            " : i64, epsilon = " + epsilon + " : f32");
    ctx->SetOutput(0, results[0]);
  }

 private:
  SmallMMRoutingAttrs attrs_;
};

// The matmul ops compile for the CPU, and for the GPU when the CUDA kernels (and so the
// "CUDA" handler) are built; routing has CPU kernels only. Their dtypes are the TF
// kernels' (the one dtype list); batch_shape inputs must be compile-time constants.
std::vector<DataType> MatMulTypes() { return {SMALLMM_TF_DTYPES(SMALLMM_TF_DATATYPE)}; }
std::vector<DataType> RoutingTypes() {
#define SMALLMM_ROUTING_DATATYPE(CORE) smallmm_tf::TfType<smallmm::DType::CORE>::kDataType,
  return {SMALLMM_ROUTING_DTYPES(SMALLMM_ROUTING_DATATYPE)};
#undef SMALLMM_ROUTING_DATATYPE
}
std::vector<absl::string_view> MatMulDevices() {
#if GOOGLE_CUDA
  return {DEVICE_CPU_XLA_JIT, DEVICE_GPU_XLA_JIT};
#else
  return {DEVICE_CPU_XLA_JIT};
#endif
}

REGISTER_XLA_OP(
    Name("SmallMMBatchMatMul").Device(MatMulDevices()).TypeConstraint("T", MatMulTypes()),
    SmallMMMatMulXlaOp);
REGISTER_XLA_OP(Name("SmallMMBatchMatMulReduce")
                    .Device(MatMulDevices())
                    .TypeConstraint("T", MatMulTypes())
                    .CompileTimeConstantInput("batch_shape"),
                SmallMMMatMulXlaOp);
REGISTER_XLA_OP(Name("SmallMMBatchMatMulPair")
                    .Device(MatMulDevices())
                    .TypeConstraint("T", MatMulTypes())
                    .CompileTimeConstantInput("batch_shape_1")
                    .CompileTimeConstantInput("batch_shape_2"),
                SmallMMMatMulXlaOp);
REGISTER_XLA_OP(
    Name("SmallMMDynamicRouting").Device(DEVICE_CPU_XLA_JIT).TypeConstraint("T", RoutingTypes()),
    SmallMMDynamicRoutingXlaOp<false>);
REGISTER_XLA_OP(Name("SmallMMDynamicRoutingGrad")
                    .Device(DEVICE_CPU_XLA_JIT)
                    .TypeConstraint("T", RoutingTypes()),
                SmallMMDynamicRoutingXlaOp<true>);

}  // namespace
}  // namespace tensorflow
