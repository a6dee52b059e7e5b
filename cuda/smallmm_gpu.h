// smallmm_gpu.h — the GPU launcher of the kernel core, callable from g++-compiled code
// (cc/tf/smallmm_ops_gpu.cc). Includes no CUDA header: the stream is passed as the
// CUstream / cudaStream_t handle TensorFlow's stream gives out, as a void*.
#ifndef TF_SMALLMM_CUDA_SMALLMM_GPU_H_
#define TF_SMALLMM_CUDA_SMALLMM_GPU_H_

#include "cc/engine/smallmm.h"

namespace smallmm {
namespace gpu {

// Enqueues C = plan(A, B) on `stream` (all of it: every output matrix). a, b and c are
// device pointers; c is the dense row-major output. Returns nullptr when the launch was
// accepted, else a static message (a CUDA error string or a configuration error). Does
// not synchronize: errors during execution surface at TensorFlow's next stream check.
const char* LaunchBatchMatMul(DType dtype, const GemmPlan& plan, const void* a, const void* b,
                              void* c, void* stream);

}  // namespace gpu
}  // namespace smallmm

#endif  // TF_SMALLMM_CUDA_SMALLMM_GPU_H_
