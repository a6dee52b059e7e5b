// The one base OpKernel of the SmallMM matmul ops (shared by the CPU registrations in
// smallmm_ops.cc and the GPU ones in smallmm_ops_gpu.cc). It validates and broadcasts
// through the kernel core's planner, allocates, handles empty outputs, and hands the plan
// to the device's Launch.
#ifndef TF_SMALLMM_CC_TF_SMALLMM_MATMUL_OP_H_
#define TF_SMALLMM_CC_TF_SMALLMM_MATMUL_OP_H_

#include <string>
#include <vector>

#include "cc/engine/execute.h"
#include "cc/engine/smallmm.h"
#include "cc/tf/smallmm_types.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tensorflow {

// One product of an op: op(x) · op(y), optionally reduced to a batch_shape input.
struct SmallMMProduct {
  int x = 0, y = 1, batch_shape = -1;  // input indices (-1: no batch_shape)
  bool transpose_x = false, conjugate_x = false, transpose_y = false, conjugate_y = false;
};

// A product planned against its inputs, with its output allocated.
struct SmallMMPlanned {
  smallmm::GemmPlan plan;
  const Tensor* x = nullptr;
  const Tensor* y = nullptr;
  Tensor* out = nullptr;
};

// Reads the products of a SmallMM matmul op (one per output) from its attrs, and its
// dtype; shared by the OpKernels and the XLA kernels (cc/xla/xla_kernels.cc).
inline absl::Status ReadSmallMMProducts(OpKernelConstruction* ctx, SmallMMProduct products[2],
                                        int* count, smallmm::DType* dtype) {
  *count = ctx->num_outputs();
  const bool reduce = ctx->num_inputs() == 3 * *count;
  for (int p = 0; p < *count; ++p) {
    const std::string suffix = *count == 1 ? "" : "_" + std::to_string(p + 1);
    SmallMMProduct& d = products[p];
    d.x = (reduce ? 3 : 2) * p;
    d.y = d.x + 1;
    d.batch_shape = reduce ? d.x + 2 : -1;
    TF_RETURN_IF_ERROR(ctx->GetAttr("transpose_x" + suffix, &d.transpose_x));
    TF_RETURN_IF_ERROR(ctx->GetAttr("conjugate_x" + suffix, &d.conjugate_x));
    TF_RETURN_IF_ERROR(ctx->GetAttr("transpose_y" + suffix, &d.transpose_y));
    TF_RETURN_IF_ERROR(ctx->GetAttr("conjugate_y" + suffix, &d.conjugate_y));
  }
  if (!smallmm_tf::ToCoreDType(ctx->input_type(0), dtype)) {
    return errors::InvalidArgument("SmallMM: unsupported dtype ",
                                   DataTypeString(ctx->input_type(0)));
  }
  return absl::OkStatus();
}

// Plans product d of op `op_name` for dense inputs of shapes x and y (reduced to batch
// shape `target` when d has a batch_shape input) and gives its output shape; bad shapes
// are InvalidArgument errors with the planner's text.
inline absl::Status PlanSmallMMProduct(const std::string& op_name, const SmallMMProduct& d,
                                       const TensorShape& x, const TensorShape& y,
                                       const std::vector<int64_t>& target, smallmm::GemmPlan* plan,
                                       TensorShape* out) {
  const bool reduce = d.batch_shape >= 0;
  const auto xd = x.dim_sizes(), yd = y.dim_sizes();
  int out_rank = 0;
  int64_t out_dims[smallmm::kMaxBatchDims + 2];
  std::string error;
  if (!smallmm::PlanDenseBatchMatMul(
          x.dims(), xd.data(), d.transpose_x, d.conjugate_x, y.dims(), yd.data(), d.transpose_y,
          d.conjugate_y, reduce ? target.data() : nullptr, reduce ? int(target.size()) : -1, plan,
          &out_rank, out_dims, &error)) {
    return errors::InvalidArgument(op_name, ": ", error);
  }
  *out = TensorShape();
  for (int i = 0; i < out_rank; ++i) TF_RETURN_IF_ERROR(out->AddDimWithStatus(out_dims[i]));
  return absl::OkStatus();
}

