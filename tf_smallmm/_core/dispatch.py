"""When to use a SmallMM kernel and when to call TensorFlow's built-in instead.

The result, errors and static shapes are the same either way; this only decides speed.
"""

import contextlib
import functools
import os
import threading

import tensorflow as tf
from tensorflow.python.framework import ops

from tf_smallmm._core import loader

# The dtypes the SmallMM ops have kernels for. The library keeps its own list (the ops'
# type attr, and _smallmm_core.dtype_names); tests/test_dispatch.py checks the two agree.
SUPPORTED_DTYPES = frozenset(
    [tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.complex64, tf.complex128])

# Above this many multiply-adds per matrix product (M·N·K) the built-in GEMM (oneDNN /
# Eigen, cuBLAS on GPU) wins: its blocking and packing pay off once a single product is
# large. Chosen 2026-11-25 from `python -m tf_smallmm.bench --sweep` (raw kernel vs
# tf.matmul, batched n×n×n, ~4M elements per operand, 2-core AVX-512, TF 2.21, 2 intra-op
# threads): n = 16 ours 1.13-1.47× faster, n = 24 1.06×, n = 32 level (0.97-1.03×),
# n = 48 and up tf.matmul 1.3-1.8× faster. The full suite the same day (benchmarks/
# RESULTS.md) had 32×32×32 forward at 0.7× of keras batch_dot, so 32³ falls back.
MAX_SMALL_MACS = 24 * 24 * 24

# The kernels take at most this many batch axes (after broadcasting); tf.matmul takes
# more, so wrappers fall back to it above this. Equal to smallmm::kMaxBatchDims
# (cc/engine/smallmm.h; tests/test_dispatch.py checks it through _smallmm_core).
MAX_BATCH_DIMS = 8


class _Forced:
    """How many builtin_ops() blocks are open, in all threads together."""

    lock = threading.Lock()
    depth = 0


@contextlib.contextmanager
def builtin_ops():
    """Within this block every tf_smallmm function and layer traces TF's built-in ops
    instead of SmallMM ops, as under TF_SMALLMM_DISABLE=1.

    Process-wide, not per thread: tf.distribute traces replicas on other threads. Blocks
    may nest and overlap across threads and close in any order: the built-ins are forced
    while any is open. Used by `layers.export_without_plugin`; functions traced before the
    block keep their ops.
    """
    with _Forced.lock:
        _Forced.depth += 1
    try:
        yield
    finally:
        with _Forced.lock:
            _Forced.depth -= 1


def disabled():
    """Whether the TF built-ins are forced everywhere: TF_SMALLMM_DISABLE=1 (for A/B
    checks) or inside builtin_ops()."""
    if _Forced.depth > 0:
        return True
    return os.environ.get("TF_SMALLMM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def in_xla_context():
    """True while tracing inside tf.function(jit_compile=True), where our ops run as XLA
    custom calls if the library has them (`xla_compiles_kernels`)."""
    try:
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))
    except Exception:  # noqa: BLE001 - private API moved: assume no XLA (the op fails loudly)
        return False


@functools.cache
def gpu_without_kernels(op_name="SmallMMBatchMatMul"):
    """Whether this process has a GPU but the library no GPU kernel for `op_name` (a
    CPU-only build on a GPU machine): TF's built-ins then run there instead.

    Cached: devices and registered kernels do not change within a process, and asking
    costs milliseconds, more than a small product.
    """
    if "GPU" in loader.registered_devices(op_name):
        return False
    return bool(tf.config.list_logical_devices("GPU"))


@functools.cache
def xla_compiles_kernels():
    """Whether XLA compiles the SmallMM ops here: the library has their XLA kernels, and
    XLA's registry the custom calls' handlers for the CPU and, on a machine with a GPU,
    for the GPU. Cached, as gpu_without_kernels."""
    need = ["Host"] + (["CUDA"] if tf.config.list_logical_devices("GPU") else [])
    return all(p in loader.xla_platforms() for p in need)


def supports_jit():
    """What the Keras layers with SmallMM ops declare as `supports_jit`: False only where
    compiling with XLA would trade our kernels for the built-in fallback (a library
    without the XLA kernels), so that Keras' automatic XLA (on GPU machines) leaves such
    models alone."""
    uses_kernels = loader.kernels_loaded() and not disabled() and not gpu_without_kernels()
    return not uses_kernels or xla_compiles_kernels()


def use_kernel(dtype, macs=None):
    """Whether a SmallMM op should run a product of this dtype and static size.

    `macs` is M·N·K when all three are statically known, else None (the kernel handles
    any size correctly; unknown sizes are assumed small).
    """
    if disabled() or dtype not in SUPPORTED_DTYPES or not loader.kernels_loaded():
        return False
    if macs is not None and macs > MAX_SMALL_MACS:
        return False
    if in_xla_context() and not xla_compiles_kernels():
        return False
    return not gpu_without_kernels()
