// The one list of dtypes the SmallMM ops support. The op's type attr, the kernel
// registrations and the TF -> kernel-core dtype map all come from here; a test checks
// that every advertised dtype has a registered kernel.
#ifndef TF_SMALLMM_CC_TF_SMALLMM_TYPES_H_
#define TF_SMALLMM_CC_TF_SMALLMM_TYPES_H_

#include <initializer_list>
#include <string>

#include "cc/engine/smallmm.h"
#include "tensorflow/core/framework/types.h"

// X(C++ type, TF DataType, kernel-core DType)
#define SMALLMM_TYPE_LIST(X)                                     \
  X(Eigen::half, DT_HALF, kHalf)                                 \
  X(::tensorflow::bfloat16, DT_BFLOAT16, kBFloat16)              \
  X(float, DT_FLOAT, kFloat)                                     \
  X(double, DT_DOUBLE, kDouble)                                  \
  X(::tensorflow::complex64, DT_COMPLEX64, kComplex64)           \
  X(::tensorflow::complex128, DT_COMPLEX128, kComplex128)

namespace smallmm_tf {

// One entry of a dtype list macro as a DataType: {SMALLMM_TYPE_LIST(SMALLMM_DATATYPE)}.
#define SMALLMM_DATATYPE(T, DT, CORE) ::tensorflow::DT,

// An op's type attr, "T: {half, bfloat16, ...}", spelled from a dtype list.
inline std::string TypeAttr(std::initializer_list<tensorflow::DataType> types) {
  std::string s;
  for (tensorflow::DataType t : types) {
    s += std::string(s.empty() ? "" : ", ") + tensorflow::DataTypeString(t);
  }
  return "T: {" + s + "}";
}

inline bool ToCoreDType(tensorflow::DataType t, smallmm::DType* out) {
  switch (t) {
#define SMALLMM_CASE(T, DT, CORE) \
  case tensorflow::DT:            \
    *out = smallmm::DType::CORE;  \
    return true;
    SMALLMM_TYPE_LIST(SMALLMM_CASE)
#undef SMALLMM_CASE
    default:
      return false;
  }
}

}  // namespace smallmm_tf

#endif  // TF_SMALLMM_CC_TF_SMALLMM_TYPES_H_
