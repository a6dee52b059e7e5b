"""Shared test helpers: dtypes, devices, tolerances, references, subprocess runner.

References are TensorFlow's own ops evaluated in float64 / complex128 on the same
(already rounded) inputs, so the only differences allowed are our rounding errors.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tf_smallmm as smm

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.complex64, tf.complex128]
FLOAT_DTYPES = [tf.float32, tf.float64]
GRAD_DTYPES = [tf.float32, tf.float64, tf.complex128]

HAVE_GPU = bool(tf.config.list_physical_devices("GPU"))
# Every device test runs on each device present; GPU cases are skipped, not deleted,
# on machines without one.
DEVICES = ["CPU", pytest.param("GPU", marks=pytest.mark.skipif(not HAVE_GPU, reason="no GPU"))]

# Per-dtype relative tolerance against the forward error bound |a|·|b| (see assert_close).
_TOL = {
    tf.float16: 2e-3,
    tf.bfloat16: 1.6e-2,
    tf.float32: 2e-6,
    tf.float64: 1e-14,
    tf.complex64: 4e-6,
    tf.complex128: 2e-14,
}


def tolerance(dtype):
    return _TOL[tf.as_dtype(dtype)]


def wide(dtype):
    """The float64 / complex128 reference dtype for `dtype`."""
    return tf.complex128 if tf.as_dtype(dtype).is_complex else tf.float64


def random_tensor(shape, dtype, seed=0, integers=False):
    """A tensor of `dtype`; `integers=True` gives small integers (exact in every dtype)."""
    dtype = tf.as_dtype(dtype)
    rng = np.random.default_rng(seed)
    if integers:
        draw = lambda: rng.integers(-2, 3, size=shape).astype(np.float64)
    else:
        draw = lambda: rng.uniform(-1, 1, size=shape)
    x = draw()
    if dtype.is_complex:
        x = x + 1j * draw()
    return tf.cast(tf.constant(x), dtype)


def assert_close(actual, expected, dtype, bound=None):
    """|actual - expected| <= tol(dtype) * (bound + 1), elementwise.

    `bound` is the forward error scale, e.g. |a|·|b| for a product (defaults to
    |expected|); `expected` is a float64/complex128 reference on the same inputs.
    """
    actual = np.asarray(tf.cast(actual, wide(dtype)))
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected) if bound is None else np.asarray(bound)
    err = np.abs(actual - expected)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    ok = (err <= tolerance(dtype) * (scale + 1)) | nan
    if not ok.all():
        i = np.unravel_index(np.argmax(np.where(ok, 0, err)), err.shape)
        raise AssertionError(
            f"{tf.as_dtype(dtype).name}: {(~ok).sum()} of {ok.size} elements off; worst at "
            f"{i}: got {actual[i]}, want {expected[i]} (bound {scale[i]})")


def smallmm_ops(fn_or_graph):
    """Types of the SmallMM* ops in a tf.function's graph (or a tf.Graph)."""
    graph = getattr(fn_or_graph, "graph", fn_or_graph)
    found = set()
    for op in graph.get_operations():
        if op.type.startswith("SmallMM"):
            found.add(op.type)
    for f in graph._functions.values():  # gradients / nested functions
        for node in f.definition.node_def:
            if node.op.startswith("SmallMM"):
                found.add(node.op)
    return found


def run_python(code, env=None, timeout=120):
    """Runs `code` in a fresh interpreter: a crash (segfault, abort) fails the caller's
    test instead of killing the test process. Returns CompletedProcess."""
    full_env = dict(os.environ)
    # The child imports the same tf_smallmm as this process (installed or in-tree build),
    # never a source checkout that happens to be its working directory.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(smm.__file__)))
    full_env["PYTHONPATH"] = os.pathsep.join(
        [package_root, os.path.dirname(os.path.abspath(__file__))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p])
    full_env.update(env or {})
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, check=False,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def on_kernels():
    """For tests of the kernel path: every product our ops support runs on them, whatever
    the dispatch model measured on this CPU (it may send a test's shape to the built-in)."""
    from tf_smallmm._core import dispatch

    with dispatch.kernels_everywhere():
        yield


@pytest.fixture(scope="session", autouse=True)
def _kernels_are_loaded():
    # Tests of our kernels must not silently pass on the built-in fallback.
    if os.environ.get("TF_SMALLMM_DISABLE", "") in ("", "0"):
        assert smm.kernels_loaded(), smm.build_info()["load_error"]


def small_capsnet(routings=3, seed=0, dtype=None):
    """The tests' CapsNet on 6×6×1 inputs: Conv -> PrimaryCapsules (2·2·4 = 16 capsules of 4)
    -> CapsuleLayer(3 × 8) -> Length. Seeded, so two calls build the same weights."""
    import keras

    from tf_smallmm import layers as caps

    keras.utils.set_random_seed(seed)
    x = inp = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", dtype=dtype)(x)
    x = caps.PrimaryCapsules(4, 4, 3, dtype=dtype)(x)
    v = caps.CapsuleLayer(3, 8, routings=routings, dtype=dtype,
                          kernel_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=1))(x)
    return keras.Model(inp, caps.Length(dtype=dtype)(v))
