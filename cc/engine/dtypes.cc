// Run-time views of the dtype list (dtypes.h).
#include "cc/engine/dtypes.h"

namespace smallmm {

const char* DTypeName(DType t) {
  static const char* const kNames[] = {
#define SMALLMM_DTYPE_NAME(e, name, bytes, S, A) name,
      SMALLMM_DTYPES(SMALLMM_DTYPE_NAME)
#undef SMALLMM_DTYPE_NAME
  };
  const int i = int(t);
  return i >= 0 && i < kNumDTypes ? kNames[i] : "invalid";
}

int DTypeSize(DType t) {
  static const int kBytes[] = {
#define SMALLMM_DTYPE_BYTES(e, name, bytes, S, A) bytes,
      SMALLMM_DTYPES(SMALLMM_DTYPE_BYTES)
#undef SMALLMM_DTYPE_BYTES
  };
  const int i = int(t);
  return i >= 0 && i < kNumDTypes ? kBytes[i] : 0;
}

}  // namespace smallmm
