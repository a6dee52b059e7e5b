// scalars.h — each dtype's storage scalars to and from its accumulation scalars
// (dtypes.h): float16 / bfloat16 widen to float32 and round back to nearest even
// (float16_bits.h); the other types are their own accumulation type. For the engine's
// sums outside the kernels (plan.cc SumPartials, gemm.cc's reductions run as items).
#ifndef TF_SMALLMM_CC_ENGINE_SCALARS_H_
#define TF_SMALLMM_CC_ENGINE_SCALARS_H_

#include "cc/engine/dtypes.h"
#include "cc/engine/float16_bits.h"

namespace smallmm {

template <DType D>
static inline typename DTypeInfo<D>::Acc Widen(typename DTypeInfo<D>::Storage s) {
  if constexpr (D == DType::kHalf) {
    return f16::HalfToFloat(s);
  } else if constexpr (D == DType::kBFloat16) {
    return f16::BF16ToFloat(s);
  } else {
    return s;
  }
}

template <DType D>
static inline typename DTypeInfo<D>::Storage Narrow(typename DTypeInfo<D>::Acc x) {
  if constexpr (D == DType::kHalf) {
    return f16::FloatToHalf(x);
  } else if constexpr (D == DType::kBFloat16) {
    return f16::FloatToBF16(x);
  } else {
    return x;
  }
}

}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_SCALARS_H_
