// The planner: shape and broadcast logic (the one place for it), loop folding, cost
// estimates and the parallel-reduction split.
#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>

#include "cc/engine/scalars.h"
#include "cc/engine/smallmm.h"

namespace smallmm {

namespace {

std::string ShapeString(const Operand& x) {
  std::ostringstream s;
  s << "[";
  for (int i = 0; i < x.rank; ++i) s << (i ? "," : "") << x.dims[i];
  s << "]";
  return s.str();
}

bool MulOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }

// Whether x == a * b (without overflow).
bool IsProduct(int64_t x, int64_t a, int64_t b) {
  int64_t r;
  return !MulOverflows(a, b, &r) && r == x;
}

// a * b, saturated at INT64_MAX / 4 (so that a few of them still add up): for cost
// heuristics over sizes that may be astronomically large when some other dim is 0.
int64_t SatMul(int64_t a, int64_t b) {
  constexpr int64_t kCap = INT64_MAX / 4;
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) || r > kCap ? kCap : r;
}

bool HasNoElements(const Operand& x) {
  for (int i = 0; i < x.rank; ++i) {
    if (x.dims[i] == 0) return true;
  }
  return false;
}

// Drops size-1 loops and merges neighbours that walk memory as one loop.
int Simplify(Loop* loops, int n) {
  int w = 0;
  for (int i = 0; i < n; ++i) {
    if (loops[i].size == 1) continue;
    if (w > 0) {
      Loop& outer = loops[w - 1];
      const Loop& inner = loops[i];
      int64_t a, b, c, size;
      if (outer.size != 0 && inner.size != 0 && !MulOverflows(inner.a, inner.size, &a) &&
          !MulOverflows(inner.b, inner.size, &b) && !MulOverflows(inner.c, inner.size, &c) &&
          outer.a == a && outer.b == b && outer.c == c &&
          !MulOverflows(outer.size, inner.size, &size)) {
        outer.size = size;
        outer.a = inner.a;
        outer.b = inner.b;
        outer.c = inner.c;
        continue;
      }
    }
    loops[w++] = loops[i];
  }
  return w;
}

// Largest divisor of n that is <= cap.
int64_t DivisorAtMost(int64_t n, int64_t cap) {
  for (int64_t d = std::min(n, cap); d > 1; --d) {
    if (n % d == 0) return d;
  }
  return 1;
}

// A bound on the packed panels when a long batch folds into K (6ad3d4f, 2026-11-25). Timed
// 2026-12-01 (README.md; weight gradient g[B,64,160,1]·u[B,64,8,1]ᵀ summed over B = 600,
// 2048, one thread): 256 takes 1.10-1.11× as long, 4096 1.11× (B = 2048).
constexpr int64_t kMaxFoldedK = 1024;

// Removes loop i from a nest, or shrinks it to `size / taken` iterations when only part of
// it was folded (its strides then step over the folded part).
void TakeFromLoop(Loop* loops, int* n, int i, int64_t taken) {
  Loop& l = loops[i];
  if (taken == l.size) {
    for (int j = i; j + 1 < *n; ++j) loops[j] = loops[j + 1];
    --*n;
  } else {
    l.size /= taken;
    l.a *= taken;
    l.b *= taken;
    l.c *= taken;
  }
}

// Nothing to compute (an empty batch, or an empty sum whose result is zeros): folding
// the other, possibly huge, loops would only size scratch buffers for no work.
bool HasEmptyLoop(const GemmPlan& p) {
  for (int i = 0; i < p.num_out; ++i) {
    if (p.out[i].size == 0) return true;
  }
  for (int i = 0; i < p.num_red; ++i) {
    if (p.red[i].size == 0) return true;
  }
  return false;
}

// The longest loop (size > 1) that satisfies ok, or -1.
template <typename Ok>
int PickLoop(const Loop* loops, int n, Ok ok) {
  int best = -1;
  for (int i = 0; i < n; ++i) {
    if (loops[i].size > 1 && ok(loops[i]) && (best < 0 || loops[i].size > loops[best].size)) {
      best = i;
    }
  }
  return best;
}

void CountLoops(GemmPlan* p) {
  int64_t outputs = 1, reduced = 1;
  for (int i = 0; i < p->num_out; ++i) outputs *= p->out[i].size;
  for (int i = 0; i < p->num_red; ++i) reduced *= p->red[i].size;
  p->num_outputs = outputs;
  p->num_reduced = reduced;
}

