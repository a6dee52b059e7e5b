"""Bad-input fuzzing: the case generators, the oracles and the subprocess protocol shared
by tests/test_fuzz.py (CI: a fixed number of cases per family) and tests/fuzz_nightly.py
(many more, fresh seeds). Not a test module.

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
import math
import os
import re
import resource
import subprocess
import sys
import textwrap
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import ml_dtypes  # noqa: E402
import tensorflow as tf  # noqa: E402

from conftest import DTYPES, tolerance, wide  # noqa: E402
from public_ops import PUBLIC_OPS, RandomPick, broadcast_batches, matrix_dims  # noqa: E402
from public_ops import np_product, np_reduce_to  # noqa: E402

import tf_smallmm  # noqa: E402,F401
from tf_smallmm._core import loader  # noqa: E402
from tf_smallmm import _smallmm_core as core  # noqa: E402

FAMILIES = ("public", "raw", "core")
MAX_BATCH = core.max_batch_dims
INT64_MAX = 2**63 - 1
MEMORY_SLACK = 1 << 30  # RSS growth that counts as "allocated absurd memory"
AS_HEADROOM = 4 << 30  # address-space limit above start-up (not under ASan)

# Message patterns that "name the problem" (case-insensitive), per problem.
P_RANK = r"rank|ndims"
P_MATRIX = r"size-incompatible|must be equal|incompatible"
P_BATCH = r"batch dimensions|incompatible shapes|broadcast|compatible"
P_MANY = r"at most \d+ batch dimensions"
P_DTYPE = r"dtype|datatype|type|byte order|allowed values|expected to be a"
P_NEG = r"negative"
P_BSHAPE = r"batch_shape must be a vector|rank 1|vector"
P_BIG = r"overflow|oom|allocat|too many elements|too big|more than 2\*\*63|maximum"
P_ALIGN = r"aligned|strides"


# ------------------------------------------------------------------ shared pieces
class SmallPick(RandomPick):
    """RandomPick whose int ranges are cut to at most 6 values: the table's generators then
    make small shapes, so a fuzz case costs tens of microseconds, not milliseconds."""

    def int(self, lo, hi):
        return super().int(lo, min(hi, lo + 5))


class Expect:
    """What a case must do. kind: 'ok' (value/shape given when known), 'error' (patterns:
    one must match the message; None = any non-empty message), 'any' (no crash)."""

    def __init__(self, kind, value=None, bound=None, shape=None, patterns=None, exc=None):
        self.kind, self.value, self.bound, self.shape = kind, value, bound, shape
        self.patterns, self.exc = patterns, exc


ANY = Expect("any")

_VARIABLE = None


def weird_objects():
    """Arguments that are not tensors of the right kind."""
    global _VARIABLE
    if _VARIABLE is None:
        _VARIABLE = tf.Variable(tf.ones([2, 2]))
    return [None, "abc", b"xy", object(), {}, {"a": 1}, [], [[1.0, 2.0], [3.0]],
            [[1.0, 2.0], [3.0, 4.0]], 3.5, 7, True, 1 + 2j, np.array(["a", "b"]),
            np.array([object()]), np.float64(2.0), set(), (1, 2), lambda: 0, slice(1),
            Ellipsis, float("nan"), 2**70, tf.SparseTensor([[0, 0]], [1.0], [2, 2]),
            tf.ragged.constant([[1.0], [2.0, 3.0]]), _VARIABLE, tf.constant("s"),
            np.ones((2, 2), np.int8), np.ones((2, 2), np.float32).view(np.uint8)]


WEIRD_FLAGS = [None, "yes", "", 2, 0, 1.5, np.array([1, 0]), np.bool_(True), [],
               "False", object(), -1, 2**70]
EXTRA_DTYPES = [tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16, tf.bool,
                tf.string, tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.complex64,
                tf.complex128]


def describe(x):
    if isinstance(x, tf.Tensor):
        return f"{x.dtype.name}{list(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"np.{x.dtype.str}{list(x.shape)}:{list(x.strides)}"
    r = repr(x)
    limit = 300 if isinstance(x, dict) else 60
    return r if len(r) < limit else r[:limit - 3] + "..."


def random_values(pick, shape, dtype):
    """A tensor of `shape` and any dtype (strings and bools included)."""
    dtype = tf.as_dtype(dtype)
    x = pick.array(shape, dtype.is_complex)
    if dtype == tf.string:
        return tf.fill(shape, "a")
    if dtype == tf.bool:
        return tf.constant(x > 0)
    if dtype.is_integer:
        return tf.cast(tf.constant(np.round(x * 3)), dtype)
    return tf.cast(tf.constant(x), dtype)


def random_shape(pick, rank):
    return [pick.choice([0, 1, 1, 2, 3, 4, 5]) for _ in range(rank)]


def random_rank(pick):
    return pick.choice([0, 1, 2, 3, 4, MAX_BATCH + 1, MAX_BATCH + 2, MAX_BATCH + 3,
                        MAX_BATCH + 4])


def mutate_dims(pick, shape):
    shape = list(shape)
    if not shape:
        return [pick.int(1, 3)]
    i = pick.int(0, len(shape) - 1)
    shape[i] = pick.choice([0, 1, shape[i] + 1, shape[i] + 2, max(0, shape[i] - 1),
                            2 * shape[i] + 1])
    return shape


def huge_zero_shape(pick, matrix):
    """A shape with zero elements but astronomically large other dims (0 first, so that
    TensorFlow's sequential element-count check accepts it), ending in `matrix`."""
    batch = [0] + [pick.choice([2**31, 2**40, 2**62, 3]) for _ in range(pick.int(1, 3))]
    return batch + list(matrix)


def huge_zero_tensor(shape, dtype):
    return tf.reshape(tf.zeros([0], dtype), shape)


# ------------------------------------------------------------------ planner model
def plan_model(xs, ys, tx, ty, target):
    """(out_shape, reduced_count, problems) that PlanBatchMatMul must produce, in exact
    Python ints. `problems` is a list of message patterns; empty means valid."""
    problems = []
    if len(xs) < 2 or len(ys) < 2:
        return None, 0, [P_RANK]
    if target is not None and any(t < 0 for t in target):
        problems.append(P_NEG)
    ra, rb = len(xs) - 2, len(ys) - 2
    rt = len(target) if target is not None else 0
    nb = max(ra, rb, rt)
    if nb > MAX_BATCH:
        problems.append(P_MANY)
    m, ka = (xs[-1], xs[-2]) if tx else (xs[-2], xs[-1])
    kb, n = (ys[-1], ys[-2]) if ty else (ys[-2], ys[-1])
    if ka != kb:
        problems.append(P_MATRIX)
    pa = [1] * (nb - ra) + list(xs[:-2])
    pb = [1] * (nb - rb) + list(ys[:-2])
    pt = [1] * (nb - rt) + (list(target) if target is not None else [])
    full, reduced = [], 1
    for da, db, dt in zip(pa, pb, pt):
        f = 1
        for s in (da, db, dt):
            if s == 1:
                continue
            if f == 1:
                f = s
            elif s != f:
                problems.append(P_BATCH)
        full.append(f)
        if target is not None and f != 1 and (dt == 1):
            reduced *= f
    if problems:
        return None, 0, problems
    batch = full if target is None else list(target)
    out = batch + [m, n]
    # Like TensorShape, the element count is checked as a running product, so a shape
    # with a 0 after dims whose product overflows is refused too.
    running = 1
    for d in out:
        running *= d
        if running > INT64_MAX:
            return None, 0, [P_BIG]
    if reduced > INT64_MAX:
        return None, 0, [P_BIG]
    return out, reduced, []


def _small_enough(*shapes):
    """Whether numpy can model these shapes cheaply (zero-element tensors may still have
    astronomically large dims)."""
    return all(math.prod(s) <= 200_000 and all(d <= 100_000 for d in s) for s in shapes)


def close(got, want, bound, dtype):
    got = np.asarray(got).astype(want.dtype)
    err = np.abs(got - want)
    ok = err <= 4 * tolerance(dtype) * (np.abs(bound) + 1)
    return bool(np.all(ok | (np.isnan(want) & np.isnan(got))))


def error_kind(e):
    if isinstance(e, tf.errors.OpError):
        return type(e).__name__
    for k in (TypeError, ValueError):
        if isinstance(e, k):
            return k.__name__
    return type(e).__name__


def _modes(modes):
    """SMALLMM_FUZZ_MODES=rank,dims restricts the mutations (for narrowing a failure down)."""
    only = os.environ.get("SMALLMM_FUZZ_MODES")
    return [m for m in modes if m in only.split(",")] or modes if only else modes


# ------------------------------------------------------------------ public family
_GRAPH_CACHE = {}


def _graph_fn(fn, key, n_args, dtype, kwargs):
    """fn(*tensors, **kwargs) inside a tf.function whose inputs have unknown rank."""
    k = (key, dtype, n_args, tuple(sorted((a, repr(b)) for a, b in kwargs.items())))
    if k not in _GRAPH_CACHE:
        specs = [tf.TensorSpec(None, dtype)] * n_args
        _GRAPH_CACHE[k] = tf.function(lambda *xs: fn(*xs, **kwargs), input_signature=specs)
    return _GRAPH_CACHE[k]


def _wide_abs(args):
    return [tf.cast(tf.abs(a), tf.float64) for a in args]


def public_case(op, pick):
    """One mutated call of a table row: (description, thunk, oracle)."""
    dtype = pick.choice(DTYPES)
    call = op.inputs(SmallPick(pick.rng), dtype)
    args = [tf.cast(tf.constant(t), dtype) for t in call.tensors]
    kw = dict(call.kwargs)
    mode = pick.choice(_modes(["valid", "rank", "dims", "dims", "dtype", "nontensor",
                               "kwarg", "numpy", "huge", "graph", "graph"]))
    j = pick.int(0, len(args) - 1)
    graph = False
    if mode == "rank":
        args[j] = random_values(pick, random_shape(pick, random_rank(pick)), dtype)
    elif mode == "dims":
        args[j] = random_values(pick, mutate_dims(pick, args[j].shape.as_list()), dtype)
    elif mode == "dtype":
        new = pick.choice(EXTRA_DTYPES)
        targets = range(len(args)) if pick.bool() else [j]
        for i in targets:
            args[i] = random_values(pick, args[i].shape.as_list(), new)
    elif mode == "nontensor":
        args[j] = pick.choice(weird_objects())
    elif mode == "kwarg":
        key = pick.choice(sorted(kw) + ["name", "output_type", "a_is_sparse", "bogus_kw"])
        kw[key] = pick.choice(WEIRD_FLAGS + [True, False, tf.float64, "x/y"])
    elif mode == "numpy":
        args = [np.asarray(a) if pick.bool() else np.asarray(a).tolist() for a in args]
    elif mode == "huge":
        if dtype in (tf.float32, tf.float64, tf.complex64):
            args[j] = huge_zero_tensor(huge_zero_shape(pick, args[j].shape.as_list()[-2:]),
                                       dtype)
    elif mode == "graph":
        dtype = pick.choice([tf.float32, tf.complex64])
        call = op.inputs(SmallPick(pick.rng), dtype)
        args = [tf.cast(tf.constant(t), dtype) for t in call.tensors]
        kw = dict(call.kwargs)
        sub = pick.int(0, 2)
        if sub == 1:
            args[j] = random_values(pick, random_shape(pick, random_rank(pick)), dtype)
        elif sub == 2:
            args[j] = random_values(pick, mutate_dims(pick, args[j].shape.as_list()), dtype)
        graph = True

    desc = (f"public.{op.name} {mode} "
            f"args=({', '.join(describe(a) for a in args)}) kwargs={describe(kw)}")
    huge = mode == "huge"
    # Batch axes beyond the kernels' limit (a vector argument gains a matrix axis).
    ranks_over = any(isinstance(a, tf.Tensor) and a.shape.rank is not None
                     and a.shape.rank - 1 > MAX_BATCH for a in args)

    if graph:
        f = _graph_fn(op.fn, op.name, len(args), dtype, kw)

        def thunk():
            return f(*args)
    else:
        def thunk():
            return op.fn(*args, **kw)

    def oracle():
        if huge:
            return ANY  # the built-in is not called: TF's own kernels overflow on these
        if graph and ranks_over:
            return ANY  # known limit: > 8 batch dims with unknown rank raise in the kernel
        try:
            want = op.reference(*args, **kw)
        except Exception as e:  # noqa: BLE001
            return Expect("error", exc=e)
        bound = None
        if isinstance(want, tf.Tensor) and (want.dtype.is_floating or want.dtype.is_complex):
            try:
                bound = np.asarray(op.reference(*_wide_abs([tf.convert_to_tensor(a)
                                                            for a in args]), **kw))
            except Exception:  # noqa: BLE001
                bound = None
        return Expect("ok", value=want, bound=bound)

    return desc, thunk, oracle


def check_public(got, err, exp):
    """Differential check against the reference: problems as strings."""
    if exp.kind == "any":
        return []
    if exp.kind == "error":
        if err is None:
            return [f"returned {describe(got)} where the reference raised "
                    f"{type(exp.exc).__name__}: {str(exp.exc)[:150]}"]
        if error_kind(err) != error_kind(exp.exc):
            return [f"raised {error_kind(err)} where the reference raised "
                    f"{error_kind(exp.exc)} ({str(exp.exc)[:120]})"]
        return []
    if err is not None:
        return [f"rejected a call the reference accepts: {type(err).__name__}: "
                f"{str(err)[:200]}"]
    want = exp.value
    if not isinstance(got, tf.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
        return [f"returned {describe(got)}, reference {describe(want)}"]
    if exp.bound is not None and want.shape.num_elements():
        w = tf.cast(want, wide(want.dtype)).numpy()
        if not close(tf.cast(got, wide(got.dtype)).numpy(), w, exp.bound, want.dtype):
            return ["values differ from the reference beyond tolerance"]
    elif want.dtype.is_integer or want.dtype == tf.bool:
        if not np.array_equal(got.numpy(), want.numpy()):
            return ["values differ from the reference"]
    return []


# ------------------------------------------------------------------ raw-op family
def _raw_graph_fn(reduce, dtype, shape_dtype, flags):
    k = ("raw", reduce, dtype, shape_dtype, tuple(sorted(flags.items())))
    if k not in _GRAPH_CACHE:
        lib = loader.load()
        if reduce:
            specs = [tf.TensorSpec(None, dtype)] * 2 + [tf.TensorSpec([None], shape_dtype)]
            fn = lambda x, y, s: lib.small_mm_batch_mat_mul_reduce(x, y, s, **flags)  # noqa
        else:
            specs = [tf.TensorSpec(None, dtype)] * 2
            fn = lambda x, y: lib.small_mm_batch_mat_mul(x, y, **flags)  # noqa
        _GRAPH_CACHE[k] = tf.function(fn, input_signature=specs)
    return _GRAPH_CACHE[k]


GRAPH_FLAGS = [dict(transpose_x=False, conjugate_x=False, transpose_y=False, conjugate_y=False),
               dict(transpose_x=True, conjugate_x=True, transpose_y=False, conjugate_y=True)]


def _random_flags(pick):
    return dict(transpose_x=pick.bool(), conjugate_x=pick.bool(), transpose_y=pick.bool(),
                conjugate_y=pick.bool())


def _valid_operands(pick):
    m, n, k = matrix_dims(pick, 3)
    bx, by = broadcast_batches(pick, 2)
    flags = _random_flags(pick)
    xs = bx + ([k, m] if flags["transpose_x"] else [m, k])
    ys = by + ([n, k] if flags["transpose_y"] else [k, n])
    return xs, ys, flags, list(np.broadcast_shapes(tuple(bx), tuple(by)))


def _random_target(pick, full):
    if pick.int(0, 2) == 0:
        return random_shape(pick, pick.int(0, 3))
    target = [d if pick.bool() else 1 for d in full[pick.int(0, len(full)):]]
    return target


def raw_case(pick):
    lib = loader.load()
    sp = SmallPick(pick.rng)
    reduce = pick.bool()
    mode = pick.choice(_modes(["valid", "rank", "dims", "dims", "dtype", "nontensor", "flag",
                               "many", "huge", "bigshape", "bs", "bs", "graph", "graph"]))
    # Graph cases trace one tf.function per (dtype, flags): keep that set small.
    dtype = pick.choice(DTYPES if mode != "graph" else [tf.float32, tf.complex64])
    xs, ys, flags, full = _valid_operands(sp)
    if mode == "graph":
        flags = dict(pick.choice(GRAPH_FLAGS))
    x, y = random_values(pick, xs, dtype), random_values(pick, ys, dtype)
    target = _random_target(sp, full) if reduce else None
    bs = target  # what is passed as batch_shape (may be mutated to a non-shape)
    shape_dtype = pick.choice([tf.int32, tf.int64])
    j = pick.int(0, 1)
    graph = False

    def set_arg(i, v):
        nonlocal x, y
        if i == 0:
            x = v
        else:
            y = v

    if mode == "rank":
        set_arg(j, random_values(pick, random_shape(pick, random_rank(pick)), dtype))
    elif mode == "dims":
        set_arg(j, random_values(pick, mutate_dims(pick, [x, y][j].shape.as_list()), dtype))
    elif mode == "dtype":
        new = pick.choice(EXTRA_DTYPES)
        for i in ([0, 1] if pick.bool() else [j]):
            set_arg(i, random_values(pick, [x, y][i].shape.as_list(), new))
    elif mode == "nontensor":
        set_arg(j, pick.choice(weird_objects()))
    elif mode == "flag":
        flags[pick.choice(sorted(flags))] = pick.choice(WEIRD_FLAGS)
    elif mode == "many":  # more batch axes than the kernels take (maybe through target)
        extra = [pick.choice([1, 2]) for _ in range(MAX_BATCH + pick.int(-1, 2))]
        if reduce and pick.bool():
            bs = target = extra + list(target)
        else:
            set_arg(j, random_values(pick, extra + [x, y][j].shape.as_list(), dtype))
    elif mode == "huge":  # zero elements, astronomically large other dims
        set_arg(j, huge_zero_tensor(huge_zero_shape(pick, [x, y][j].shape[-2:]), dtype))
        if reduce and pick.bool():
            bs = target = [pick.choice([0, 1, 2])] + list(target)
    elif mode == "bigshape":
        # Outputs whose element count overflows int64 whatever M and N are. (Outputs that
        # merely cannot be allocated are cases of their own in fuzz_nightly.py: TF's
        # allocator retries for 10 s before it reports OOM.)
        reduce = True
        bs = target = pick.choice([[2**40, 2**40], [2**62, 4], [INT64_MAX, 2],
                                   [2**31, 2**31, 2**31], [3, 2**62], [2**40, 2**40, 0]])
        shape_dtype = tf.int64
    elif mode == "bs" and reduce:
        bs = pick.choice([[-1], [-5], [2, -1], [[2]], 3, [1] * (MAX_BATCH + 1), [1.5],
                          "ab", None, [2**63 - 1, 2], [], np.array([-(2**40)]),
                          tf.constant([[1, 2]]), tf.constant(2), tf.constant([1.0]),
                          tf.zeros([0], tf.int64), [True]])
        target = None
    elif mode == "graph":
        graph = True
        sub = pick.int(0, 3)
        if sub == 1:
            set_arg(j, random_values(pick, random_shape(pick, random_rank(pick)), dtype))
        elif sub == 2:
            set_arg(j, random_values(pick, mutate_dims(pick, [x, y][j].shape.as_list()),
                                     dtype))
        elif sub == 3 and reduce:
            bs = target = pick.choice([[-1], [2, -3], [1] * (MAX_BATCH + 1), [2**40, 2**40],
                                       [0]] + [random_shape(pick, 2)])

    # Tensors for batch_shape: as given (list / array / tensor), or as an int tensor.
    if reduce and isinstance(bs, list) and all(isinstance(v, int) for v in bs) and bs and \
            pick.bool():
        try:
            bs = tf.constant(bs, shape_dtype)
        except Exception:  # noqa: BLE001  (out of int32 range)
            bs = tf.constant(bs, tf.int64)
    # Half of the eager reduce cases go through the Pair op, the mutated product in slot
    # `slot` (0 or 1) next to a valid product of the same dtype in the other.
    # Only batch_shapes TF converts the same way with or without a second batch_shape
    # beside them (the Pair op infers one Tshape from both): int tensors and int lists.
    plain_bs = (isinstance(bs, tf.Tensor) and bs.dtype in (tf.int32, tf.int64)) or (
        isinstance(bs, list) and all(type(v) is int for v in bs))
    pair = reduce and not graph and plain_bs and pick.bool()
    slot = pick.int(0, 1)
    desc = (f"raw.{'pair' + str(slot + 1) if pair else 'reduce' if reduce else 'product'} "
            f"{mode}{' graph' if graph else ''} "
            f"x={describe(x)} y={describe(y)} batch_shape={describe(bs)} "
            f"flags={describe(flags)}")

    if graph:
        sd = bs.dtype if isinstance(bs, tf.Tensor) else tf.int32
        if reduce and not isinstance(bs, tf.Tensor):
            bs = tf.constant(bs, sd if max(map(abs, bs), default=0) < 2**31 else tf.int64)
            sd = bs.dtype
        f = _raw_graph_fn(reduce, dtype, sd, flags)

        def thunk():
            return f(x, y, bs) if reduce else f(x, y)
    elif pair:
        # The valid product: x's dtype (T is one attr for both), a batch_shape of the
        # mutated one's integer type.
        ok_dtype = x.dtype if isinstance(x, tf.Tensor) else dtype
        ok_bs = tf.constant([2], bs.dtype if isinstance(bs, tf.Tensor) else
                            tf.int64 if any(abs(v) >= 2**31 for v in bs) else tf.int32)
        ok = (tf.ones([2, 3, 4], ok_dtype), tf.ones([2, 4, 5], ok_dtype), ok_bs)
        ok_flags = dict(transpose_x=False, conjugate_x=False, transpose_y=False,
                        conjugate_y=False)

        def thunk():
            products = [(x, y, bs), ok] if slot == 0 else [ok, (x, y, bs)]
            attrs = [flags, ok_flags] if slot == 0 else [ok_flags, flags]
            kwargs = {f"{k}_{i + 1}": v for i, a in enumerate(attrs) for k, v in a.items()}
            return lib.small_mm_batch_mat_mul_pair(*products[0], *products[1], **kwargs)[slot]
    elif reduce:
        def thunk():
            return lib.small_mm_batch_mat_mul_reduce(x, y, bs, **flags)
    else:
        def thunk():
            return lib.small_mm_batch_mat_mul(x, y, **flags)

    def oracle():
        return raw_oracle(x, y, reduce, bs, flags)

    return desc, thunk, oracle


def raw_oracle(x, y, reduce, bs, flags):
    if not all(isinstance(v, bool) for v in flags.values()):
        return ANY  # TF's attr conversion decides (it takes None as the default)
    if not (isinstance(x, tf.Tensor) and isinstance(y, tf.Tensor)):
        return ANY  # conversion of odd objects: any clear error, or a valid result
    problems = []
    supported = set(DTYPES)
    if x.dtype not in supported or y.dtype not in supported or x.dtype != y.dtype:
        problems.append(P_DTYPE)
    target = None
    if reduce:
        if isinstance(bs, tf.Tensor):
            if bs.dtype not in (tf.int32, tf.int64):
                problems.append(P_DTYPE)
            elif bs.shape.rank != 1:
                problems.append(P_BSHAPE)
            else:
                target = [int(v) for v in bs.numpy()]
        elif isinstance(bs, list) and all(type(v) is int for v in bs):
            target = bs
            if any(abs(v) >= 2**63 for v in bs):
                return ANY
        elif isinstance(bs, (int, np.ndarray)) or (isinstance(bs, list) and bs and
                                                   isinstance(bs[0], list)):
            # TF's eager conversion turns a numpy array into the attr's default dtype
            # (int32), wrapping values around as tf.reshape does: model that.
            arr = np.asarray(bs).astype(np.int32)
            if arr.ndim != 1:
                problems.append(P_BSHAPE)
            else:
                target = [int(v) for v in arr]
        else:
            return ANY  # None, strings, floats, bools: conversion errors of any kind
    if problems:
        return Expect("error", patterns=problems)
    out, _, problems = plan_model(x.shape.as_list(), y.shape.as_list(),
                                  flags["transpose_x"], flags["transpose_y"], target)
    if problems:
        return Expect("error", patterns=problems)
    itemsize = x.dtype.size
    if math.prod(out) * itemsize > (1 << 32):
        return Expect("error", patterns=[P_BIG])
    if not _small_enough(x.shape.as_list(), y.shape.as_list(), out):
        return Expect("ok", shape=out)
    xw = tf.cast(x, wide(x.dtype)).numpy()
    yw = tf.cast(y, wide(y.dtype)).numpy()
    want = np_product(xw, yw, **flags)
    bound = np_product(np.abs(xw), np.abs(yw), **flags)
    if reduce:
        want, bound = np_reduce_to(want, target), np_reduce_to(bound, target)
    return Expect("ok", value=want, bound=bound, shape=out)


def check_expect(got, err, exp, dtype_of=None):
    """Oracle check for the raw ops and the pybind11 module."""
    if exp.kind == "any":
        return []
    if exp.kind == "error":
        if err is None:
            return [f"returned {describe(got)} for a bad call (want an error matching "
                    f"{exp.patterns})"]
        if exp.patterns and not any(re.search(p, str(err), re.I) for p in exp.patterns):
            return [f"message does not name the problem (want /{'|'.join(exp.patterns)}/): "
                    f"{type(err).__name__}: {str(err)[:200]}"]
        return []
    if err is not None:
        return [f"rejected a valid call: {type(err).__name__}: {str(err)[:200]}"]
    if not hasattr(got, "shape"):
        return []
    shape = list(got.shape)
    if exp.shape is not None and shape != list(exp.shape):
        return [f"returned shape {shape}, want {exp.shape}"]
    if exp.value is not None:
        dtype = dtype_of(got) if dtype_of else got.dtype
        g = (tf.cast(got, wide(got.dtype)).numpy() if isinstance(got, tf.Tensor)
             else np.asarray(got).astype(exp.value.dtype))
        if not close(g, exp.value, exp.bound, dtype):
            return ["values differ from the numpy reference beyond tolerance"]
    return []


# ------------------------------------------------------------------ pybind11 family
NP_DTYPES = {tf.float16: np.float16, tf.bfloat16: ml_dtypes.bfloat16, tf.float32: np.float32,
             tf.float64: np.float64, tf.complex64: np.complex64,
             tf.complex128: np.complex128}
TF_OF_NP = {np.dtype(v): k for k, v in NP_DTYPES.items()}
NP_OTHER = [np.int32, np.int64, np.uint8, np.bool_, np.float128 if hasattr(np, "float128")
            else np.float64, object, "U3", "V4", np.dtype([("a", np.float32)])]


def _np_values(pick, shape, np_dtype):
    c = np.issubdtype(np.dtype(np_dtype), np.complexfloating)
    return pick.array(shape, c).astype(np_dtype)


def _strided(pick, arr):
    """A view of `arr`'s values with non-unit, negative or zero strides."""
    kind = pick.int(0, 3)
    if kind == 0 or arr.ndim == 0:
        return arr
    if kind == 1:  # every other element of a bigger array, maybe reversed
        big = np.repeat(arr, 2, axis=-1)[..., ::2]
        return big[..., ::-1] if pick.bool() else big
    if kind == 2:
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(arr, -1, 0)), -1, 0)
    if arr.ndim >= 3:  # stride 0 on a batch axis
        return np.broadcast_to(arr[:1], arr.shape)
    return arr


