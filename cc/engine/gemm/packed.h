// packed.h — the "packed" kernel family, the generic one that implements every plan:
// operands packed into tiles, micro-kernels (micro.h) over every pair of tiles, reduction
// loops summed in the accumulators. Included only by gemm_isa.cc (compiled once per ISA and dtype):
// everything has internal linkage, see README.md.
//
// Algorithm, for each output matrix C[o] (see smallmm.h for the terminology):
//   for each reduction item r:
//     pack op(A[o, r]) into M-tiles [tile][k][MT] and op(B[o, r]) into N-tiles
//     [tile][k][NT] in the accumulation type (conjugate and fp16 -> fp32 applied here,
//     zero-padded to whole tiles), skipping the pack when the operand is the same
//     matrix as last time (a broadcast operand is packed once and stays in L1);
//     for each (M-tile, N-tile): acc += micro-kernel(packed A tile, packed B tile)
//   store acc to C[o] (fp32 -> fp16 rounding applied here).
// float and double operands whose tiles fill exactly are read in place instead of packed,
// and full output tiles go straight to C.
#ifndef TF_SMALLMM_CC_ENGINE_GEMM_PACKED_H_
#define TF_SMALLMM_CC_ENGINE_GEMM_PACKED_H_

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cc/engine/gemm/bf16dot.h"
#include "cc/engine/gemm/common.h"
#include "cc/engine/gemm/micro.h"
#include "cc/engine/gemm/streaming.h"

