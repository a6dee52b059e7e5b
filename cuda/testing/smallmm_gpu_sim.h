// smallmm_gpu_sim.h — runs the GPU block programs (cuda/smallmm_gpu_logic.h, and the
// routing one of cuda/routing_gpu_logic.h) on the host over a simulated grid, so that the GPU
// kernels' indexing is tested on machines without a GPU (tests/test_gpu_simulation.py, through the
// pybind11 module in sim_module.cc). Host-only, header-only; test support, not part of the library.
//
// How: every block of the grid runs in turn. The block program's uniform code runs once
// per block; each ForEachThread phase runs the phase for thread 0, 1, ..., T-1 in order
// with that thread's own accumulators; Barrier() ends a phase. Shared memory is one
// buffer per block, filled with 0xFF bytes (a NaN pattern) when the block starts.
//
// What it checks besides the result (each failure raises, naming block/thread/address):
//   - shared memory: accesses outside the block's allocation; reads of bytes never
//     written in this block; a read of a byte another thread wrote since the last
//     barrier (missing __syncthreads: read-after-write race); a write to a byte another
//     thread wrote or read since the last barrier (write-after-write / write-after-read
//     race); a uniform read of a byte written since the last barrier.
//   - global memory: every operand load inside the operand's element range; every store
//     inside the output, and every output element stored exactly once.
//
// Where it is not faithful to the GPU:
//   - Threads of a phase run sequentially and never interleave, so it cannot show
//     anything that depends on timing: it detects missing barriers only through the
//     shadow-state checks above, not by producing the wrong numbers a GPU might.
//   - Block-uniform code runs once per block, not once per thread: if it accidentally
//     depended on the thread index, the GPU would diverge (and could deadlock at a
//     barrier) while the simulation would not notice.
//   - No warps, no memory coalescing, bank conflicts, occupancy, register limits or
//     shared-memory capacity of a real device, and no launch-bound or grid-size limits:
//     it says nothing about speed and cannot detect a launch the device would refuse.
//   - Arithmetic is the host's: nvcc contracts a*b+c into FMA on the GPU (results may
//     differ in the last bits from the simulation, which matches the CPU engine's
//     baseline build bit for bit), and fp16/bf16 conversions use the shared software
//     routines here but the hardware instructions on the GPU (same rounding; NaN
//     payloads may differ).
//   - Blocks run one after another, so it cannot show races between blocks; the kernel
//     has none by construction (blocks write disjoint outputs and never read them).
#ifndef TF_SMALLMM_CUDA_TESTING_SMALLMM_GPU_SIM_H_
#define TF_SMALLMM_CUDA_TESTING_SMALLMM_GPU_SIM_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/routing_gpu_logic.h"
#include "cuda/smallmm_gpu_logic.h"

namespace smallmm {
namespace gpu {

struct SimOptions {
  int kernel = -1;  // variant of SMALLMM_GPU_KERNELS; -1: the one the launcher would choose
  int threads = 0;  // threads per block; 0: the variant's own (only `generic` takes others)
  int smem_budget = kSmemBudget;
  int64_t max_blocks = 132 * 8;  // one full wave of 256-thread blocks on an H100 SXM
  // Valid element-index ranges of the operands ([lo, hi]; empty when lo > hi).
  int64_t a_lo = 0, a_hi = -1, b_lo = 0, b_hi = -1;
};

struct SimStats {
  int kernel = -1;
  LaunchConfig cfg;
  int64_t barriers = 0;
  int64_t a_stages = 0, a_reused = 0;  // staging steps that loaded / reused op(A)
  int64_t b_stages = 0, b_reused = 0;
};

class SimError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename AccT>
class SimExec {
 public:
  // `threads` per block, `smem_bytes` of shared memory (or routing workspace) per block.
  SimExec(int threads, int64_t smem_bytes, const SimOptions& opt, int64_t out_elements,
          SimStats* stats)
      : threads_(threads),
        smem_bytes_(smem_bytes),
        opt_(opt),
        accs_(threads),
        smem_(smem_bytes + 16),
        written_(smem_.size()),
        w_epoch_(smem_.size()),
        writer_(smem_.size()),
        r_epoch_(smem_.size()),
        reader_(smem_.size()),
        stores_(out_elements, 0),
        stats_(stats) {}

  void BeginBlock(int64_t block) {
    block_ = block;
    memset(smem_.data(), 0xFF, smem_.size());
    std::fill(written_.begin(), written_.end(), 0);
    std::fill(w_epoch_.begin(), w_epoch_.end(), -1);
    std::fill(r_epoch_.begin(), r_epoch_.end(), -1);
    ++epoch_;
  }

