// gemm_kernels.h — what the builds of gemm_isa.cc give the engine. gemm_isa.cc is compiled
// once per ISA and dtype, and each build defines that dtype's kernels of that ISA
// (GemmDTypeKernels); gemm_table.cc, compiled once per ISA, gathers an ISA's dtypes into
// its table (GemmKernels). The dispatcher (../isa.cc) holds one table per ISA; ../gemm.cc
// calls the active ISA's.
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

// One dtype's kernels in one ISA's build: kGemmKernels_<isa>_<dtype enumerator>.
struct GemmDTypeKernels {
  GemmRunFn run;
  GemmKernelForFn kernel_for;
  GemmPairRunFn pair;
  const char* const* families;  // the kernel families, in the order tried
  int num_families;
};

// One ISA's table: kGemmKernels_<isa>, every dtype's entry.
struct GemmKernels {
  const GemmDTypeKernels* dtype[kNumDTypes];  // indexed by DType
};

}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_GEMM_KERNELS_H_