namespace smallmm {
namespace {

// The widest tile whose broadcast (scalar) side is read in place when that side's lines
// are far apart: one pointer per accumulator must stay in a register. 4d29bbe (2026-11-25).
// Timed 2026-12-01 (../README.md, one thread): without the cap (16-wide tiles) the capsule
// du = Wᵀ·dû takes 1.59× as long.
constexpr int kFarScalarTile = 4;

// a * b + c for scratch sizes; false on int64 overflow.
inline bool MulAdd(int64_t a, int64_t b, int64_t c, int64_t* out) {
  int64_t ab;
  return !__builtin_mul_overflow(a, b, &ab) && !__builtin_add_overflow(ab, c, out);
}

// ---------------------------------------------------------------- packing
// Runs f(std::integral_constant<int, W>()) where a tile of w rows is one AVX-512 vector of
// accumulation scalars R (8 of them, or 16 floats), and returns whether it did: the
// panel's vector paths below.
template <typename R, typename F>
bool OnOneVectorTile(int64_t w, F&& f) {
  if (kVecBytes != 64) return false;
  if (w == 16 && sizeof(R) == 4) {
    f(std::integral_constant<int, 16>());
  } else if (w == 8) {
    f(std::integral_constant<int, 8>());
  } else {
    return false;
  }
  return true;
}

// Packs op(X) restricted to a [rows × k] panel (rows = M for A, N for B; for B the
// roles of the strides are swapped by the caller) into tiles [tile][l][width] (+ imag
// plane per tile). Every tile is `tile` wide except the last, which is `edge` wide (the
// smallest tile size that holds the remaining rows), zero-padded.
template <DType D>
void PackPanel(const void* x, int64_t off, int64_t rows, int64_t k, int64_t row_stride,
               int64_t k_stride, bool conj, int tile, int edge, typename Traits<D>::R* out) {
  using T = Traits<D>;
  using R = typename T::R;
  constexpr int kPlanes = T::kComplex ? 2 : 1;
  constexpr int kElem = T::kComplex ? 2 : 1;  // storage scalars per element
  const int64_t ntiles = (rows + tile - 1) / tile;
  const R sign = conj ? R(-1) : R(1);
  // Walk memory in its own order (the smaller stride innermost): a folded batch axis can
  // make one of the strides huge, and crossing a page per element thrashes the TLB.
  const bool rows_inner = !(k_stride >= 0 && row_stride >= 0 && k_stride < row_stride);
  for (int64_t t = 0; t < ntiles; ++t) {
    R* dst = out + t * kPlanes * k * tile;
    const int64_t r0 = t * tile;
    const int64_t w = t == ntiles - 1 ? edge : tile;
    const int64_t valid = rows - r0 < w ? rows - r0 : w;
    auto put = [&](int64_t i, int64_t l) {
      const int64_t idx = kElem * (off + (r0 + i) * row_stride + l * k_stride);
      dst[l * w + i] = T::Load(x, idx);
      if constexpr (T::kComplex) dst[k * w + l * w + i] = sign * T::Load(x, idx + 1);
    };
    if constexpr (!T::kComplex) {
      // Rows contiguous (a transposed A: the input gradient Wᴴ·g of a shared weight): each K
      // step's rows are one vector load, widened for the 16-bit types, with zero lanes past
      // the valid rows (AVX-512 masks; AVX2 moves a partial vector through the stack, which
      // lost to the scalar loop). Element by element, float16 took 5× float32's time here.
      if (row_stride == 1 && OnOneVectorTile<R>(w, [&](auto width) {
            constexpr int W = decltype(width)::value;
            const StorageOf<D>* src = static_cast<const StorageOf<D>*>(x) + off + r0;
            for (int64_t l = 0; l < k; ++l)
              StoreVec(dst + l * W, LoadLanes<D, W>(src + l * k_stride, int(valid)));
          })) {
        continue;
      }
      // K contiguous: a tile of 8 or 16 rows is transposed in registers (TransposeRows),
      // one vector store per K step instead of a scalar store per element, each a line
      // apart (AVX-512: a tile is one vector). The gradient g·Bᵀ of a batch of [M, 32] ·
      // [32, N] products reduced over the batch packs every g[b] this way (col mode, M
      // along the vectors).
      if (!rows_inner && k_stride == 1 && OnOneVectorTile<R>(w, [&](auto width) {
            constexpr int W = decltype(width)::value;
            const StorageOf<D>* src = static_cast<const StorageOf<D>*>(x) + off + r0 * row_stride;
            for (int64_t c0 = 0; c0 < k; c0 += 8) {
              const int n = k - c0 < 8 ? int(k - c0) : 8;
              AccVec<D, W> v[8];
              TransposeRows<D, W>(src, row_stride, int(valid), c0, n, v);
              for (int c = 0; c < n; ++c) StoreVec(dst + (c0 + c) * W, v[c]);
            }
          })) {
        continue;
      }
    }
    if (rows_inner) {
      for (int64_t l = 0; l < k; ++l)
        for (int64_t i = 0; i < valid; ++i) put(i, l);
    } else {
      for (int64_t i = 0; i < valid; ++i)
        for (int64_t l = 0; l < k; ++l) put(i, l);
    }
    for (int64_t l = 0; l < k; ++l) {
      for (int64_t i = valid; i < w; ++i) {
        dst[l * w + i] = R(0);
        if constexpr (T::kComplex) dst[k * w + l * w + i] = R(0);
      }
    }
  }
}

// Writes the valid rows × cols of an accumulator tile to C, in C's own memory order.
template <DType D>
void StoreTile(const typename Traits<D>::R* t, int mt, int nt, bool col, int64_t rows, int64_t cols,
               void* c, int64_t off, int64_t rs, int64_t cs) {
  using T = Traits<D>;
  const int64_t ti = col ? 1 : nt, tj = col ? mt : 1;
  auto put = [&](int64_t i, int64_t j) {
    const int64_t idx = off + i * rs + j * cs;
    if constexpr (T::kComplex) {
      T::Store(c, 2 * idx, t[i * ti + j * tj]);
      T::Store(c, 2 * idx + 1, t[mt * nt + i * ti + j * tj]);
    } else {
      T::Store(c, idx, t[i * ti + j * tj]);
    }
  };
  if (rs >= 0 && cs >= 0 && rs < cs) {
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = 0; i < rows; ++i) put(i, j);
  } else {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) put(i, j);
  }
}

