// custom_calls.h — the XLA custom calls of the SmallMM ops: the contract between the XLA
// kernels that emit them at compile time (xla_kernels.cc) and the FFI handlers that run
// them (ffi_handlers.cc). Typed FFI only (API_VERSION_TYPED_FFI: XLA:CPU refuses the
// legacy custom-call ABI); operands and results are dense row-major (the XLA kernels fix
// their layouts); attributes travel in backend_config as an MLIR attribute dictionary.
//
// kBatchMatMulTarget runs SmallMMBatchMatMul, SmallMMBatchMatMulReduce and
// SmallMMBatchMatMulPair: operands x_1, y_1[, x_2, y_2], one result per product (the pair's
// two as a tuple), and the attributes
//   dtype         the element type's engine name (DTypeName: "float32", ...)
//   flags         per product: transpose_x, conjugate_x, transpose_y, conjugate_y as 0 / 1
//   batch_ranks   per product: the length of its batch_shape, -1 for a plain product
//   batch_shapes  the products' batch_shape values, concatenated
// kRoutingTarget / kRoutingGradTarget run SmallMMDynamicRouting / SmallMMDynamicRoutingGrad:
// operands u_hat[, grad_v], result v / grad_u_hat, attributes dtype, iterations (i64) and
// epsilon (f32).
//
// Handlers: "Host" for all three; "CUDA" for kBatchMatMulTarget when the library is built
// with the CUDA kernels (routing has no GPU kernel).
#ifndef TF_SMALLMM_CC_XLA_CUSTOM_CALLS_H_
#define TF_SMALLMM_CC_XLA_CUSTOM_CALLS_H_

namespace smallmm_xla {

constexpr char kBatchMatMulTarget[] = "smallmm_batch_matmul";
constexpr char kRoutingTarget[] = "smallmm_dynamic_routing";
constexpr char kRoutingGradTarget[] = "smallmm_dynamic_routing_grad";

}  // namespace smallmm_xla

#endif  // TF_SMALLMM_CC_XLA_CUSTOM_CALLS_H_
