"""When to use a SmallMM kernel and when to call TensorFlow's built-in instead.

The result, errors and static shapes are the same either way; this only decides speed.
`use_kernel(dtype)` says whether our ops may run here at all (library loaded, dtype,
XLA, GPU, TF_SMALLMM_DISABLE); `choose(dtype, m, n, k, family)` says which side is faster
for a product, from a model measured per CPU class, product family and dtype
(dispatch_model.json): our kernels, the built-in, or (where the caller can build it) the
built-in's forward with our kernels' gradients. Sizes only known at run time get a RUNTIME
answer, and the caller branches in the graph on `kernel_wins(...)`.
"""

import bisect
import contextlib
import functools
import itertools
import json
import os
import threading
import typing

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import ops

from tf_smallmm._core import loader

# The dtypes the SmallMM ops have kernels for. The library keeps its own list (the ops'
# type attr, and _smallmm_core.dtype_names); tests/test_dispatch.py checks the two agree.
SUPPORTED_DTYPES = frozenset(
    [tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.complex64, tf.complex128])

# On a CPU class the model has not measured: above this many multiply-adds per matrix
# product (M·N·K) the built-in GEMM (oneDNN / Eigen, cuBLAS on GPU) wins: its blocking and
# packing pay off once a single product is large. Chosen 2026-11-25 from the n×n×n sweep
# of that day's `python -m tf_smallmm.bench --sweep` (raw kernel vs
# tf.matmul, batched n×n×n, ~4M elements per operand, 2-core AVX-512, TF 2.21, 2 intra-op
# threads): n = 16 ours 1.13-1.47× faster, n = 24 1.06×, n = 32 level (0.97-1.03×),
# n = 48 and up tf.matmul 1.3-1.8× faster. The full suite the same day (benchmarks/
# RESULTS.md) had 32×32×32 forward at 0.7× of keras batch_dot, so 32³ falls back.
MAX_SMALL_MACS = 24 * 24 * 24

# The kernels take at most this many batch axes (after broadcasting); tf.matmul takes
# more, so wrappers fall back to it above this. Equal to smallmm::kMaxBatchDims
# (cc/engine/smallmm.h; tests/test_dispatch.py checks it through _smallmm_core).
MAX_BATCH_DIMS = 8

# The CPU kernels run a batch [B, M, K] · [K, N] that shares B as products of up to this
# many rows (M times a divisor of B), one [B·M, K] · [K, N] GEMM in pieces; the model is
# asked about that product (`folded_rows`). Equal to smallmm::kMaxFoldedRows
# (cc/engine/smallmm.h; tests/test_dispatch.py checks it through _smallmm_core).
MAX_FOLDED_ROWS = 512

# A batch of matrix-vector products W[i] · u[b] that share W along an axis b runs as one
# W[i] · [u[b] ...] product of up to this many columns (N is the largest divisor of b's
# size within it; and M likewise for vector-matrix products sharing B), so the model is
# asked about that product (`folded_columns`). Equal to smallmm::kMaxFoldedColumns
# (cc/engine/smallmm.h; tests/test_dispatch.py checks it through _smallmm_core).
MAX_FOLDED_COLUMNS = 64


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


def use_kernel(dtype):
    """Whether SmallMM ops may run products of this dtype here at all: the library is
    loaded, not disabled, the dtype supported, no GPU without our kernels, and not under
    XLA unless XLA compiles our ops (`xla_compiles_kernels`). Whether they *should* run a
    given product is `choose`'s answer."""
    if disabled() or dtype not in SUPPORTED_DTYPES or not loader.kernels_loaded():
        return False
    if gpu_without_kernels():
        return False
    # (eagerly: never XLA)
    return context.executing_eagerly() or not in_xla_context() or xla_compiles_kernels()


# ------------------------------------------------------------------ the measured model
# Which of the SmallMM kernels and the built-in is faster for a product op(A)[M, K] ·
# op(B)[K, N] is a table per CPU class and dtype (dispatch_model.json, written by
# `python -m tf_smallmm.bench --sweep --write-model`, which says the date and machine).
# The table cuts each of M, N and K into size classes (1, 2, 3-4, 5-8, ..., beyond the
# last bound) and marks the cells (M class, N class, K class) where the built-in wins, per
# product family: DENSE (both operands have every batch axis: the sweep's grid), SHARED
# (one operand broadcast over a batch axis, or a batch axis summed in the kernel: A- /
# B-shared matmul), or FOLDED (matrix-vector products sharing their matrix, which the
# kernels run as one product with the batch as columns: capsule prediction; asked about
# that product, see folded_columns). FOLDED is apart from SHARED because the two run on
# different kernels against different built-in paths: on a Xeon with AMX (2026-12-02)
# bfloat16 A[G,160,8] · B[16,G,8,1] ran 4.05× tf.matmul forward, and A[G,160,8] ·
# B[4,G,8,8], whose products are as wide, 0.79×. TALL: a B shared by every matrix of A,
# [B, M, K] · [K, N]; the kernels run it as one [B·M, K] · [K, N] GEMM in pieces of
# folded_rows, the built-in as one GEMM of all B·M rows, which on a Xeon with AMX ran
# bfloat16 [8192, 16, 16] · [16, 4] at 1.2× our kernels (SWEEP-xeon.md, 2026-12-07) where
# the DENSE cells of the 512-row pieces gave it to them. Asked with M of one matrix. A
# family the model has not measured keeps the size rule below (FOLDED: SHARED's answer for
# one product; TALL: DENSE's for one piece, `per_product`).

