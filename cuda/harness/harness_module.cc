// pybind11 module _smallmm_gpu_harness: the cuda/ kernels without TensorFlow, for
// scripts/gpu_check.sh on GPU machines that have PyTorch or CuPy but no TensorFlow. Tensors
// cross as device addresses (torch's data_ptr(), CuPy's .data.ptr) with element shapes and
// strides; launches go on the stream given as an integer (torch.cuda.current_stream()
// .cuda_stream). Plans come from the engine's planner (cc/engine/plan.cc), so a case plans
// exactly as in the TF op. Host C++ only (compiled by nvcc as C++ for the CUDA include
// path, linked with the kernels' objects and the CUDA runtime).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cc/engine/smallmm.h"
#include "cuda/smallmm_gpu.h"
#include "cuda/smallmm_gpu_logic.h"

namespace py = pybind11;

namespace {

smallmm::DType DTypeByName(const std::string& name) {
  for (int i = 0; i < smallmm::kNumDTypes; ++i) {
    if (name == smallmm::DTypeName(smallmm::DType(i))) return smallmm::DType(i);
  }
  throw py::type_error("unsupported dtype " + name);
}

struct Planned {
  smallmm::GemmPlan plan;
  std::vector<int64_t> out_shape;
};

Planned Plan(const std::vector<int64_t>& xs, const std::vector<int64_t>& xst,
             const std::vector<int64_t>& ys, const std::vector<int64_t>& yst, bool tx, bool cx,
             bool ty, bool cy, const std::optional<std::vector<int64_t>>& batch_shape) {
  if (xs.size() != xst.size() || ys.size() != yst.size()) {
    throw py::value_error("shape and strides differ in length");
  }
  smallmm::Operand a{int(xs.size()), xs.data(), xst.data(), tx, cx};
  smallmm::Operand b{int(ys.size()), ys.data(), yst.data(), ty, cy};
  Planned p;
  int rank = 0;
  int64_t dims[smallmm::kMaxBatchDims + 2];
  std::string error;
  if (!smallmm::PlanBatchMatMul(a, b, batch_shape ? batch_shape->data() : nullptr,
                                batch_shape ? int(batch_shape->size()) : -1, &p.plan, &rank, dims,
                                &error)) {
    throw py::value_error(error);
  }
  p.out_shape.assign(dims, dims + rank);
  return p;
}

void Check(const char* error) {
  if (error != nullptr) throw std::runtime_error(std::string("smallmm GPU: ") + error);
}

void* Ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// The routing shape of a u_hat tensor. Not smallmm::CheckRouting: it lives in routing.cc
// with the CPU kernels, which the harness does not link; the shapes here come from tensors
// that exist, so only the iteration count and the dtype (the launcher's check) remain.
smallmm::RoutingShape Routing(const std::vector<int64_t>& u_shape, int iterations, double epsilon) {
  if (u_shape.size() != 4) throw py::value_error("u_hat must have rank 4");
  if (iterations < 1) throw py::value_error("iterations must be >= 1");
  smallmm::RoutingShape s;
  s.batch = u_shape[0];
  s.in_caps = u_shape[1];
  s.out_caps = u_shape[2];
  s.out_dim = u_shape[3];
  s.iterations = iterations;
  s.epsilon = epsilon;
  return s;
}

}  // namespace