  // --- the executor interface (see smallmm_gpu_logic.h)
  unsigned char* shared() { return smem_.data(); }
  void Barrier() {
    ++epoch_;
    ++stats_->barriers;
  }
  template <class F>
  void ForEachThread(F f) {
    for (int t = 0; t < threads_; ++t) {
      tid_ = t;
      f(t, accs_[t]);
    }
    tid_ = kUniform;
  }
  template <class U>
  U Read(const U* p) {
    const size_t at = Offset(p, sizeof(U), "read");
    for (size_t i = at; i < at + sizeof(U); ++i) {
      if (!written_[i]) Fail("reads shared byte ", i, " that nothing wrote in this block");
      if (w_epoch_[i] == epoch_ && writer_[i] != tid_) {
        Fail("reads shared byte ", i, " written by thread ", writer_[i],
             " with no barrier in between");
      }
      if (r_epoch_[i] != epoch_) {
        r_epoch_[i] = epoch_;
        reader_[i] = tid_;
      } else if (reader_[i] != tid_) {
        reader_[i] = kMany;
      }
    }
    U v;
    memcpy(&v, smem_.data() + at, sizeof(U));
    return v;
  }
  template <class U>
  U ReadUniform(const U* p) {
    const size_t at = Offset(p, sizeof(U), "uniform read");
    for (size_t i = at; i < at + sizeof(U); ++i) {
      if (!written_[i]) Fail("reads shared byte ", i, " that nothing wrote in this block");
      if (w_epoch_[i] == epoch_) {
        Fail("every thread reads shared byte ", i, " written by thread ", writer_[i],
             " with no barrier in between");
      }
      r_epoch_[i] = epoch_;
      reader_[i] = kMany;
    }
    U v;
    memcpy(&v, smem_.data() + at, sizeof(U));
    return v;
  }
  template <class U>
  void Write(U* p, U v) {
    const size_t at = Offset(p, sizeof(U), "write");
    for (size_t i = at; i < at + sizeof(U); ++i) {
      if (w_epoch_[i] == epoch_ && writer_[i] != tid_) {
        Fail("writes shared byte ", i, " that thread ", writer_[i],
             " wrote with no barrier in between");
      }
      if (r_epoch_[i] == epoch_ && reader_[i] != tid_) {
        Fail("writes shared byte ", i, " that ",
             reader_[i] == kMany ? std::string("other threads")
                                 : "thread " + std::to_string(reader_[i]),
             " read with no barrier in between");
      }
      written_[i] = 1;
      w_epoch_[i] = epoch_;
      writer_[i] = tid_;
    }
    memcpy(smem_.data() + at, &v, sizeof(U));
  }
  void OnLoad(int operand, int64_t index) {
    const int64_t lo = operand == 0 ? opt_.a_lo : opt_.b_lo;
    const int64_t hi = operand == 0 ? opt_.a_hi : opt_.b_hi;
    if (index < lo || index > hi) {
      Fail("loads element ", index, " of ", operand == 0 ? "x" : "y", ", outside [", lo, ", ", hi,
           "]");
    }
  }
  void OnStore(int64_t index) {
    if (index < 0 || index >= int64_t(stores_.size())) {
      Fail("stores output element ", index, ", outside [0, ", stores_.size(), ")");
    }
    if (stores_[index]++ != 0) Fail("stores output element ", index, " a second time");
  }
  void CountStage(bool load_a, bool load_b) {
    ++(load_a ? stats_->a_stages : stats_->a_reused);
    ++(load_b ? stats_->b_stages : stats_->b_reused);
  }

  // After the grid: every output element stored exactly once.
  void CheckAllStored() const {
    for (size_t i = 0; i < stores_.size(); ++i) {
      if (stores_[i] != 1) {
        std::ostringstream s;
        s << "GPU simulation: output element " << i << " was stored " << int(stores_[i])
          << " times";
        throw SimError(s.str());
      }
    }
  }

 private:
  static constexpr int kUniform = -1;  // block-uniform code, outside ForEachThread
  static constexpr int kMany = -2;     // several threads

  size_t Offset(const void* p, size_t size, const char* what) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < smem_.data() || c + size > smem_.data() + smem_bytes_) {
      Fail(what, " of ", size, " bytes at shared offset ", c - smem_.data(),
           " is outside the block's ", smem_bytes_, " bytes");
    }
    return size_t(c - smem_.data());
  }

  template <class... Args>
  [[noreturn]] void Fail(const Args&... args) {
    std::ostringstream s;
    s << "GPU simulation: block " << block_ << ", ";
    if (tid_ == kUniform) {
      s << "uniform code";
    } else {
      s << "thread " << tid_;
    }
    s << ": ";
    (s << ... << args);
    throw SimError(s.str());
  }