// Turns batches of matrix-vector products that share a matrix into matrix-matrix products
// (every device's kernels take these plans):
//  - N = 1 and an output loop along which A is broadcast: that loop becomes N (capsule
//    prediction: W[i] · u[b, i] for all b is one 160×8 · 8×B GEMM);
//  - M = 1 and an output loop along which B is broadcast: that loop becomes M;
//  - K = 1 and a reduction loop: that loop becomes K (the capsule weight gradient
//    Σ_b g[b, i] · u[b, i]ᵀ is one 160×B · B×8 GEMM).
// The shared operand is then packed once and reused from registers across the columns.
void FoldLoopsIntoMatrix(GemmPlan* p) {
  if (HasEmptyLoop(*p)) return;
  // A side of 1 takes an output loop along which the other operand is broadcast: the
  // loop's strides for the moving operand and for C become that side's.
  auto fold_side = [&](int64_t Loop::* shared, int64_t Loop::* moving, int64_t* side,
                       int64_t* op_stride, int64_t* c_stride) {
    const int best = PickLoop(p->out, p->num_out, [&](const Loop& l) { return l.*shared == 0; });
    const int64_t take = best >= 0 ? DivisorAtMost(p->out[best].size, kMaxFoldedColumns) : 1;
    if (take > 1) {
      *side = take;
      *op_stride = p->out[best].*moving;
      *c_stride = p->out[best].c;
      TakeFromLoop(p->out, &p->num_out, best, take);
    }
  };
  if (p->n == 1) {
    fold_side(&Loop::a, &Loop::b, &p->n, &p->b_cs, &p->c_cs);
  } else if (p->m == 1) {
    fold_side(&Loop::b, &Loop::a, &p->m, &p->a_rs, &p->c_rs);
  }
  // Reductions are serial anyway, so no parallelism is lost; the cap bounds the packed
  // panels (M·K and K·N elements) when the batch is long.
  if (p->k == 1) {
    const int i = PickLoop(p->red, p->num_red, [](const Loop&) { return true; });
    const int64_t take = i >= 0 ? DivisorAtMost(p->red[i].size, kMaxFoldedK) : 1;
    if (take > 1) {
      p->k = take;
      p->a_cs = p->red[i].a;
      p->b_rs = p->red[i].b;
      TakeFromLoop(p->red, &p->num_red, i, take);
    }
  }
  CountLoops(p);
}

}  // namespace

void FoldForCpuKernels(GemmPlan* p) {
  if (HasEmptyLoop(*p)) return;
  // Rows: an output loop along which B is broadcast while A's and C's rows run on evenly
  // from one matrix to the next joins M ([B, M, K] · [K, N] is one [B·M, K] · [K, N]
  // product, and so is the gradient g[B, M, N] · Bᵀ).
  {
    const int i = PickLoop(p->out, p->num_out, [&](const Loop& l) {
      return l.b == 0 && l.a != 0 && IsProduct(l.a, p->m, p->a_rs) && IsProduct(l.c, p->m, p->c_rs);
    });
    const int64_t take = i >= 0 ? DivisorAtMost(p->out[i].size, kMaxFoldedRows / p->m) : 1;
    if (take > 1) {
      p->m *= take;
      TakeFromLoop(p->out, &p->num_out, i, take);
    }
  }
  // K: a reduction loop along which both operands' K axes run on evenly joins K (the
  // gradient Σ_b A[b]ᵀ · g[b] of a B shared by a batch is one K×(B·M) · (B·M)×N GEMM).
  if (p->k > 1) {
    const int i = PickLoop(p->red, p->num_red, [&](const Loop& l) {
      return IsProduct(l.a, p->k, p->a_cs) && IsProduct(l.b, p->k, p->b_rs);
    });
    const int64_t take = i >= 0 ? DivisorAtMost(p->red[i].size, kMaxFoldedK / p->k) : 1;
    if (take > 1) {
      p->k *= take;
      TakeFromLoop(p->red, &p->num_red, i, take);
    }
  }
  CountLoops(p);
}

