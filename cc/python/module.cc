// pybind11 module: the kernel core on numpy arrays, without TensorFlow. Used by the
// kernel tests (every tile size, strides of 0 through np.broadcast_to views) and by
// micro-benchmarks that want no TF overhead. numpy strides are passed through as-is.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cc/engine/execute.h"
#include "cc/engine/smallmm.h"
#include "cc/python/numpy_plan.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

using smallmm_py::PlanFor;
using smallmm_py::Planned;

// With reduction_parts > 1, the plans whose partial sums matmul adds: the product's
// outermost reduction loop split into that many parts, and a tail where they do not
// divide it (the TF op's parallel-reduction path, made testable).
smallmm::ReductionParts PartsToRun(const smallmm::GemmPlan& plan, int reduction_parts) {
  if (plan.num_red == 0 || plan.num_out >= smallmm::kMaxBatchDims ||
      reduction_parts > plan.red[0].size) {
    throw py::value_error("reduction_parts must be at most the outermost reduction loop's size");
  }
  return smallmm::SplitReduction(plan, reduction_parts);
}

py::array MatMul(const py::array& x, const py::array& y, bool transpose_x, bool conjugate_x,
                 bool transpose_y, bool conjugate_y,
                 std::optional<std::vector<int64_t>> batch_shape, int reduction_parts,
                 int ranges) {
  if (ranges < 1) throw py::value_error("ranges must be at least 1");
  const Planned p = PlanFor(x, y, transpose_x, conjugate_x, transpose_y, conjugate_y, batch_shape);
  const smallmm::DType dtype = p.dtype;
  const smallmm::GemmPlan& plan = p.plan;
  const smallmm::ReductionParts parts =
      reduction_parts > 1 ? PartsToRun(plan, reduction_parts) : smallmm::ReductionParts();
  py::array out(x.dtype(), p.shape);
  const void* pa = x.data();
  const void* pb = y.data();
  void* pc = out.mutable_data();
  bool ran;
  {
    py::gil_scoped_release release;
    if (reduction_parts > 1) {
      std::vector<char> partials(size_t(parts.partials * plan.output_elements) *
                                 smallmm::DTypeSize(dtype));
      ran = smallmm::RunReductionParts(dtype, parts, pa, pb, partials.data(), 0, parts.units);
      if (ran) {
        smallmm::SumPartials(dtype, partials.data(), parts.partials, plan.output_elements, pc, 0,
                             plan.output_elements);
      }
    } else {
      // The outputs in `ranges` consecutive pieces, one after another, as the TF op's
      // threads would run them: each piece starts and ends wherever the split falls.
      ran = true;
      for (int r = 0; r < ranges && ran; ++r) {
        ran = smallmm::RunBatchMatMul(dtype, plan, pa, pb, pc, plan.num_outputs * r / ranges,
                                      plan.num_outputs * (r + 1) / ranges);
      }
    }
  }
  if (!ran) {
    // Only stride-0 views with a huge K get here (see RunBatchMatMul).
    PyErr_Format(PyExc_MemoryError,
                 "smallmm: cannot allocate the packing scratch for M=%lld, N=%lld, K=%lld",
                 (long long)plan.m, (long long)plan.n, (long long)plan.k);
    throw py::error_already_set();
  }
  return out;
}

