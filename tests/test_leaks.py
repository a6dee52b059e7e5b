"""Leaks: 10 000 calls of each op, after a warm-up, grow the resident set by less than 1 MB
(so less than ~100 bytes per call; error paths: TensorFlow's own per-error growth plus
1 MB, see test_no_rss_growth). Every row of tests/public_ops.py forwards and through
its gradient, the raw ops, the pybind11 module, and the error paths of each (an exception
that leaks its tensors or message is a classic). Measured in a subprocess, from
/proc/self/statm, so the test process's own caches do not interfere.
"""

import json

import pytest

from conftest import run_python
from public_ops import PUBLIC_OPS

pytestmark = pytest.mark.slow  # RSS over thousands of calls, in a subprocess

CALLS = 10_000
WARMUP = 2_000
LIMIT_BYTES = 1 << 20

_CHILD = """
    import gc, json, os, sys
    import numpy as np
    import tensorflow as tf
    sys.path.insert(0, "tests")
    from public_ops import PUBLIC_OPS, RandomPick
    from tf_smallmm._core import loader
    from tf_smallmm import _smallmm_core as core

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    lib = loader.load()
    pick = RandomPick(0)
    calls = {{}}
    for op in PUBLIC_OPS:
        if op.name not in {names!r}:
            continue
        # A few fixed shapes, cycled: all of them are seen during the warm-up.
        inputs = []
        for i, dtype in enumerate([tf.float32, tf.float64, tf.complex64, tf.bfloat16]):
            c = op.inputs(pick, dtype)
            inputs.append(([tf.cast(tf.constant(t), dtype) for t in c.tensors], c.kwargs))
        def forward(op=op, inputs=inputs, n=[0]):
            n[0] += 1
            args, kw = inputs[n[0] % len(inputs)]
            op.fn(*args, **kw)
        def gradient(op=op, inputs=inputs, n=[0]):
            n[0] += 1
            args, kw = inputs[n[0] % 2]  # float32 / float64
            with tf.GradientTape() as tape:
                tape.watch(args)
                y = tf.reduce_sum(op.fn(*args, **kw))
            tape.gradient(y, args)
        # Square matrices with batch dimensions [2] and [3]: an error whatever the flags.
        bad = [tf.ones([2, 4, 4]), tf.ones([3, 4, 4] if op.name == "matmul" else [3, 4])]
        def error(fn, kw=inputs[0][1], bad=bad):
            try:
                fn(*bad, **kw)
            except tf.errors.InvalidArgumentError:
                return
            raise AssertionError("no error")
        calls[op.name] = forward
        calls[op.name + "-gradient"] = gradient
        calls[op.name + "-error"] = lambda error=error, op=op: error(op.fn)
        calls[op.name + "-error-builtin"] = lambda error=error, op=op: error(op.reference)

    x, y = tf.random.normal([6, 4, 5]), tf.random.normal([5, 3])
    calls["raw-product"] = lambda: lib.small_mm_batch_mat_mul(x, y, transpose_y=False)
    calls["raw-reduce"] = lambda: lib.small_mm_batch_mat_mul_reduce(x, y, [1])
    def raw_error():
        try:
            lib.small_mm_batch_mat_mul_reduce(x, y, [-1])
        except tf.errors.InvalidArgumentError:
            pass
    calls["raw-error"] = raw_error
    xn, yn = x.numpy(), y.numpy()
    calls["core"] = lambda: core.matmul(xn, yn)
    calls["core-reduce"] = lambda: core.matmul(xn, yn, batch_shape=[])
    def core_error():
        try:
            core.matmul(xn, xn)
        except ValueError:
            pass
    calls["core-error"] = core_error
    def tf_error():  # TensorFlow's own error path, as the baseline for ours
        try:
            tf.add(tf.ones([2, 3]), tf.ones([4, 5]))
        except tf.errors.InvalidArgumentError:
            pass
    calls["tf-error-baseline"] = tf_error

    out = {{}}
    for name, call in calls.items():
        if {only!r} and name not in {only!r}:
            continue
        for _ in range({warmup}):
            call()
        gc.collect()
        before = rss()
        for _ in range({calls_n}):
            call()
        gc.collect()
        out[name] = rss() - before
    print("RESULT " + json.dumps(out))
"""

_OPS = [op.name for op in PUBLIC_OPS]
_ALL = ([f"{n}{s}" for n in _OPS for s in ("", "-gradient", "-error")] +
        ["raw-product", "raw-reduce", "raw-error", "core", "core-reduce", "core-error"])


@pytest.fixture(scope="module")
def growth():
    """RSS growth per op over CALLS calls, all measured in one subprocess."""
    r = run_python(_CHILD.format(names=_OPS, only=[], warmup=WARMUP, calls_n=CALLS),
                   timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


# Error paths grow by TensorFlow's own cost of a raised op error, about 700 bytes each and
# linear in the count (TF 2.21; measured 2026-12-01 with this file's child: 10 000 errors of
# tf.add grew 7.06-7.17 MB, of tf.linalg.matvec itself (TF_SMALLMM_DISABLE=1) 6.93 MB, of
# smm.matvec 6.41-6.66 MB, 30 000 of each 20.8 and 22.0 MB). Two measurements of that
# growth in one process differ by up to ~10%, so an error path may grow by the larger of
# the two TF baselines (tf.add, and the replaced built-in on the same inputs) plus 15% plus
# the 1 MB: a leak of ours of ~200 bytes per error still fails. (A former xfail on
# matvec-error was this: its limit had no margin for TF's variation.)
TF_ERROR_SPREAD = 1.15


@pytest.mark.parametrize("name", _ALL)
def test_no_rss_growth(name, growth):
    grown = growth[name]
    limit = LIMIT_BYTES
    if name.endswith("-error"):
        # TF's own growth per raised error, measured in the same process (see above).
        baseline = max(growth["tf-error-baseline"], growth.get(name + "-builtin", 0))
        limit += TF_ERROR_SPREAD * max(0, baseline)
    assert grown < limit, (f"{name}: RSS grew by {grown / 1024:.0f} KiB over {CALLS} calls "
                           f"({grown / CALLS:.0f} bytes per call; limit {limit / 1024:.0f} KiB)")
