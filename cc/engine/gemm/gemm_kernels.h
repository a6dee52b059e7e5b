// gemm_kernels.h — what each ISA's build of gemm_isa.cc gives the engine: its GEMM
// kernels, one entry per dtype, and the names of its kernel families. The dispatcher
// (../isa.cc) holds one table per ISA; ../gemm.cc calls the active ISA's.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_GEMM_KERNELS_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_GEMM_KERNELS_H_

#include <cstdint>

#include "cc/engine/smallmm.h"

namespace smallmm {

// RunBatchMatMul for one dtype (smallmm.h has the contract).
using GemmRunFn = bool (*)(const GemmPlan&, const void*, const void*, void*, int64_t, int64_t);
// KernelFor for one dtype: the name of the family that GemmRunFn runs the plan with.
using GemmKernelForFn = const char* (*)(const GemmPlan&);
// RunFusedPair for one dtype (smallmm.h has the contract).
using GemmPairRunFn = bool (*)(const FusedPair&, void* const[2], int64_t, int64_t);

struct GemmKernels {
  GemmRunFn run[kNumDTypes];               // indexed by DType
  GemmKernelForFn kernel_for[kNumDTypes];  // indexed by DType
  GemmPairRunFn pair[kNumDTypes];          // indexed by DType
  const char* const* families;             // the kernel families, in the order tried
  int num_families;
};

}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_GEMM_KERNELS_H_
