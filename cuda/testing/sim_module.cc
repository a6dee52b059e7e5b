// pybind11 module tf_smallmm._smallmm_gpu_sim: the GPU kernels' block program run on the
// host over a simulated grid (smallmm_gpu_sim.h), for tests on machines without a GPU
// (tests/test_gpu_simulation.py). Host-only C++: no CUDA header, no TensorFlow. Takes the
// same arrays and flags as _smallmm_core.matmul (cc/python/numpy_plan.h plans both).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <vector>

#include "cc/engine/smallmm.h"
#include "cc/python/numpy_plan.h"
#include "cuda/testing/smallmm_gpu_sim.h"

namespace py = pybind11;

namespace {

using smallmm_py::Layout;
using smallmm_py::PlanFor;
using smallmm_py::Planned;

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

// Same arguments as _smallmm_core.matmul plus the launch shape. Returns the output and
// what the launch did.
py::tuple SimulateGpuMatMul(const py::array& x, const py::array& y, bool transpose_x,
                            bool conjugate_x, bool transpose_y, bool conjugate_y,
                            std::optional<std::vector<int64_t>> batch_shape, int block,
                            int smem_budget, int64_t max_blocks) {
  const Planned p = PlanFor(x, y, transpose_x, conjugate_x, transpose_y, conjugate_y, batch_shape);
  py::array out(x.dtype(), p.shape);
  smallmm::gpu::SimOptions opt;
  opt.threads = block;
  opt.smem_budget = smem_budget;
  opt.max_blocks = max_blocks;
  IndexRange(p.lx, &opt.a_lo, &opt.a_hi);
  IndexRange(p.ly, &opt.b_lo, &opt.b_hi);
  smallmm::gpu::SimStats st;
  try {
    st = smallmm::gpu::SimulateBatchMatMul(p.dtype, p.plan, x.data(), y.data(), out.mutable_data(),
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

PYBIND11_MODULE(_smallmm_gpu_sim, m) {
  m.doc() = "tf_smallmm's GPU block program on the host over a simulated grid (test support).";
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
}
