// pybind11 module tf_smallmm._smallmm_gpu_sim: the GPU kernels' block program run on the
// host over a simulated grid (smallmm_gpu_sim.h), for tests on machines without a GPU
// (tests/test_gpu_simulation.py). Host-only C++: no CUDA header, no TensorFlow. Takes the
// same arrays and flags as _smallmm_core.matmul (cc/python/numpy_plan.h plans both).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cc/engine/routing.h"
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

// The index in kGpuKernels of a variant's name.
int KernelIndex(const std::string& name) {
  for (int i = 0; i < smallmm::gpu::kNumGpuKernels; ++i) {
    if (name == smallmm::gpu::kGpuKernels[i].name) return i;
  }
  throw py::value_error("no GPU kernel variant named " + name);
}

// Same arguments as _smallmm_core.matmul plus the launch shape. Returns the output and
// what the launch did.
py::tuple SimulateGpuMatMul(const py::array& x, const py::array& y, bool transpose_x,
                            bool conjugate_x, bool transpose_y, bool conjugate_y,
                            std::optional<std::vector<int64_t>> batch_shape,
                            std::optional<std::string> kernel, int block, int smem_budget,
                            int64_t max_blocks) {
  const Planned p = PlanFor(x, y, transpose_x, conjugate_x, transpose_y, conjugate_y, batch_shape,
                            /*cpu_kernels=*/false);
  py::array out(x.dtype(), p.shape);
  smallmm::gpu::SimOptions opt;
  if (kernel) opt.kernel = KernelIndex(*kernel);
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
  info["kernel"] = st.kernel >= 0 ? smallmm::gpu::kGpuKernels[st.kernel].name : "none";
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
  info["rows_fastest"] = c.c_ifast;
  info["smem_bytes"] = c.smem_bytes;
  info["barriers"] = st.barriers;
  info["a_stages"] = st.a_stages;
  info["a_reused"] = st.a_reused;
  info["b_stages"] = st.b_stages;
  info["b_reused"] = st.b_reused;
  return py::make_tuple(out, info);
}

// Dynamic routing (forward, or backward when grad_v is given) by the GPU routing block
// program on the host. u_hat [batch, I, J, K] float32 or float64, C-contiguous.
template <typename T>
py::tuple SimulateRoutingTyped(const py::array& u_hat, int iterations, double epsilon,
                               const std::optional<py::array>& grad_v, bool in_place, int block,
                               int64_t max_blocks) {
  using Arr = py::array_t<T, py::array::c_style>;
  Arr u = py::cast<Arr>(u_hat);
  if (u.ndim() != 4) throw py::value_error("u_hat must have rank 4");
  smallmm::RoutingShape shape;
  shape.batch = u.shape(0);
  shape.in_caps = u.shape(1);
  shape.out_caps = u.shape(2);
  shape.out_dim = u.shape(3);
  shape.iterations = iterations;
  shape.epsilon = epsilon;
  const smallmm::DType dtype = smallmm_py::CoreDType(u_hat.dtype());
  std::string error;
  if (!smallmm::CheckRouting(dtype, shape, &error)) throw py::value_error(error);
  smallmm::gpu::SimOptions opt;
  opt.threads = block;
  opt.max_blocks = max_blocks;
  opt.a_lo = 0;
  opt.a_hi = u.size() - 1;
  Arr gv;
  Arr out;
  if (grad_v) {
    gv = py::cast<Arr>(*grad_v);
    if (gv.ndim() != 3 || gv.shape(0) != shape.batch || gv.shape(1) != shape.out_caps ||
        gv.shape(2) != shape.out_dim) {
      throw py::value_error("grad_v must have shape [batch, out_caps, out_dim]");
    }
    opt.b_lo = 0;
    opt.b_hi = gv.size() - 1;
    out = in_place ? Arr(py::array(u).attr("copy")())
                   : Arr(std::vector<py::ssize_t>(u.shape(), u.shape() + 4));
  } else {
    out = Arr(std::vector<py::ssize_t>{u.shape(0), u.shape(2), u.shape(3)});
  }
  const T* src = in_place ? out.data() : u.data();  // in place: dû overwrites its own û
  smallmm::gpu::RoutingConfig cfg;
  smallmm::gpu::SimStats st;
  try {
    st = smallmm::gpu::SimulateRouting<T>(shape, src, grad_v ? gv.data() : nullptr,
                                          out.mutable_data(), opt, &cfg);
  } catch (const smallmm::gpu::SimError& e) {
    throw std::runtime_error(e.what());
  }
  py::dict info;
  info["blocks"] = cfg.blocks;
  info["threads"] = cfg.threads;
  info["chunk"] = cfg.chunk;
  info["workspace_bytes"] = cfg.ws_elems * int64_t(sizeof(T));
  info["barriers"] = st.barriers;
  return py::make_tuple(out, info);
}

}  // namespace

