// The GEMM engine's entry point: a plan goes to the active ISA's kernel for its dtype.
#include "cc/engine/gemm/gemm_kernels.h"
#include "cc/engine/isa.h"
#include "cc/engine/smallmm.h"

namespace smallmm {

bool RunBatchMatMul(DType dtype, const GemmPlan& plan, const void* a, const void* b, void* c,
                    int64_t begin, int64_t end) {
  const int d = int(dtype);
  if (d < 0 || d >= kNumDTypes) return false;
  return ActiveIsaKernels().gemm->run[d](plan, a, b, c, begin, end);
}

}  // namespace smallmm
