#!/usr/bin/env bash
# Builds tf_smallmm (op library + pybind11 kernel module) with AddressSanitizer and
# UndefinedBehaviorSanitizer into a scratch copy of the tree, runs the test suites against
# that build with the ASan runtime preloaded, and fails on any sanitizer report.
#
# The worktree's own in-place build is never touched: sources are copied to $WORK/src and
# built there (setup.py's compiler is swapped for a g++ wrapper that appends the sanitizer
# flags, so setup.py itself needs no sanitizer mode).
#
# Usage: scripts/sanitize.sh [test files or pytest args...]
#   default tests: every suite but test_leaks.py (RSS under ASan's allocator says nothing
#   about our code) and the two that only run nvcc (test_gpu_ptxas.py, test_gpu_harness.py).
# Environment:
#   SMALLMM_SANITIZE_DIR  scratch dir (default: a new mktemp dir, removed on success)
#   CXX                   the real compiler (default g++; must be GCC for -print-file-name)
#   HYPOTHESIS_PROFILE    defaults to ci
#   SMALLMM_BUILD_LOCK    a file to hold with flock while building (not while testing), on
#                         a machine whose builds take turns
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REAL_CXX=${CXX:-g++}
WORK=${SMALLMM_SANITIZE_DIR:-}
KEEP=1
if [[ -z "$WORK" ]]; then
  WORK=$(mktemp -d -t smallmm-sanitize.XXXXXX)
  KEEP=0
fi
SRC=$WORK/src
LOGS=$WORK/logs
START=$(date +%s)

echo "== sanitize: scratch dir $WORK"
rm -rf "$SRC" "$LOGS"
mkdir -p "$SRC" "$LOGS" "$WORK/bin"
# Sources only: no build outputs, caches or compiled libraries from the worktree
# (benchmarks/: tests/test_kernels.py builds benchmarks/pair_kernel.cc).
(cd "$ROOT" && tar --exclude=build --exclude='*.so' --exclude='*.o' --exclude=__pycache__ \
   --exclude=.hypothesis --exclude=.pytest_cache --exclude='_build_info.json' \
   -cf - setup.py pyproject.toml cc tf_smallmm tests scripts examples benchmarks \
   $( [[ -d cuda ]] && echo cuda )) \
  | tar -C "$SRC" -xf -

# g++ wrapper: setup.py passes -O3 -g0 first; flags given later win.
# Files that include TensorFlow's headers drop UBSan's null / nonnull-attribute checks:
# with them GCC 12 turns off -fdelete-null-pointer-checks, and absl's raw_hash_set.h
# (constexpr comparison of a function pointer with nullptr) then fails to compile. The
# kernel core and the pybind11 module (no TF includes) keep every check.
cat > "$WORK/bin/cxx-sanitize" <<WRAP
#!/bin/sh
extra=
case "\$*" in
  *tensorflow/include*) extra="-fno-sanitize=null,nonnull-attribute,returns-nonnull-attribute" ;;
esac
exec $REAL_CXX "\$@" -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \$extra
WRAP
chmod +x "$WORK/bin/cxx-sanitize"

echo "== sanitize: building with -fsanitize=address,undefined"
(cd "$SRC" && ${SMALLMM_BUILD_LOCK:+flock "$SMALLMM_BUILD_LOCK"} env CXX="$WORK/bin/cxx-sanitize" \
   TF_SMALLMM_CUDA=0 TF_SMALLMM_JOBS=${TF_SMALLMM_JOBS:-2} \
   python setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1) || {
  tail -50 "$WORK/build.log"; echo "== sanitize: BUILD FAILED"; exit 1; }
BUILT=$(date +%s)
echo "== sanitize: built in $((BUILT - START)) s"

if [[ $# -eq 0 ]]; then
  set -- tests/test_kernels.py
  for t in "$SRC"/tests/test_*.py; do
    t=tests/$(basename "$t")
    case "$t" in
      # test_leaks: RSS under ASan's allocator says nothing. test_gpu_ptxas / test_gpu_harness
      # only run nvcc over cuda/ (minutes each) and load nothing of ours into the process.
      tests/test_kernels.py|tests/test_leaks.py|tests/test_gpu_ptxas.py|tests/test_gpu_harness.py) ;;
      *) set -- "$@" "$t" ;;
    esac
  done
