// pybind11 module: the kernel core on numpy arrays, without TensorFlow. Used by the
// kernel tests (every tile size, strides of 0 through np.broadcast_to views) and by
// micro-benchmarks that want no TF overhead. numpy strides are passed through as-is.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "cc/engine/smallmm.h"
#include "cuda/smallmm_gpu_sim.h"

namespace py = pybind11;

namespace {

smallmm::DType CoreDType(const py::dtype& dt) {
  const std::string name = py::str(dt.attr("name"));
  if (name == "float16") return smallmm::DType::kHalf;
  if (name == "bfloat16") return smallmm::DType::kBFloat16;
  if (name == "float32") return smallmm::DType::kFloat;
  if (name == "float64") return smallmm::DType::kDouble;
  if (name == "complex64") return smallmm::DType::kComplex64;
  if (name == "complex128") return smallmm::DType::kComplex128;
  throw py::type_error("smallmm: unsupported dtype " + name);
}

struct Layout {
  std::vector<int64_t> dims, strides;
};

Layout LayoutOf(const py::array& x, const char* name) {
  // The kernels read elements in native byte order through typed pointers: a byte-swapped
  // array would be read as garbage and a misaligned one is undefined behaviour.
  if (!x.dtype().attr("isnative").cast<bool>()) {
    throw py::type_error(std::string("smallmm: ") + name + " has non-native byte order (" +
                         std::string(py::str(x.dtype())) +
                         "); convert it with .astype(dtype.newbyteorder('='))");
  }
  if (!(x.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    throw py::value_error(std::string("smallmm: ") + name +
                          " is not aligned for its dtype; copy it with np.require(" + name +
                          ", requirements='A')");
  }
  Layout l;
  for (py::ssize_t i = 0; i < x.ndim(); ++i) {
    if (x.strides(i) % py::ssize_t(x.itemsize()) != 0) {
      throw py::value_error(std::string(name) + ": strides must be multiples of the itemsize");
    }
    l.dims.push_back(x.shape(i));
    l.strides.push_back(x.strides(i) / py::ssize_t(x.itemsize()));
  }
  return l;
}

// What both entry points share: dtype check, numpy layouts, and the engine's plan.
struct Planned {
  smallmm::DType dtype;
  Layout lx, ly;
  smallmm::GemmPlan plan;
  std::vector<py::ssize_t> shape;  // the output's
};

Planned PlanFor(const py::array& x, const py::array& y, bool transpose_x, bool conjugate_x,
                bool transpose_y, bool conjugate_y,
                const std::optional<std::vector<int64_t>>& batch_shape) {
  if (!x.dtype().equal(y.dtype())) {
    throw py::type_error("smallmm: x and y must have the same dtype, got " +
                         std::string(py::str(x.dtype())) + " and " +
                         std::string(py::str(y.dtype())));
  }
  Planned r;
  r.dtype = CoreDType(x.dtype());
  r.lx = LayoutOf(x, "x");
  r.ly = LayoutOf(y, "y");
  smallmm::Operand a{int(r.lx.dims.size()), r.lx.dims.data(), r.lx.strides.data(), transpose_x,
                     conjugate_x};
  smallmm::Operand b{int(r.ly.dims.size()), r.ly.dims.data(), r.ly.strides.data(), transpose_y,
                     conjugate_y};
  int out_rank = 0;
  int64_t out_dims[smallmm::kMaxBatchDims + 2];
  std::string error;
  if (!smallmm::PlanBatchMatMul(a, b, batch_shape ? batch_shape->data() : nullptr,
                                batch_shape ? int(batch_shape->size()) : -1, &r.plan, &out_rank,
                                out_dims, &error)) {
    throw py::value_error(error);
  }
  r.shape.assign(out_dims, out_dims + out_rank);
  return r;
}

py::array MatMul(const py::array& x, const py::array& y, bool transpose_x, bool conjugate_x,
                 bool transpose_y, bool conjugate_y,
                 std::optional<std::vector<int64_t>> batch_shape, int reduction_parts) {
  const Planned p = PlanFor(x, y, transpose_x, conjugate_x, transpose_y, conjugate_y,
                            batch_shape);
  const smallmm::DType dtype = p.dtype;
  const smallmm::GemmPlan& plan = p.plan;
  const std::vector<py::ssize_t>& shape = p.shape;
  py::array out(x.dtype(), shape);
  const void* pa = x.data();
  const void* pb = y.data();
  void* pc = out.mutable_data();
  if (reduction_parts > 1 &&
      (plan.num_red == 0 || plan.num_out >= smallmm::kMaxBatchDims ||
       plan.red[0].size % reduction_parts != 0)) {
    throw py::value_error("reduction_parts must divide the outermost reduction loop");
  }
  bool ran;
  {
    py::gil_scoped_release release;
    if (reduction_parts > 1) {  // the TF op's parallel-reduction path, made testable
      const smallmm::GemmPlan split = smallmm::SplitReduction(plan, reduction_parts);
      std::vector<char> partials(size_t(split.output_elements) * smallmm::DTypeSize(dtype));
      ran = smallmm::RunBatchMatMul(dtype, split, pa, pb, partials.data(), 0,
                                    split.num_outputs);
      if (ran) {
        smallmm::SumPartials(dtype, partials.data(), reduction_parts, plan.output_elements,
                             pc, 0, plan.output_elements);
      }
    } else {
      ran = smallmm::RunBatchMatMul(dtype, plan, pa, pb, pc, 0, plan.num_outputs);
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

// Element-index range [lo, hi] a view may address (lo > hi when it has no elements).
void IndexRange(const Layout& l, int64_t* lo, int64_t* hi) {
  *lo = 0;
  *hi = 0;
  for (size_t i = 0; i < l.dims.size(); ++i) {
    if (l.dims[i] == 0) {
      *lo = 0;
      *hi = -1;
      return;
    }
    const int64_t span = (l.dims[i] - 1) * l.strides[i];
    (span < 0 ? *lo : *hi) += span;
  }
}

// The GPU kernels' block program run on the host over a simulated grid (see
// cuda/smallmm_gpu_sim.h): same arguments as MatMul plus the launch shape. Returns the
// output and what the launch did.
py::tuple SimulateGpuMatMul(const py::array& x, const py::array& y, bool transpose_x,
                            bool conjugate_x, bool transpose_y, bool conjugate_y,
                            std::optional<std::vector<int64_t>> batch_shape, int block,
                            int smem_budget, int64_t max_blocks) {
  const Planned p = PlanFor(x, y, transpose_x, conjugate_x, transpose_y, conjugate_y,
                            batch_shape);
  const smallmm::DType dtype = p.dtype;
  const smallmm::GemmPlan& plan = p.plan;
  const Layout& lx = p.lx;
  const Layout& ly = p.ly;
  const std::vector<py::ssize_t>& shape = p.shape;
  py::array out(x.dtype(), shape);
  smallmm::gpu::SimOptions opt;
  opt.threads = block;
  opt.smem_budget = smem_budget;
  opt.max_blocks = max_blocks;
  IndexRange(lx, &opt.a_lo, &opt.a_hi);
  IndexRange(ly, &opt.b_lo, &opt.b_hi);
  smallmm::gpu::SimStats st;
  try {
    st = smallmm::gpu::SimulateBatchMatMul(dtype, plan, x.data(), y.data(), out.mutable_data(),
                                           opt);
  } catch (const smallmm::gpu::SimError& e) {
    throw std::runtime_error(e.what());
  }
  const smallmm::gpu::LaunchConfig& c = st.cfg;
  py::dict info;
  info["blocks"] = c.blocks;
  info["threads"] = c.threads;
  info["items"] = c.items;
  info["items_per_block"] = c.items_per_block;
  info["tile"] = py::make_tuple(c.bm, c.bn);
  info["tiles"] = py::make_tuple(c.tiles_m, c.tiles_n);
  info["group"] = c.group;
  info["span"] = c.span;
  info["kc"] = c.kc;
  info["kl"] = c.kl;
  info["nrc"] = c.nrc;
  info["chunks"] = c.r_chunks * c.l_chunks;
  info["a_shared"] = c.a_shared;
  info["b_shared"] = c.b_shared;
  info["smem_bytes"] = c.smem_bytes;
  info["barriers"] = st.barriers;
  info["a_stages"] = st.a_stages;
  info["a_reused"] = st.a_reused;
  info["b_stages"] = st.b_stages;
  info["b_reused"] = st.b_reused;
  return py::make_tuple(out, info);
}

}  // namespace

PYBIND11_MODULE(_smallmm_core, m) {
  m.doc() = "tf_smallmm kernel core on numpy arrays (no TensorFlow).";
  m.def("matmul", &MatMul, py::arg("x"), py::arg("y"), py::arg("transpose_x") = false,
        py::arg("conjugate_x") = false, py::arg("transpose_y") = false,
        py::arg("conjugate_y") = false, py::arg("batch_shape") = py::none(),
        py::arg("reduction_parts") = 1,
        "op(x) @ op(y) with batch broadcasting; with batch_shape, batch axes missing from "
        "it (or 1 in it) are summed over. Accepts any strides, including 0.");
  m.def("simulate_gpu_matmul", &SimulateGpuMatMul, py::arg("x"), py::arg("y"),
        py::arg("transpose_x") = false, py::arg("conjugate_x") = false,
        py::arg("transpose_y") = false, py::arg("conjugate_y") = false,
        py::arg("batch_shape") = py::none(), py::arg("block") = smallmm::gpu::kThreads,
        py::arg("smem_budget") = smallmm::gpu::kSmemBudget,
        py::arg("max_blocks") = smallmm::gpu::SimOptions().max_blocks,
        "matmul computed by the GPU kernels' block program on the host over a simulated "
        "grid of `block` threads per block (at most `max_blocks` blocks, `smem_budget` "
        "bytes of shared memory each), checking shared- and global-memory accesses. "
        "Returns (output, launch info). For tests on machines without a GPU.");
  m.def("suggest_reduction_split", [](const py::array& x, const py::array& y,
                                      std::vector<int64_t> batch_shape, int threads) {
    const Planned p = PlanFor(x, y, false, false, false, false, batch_shape);
    return smallmm::SuggestReductionSplit(p.dtype, p.plan, threads);
  });
  m.def("active_isa", &smallmm::ActiveIsa);
  m.def("compiled_isas", &smallmm::CompiledIsas);
  m.def("set_isa", &smallmm::SetIsa, py::arg("name"));
  m.attr("max_batch_dims") = smallmm::kMaxBatchDims;
  m.attr("tile_sizes") = std::vector<int>(std::begin(smallmm::kTileSizes),
                                          std::end(smallmm::kTileSizes));
}
