// The GEMM engine's entry points: a plan goes to the active ISA's kernels for its dtype.
#include "cc/engine/gemm/gemm_kernels.h"
#include "cc/engine/isa.h"
#include "cc/engine/smallmm.h"

namespace smallmm {
namespace {

// The active ISA's kernels for dtype d: bfloat16 on the ISA's build for the CPU's bfloat16
// instructions where it has one and Bf16Dot() is on.
const GemmDTypeKernels& Kernels(int d) {
  const IsaKernels& isa = ActiveIsaKernels();
  if (d == int(DType::kBFloat16) && isa.gemm_bf16 != nullptr && Bf16Dot()) return *isa.gemm_bf16;
  return *isa.gemm->dtype[d];
}

}  // namespace

bool RunBatchMatMul(DType dtype, const GemmPlan& plan, const void* a, const void* b, void* c,
                    int64_t begin, int64_t end) {
  const int d = int(dtype);
  if (d < 0 || d >= kNumDTypes) return false;
  return Kernels(d).run(plan, a, b, c, begin, end);
}

bool RunFusedPair(DType dtype, const FusedPair& pair, void* const c[2], int64_t begin,
                  int64_t end) {
  const int d = int(dtype);
  if (d < 0 || d >= kNumDTypes) return false;
  return Kernels(d).pair(pair, c, begin, end);
}

const char* KernelFor(DType dtype, const GemmPlan& plan) {
  const int d = int(dtype);
  if (d < 0 || d >= kNumDTypes) return "invalid";
  return Kernels(d).kernel_for(plan);
}

const char* const* KernelFamilies(int* count) {
  // (Every dtype's build has the same families; float32's.)
  const GemmDTypeKernels& k = *ActiveIsaKernels().gemm->dtype[int(DType::kFloat)];
  *count = k.num_families;
  return k.families;
}

}  // namespace smallmm
