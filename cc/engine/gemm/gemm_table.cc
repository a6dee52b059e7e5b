// One ISA's GEMM table: the entries of its builds of gemm_isa.cc, one per dtype, gathered
// for the dispatcher (../isa.cc). Compiled once per ISA (setup.py: -DSMALLMM_ISA=<name>);
// it holds addresses only, no code, so it needs none of the ISA's -m flags.
#include "cc/engine/gemm/gemm_kernels.h"
#include "cc/engine/isa.h"
#include "cc/engine/smallmm.h"

#ifndef SMALLMM_ISA
#error "compile with -DSMALLMM_ISA=<name>"
#endif

#define SMALLMM_ENTRY(e) SMALLMM_GEMM_ENTRY(SMALLMM_ISA, e)

namespace smallmm {

// Every dtype's entry (a build missing from the link is a link error: each is hidden).
#define SMALLMM_DECLARE_ENTRY(e, name, bytes, S, A) \
  extern const GemmDTypeKernels SMALLMM_ENTRY(e) __attribute__((visibility("hidden")));
SMALLMM_DTYPES(SMALLMM_DECLARE_ENTRY)
#undef SMALLMM_DECLARE_ENTRY

extern const GemmKernels SMALLMM_CAT(kGemmKernels_, SMALLMM_ISA);
const GemmKernels SMALLMM_CAT(kGemmKernels_, SMALLMM_ISA) = {{
#define SMALLMM_TABLE_ENTRY(e, name, bytes, S, A) &SMALLMM_ENTRY(e),
    SMALLMM_DTYPES(SMALLMM_TABLE_ENTRY)
#undef SMALLMM_TABLE_ENTRY
}};

}  // namespace smallmm
