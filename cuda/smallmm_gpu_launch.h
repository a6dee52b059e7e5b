// smallmm_gpu_launch.h — what the CUDA launchers (*.cu.cc) share; nvcc-compiled code only.
#ifndef TF_SMALLMM_CUDA_SMALLMM_GPU_LAUNCH_H_
#define TF_SMALLMM_CUDA_SMALLMM_GPU_LAUNCH_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace smallmm {
namespace gpu {

// Blocks of `threads` threads that the current device holds resident at once (one full
// wave), from cudaDeviceGetAttribute (never from cudaDeviceProp: its layout differs between
// the CUDA 12 runtime TensorFlow runs and a CUDA 13 toolkit). Cached per device.
cudaError_t MaxResidentBlocks(int threads, int64_t* out);

// cudaLaunchKernel on `stream` (a cudaStream_t), clearing the sticky last-error slot when
// the launch fails so that later checks do not see this launch's error again.
cudaError_t LaunchKernel(const void* kernel, int64_t blocks, int threads, size_t smem_bytes,
                         void** args, void* stream);

}  // namespace gpu
}  // namespace smallmm

#endif  // TF_SMALLMM_CUDA_SMALLMM_GPU_LAUNCH_H_