// Both products of a pair (the TF Pair op: dx and dy of one product) as the engine's executor
// runs them on one thread: fused (smallmm.h FusedPair) where the pair has that form and
// fused pairs are on. ranges > 1 runs a fused pair's outputs in that many consecutive
// pieces, as threads would. Returns (out_1, out_2, whether it ran fused).
py::tuple MatMulPair(const py::array& x1, const py::array& y1, bool transpose_x1, bool transpose_y1,
                     std::optional<std::vector<int64_t>> batch_shape_1, const py::array& x2,
                     const py::array& y2, bool transpose_x2, bool transpose_y2,
                     std::optional<std::vector<int64_t>> batch_shape_2, int ranges) {
  if (ranges < 1) throw py::value_error("ranges must be at least 1");
  // The plans as PlanBatchMatMul makes them: the executor applies the CPU folds itself.
  const Planned p1 = PlanFor(x1, y1, transpose_x1, false, transpose_y1, false, batch_shape_1, false);
  const Planned p2 = PlanFor(x2, y2, transpose_x2, false, transpose_y2, false, batch_shape_2, false);
  if (p1.dtype != p2.dtype) throw py::type_error("smallmm: both products must have one dtype");
  py::array out1(x1.dtype(), p1.shape), out2(x2.dtype(), p2.shape);
  smallmm::Product products[2];
  products[0] = {p1.plan, x1.data(), y1.data(), out1.mutable_data()};
  products[1] = {p2.plan, x2.data(), y2.data(), out2.mutable_data()};
  smallmm::FusedPair pair;
  const bool fused =
      p1.plan.output_elements > 0 && p2.plan.output_elements > 0 && smallmm::FusedPairs() &&
      smallmm::PlanFusedPair(p1.dtype, p1.plan, x1.data(), y1.data(), p2.plan, x2.data(),
                             y2.data(), &pair);
  std::vector<std::vector<char>> scratch;
  smallmm::Executor ex;
  ex.parallel_for = [](int64_t units, int64_t, const smallmm::RangeFn& fn) { fn(0, units); };
  ex.scratch = [&](int64_t bytes) -> void* {
    scratch.emplace_back(size_t(bytes));
    return scratch.back().data();
  };
  bool ok = true;
  {
    py::gil_scoped_release release;
    if (fused && ranges > 1) {
      void* const c[2] = {products[0].c, products[1].c};
      for (int r = 0; r < ranges && ok; ++r) {
        ok = smallmm::RunFusedPair(p1.dtype, pair, c, pair.num_outputs * r / ranges,
                                   pair.num_outputs * (r + 1) / ranges);
      }
    } else {
      // The executor takes no product with an empty output (as the TF op never passes one).
      smallmm::Product run[2];
      int count = 0;
      for (const smallmm::Product& p : products) {
        if (p.plan.output_elements > 0) run[count++] = p;
      }
      ok = count == 0 || smallmm::ExecuteBatchMatMul(p1.dtype, run, count, ex).error ==
                             smallmm::ExecuteStatus::kNone;
    }
  }
  if (!ok) {
    PyErr_NoMemory();
    throw py::error_already_set();
  }
  return py::make_tuple(out1, out2, fused);
}

// How often each of `units` ran under the engine's PoolParallelFor on a stand-in pool:
// its helper tasks run on their own threads, or (late) only after the call returned, as
// on a pool too busy to start them before the caller has done all the work itself.
std::vector<int> PoolParallelForCounts(int64_t units, int64_t cost_per_unit, int threads,
                                       bool late) {
  std::unique_ptr<std::atomic<int>[]> counts(new std::atomic<int>[units]());
  std::vector<std::function<void()>> deferred;
  std::vector<std::thread> helpers;
  {
    py::gil_scoped_release release;
    // Called on this thread only: the pool parallel-for schedules from its caller.
    auto schedule = [&](std::function<void()> task) {
      if (late) {
        deferred.push_back(std::move(task));
      } else {
        helpers.emplace_back(std::move(task));
      }
    };
    smallmm::PoolParallelFor(schedule, threads)(units, cost_per_unit,
                                                [&](int64_t begin, int64_t end) {
                                                  for (int64_t i = begin; i < end; ++i) {
                                                    counts[i].fetch_add(1);
                                                  }
                                                });
    for (auto& task : deferred) task();
    for (auto& t : helpers) t.join();
  }
  std::vector<int> out(units);
  for (int64_t i = 0; i < units; ++i) out[i] = counts[i].load();
  return out;
}

#if defined(__x86_64__)
// Streaming stores of `value` from data + begin (aligned to the vectors) on while a whole
// vector fits before end, in vectors of 16 floats (AVX-512) or 4 (SSE); returns where they
// stopped.
__attribute__((target("avx512f"))) int64_t Stream16(float* data, int64_t begin, int64_t end,
                                                    float value) {
  const __m512 v = _mm512_set1_ps(value);
  for (; begin + 16 <= end; begin += 16) _mm512_stream_ps(data + begin, v);
  return begin;
}
int64_t Stream4(float* data, int64_t begin, int64_t end, float value) {
  const __m128 v = _mm_set1_ps(value);
  for (; begin + 4 <= end; begin += 4) _mm_stream_ps(data + begin, v);
  return begin;
}
#endif

