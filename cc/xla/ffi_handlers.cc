// The FFI handlers of the SmallMM custom calls (custom_calls.h): they plan the products
// again from the buffers' shapes with the engine's planner and run them on the buffers XLA
// owns, without copies: on the CPU ("Host") with the engine's sharding policy
// (cc/engine/execute.h) over XLA's intra-op thread pool, and, when the library is built
// with the CUDA kernels, on the GPU ("CUDA") on XLA's stream. Includes only XLA's
// header-only FFI API, not TensorFlow.
#include <algorithm>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cc/engine/execute.h"
#include "cc/engine/routing.h"
#include "cc/engine/smallmm.h"
#include "cc/xla/custom_calls.h"
#include "xla/ffi/api/ffi.h"
#if GOOGLE_CUDA
#include "cuda/smallmm_gpu.h"
#endif

// Defined in TF's libtensorflow_cc; its own header (xla/ffi/ffi_api.h) pulls in much of
// XLA, which this file does not otherwise need.
namespace xla::ffi {
const XLA_FFI_Api* GetXlaFfiApi();
}  // namespace xla::ffi

namespace smallmm_xla {
namespace {

namespace ffi = xla::ffi;

// XLA's answers to our handler registrations, for SmallMMXlaHandlerRegistered.
struct Registration {
  std::string target, platform;
  bool ok;
};
std::vector<Registration>& Registrations() {
  static auto* all = new std::vector<Registration>();
  return *all;
}

// Registers `handler` for custom-call `target` on `platform` ("Host", "CUDA") with XLA's
// FFI registry, as XLA_FFI_REGISTER_HANDLER does, and keeps XLA's answer.
bool Register(const char* target, const char* platform, XLA_FFI_Handler* handler) {
  const XLA_FFI_Api* api = xla::ffi::GetXlaFfiApi();
  XLA_FFI_Error* error = ffi::Ffi::RegisterStaticHandler(api, target, platform, handler);
  if (error != nullptr) ffi::internal::DestroyError(api, error);
  Registrations().push_back({target, platform, error == nullptr});
  return error == nullptr;
}
using I64s = ffi::Span<const int64_t>;

std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    s += (i ? "," : "") + std::to_string(dims[i]);
  }
  return s + "]";
}

// The engine dtype called `name` (the dtype attribute), checked against the buffers'
// element types: all the same, and as wide as the dtype.
ffi::Error ToDType(std::string_view name, const std::vector<ffi::AnyBuffer>& buffers,
                   smallmm::DType* dtype) {
  int found = -1;
  for (int i = 0; i < smallmm::kNumDTypes; ++i) {
    if (name == smallmm::DTypeName(smallmm::DType(i))) found = i;
  }
  if (found < 0)
    return ffi::Error::InvalidArgument("SmallMM: unsupported dtype " + std::string(name));
  *dtype = smallmm::DType(found);
  for (const ffi::AnyBuffer& b : buffers) {
    if (b.element_type() != buffers[0].element_type() ||
        ffi::ByteWidth(b.element_type()) != size_t(smallmm::DTypeSize(*dtype))) {
      return ffi::Error::InvalidArgument("SmallMM: buffers do not all hold " + std::string(name));
    }
  }
  return ffi::Error::Success();
}

// The products of one kBatchMatMulTarget call, planned; only those with outputs.
struct Planned {
  smallmm::DType dtype = smallmm::DType::kFloat;
  smallmm::Product products[2];
  int count = 0;
};