KERNEL, BUILTIN, RUNTIME = "kernel", "builtin", "runtime"
# The built-in's forward with our kernels' gradients: cells where the forward of our kernels
# loses and every mode with gradients wins (model mark 'F', tools/sweep.py SPLIT_MIN). On
# a Xeon with AMX (SWEEP.json rows of 2026-12-07, kernels forced) 32 measured cells were
# such, e.g. complex64 [8192, 3, 32] · [8192, 32, 8] at 0.75× forward and 1.17×
# forward+backward; where the worse mode decided they went to the built-in whole. A
# gradient product does not read the forward's output, so the split costs nothing: its
# forward+backward is the built-in's forward and our gradients. Only `choose(...,
# split=True)` answers it (other callers: BUILTIN), and only for sizes known at trace time
# (a run-time branch takes such cells as the built-in's).
GRADIENTS = "gradients"
DENSE, SHARED, FOLDED, TALL = "dense", "shared", "folded", "tall"
# The family a product of a family the model has not measured is asked about instead, with
# the sizes of the product the kernels run (`per_product`).
_UNMEASURED = {FOLDED: SHARED, TALL: DENSE}
_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_model.json")

# CPU features that change how fast the *built-in* is for some dtype (oneDNN uses them),
# so a model measured without them does not hold with them: (cpuinfo flag, class suffix).
_CPU_EXTRAS = (("avx512_bf16", "bf16"), ("avx512_fp16", "fp16"), ("amx_tile", "amx"))

# Where no model was measured for this CPU class, 16-bit products of at least 16³
# multiply-adds go to the built-in: on a CPU with AVX512-FP16 / AMX (Sapphire Rapids,
# TF 2.21, 2026-11) oneDNN ran bf16 / fp16 n×n products from n = 16 up faster than our
# kernels, which accumulate in float32.
UNMEASURED_16BIT_MAX_MACS = 16 * 16 * 16 - 1
SIXTEEN_BIT = frozenset([tf.float16, tf.bfloat16])


class AtLeast(typing.NamedTuple):
    """A size unknown at trace time, with the lower bound its known factors give (a
    merged axis whose other factors are known), e.g. M = batch·128 with batch None."""

    lo: int


class _Everywhere:
    depth = 0


@contextlib.contextmanager
def kernels_everywhere():
    """Within this block the model is not asked: every product the SmallMM ops support
    runs on them (still not when disabled, under XLA, ...). For measuring our kernels
    where the model would send a product to the built-in (the sweep that writes the
    model) and for tests of the kernel path. Process-wide, like builtin_ops()."""
    with _Forced.lock:
        _Everywhere.depth += 1
    try:
        yield
    finally:
        with _Forced.lock:
            _Everywhere.depth -= 1


def everywhere():
    """Whether a kernels_everywhere() block is open."""
    return _Everywhere.depth > 0


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def isa_class():
    """The CPU class the model is keyed by: the ISA our kernels run with (after
    TF_SMALLMM_ISA) and the CPU extras that speed up the built-in, e.g. 'avx512+bf16'."""
    try:
        from tf_smallmm import _smallmm_core as core

        isa = core.active_isa()
    except ImportError:
        return "unknown"
    flags = _cpu_flags()
    return "+".join([isa] + [name for flag, name in _CPU_EXTRAS if flag in flags])


@functools.cache
def model():
    """The measured model (dispatch_model.json), parsed once."""
    with open(_MODEL_PATH) as f:
        return json.load(f)


def size_class(size, bounds):
    """Index of the size class of `size`: the first bound it does not exceed, or
    len(bounds) beyond the last."""
    return bisect.bisect_left(bounds, size)


def _cell_macs(cell, bounds):
    """The largest M·N·K of a cell (infinite for a class beyond the last bound)."""
    out = 1
    for i in cell:
        out *= bounds[i] if i < len(bounds) else float("inf")
    return out


