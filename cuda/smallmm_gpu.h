// smallmm_gpu.h — the GPU launcher of the kernel core, callable from g++-compiled code
// (cc/tf/smallmm_ops_gpu.cc). Includes no CUDA header: the stream is passed as the
// CUstream / cudaStream_t handle TensorFlow's stream gives out, as a void*.
#ifndef TF_SMALLMM_CUDA_SMALLMM_GPU_H_
#define TF_SMALLMM_CUDA_SMALLMM_GPU_H_

#include "cc/engine/routing.h"
#include "cc/engine/smallmm.h"

namespace smallmm {
namespace gpu {

// Enqueues C = plan(A, B) on `stream` (all of it: every output matrix). a, b and c are
// device pointers; c is the dense row-major output. Returns nullptr when the launch was
// accepted, else a static message (a CUDA error string or a configuration error). Does
// not synchronize: errors during execution surface at TensorFlow's next stream check.
const char* LaunchBatchMatMul(DType dtype, const GemmPlan& plan, const void* a, const void* b,
                              void* c, void* stream);

// The fused dynamic routing (cc/engine/routing.h) on `stream`, for every row of `shape`
// (which must have passed CheckRouting; dtype one of SMALLMM_ROUTING_DTYPES). `scratch` is
// a device buffer of RoutingScratchBytes(...) bytes (may be null when that is 0). Same
// return convention as LaunchBatchMatMul. grad_u_hat may be u_hat (in place).
const char* RoutingScratchBytes(DType dtype, const RoutingShape& shape, bool backward,
                                int64_t* bytes);
const char* LaunchRoutingForward(DType dtype, const RoutingShape& shape, const void* u_hat, void* v,
                                 void* scratch, void* stream);
const char* LaunchRoutingBackward(DType dtype, const RoutingShape& shape, const void* u_hat,
                                  const void* grad_v, void* grad_u_hat, void* scratch,
                                  void* stream);

// The CUDA driver's version as cudaDriverGetVersion reports it (12080 for a driver that
// supports CUDA 12.8), 0 without a driver, -1 when the CUDA runtime cannot be reached.
int DriverVersion();

}  // namespace gpu
}  // namespace smallmm

#endif  // TF_SMALLMM_CUDA_SMALLMM_GPU_H_
