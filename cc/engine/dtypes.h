// dtypes.h — the one list of element types the engine computes in. Everything that
// depends on the list is generated from it: the DType enum, DTypeName / DTypeSize, the
// per-ISA kernel tables (gemm/gemm_isa.cc), the numpy dtype conversions of the pybind11
// module (tf_smallmm._smallmm_core.dtype_names), the CUDA launch switch, and, through
// cc/tf/smallmm_types.h (checked row for row at compile time), the TF ops' type attrs
// and kernel registrations.
//
// float16 and bfloat16 are 16-bit storage types (binary-compatible with Eigen::half /
// Eigen::bfloat16 and numpy's float16 / ml_dtypes.bfloat16) that accumulate in float32;
// complex types are interleaved (re, im) pairs like std::complex.
#ifndef TF_SMALLMM_CC_ENGINE_DTYPES_H_
#define TF_SMALLMM_CC_ENGINE_DTYPES_H_

#include <cstdint>

namespace smallmm {

// X(enumerator, numpy-style name, bytes per element, storage scalar, accumulation type).
// A complex element is bytes / sizeof(storage) = 2 storage scalars.
#define SMALLMM_DTYPES(X)                      \
  X(kHalf, "float16", 2, uint16_t, float)      \
  X(kBFloat16, "bfloat16", 2, uint16_t, float) \
  X(kFloat, "float32", 4, float, float)        \
  X(kDouble, "float64", 8, double, double)     \
  X(kComplex64, "complex64", 8, float, float)  \
  X(kComplex128, "complex128", 16, double, double)

// (clang-format would indent kNumDTypes as a continuation of the macro's expansion.)
// clang-format off
enum class DType : int {
#define SMALLMM_DTYPE_ENUMERATOR(e, name, bytes, S, A) e,
  SMALLMM_DTYPES(SMALLMM_DTYPE_ENUMERATOR)
#undef SMALLMM_DTYPE_ENUMERATOR
  kNumDTypes
};
// clang-format on
constexpr int kNumDTypes = int(DType::kNumDTypes);

// The list's columns at compile time: DTypeInfo<DType::kHalf>::Storage is uint16_t.
template <DType D>
struct DTypeInfo;
#define SMALLMM_DTYPE_INFO(e, name, bytes, S, A)                   \
  template <>                                                      \
  struct DTypeInfo<DType::e> {                                     \
    using Storage = S;                                             \
    using Acc = A;                                                 \
    static constexpr const char* kName = name;                     \
    static constexpr int kBytes = bytes;                           \
    static constexpr int kComponents = bytes / int(sizeof(S));     \
    static_assert(kComponents * int(sizeof(S)) == bytes, "bytes"); \
  };
SMALLMM_DTYPES(SMALLMM_DTYPE_INFO)
#undef SMALLMM_DTYPE_INFO

// "float32", ... ("invalid" out of range) and bytes per element (0 out of range).
const char* DTypeName(DType t);
int DTypeSize(DType t);

}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_DTYPES_H_
