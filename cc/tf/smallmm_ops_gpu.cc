// GPU kernels of the SmallMM ops: the GPU Launch of the one base OpKernel and the GPU
// registrations, from the one dtype list. Compiled by the host compiler with
// -DGOOGLE_CUDA=1 only when the CUDA kernels (cuda/) are built. Includes no CUDA or Eigen
// GPU header (the tensorflow-cpu wheel ships none): the stream comes from the op's
// device context as the platform's raw handle and goes to cuda/smallmm_gpu.h's launcher.
#if GOOGLE_CUDA

#include "cc/engine/smallmm.h"
#include "cc/tf/smallmm_matmul_op.h"
#include "cc/tf/smallmm_types.h"
#include "cuda/smallmm_gpu.h"
#include "tensorflow/core/framework/device_base.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "xla/stream_executor/stream.h"

namespace tensorflow {

using GPUDevice = Eigen::GpuDevice;

// A pair (both gradients of a product) is two launches on the op's stream: a block of
// either product already stages the shared operand in shared memory.
template <>
void SmallMMMatMulOp<GPUDevice>::Launch(OpKernelContext* ctx, const SmallMMPlanned* planned,
                                        int count) {
  DeviceContext* dc = ctx->op_device_context();
  stream_executor::Stream* stream = dc != nullptr ? dc->stream() : nullptr;
  OP_REQUIRES(ctx, stream != nullptr,
              errors::Internal(name(), ": no GPU stream in the op's device context"));
  void* raw_stream = stream->platform_specific_handle().stream;
  OP_REQUIRES(ctx, raw_stream != nullptr,
              errors::Internal(name(), ": the GPU stream has no CUDA handle"));
  for (int i = 0; i < count; ++i) {
    const SmallMMPlanned& q = planned[i];
    const char* error = smallmm::gpu::LaunchBatchMatMul(
        dtype_, q.plan, q.x->tensor_data().data(), q.y->tensor_data().data(),
        const_cast<char*>(q.out->tensor_data().data()), raw_stream);
    OP_REQUIRES(ctx, error == nullptr,
                errors::Internal(name(), ": SmallMM GPU kernel launch failed: ", error));
  }
}

namespace {

#define SMALLMM_REGISTER_GPU(CORE, T, DT) SMALLMM_REGISTER_MATMUL_KERNELS(DEVICE_GPU, GPUDevice, T)
SMALLMM_TF_DTYPES(SMALLMM_REGISTER_GPU)
#undef SMALLMM_REGISTER_GPU

}  // namespace
}  // namespace tensorflow

#endif  // GOOGLE_CUDA
