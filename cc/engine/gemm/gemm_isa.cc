// The batched small-GEMM kernels of one instruction set and one dtype. This file is
// compiled once per ISA and dtype (setup.py: -DSMALLMM_ISA=avx512 / avx2 / baseline with the
// matching -m flags, -DSMALLMM_DTYPE=kFloat / ...) and defines that dtype's entry of the
// ISA's table (gemm_kernels.h; gemm_table.cc gathers them). The dispatcher (../isa.cc) picks
// one ISA's table at run time, so the shipped library runs on any x86-64. One build per
// dtype, not one per ISA: the kernels of the four real dtypes take minutes each to compile
// (half an hour for all of AVX-512's under the sanitizers), and apart they compile in
// parallel.
//
// Everything here and in the family headers lives in an anonymous namespace and uses no
// std:: function templates: an inline function compiled with -mavx512f must never be
// merged (as a COMDAT) into the baseline build, or a CPU without AVX-512 would execute
// AVX-512 code.
//
// The kernel families, one header each, tried in the order of kFamilies below:
//   tiny        M, N, K <= 4: unrolled products straight from memory        (tiny.h)
//   matvec      matrix-vector products with a short K, across rows          (matvec.h)
//   dot         1-4 columns of B contiguous along K, as dot products along K (dot.h)
//   stationary  short K: one operand in registers, the other streamed past  (stationary.h)
//   packed      everything: packed tiles and micro-kernels                  (packed.h, micro.h)
// with what they share in common.h and streaming.h (and, for bfloat16 on the CPU's
// bfloat16 dot product where it has one, in bf16dot.h); and, outside the table because it runs
// two products at once, the fused gradient pair (pair.h).
#include <cstdint>

#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/dot.h"
#include "cc/engine/gemm/gemm_kernels.h"
#include "cc/engine/gemm/matvec.h"
#include "cc/engine/gemm/packed.h"
#include "cc/engine/gemm/pair.h"
#include "cc/engine/gemm/stationary.h"
#include "cc/engine/gemm/tiny.h"
#include "cc/engine/isa.h"
#include "cc/engine/smallmm.h"

#if !defined(SMALLMM_ISA) || !defined(SMALLMM_DTYPE)
#error "compile with -DSMALLMM_ISA=<name> -DSMALLMM_DTYPE=<DType enumerator>"
#endif

namespace smallmm {
namespace {

// A kernel family: `can_implement(plan)` says whether `run` computes that plan; `run`
// computes output matrices [begin, end) of it (RunBatchMatMul's contract, called with a
// non-empty range and M, N >= 1).
template <DType D>
struct KernelFamily {
  const char* name;
  bool (*can_implement)(const GemmPlan&);
  GemmRunFn run;
};

// Scanned in order: the first family that can implement a plan runs it. The last one
// implements every plan. Adding a family is adding a row (and its header); the tests and
// _smallmm_core.kernel_families iterate this table.
template <DType D>
constexpr KernelFamily<D> kFamilies[] = {
    {"tiny", &CanTiny<D>, &RunTiny<D>},       {"matvec", &CanMatvec<D>, &RunMatvec<D>},
    {"dot", &CanDot<D>, &RunDot<D>},          {"stationary", &CanStationary<D>, &RunStationary<D>},
    {"packed", &CanPacked<D>, &RunPacked<D>},
};
template <DType D>
constexpr int kNumFamilies = int(sizeof(kFamilies<D>) / sizeof(KernelFamily<D>));

template <DType D>
const KernelFamily<D>& FamilyFor(const GemmPlan& p) {
  for (const KernelFamily<D>& family : kFamilies<D>) {
    if (family.can_implement(p)) return family;
  }
  return kFamilies<D>[kNumFamilies<D> - 1];
}

template <DType D>
bool Run(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin, int64_t end) {
  // An empty C (M = 0 or N = 0) has nothing to write: return before walking the batch,
  // which for stride-0 operands (pybind11 views) may be astronomically long.
  if (begin >= end || p.m == 0 || p.n == 0) return true;
  // M and N are bounded by C's element count, which the caller allocated; this keeps the
  // tile arithmetic of the kernels free of overflow even so.
  if (p.m > (INT64_MAX >> 8) || p.n > (INT64_MAX >> 8)) return false;
  return FamilyFor<D>(p).run(p, a, b, c, begin, end);
}

template <DType D>
const char* KernelFor(const GemmPlan& p) {
  if (p.output_elements == 0) return "none";  // Run writes nothing
  return FamilyFor<D>(p).name;
}

// This build's dtype.
constexpr DType kDType = DType::SMALLMM_DTYPE;

// The families' names, in order.
struct FamilyNames {
  const char* names[kNumFamilies<kDType>];
};
constexpr FamilyNames MakeFamilyNames() {
  FamilyNames n{};
  for (int i = 0; i < kNumFamilies<kDType>; ++i) n.names[i] = kFamilies<kDType>[i].name;
  return n;
}
constexpr FamilyNames kFamilyNames = MakeFamilyNames();

// Built once more for the AVX-512 ISA with -mavx512bf16, SMALLMM_BF16_ONLY and
// SMALLMM_DTYPE=kBFloat16 (setup.py ISA_VARIANTS): the bfloat16 kernels on the CPU's
// bfloat16 dot product (bf16dot.h) and conversion (common.h Rounded), as a second entry,
// kGemmKernelsBf16_<isa>, that ../gemm.cc runs bfloat16 on where the CPU has the extension
// and Bf16Dot() is on.
#if defined(SMALLMM_BF16_ONLY)
static_assert(kDType == DType::kBFloat16, "the AVX512-BF16 build is bfloat16's");
#endif

}  // namespace

#if defined(SMALLMM_BF16_ONLY)
#define SMALLMM_ENTRY SMALLMM_CAT(kGemmKernelsBf16_, SMALLMM_ISA)
#else
#define SMALLMM_ENTRY SMALLMM_GEMM_ENTRY(SMALLMM_ISA, SMALLMM_DTYPE)
#endif
// This ISA's entry for this dtype (gemm_table.cc, ../isa.cc).
extern const GemmDTypeKernels SMALLMM_ENTRY;
const GemmDTypeKernels SMALLMM_ENTRY = {
    &Run<kDType>, &KernelFor<kDType>, &RunPair<kDType>, kFamilyNames.names, kNumFamilies<kDType>,
};

}  // namespace smallmm