#if SMALLMM_BF16_DOT
// ---------------------------------------------------------------- bfloat16 dot products
// Output matrices [begin, end) of a bfloat16 plan (RunBatchMatMul's contract) on the CPU's
// bfloat16 dot product (bf16dot.h): as RunPacked below, with pair-word tiles of 8 rows by
// 16 or 32 columns, always packed, and float32 accumulator tiles rounded into C.
inline bool RunPackedPairs(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin,
                           int64_t end) {
  const int64_t pairs = (p.k + 1) / 2;
  const int64_t mtiles = (p.m + kPairTileRows - 1) / kPairTileRows;
  const int64_t ntiles = (p.n + kPairTileCols - 1) / kPairTileCols;
  const int64_t m_edge = p.m - (mtiles - 1) * kPairTileRows;  // rows of the last M tile
  const int64_t n_edge = p.n - (ntiles - 1) * kPairTileCols;
  const int m_edge_w = 1 << PairRowClass(m_edge);
  const int n_edge_w = n_edge <= kPairLanes ? kPairLanes : kPairTileCols;
  auto mw = [&](int64_t ti) { return ti + 1 < mtiles ? kPairTileRows : m_edge_w; };
  auto nw = [&](int64_t tj) { return tj + 1 < ntiles ? kPairTileCols : n_edge_w; };
  const bool reducing = p.num_reduced > 1 && p.k > 0;
  constexpr int64_t kAccTile = kPairTileRows * kPairTileCols;
  // Scratch, overflow-checked as in RunPacked (a stride-0 view can have a huge K).
  int64_t a_words, b_words, acc_elems, words;
  if (!MulAdd(mtiles * kPairTileRows, pairs, 0, &a_words) ||
      !MulAdd(ntiles * kPairTileCols, pairs, 0, &b_words) ||
      !MulAdd(reducing ? mtiles * ntiles : 1, kAccTile, 0, &acc_elems) ||
      __builtin_add_overflow(a_words, b_words, &words) ||
      __builtin_add_overflow(words, acc_elems, &words) || uint64_t(words) > SIZE_MAX / 4 - 16) {
    return false;
  }
  void* scratch = malloc(4 * size_t(words) + 64);  // 4-byte words, 64-aligned
  if (scratch == nullptr) return false;
  float* acc =
      reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
  uint32_t* ap = reinterpret_cast<uint32_t*>(acc + acc_elems);
  uint32_t* bp = ap + a_words;
  const uint16_t* a16 = static_cast<const uint16_t*>(a);
  const uint16_t* b16 = static_cast<const uint16_t*>(b);
  int64_t packed_a = -1, packed_b = -1;  // a broadcast operand is packed once
  auto pack = [&](int64_t ao, int64_t bo) {
    if (ao != packed_a) {
      for (int64_t ti = 0; ti < mtiles; ++ti) {
        PackPairs(a16, ao, p.m, p.k, p.a_rs, p.a_cs, ti * kPairTileRows, mw(ti),
                  ap + ti * kPairTileRows * pairs);
      }
      packed_a = ao;
    }
    if (bo != packed_b) {
      for (int64_t tj = 0; tj < ntiles; ++tj) {
        PackPairs(b16, bo, p.n, p.k, p.b_cs, p.b_rs, tj * kPairTileCols, nw(tj),
                  bp + tj * kPairTileCols * pairs);
      }
      packed_b = bo;
    }
  };
  auto micro = [&](int64_t ti, int64_t tj, float* tile, bool accumulate) {
    const int mi = ti + 1 < mtiles ? 3 : PairRowClass(m_edge);
    const int si = nw(tj) == kPairTileCols ? 1 : 0;
    kPairMicros[mi][si](pairs, ap + ti * kPairTileRows * pairs, bp + tj * kPairTileCols * pairs,
                        tile, accumulate);
  };
  auto store = [&](const float* tile, int64_t ti, int64_t tj, int64_t c_off) {
    const int64_t rows =
        p.m - ti * kPairTileRows < kPairTileRows ? p.m - ti * kPairTileRows : kPairTileRows;
    const int64_t cols =
        p.n - tj * kPairTileCols < kPairTileCols ? p.n - tj * kPairTileCols : kPairTileCols;
    StoreTile<DType::kBFloat16>(tile, mw(ti), nw(tj), false, rows, cols, c,
                                c_off + ti * kPairTileRows * p.c_rs + tj * kPairTileCols * p.c_cs,
                                p.c_rs, p.c_cs);
  };
  NestCursor out;
  out.Seek(p.out, p.num_out, begin);
  NestCursor red;
  for (int64_t o = begin; o < end; ++o, out.Next()) {
    if (!reducing) {
      const bool empty = p.num_reduced == 0 || p.k == 0;  // an empty sum gives zeros
      if (!empty) pack(out.a, out.b);
      for (int64_t ti = 0; ti < mtiles; ++ti) {
        for (int64_t tj = 0; tj < ntiles; ++tj) {
          if (empty) {
            for (int64_t x = 0; x < kAccTile; ++x) acc[x] = 0.0f;
          } else {
            micro(ti, tj, acc, false);
          }
          store(acc, ti, tj, out.c);
        }
      }
      continue;
    }
    red.Seek(p.red, p.num_red, 0);
    for (int64_t r = 0; r < p.num_reduced; ++r, red.Next()) {
      pack(out.a + red.a, out.b + red.b);
      for (int64_t ti = 0; ti < mtiles; ++ti)
        for (int64_t tj = 0; tj < ntiles; ++tj)
          micro(ti, tj, acc + (ti * ntiles + tj) * kAccTile, r > 0);
    }
    for (int64_t ti = 0; ti < mtiles; ++ti)
      for (int64_t tj = 0; tj < ntiles; ++tj)
        store(acc + (ti * ntiles + tj) * kAccTile, ti, tj, out.c);
  }
  free(scratch);
  return true;
}

