// float16_bits.h — float16 and bfloat16 to and from float32, on the bits (F. Giesen's
// public-domain conversions): round to nearest even, NaN stays NaN, the results of
// Eigen::half / Eigen::bfloat16. Used by the CPU kernels (gemm_isa.cc) and by the host
// side of the GPU block program (cuda/smallmm_gpu_logic.h; the device uses the hardware
// conversions).
//
// Every function is `static`: gemm_isa.cc is compiled once per instruction set, and an
// inline function with external linkage compiled with -mavx512f could be merged (as a
// COMDAT) into the baseline build.
#ifndef TF_SMALLMM_CC_ENGINE_FLOAT16_BITS_H_
#define TF_SMALLMM_CC_ENGINE_FLOAT16_BITS_H_

#include <cstdint>
#include <cstring>

namespace smallmm {
namespace f16 {

static inline uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static inline float BitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float HalfToFloat(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // Inf / NaN
  } else if (exp == 0) {      // zero / subnormal: renormalise
    o += 1u << 23;
    o = FloatBits(BitsFloat(o) - BitsFloat(113u << 23));
  }
  return BitsFloat(o | ((uint32_t(h) & 0x8000u) << 16));
}

static inline uint16_t FloatToHalf(float f) {
  uint32_t u = FloatBits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= ((127u + 16u) << 23)) {
    o = (u > (255u << 23)) ? 0x7e00 : 0x7c00;  // NaN -> qNaN, overflow -> Inf
  } else if (u < (113u << 23)) {               // subnormal or zero
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = uint16_t(FloatBits(BitsFloat(u) + BitsFloat(magic)) - magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    o = uint16_t(u >> 13);
  }
  return uint16_t(o | (sign >> 16));
}

static inline float BF16ToFloat(uint16_t h) { return BitsFloat(uint32_t(h) << 16); }

static inline uint16_t FloatToBF16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // qNaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace f16
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_FLOAT16_BITS_H_
