// The batched small-GEMM kernels of one instruction set. This file is compiled once per ISA
// (setup.py: -DSMALLMM_ISA=avx512 / avx2 / baseline with the matching -m flags) and the
// dispatcher (../isa.cc) picks one ISA's table at run time, so the shipped library runs on
// any x86-64.
//
// Everything here and in the family headers lives in an anonymous namespace and uses no
// std:: function templates: an inline function compiled with -mavx512f must never be
// merged (as a COMDAT) into the baseline build, or a CPU without AVX-512 would execute
// AVX-512 code.
//
// The kernel families, one header each, tried in the order of kFamilies below:
//   tiny        M, N, K <= 4: unrolled products straight from memory        (tiny.h)
//   matvec      matrix-vector products with a short K, across rows          (matvec.h)
//   dot         matrix-vector products as dot products along K              (dot.h)
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
#include "cc/engine/smallmm.h"

#ifndef SMALLMM_ISA
#error "compile with -DSMALLMM_ISA=<name>"
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
constexpr int kNumFamilies =
    int(sizeof(kFamilies<DType::kBFloat16>) / sizeof(KernelFamily<DType::kBFloat16>));

template <DType D>
const KernelFamily<D>& FamilyFor(const GemmPlan& p) {
  for (const KernelFamily<D>& family : kFamilies<D>) {
    if (family.can_implement(p)) return family;
  }
  return kFamilies<D>[kNumFamilies - 1];
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

// The families' names, in order (every dtype's table has the same rows; bfloat16's, the
// one dtype every build of this file instantiates).
struct FamilyNames {
  const char* names[kNumFamilies];
};
constexpr FamilyNames MakeFamilyNames() {
  FamilyNames n{};
  for (int i = 0; i < kNumFamilies; ++i) n.names[i] = kFamilies<DType::kBFloat16>[i].name;
  return n;
}
constexpr FamilyNames kFamilyNames = MakeFamilyNames();

// Built once more for the AVX-512 ISA with -mavx512bf16 and SMALLMM_BF16_ONLY (setup.py
// ISA_VARIANTS): the bfloat16 kernels alone, on the CPU's bfloat16 dot product (bf16dot.h)
// and conversion (common.h Rounded), as a second table that ../gemm.cc runs bfloat16 on
// where the CPU has the extension and Bf16Dot() is on. That build instantiates no other
// dtype: its other entries are null.
#if defined(SMALLMM_BF16_ONLY)
template <DType D>
constexpr bool kBuilt = D == DType::kBFloat16;
#else
template <DType D>
constexpr bool kBuilt = true;
#endif
// One dtype's entries of the table: null where this build does not instantiate it.
struct Entries {
  GemmRunFn run = nullptr;
  GemmKernelForFn kernel_for = nullptr;
  GemmPairRunFn pair = nullptr;
};
template <DType D>
constexpr Entries EntriesOf() {
  if constexpr (kBuilt<D>) return {&Run<D>, &KernelFor<D>, &RunPair<D>};
  return {};
}

}  // namespace

#define SMALLMM_CAT2(a, b) a##b
#define SMALLMM_CAT(a, b) SMALLMM_CAT2(a, b)
#if defined(SMALLMM_BF16_ONLY)
#define SMALLMM_TABLE SMALLMM_CAT(kGemmKernelsBf16_, SMALLMM_ISA)
#else
#define SMALLMM_TABLE SMALLMM_CAT(kGemmKernels_, SMALLMM_ISA)
#endif
// This ISA's entry of the dispatcher's table (../isa.cc).
extern const GemmKernels SMALLMM_TABLE;
const GemmKernels SMALLMM_TABLE = {
    {
#define SMALLMM_RUN_ENTRY(e, name, bytes, S, A) EntriesOf<DType::e>().run,
        SMALLMM_DTYPES(SMALLMM_RUN_ENTRY)
#undef SMALLMM_RUN_ENTRY
    },
    {
#define SMALLMM_KERNEL_FOR_ENTRY(e, name, bytes, S, A) EntriesOf<DType::e>().kernel_for,
        SMALLMM_DTYPES(SMALLMM_KERNEL_FOR_ENTRY)
#undef SMALLMM_KERNEL_FOR_ENTRY
    },
    {
#define SMALLMM_PAIR_ENTRY(e, name, bytes, S, A) EntriesOf<DType::e>().pair,
        SMALLMM_DTYPES(SMALLMM_PAIR_ENTRY)
#undef SMALLMM_PAIR_ENTRY
    },
    kFamilyNames.names,
    kNumFamilies,
};

}  // namespace smallmm