def core_case(pick):
    sp = SmallPick(pick.rng)
    tfd = pick.choice(DTYPES)
    npd = NP_DTYPES[tfd]
    reduce = pick.bool()
    xs, ys, flags, full = _valid_operands(sp)
    x, y = _np_values(pick, xs, npd), _np_values(pick, ys, npd)
    x, y = _strided(pick, x), _strided(pick, y)
    target = _random_target(sp, full) if reduce else None
    bs = target
    extra_kw = {}
    mode = pick.choice(_modes(["valid", "valid", "rank", "dims", "dims", "dtype", "byteorder",
                               "misaligned", "nontensor", "flag", "bs", "many", "huge", "kw",
                               "isa"]))
    j = pick.int(0, 1)
    expect_override = None

    def set_arg(i, v):
        nonlocal x, y
        if i == 0:
            x = v
        else:
            y = v

    if mode == "rank":
        set_arg(j, _np_values(pick, random_shape(pick, random_rank(pick)), npd))
    elif mode == "dims":
        set_arg(j, _np_values(pick, mutate_dims(pick, [x, y][j].shape), npd))
    elif mode == "dtype":
        new = pick.choice(NP_OTHER + list(NP_DTYPES.values()))
        for i in ([0, 1] if pick.bool() else [j]):
            try:
                set_arg(i, np.zeros([x, y][i].shape, new))
            except TypeError:
                pass
    elif mode == "byteorder":
        set_arg(j, [x, y][j].astype([x, y][j].dtype.newbyteorder(">")))
    elif mode == "misaligned":
        a = np.ascontiguousarray([x, y][j])
        if a.dtype.alignment > 1 and a.size:
            buf = np.zeros(a.nbytes + 1, np.uint8)
            m = np.frombuffer(buf.data, np.uint8, a.nbytes, 1).view(a.dtype).reshape(a.shape)
            m[...] = a
            set_arg(j, m)
    elif mode == "nontensor":
        set_arg(j, pick.choice(weird_objects()))
    elif mode == "flag":
        flags[pick.choice(sorted(flags))] = pick.choice(WEIRD_FLAGS)
    elif mode == "bs":
        bs = pick.choice([[-1], [2, -3], [1] * (MAX_BATCH + 1), [1.5], "ab", [[2]], 3,
                          [2**63 - 1], [2**64], [2**40, 2**40], np.array([2, 1]),
                          (1,), [None], {"a": 1}])
        reduce = True
    elif mode == "many":
        extra = [pick.choice([1, 2]) for _ in range(MAX_BATCH + pick.int(-1, 2))]
        set_arg(j, _np_values(pick, extra + list([x, y][j].shape), npd))
    elif mode == "huge":
        # stride-0 views: huge in shape, one element in memory. Only shapes whose call
        # must return at once: an empty C, a huge K (scratch refused), or an output that
        # cannot be allocated.
        one = np.ones((), npd)
        kind = pick.int(0, 2)
        if kind == 0:    # empty C with a huge batch
            x = np.ones((2**40, 0, 3), npd)
            y = np.broadcast_to(one, (2**40, 3, pick.int(1, 4)))
        elif kind == 1:  # K huge: scratch must be refused (MemoryError), not overflow
            big = pick.choice([2**40, 2**58, 2**60])
            x = np.broadcast_to(np.ones((), np.float16), (2, big))
            y = np.broadcast_to(np.ones((), np.float16), (big, 2))
        else:            # output too big to allocate
            x = np.broadcast_to(one, (2**30, 2**10, 4, 4))
            y = np.broadcast_to(one, (4, 4))
        flags = dict.fromkeys(flags, False)
        bs, reduce = None, False
        expect_override = (Expect("ok", shape=[2**40, 0, y.shape[-1]]) if kind == 0 else
                           Expect("error", patterns=[r"scratch|memory|allocat|too big"]))
    elif mode == "kw":
        extra_kw = {pick.choice(["bogus", "transpose_a", "batch", "out"]): 1}
    elif mode == "isa":
        name = pick.choice(["avx512", "avx2", "baseline", "", "AVX2", "sse9", None, 3,
                            b"avx2", "avx2\x00x"])
        desc = f"core.set_isa isa name={name!r}"
        before = core.active_isa()

        def thunk():
            try:
                return core.set_isa(name)
            finally:
                core.set_isa(before)

        def oracle():
            if isinstance(name, (str, bytes)):
                return Expect("ok")
            return Expect("error", patterns=[r"incompatible|argument|type"])

        return desc, thunk, oracle

    kwargs = dict(flags, **extra_kw)
    if reduce:
        kwargs["batch_shape"] = bs
    desc = (f"core.matmul {mode} x={describe(x)} y={describe(y)} "
            f"kwargs={describe(kwargs)}")

    def thunk():
        return core.matmul(x, y, **kwargs)

    def oracle():
        if expect_override is not None:
            return expect_override
        return core_oracle(x, y, reduce, bs, flags, extra_kw)

    return desc, thunk, oracle


