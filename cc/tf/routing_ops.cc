// TF adapter of the fused dynamic-routing kernels (cc/engine/routing.h): op
// registrations, shape functions and one OpKernel for the forward and backward ops. It
// only validates, allocates and shards rows over TF's intra-op thread pool; the math is in
// cc/engine/routing_isa.cc. The gradient is registered in Python (tf_smallmm/capsules/routing.py).
#include <atomic>
#include <string>

#include "cc/engine/routing.h"
#include "cc/tf/smallmm_types.h"
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

std::string ShapeOf(const Tensor& t) { return t.shape().DebugString(); }

template <bool kBackward>
class SmallMMDynamicRoutingOp : public OpKernel {
 public:
  explicit SmallMMDynamicRoutingOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_iterations", &iterations_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES(ctx, smallmm_tf::ToCoreDType(ctx->input_type(0), &dtype_),
                errors::InvalidArgument(name(), ": unsupported dtype ",
                                        DataTypeString(ctx->input_type(0))));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& u = ctx->input(0);
    OP_REQUIRES(
        ctx, u.dims() == 4,
        errors::InvalidArgument(name(),
                                ": u_hat must have rank 4 [batch, in_caps, out_caps, out_dim], "
                                "got shape ",
                                ShapeOf(u)));
    smallmm::RoutingShape shape;
    shape.batch = u.dim_size(0);
    shape.in_caps = u.dim_size(1);
    shape.out_caps = u.dim_size(2);
    shape.out_dim = u.dim_size(3);
    shape.iterations = iterations_;
    shape.epsilon = epsilon_;
    const TensorShape v_shape({shape.batch, shape.out_caps, shape.out_dim});
    const Tensor* grad_v = nullptr;
    if (kBackward) {
      grad_v = &ctx->input(1);
      OP_REQUIRES(ctx, grad_v->shape() == v_shape,
                  errors::InvalidArgument(name(), ": grad_v must have shape ",
                                          v_shape.DebugString(), " (v's shape for u_hat ",
                                          ShapeOf(u), "), got ", ShapeOf(*grad_v)));
    }
    std::string error;
    OP_REQUIRES(ctx, smallmm::CheckRouting(dtype_, shape, &error),
                errors::InvalidArgument(name(), ": ", error));
    Tensor* out = nullptr;
    if (kBackward) {
      // dû may overwrite û when nothing else holds it (the usual case inside a gradient
      // graph): the kernel finishes reading a row's û before it writes that row's dû, and
      // rows are independent. Saves a batch-sized allocation and its page faults.
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, u.shape(), &out));
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, v_shape, &out));
    }
    if (out->NumElements() == 0) return;

    const void* u_data = u.tensor_data().data();
    const void* gv_data = kBackward ? grad_v->tensor_data().data() : nullptr;
    void* out_data = const_cast<char*>(out->tensor_data().data());
    const smallmm::DType dtype = dtype_;
    std::atomic<bool> ok{true};
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    // One row is the unit of work: its routing iterations run with its û in cache.
    Shard(workers->num_threads, workers->workers, shape.batch,
          smallmm::RoutingCostPerRow(shape, kBackward), [&](int64_t begin, int64_t end) {
            const bool done =
                kBackward ? smallmm::RunRoutingBackward(dtype, shape, u_data, gv_data, out_data,
                                                        begin, end)
                          : smallmm::RunRoutingForward(dtype, shape, u_data, out_data, begin, end);
            if (!done) ok.store(false);
          });
    OP_REQUIRES(
        ctx, ok.load(),
        errors::ResourceExhausted(name(), ": could not allocate routing scratch for ", ShapeOf(u)));
  }

 private:
  int iterations_ = 1;
  float epsilon_ = 1e-7f;
  smallmm::DType dtype_;
};

#define SMALLMM_REGISTER_ROUTING_CPU(CORE)                                                       \
  REGISTER_KERNEL_BUILDER(Name("SmallMMDynamicRouting")                                          \
                              .Device(DEVICE_CPU)                                                \
                              .TypeConstraint<smallmm_tf::TfType<smallmm::DType::CORE>::T>("T"), \
                          SmallMMDynamicRoutingOp<false>);                                       \
  REGISTER_KERNEL_BUILDER(Name("SmallMMDynamicRoutingGrad")                                      \
                              .Device(DEVICE_CPU)                                                \
                              .TypeConstraint<smallmm_tf::TfType<smallmm::DType::CORE>::T>("T"), \
                          SmallMMDynamicRoutingOp<true>);
SMALLMM_ROUTING_DTYPES(SMALLMM_REGISTER_ROUTING_CPU)
#undef SMALLMM_REGISTER_ROUTING_CPU

}  // namespace
}  // namespace tensorflow
