// The CUDA kernels of the kernel core: one kernel per dtype, all running the block
// program of smallmm_gpu_logic.h (which the host simulation also runs). Compiled by nvcc
// only; uses the CUDA runtime API and nothing from TensorFlow or Eigen (CUDA 13's
// cudaDeviceProp differs from the CUDA 12.5 TF was built with, so device limits are
// read with cudaDeviceGetAttribute).
#include "cuda/smallmm_gpu.h"

#include <cuda_runtime.h>

#include <atomic>

#include "cuda/smallmm_gpu_logic.h"

namespace smallmm {
namespace gpu {
namespace {

// The executor of the block program on the device: each thread runs its own phases.
template <typename AccT>
struct DeviceExec {
  unsigned char* smem;
  AccT acc;

  __device__ unsigned char* shared() { return smem; }
  __device__ void Barrier() { __syncthreads(); }
  template <class F>
  __device__ void ForEachThread(F f) {
    f(int(threadIdx.x), acc);
  }
  template <class U>
  __device__ U Read(const U* p) {
    return *p;
  }
  template <class U>
  __device__ U ReadUniform(const U* p) {
    return *p;
  }
  template <class U>
  __device__ void Write(U* p, U v) {
    *p = v;
  }
  __device__ void OnLoad(int, int64_t) {}
  __device__ void OnStore(int64_t) {}
  __device__ void CountStage(bool, bool) {}
};

// The plan and configuration stay in the kernel-parameter space (__grid_constant__: the
// block program indexes their loop arrays without a local copy).
template <DType D>
__global__ void __launch_bounds__(kThreads, 4)
    BatchMatMulKernel(const __grid_constant__ GemmPlan plan,
                      const __grid_constant__ LaunchConfig cfg, const void* a, const void* b,
                      void* c) {
  extern __shared__ __align__(16) unsigned char smem[];
  using E = Elem<D>;
  DeviceExec<Acc<typename E::R, E::kPlanes>> ex{smem, {}};
  RunBlock<D>(ex, plan, cfg, a, b, c, int64_t(blockIdx.x));
}

// Resident 256-thread blocks for one full wave on the current device, cached per device.
cudaError_t MaxBlocks(int64_t* out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev >= 0 && dev < kMaxDevices) {
    const int64_t cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) {
      *out = cached;
      return cudaSuccess;
    }
  }
  int sms = 0, threads_per_sm = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) {
    e = cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev);
  }
  if (e != cudaSuccess) return e;
  const int64_t blocks =
      int64_t(sms > 0 ? sms : 1) * (threads_per_sm >= kThreads ? threads_per_sm / kThreads : 1);
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(blocks, std::memory_order_relaxed);
  *out = blocks;
  return cudaSuccess;
}

template <DType D>
cudaError_t Launch(const GemmPlan& plan, const LaunchConfig& cfg, const void* a, const void* b,
                   void* c, cudaStream_t stream) {
  void* args[] = {const_cast<GemmPlan*>(&plan), const_cast<LaunchConfig*>(&cfg), &a, &b, &c};
  // cudaLaunchKernel reports this launch's own error (bad configuration, no kernel image
  // for the device, ...); clear the sticky last-error slot so later checks don't see it.
  const cudaError_t e = cudaLaunchKernel(reinterpret_cast<const void*>(&BatchMatMulKernel<D>),
                                         dim3(unsigned(cfg.blocks)), dim3(unsigned(cfg.threads)),
                                         args, size_t(cfg.smem_bytes), stream);
  if (e != cudaSuccess) cudaGetLastError();
  return e;
}

}  // namespace

const char* LaunchBatchMatMul(DType dtype, const GemmPlan& plan, const void* a, const void* b,
                              void* c, void* stream) {
  if (plan.output_elements == 0) return nullptr;
  if (int(dtype) < 0 || int(dtype) >= kNumDTypes) return "unsupported dtype";
  int64_t max_blocks = 0;
  cudaError_t e = MaxBlocks(&max_blocks);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  LaunchConfig cfg;
  if (const char* err = MakeLaunchConfig(plan, dtype, kThreads, kSmemBudget, max_blocks, &cfg)) {
    return err;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
#define SMALLMM_LAUNCH_CASE(d, name, bytes, S, A) \
  case DType::d:                                  \
    e = Launch<DType::d>(plan, cfg, a, b, c, s);  \
    break;
    SMALLMM_DTYPES(SMALLMM_LAUNCH_CASE)
#undef SMALLMM_LAUNCH_CASE
    default:
      return "unsupported dtype";
  }
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace gpu
}  // namespace smallmm
