// TF adapter of the fused dynamic-routing kernels (cc/engine/routing.h): op
// registrations, shape functions, and the CPU Launch of the one OpKernel of the forward and
// backward ops (routing_op.h), which runs the engine's row sharding (cc/engine/execute.h)
// on TF's intra-op thread pool; the math is in cc/engine/routing_isa.cc (CPU) and
// cuda/routing_gpu_logic.h (GPU). The gradient is registered in Python
// (tf_smallmm/capsules/routing.py).
#include <string>

#include "cc/engine/execute.h"
#include "cc/engine/routing.h"
#include "cc/tf/cpu_executor.h"
#include "cc/tf/routing_op.h"
#include "cc/tf/smallmm_types.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// The op's type attr and the kernel registrations both come from the engine's list of
// routing dtypes (SMALLMM_ROUTING_DTYPES, cc/engine/routing.h).
std::string RoutingTypeAttr() {
#define SMALLMM_ROUTING_DATATYPE(CORE) smallmm_tf::TfType<smallmm::DType::CORE>::kDataType,
  return smallmm_tf::TypeAttr({SMALLMM_ROUTING_DTYPES(SMALLMM_ROUTING_DATATYPE)});
#undef SMALLMM_ROUTING_DATATYPE
}

// u_hat [batch, in_caps, out_caps, out_dim] -> v [batch, out_caps, out_dim].
absl::Status RoutingShape(InferenceContext* c) {
  ShapeHandle u;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &u));
  c->set_output(0, c->MakeShape({c->Dim(u, 0), c->Dim(u, 2), c->Dim(u, 3)}));
  return absl::OkStatus();
}

// (u_hat, grad_v) -> grad_u_hat, shaped like u_hat; grad_v must be v's shape.
absl::Status RoutingGradShape(InferenceContext* c) {
  ShapeHandle u, gv, v, unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &u));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &gv));
  v = c->MakeShape({c->Dim(u, 0), c->Dim(u, 2), c->Dim(u, 3)});
  TF_RETURN_IF_ERROR(c->Merge(gv, v, &unused));
  c->set_output(0, u);
  return absl::OkStatus();
}

REGISTER_OP("SmallMMDynamicRouting")
    .Input("u_hat: T")
    .Output("v: T")
    .Attr(RoutingTypeAttr())
    .Attr("num_iterations: int >= 1 = 3")
    .Attr("epsilon: float = 1e-7")
    .SetShapeFn(RoutingShape)
    .Doc(R"doc(
Dynamic routing-by-agreement (Sabour et al. 2017) over prediction vectors
u_hat [batch, in_caps, out_caps, out_dim], all iterations fused per batch row:
logits = 0; repeat num_iterations times: c = softmax(logits, axis=out_caps),
s = sum_i c * u_hat, v = squash(s) = s |s|^2 / (1 + |s|^2) / sqrt(|s|^2 + epsilon), and
(except after the last) logits += <u_hat, v>. Returns v [batch, out_caps, out_dim].
)doc");

REGISTER_OP("SmallMMDynamicRoutingGrad")
    .Input("u_hat: T")
    .Input("grad_v: T")
    .Output("grad_u_hat: T")
    .Attr(RoutingTypeAttr())
    .Attr("num_iterations: int >= 1 = 3")
    .Attr("epsilon: float = 1e-7")
    .SetShapeFn(RoutingGradShape)
    .Doc(R"doc(
Gradient of SmallMMDynamicRouting with respect to u_hat, exact through every iteration
(agreement and coupling coefficients included). Recomputes the forward iterations of each
batch row inside the kernel instead of storing them. Not differentiable itself.
)doc");

using CPUDevice = Eigen::ThreadPoolDevice;

}  // namespace

template <>
void SmallMMDynamicRoutingOp<CPUDevice>::Launch(OpKernelContext* ctx,
                                                const smallmm::RoutingShape& shape, const Tensor& u,
                                                const Tensor* grad_v, Tensor* out) {
  OP_REQUIRES(ctx,
              smallmm::ExecuteRouting(attrs_.dtype, shape, u.tensor_data().data(),
                                      grad_v != nullptr ? grad_v->tensor_data().data() : nullptr,
                                      const_cast<char*>(out->tensor_data().data()),
                                      smallmm_tf::CpuExecutor(ctx)),
              errors::ResourceExhausted(name(), ": could not allocate routing scratch for ",
                                        u.shape().DebugString()));
}

namespace {

#define SMALLMM_REGISTER_ROUTING_CPU(CORE) \
  SMALLMM_REGISTER_ROUTING_KERNELS(DEVICE_CPU, CPUDevice, CORE)
SMALLMM_ROUTING_DTYPES(SMALLMM_REGISTER_ROUTING_CPU)
#undef SMALLMM_REGISTER_ROUTING_CPU

}  // namespace
}  // namespace tensorflow