bool PlanBatchMatMul(const Operand& a, const Operand& b, const int64_t* target_batch,
                     int target_rank, GemmPlan* plan, int* out_rank,
                     int64_t out_dims[kMaxBatchDims + 2], std::string* error, const int* out_perm,
                     int out_perm_rank) {
  auto fail = [&](const std::string& msg) {
    *error = msg;
    return false;
  };
  // The texts of TensorFlow's BatchMatMulV2, which the ops replace, in its order of checks.
  if (a.rank < 2 || b.rank < 2) {
    return fail(std::string(a.rank < 2 ? "In[0]" : "In[1]") +
                " ndims must be >= 2: " + std::to_string(a.rank < 2 ? a.rank : b.rank));
  }
  for (const Operand* x : {&a, &b}) {
    for (int i = 0; i < x->rank; ++i) {
      if (x->dims[i] < 0) return fail("negative dimension in shape " + ShapeString(*x));
    }
  }
  const int ra = a.rank - 2, rb = b.rank - 2;
  const bool has_target = target_rank >= 0;
  const int rt = has_target ? target_rank : 0;
  for (int i = 0; i < rt; ++i) {
    if (target_batch[i] < 0) return fail("batch_shape has a negative dimension");
  }
  const int nb = std::max(std::max(ra, rb), rt);
  if (nb > kMaxBatchDims) {
    std::ostringstream s;
    s << "at most " << kMaxBatchDims << " batch dimensions are supported, got x" << ShapeString(a)
      << " and y" << ShapeString(b);
    return fail(s.str());
  }

  // An operand with no elements is never read (its 0 makes the output empty, K zero or a
  // reduction empty), and its strides may be astronomically large (a [0, 2^62, 2^62, 4]
  // view): plan it with strides of 0 so that no offset arithmetic can overflow.
  int64_t astr[kMaxBatchDims + 2], bstr[kMaxBatchDims + 2];
  const bool a_empty = HasNoElements(a), b_empty = HasNoElements(b);
  for (int i = 0; i < a.rank; ++i) astr[i] = a_empty ? 0 : a.strides[i];
  for (int i = 0; i < b.rank; ++i) bstr[i] = b_empty ? 0 : b.strides[i];

  GemmPlan p;
  const int64_t* ad = a.dims + ra;  // the two matrix axes
  const int64_t* as = astr + ra;
  const int64_t* bd = b.dims + rb;
  const int64_t* bs = bstr + rb;
  p.m = a.transpose ? ad[1] : ad[0];
  const int64_t ka = a.transpose ? ad[0] : ad[1];
  const int64_t kb = b.transpose ? bd[1] : bd[0];
  p.n = b.transpose ? bd[0] : bd[1];
  p.k = ka;
  p.a_rs = a.transpose ? as[1] : as[0];
  p.a_cs = a.transpose ? as[0] : as[1];
  p.b_rs = b.transpose ? bs[1] : bs[0];
  p.b_cs = b.transpose ? bs[0] : bs[1];
  p.conj_a = a.conjugate;
  p.conj_b = b.conjugate;

  // Broadcast the batch axes (right-aligned) and decide output vs reduction per axis.
  int64_t full[kMaxBatchDims], odim[kMaxBatchDims], sa[kMaxBatchDims], sb[kMaxBatchDims];
  bool reduced[kMaxBatchDims];
  int orank = 0;
  for (int d = 0; d < nb; ++d) {
    const int ia = d - (nb - ra), ib = d - (nb - rb), it = d - (nb - rt);
    const int64_t da = ia >= 0 ? a.dims[ia] : 1;
    const int64_t db = ib >= 0 ? b.dims[ib] : 1;
    const int64_t dt = (has_target && it >= 0) ? target_batch[it] : 1;
    int64_t f = 1;
    for (int64_t s : {da, db, dt}) {
      if (s == 1) continue;
      if (f == 1) {
        f = s;
      } else if (s != f) {
        std::ostringstream m;
        m << "In[0] and In[1] must have compatible batch dimensions: " << ShapeString(a) << " vs. "
          << ShapeString(b);
        if (has_target) {
          m << " and batch_shape [";
          for (int i = 0; i < rt; ++i) m << (i ? "," : "") << target_batch[i];
          m << "] (batch axis " << d - nb << ": " << da << " vs. " << db << " vs. " << dt << ")";
        }
        return fail(m.str());
      }
    }
    full[d] = f;
    sa[d] = (da == 1) ? 0 : astr[ia];
    sb[d] = (db == 1) ? 0 : bstr[ib];
    reduced[d] = has_target && dt == 1 && f != 1;
    if (!has_target || it >= 0) odim[orank++] = has_target ? dt : f;
  }

  if (ka != kb) {
    std::ostringstream s;
    s << kSizeIncompatible << "In[0]: " << ShapeString(a) << ", In[1]: " << ShapeString(b);
    return fail(s.str());
  }

  // Output shape and its strides.
  *out_rank = orank + 2;
  if (out_perm != nullptr) {
    bool seen[kMaxBatchDims + 2] = {};
    bool ok = out_perm_rank == *out_rank;
    for (int i = 0; ok && i < out_perm_rank; ++i) {
      ok = out_perm[i] >= 0 && out_perm[i] < *out_rank && !seen[out_perm[i]];
      if (ok) seen[out_perm[i]] = true;
    }
    if (!ok) {
      std::ostringstream s;
      s << "the output permutation [";
      for (int i = 0; i < out_perm_rank; ++i) s << (i ? "," : "") << out_perm[i];
      s << "] is not a permutation of the output's " << *out_rank << " axes";
      return fail(s.str());
    }
  }
  int64_t total = 1;
  for (int i = 0; i < orank; ++i) {
    out_dims[i] = odim[i];
    if (MulOverflows(total, odim[i], &total)) return fail("output element count overflows int64");
  }
  out_dims[orank] = p.m;
  out_dims[orank + 1] = p.n;
  p.num_outputs = total;
  if (MulOverflows(total, p.m, &total) || MulOverflows(total, p.n, &total)) {
    return fail("output element count overflows int64");
  }
  p.output_elements = total;
  // Strides of C's axes: dense row-major in the buffer's axis order (C's own, or out_perm).
  // An empty C is never written, and its strides could overflow (batch [0, 2^62, 2^62]):
  // 0 then, with the matrix strides of a dense C.
  int64_t cstride[kMaxBatchDims + 2];
  int64_t run = 1;
  for (int i = orank + 1; i >= 0; --i) {
    const int axis = out_perm != nullptr ? out_perm[i] : i;
    cstride[axis] = total == 0 ? 0 : run;
    if (total != 0) run *= out_dims[axis];  // bounded by output_elements: no overflow
  }
  p.c_rs = total == 0 ? p.n : cstride[orank];
  p.c_cs = total == 0 ? 1 : cstride[orank + 1];

  // Loop nests. Axes missing from the target are leading, so output axis indices line up
  // with the trailing `orank` broadcast axes.
  int no = 0, nr = 0;
  int64_t reduced_count = 1;
  for (int d = 0; d < nb; ++d) {
    const int oi = d - (nb - orank);
    if (reduced[d]) {
      p.red[nr++] = {full[d], sa[d], sb[d], 0};
      if (MulOverflows(reduced_count, full[d], &reduced_count)) {
        return fail("reduction element count overflows int64");
      }
    } else if (oi >= 0) {
      p.out[no++] = {odim[oi], sa[d], sb[d], cstride[oi]};
    }
  }
  p.num_reduced = reduced_count;

  // Loop order: an axis along which an operand is broadcast (stride 0) reuses that
  // operand; put the axes with the largest reuse innermost so the reused matrix stays in
  // L1 across consecutive work items (capsules: W[i] stays hot while the batch streams).
  const int64_t a_bytes = SatMul(p.m, p.k), b_bytes = SatMul(p.k, p.n);
  auto reuse = [&](const Loop& l) { return (l.a == 0 ? a_bytes : 0) + (l.b == 0 ? b_bytes : 0); };
  std::stable_sort(p.out, p.out + no,
                   [&](const Loop& x, const Loop& y) { return reuse(x) < reuse(y); });
  p.num_out = Simplify(p.out, no);
  p.num_red = Simplify(p.red, nr);
  FoldLoopsIntoMatrix(&p);
  *plan = p;
  return true;
}

