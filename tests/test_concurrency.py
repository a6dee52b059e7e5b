"""Concurrency: many Python threads calling every op at once get exactly the results of a
serial run, and TensorFlow's thread-pool settings change nothing.

The SmallMM kernels compute each output matrix on one thread in a fixed order, so results
are bitwise deterministic however the work is sharded: the checks compare bytes.

The workload mixes every row of tests/public_ops.py (all dtypes), gradients, the raw reduce
op, the pybind11 module (which releases the GIL while computing) and products big enough
that TF shards them over its intra-op pool.
"""

import hashlib
import json
import threading

import numpy as np
import pytest
import tensorflow as tf

from conftest import DTYPES, GRAD_DTYPES, run_python
from public_ops import PUBLIC_OPS, RandomPick
from tf_smallmm import _smallmm_core as core
from tf_smallmm._core import loader

pytestmark = pytest.mark.slow  # thread stress, and a subprocess per thread-pool setting

THREADS = 8
CALLS_PER_THREAD = 1000
SUBPROCESS_CALLS = 100  # per thread, in each thread-pool setting's subprocess


class _SmallPick(RandomPick):
    def int(self, lo, hi):
        return super().int(lo, min(hi, lo + 5))


def _np(x):
    return np.asarray(x)


def _grad_call(op, args, kwargs, w):
    def call():
        with tf.GradientTape() as tape:
            tape.watch(args)
            out = op.fn(*args, **kwargs)
            s = tf.reduce_sum(out * tf.cast(w, out.dtype))
            loss = tf.math.real(s) if out.dtype.is_complex else s
        return [_np(g) for g in tape.gradient(loss, args)]
    return call


def make_calls(seed, n):
    """`n` deterministic calls (thunks returning numpy arrays) of mixed ops and shapes."""
    pick = RandomPick(seed)
    small = _SmallPick(pick.rng)
    lib = loader.load()
    calls = []
    for i in range(n):
        kind = pick.choice(["table"] * 4 + ["grad", "reduce", "core", "big"])
        op = PUBLIC_OPS[i % len(PUBLIC_OPS)]
        if kind in ("table", "grad"):
            dtype = pick.choice(DTYPES if kind == "table" else GRAD_DTYPES)
            c = op.inputs(small, dtype)
            args = [tf.cast(tf.constant(t), dtype) for t in c.tensors]
            if kind == "table":
                calls.append(lambda op=op, args=args, kw=c.kwargs: _np(op.fn(*args, **kw)))
            else:
                out_shape = op.fn(*args, **c.kwargs).shape
                w = tf.constant(pick.array(out_shape, dtype.is_complex))
                calls.append(_grad_call(op, args, c.kwargs, w))
        elif kind == "reduce":
            dtype = pick.choice(DTYPES)
            b = pick.int(0, 5)
            x = tf.cast(tf.constant(pick.array([b, 3, small.int(0, 17)], dtype.is_complex)),
                        dtype)
            y = tf.cast(tf.constant(pick.array([x.shape[-1], 4], dtype.is_complex)), dtype)
            target = pick.choice([[], [1], [b]])
            calls.append(lambda x=x, y=y, t=target: _np(
                lib.small_mm_batch_mat_mul_reduce(x, y, t, transpose_y=False)))
        elif kind == "core":
            x = pick.array([pick.int(1, 6), 5, small.int(1, 9)]).astype(np.float32)
            y = np.broadcast_to(pick.array([x.shape[-1], 3]).astype(np.float32),
                                (x.shape[0], x.shape[-1], 3))  # stride-0 batch
            calls.append(lambda x=x, y=y: core.matmul(x, y))
        else:  # enough work per call for Shard to split it over the intra-op pool
            x = tf.constant(pick.array([64, 16, 16]), tf.float32)
            y = tf.constant(pick.array([16, 16]), tf.float32)
            calls.append(lambda x=x, y=y: _np(PUBLIC_OPS[0].fn(x, y)))
    return calls


def _as_bytes(result):
    if isinstance(result, list):
        return b"".join(_as_bytes(r) for r in result)
    r = np.ascontiguousarray(result)
    return str(r.shape).encode() + r.dtype.str.encode() + r.tobytes()


def run_serial(workloads):
    return [[_as_bytes(c()) for c in calls] for calls in workloads]


def run_threads(workloads):
    results = [None] * len(workloads)
    errors = []
    barrier = threading.Barrier(len(workloads))

    def work(t):
        try:
            barrier.wait()
            results[t] = [_as_bytes(c()) for c in workloads[t]]
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(workloads))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results


def compare(serial, threaded):
    bad = [(t, i) for t in range(len(serial)) for i in range(len(serial[t]))
           if serial[t][i] != threaded[t][i]]
    return bad


def digest(results):
    h = hashlib.sha256()
    for per_thread in results:
        for r in per_thread:
            h.update(r)
    return h.hexdigest()


def test_threads_match_the_serial_run_bitwise():
    workloads = [make_calls(1000 + t, CALLS_PER_THREAD) for t in range(THREADS)]
    serial = run_serial(workloads)
    threaded = run_threads(workloads)
    bad = compare(serial, threaded)
    assert not bad, f"{len(bad)} of {THREADS * CALLS_PER_THREAD} calls differ, e.g. {bad[:5]}"


# TF reads its thread-pool sizes once, when it initialises: one subprocess per setting.
_CHILD = """
    import json, sys
    import tensorflow as tf
    tf.config.threading.set_inter_op_parallelism_threads({inter})
    tf.config.threading.set_intra_op_parallelism_threads({intra})
    sys.path.insert(0, "tests")
    import test_concurrency as c
    workloads = [c.make_calls(1000 + t, {calls}) for t in range({threads})]
    serial = c.run_serial(workloads)
    threaded = c.run_threads(workloads)
    threading = tf.config.threading
    print("RESULT " + json.dumps({{"bad": c.compare(serial, threaded)[:5],
                                   "digest": c.digest(serial),
                                   "intra": threading.get_intra_op_parallelism_threads(),
                                   "inter": threading.get_inter_op_parallelism_threads()}}))
"""


@pytest.fixture(scope="module")
def reference_digest():
    """Digest of a serial run in this process (default thread pools)."""
    workloads = [make_calls(1000 + t, SUBPROCESS_CALLS) for t in range(THREADS)]
    return digest(run_serial(workloads))


@pytest.mark.parametrize("inter,intra", [(1, 1), (1, 8), (8, 8)])
def test_thread_pool_settings_change_nothing(inter, intra, reference_digest):
    r = run_python(_CHILD.format(inter=inter, intra=intra, calls=SUBPROCESS_CALLS,
                                 threads=THREADS),
                   timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    assert (out["inter"], out["intra"]) == (inter, intra)
    assert not out["bad"], f"threaded results differ from serial ones: {out['bad']}"
    assert out["digest"] == reference_digest, "results depend on the thread-pool settings"