fi

# detect_leaks=0: CPython and TensorFlow keep allocations until exit by design (the leak
#   suite, tests/test_leaks.py, measures our growth instead).
# allocator_may_return_null=1: malloc of an absurd size returns NULL as in production
#   instead of aborting; the kernels must report that (MemoryError / ResourceExhausted),
#   and the fuzz suite checks that they do.
# Reports go to log files (also from subprocesses the tests start, which inherit these
# variables), so a report that a test's own error handling would swallow still fails us.
# libstdc++ is preloaded too: python itself does not link it, and ASan's __cxa_throw
# interceptor must find the real one when the first C++ exception is thrown (otherwise
# "CHECK failed: real___cxa_throw != 0").
export LD_PRELOAD="$("$REAL_CXX" -print-file-name=libasan.so) $("$REAL_CXX" -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=0:exitcode=86:log_path=$LOGS/asan:suppressions=$ROOT/scripts/asan.supp"
# UBSan inside the ASan runtime ignores log_path and prints to stderr; halt_on_error=1
# makes any report end its process with status 1, which fails the test (or, in the
# pytest process itself, the run), and the output is scanned for reports below too.
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$ROOT/scripts/ubsan.supp"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export PYTHONDONTWRITEBYTECODE=1

# The tests must import the instrumented build in $SRC, not an installed tf_smallmm.
(cd "$SRC" && python -c "
import os, sys, tf_smallmm
from tf_smallmm import _smallmm_core
here = os.path.realpath(os.path.dirname(tf_smallmm.__file__))
assert here == os.path.realpath('tf_smallmm'), f'imported {here}, not the sanitizer build'
assert tf_smallmm.kernels_loaded(), tf_smallmm.build_info()['load_error']
" > "$WORK/check.log" 2>&1) || { tail -20 "$WORK/check.log"; echo "== sanitize: FAILED: build not importable"; exit 1; }
ldd "$SRC"/tf_smallmm/_smallmm_ops.so | grep libasan > /dev/null || {  # (no -q: SIGPIPE + pipefail)
  echo "== sanitize: FAILED: $SRC/tf_smallmm/_smallmm_ops.so is not linked with ASan"; exit 1; }

echo "== sanitize: running $*"
set +e
(cd "$SRC" && python -m pytest -q -p no:cacheprovider "$@") 2>&1 | tee "$WORK/tests.log"
status=${PIPESTATUS[0]}
set -e
END=$(date +%s)

# With allocator_may_return_null=1, ASan still logs "WARNING: AddressSanitizer failed to
# allocate 0x... bytes" for each refused allocation: those are the fuzz cases working as
# intended, not reports. Anything else in a log file is a report.
reports=
for f in $(find "$LOGS" -type f | sort); do
  if grep -qvE '^==[0-9]+==WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]+ bytes$' "$f"; then
    reports="$reports $f"
  fi
done
if grep -qE 'runtime error:|ERROR: AddressSanitizer|AddressSanitizer: CHECK failed' "$WORK/tests.log"; then
  reports="$reports $WORK/tests.log"
fi
if [[ -n "$reports" ]]; then
  for f in $reports; do
    echo "---- $f"
    if [[ "$f" == "$WORK/tests.log" ]]; then
      grep -E -A30 'runtime error:|AddressSanitizer' "$f" | head -300
    else
      grep -vE 'WARNING: AddressSanitizer failed to allocate' "$f" | head -300
    fi
  done
  echo "== sanitize: FAILED: sanitizer reports above (tests exit status $status)"
  echo "== sanitize: runtime $((END - START)) s (build $((BUILT - START)) s); scratch kept in $WORK"
  exit 1
fi
echo "== sanitize: runtime $((END - START)) s (build $((BUILT - START)) s, tests $((END - BUILT)) s)"
if [[ $status -ne 0 ]]; then
  echo "== sanitize: FAILED: tests exit status $status; scratch kept in $WORK"
  exit "$status"
fi
[[ $KEEP -eq 1 ]] || rm -rf "$WORK"
echo "== sanitize: OK (no sanitizer reports)"
