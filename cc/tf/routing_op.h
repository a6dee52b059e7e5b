// The fused dynamic-routing ops (SmallMMDynamicRouting and its Grad): their attrs and input
// checks, shared by the OpKernel and the XLA kernels (cc/xla/xla_kernels.cc) so both accept
// the same inputs with the same error texts, and the one OpKernel, shared by the CPU
// registrations in routing_ops.cc and the GPU ones in routing_ops_gpu.cc: it validates,
// allocates, and hands the shape to the device's Launch.
#ifndef TF_SMALLMM_CC_TF_ROUTING_OP_H_
#define TF_SMALLMM_CC_TF_ROUTING_OP_H_

#include <string>

#include "cc/engine/routing.h"
#include "cc/tf/smallmm_types.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tensorflow {

struct SmallMMRoutingAttrs {
  int iterations = 1;
  float epsilon = 1e-7f;
  smallmm::DType dtype = smallmm::DType::kFloat;
};

inline absl::Status ReadSmallMMRoutingAttrs(OpKernelConstruction* ctx, SmallMMRoutingAttrs* attrs) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("num_iterations", &attrs->iterations));
  TF_RETURN_IF_ERROR(ctx->GetAttr("epsilon", &attrs->epsilon));
  if (!smallmm_tf::ToCoreDType(ctx->input_type(0), &attrs->dtype)) {
    return errors::InvalidArgument(ctx->def().name(), ": unsupported dtype ",
                                   DataTypeString(ctx->input_type(0)));
  }
  return absl::OkStatus();
}

// The routing problem of op `op_name` for û of shape `u` and, for the gradient op, grad_v
// of shape *grad_v (nullptr for the forward op); InvalidArgument naming the shapes when
// they do not fit.
inline absl::Status SmallMMRoutingShape(const std::string& op_name,
                                        const SmallMMRoutingAttrs& attrs, const TensorShape& u,
                                        const TensorShape* grad_v, smallmm::RoutingShape* shape) {
  if (u.dims() != 4) {
    return errors::InvalidArgument(
        op_name, ": u_hat must have rank 4 [batch, in_caps, out_caps, out_dim], got shape ",
        u.DebugString());
  }
  shape->batch = u.dim_size(0);
  shape->in_caps = u.dim_size(1);
  shape->out_caps = u.dim_size(2);
  shape->out_dim = u.dim_size(3);
  shape->iterations = attrs.iterations;
  shape->epsilon = attrs.epsilon;
  const TensorShape v_shape({shape->batch, shape->out_caps, shape->out_dim});
  if (grad_v != nullptr && *grad_v != v_shape) {
    return errors::InvalidArgument(op_name, ": grad_v must have shape ", v_shape.DebugString(),
                                   " (v's shape for u_hat ", u.DebugString(), "), got ",
                                   grad_v->DebugString());
  }
  std::string error;
  if (!smallmm::CheckRouting(attrs.dtype, *shape, &error)) {
    return errors::InvalidArgument(op_name, ": ", error);
  }
  return absl::OkStatus();
}

// The forward op has one input (u_hat), the backward two (u_hat, grad_v).
template <typename Device>
class SmallMMDynamicRoutingOp : public OpKernel {
 public:
  explicit SmallMMDynamicRoutingOp(OpKernelConstruction* ctx)
      : OpKernel(ctx), backward_(ctx->num_inputs() == 2) {
    OP_REQUIRES_OK(ctx, ReadSmallMMRoutingAttrs(ctx, &attrs_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& u = ctx->input(0);
    const Tensor* grad_v = backward_ ? &ctx->input(1) : nullptr;
    smallmm::RoutingShape shape;
    OP_REQUIRES_OK(ctx, SmallMMRoutingShape(name(), attrs_, u.shape(),
                                            backward_ ? &grad_v->shape() : nullptr, &shape));
    Tensor* out = nullptr;
    if (backward_) {
      // dû may overwrite û when nothing else holds it (the usual case inside a gradient
      // graph): the kernels finish reading a row's û before they write that row's dû, and
      // rows are independent. Saves a batch-sized allocation and its page faults.
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, u.shape(), &out));
    } else {
      const TensorShape v_shape({shape.batch, shape.out_caps, shape.out_dim});
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, v_shape, &out));
    }
    if (out->NumElements() == 0) return;
    Launch(ctx, shape, u, grad_v, out);
  }

 private:
  // Runs the kernel on the device: out = v, or dû (then grad_v is non-null).
  void Launch(OpKernelContext* ctx, const smallmm::RoutingShape& shape, const Tensor& u,
              const Tensor* grad_v, Tensor* out);

  const bool backward_;
  SmallMMRoutingAttrs attrs_;
};

// The forward and backward kernels for engine dtype CORE on one device (DEVICE_CPU with
// Eigen::ThreadPoolDevice, or DEVICE_GPU with Eigen::GpuDevice).
#define SMALLMM_REGISTER_ROUTING_KERNELS(DEVICE_TYPE, DEVICE_CLASS, CORE)                        \
  REGISTER_KERNEL_BUILDER(Name("SmallMMDynamicRouting")                                          \
                              .Device(DEVICE_TYPE)                                               \
                              .TypeConstraint<smallmm_tf::TfType<smallmm::DType::CORE>::T>("T"), \
                          SmallMMDynamicRoutingOp<DEVICE_CLASS>);                                \
  REGISTER_KERNEL_BUILDER(Name("SmallMMDynamicRoutingGrad")                                      \
                              .Device(DEVICE_TYPE)                                               \
                              .TypeConstraint<smallmm_tf::TfType<smallmm::DType::CORE>::T>("T"), \
                          SmallMMDynamicRoutingOp<DEVICE_CLASS>);

}  // namespace tensorflow

#endif  // TF_SMALLMM_CC_TF_ROUTING_OP_H_
