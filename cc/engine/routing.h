// routing.h — dynamic routing-by-agreement (Sabour et al. 2017), fused: the framework-free
// kernel core of the SmallMMDynamicRouting ops. No TensorFlow include.
//
// Terminology (in addition to smallmm.h):
//   u_hat      the prediction vectors û[b, i, j, k], dense row-major [batch, I, J, K]:
//              what input capsule i predicts for output capsule j (k indexes its K values).
//              For CapsNet's digit capsules I = 1152, J = 10, K = 16: one batch row is
//              1152·10·16 floats ≈ 740 KB, which fits in a core's L2 cache.
//   row        one batch index b. Rows are independent; the kernels are called on a range
//              of rows, and all routing iterations of a row run while its û stays in cache
//              (TF ops would stream all of û from memory ~5 times per iteration).
//   logits     b[i, j], coupling coefficients c[i, :] = softmax_j(b[i, :]).
//   squash     squash(s) = s · |s|² / (1 + |s|²) / sqrt(|s|² + epsilon), over K.
//
// The routing, per row, with R = iterations >= 1 and logits starting at 0:
//   for t = 0 .. R-1:
//     c      = softmax_j(logits)                 (t = 0: c = 1/J exactly)
//     s[j]   = Σ_i c[i, j] · û[i, j, :]
//     v[j]   = squash(s[j])
//     if t < R-1: logits[i, j] += <û[i, j, :], v[j]>
//   output v [J, K]
// The backward kernel returns dL/dû given dL/dv, exactly through all R iterations (the
// agreement and the coupling coefficients are differentiated too, as TF's tape would do on
// the unrolled ops). It recomputes the forward iterations of a row inside the kernel (what
// it keeps is R·I·J coefficients per row in flight, not R copies of anything per batch),
// walks them backwards, and writes dû once.
//
// Float32 and float64 only (SMALLMM_ROUTING_DTYPES); callers cast 16-bit types to float32
// around the op.
//
// NaN / Inf. Every implementation (CPU ISAs, GPU) puts NaN exactly where
// dynamic_routing_reference (tf_smallmm/capsules/routing.py) evaluated in float64 does, and
// nowhere else; tests/test_routing_numerics.py checks it. That is IEEE arithmetic on the
// formulas above with a softmax whose row is all NaN as soon as one of its logits is NaN
// (tf.nn.softmax in float64, under XLA and on GPU; TF's oneDNN float32 CPU softmax differs,
// see the reference's docstring). Rows never affect each other. For a row b whose finite
// inputs do not overflow:
//   forward   A non-finite û[b, i, j, k] (NaN, +Inf or -Inf) makes s[j, k] of iteration 0
//             non-finite, so |s[j]|² is, and v[j, :] = squash(s[j]) is NaN in all K (never
//             ±Inf: Inf/Inf, Inf·0). R = 1: v[b, j, :] is NaN exactly for the capsules j
//             that have a non-finite û[b, :, j, :]; the other v[b, j] are finite. R >= 2:
//             that NaN v[j] makes the agreement <û[b, i, j, :], v[j]> NaN for *every* i,
//             so every softmax row of b holds a NaN, all c[b] are NaN and v[b] is NaN in
//             full.
//   backward  The squash gradient gs[j, :] is NaN in all K when s[j] or grad_v[b, j, :]
//             holds a non-finite value: then <grad_v[j], s[j]> is non-finite, and the
//             reference's tape adds two infinite terms of opposite sign (through
//             |s|²/(1+|s|²)), so the kernels turn a non-finite dot into NaN rather than
//             let ±Inf through. R = 1: dû[b, i, j, :] = gs[j, :]/J is NaN for every i and
//             K exactly for those j; the rest is finite. R >= 2: any non-finite value in
//             û[b] or grad_v[b] makes dû[b] NaN in full (through the NaN c, or through
//             the softmax backward's Σ_j c·<gs[j], û[i, j]>, which every logit's gradient
//             of the row shares).
//   Non-finite outputs are therefore always NaN, never ±Inf. Implementations must not
//   skip work on zero coefficients (0·Inf is NaN), must not clamp or flush NaN (a max
//   that drops NaN must be followed by an exp that keeps it, as ExpNonPositive does), and
//   must not be built with -ffast-math.
#ifndef TF_SMALLMM_CC_ENGINE_ROUTING_H_
#define TF_SMALLMM_CC_ENGINE_ROUTING_H_

