// isa.h — the instruction sets the kernels are compiled for, and the one run-time
// dispatcher that picks among them for the GEMM and the routing engines alike.
//
// Each per-ISA source (gemm/gemm_table.cc, routing_isa.cc) is compiled once per ISA with
// -DSMALLMM_ISA=<name> and that ISA's -m flags (setup.py ISA_FLAGS, BUILD _ISA_COPTS) and
// defines that ISA's table, kGemmKernels_<name> / kRoutingKernels_<name> (the GEMM table
// gathers the ISA's builds of gemm/gemm_isa.cc, one per dtype). The dispatcher
// (isa.cc) holds them in arrays indexed like SMALLMM_ISAS and hands out the active ISA's
// entry. An ISA whose tables are not linked into the library (off x86 only the baseline is
// built) is not compiled as far as the dispatcher is concerned, and never selected.
// TF_SMALLMM_ISA=<name> (at load) and SetIsa (smallmm.h) cap the choice for A/B checks.
#ifndef TF_SMALLMM_CC_ENGINE_ISA_H_
#define TF_SMALLMM_CC_ENGINE_ISA_H_

// The names the per-ISA objects define their tables under, with the ISA (and dtype) macros
// expanded first: SMALLMM_CAT(kRoutingKernels_, SMALLMM_ISA) is kRoutingKernels_avx512, and
// SMALLMM_GEMM_ENTRY(SMALLMM_ISA, SMALLMM_DTYPE) is kGemmKernels_avx512_kFloat, one dtype's
// build of gemm/gemm_isa.cc that gemm/gemm_table.cc gathers.
#define SMALLMM_CAT2(a, b) a##b
#define SMALLMM_CAT(a, b) SMALLMM_CAT2(a, b)
#define SMALLMM_GEMM_ENTRY(isa, dtype) \
  SMALLMM_CAT(SMALLMM_CAT(SMALLMM_CAT(kGemmKernels_, isa), _), dtype)

namespace smallmm {

// X(name, the CPU check), best first. The name is the one setup.py passes as SMALLMM_ISA
// and that TF_SMALLMM_ISA, SetIsa and ActiveIsa use.
#define SMALLMM_ISAS(X)   \
  X(avx512, CpuHasAvx512) \
  X(avx2, CpuHasAvx2)     \
  X(baseline, CpuHasBaseline)

#define SMALLMM_ISA_COUNT(name, check) +1
constexpr int kNumIsas = 0 SMALLMM_ISAS(SMALLMM_ISA_COUNT);
#undef SMALLMM_ISA_COUNT

struct GemmKernels;       // gemm/gemm_kernels.h
struct GemmDTypeKernels;  // gemm/gemm_kernels.h
struct RoutingKernels;  // routing.h

// What one ISA provides. `gemm` and `routing` are null for an ISA this build lacks.
// `gemm_bf16`: the ISA's bfloat16 kernels built once more for CPUs with AVX512-BF16
// (gemm/gemm_isa.cc SMALLMM_BF16_ONLY; AVX-512 only, null elsewhere), which ../gemm.cc runs
// bfloat16 on where Bf16Dot() (smallmm.h) is on.
struct IsaKernels {
  const char* name;
  bool (*cpu_has)();
  const GemmKernels* gemm;
  const RoutingKernels* routing;
  const GemmDTypeKernels* gemm_bf16;
};

// The kernels of the active ISA (never null: the baseline is always compiled).
const IsaKernels& ActiveIsaKernels();

}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_ISA_H_
