"""Bad-input fuzzing: the worker that runs a family's cases and the subprocess protocol,
shared by tests/test_fuzz.py (CI: a fixed number of cases per family) and
tests/fuzz_nightly.py (many more, fresh seeds). Each family's case generator and oracle is
in its own module (fuzz_public.py, fuzz_raw.py, fuzz_core.py); what they share is in
fuzz_common.py. Not a test module.

A *family* is a group of cases run in one subprocess (so a crash or hang fails the test
instead of the test run, while TensorFlow is imported once for thousands of cases):

  public   every row of tests/public_ops.py: valid calls mutated — wrong ranks, off-by-some
           dims, wrong and mixed dtypes, non-tensor arguments, odd flag values and unknown
           keywords, numpy/list inputs, zero-element tensors with huge dims, and calls
           through tf.function with unknown rank. Differential: our function must raise
           exactly when TensorFlow's function does (same error class), and otherwise
           return its result.
  raw      the TF ops called directly (SmallMMBatchMatMul, SmallMMBatchMatMulReduce, and
           SmallMMBatchMatMulPair with the mutated product first or second next to a
           valid one), eagerly and through unknown-shape graphs: the same mutations plus bad
           `batch_shape`s (wrong rank, dtype, negative, > 8 entries, huge values whose
           element count overflows int64 or whose allocation must fail). Oracle: a Python
           model of the planner (exact integer shapes) and numpy values.
  core     the pybind11 module (_smallmm_core): numpy arrays of every dtype (unsupported,
           byte-swapped, misaligned, 0-d, views with negative or zero strides, stride-0
           views with huge dims), bad batch_shape and flag values, and set_isa().

Every case must either succeed with the oracle's result or raise a Python exception
whose message is non-empty and (for our own ops) names the problem; never crash, hang,
or grow the process by more than MEMORY_SLACK. The worker writes each case's description
to a progress file before running it, so the parent can say which case crashed.
"""
import faulthandler
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
import traceback

import numpy as np
import tensorflow as tf

from fuzz_common import HERE, check_expect, small_enough
from fuzz_core import TF_OF_NP, core_case
from fuzz_public import check_public, public_case
from fuzz_raw import raw_case
from public_ops import PUBLIC_OPS, RandomPick

FAMILIES = ("public", "raw", "core")
MEMORY_SLACK = 1 << 30  # RSS growth that counts as "allocated absurd memory"
AS_HEADROOM = 4 << 30  # address-space limit above start-up (not under ASan)


# ------------------------------------------------------------------ worker
def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _limit_address_space():
    # A guard for the shared machine: an absurd allocation fails instead of paging the
    # box to death. Not under ASan, which reserves terabytes of shadow address space.
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        return
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = vm + AS_HEADROOM
    if hard == resource.RLIM_INFINITY or want <= hard:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def _case_makers(family, pick):
    """Functions that each build one case: (group, description, thunk, oracle, check)."""
    if family == "public":
        return [lambda op=op: (op.name,) + public_case(op, pick) + (check_public,)
                for op in PUBLIC_OPS]
    if family == "raw":
        return [lambda: ("raw",) + raw_case(pick) + (check_expect,)]
    if family == "core":
        def np_dtype_of(got):
            return TF_OF_NP.get(np.dtype(got.dtype).newbyteorder("="), tf.float64)

        def check(got, err, exp):
            return check_expect(got, err, exp, dtype_of=np_dtype_of)

        return [lambda: ("core",) + core_case(pick) + (check,)]
    raise ValueError(f"unknown fuzz family {family!r}; have {FAMILIES}")