// Writes `value` over all of `out` with non-temporal stores, its elements split over
// `threads` threads: the benchmarks' write probe (tools/sweep.py timed_with_floor), the
// fastest way this machine writes memory it does not read. Normal stores would read every
// line for ownership first; full lines of streaming stores go to memory without that read.
// The widest stores the CPU has: a slower probe would flatter the figures it bounds.
void StreamFill(py::array out, float value, int threads) {
  if (threads < 1) throw py::value_error("threads must be at least 1");
  if (!out.dtype().is(py::dtype::of<float>()) || !out.writeable() ||
      !(out.flags() & py::array::c_style)) {
    throw py::type_error("out must be a writeable C-contiguous float32 array");
  }
  float* data = static_cast<float*>(out.mutable_data());
  const int64_t n = out.size();
  py::gil_scoped_release release;
  auto fill = [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    const bool wide = __builtin_cpu_supports("avx512f");
    // Scalar stores up to the vectors' alignment, vectors, scalar stores for the tail.
    while (begin < end && reinterpret_cast<uintptr_t>(data + begin) % (wide ? 64 : 16) != 0) {
      data[begin++] = value;
    }
    begin = wide ? Stream16(data, begin, end, value) : Stream4(data, begin, end, value);
    _mm_sfence();
#endif
    std::fill(data + begin, data + end, value);
  };
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; ++t)
    helpers.emplace_back(fill, n * t / threads, n * (t + 1) / threads);
  fill(0, n / threads);
  for (auto& t : helpers) t.join();
}

}  // namespace