def _measured_class(cpu_class, classes):
    """The model's class for this CPU: its own, else the measured class of the same ISA
    with the most of its extras (the built-in is at most as fast there as here), else
    None."""
    if cpu_class in classes:
        return cpu_class
    isa, *extras = cpu_class.split("+")
    same_isa = [c for c in classes
                if c.split("+")[0] == isa and set(c.split("+")[1:]) <= set(extras)]
    return max(same_isa, key=lambda c: len(c.split("+")), default=None)


def encode_cells(cells, classes, forward=frozenset()):
    """The model file's form of a set of (M, N, K) class cells where the built-in wins: one
    string per M class, of one group per N class (space-separated) of one character per K
    class, '.' where our kernels win, 'B' where the built-in does, 'F' where only its
    forward does (cells of `forward`, which are cells of `cells` too; see GRADIENTS)."""
    def mark(cell):
        return ("F" if cell in forward else "B") if cell in cells else "."

    return [" ".join("".join(mark((m, n, k)) for k in range(classes)) for n in range(classes))
            for m in range(classes)]


def decode_cells(rows, marks="BF"):
    """The set of cells of encode_cells' strings marked with one of `marks`: by default
    those where the built-in wins (whole or the forward only); marks="F" the forward only."""
    return {(m, n, k) for m, row in enumerate(rows) for n, group in enumerate(row.split())
            for k, mark in enumerate(group) if mark in marks}


def _family_measured(dtype_name, cpu_class, family):
    """Whether the model measured this product family and dtype for this CPU class (or
    the class _measured_class takes for it)."""
    data = model()
    entry = data["classes"].get(_measured_class(cpu_class, data["classes"]), {})
    return dtype_name in entry.get("builtin", {}).get(family, {})


@functools.cache
def _table(dtype_name, cpu_class, family):
    """(size bounds, the cells where the built-in wins, those of them where only its forward
    does) for this dtype, CPU class and product family. Not measured for them (see
    _measured_class): the size rule MAX_SMALL_MACS, or for 16-bit dtypes the dense family's
    cells where those were measured (never split); on a CPU class not measured at all,
    16-bit products from 16³ multiply-adds up also go to the built-in whole."""
    data = model()
    source = _measured_class(cpu_class, data["classes"])
    entry = data["classes"].get(source, {})
    # Each measurement keeps the size classes it was fitted with.
    bounds = tuple(entry.get("size_bounds", data["size_bounds"]))
    every = list(itertools.product(range(len(bounds) + 1), repeat=3))
    families = entry.get("builtin", {})
    measured, dense = families.get(family, {}), families.get(DENSE, {})
    forward = set()
    if dtype_name in measured:
        cells = decode_cells(measured[dtype_name])
        forward = decode_cells(measured[dtype_name], "F")
    elif tf.as_dtype(dtype_name) in SIXTEEN_BIT and dtype_name in dense:
        # 16-bit products lose where the kernels' float32 arithmetic loses to the built-in's
        # 16-bit units, which sharing an operand does not change (SWEEP.md of 2026-12-01:
        # bfloat16 A- and B-shared matmuls at 0.39-0.81× in cells the dense model gives to
        # the built-in): a family not measured takes the dense cells.
        cells = decode_cells(dense[dtype_name])
    else:
        cells = {c for c in every if _cell_macs(c, bounds) > MAX_SMALL_MACS}
    if source != cpu_class and tf.as_dtype(dtype_name) in SIXTEEN_BIT:
        large = {c for c in every if _cell_macs(c, bounds) > UNMEASURED_16BIT_MAX_MACS}
        cells, forward = cells | large, forward - large
    return bounds, frozenset(cells), frozenset(forward)