PYBIND11_MODULE(_smallmm_gpu_sim, m) {
  m.doc() = "tf_smallmm's GPU block program on the host over a simulated grid (test support).";
  m.def("simulate_gpu_matmul", &SimulateGpuMatMul, py::arg("x"), py::arg("y"),
        py::arg("transpose_x") = false, py::arg("conjugate_x") = false,
        py::arg("transpose_y") = false, py::arg("conjugate_y") = false,
        py::arg("batch_shape") = py::none(), py::arg("kernel") = py::none(), py::arg("block") = 0,
        py::arg("smem_budget") = smallmm::gpu::kSmemBudget,
        py::arg("max_blocks") = smallmm::gpu::SimOptions().max_blocks,
        "matmul computed by the GPU kernels' block program on the host over a simulated "
        "grid (at most `max_blocks` blocks, `smem_budget` bytes of shared memory each), "
        "checking shared- and global-memory accesses. `kernel` names the variant (default: "
        "the one the launcher chooses); `block` sets the threads per block of the generic "
        "one (0: its own). Returns (output, launch info). For tests on machines without a "
        "GPU.");
  m.def(
      "simulate_gpu_routing",
      [](const py::array& u_hat, int iterations, double epsilon, std::optional<py::array> grad_v,
         bool in_place, int block, int64_t max_blocks) {
        const std::string name = py::str(u_hat.dtype().attr("name"));
        if (name == "float32") {
          return SimulateRoutingTyped<float>(u_hat, iterations, epsilon, grad_v, in_place, block,
                                             max_blocks);
        }
        if (name == "float64") {
          return SimulateRoutingTyped<double>(u_hat, iterations, epsilon, grad_v, in_place, block,
                                              max_blocks);
        }
        throw py::type_error("dynamic routing supports float32 and float64, got " + name);
      },
      py::arg("u_hat"), py::arg("iterations") = 3, py::arg("epsilon") = double(1e-7f),
      py::arg("grad_v") = py::none(), py::arg("in_place") = false, py::arg("block") = 0,
      py::arg("max_blocks") = smallmm::gpu::SimOptions().max_blocks,
      "Dynamic routing of u_hat [batch, I, J, K] by the GPU routing block program on the "
      "host: v [batch, J, K], or with grad_v [batch, J, K] the gradient dL/du_hat (in_place: "
      "computed over a copy of u_hat, as when the op reuses u_hat's buffer). Checks the "
      "workspace and global accesses like simulate_gpu_matmul. Returns (output, info).");
  py::list kernels;
  for (const auto& k : smallmm::gpu::kGpuKernels) {
    py::dict d;
    d["name"] = k.name;
    d["threads"] = k.threads;
    d["elements_per_thread"] = k.ept;
    d["max_tile"] = py::make_tuple(k.max_bm, k.max_bn);
    d["max_k_chunk"] = k.max_kc;
    d["tiles"] = k.tiles;
    kernels.append(d);
  }
  m.attr("gpu_kernels") = py::tuple(kernels);  // SMALLMM_GPU_KERNELS, in the order tried
}