def run_worker(family, seed, count, progress_path, max_failures=20, only=None):
    """Runs `count` cases of `family` in this process; returns the summary dict.
    `only`: a set of case numbers to run (the others are built but not run), to replay
    one case of a seed."""
    faulthandler.enable()
    _limit_address_space()
    tf.get_logger().setLevel("ERROR")
    pick = RandomPick(seed)
    rss0 = _rss()
    failures, per_op, kinds, mode_seconds = [], {}, {"ok": 0, "raised": 0}, {}
    start = time.time()
    makers = _case_makers(family, pick)
    skipped = 0
    with open(progress_path, "w", buffering=1) as progress:
        for i in range(count):
            try:
                group, desc, thunk, oracle, check = makers[i % len(makers)]()
            except Exception:  # noqa: BLE001  (TF or numpy refused to build the inputs)
                skipped += 1
                continue
            if only is not None and i not in only:
                continue
            progress.write(f"{i}\t{desc}\n")
            got = err = None
            t0 = time.time()
            try:
                got = thunk()
                if isinstance(got, tf.Tensor) and small_enough(got.shape.as_list()):
                    got.numpy()  # force the computation (graphs, async eager)
            except Exception as e:  # noqa: BLE001
                err = e
            elapsed = time.time() - t0
            problems = []
            if err is not None:
                kinds["raised"] += 1
                msg = str(err).strip()
                if isinstance(err, SystemError) or not msg:
                    problems.append(f"{type(err).__name__} without a usable message: "
                                    f"{msg[:200]!r}")
            else:
                kinds["ok"] += 1
            try:
                problems += check(got, err, oracle())
            except Exception:  # noqa: BLE001
                problems.append("oracle failed: " + traceback.format_exc()[-600:])
            if elapsed > 20:
                problems.append(f"took {elapsed:.1f} s")
            grown = _rss() - rss0
            if grown > MEMORY_SLACK:
                problems.append(f"RSS grew by {grown >> 20} MiB")
                rss0 = _rss()
            per_op[group] = per_op.get(group, 0) + 1
            mode = (desc.split() + ["-"])[1]
            mode_seconds[mode] = mode_seconds.get(mode, 0.0) + time.time() - t0
            if problems:
                failures.append({"case": i, "desc": desc, "problems": problems})
                if len(failures) >= max_failures:
                    break
    return {"family": family, "seed": seed, "cases": sum(per_op.values()),
            "per_op": per_op, "outcomes": kinds, "skipped": skipped, "failures": failures,
            "mode_seconds": {m: round(t, 2) for m, t in sorted(mode_seconds.items())},
            "seconds": round(time.time() - start, 2), "rss_growth_mib": (_rss() - rss0) >> 20}


# ------------------------------------------------------------------ parent side
MARK = "FUZZ-SUMMARY "


def run_family(family, seed, count, timeout, env=None):
    """Runs one family in a fresh interpreter. Returns (summary or None, error text):
    error text says which case crashed or hung, with the tail of stderr."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".progress", delete=False) as f:
        progress = f.name
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {HERE!r})
        import fuzz_cases
        s = fuzz_cases.run_worker({family!r}, {seed!r}, {count!r}, {progress!r})
        print(fuzz_cases.MARK + json.dumps(s), flush=True)
    """)
    # oneDNN off: TF 2.21's own oneDNN BatchMatMul corrupts the heap on some broadcasts,
    # e.g. tf.linalg.matmul(tf.ones([3, 1, 16, 8]), tf.ones([8, 8])) in float32 (crashes
    # or returns garbage with no tf_smallmm involved). The public family calls that
    # built-in as its reference (and our wrappers fall back to it), so with oneDNN on it
    # would report TensorFlow's crash as ours. Our kernels do not use oneDNN.
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0",
                    **(env or {}))
    # The child imports the same tf_smallmm as this process (installed or in-tree build),
    # never the source folder it happens to run in.
    import tf_smallmm

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tf_smallmm.__file__)))
    full_env["PYTHONPATH"] = os.pathsep.join(
        [package_root, HERE] + [q for q in [os.environ.get("PYTHONPATH")] if q])
    try:
        try:
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=timeout, env=full_env, cwd=HERE, check=False)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", e.stdout or "", e.stderr or ""
            out = out.decode() if isinstance(out, bytes) else out
            err = err.decode() if isinstance(err, bytes) else err
        for line in out.splitlines():
            if line.startswith(MARK) and rc == 0:
                return json.loads(line[len(MARK):]), ""
        with open(progress) as f:
            lines = f.read().splitlines()
        last = lines[-1] if lines else "(before the first case)"
        what = "hung (timeout)" if rc == "timeout" else f"exited with status {rc}"
        return None, (f"fuzz family {family!r} (seed {seed}) {what} at case:\n  {last}\n"
                      f"stderr tail:\n{err[-3000:]}")
    finally:
        os.unlink(progress)