def folded_rows(m, batch):
    """The rows of the products the CPU kernels run for `batch` matrices of M rows that share
    B: M times the largest divisor of the batch that keeps them within MAX_FOLDED_ROWS (as
    FoldForCpuKernels, cc/engine/plan.cc)."""
    most = max(1, MAX_FOLDED_ROWS // max(m, 1))
    return m * max([d for d in range(1, min(batch, most) + 1) if batch % d == 0], default=1)


def folded_rows_at_run_time(m, batch):
    """folded_rows for scalar int64 tensors m and batch (sizes only the run time knows):
    a few small graph ops."""
    most = tf.minimum(batch, tf.maximum(MAX_FOLDED_ROWS // tf.maximum(m, 1), 1))
    d = tf.range(1, MAX_FOLDED_ROWS + 1, dtype=tf.int64)
    # (tf.equal: in a TF1-style graph a tensor's == is Python's identity test, not a graph op.)
    return m * tf.reduce_max(tf.where(tf.logical_and(d <= most, tf.equal(batch % d, 0)), d, 1))


def folded_columns(size):
    """The columns (or rows) of the product the kernels run for a batch of `size`
    matrix-vector products sharing their matrix (FoldLoopsIntoMatrix, cc/engine/plan.cc):
    the largest divisor of size within MAX_FOLDED_COLUMNS. An int, AtLeast(1) for an
    AtLeast (an unknown size may be prime), or a scalar int32 tensor for a tensor."""
    if isinstance(size, AtLeast):
        return AtLeast(1)
    if tf.is_tensor(size):
        size = tf.cast(size, tf.int32)
        d = tf.range(1, MAX_FOLDED_COLUMNS + 1, dtype=tf.int32)
        return tf.reduce_max(tf.where(tf.logical_and(d <= size, tf.equal(size % d, 0)), d, 1))
    return max(d for d in range(1, min(max(size, 1), MAX_FOLDED_COLUMNS) + 1) if size % d == 0)


def _classes(size, bounds):
    """The size classes a size can be in: one when known, every class from its lower
    bound up when it is AtLeast."""
    if isinstance(size, AtLeast):
        return range(size_class(size.lo, bounds), len(bounds) + 1)
    return (size_class(size, bounds),)


@functools.lru_cache(maxsize=4096)
def _model_choice(dtype, m, n, k, family, cpu_class, per_product=None):
    if family in _UNMEASURED and not _family_measured(dtype.name, cpu_class, family):
        (m, n, k), family = per_product, _UNMEASURED[family]
    bounds, builtin, forward = _table(dtype.name, cpu_class, family)
    cells = set(itertools.product(*(_classes(s, bounds) for s in (m, n, k))))
    if not cells & builtin:
        return KERNEL
    if cells <= forward:
        return GRADIENTS
    return BUILTIN if cells <= builtin else RUNTIME


def choose(dtype, m, n, k, family=DENSE, per_product=None, split=False):
    """KERNEL, BUILTIN or RUNTIME for a product op(A)[M, K] · op(B)[K, N] of `dtype`
    (batched or not) of a family (DENSE, SHARED, FOLDED or TALL): each of m, n, k is an int or an
    AtLeast when only the run time knows it. RUNTIME: the model's answer depends on sizes
    unknown at trace time; the caller branches on `kernel_wins(...)` in the graph. Cheap
    after the first call for a signature (eager code asks on every call). With `split`,
    also GRADIENTS: the built-in's forward with our kernels' gradients (else BUILTIN there).

    per_product: for FOLDED, the (M, N, K) of one of the products folded into m, n, k.
    Where the model has not measured FOLDED, that product is asked about as SHARED: the
    fallbacks (the size rule, the dense cells) were fitted to single products, and a
    folded capsule prediction (160×8 · 8×50) is far above the size rule's bound while each
    of its products (160×8 · 8×1) is not. For TALL, the (rows, N, K) of the pieces the
    kernels run (folded_rows), asked about as DENSE where TALL was not measured."""
    if not use_kernel(dtype):
        return BUILTIN
    if everywhere():
        return KERNEL
    choice = _model_choice(dtype, m, n, k, family, isa_class(), per_product)
    return BUILTIN if choice == GRADIENTS and not split else choice


def kernel_wins(dtype, m, n, k, family=DENSE, per_product=None):
    """The model's answer as a boolean scalar tensor, for sizes that are ints or scalar
    int32 tensors (the run-time sizes of a RUNTIME choice): whether the size classes
    they fall in are cells where our kernels win. A few small graph ops. per_product as
    in choose."""
    if family in _UNMEASURED and not _family_measured(dtype.name, isa_class(), family):
        (m, n, k), family = per_product, _UNMEASURED[family]
    bounds, builtin, _ = _table(dtype.name, isa_class(), family)
    sizes = (m, n, k)
    unknown = [i for i, s in enumerate(sizes) if tf.is_tensor(s)]
    known = [(size_class(s, bounds),) if i not in unknown else range(len(bounds) + 1)
             for i, s in enumerate(sizes)]
    # Whether our kernels win, over the size classes of the unknown sizes only.
    table = np.zeros([len(bounds) + 1] * len(unknown), bool)
    for cell in itertools.product(*known):
        table[tuple(cell[i] for i in unknown)] = cell not in builtin
    if not table.any() or table.all():
        return tf.constant(bool(table.all()))
    if len(unknown) == 1 and not table[np.argmin(table):].any():
        # The usual case (one merged axis with an unknown batch): ours up to a size.
        return tf.less_equal(sizes[unknown[0]], bounds[np.argmin(table) - 1])
    index = tf.constant(0, tf.int32)
    for i in unknown:
        cls = tf.raw_ops.Bucketize(input=tf.cast(sizes[i], tf.int32),
                                   boundaries=[b + 1.0 for b in bounds])
        index = index * (len(bounds) + 1) + cls
    return tf.gather(tf.constant(table.reshape(-1)), index)
