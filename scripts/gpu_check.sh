#!/usr/bin/env bash
# One-command check of the CUDA kernels on a GPU machine without TensorFlow: builds the
# TF-free harness extension (cuda/harness/: the same cuda/ kernels the op library uses, the
# engine's planner, pybind11) with nvcc and the python3 that has PyTorch, then runs
# cuda/harness/gpu_check.py: correctness of every dtype, broadcast pattern, reduction and
# the routing ops against PyTorch, and timings against torch.matmul / torch.bmm (cuBLAS
# batched) / torch.einsum as a fraction of the device's copy bandwidth. Writes
# gpu_check.json and gpu_check.md to $OUT (or ./gpu_check_out). About 3-5 minutes on an
# H100/H200 (build ~1-2 min with 16 cores).
#
#   scripts/gpu_check.sh             build + check + time
#   scripts/gpu_check.sh --quick     fewer timing rounds
#   scripts/gpu_check.sh --dry-run   no GPU needed: build the harness, import it, and plan
#                                    every case of the driver's lists on it
# Environment: NVCC (default: nvcc on PATH), PYTHON (default: python3), CUDA_ARCH (default:
# the GPU's compute capability, e.g. 90; 90 in a dry run), BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
BUILD_DIR=${BUILD_DIR:-$(mktemp -d /tmp/smallmm_gpu_harness.XXXXXX)}
DRY=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
if [ -z "${CUDA_ARCH:-}" ]; then
  if [ "$DRY" = 1 ]; then
    CUDA_ARCH=90
  else
    CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  fi
fi
mkdir -p "$BUILD_DIR" "$OUT"
PYINC=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
PYBIND=$("$PYTHON" -c 'import pybind11; print(pybind11.get_include())')
EXT=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
COMMON=(-O3 -std=c++17 -Xcompiler -fPIC -I. -DGOOGLE_CUDA=1)
GENCODE=(-gencode "arch=compute_${CUDA_ARCH},code=sm_${CUDA_ARCH}")
echo "gpu_check: nvcc $("$NVCC" --version | tail -1), sm_${CUDA_ARCH}, build in $BUILD_DIR"

# The kernels (the op library's own cuda/*.cu.cc), the engine's planner and dtype names,
# and the module; compiled in parallel.
pids=()
objs=()
for src in cuda/*.cu.cc; do
  o="$BUILD_DIR/$(basename "$src" .cu.cc).o"
  "$NVCC" "${COMMON[@]}" -x cu --expt-relaxed-constexpr "${GENCODE[@]}" -c "$src" -o "$o" &
  pids+=($!)
  objs+=("$o")
done
for src in cc/engine/plan.cc cc/engine/dtypes.cc; do
  o="$BUILD_DIR/$(basename "$src" .cc).o"
  "$NVCC" "${COMMON[@]}" -x c++ -c "$src" -o "$o" &
  pids+=($!)
  objs+=("$o")
done
"$NVCC" "${COMMON[@]}" -x c++ -I"$PYINC" -I"$PYBIND" -c cuda/harness/harness_module.cc \
  -o "$BUILD_DIR/harness_module.o" &
pids+=($!)
objs+=("$BUILD_DIR/harness_module.o")
for p in "${pids[@]}"; do wait "$p"; done

# (nvcc links the CUDA runtime statically: the module needs only the driver, at first use.)
"$NVCC" -shared "${GENCODE[@]}" "${objs[@]}" -o "$BUILD_DIR/_smallmm_gpu_harness$EXT"
if [ "$DRY" = 1 ]; then
  echo "gpu_check: dry run: harness built, no GPU used"
  exec "$PYTHON" cuda/harness/gpu_check.py --dry-run --harness-dir "$BUILD_DIR"
fi
OUT="$OUT" "$PYTHON" cuda/harness/gpu_check.py --harness-dir "$BUILD_DIR" --out "$OUT" \
  ${ARGS[@]+"${ARGS[@]}"}
