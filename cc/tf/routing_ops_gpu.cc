// GPU Launch of the fused dynamic-routing ops (routing_op.h) and their GPU registrations,
// from the routing dtype list. Compiled by the host compiler with -DGOOGLE_CUDA=1 only when
// the CUDA kernels (cuda/) are built; like smallmm_ops_gpu.cc it includes no CUDA or Eigen
// GPU header and hands the op's stream to cuda/smallmm_gpu.h's launchers.
#if GOOGLE_CUDA

#include "cc/engine/routing.h"
#include "cc/tf/routing_op.h"
#include "cc/tf/smallmm_ops_gpu.h"
#include "cc/tf/smallmm_types.h"
#include "cuda/smallmm_gpu.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tensorflow {

template <>
void SmallMMDynamicRoutingOp<Eigen::GpuDevice>::Launch(OpKernelContext* ctx,
                                                       const smallmm::RoutingShape& shape,
                                                       const Tensor& u, const Tensor* grad_v,
                                                       Tensor* out) {
  void* stream = nullptr;
  OP_REQUIRES_OK(ctx, SmallMMGpuStream(ctx, &stream));
  int64_t scratch_bytes = 0;
  const char* error =
      smallmm::gpu::RoutingScratchBytes(attrs_.dtype, shape, backward_, &scratch_bytes);
  OP_REQUIRES(ctx, error == nullptr,
              errors::Internal(name(), ": SmallMM GPU routing configuration failed: ", error));
  // The rows' workspace when it does not fit in shared memory (backward on CapsNet-sized
  // layers): one slice per resident block, not per row.
  Tensor scratch;
  if (scratch_bytes > 0) {
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_INT8, TensorShape({scratch_bytes}), &scratch));
  }
  void* ws = scratch_bytes > 0 ? const_cast<char*>(scratch.tensor_data().data()) : nullptr;
  const void* u_data = u.tensor_data().data();
  void* out_data = const_cast<char*>(out->tensor_data().data());
  error =
      backward_
          ? smallmm::gpu::LaunchRoutingBackward(attrs_.dtype, shape, u_data,
                                                grad_v->tensor_data().data(), out_data, ws, stream)
          : smallmm::gpu::LaunchRoutingForward(attrs_.dtype, shape, u_data, out_data, ws, stream);
  OP_REQUIRES(ctx, error == nullptr,
              errors::Internal(name(), ": SmallMM GPU routing launch failed: ", error));
}

void RegisterSmallMMRoutingGpuKernels() {
#define SMALLMM_REGISTER_ROUTING_GPU(CORE) \
  SMALLMM_REGISTER_ROUTING_KERNELS(DEVICE_GPU, Eigen::GpuDevice, CORE)
  SMALLMM_ROUTING_DTYPES(SMALLMM_REGISTER_ROUTING_GPU)
#undef SMALLMM_REGISTER_ROUTING_GPU
}

}  // namespace tensorflow

#endif  // GOOGLE_CUDA