PYBIND11_MODULE(_smallmm_core, m) {
  m.doc() = "tf_smallmm kernel core on numpy arrays (no TensorFlow).";
  m.def("matmul", &MatMul, py::arg("x"), py::arg("y"), py::arg("transpose_x") = false,
        py::arg("conjugate_x") = false, py::arg("transpose_y") = false,
        py::arg("conjugate_y") = false, py::arg("batch_shape") = py::none(),
        py::arg("reduction_parts") = 1, py::arg("ranges") = 1,
        "op(x) @ op(y) with batch broadcasting; with batch_shape, batch axes missing from "
        "it (or 1 in it) are summed over. Accepts any strides, including 0. ranges > 1 "
        "runs the outputs in that many consecutive pieces, as threads would.");
  m.def(
      "kernel_for",
      [](const py::array& x, const py::array& y, bool transpose_x, bool conjugate_x,
         bool transpose_y, bool conjugate_y, std::optional<std::vector<int64_t>> batch_shape,
         int reduction_parts) {
        const Planned p =
            PlanFor(x, y, transpose_x, conjugate_x, transpose_y, conjugate_y, batch_shape);
        return std::string(smallmm::KernelFor(
            p.dtype, reduction_parts > 1 ? PartsToRun(p.plan, reduction_parts).split : p.plan));
      },
      py::arg("x"), py::arg("y"), py::arg("transpose_x") = false, py::arg("conjugate_x") = false,
      py::arg("transpose_y") = false, py::arg("conjugate_y") = false,
      py::arg("batch_shape") = py::none(), py::arg("reduction_parts") = 1,
      "The kernel family (one of kernel_families) that matmul with these arguments runs "
      "on the active ISA; 'none' when the output is empty.");
  m.def(
      "plan",
      [](const py::array& x, const py::array& y, bool transpose_x, bool conjugate_x,
         bool transpose_y, bool conjugate_y, std::optional<std::vector<int64_t>> batch_shape) {
        const smallmm::GemmPlan p =
            PlanFor(x, y, transpose_x, conjugate_x, transpose_y, conjugate_y, batch_shape).plan;
        py::dict d;
        d["m"] = p.m;
        d["n"] = p.n;
        d["k"] = p.k;
        d["num_outputs"] = p.num_outputs;
        d["num_reduced"] = p.num_reduced;
        return d;
      },
      py::arg("x"), py::arg("y"), py::arg("transpose_x") = false, py::arg("conjugate_x") = false,
      py::arg("transpose_y") = false, py::arg("conjugate_y") = false,
      py::arg("batch_shape") = py::none(),
      "The sizes of the products matmul runs with these arguments after the planner's "
      "folds: M, N, K of each product, the number of output matrices and of products "
      "summed into each.");
  m.def("matmul_pair", &MatMulPair, py::arg("x1"), py::arg("y1"), py::arg("transpose_x1") = false,
        py::arg("transpose_y1") = false, py::arg("batch_shape_1") = py::none(), py::arg("x2"),
        py::arg("y2"), py::arg("transpose_x2") = false, py::arg("transpose_y2") = false,
        py::arg("batch_shape_2") = py::none(), py::arg("ranges") = 1,
        "Both products of a gradient pair, as the TF Pair op runs them (on this thread): "
        "(op(x1) @ op(y1), op(x2) @ op(y2), fused), each summed to its batch_shape as "
        "matmul's; fused says whether they ran as one fused pass over their shared operand.");
  m.def("suggest_reduction_split",
        [](const py::array& x, const py::array& y, std::vector<int64_t> batch_shape, int threads) {
          const Planned p = PlanFor(x, y, false, false, false, false, batch_shape);
          return smallmm::SuggestReductionSplit(p.dtype, p.plan, threads);
        });
  m.def("pool_parallel_for", &PoolParallelForCounts, py::arg("units"), py::arg("cost_per_unit"),
        py::arg("threads"), py::arg("late") = false,
        "How often each unit ran under the engine's parallel-for over a task pool (the XLA "
        "custom calls' threading); late: the pool starts its tasks only after the call.");
  m.def("stream_fill", &StreamFill, py::arg("out"), py::arg("value"), py::arg("threads"),
        "Write value over all of out (a C-contiguous float32 array) with non-temporal "
        "stores on that many threads: the benchmarks' probe of write bandwidth.");
  m.def("active_isa", &smallmm::ActiveIsa);
  m.def("compiled_isas", &smallmm::CompiledIsas);
  m.def("set_isa", &smallmm::SetIsa, py::arg("name"));
  m.def("set_output_staging", &smallmm::SetOutputStaging, py::arg("on"),
        "Stage large outputs to stream them (the default) or not: for A/B timing and tests.");
  m.def("set_fused_pairs", &smallmm::SetFusedPairs, py::arg("on"),
        "Whether gradient pairs of the fused form run fused (on by default): for A/B timing.");
  m.def("set_reduction_items", &smallmm::SetReductionItems, py::arg("on"),
        "Whether a sum over one reduction loop runs as its items, summed block by block in "
        "cache, where a faster family than the packed kernels takes them (on by default): "
        "for A/B timing, and for references that need the packed kernels' running sum.");
  m.def("set_one_strip_runs", &smallmm::SetOneStripRuns, py::arg("on"),
        "Run products whose output rows fit one to four strips straight through (the "
        "default) or through the strip layers: for A/B timing and tests.");
  m.def("set_run_prefetch", &smallmm::SetRunPrefetch, py::arg("on"),
        "Prefetch along runs of products by software (the default) or not: for A/B timing.");
  m.def("set_bf16_dot", &smallmm::SetBf16Dot, py::arg("on"),
        "Run bfloat16 products on the CPU's bfloat16 instructions (AVX512-BF16; the "
        "default where the CPU has them): the dot product in the stationary row kernel and "
        "the packed family, the conversion to bfloat16 everywhere; or widened to float32 and "
        "rounded with integer operations: for A/B timing and tests. Returns the setting now "
        "in force (False without the extension).");
  m.def("bf16_dot", &smallmm::Bf16Dot,
        "Whether bfloat16 products run on the CPU's bfloat16 instructions (with the AVX-512 "
        "kernels).");
  py::tuple dtype_names(smallmm::kNumDTypes);
  for (int i = 0; i < smallmm::kNumDTypes; ++i) {
    dtype_names[i] = smallmm::DTypeName(smallmm::DType(i));
  }
  m.attr("dtype_names") = dtype_names;  // numpy names, in the engine's order
  int num_families = 0;
  const char* const* families = smallmm::KernelFamilies(&num_families);
  py::tuple kernel_families(num_families);
  for (int i = 0; i < num_families; ++i) kernel_families[i] = families[i];
  m.attr("kernel_families") = kernel_families;  // in the order the engine tries them
  m.attr("max_batch_dims") = smallmm::kMaxBatchDims;
  m.attr("max_folded_rows") = smallmm::kMaxFoldedRows;
  m.attr("max_folded_columns") = smallmm::kMaxFoldedColumns;
  m.attr("tile_sizes") =
      std::vector<int>(std::begin(smallmm::kTileSizes), std::end(smallmm::kTileSizes));
}
