// What the GPU glue files (cc/tf/*_gpu.cc) share: the op's CUDA stream, and the GPU kernel
// registrations, which run when the loader calls SmallMMRegisterGpuKernels (after checking
// the driver), not when the library is loaded.
#ifndef TF_SMALLMM_CC_TF_SMALLMM_OPS_GPU_H_
#define TF_SMALLMM_CC_TF_SMALLMM_OPS_GPU_H_

#include "tensorflow/core/framework/op_kernel.h"

namespace tensorflow {

// The op's stream as the platform's raw handle (a cudaStream_t), or an Internal error.
absl::Status SmallMMGpuStream(OpKernelContext* ctx, void** stream);

// Registers the GPU kernels of the routing ops (routing_ops_gpu.cc).
void RegisterSmallMMRoutingGpuKernels();

}  // namespace tensorflow

#endif  // TF_SMALLMM_CC_TF_SMALLMM_OPS_GPU_H_
