// The CUDA matmul kernels of the kernel core: one kernel per dtype and variant of
// SMALLMM_GPU_KERNELS, all running the block program of smallmm_gpu_logic.h (which the
// host simulation also runs). Compiled by nvcc
// only; uses the CUDA runtime API and nothing from TensorFlow or Eigen (CUDA 13's
// cudaDeviceProp differs from the CUDA 12.5 TF was built with, so device limits are
// read with cudaDeviceGetAttribute).
#include "cuda/smallmm_gpu.h"

#include <cuda_runtime.h>

#include <atomic>

#include "cuda/smallmm_gpu_launch.h"
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

// Resident blocks per SM the launch bounds ask for: enough for 512 threads per SM, which
// caps a thread at 128 registers (65536 / 512). At 1024 threads (64 registers) every
// instance spilled 32-168 bytes (ptxas -v, sm_90, CUDA 13.0, 2026-12-01); not yet tuned on
// hardware.
template <class Shape>
constexpr int MinBlocksPerSm() {
  return Max(1, 512 / Shape::kLaunchThreads);
}

// One kernel per (dtype, variant of SMALLMM_GPU_KERNELS). The plan and configuration stay
// in the kernel-parameter space (__grid_constant__: the block program indexes their loop
// arrays without a local copy).
template <DType D, class Shape>
__global__ void __launch_bounds__(Shape::kLaunchThreads, MinBlocksPerSm<Shape>())
    BatchMatMulKernel(const __grid_constant__ GemmPlan plan,
                      const __grid_constant__ LaunchConfig cfg, const void* a, const void* b,
                      void* c) {
  extern __shared__ __align__(16) unsigned char smem[];
  using E = Elem<D>;
  DeviceExec<Acc<typename E::R, E::kPlanes, Shape::kEpt>> ex{smem, {}};
  RunBlock<D, Shape>(ex, plan, cfg, a, b, c, int64_t(blockIdx.x));
}

}  // namespace

cudaError_t MaxResidentBlocks(int threads, int64_t* out) {
  constexpr int kMaxDevices = 64;
  // Per device: multiprocessors × resident threads per multiprocessor (packed).
  static std::atomic<int64_t> cache[kMaxDevices];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  int64_t packed = dev >= 0 && dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (packed <= 0) {
    int sms = 0, threads_per_sm = 0;
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess) {
      e = cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev);
    }
    if (e != cudaSuccess) return e;
    packed = (int64_t(Max(sms, 1)) << 32) | int64_t(Max(threads_per_sm, 1));
    if (dev >= 0 && dev < kMaxDevices) cache[dev].store(packed, std::memory_order_relaxed);
  }
  const int64_t sms = packed >> 32, threads_per_sm = packed & 0xffffffff;
  *out = sms * Max<int64_t>(1, threads_per_sm / Max(threads, 1));
  return cudaSuccess;
}

cudaError_t LaunchKernel(const void* kernel, int64_t blocks, int threads, size_t smem_bytes,
                         void** args, void* stream) {
  // cudaLaunchKernel reports this launch's own error (bad configuration, no kernel image
  // for the device, ...); clear the sticky last-error slot so later checks don't see it.
  const cudaError_t e = cudaLaunchKernel(kernel, dim3(unsigned(blocks)), dim3(unsigned(threads)),
                                         args, smem_bytes, static_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) cudaGetLastError();
  return e;
}

int DriverVersion() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : -1;
}

const char* LaunchBatchMatMul(DType dtype, const GemmPlan& plan, const void* a, const void* b,
                              void* c, void* stream) {
  if (plan.output_elements == 0) return nullptr;
  if (int(dtype) < 0 || int(dtype) >= kNumDTypes) return "unsupported dtype";
  const int kernel = ChooseGpuKernel(plan);
  const int threads = kGpuKernels[kernel].threads;
  int64_t max_blocks = 0;
  cudaError_t e = MaxResidentBlocks(threads, &max_blocks);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  LaunchConfig cfg;
  if (const char* err =
          MakeLaunchConfig(plan, dtype, kernel, threads, kSmemBudget, max_blocks, &cfg)) {
    return err;
  }
  void* args[] = {const_cast<GemmPlan*>(&plan), &cfg, &a, &b, &c};
  const void* fn = nullptr;
  WithGpuShape(kernel, [&](auto shape) {
    using S = decltype(shape);
    switch (dtype) {
#define SMALLMM_KERNEL_CASE(d, name, bytes, St, A)                       \
  case DType::d:                                                         \
    fn = reinterpret_cast<const void*>(&BatchMatMulKernel<DType::d, S>); \
    break;
      SMALLMM_DTYPES(SMALLMM_KERNEL_CASE)
#undef SMALLMM_KERNEL_CASE
      default:
        break;
    }
  });
  if (fn == nullptr) return "unsupported dtype";
  e = LaunchKernel(fn, cfg.blocks, cfg.threads, size_t(cfg.smem_bytes), args, stream);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace gpu
}  // namespace smallmm