int64_t CostPerOutput(const GemmPlan& p) {
  // Saturating: with K = 0 or an empty reduction the factors can be huge while the work
  // is not (an operand [2, 2^61, 0, 16] reduced to [2, 1]).
  const int64_t mn = SatMul(p.m, p.n);
  const int64_t flops = std::max<int64_t>(SatMul(mn, std::max<int64_t>(p.k, 1)), 1);
  const int64_t per_item = flops + SatMul(p.m, p.k) + SatMul(p.k, p.n);  // each <= cap
  return SatMul(std::max<int64_t>(p.num_reduced, 1), per_item) + mn + 20;
}

// ---------------------------------------------------------------- parallel reductions
int SuggestReductionSplit(DType dtype, const GemmPlan& p, int threads) {
  if (int(dtype) < 0 || int(dtype) >= kNumDTypes) return 1;
  if (threads < 2 || p.num_red == 0 || p.num_outputs >= 2 * threads || p.num_out >= kMaxBatchDims) {
    return 1;
  }
  const int64_t s = p.red[0].size;
  // Enough parts for two work items per thread, each still summing >= 4 products: a
  // divisor of the loop if one is near, else that many parts and a shorter tail (a batch
  // of 409 would otherwise run on one thread).
  const int64_t want = (2 * threads + p.num_outputs - 1) / std::max<int64_t>(p.num_outputs, 1);
  for (int64_t d = want; d >= 2; --d) {
    if (s % d == 0 && s / d >= 4) return int(d);
  }
  for (int64_t d = want + 1; d <= 4 * want && d <= s / 4; ++d) {
    if (s % d == 0) return int(d);
  }
  return want >= 2 && s / want >= 4 ? int(want) : 1;
}