  int threads_;
  int64_t smem_bytes_;
  SimOptions opt_;
  std::vector<AccT> accs_;
  std::vector<unsigned char> smem_;
  // Shadow state per shared-memory byte.
  std::vector<unsigned char> written_;
  std::vector<int64_t> w_epoch_;
  std::vector<int> writer_;
  std::vector<int64_t> r_epoch_;
  std::vector<int> reader_;
  std::vector<unsigned char> stores_;
  SimStats* stats_;
  int64_t epoch_ = 0;
  int64_t block_ = 0;
  int tid_ = kUniform;
};

template <DType D, class Shape>
void SimulateTyped(const GemmPlan& p, const void* a, const void* b, void* c, const SimOptions& opt,
                   SimStats* stats) {
  using E = Elem<D>;
  SimExec<Acc<typename E::R, E::kPlanes, Shape::kEpt>> ex(stats->cfg.threads, stats->cfg.smem_bytes,
                                                          opt, p.output_elements, stats);
  for (int64_t block = 0; block < stats->cfg.blocks; ++block) {
    ex.BeginBlock(block);
    RunBlock<D, Shape>(ex, p, stats->cfg, a, b, c, block);
  }
  ex.CheckAllStored();
}

// Runs the plan through the GPU block program on the host, on the variant the launcher
// would choose (or opt.kernel). `c` is the dense output. Throws SimError on a
// configuration error or a failed check.
inline SimStats SimulateBatchMatMul(DType dtype, const GemmPlan& p, const void* a, const void* b,
                                    void* c, const SimOptions& opt) {
  SimStats stats;
  if (p.output_elements == 0) return stats;  // the op returns before launching
  if (opt.kernel >= kNumGpuKernels) throw SimError("no such GPU kernel variant");
  stats.kernel = opt.kernel >= 0 ? opt.kernel : ChooseGpuKernel(p);
  const int threads = opt.threads > 0 ? opt.threads : kGpuKernels[stats.kernel].threads;
  if (const char* err = MakeLaunchConfig(p, dtype, stats.kernel, threads, opt.smem_budget,
                                         opt.max_blocks, &stats.cfg)) {
    throw SimError(std::string("GPU launch configuration: ") + err);
  }
  bool known = false;
  WithGpuShape(stats.kernel, [&](auto shape) {
    using S = decltype(shape);
    switch (dtype) {
#define SMALLMM_SIM_CASE(d, name, bytes, St, A)          \
  case DType::d:                                         \
    SimulateTyped<DType::d, S>(p, a, b, c, opt, &stats); \
    known = true;                                        \
    break;
      SMALLMM_DTYPES(SMALLMM_SIM_CASE)
#undef SMALLMM_SIM_CASE
      default:
        break;
    }
  });
  if (!known) throw SimError("unsupported dtype");
  return stats;
}

struct NoAcc {};

// Runs the routing block program (routing_gpu_logic.h) on the host: forward (grad_v null:
// out = v) or backward (out = dû; may be u_hat, in place). The workspace is checked like
// shared memory whether the GPU would put it there or in global scratch. The shape must
// have passed CheckRouting. Returns the configuration's barrier count and sets *cfg_out.
template <typename T>
SimStats SimulateRouting(const RoutingShape& shape, const T* u_hat, const T* grad_v, T* out,
                         const SimOptions& opt, RoutingConfig* cfg_out) {
  SimStats stats;
  const bool backward = grad_v != nullptr;
  RoutingConfig cfg;
  const int threads = opt.threads > 0 ? opt.threads : kRoutingThreads;
  if (const char* err = MakeRoutingConfig(shape, backward, threads, opt.max_blocks, &cfg)) {
    throw SimError(std::string("GPU routing configuration: ") + err);
  }
  *cfg_out = cfg;
  const int64_t out_elements =
      shape.batch * shape.out_caps * shape.out_dim * (backward ? shape.in_caps : 1);
  if (out_elements == 0) return stats;  // the op returns before launching
  SimExec<NoAcc> ex(threads, cfg.ws_elems * int64_t(sizeof(T)), opt, out_elements, &stats);
  for (int64_t block = 0; block < cfg.blocks; ++block) {
    ex.BeginBlock(block);
    if (backward) {
      RunRoutingBackwardBlock<T>(ex, cfg, u_hat, grad_v, out, block);
    } else {
      RunRoutingForwardBlock<T>(ex, cfg, u_hat, out, block);
    }
  }
  ex.CheckAllStored();
  return stats;
}

}  // namespace gpu
}  // namespace smallmm

#endif  // TF_SMALLMM_CUDA_TESTING_SMALLMM_GPU_SIM_H_