def core_oracle(x, y, reduce, bs, flags, extra_kw):
    if extra_kw or not all(isinstance(v, (bool, np.bool_)) for v in flags.values()):
        return ANY  # pybind11's argument conversion: TypeError, or a bool-convertible value
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
        return ANY
    problems = []
    if x.dtype != y.dtype or (x.dtype not in TF_OF_NP
                              and x.dtype.newbyteorder("=") not in TF_OF_NP):
        problems.append(P_DTYPE)
    elif not (x.dtype.isnative and y.dtype.isnative):
        problems.append(P_DTYPE)
    if problems:
        return Expect("error", patterns=problems)
    if not (x.flags.aligned and y.flags.aligned):
        return Expect("error", patterns=[P_ALIGN])
    target = None
    if reduce:
        if isinstance(bs, (list, tuple)) and all(type(v) is int and abs(v) < 2**63
                                                 for v in bs):
            target = list(bs)
        elif isinstance(bs, np.ndarray) and bs.ndim == 1 and bs.dtype.kind == "i":
            target = [int(v) for v in bs]
        else:
            return Expect("error", patterns=[r"incompatible|argument|type"])
    out, _, problems = plan_model(list(x.shape), list(y.shape), flags["transpose_x"],
                                  flags["transpose_y"], target)
    if problems:
        return Expect("error", patterns=problems)
    if math.prod(out) * x.itemsize > (1 << 32) or any(d * x.itemsize > INT64_MAX for d in out):
        # numpy refuses the output array (it also refuses zero-size arrays with one dim
        # whose byte extent overflows).
        return Expect("error", patterns=[P_BIG, r"memory|size"])
    if not _small_enough(x.shape, y.shape, out):
        return Expect("ok", shape=out)
    w = np.complex128 if np.iscomplexobj(x) else np.float64
    xw, yw = x.astype(w), y.astype(w)
    want = np_product(xw, yw, **flags)
    bound = np_product(np.abs(xw), np.abs(yw), **flags)
    if reduce:
        want, bound = np_reduce_to(want, target), np_reduce_to(bound, target)
    return Expect("ok", value=want, bound=bound, shape=out)


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
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
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
                if isinstance(got, tf.Tensor) and _small_enough(got.shape.as_list()):
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
                               timeout=timeout, env=full_env, cwd=HERE)
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