// The one base kernel for the three ops (and every dtype: the core is type-erased):
// SmallMMBatchMatMul and SmallMMBatchMatMulReduce compute one product;
// SmallMMBatchMatMulPair computes two (both gradients of a product) so the device can
// run them together. The attrs of product p of the pair carry the suffix "_1" / "_2".
template <typename Device>
class SmallMMMatMulOp : public OpKernel {
 public:
  explicit SmallMMMatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadSmallMMProducts(ctx, products_, &count_, &dtype_));
  }

  void Compute(OpKernelContext* ctx) override {
    SmallMMPlanned planned[2];
    int live = 0;  // products with a non-empty output, packed to the front
    for (int p = 0; p < count_; ++p) {
      SmallMMPlanned q;
      Plan(ctx, p, products_[p], &q);
      if (!ctx->status().ok()) return;
      if (q.plan.output_elements > 0) planned[live++] = q;
    }
    if (live > 0) Launch(ctx, planned, live);
  }

 private:
  // Validates and broadcasts product d through the kernel core's planner and allocates
  // output p.
  void Plan(OpKernelContext* ctx, int p, const SmallMMProduct& d, SmallMMPlanned* q) {
    const Tensor& x = ctx->input(d.x);
    const Tensor& y = ctx->input(d.y);
    std::vector<int64_t> target;
    if (d.batch_shape >= 0) {
      const Tensor& bs = ctx->input(d.batch_shape);
      OP_REQUIRES(ctx, TensorShapeUtils::IsVector(bs.shape()),
                  errors::InvalidArgument("batch_shape must be a vector, got shape ",
                                          bs.shape().DebugString()));
      for (int64_t i = 0; i < bs.NumElements(); ++i) {
        target.push_back(bs.dtype() == DT_INT32 ? int64_t(bs.flat<int32>()(i))
                                                : int64_t(bs.flat<int64_t>()(i)));
      }
    }
    TensorShape out_shape;
    OP_REQUIRES_OK(
        ctx, PlanSmallMMProduct(name(), d, x.shape(), y.shape(), target, &q->plan, &out_shape));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(p, out_shape, &q->out));
    q->x = &x;
    q->y = &y;
  }

  // Runs the `count` planned products (1 or 2, none empty) on the device.
  void Launch(OpKernelContext* ctx, const SmallMMPlanned* planned, int count);

  SmallMMProduct products_[2];
  int count_ = 1;
  smallmm::DType dtype_;
};

// The kernels of the three matmul ops for C++ type T on one device (DEVICE_CPU with
// Eigen::ThreadPoolDevice, or DEVICE_GPU with Eigen::GpuDevice); batch_shape inputs are
// read on the host.
#define SMALLMM_REGISTER_MATMUL_KERNELS(DEVICE_TYPE, DEVICE_CLASS, T)                            \
  REGISTER_KERNEL_BUILDER(Name("SmallMMBatchMatMul").Device(DEVICE_TYPE).TypeConstraint<T>("T"), \
                          SmallMMMatMulOp<DEVICE_CLASS>);                                        \
  REGISTER_KERNEL_BUILDER(Name("SmallMMBatchMatMulReduce")                                       \
                              .Device(DEVICE_TYPE)                                               \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("batch_shape"),                                        \
                          SmallMMMatMulOp<DEVICE_CLASS>);                                        \
  REGISTER_KERNEL_BUILDER(Name("SmallMMBatchMatMulPair")                                         \
                              .Device(DEVICE_TYPE)                                               \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("batch_shape_1")                                       \
                              .HostMemory("batch_shape_2"),                                      \
                          SmallMMMatMulOp<DEVICE_CLASS>);

}  // namespace tensorflow

#endif  // TF_SMALLMM_CC_TF_SMALLMM_MATMUL_OP_H_