ffi::Error PlanProducts(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                        std::string_view dtype, I64s flags, I64s batch_ranks, I64s batch_shapes,
                        Planned* planned) {
  const size_t count = rets.size();
  if (count < 1 || count > 2 || args.size() != 2 * count || flags.size() != 4 * count ||
      batch_ranks.size() != count) {
    return ffi::Error::InvalidArgument("SmallMM: malformed custom call");
  }
  std::vector<ffi::AnyBuffer> buffers;
  for (size_t i = 0; i < 2 * count; ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> arg = args.get<ffi::AnyBuffer>(i);
    if (!arg.has_value()) return arg.error();
    buffers.push_back(*arg);
  }
  for (size_t p = 0; p < count; ++p) {
    ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> ret = rets.get<ffi::AnyBuffer>(p);
    if (!ret.has_value()) return ret.error();
    buffers.push_back(**ret);
  }
  if (ffi::Error e = ToDType(dtype, buffers, &planned->dtype); e.failure()) return e;
  size_t next_shape = 0;
  for (size_t p = 0; p < count; ++p) {
    const ffi::AnyBuffer& x = buffers[2 * p];
    const ffi::AnyBuffer& y = buffers[2 * p + 1];
    const ffi::AnyBuffer& out = buffers[2 * count + p];
    const int64_t rank = batch_ranks[p];
    if (rank > int64_t(batch_shapes.size() - next_shape)) {
      return ffi::Error::InvalidArgument("SmallMM: malformed custom call");
    }
    const int64_t* target = rank >= 0 ? batch_shapes.begin() + next_shape : nullptr;
    next_shape += rank >= 0 ? rank : 0;
    smallmm::Product& q = planned->products[planned->count];
    int out_rank = 0;
    int64_t out_dims[smallmm::kMaxBatchDims + 2];
    std::string error;
    const int64_t* f = flags.begin() + 4 * p;
    if (!smallmm::PlanDenseBatchMatMul(int(x.dimensions().size()), x.dimensions().begin(), f[0],
                                       f[1], int(y.dimensions().size()), y.dimensions().begin(),
                                       f[2], f[3], target, int(rank), &q.plan, &out_rank, out_dims,
                                       &error)) {
      return ffi::Error::InvalidArgument("SmallMM: " + error);
    }
    const ffi::AnyBuffer::Dimensions od = out.dimensions();
    bool same = od.size() == size_t(out_rank);
    for (int i = 0; same && i < out_rank; ++i) same = od[i] == out_dims[i];
    if (!same) {
      return ffi::Error::InvalidArgument("SmallMM: result shape " + ShapeString(od) +
                                         " is not the product's");
    }
    if (q.plan.output_elements == 0) continue;  // nothing to write
    q.a = x.untyped_data();
    q.b = y.untyped_data();
    q.c = out.untyped_data();
    ++planned->count;
  }
  return ffi::Error::Success();
}

// The executor on XLA's intra-op pool: at most its size in threads, the caller included.
// Partial sums go to heap scratch owned by `scratch`, which the caller frees after the
// engine returns (no task uses it then).
smallmm::Executor PoolExecutor(ffi::ThreadPool& pool,
                               std::vector<std::unique_ptr<char, decltype(&std::free)>>* scratch) {
  smallmm::Executor ex;
  ex.threads = int(std::max<int64_t>(1, pool.num_threads()));
  ex.parallel_for = smallmm::PoolParallelFor(
      [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); }, ex.threads);
  ex.scratch = [scratch](int64_t bytes) -> void* {
    constexpr int64_t kAlign = 64;  // as TF's CPU allocator aligns its buffers
    void* p = std::aligned_alloc(kAlign, size_t((bytes + kAlign - 1) / kAlign * kAlign));
    if (p != nullptr) scratch->emplace_back(static_cast<char*>(p), &std::free);
    return p;
  };
  return ex;
}

ffi::Error ScratchError(const smallmm::ExecuteStatus& s, const Planned& planned) {
  const smallmm::GemmPlan& plan = planned.products[s.product].plan;
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    std::string("SmallMM: could not allocate the ") +
                        (s.error == smallmm::ExecuteStatus::kPartialsScratch ? "partial sums"
                                                                             : "kernel's scratch") +
                        " (M=" + std::to_string(plan.m) + ", N=" + std::to_string(plan.n) +
                        ", K=" + std::to_string(plan.k) + ")");
}

ffi::Error BatchMatMulHost(ffi::RemainingArgs args, ffi::RemainingRets rets, std::string_view dtype,
                           I64s flags, I64s batch_ranks, I64s batch_shapes, ffi::ThreadPool pool) {
  Planned planned;
  if (ffi::Error e = PlanProducts(args, rets, dtype, flags, batch_ranks, batch_shapes, &planned);
      e.failure()) {
    return e;
  }
  if (planned.count == 0) return ffi::Error::Success();
  std::vector<std::unique_ptr<char, decltype(&std::free)>> scratch;
  const smallmm::ExecuteStatus s = smallmm::ExecuteBatchMatMul(
      planned.dtype, planned.products, planned.count, PoolExecutor(pool, &scratch));
  return s.error == smallmm::ExecuteStatus::kNone ? ffi::Error::Success()
                                                  : ScratchError(s, planned);
}

