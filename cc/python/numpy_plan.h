// numpy_plan.h — numpy arrays as engine operands: dtype, element strides and the plan of
// op(x) · op(y). Shared by the pybind11 modules over the engine (module.cc here, and the GPU
// simulation's cuda/testing/sim_module.cc), so both accept and reject the same arrays.
#ifndef TF_SMALLMM_CC_PYTHON_NUMPY_PLAN_H_
#define TF_SMALLMM_CC_PYTHON_NUMPY_PLAN_H_

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include "cc/engine/smallmm.h"

namespace smallmm_py {

namespace py = pybind11;

// The engine dtype whose name (dtypes.h) is numpy's name for `dt`.
inline smallmm::DType CoreDType(const py::dtype& dt) {
  const std::string name = py::str(dt.attr("name"));
  for (int i = 0; i < smallmm::kNumDTypes; ++i) {
    if (name == smallmm::DTypeName(smallmm::DType(i))) return smallmm::DType(i);
  }
  throw py::type_error("smallmm: unsupported dtype " + name);
}

struct Layout {
  std::vector<int64_t> dims, strides;
};

inline Layout LayoutOf(const py::array& x, const char* name) {
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

// What every entry point shares: dtype check, numpy layouts, and the engine's plan (with the
// CPU kernels' folds, or as the GPU kernels take it when cpu_kernels is false).
struct Planned {
  smallmm::DType dtype;
  Layout lx, ly;
  smallmm::GemmPlan plan;
  std::vector<py::ssize_t> shape;  // the output's
};

inline Planned PlanFor(const py::array& x, const py::array& y, bool transpose_x, bool conjugate_x,
                       bool transpose_y, bool conjugate_y,
                       const std::optional<std::vector<int64_t>>& batch_shape,
                       bool cpu_kernels = true) {
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
  if (cpu_kernels) smallmm::FoldForCpuKernels(&r.plan);
  r.shape.assign(out_dims, out_dims + out_rank);
  return r;
}

}  // namespace smallmm_py

#endif  // TF_SMALLMM_CC_PYTHON_NUMPY_PLAN_H_