PYBIND11_MODULE(_smallmm_gpu_harness, m) {
  m.doc() = "tf_smallmm's CUDA kernels without TensorFlow (scripts/gpu_check.sh).";
  m.def(
      "plan_matmul",
      [](std::vector<int64_t> xs, std::vector<int64_t> xst, std::vector<int64_t> ys,
         std::vector<int64_t> yst, bool tx, bool cx, bool ty, bool cy,
         std::optional<std::vector<int64_t>> batch_shape) {
        const Planned p = Plan(xs, xst, ys, yst, tx, cx, ty, cy, batch_shape);
        const int k = smallmm::gpu::ChooseGpuKernel(p.plan);
        return py::make_tuple(p.out_shape, smallmm::gpu::kGpuKernels[k].name);
      },
      py::arg("x_shape"), py::arg("x_strides"), py::arg("y_shape"), py::arg("y_strides"),
      py::arg("transpose_x") = false, py::arg("conjugate_x") = false,
      py::arg("transpose_y") = false, py::arg("conjugate_y") = false,
      py::arg("batch_shape") = py::none(),
      "(output shape, GPU kernel variant) of op(x) @ op(y); strides in elements.");
  m.def(
      "matmul",
      [](const std::string& dtype, uintptr_t x, std::vector<int64_t> xs, std::vector<int64_t> xst,
         uintptr_t y, std::vector<int64_t> ys, std::vector<int64_t> yst, uintptr_t out,
         uintptr_t stream, bool tx, bool cx, bool ty, bool cy,
         std::optional<std::vector<int64_t>> batch_shape) {
        const Planned p = Plan(xs, xst, ys, yst, tx, cx, ty, cy, batch_shape);
        Check(smallmm::gpu::LaunchBatchMatMul(DTypeByName(dtype), p.plan, Ptr(x), Ptr(y), Ptr(out),
                                              Ptr(stream)));
      },
      py::arg("dtype"), py::arg("x"), py::arg("x_shape"), py::arg("x_strides"), py::arg("y"),
      py::arg("y_shape"), py::arg("y_strides"), py::arg("out"), py::arg("stream"),
      py::arg("transpose_x") = false, py::arg("conjugate_x") = false,
      py::arg("transpose_y") = false, py::arg("conjugate_y") = false,
      py::arg("batch_shape") = py::none(),
      "Enqueues out = op(x) @ op(y) (dense row-major out of plan_matmul's shape) on stream.");
  m.def(
      "routing_scratch_bytes",
      [](const std::string& dtype, std::vector<int64_t> u_shape, int iterations, double epsilon,
         bool backward) {
        int64_t bytes = 0;
        Check(smallmm::gpu::RoutingScratchBytes(
            DTypeByName(dtype), Routing(u_shape, iterations, epsilon), backward, &bytes));
        return bytes;
      },
      py::arg("dtype"), py::arg("u_shape"), py::arg("iterations"), py::arg("epsilon"),
      py::arg("backward"));
  m.def(
      "routing",
      [](const std::string& dtype, uintptr_t u, std::vector<int64_t> u_shape, uintptr_t v,
         uintptr_t scratch, uintptr_t stream, int iterations, double epsilon) {
        Check(smallmm::gpu::LaunchRoutingForward(DTypeByName(dtype),
                                                 Routing(u_shape, iterations, epsilon), Ptr(u),
                                                 Ptr(v), Ptr(scratch), Ptr(stream)));
      },
      py::arg("dtype"), py::arg("u"), py::arg("u_shape"), py::arg("v"), py::arg("scratch"),
      py::arg("stream"), py::arg("iterations"), py::arg("epsilon"),
      "Enqueues v [B, J, K] = dynamic routing of u_hat [B, I, J, K].");
  m.def(
      "routing_grad",
      [](const std::string& dtype, uintptr_t u, std::vector<int64_t> u_shape, uintptr_t grad_v,
         uintptr_t grad_u, uintptr_t scratch, uintptr_t stream, int iterations, double epsilon) {
        Check(smallmm::gpu::LaunchRoutingBackward(
            DTypeByName(dtype), Routing(u_shape, iterations, epsilon), Ptr(u), Ptr(grad_v),
            Ptr(grad_u), Ptr(scratch), Ptr(stream)));
      },
      py::arg("dtype"), py::arg("u"), py::arg("u_shape"), py::arg("grad_v"), py::arg("grad_u"),
      py::arg("scratch"), py::arg("stream"), py::arg("iterations"), py::arg("epsilon"),
      "Enqueues grad_u [B, I, J, K] = dL/du_hat given grad_v = dL/dv.");
  m.def("driver_version", &smallmm::gpu::DriverVersion);
  py::list kernels;
  for (const auto& k : smallmm::gpu::kGpuKernels) kernels.append(k.name);
  m.attr("gpu_kernels") = py::tuple(kernels);
}