template <bool kBackward>
ffi::Error RoutingHost(ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> out,
                       std::string_view dtype, int64_t iterations, float epsilon,
                       ffi::ThreadPool pool) {
  if (args.size() != (kBackward ? 2 : 1)) {
    return ffi::Error::InvalidArgument("SmallMM: malformed custom call");
  }
  std::vector<ffi::AnyBuffer> buffers;
  for (size_t i = 0; i < args.size(); ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> arg = args.get<ffi::AnyBuffer>(i);
    if (!arg.has_value()) return arg.error();
    buffers.push_back(*arg);
  }
  buffers.push_back(*out);
  smallmm::DType d;
  if (ffi::Error e = ToDType(dtype, buffers, &d); e.failure()) return e;
  const ffi::AnyBuffer::Dimensions u = buffers[0].dimensions();
  const size_t want = kBackward ? 4 : 3;
  if (u.size() != 4 || out->dimensions().size() != want ||
      (kBackward && buffers[1].dimensions().size() != 3)) {
    return ffi::Error::InvalidArgument("SmallMM: routing buffers have the wrong ranks");
  }
  smallmm::RoutingShape shape;
  shape.batch = u[0];
  shape.in_caps = u[1];
  shape.out_caps = u[2];
  shape.out_dim = u[3];
  shape.iterations = int(iterations);
  shape.epsilon = epsilon;
  std::string error;
  if (iterations < 1 || !smallmm::CheckRouting(d, shape, &error)) {
    return ffi::Error::InvalidArgument("SmallMM dynamic routing: " + error);
  }
  if (out->element_count() == 0) return ffi::Error::Success();
  std::vector<std::unique_ptr<char, decltype(&std::free)>> scratch;
  if (!smallmm::ExecuteRouting(d, shape, buffers[0].untyped_data(),
                               kBackward ? buffers[1].untyped_data() : nullptr, out->untyped_data(),
                               PoolExecutor(pool, &scratch))) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "SmallMM: could not allocate routing scratch for u_hat " + ShapeString(u));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBatchMatMulHost, BatchMatMulHost,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::string_view>("dtype")
                                  .Attr<I64s>("flags")
                                  .Attr<I64s>("batch_ranks")
                                  .Attr<I64s>("batch_shapes")
                                  .Ctx<ffi::ThreadPool>());

// Registered below (Register), with the others.
#define SMALLMM_ROUTING_HANDLER(SYMBOL, BACKWARD)                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SYMBOL, RoutingHost<BACKWARD>,       \
                                ffi::Ffi::Bind()                     \
                                    .RemainingArgs()                 \
                                    .Ret<ffi::AnyBuffer>()           \
                                    .Attr<std::string_view>("dtype") \
                                    .Attr<int64_t>("iterations")     \
                                    .Attr<float>("epsilon")          \
                                    .Ctx<ffi::ThreadPool>())
SMALLMM_ROUTING_HANDLER(kRoutingHost, false);
SMALLMM_ROUTING_HANDLER(kRoutingGradHost, true);
#undef SMALLMM_ROUTING_HANDLER

#if GOOGLE_CUDA
namespace {

// The products on XLA's stream, one launch each (as the TF GPU kernel does).
ffi::Error BatchMatMulCuda(void* stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                           std::string_view dtype, I64s flags, I64s batch_ranks,
                           I64s batch_shapes) {
  Planned planned;
  if (ffi::Error e = PlanProducts(args, rets, dtype, flags, batch_ranks, batch_shapes, &planned);
      e.failure()) {
    return e;
  }
  for (int i = 0; i < planned.count; ++i) {
    const smallmm::Product& q = planned.products[i];
    const char* error =
        smallmm::gpu::LaunchBatchMatMul(planned.dtype, q.plan, q.a, q.b, q.c, stream);
    if (error != nullptr) {
      return ffi::Error::Internal(std::string("SmallMM GPU kernel launch failed: ") + error);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBatchMatMulCuda, BatchMatMulCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::string_view>("dtype")
                                  .Attr<I64s>("flags")
                                  .Attr<I64s>("batch_ranks")
                                  .Attr<I64s>("batch_shapes"));
#endif  // GOOGLE_CUDA

namespace {
[[maybe_unused]] const bool kRegistered[] = {
    Register(kBatchMatMulTarget, "Host", kBatchMatMulHost),
    Register(kRoutingTarget, "Host", kRoutingHost),
    Register(kRoutingGradTarget, "Host", kRoutingGradHost),
#if GOOGLE_CUDA
    Register(kBatchMatMulTarget, "CUDA", kBatchMatMulCuda),
#endif
};
}  // namespace

}  // namespace smallmm_xla

// Whether XLA accepted our handler for custom-call `target` on `platform` ("Host",
// "CUDA") into its FFI registry: what build_info()["xla_platforms"] reports, read through
// ctypes (the op library exports nothing else).
extern "C" __attribute__((visibility("default"))) int SmallMMXlaHandlerRegistered(
    const char* target, const char* platform) {
  for (const smallmm_xla::Registration& r : smallmm_xla::Registrations()) {
    if (r.target == target && r.platform == platform) return r.ok ? 1 : 0;
  }
  return 0;
}