ReductionParts SplitReduction(const GemmPlan& p, int parts) {
  ReductionParts r;
  const Loop red = p.red[0];
  const int64_t chunk = red.size / parts, rest = red.size - chunk * parts;
  GemmPlan& q = r.split;
  q = p;
  q.red[0].size = chunk;
  for (int i = q.num_out; i > 0; --i) q.out[i] = q.out[i - 1];
  q.out[0] = {parts, red.a * chunk, red.b * chunk, p.output_elements};
  ++q.num_out;
  q.num_outputs = p.num_outputs * parts;
  q.num_reduced = p.num_reduced / red.size * chunk;
  q.output_elements = p.output_elements * parts;
  r.partials = parts;
  r.units = q.num_outputs;
  if (rest > 0) {
    r.tail = p;
    r.tail.red[0].size = rest;
    r.tail.num_reduced = p.num_reduced / red.size * rest;
    r.tail_a = red.a * chunk * parts;
    r.tail_b = red.b * chunk * parts;
    ++r.partials;
    r.units += p.num_outputs;
  }
  return r;
}

namespace {
// Sums in R of the partials' scalars, each read through `in` and the sum stored through `put`.
template <typename R, typename S, typename In, typename Out>
void Sum(const S* partials, int parts, int64_t n, S* out, int64_t begin, int64_t end, In in,
         Out put) {
  for (int64_t i = begin; i < end; ++i) {
    R s = in(partials[i]);
    for (int q = 1; q < parts; ++q) s += in(partials[q * n + i]);
    out[i] = put(s);
  }
}

// One dtype's partial sums, as sums of its storage scalars (a complex element is its
// (re, im) pair). float16 / bfloat16 partials are their types' values (the kernels round
// their float32 sums on output), added in float32 and rounded once more: one rounding per
// part (SuggestReductionSplit: about two parts a thread), where the built-in rounds every
// product of the batch before its sum.
template <DType D>
void SumAs(const void* partials, int parts, int64_t n, void* out, int64_t begin, int64_t end) {
  using S = typename DTypeInfo<D>::Storage;
  constexpr int kC = DTypeInfo<D>::kComponents;
  Sum<typename DTypeInfo<D>::Acc>(static_cast<const S*>(partials), parts, kC * n,
                                  static_cast<S*>(out), kC * begin, kC * end, Widen<D>, Narrow<D>);
}
}  // namespace

void SumPartials(DType dtype, const void* partials, int parts, int64_t n, void* out, int64_t begin,
                 int64_t end) {
  switch (dtype) {
#define SMALLMM_SUM_CASE(e, name, bytes, S, A) \
  case DType::e:                               \
    return SumAs<DType::e>(partials, parts, n, out, begin, end);
    SMALLMM_DTYPES(SMALLMM_SUM_CASE)
#undef SMALLMM_SUM_CASE
    default:
      return;
  }
}

