// The CUDA kernels of the fused dynamic routing: one forward and one backward kernel per
// dtype of SMALLMM_ROUTING_DTYPES, running the block program of routing_gpu_logic.h (which
// the host simulation also runs). Compiled by nvcc only; nothing from TensorFlow or Eigen.
#include <cuda_runtime.h>

#include "cuda/routing_gpu_logic.h"
#include "cuda/smallmm_gpu.h"
#include "cuda/smallmm_gpu_launch.h"

namespace smallmm {
namespace gpu {
namespace {

struct NoAcc {};

// The executor of the routing block program on the device; `ws` is the block's workspace
// (shared memory, or its slice of the global scratch buffer).
struct RoutingExec {
  unsigned char* ws;
  NoAcc acc;

  __device__ __forceinline__ unsigned char* shared() { return ws; }
  __device__ __forceinline__ void Barrier() { __syncthreads(); }
  template <class F>
  __device__ __forceinline__ void ForEachThread(F f) {
    f(int(threadIdx.x), acc);
  }
  template <class U>
  __device__ __forceinline__ U Read(const U* p) {
    return *p;
  }
  template <class U>
  __device__ __forceinline__ void Write(U* p, U v) {
    *p = v;
  }
  __device__ __forceinline__ void OnLoad(int, int64_t) {}
  __device__ __forceinline__ void OnStore(int64_t) {}
};

// The block's workspace: dynamic shared memory, or (scratch != null) its slice of scratch.
template <typename T>
__device__ unsigned char* BlockWorkspace(const RoutingConfig& cfg, void* scratch) {
  extern __shared__ __align__(16) unsigned char smem[];
  if (scratch == nullptr) return smem;
  return static_cast<unsigned char*>(scratch) +
         int64_t(blockIdx.x) * cfg.ws_elems * int64_t(sizeof(T));
}

// Resident blocks per SM the launch bounds ask for: 2 caps a thread at 128 registers.
// With the thread count alone ptxas held the kernels to 64 registers and spilled 8 bytes
// (float32 forward, float64 backward; ptxas -v, sm_90, CUDA 13.0, 2026-12-01).
constexpr int kRoutingMinBlocksPerSm = 2;

template <typename T>
__global__ void __launch_bounds__(kRoutingThreads, kRoutingMinBlocksPerSm)
    RoutingForwardKernel(const __grid_constant__ RoutingConfig cfg, const T* u_hat, T* v,
                         void* scratch) {
  RoutingExec ex{BlockWorkspace<T>(cfg, scratch), {}};
  RunRoutingForwardBlock<T>(ex, cfg, u_hat, v, int64_t(blockIdx.x));
}

template <typename T>
__global__ void __launch_bounds__(kRoutingThreads, kRoutingMinBlocksPerSm)
    RoutingBackwardKernel(const __grid_constant__ RoutingConfig cfg, const T* u_hat,
                          const T* grad_v, T* grad_u, void* scratch) {
  RoutingExec ex{BlockWorkspace<T>(cfg, scratch), {}};
  RunRoutingBackwardBlock<T>(ex, cfg, u_hat, grad_v, grad_u, int64_t(blockIdx.x));
}

bool IsRoutingDType(DType d) {
#define SMALLMM_IS_ROUTING(e) \
  if (d == DType::e) return true;
  SMALLMM_ROUTING_DTYPES(SMALLMM_IS_ROUTING)
#undef SMALLMM_IS_ROUTING
  return false;
}

// The configuration of a launch on the current device, and whether its workspace fits in
// shared memory (kMaxSmemBytes, no opt-in); else it lives in the scratch buffer.
const char* Configure(DType dtype, const RoutingShape& shape, bool backward, RoutingConfig* cfg,
                      bool* in_shared) {
  if (!IsRoutingDType(dtype)) return "unsupported dtype for dynamic routing";
  int64_t max_blocks = 0;
  const cudaError_t e = MaxResidentBlocks(kRoutingThreads, &max_blocks);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (const char* err = MakeRoutingConfig(shape, backward, kRoutingThreads, max_blocks, cfg)) {
    return err;
  }
  *in_shared = cfg->ws_elems * DTypeSize(dtype) <= kMaxSmemBytes;
  return nullptr;
}

template <DType D>
const char* Launch(const RoutingShape& shape, bool backward, const void* u_hat, const void* grad_v,
                   void* out, void* scratch, void* stream) {
  using T = typename DTypeInfo<D>::Storage;
  RoutingConfig cfg;
  bool in_shared = false;
  if (const char* err = Configure(D, shape, backward, &cfg, &in_shared)) return err;
  if (!in_shared && scratch == nullptr) return "dynamic routing needs a scratch buffer";
  void* ws = in_shared ? nullptr : scratch;
  const size_t smem = in_shared ? size_t(cfg.ws_elems) * sizeof(T) : 0;
  const T* u = static_cast<const T*>(u_hat);
  const T* gv = static_cast<const T*>(grad_v);
  T* o = static_cast<T*>(out);
  cudaError_t e;
  if (backward) {
    void* args[] = {&cfg, &u, &gv, &o, &ws};
    e = LaunchKernel(reinterpret_cast<const void*>(&RoutingBackwardKernel<T>), cfg.blocks,
                     cfg.threads, smem, args, stream);
  } else {
    void* args[] = {&cfg, &u, &o, &ws};
    e = LaunchKernel(reinterpret_cast<const void*>(&RoutingForwardKernel<T>), cfg.blocks,
                     cfg.threads, smem, args, stream);
  }
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* LaunchAny(DType dtype, const RoutingShape& shape, bool backward, const void* u_hat,
                      const void* grad_v, void* out, void* scratch, void* stream) {
  switch (dtype) {
#define SMALLMM_ROUTING_LAUNCH(e) \
  case DType::e:                  \
    return Launch<DType::e>(shape, backward, u_hat, grad_v, out, scratch, stream);
    SMALLMM_ROUTING_DTYPES(SMALLMM_ROUTING_LAUNCH)
#undef SMALLMM_ROUTING_LAUNCH
    default:
      return "unsupported dtype for dynamic routing";
  }
}

}  // namespace

const char* RoutingScratchBytes(DType dtype, const RoutingShape& shape, bool backward,
                                int64_t* bytes) {
  RoutingConfig cfg;
  bool in_shared = false;
  if (const char* err = Configure(dtype, shape, backward, &cfg, &in_shared)) return err;
  int64_t n = 0;
  if (__builtin_mul_overflow(cfg.blocks, cfg.ws_elems, &n) ||
      __builtin_mul_overflow(n, int64_t(DTypeSize(dtype)), &n)) {
    return "dynamic routing scratch size overflows int64";
  }
  *bytes = in_shared ? 0 : n;
  return nullptr;
}

const char* LaunchRoutingForward(DType dtype, const RoutingShape& shape, const void* u_hat, void* v,
                                 void* scratch, void* stream) {
  return LaunchAny(dtype, shape, false, u_hat, nullptr, v, scratch, stream);
}

const char* LaunchRoutingBackward(DType dtype, const RoutingShape& shape, const void* u_hat,
                                  const void* grad_v, void* grad_u_hat, void* scratch,
                                  void* stream) {
  return LaunchAny(dtype, shape, true, u_hat, grad_v, grad_u_hat, scratch, stream);
}

}  // namespace gpu
}  // namespace smallmm
