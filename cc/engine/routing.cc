// Validation and dispatch of the fused routing kernels (routing.h). Compiled once, without
// ISA flags; runs the active ISA's kernels (isa.h: the GEMM kernels' ISA, which
// TF_SMALLMM_ISA and SetIsa control), so one switch A/B-tests both.
#include "cc/engine/routing.h"

#include <sstream>
#include <string>

#include "cc/engine/isa.h"

namespace smallmm {

namespace {

const RoutingKernels& Kernels() { return *ActiveIsaKernels().routing; }

// The entry of a dtype in the per-ISA tables, or -1 when routing does not support it.
int DTypeIndex(DType d) {
  const int i = int(d);
  return i >= 0 && i < kNumDTypes && Kernels().forward[i] != nullptr ? i : -1;
}

// "float32 and float64": the dtypes of SMALLMM_ROUTING_DTYPES.
std::string SupportedNames() {
  const DType list[] = {
#define SMALLMM_ROUTING_DTYPE(e) DType::e,
      SMALLMM_ROUTING_DTYPES(SMALLMM_ROUTING_DTYPE)
#undef SMALLMM_ROUTING_DTYPE
  };
  const int n = int(sizeof(list) / sizeof(list[0]));
  std::string s;
  for (int i = 0; i < n; ++i) {
    s += std::string(i == 0 ? "" : i + 1 == n ? " and " : ", ") + DTypeName(list[i]);
  }
  return s;
}

bool MulOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }
bool AddOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_add_overflow(a, b, out); }

// The scratch formula with overflow checks; false on overflow.
bool Scratch(const RoutingShape& s, bool backward, int64_t* out) {
  const int64_t J = s.out_caps, K = s.out_dim, R = s.iterations;
  int64_t ipad, ij, jk, a, b;
  if (AddOverflows(s.in_caps, kRoutingBlock - 1, &ipad)) return false;
  ipad = ipad / kRoutingBlock * kRoutingBlock;
  if (MulOverflows(ipad, J, &ij) || MulOverflows(J, K, &jk)) return false;
  if (!backward) {
    return !MulOverflows(J, kRoutingBlock, &a) && !MulOverflows(jk, 2, &b) &&
           !AddOverflows(a, b, out);
  }
  if (MulOverflows(ij, 2 * R - 1, &a) || MulOverflows(jk, 3 * R + 4, &b)) return false;
  return !AddOverflows(a, b, out);
}

}  // namespace

int64_t RoutingScratchElements(const RoutingShape& shape, bool backward) {
  int64_t n = 0;
  return Scratch(shape, backward, &n) ? n : -1;
}

bool CheckRouting(DType dtype, const RoutingShape& s, std::string* error) {
  std::ostringstream shape;
  shape << "u_hat [" << s.batch << "," << s.in_caps << "," << s.out_caps << "," << s.out_dim << "]";
  auto fail = [&](const std::string& msg) {
    *error = msg;
    return false;
  };
  if (DTypeIndex(dtype) < 0) {
    return fail("dynamic routing supports " + SupportedNames() + ", got " + DTypeName(dtype));
  }
  if (s.batch < 0 || s.in_caps < 0 || s.out_caps < 0 || s.out_dim < 0) {
    return fail("negative dimension in " + shape.str());
  }
  if (s.iterations < 1) {
    std::ostringstream m;
    m << "num_iterations must be >= 1, got " << s.iterations;
    return fail(m.str());
  }
  if (!(s.epsilon >= 0)) return fail("epsilon must be >= 0");
  int64_t n = 0;
  if (MulOverflows(s.batch, s.in_caps, &n) || MulOverflows(n, s.out_caps, &n) ||
      MulOverflows(n, s.out_dim, &n) || !Scratch(s, true, &n) || MulOverflows(n, 8, &n)) {
    return fail("element count overflows int64 for " + shape.str());
  }
  return true;
}

int64_t RoutingCostPerRow(const RoutingShape& s, bool backward) {
  // Per iteration: ~4 flops per û element (agreement + weighted sum) and ~20 cycles of
  // exp per (i, j); the backward kernel runs the forward again plus ~2x that.
  const int64_t ijk = s.in_caps * s.out_caps * s.out_dim;
  const int64_t ij = s.in_caps * s.out_caps;
  const int64_t per_iter = ijk + 20 * ij + 50;
  return (backward ? 3 : 1) * int64_t(s.iterations) * per_iter;
}

bool RunRoutingForward(DType dtype, const RoutingShape& shape, const void* u_hat, void* v,
                       int64_t begin, int64_t end) {
  const int d = DTypeIndex(dtype);
  if (d < 0) return false;
  return Kernels().forward[d](shape, u_hat, v, begin, end);
}

bool RunRoutingBackward(DType dtype, const RoutingShape& shape, const void* u_hat,
                        const void* grad_v, void* grad_u_hat, int64_t begin, int64_t end) {
  const int d = DTypeIndex(dtype);
  if (d < 0) return false;
  return Kernels().backward[d](shape, u_hat, grad_v, grad_u_hat, begin, end);
}

}  // namespace smallmm
