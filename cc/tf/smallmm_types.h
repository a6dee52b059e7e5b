// The TF side of the engine's dtype list (cc/engine/dtypes.h): the C++ type and DataType of
// each engine dtype. The ops' type attrs, the kernel registrations and the TF -> engine
// dtype map all come from here; the rows are checked at compile time against the engine's
// list, and a test checks that every advertised dtype has a registered kernel.
#ifndef TF_SMALLMM_CC_TF_SMALLMM_TYPES_H_
#define TF_SMALLMM_CC_TF_SMALLMM_TYPES_H_

#include <initializer_list>
#include <string>

#include "cc/engine/dtypes.h"
#include "tensorflow/core/framework/types.h"

// X(engine enumerator, C++ type, TF DataType): one row per SMALLMM_DTYPES row, same order.
#define SMALLMM_TF_DTYPES(X)                           \
  X(kHalf, Eigen::half, DT_HALF)                       \
  X(kBFloat16, ::tensorflow::bfloat16, DT_BFLOAT16)    \
  X(kFloat, float, DT_FLOAT)                           \
  X(kDouble, double, DT_DOUBLE)                        \
  X(kComplex64, ::tensorflow::complex64, DT_COMPLEX64) \
  X(kComplex128, ::tensorflow::complex128, DT_COMPLEX128)

namespace smallmm_tf {

// The TF side of one engine dtype: TfType<smallmm::DType::kHalf>::T is Eigen::half.
template <smallmm::DType D>
struct TfType;
#define SMALLMM_TF_TYPE(CORE, TYPE, DT)                               \
  template <>                                                         \
  struct TfType<smallmm::DType::CORE> {                               \
    using T = TYPE;                                                   \
    static constexpr tensorflow::DataType kDataType = tensorflow::DT; \
  };
SMALLMM_TF_DTYPES(SMALLMM_TF_TYPE)
#undef SMALLMM_TF_TYPE

namespace internal {
struct Row {
  smallmm::DType dtype;
  int bytes;
};
constexpr Row kRows[] = {
#define SMALLMM_TF_ROW(CORE, TYPE, DT) {smallmm::DType::CORE, int(sizeof(TYPE))},
    SMALLMM_TF_DTYPES(SMALLMM_TF_ROW)
#undef SMALLMM_TF_ROW
};
constexpr int kEngineBytes[] = {
#define SMALLMM_ENGINE_BYTES(e, name, bytes, S, A) bytes,
    SMALLMM_DTYPES(SMALLMM_ENGINE_BYTES)
#undef SMALLMM_ENGINE_BYTES
};
constexpr bool RowsMatchEngine() {
  for (int i = 0; i < smallmm::kNumDTypes; ++i) {
    if (kRows[i].dtype != smallmm::DType(i) || kRows[i].bytes != kEngineBytes[i]) return false;
  }
  return true;
}
static_assert(sizeof(kRows) / sizeof(kRows[0]) == smallmm::kNumDTypes,
              "SMALLMM_TF_DTYPES needs one row per SMALLMM_DTYPES row");
static_assert(RowsMatchEngine(),
              "SMALLMM_TF_DTYPES rows must follow SMALLMM_DTYPES' order and element sizes");
}  // namespace internal

// An op's type attr, "T: {half, bfloat16, ...}", spelled from a dtype list:
// TypeAttr({SMALLMM_TF_DTYPES(SMALLMM_TF_DATATYPE)}).
#define SMALLMM_TF_DATATYPE(CORE, TYPE, DT) ::tensorflow::DT,
inline std::string TypeAttr(std::initializer_list<tensorflow::DataType> types) {
  std::string s;
  for (tensorflow::DataType t : types) {
    s += std::string(s.empty() ? "" : ", ") + tensorflow::DataTypeString(t);
  }
  return "T: {" + s + "}";
}

inline bool ToCoreDType(tensorflow::DataType t, smallmm::DType* out) {
  switch (t) {
#define SMALLMM_CASE(CORE, TYPE, DT) \
  case tensorflow::DT:               \
    *out = smallmm::DType::CORE;     \
    return true;
    SMALLMM_TF_DTYPES(SMALLMM_CASE)
#undef SMALLMM_CASE
    default:
      return false;
  }
}

}  // namespace smallmm_tf

#endif  // TF_SMALLMM_CC_TF_SMALLMM_TYPES_H_