// ---------------------------------------------------------------- fused gradient pairs
namespace {

constexpr int64_t kFusedPairMinFloatS = 20;    // see PlanFusedPair
constexpr int64_t kFusedPairMinNarrowR = 32;  // see PlanFusedPair

// One product of a pair seen from the operand X it shares with the other: X's free axis
// (kept in C) and reduced axis (summed over), the other operand O, and C.
struct PairSide {
  int64_t free = 1, red = 1, n = 1;
  int64_t x_free = 0, x_red = 0;  // X's strides
  int64_t o_red = 0, o_n = 0;     // O's strides along the reduced axis and along n
  int64_t c_free = 0, c_n = 0;    // C's strides along X's free axis and along n
  int num_out = 0;
  PairLoop out[kMaxBatchDims];  // x; y = O; p = C (the other slots unused)
};

// Joins `size` iterations of stride x_step (and o_step) to an axis of `extent` elements of
// stride x_stride (o_stride) when they continue it; an axis of one element takes them.
bool Continues(int64_t size, int64_t x_step, int64_t o_step, int64_t* extent, int64_t* x_stride,
               int64_t* o_stride) {
  if (*extent == 1) {
    *x_stride = x_step;
    *o_stride = o_step;
  } else if (!IsProduct(x_step, *extent, *x_stride) || !IsProduct(o_step, *extent, *o_stride)) {
    return false;
  }
  return !MulOverflows(*extent, size, extent);
}

bool SideOf(const GemmPlan& p, bool x_is_a, PairSide* s) {
  if (p.conj_a || p.conj_b || p.num_out > kMaxBatchDims) return false;
  if (x_is_a) {
    *s = {p.m, p.k, p.n, p.a_rs, p.a_cs, p.b_rs, p.b_cs, p.c_rs, p.c_cs};
  } else {
    *s = {p.n, p.k, p.m, p.b_cs, p.b_rs, p.a_cs, p.a_rs, p.c_cs, p.c_rs};
  }
  // Every sum joins the reduced axis (a weight gradient's batch); none may be left over.
  for (int i = 0; i < p.num_red; ++i) {
    const Loop& l = p.red[p.num_red - 1 - i];  // innermost first: each continues the axis
    if (!Continues(l.size, x_is_a ? l.a : l.b, x_is_a ? l.b : l.a, &s->red, &s->x_red, &s->o_red)) {
      return false;
    }
  }
  // An output loop along which O is broadcast joins the free axis where X and C continue it
  // (the batch of an input gradient: W[i]ᵀ · ĝ[b, i] for every b).
  for (int i = p.num_out - 1; i >= 0; --i) {
    const Loop& l = p.out[i];
    const int64_t lx = x_is_a ? l.a : l.b, lo = x_is_a ? l.b : l.a;
    int64_t free = s->free, x_free = s->x_free, c_free = s->c_free;
    if (lo == 0 && Continues(l.size, lx, l.c, &free, &x_free, &c_free)) {
      s->free = free;
      s->x_free = x_free;
      s->c_free = c_free;
      continue;
    }
    for (int j = s->num_out; j > 0; --j) s->out[j] = s->out[j - 1];
    s->out[0] = {l.size, lx, lo, 0, l.c, 0};
    ++s->num_out;
  }
  return true;
}

// Whether X's strides on the two sides name the same elements: each side's free axis is
// the other's reduced axis (strides matter only along axes longer than one).
bool SameAxis(int64_t size_a, int64_t stride_a, int64_t size_b, int64_t stride_b) {
  return size_a == size_b && (size_a <= 1 || stride_a == stride_b);
}

}  // namespace