#endif  // SMALLMM_BF16_DOT

// ---------------------------------------------------------------- the family
template <DType D>
bool CanPacked(const GemmPlan&) {
  return true;
}

// Output matrices [begin, end) of the plan (RunBatchMatMul's contract; called by Run in
// gemm_isa.cc with a non-empty range and M, N >= 1).
template <DType D>
bool RunPacked(const GemmPlan& p, const void* a, const void* b, void* c, int64_t begin,
               int64_t end) {
#if SMALLMM_BF16_DOT
  if constexpr (D == DType::kBFloat16) return RunPackedPairs(p, a, b, c, begin, end);
#endif
  using T = Traits<D>;
  using R = typename T::R;
  constexpr bool kC = T::kComplex;
  constexpr int kPlanes = kC ? 2 : 1;
  // Tiles: whole mt×nt tiles, and along each side a last "edge" tile of the smallest
  // tile size that holds the rest (M = 20 is a 16-tile and a 4-tile, not two 16-tiles).
  constexpr bool kInPlace = kPlainReal<D>;
  int mi = TileClass(p.m), ni = TileClass(p.n);
  // The direction, chosen once: the caps below may leave the sides' lengths in the other
  // order.
  const bool col = ColumnMode(kTileSizes[mi], kTileSizes[ni], p.c_rs, p.c_cs);
  {
    // A tile's vector side is one register and its other side at most 16 lines of
    // accumulators (8 in AVX2's and SSE's 16 registers), complex half that (two planes a
    // line). GCC lowers wider vector types (16 doubles with AVX-512, more than 8 floats
    // with AVX2) through the stack: broadcasts and accumulators stored and reloaded at
    // every K step.
    int& vec_side = col ? mi : ni;
    int& line_side = col ? ni : mi;
    const int lines = TileClass((kVecBytes == 64 ? 16 : 8) / kPlanes);
    if (line_side > lines) line_side = lines;
    // Complex tiles of up to 4 lines (3 without AVX-512) take two registers a line
    // (MicroComplex splits them): complex128 W[1838, 32, 32]ᴴ · g[1, 1838, 32, 1] (one
    // line) 1.3× faster than one register a line.
    const int regs = kC && kTileSizes[line_side] <= (kVecBytes == 64 ? 4 : 3) ? 2 : 1;
    const int lanes = TileClass(regs * kVecBytes / int(sizeof(R)));
    if (vec_side > lanes) vec_side = lanes;
  }
  if (kInPlace && !kC) {
    // A broadcast (scalar) side read in place takes one pointer per accumulator; when
    // its lines are pages apart (a batch folded into N or M: the capsule's du = Wᵀ·dû
    // reads 50 columns of dû 737 KB apart) 16 pointers do not fit in registers and the
    // kernel spills every step. Four (kFarScalarTile) do.
    const int cap = TileClass(kFarScalarTile);
    if (col && !NearStride(p.b_cs) && NearStride(p.b_rs) && ni > cap) ni = cap;
    if (!col && !NearStride(p.a_rs) && NearStride(p.a_cs) && mi > cap) mi = cap;
  }
  const int mt = kTileSizes[mi], nt = kTileSizes[ni];
  const int64_t mtiles = (p.m + mt - 1) / mt, ntiles = (p.n + nt - 1) / nt;
  const int64_t mfull = p.m / mt, nfull = p.n / nt;
  const int mte = p.m % mt ? kTileSizes[TileClass(p.m % mt)] : mt;
  const int nte = p.n % nt ? kTileSizes[TileClass(p.n % nt)] : nt;
  auto mw = [&](int64_t ti) { return ti < mfull ? mt : mte; };
  auto nw = [&](int64_t tj) { return tj < nfull ? nt : nte; };
  // Pack-free paths (float/double): an operand that fills its tiles exactly is read in
  // place when the micro-kernel can (vector side: contiguous lanes); a full output tile is
  // written straight to C when there is nothing to accumulate across.
  // "Whole": every tile, the edge included, is exactly filled (M = 20 = 16 + 4 is; 12 is not).
  const bool whole_m = p.m % mt == 0 || mte == p.m % mt;
  const bool whole_n = p.n % nt == 0 || nte == p.n % nt;
  // A K step of a page or more (a batch axis folded into K) makes every step a new,
  // unprefetched line: pack those operands (packing streams them in memory order).
  const bool direct_a = kInPlace && whole_m && (!col || p.a_rs == 1) && NearStride(p.a_cs);
  const bool direct_b = kInPlace && whole_n && (col || p.b_cs == 1) && NearStride(p.b_rs);
  const bool scalar_in_place = col ? direct_b : direct_a;
  // [M edge?][N edge?]
  const MicroFn<R, kC> micros[2][2] = {
      {SelectMicro<R, kC>(mi, ni, col, scalar_in_place),
       SelectMicro<R, kC>(mi, TileClass(nte), col, scalar_in_place)},
      {SelectMicro<R, kC>(TileClass(mte), ni, col, scalar_in_place),
       SelectMicro<R, kC>(TileClass(mte), TileClass(nte), col, scalar_in_place)}};
  auto micro = [&](int64_t ti, int64_t tj, const TileArgs<R>& t, bool accumulate) {
    micros[ti >= mfull][tj >= nfull](p.k, t, accumulate);
  };

  // Scratch: packed A, packed B, accumulators; one allocation per call (a call covers a
  // whole shard). For dense operands (TF tensors) this is bounded by the inputs' own
  // sizes, but a stride-0 view can have a huge K in no memory at all, so the sizes are
  // overflow-checked and a failed allocation is reported, never ignored. Without
  // reduction loops one accumulator tile suffices (each tile is stored as soon as it is
  // done); with them, all tiles accumulate across the reduction.
  const bool reducing = p.num_reduced > 1 && p.k > 0;  // K = 0: zeros, whatever the batch
  const int64_t acc_tile = kPlanes * mt * nt;
  int64_t a_elems, b_elems, acc_elems, total;
  if (!MulAdd(mtiles * mt * kPlanes, p.k, 0, &a_elems) ||
      !MulAdd(ntiles * nt * kPlanes, p.k, 0, &b_elems) ||
      !MulAdd(reducing ? mtiles * ntiles : 1, acc_tile, 1, &acc_elems) ||
      __builtin_add_overflow(a_elems, b_elems, &total) ||
      __builtin_add_overflow(total, acc_elems, &total) || uint64_t(total) > SIZE_MAX / sizeof(R)) {
    return false;
  }
  --acc_elems;  // the +1 above keeps the allocation non-empty
  R* scratch = static_cast<R*>(malloc(sizeof(R) * size_t(total)));
  if (scratch == nullptr) return false;
  R* ap = scratch;
  R* bp = ap + a_elems;
  R* acc = bp + b_elems;

  const int64_t a_tile = kPlanes * p.k * mt, b_tile = kPlanes * p.k * nt;
  const bool direct_c = kInPlace && !reducing && (col ? p.c_rs == 1 : p.c_cs == 1);
  // An output far larger than the last-level cache is evicted before anyone reads it:
  // write it with non-temporal stores (saves the read-for-ownership of every line).
  const bool stream_c = direct_c && StreamOutput(uint64_t(p.output_elements) * sizeof(R),
                                                 (col ? p.c_cs : p.c_rs) * int64_t(sizeof(R)));
  const R* a_mem = static_cast<const R*>(a);
  const R* b_mem = static_cast<const R*>(b);
  R* c_mem = static_cast<R*>(c);
  // Remember which matrices are packed: a broadcast operand is packed once.
  int64_t packed_a = -1, packed_b = -1;
  auto pack = [&](int64_t ao, int64_t bo) {
    if (!direct_a && ao != packed_a) {
      PackPanel<D>(a, ao, p.m, p.k, p.a_rs, p.a_cs, p.conj_a, mt, mte, ap);
      packed_a = ao;
    }
    if (!direct_b && bo != packed_b) {
      PackPanel<D>(b, bo, p.n, p.k, p.b_cs, p.b_rs, p.conj_b, nt, nte, bp);
      packed_b = bo;
    }
  };
  // The views of tile (ti, tj) for operands at offsets ao, bo, accumulating into `tile`.
  auto args = [&](int64_t ti, int64_t tj, int64_t ao, int64_t bo, R* tile) {
    TileArgs<R> t;
    if (direct_a) {
      t.a = a_mem + ao + ti * mt * p.a_rs;
      t.a_ls = p.a_cs;
      t.a_is = p.a_rs;
    } else {
      t.a = ap + ti * a_tile;
      t.a_ls = mw(ti);
      t.a_is = 1;
    }
    if (direct_b) {
      t.b = b_mem + bo + tj * nt * p.b_cs;
      t.b_ls = p.b_rs;
      t.b_js = p.b_cs;
    } else {
      t.b = bp + tj * b_tile;
      t.b_ls = nw(tj);
      t.b_js = 1;
    }
    t.out = tile;
    t.stream = false;
    t.o_is = col ? 1 : nw(tj);
    t.o_js = col ? mw(ti) : 1;
    return t;
  };
  auto store = [&](const R* t, int64_t ti, int64_t tj, int64_t c_off) {
    const int64_t rows = p.m - ti * mt < mt ? p.m - ti * mt : mt;
    const int64_t cols = p.n - tj * nt < nt ? p.n - tj * nt : nt;
    StoreTile<D>(t, mw(ti), nw(tj), col, rows, cols, c, c_off + ti * mt * p.c_rs + tj * nt * p.c_cs,
                 p.c_rs, p.c_cs);
  };

  // The next product's operands, to prefetch (see PrefetchPanel).
  auto prefetch = [&](int64_t ao, int64_t bo) {
    PrefetchPanel<D>(a, ao, p.m, p.k, p.a_rs, p.a_cs);
    PrefetchPanel<D>(b, bo, p.n, p.k, p.b_cs, p.b_rs);
  };
  NestCursor out;
  out.Seek(p.out, p.num_out, begin);
  NestCursor red;
  for (int64_t o = begin; o < end; ++o, out.Next()) {
    if (!reducing && o + 1 < end) {
      NestCursor next = out;
      next.Next();
      prefetch(next.a, next.b);
    }
    if (!reducing) {
      // One product per output (num_reduced is 1, or 0: an empty sum gives zeros).
      const bool empty = p.num_reduced == 0 || p.k == 0;
      if (!empty) pack(out.a, out.b);  // size-1 reduction loops were simplified away
      for (int64_t ti = 0; ti < mtiles; ++ti) {
        for (int64_t tj = 0; tj < ntiles; ++tj) {
          if (empty) {
            for (int64_t x = 0; x < acc_tile; ++x) acc[x] = R(0);
            store(acc, ti, tj, out.c);
            continue;
          }
          TileArgs<R> t = args(ti, tj, out.a, out.b, acc);
          // Exactly filled (whole tile, or an edge tile of exactly the remaining size).
          const bool full = ti * mt + mw(ti) <= p.m && tj * nt + nw(tj) <= p.n;
          if (direct_c && full) {
            t.out = c_mem + out.c + ti * mt * p.c_rs + tj * nt * p.c_cs;
            t.o_is = p.c_rs;
            t.o_js = p.c_cs;
            t.stream = stream_c;
            micro(ti, tj, t, false);
          } else {
            micro(ti, tj, t, false);
            store(acc, ti, tj, out.c);
          }
        }
      }
      continue;
    }
    red.Seek(p.red, p.num_red, 0);
    for (int64_t r = 0; r < p.num_reduced; ++r, red.Next()) {
      const int64_t ao = out.a + red.a, bo = out.b + red.b;
      if (r + 1 < p.num_reduced) {
        NestCursor next = red;
        next.Next();
        prefetch(out.a + next.a, out.b + next.b);
      }
      pack(ao, bo);
      for (int64_t ti = 0; ti < mtiles; ++ti)
        for (int64_t tj = 0; tj < ntiles; ++tj)
          micro(ti, tj, args(ti, tj, ao, bo, acc + (ti * ntiles + tj) * acc_tile), r > 0);
    }
    for (int64_t ti = 0; ti < mtiles; ++ti)
      for (int64_t tj = 0; tj < ntiles; ++tj)
        store(acc + (ti * ntiles + tj) * acc_tile, ti, tj, out.c);
  }
  if (stream_c) StreamFence();
  free(scratch);
  return true;
}

}  // namespace
}  // namespace smallmm

#endif  // TF_SMALLMM_CC_ENGINE_GEMM_PACKED_H_
