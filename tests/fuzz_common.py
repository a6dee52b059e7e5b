"""What the fuzz families share (tests/fuzz_cases.py runs them): the expectation type, the
random shapes, values and mutations, the message patterns that name a problem, a Python
model of the planner's shape rules, and the checks of a result against an expectation.
Not a test module."""

import math
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import tensorflow as tf

from conftest import tolerance, wide
from public_ops import RandomPick, broadcast_batches, matrix_dims
from tf_smallmm import _smallmm_core as core

MAX_BATCH = core.max_batch_dims
INT64_MAX = 2**63 - 1

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


# ------------------------------------------------------------------ valid operands
def random_flags(pick):
    return {"transpose_x": pick.bool(), "conjugate_x": pick.bool(), "transpose_y": pick.bool(),
            "conjugate_y": pick.bool()}


def valid_operands(pick):
    m, n, k = matrix_dims(pick, 3)
    bx, by = broadcast_batches(pick, 2)
    flags = random_flags(pick)
    xs = bx + ([k, m] if flags["transpose_x"] else [m, k])
    ys = by + ([n, k] if flags["transpose_y"] else [k, n])
    return xs, ys, flags, list(np.broadcast_shapes(tuple(bx), tuple(by)))


def random_target(pick, full):
    if pick.int(0, 2) == 0:
        return random_shape(pick, pick.int(0, 3))
    target = [d if pick.bool() else 1 for d in full[pick.int(0, len(full)):]]
    return target


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


def small_enough(*shapes):
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


def modes(modes):
    """SMALLMM_FUZZ_MODES=rank,dims restricts the mutations (for narrowing a failure down)."""
    only = os.environ.get("SMALLMM_FUZZ_MODES")
    return [m for m in modes if m in only.split(",")] or modes if only else modes


# ------------------------------------------------------------------ checks
def check_expect(got, err, exp, dtype_of=None):
    """Oracle check for the raw ops and the pybind11 module."""
    if exp.kind == "any":
        return []
    if exp.kind == "error":
        if err is None:
            return [(f"returned {describe(got)} for a bad call (want an error matching "
                     f"{exp.patterns})")]
        if exp.patterns and not any(re.search(p, str(err), re.IGNORECASE) for p in exp.patterns):
            return [(f"message does not name the problem (want /{'|'.join(exp.patterns)}/): "
                     f"{type(err).__name__}: {str(err)[:200]}")]
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