bool PlanFusedPair(DType dtype, const GemmPlan& p0, const void* a0, const void* b0,
                   const GemmPlan& p1, const void* a1, const void* b1, FusedPair* pair) {
  if (dtype == DType::kComplex64 || dtype == DType::kComplex128) return false;
  if (p0.output_elements <= 0 || p1.output_elements <= 0) return false;
  if (p0.k < 1 || p1.k < 1 || p0.num_reduced < 1 || p1.num_reduced < 1) return false;
  for (int x0 = 0; x0 < 2; ++x0) {
    for (int x1 = 0; x1 < 2; ++x1) {
      if ((x0 == 0 ? a0 : b0) != (x1 == 0 ? a1 : b1)) continue;
      PairSide s[2];
      if (!SideOf(p0, x0 == 0, &s[0]) || !SideOf(p1, x1 == 0, &s[1])) continue;
      if (!SameAxis(s[0].red, s[0].x_red, s[1].free, s[1].x_free) ||
          !SameAxis(s[0].free, s[0].x_free, s[1].red, s[1].x_red) ||
          s[0].num_out != s[1].num_out) {
        continue;
      }
      bool same_loops = true;
      for (int i = 0; i < s[0].num_out; ++i) {
        same_loops = same_loops && s[0].out[i].size == s[1].out[i].size &&
                     s[0].out[i].x == s[1].out[i].x;
      }
      if (!same_loops) continue;
      // P keeps X's contiguous axis (s) and sums over r; Q sums over s.
      const int pi = s[0].free == 1 || s[0].x_free == 1 ? 0 : 1;
      const PairSide& P = s[pi];
      const PairSide& Q = s[1 - pi];
      if (P.free > 1 && P.x_free != 1) continue;
      bool vectors = true;
      for (const PairSide* side : {&P, &Q}) {
        vectors = vectors && side->n <= kFusedPairMaxN &&
                  (side->n == 1 || (side->o_n == 1 && side->c_n == 1));
      }
      if (!vectors) continue;
      // Where fusing pays, from the pair A/B (benchmarks/fused_pair_ab.py: two products
      // against fused, one thread, Xeon AVX-512, 2026-12-03): float16 3.2-3.4× at S = 16-160
      // (X is converted once, not once per use); float32 1.1-2.4× from S = 20 (capsule
      // 160×8, B = 50-300: 1.7-2.4×; S = 12-16 with n = 8 1.15-1.5×, but n = 4 0.82×) and
      // 0.68-0.71× at S = 4-8 with B = 300, where staging each output costs more than its
      // work; float64 0.89-1.16×.
      if (dtype == DType::kDouble || (dtype == DType::kFloat && P.free < kFusedPairMinFloatS)) {
        return false;
      }
      // X one dense block [R, S] per output (its rows S apart: the gradients of a plain
      // batched product, R = one matrix's rows, as [B, M, 1] · [B, 1, N]): the executor's
      // pair loop already runs both products on each slice of X while it is in cache, and
      // staging per output only costs. float16 [B, M, 1] · [B, 1, 32], M = 1-128, took
      // 1.2-20× as long fused (same A/B, 2026-12-04), and the sweep's 16-bit
      // forward+backward there fell from 1.3-7.1× to 0.48-0.66× tf.matmul. Fusing pays
      // where X's rows are batch rows far apart, as in every broadcast weight's gradient.
      if (P.x_red == P.free || P.red <= 1) return false;
      // 16-bit rows of one or two elements need enough rows of X to pay for staging each
      // output (capsule-form A/B, float16, S = 32 and 160, one thread, 2026-12-04): n = 1
      // 0.26-0.72× at R = 4-8, 0.90-1.00× at 16, 1.16-1.60× from 32; n = 2 0.55-0.85× at
      // R = 4-8, 1.14-1.34× at 16; n = 4 1.14-1.20× already at R = 4. (float32, which
      // only fuses from S = 20, gains 1.7-2.1× at n = 1 from R = 8.)
      if (dtype != DType::kFloat && std::max(P.n, Q.n) <= 2 && P.red < kFusedPairMinNarrowR) {
        return false;
      }
      FusedPair f;
      f.s = P.free;
      f.r = P.red;
      f.n_p = P.n;
      f.n_q = Q.n;
      f.x = pi == 0 ? (x0 == 0 ? a0 : b0) : (x1 == 0 ? a1 : b1);
      f.y = pi == 0 ? (x0 == 0 ? b0 : a0) : (x1 == 0 ? b1 : a1);
      f.z = pi == 0 ? (x1 == 0 ? b1 : a1) : (x0 == 0 ? b0 : a0);
      f.x_r = P.x_red;
      f.y_r = P.o_red;
      f.p_s = P.c_free;
      f.z_s = Q.o_red;
      f.q_r = Q.c_free;
      f.p_index = pi;
      f.num_out = P.num_out;
      for (int i = 0; i < P.num_out; ++i) {
        f.out[i] = {P.out[i].size, P.out[i].x, P.out[i].y, Q.out[i].y, P.out[i].p, Q.out[i].p};
        f.num_outputs *= P.out[i].size;
      }
      *pair = f;
      return true;
    }
  }
  return false;
}

int64_t FusedPairCostPerOutput(const FusedPair& f) {
  // Two vector multiply-adds and a broadcast per element of X; staging Y, Z and Q.
  return SatMul(SatMul(f.s, f.r), 3) + SatMul(f.r + f.s, 16) + 20;
}

}  // namespace smallmm
