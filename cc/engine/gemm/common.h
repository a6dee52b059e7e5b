// common.h — what every GEMM kernel family shares: element traits, GCC vector types, the
// loop-nest cursor, and the walk that feeds direct kernels runs of the innermost output
// loop. Included only by gemm_isa.cc (compiled once per ISA): everything has internal
// linkage, see README.md.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_COMMON_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_COMMON_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cc/engine/float16_bits.h"
#include "cc/engine/smallmm.h"

namespace smallmm {
namespace {

// ---------------------------------------------------------------- 16-bit floats
using f16::BF16ToFloat;
using f16::FloatToBF16;
using f16::FloatToHalf;
using f16::HalfToFloat;

// ---------------------------------------------------------------- element traits
// R: accumulation type; kComplex: interleaved (re, im) storage, split planes when packed.
// Load / Store take the index of a storage scalar. float16 / bfloat16 convert on the way.
template <DType D>
struct Traits {
  using S = typename DTypeInfo<D>::Storage;
  using R = typename DTypeInfo<D>::Acc;
  static_assert(std::is_same<S, R>::value, "a converting dtype needs its own Traits");
  static constexpr bool kComplex = DTypeInfo<D>::kComponents == 2;
  static R Load(const void* p, int64_t i) { return static_cast<const S*>(p)[i]; }
  static void Store(void* p, int64_t i, R v) { static_cast<S*>(p)[i] = v; }
};
// 16-bit storage, float accumulation, converted by these two functions on the way.
template <float (*kToFloat)(uint16_t), uint16_t (*kFromFloat)(float)>
struct Traits16 {
  using R = float;
  static constexpr bool kComplex = false;
  static R Load(const void* p, int64_t i) { return kToFloat(static_cast<const uint16_t*>(p)[i]); }
  static void Store(void* p, int64_t i, R v) { static_cast<uint16_t*>(p)[i] = kFromFloat(v); }
};
template <>
struct Traits<DType::kHalf> : Traits16<&HalfToFloat, &FloatToHalf> {};
template <>
struct Traits<DType::kBFloat16> : Traits16<&BF16ToFloat, &FloatToBF16> {};

// A real dtype stored as its accumulation type (float, double): kernels may read and write
// its elements in place, as vectors of R.
template <DType D>
constexpr bool kPlainReal =
    !Traits<D>::kComplex &&
    std::is_same<typename DTypeInfo<D>::Storage, typename DTypeInfo<D>::Acc>::value;

// ---------------------------------------------------------------- vectors
// GCC vector extensions, lowered to zmm / ymm / xmm by each ISA build.
template <typename R, int L>
struct VecOf {
  typedef R type __attribute__((vector_size(sizeof(R) * L)));
};

// Unaligned vector load / store (memcpy compiles to one vmovups).
template <typename V, typename R>
inline V LoadVec(const R* p) {
  V v;
  memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename R>
inline void StoreVec(R* p, const V& v) {
  memcpy(p, &v, sizeof(V));
}

// ---------------------------------------------------------------- loop nests
// Walks a loop nest: offsets of the current multi-index, advanced in row-major order.
struct NestCursor {
  int n = 0;
  const Loop* loops = nullptr;
  int64_t idx[kMaxBatchDims] = {};
  int64_t a = 0, b = 0, c = 0;

  void Seek(const Loop* l, int count, int64_t flat) {
    n = count;
    loops = l;
    a = b = c = 0;
    for (int d = n - 1; d >= 0; --d) {
      const int64_t s = loops[d].size;
      idx[d] = s > 0 ? flat % s : 0;
      flat = s > 0 ? flat / s : 0;
      a += idx[d] * loops[d].a;
      b += idx[d] * loops[d].b;
      c += idx[d] * loops[d].c;
    }
  }
  void Next() {
    for (int d = n - 1; d >= 0; --d) {
      const Loop& l = loops[d];
      if (++idx[d] < l.size) {
        a += l.a;
        b += l.b;
        c += l.c;
        return;
      }
      a -= (l.size - 1) * l.a;
      b -= (l.size - 1) * l.b;
      c -= (l.size - 1) * l.c;
      idx[d] = 0;
    }
  }
};

// ---------------------------------------------------------------- direct kernels
// A direct kernel computes products straight from the caller's memory, no packing: `count`
// products of the plan, the t-th with operands at element offsets ao + t·sa and bo + t·sb
// and its output at co + t·sc (a run of the innermost output loop).
template <DType D>
using DirectFn = void (*)(const GemmPlan&, const void*, const void*, void*, int64_t count,
                          int64_t ao, int64_t sa, int64_t bo, int64_t sb, int64_t co, int64_t sc);

// Output matrices [begin, end) of the plan through a direct kernel, walking runs of the
// innermost output loop: one Seek per run, not per product.
template <DType D>
bool RunDirect(DirectFn<D> fn, const GemmPlan& p, const void* a, const void* b, void* c,
               int64_t begin, int64_t end) {
  const Loop inner = p.num_out > 0 ? p.out[p.num_out - 1] : Loop{1, 0, 0, 0};
  NestCursor out;
  for (int64_t o = begin; o < end;) {
    out.Seek(p.out, p.num_out, o);
    const int64_t pos = p.num_out > 0 ? out.idx[p.num_out - 1] : 0;
    const int64_t count = inner.size - pos < end - o ? inner.size - pos : end - o;
    fn(p, a, b, c, count, out.a, inner.a, out.b, inner.b, out.c, inner.c);
    o += count;
  }
  return true;
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_COMMON_H_
