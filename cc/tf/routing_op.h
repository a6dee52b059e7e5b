// The attrs and input checks of the SmallMMDynamicRouting(Grad) ops, shared by their
// OpKernel (routing_ops.cc) and their XLA kernels (cc/xla/xla_kernels.cc), so both accept
// the same inputs with the same error texts.
#ifndef TF_SMALLMM_CC_TF_ROUTING_OP_H_
#define TF_SMALLMM_CC_TF_ROUTING_OP_H_

#include <string>

#include "cc/engine/routing.h"
#include "cc/tf/smallmm_types.h"
#include "tensorflow/core/framework/op_kernel.h"
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

}  // namespace tensorflow

#endif  // TF_SMALLMM_CC_TF_ROUTING_OP_H_
