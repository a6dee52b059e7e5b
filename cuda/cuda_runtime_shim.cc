// The CUDA runtime entry points the op library uses, resolved when first called instead
// of when the library is loaded.
//
// Why: the library is linked without -lcudart (setup.py: TensorFlow's framework library
// provides the CUDA runtime). The `tensorflow` wheel's libtensorflow_framework.so.2
// exports them (stubs that load libcudart on demand), but the `tensorflow-cpu` wheel's
// exports none, and TF loads op libraries with RTLD_NOW: with plain undefined references
// a CUDA-built library would fail to load there, CPU kernels included. These hidden
// definitions bind the library's references (ours and the ones nvcc generates to register
// the fat binary and launch kernels) to forwarders that look the real function up in
// libtensorflow_framework.so.2 (else the global scope). Without one, registration is a
// no-op and every other call returns cudaErrorSharedObjectSymbolNotFound — which only a
// GPU op could reach, and a CPU-only TensorFlow has no GPU device to place one on.
//
// The set is exactly the CUDA symbols the nvcc 13 objects reference (check with
// `nm -u` on the objects; a missing one makes the link leave it undefined, and
// tests/test_gpu_registration.py fails on any undefined cuda* symbol in the library).
// Host code only: compiled with `nvcc -x c++` (for the CUDA include path), no device code.
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#define SMALLMM_SHIM extern "C" __attribute__((visibility("hidden")))

namespace {

void* Lookup(const char* name) {
  static void* const lib = [] {
    void* h = dlopen("libtensorflow_framework.so.2", RTLD_LAZY | RTLD_NOLOAD);
    return h != nullptr ? h : RTLD_DEFAULT;
  }();
  void* f = dlsym(lib, name);
  return f != nullptr || lib == RTLD_DEFAULT ? f : dlsym(RTLD_DEFAULT, name);
}

template <typename Fn>
Fn Real(const char* name) {
  return reinterpret_cast<Fn>(Lookup(name));
}

constexpr cudaError_t kMissing = cudaErrorSharedObjectSymbolNotFound;

}  // namespace

#define SMALLMM_FORWARD(ret, name, params, args, missing) \
  SMALLMM_SHIM ret CUDARTAPI name params {                \
    using Fn = ret(CUDARTAPI*) params;                    \
    static const Fn real = Real<Fn>(#name);               \
    if (real == nullptr) return missing;                  \
    return real args;                                     \
  }

// (clang-format misreads parameter lists given as macro arguments.)
// clang-format off
// Fat-binary registration (run by static constructors when the library loads).
SMALLMM_FORWARD(void**, __cudaRegisterFatBinary, (void* fat_cubin), (fat_cubin), nullptr)
SMALLMM_FORWARD(void, __cudaRegisterFatBinaryEnd, (void** handle), (handle), )
SMALLMM_FORWARD(void, __cudaUnregisterFatBinary, (void** handle), (handle), )
SMALLMM_FORWARD(void, __cudaRegisterFunction,
                (void** handle, const char* host_fun, char* device_fun, const char* name,
                 int thread_limit, uint3* tid, uint3* bid, dim3* bdim, dim3* gdim, int* wsize),
                (handle, host_fun, device_fun, name, thread_limit, tid, bid, bdim, gdim, wsize), )
// Kernel launch (nvcc's host stubs, and ours).
SMALLMM_FORWARD(cudaError_t, __cudaPopCallConfiguration,
                (dim3* grid, dim3* block, size_t* smem, void* stream),
                (grid, block, smem, stream), kMissing)
SMALLMM_FORWARD(cudaError_t, __cudaGetKernel, (cudaKernel_t* kernel, const void* fun),
                (kernel, fun), kMissing)
SMALLMM_FORWARD(cudaError_t, __cudaLaunchKernel,
                (cudaKernel_t kernel, dim3 grid, dim3 block, void** args, size_t smem,
                 cudaStream_t stream),
                (kernel, grid, block, args, smem, stream), kMissing)
SMALLMM_FORWARD(cudaError_t, cudaLaunchKernel,
                (const void* fun, dim3 grid, dim3 block, void** args, size_t smem,
                 cudaStream_t stream),
                (fun, grid, block, args, smem, stream), kMissing)
// Runtime API calls of smallmm_gpu.cu.cc.
SMALLMM_FORWARD(cudaError_t, cudaGetLastError, (void), (), kMissing)
SMALLMM_FORWARD(cudaError_t, cudaGetDevice, (int* device), (device), kMissing)
SMALLMM_FORWARD(cudaError_t, cudaDeviceGetAttribute, (int* value, cudaDeviceAttr attr, int device),
                (value, attr, device), kMissing)
SMALLMM_FORWARD(const char*, cudaGetErrorString, (cudaError_t error), (error),
                "the CUDA runtime is not available in this TensorFlow (CPU-only build?)")
// The loader's driver check (tf_smallmm/_core/loader.py, through SmallMMCudaDriverVersion).
SMALLMM_FORWARD(cudaError_t, cudaDriverGetVersion, (int* version), (version), kMissing)
// clang-format on