#include <cstdint>
#include <string>

#include "cc/engine/smallmm.h"

namespace smallmm {

// The dtypes routing computes in, a subset of SMALLMM_DTYPES (16-bit types are cast to
// float32 by the Python wrapper; complex routing is not defined): X(enumerator). The
// kernel tables and the TF ops' type attr and registrations come from this list.
#define SMALLMM_ROUTING_DTYPES(X) X(kFloat) X(kDouble)

struct RoutingShape {
  int64_t batch = 0;      // rows
  int64_t in_caps = 0;    // I
  int64_t out_caps = 0;   // J
  int64_t out_dim = 0;    // K
  int iterations = 1;     // R >= 1
  double epsilon = 1e-7;  // inside squash's square root
};

// Validates sizes (non-negative, iterations >= 1, element counts and scratch fit in
// int64) and the dtype (one of SMALLMM_ROUTING_DTYPES). Returns false and sets *error, naming the
// shape, on bad input; never aborts.
bool CheckRouting(DType dtype, const RoutingShape& shape, std::string* error);

// The kernels work on blocks of input capsules (as many as a vector has lanes, at most
// this many); per-(i, j) scratch is padded to a multiple of it.
constexpr int kRoutingBlock = 16;

// Scratch elements (of the dtype) one kernel call allocates, whatever its row range, with
// Ipad = I rounded up to kRoutingBlock: forward kRoutingBlock·J + 2·J·K; backward
// Ipad·J·(2R-1) + J·K·(3R+4). Defined out of line
// (routing.cc, baseline code) so that no inline function is shared with the ISA builds.
int64_t RoutingScratchElements(const RoutingShape& shape, bool backward);

// Rough cost of one row in cycles, for sharding rows over threads.
int64_t RoutingCostPerRow(const RoutingShape& shape, bool backward);

// v[b] for rows [begin, end): u_hat [batch, I, J, K] -> v [batch, J, K], dense row-major.
// Safe to call concurrently on disjoint row ranges. Requires CheckRouting to have passed.
// Returns false (writing nothing) only when per-call scratch memory cannot be allocated:
// RoutingScratchElements, independent of the batch.
bool RunRoutingForward(DType dtype, const RoutingShape& shape, const void* u_hat, void* v,
                       int64_t begin, int64_t end);

// grad_u_hat [batch, I, J, K] = dL/dû for rows [begin, end), given grad_v = dL/dv
// [batch, J, K]. Same contract as RunRoutingForward. grad_u_hat may be the same buffer as
// u_hat (in place): each row's û is read completely before that row's dû is written.
bool RunRoutingBackward(DType dtype, const RoutingShape& shape, const void* u_hat,
                        const void* grad_v, void* grad_u_hat, int64_t begin, int64_t end);

// What each ISA's build of routing_isa.cc gives the engine: its kernels, indexed by DType,
// null for a dtype not in SMALLMM_ROUTING_DTYPES; they return false only when their
// scratch cannot be allocated. The dispatcher (isa.cc) holds one table per ISA; routing.cc
// calls the active ISA's.
using RoutingForwardFn = bool (*)(const RoutingShape&, const void*, void*, int64_t, int64_t);
using RoutingBackwardFn = bool (*)(const RoutingShape&, const void*, const void*, void*, int64_t,
                                   int64_t);
struct RoutingKernels {
  RoutingForwardFn forward[kNumDTypes];
  RoutingBackwardFn backward[kNumDTypes];
};

}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_ROUTING_H_
