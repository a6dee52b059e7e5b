// GPU kernels of the SmallMM ops: the GPU Launch of the one base matmul OpKernel, the GPU
// registrations from the one dtype list, and the two C entry points the loader calls
// (tf_smallmm/_core/loader.py, through ctypes). Compiled by the host compiler with
// -DGOOGLE_CUDA=1 only when the CUDA kernels (cuda/) are built. Includes no CUDA or Eigen
// GPU header (the tensorflow-cpu wheel ships none): the stream comes from the op's device
// context as the platform's raw handle and goes to cuda/smallmm_gpu.h's launchers.
//
// GPU kernels are registered by SmallMMRegisterGpuKernels, not by static initializers: the
// loader first compares the driver's CUDA version (SmallMMCudaDriverVersion) with the one
// the toolkit that built the kernels needs, and registers none under an older driver, so
// that TensorFlow places the ops on the CPU and the wrappers pick the GPU built-ins instead
// of launching kernels the driver cannot load.
#if GOOGLE_CUDA

#include "cc/tf/smallmm_ops_gpu.h"

#include <mutex>

#include "cc/engine/smallmm.h"
#include "cc/tf/smallmm_matmul_op.h"
#include "cc/tf/smallmm_types.h"
#include "cuda/smallmm_gpu.h"
#include "tensorflow/core/framework/device_base.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "xla/stream_executor/stream.h"

namespace tensorflow {

using GPUDevice = Eigen::GpuDevice;

absl::Status SmallMMGpuStream(OpKernelContext* ctx, void** stream) {
  DeviceContext* dc = ctx->op_device_context();
  stream_executor::Stream* s = dc != nullptr ? dc->stream() : nullptr;
  if (s == nullptr) {
    return errors::Internal(ctx->op_kernel().name(), ": no GPU stream in the op's device context");
  }
  *stream = s->platform_specific_handle().stream;
  if (*stream == nullptr) {
    return errors::Internal(ctx->op_kernel().name(), ": the GPU stream has no CUDA handle");
  }
  return absl::OkStatus();
}

// A pair (both gradients of a product) is two launches on the op's stream: a block of
// either product already stages the shared operand in shared memory.
template <>
void SmallMMMatMulOp<GPUDevice>::Launch(OpKernelContext* ctx, const SmallMMPlanned* planned,
                                        int count) {
  void* raw_stream = nullptr;
  OP_REQUIRES_OK(ctx, SmallMMGpuStream(ctx, &raw_stream));
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

void RegisterMatMulGpuKernels() {
#define SMALLMM_REGISTER_GPU(CORE, T, DT) SMALLMM_REGISTER_MATMUL_KERNELS(DEVICE_GPU, GPUDevice, T)
  SMALLMM_TF_DTYPES(SMALLMM_REGISTER_GPU)
#undef SMALLMM_REGISTER_GPU
}

}  // namespace
}  // namespace tensorflow

#define SMALLMM_EXPORT extern "C" __attribute__((visibility("default")))

// The CUDA driver's version as cudaDriverGetVersion reports it (13000 for a driver that
// supports CUDA 13.0), 0 without a driver, -1 when TensorFlow provides no CUDA runtime.
SMALLMM_EXPORT int SmallMMCudaDriverVersion() { return smallmm::gpu::DriverVersion(); }

// Registers the GPU kernels of every SmallMM op, once (later calls do nothing).
SMALLMM_EXPORT void SmallMMRegisterGpuKernels() {
  static std::once_flag once;
  std::call_once(once, [] {
    tensorflow::RegisterMatMulGpuKernels();
    tensorflow::RegisterSmallMMRoutingGpuKernels();
  });
}

#endif  // GOOGLE_CUDA
