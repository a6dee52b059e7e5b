// The one base OpKernel of the SmallMM matmul ops (shared by the CPU registrations in
// smallmm_ops.cc and the GPU ones in smallmm_ops_gpu.cc). It validates and broadcasts
// through the kernel core's planner, allocates, handles empty outputs, and hands the plan
// to the device's Launch.
#ifndef TF_SMALLMM_CC_OPS_SMALLMM_MATMUL_OP_H_
#define TF_SMALLMM_CC_OPS_SMALLMM_MATMUL_OP_H_

#include <string>
#include <vector>

#include "cc/kernels/smallmm.h"
#include "cc/ops/smallmm_types.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tensorflow {

// The one base kernel for both ops (and every dtype: the core is type-erased).
template <typename Device>
class SmallMMMatMulOp : public OpKernel {
 public:
  explicit SmallMMMatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_x", &transpose_x_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("conjugate_x", &conjugate_x_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_y", &transpose_y_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("conjugate_y", &conjugate_y_));
    OP_REQUIRES(ctx, smallmm_tf::ToCoreDType(ctx->input_type(0), &dtype_),
                errors::InvalidArgument("SmallMM: unsupported dtype ",
                                        DataTypeString(ctx->input_type(0))));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& y = ctx->input(1);
    std::vector<int64_t> xd, xs, yd, ys, target;
    DenseLayout(x.shape(), &xd, &xs);
    DenseLayout(y.shape(), &yd, &ys);
    const bool reduce = ctx->num_inputs() == 3;
    if (reduce) {
      const Tensor& bs = ctx->input(2);
      OP_REQUIRES(ctx, TensorShapeUtils::IsVector(bs.shape()),
                  errors::InvalidArgument("batch_shape must be a vector, got shape ",
                                          bs.shape().DebugString()));
      for (int64_t i = 0; i < bs.NumElements(); ++i) {
        target.push_back(bs.dtype() == DT_INT32 ? int64_t(bs.flat<int32>()(i))
                                                : int64_t(bs.flat<int64_t>()(i)));
      }
    }
    smallmm::Operand a{x.dims(), xd.data(), xs.data(), transpose_x_, conjugate_x_};
    smallmm::Operand b{y.dims(), yd.data(), ys.data(), transpose_y_, conjugate_y_};
    smallmm::GemmPlan plan;
    int out_rank = 0;
    int64_t out_dims[smallmm::kMaxBatchDims + 2];
    std::string error;
    OP_REQUIRES(ctx,
                smallmm::PlanBatchMatMul(a, b, reduce ? target.data() : nullptr,
                                         reduce ? int(target.size()) : -1, &plan, &out_rank, out_dims, &error),
                errors::InvalidArgument(name(), ": ", error));
    TensorShape out_shape;
    for (int i = 0; i < out_rank; ++i) OP_REQUIRES_OK(ctx, out_shape.AddDimWithStatus(out_dims[i]));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &out));
    if (plan.output_elements == 0) return;
    Launch(ctx, plan, x, y, out);
  }

 private:
  static void DenseLayout(const TensorShape& s, std::vector<int64_t>* dims,
                          std::vector<int64_t>* strides) {
    const int r = s.dims();
    dims->resize(r);
    strides->resize(r);
    // A tensor with no elements is never read, and its strides could overflow int64
    // (shape [0, 2^62, 2^62, 4]): give it strides of 0.
    const bool empty = s.num_elements() == 0;
    int64_t run = 1;
    for (int i = r - 1; i >= 0; --i) {
      (*dims)[i] = s.dim_size(i);
      (*strides)[i] = empty ? 0 : run;
      if (!empty) run *= s.dim_size(i);  // <= num_elements(): no overflow
    }
  }

  void Launch(OpKernelContext* ctx, const smallmm::GemmPlan& plan, const Tensor& x,
              const Tensor& y, Tensor* out);

  bool transpose_x_, conjugate_x_, transpose_y_, conjugate_y_;
  smallmm::DType dtype_;
};

}  // namespace tensorflow

#endif  // TF_SMALLMM_CC_OPS_SMALLMM_MATMUL_OP_H_
