// The run-time ISA dispatcher (isa.h). Compiled once, without ISA flags.
#include "cc/engine/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cc/engine/gemm/gemm_kernels.h"
#include "cc/engine/routing.h"
#include "cc/engine/smallmm.h"

namespace smallmm {

// Each ISA's tables, defined by its gemm/gemm_table.cc (gathering its builds of
// gemm/gemm_isa.cc, one per dtype) and routing_isa.cc, and AVX-512's bfloat16 kernels for
// AVX512-BF16 (gemm_isa.cc built once more). Weak:
// an ISA whose objects are not linked leaves its address null (hidden: resolved when the
// library is linked, never by the dynamic loader).
#define SMALLMM_ISA_DECLARE(name, check)                                                          \
  extern const GemmKernels kGemmKernels_##name __attribute__((weak, visibility("hidden")));       \
  extern const RoutingKernels kRoutingKernels_##name __attribute__((weak, visibility("hidden"))); \
  extern const GemmDTypeKernels kGemmKernelsBf16_##name __attribute__((weak, visibility("hidde"   \
                                                                                        "n")));
SMALLMM_ISAS(SMALLMM_ISA_DECLARE)
#undef SMALLMM_ISA_DECLARE

namespace {

bool CpuHasBaseline() { return true; }

bool CpuHasAvx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool CpuHasAvx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Best first, as SMALLMM_ISAS lists them.
const IsaKernels kIsas[kNumIsas] = {
#define SMALLMM_ISA_ENTRY(name, check) \
  {#name, &check, &kGemmKernels_##name, &kRoutingKernels_##name, &kGemmKernelsBf16_##name},
    SMALLMM_ISAS(SMALLMM_ISA_ENTRY)
#undef SMALLMM_ISA_ENTRY
};

bool Compiled(int i) { return kIsas[i].gemm != nullptr && kIsas[i].routing != nullptr; }
bool Usable(int i) { return Compiled(i) && kIsas[i].cpu_has(); }

// The best usable ISA, or the one TF_SMALLMM_ISA names when that is usable.
int DefaultIsa() {
  const char* want = getenv("TF_SMALLMM_ISA");
  int best = -1;
  for (int i = 0; i < kNumIsas; ++i) {
    if (!Usable(i)) continue;
    if (best < 0) best = i;
    if (want == nullptr || *want == 0 || strcmp(want, kIsas[i].name) == 0) return i;
  }
  return best >= 0 ? best : kNumIsas - 1;
}

// The active ISA, as an index into kIsas.
std::atomic<int>& Current() {
  static std::atomic<int> current{DefaultIsa()};
  return current;
}

}  // namespace

const IsaKernels& ActiveIsaKernels() { return kIsas[Current().load(std::memory_order_relaxed)]; }

const char* ActiveIsa() { return ActiveIsaKernels().name; }

const char* CompiledIsas() {
  static const std::string names = [] {
    std::string s;
    for (int i = 0; i < kNumIsas; ++i) {
      if (Compiled(i)) s += (s.empty() ? "" : ",") + std::string(kIsas[i].name);
    }
    return s;
  }();
  return names.c_str();
}

bool SetIsa(const std::string& name) {
  for (int i = 0; i < kNumIsas; ++i) {
    if (name == kIsas[i].name && Usable(i)) {
      Current().store(i);
      return true;
    }
  }
  return false;
}

namespace {
std::atomic<bool>& Staging() {
  static std::atomic<bool> on{true};
  return on;
}
std::atomic<bool>& OneStrip() {
  static std::atomic<bool> on{true};
  return on;
}
std::atomic<bool>& Fused() {
  static std::atomic<bool> on{true};
  return on;
}
std::atomic<bool>& Items() {
  static std::atomic<bool> on{true};
  return on;
}
std::atomic<bool>& Ahead() {
  static std::atomic<bool> on{true};
  return on;
}
bool CpuHasAvx512Bf16() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return CpuHasAvx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}
std::atomic<bool>& Bf16() {
  static std::atomic<bool> on{CpuHasAvx512Bf16()};
  return on;
}
}  // namespace

void SetOutputStaging(bool on) { Staging().store(on, std::memory_order_relaxed); }
bool OutputStaging() { return Staging().load(std::memory_order_relaxed); }
void SetOneStripRuns(bool on) { OneStrip().store(on, std::memory_order_relaxed); }
bool OneStripRuns() { return OneStrip().load(std::memory_order_relaxed); }
void SetFusedPairs(bool on) { Fused().store(on, std::memory_order_relaxed); }
bool FusedPairs() { return Fused().load(std::memory_order_relaxed); }
void SetReductionItems(bool on) { Items().store(on, std::memory_order_relaxed); }
bool ReductionItems() { return Items().load(std::memory_order_relaxed); }
void SetRunPrefetch(bool on) { Ahead().store(on, std::memory_order_relaxed); }
bool RunPrefetch() { return Ahead().load(std::memory_order_relaxed); }
bool HardwareFollowsRuns() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}
bool SetBf16Dot(bool on) {
  const bool now = on && CpuHasAvx512Bf16();
  Bf16().store(now, std::memory_order_relaxed);
  return now;
}
bool Bf16Dot() { return Bf16().load(std::memory_order_relaxed); }

}  // namespace smallmm
