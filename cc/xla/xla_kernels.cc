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

// Emits custom call `target` on inputs `inputs` of the op with results of shapes
// `outputs` (one: an array, two: a tuple) and sets the op's outputs from it.
void EmitCustomCall(XlaOpKernelContext* ctx, const char* target, const std::vector<int>& inputs,
                    const std::vector<TensorShape>& outputs, const std::string& attributes) {
  std::vector<xla::XlaOp> operands;
  std::vector<xla::Shape> operand_shapes;
  for (int i : inputs) {
    operands.push_back(ctx->Input(i));
    operand_shapes.push_back(RowMajor(ctx->input_xla_type(i), ctx->InputShape(i)));
  }
  std::vector<xla::Shape> result_shapes;
  for (const TensorShape& s : outputs) result_shapes.push_back(RowMajor(ctx->input_xla_type(0), s));
  const xla::Shape result =
      result_shapes.size() == 1 ? result_shapes[0] : xla::ShapeUtil::MakeTupleShape(result_shapes);
  const xla::XlaOp call = xla::CustomCallWithLayout(
      ctx->builder(), target, operands, result, operand_shapes, "{" + attributes + "}",
      /*has_side_effect=*/false, /*output_operand_aliasing=*/{}, /*literal=*/nullptr,
      xla::CustomCallSchedule::SCHEDULE_NONE, xla::CustomCallApiVersion::API_VERSION_TYPED_FFI);
  for (size_t p = 0; p < outputs.size(); ++p) {
    ctx->SetOutput(int(p), outputs.size() == 1 ? call : xla::GetTupleElement(call, int64_t(p)));
  }
}

// SmallMMBatchMatMul, SmallMMBatchMatMulReduce and SmallMMBatchMatMulPair.
class SmallMMMatMulXlaOp : public XlaOpKernel {
 public:
  explicit SmallMMMatMulXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSmallMMProducts(ctx, products_, &count_, &dtype_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    std::vector<int> inputs;
    std::vector<TensorShape> outputs(count_);
    std::vector<int64_t> flags, batch_ranks, batch_shapes;
    for (int p = 0; p < count_; ++p) {
      const SmallMMProduct& d = products_[p];
      std::vector<int64_t> target;
      if (d.batch_shape >= 0) {
        OP_REQUIRES_OK(ctx, ctx->ConstantInputAsIntVector(d.batch_shape, &target));
      }
      smallmm::GemmPlan plan;
      OP_REQUIRES_OK(ctx, PlanSmallMMProduct(name(), d, ctx->InputShape(d.x), ctx->InputShape(d.y),
                                             target, &plan, &outputs[p]));
      inputs.push_back(d.x);
      inputs.push_back(d.y);
      flags.insert(flags.end(), {d.transpose_x, d.conjugate_x, d.transpose_y, d.conjugate_y});
      batch_ranks.push_back(d.batch_shape >= 0 ? int64_t(target.size()) : -1);
      batch_shapes.insert(batch_shapes.end(), target.begin(), target.end());
    }
    EmitCustomCall(ctx, smallmm_xla::kBatchMatMulTarget, inputs, outputs,
                   DTypeAttr(dtype_) + ", flags = " + I64Array(flags) + ", batch_ranks = " +
                       I64Array(batch_ranks) + ", batch_shapes = " + I64Array(batch_shapes));
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
    EmitCustomCall(ctx, kBackward ? smallmm_xla::kRoutingGradTarget : smallmm_xla::kRoutingTarget,
                   kBackward ? std::vector<int>{0, 1} : std::vector<int>{0},
                   {kBackward ? u : TensorShape({shape.batch, shape.out_caps, shape.out_dim})},
                   DTypeAttr(attrs_.dtype) + ", iterations = " + std::to_string(attrs_.iterations) +
                       " : i64, epsilon = " + epsilon + " : f32");
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
