"""The table of public functions that the robustness suites run: properties, fuzzing,
concurrency and leaks. A new public function is one more `PublicOp` line in PUBLIC_OPS.

Each entry names
  fn         our function (tf_smallmm.<name>);
  reference  the TensorFlow function it replaces, called with the same arguments (the
             suites evaluate it in float64 / complex128);
  inputs     a generator `inputs(pick, dtype) -> Call(tensors, kwargs)` of one valid call:
             `tensors` are float64 / complex128 numpy arrays (positional arguments; the
             suites cast them to `dtype`), `kwargs` the non-tensor arguments.

`pick` makes every random choice, so one generator serves hypothesis (which then shrinks
failures) and plain seeded generation (fuzzing, concurrency, leaks):
  pick.int(lo, hi)      an int in [lo, hi]
  pick.bool()
  pick.choice(seq)
  pick.array(shape, complex_)  values in [-1, 1] (real and imaginary parts)
The helpers below (`matrix_dims`, `broadcast_batches`) give the shape families every
generator should use: matrix dims 0..40, 0..4 broadcast batch dims of size 0..3.
"""

import collections

import numpy as np
import tensorflow as tf

import tf_smallmm as smm

PublicOp = collections.namedtuple("PublicOp", "name fn reference inputs")
Call = collections.namedtuple("Call", "tensors kwargs")

MAX_MATRIX_DIM = 40
MAX_BATCH_RANK = 4
MAX_BATCH_DIM = 3


# ------------------------------------------------------------------ picks
class RandomPick:
    """Seeded choices from a numpy Generator."""

    def __init__(self, seed_or_rng):
        self.rng = (seed_or_rng if isinstance(seed_or_rng, np.random.Generator)
                    else np.random.default_rng(seed_or_rng))

    def int(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))

    def bool(self):
        return bool(self.rng.integers(2))

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def array(self, shape, complex_=False):
        x = self.rng.uniform(-1, 1, size=shape)
        if complex_:
            x = x + 1j * self.rng.uniform(-1, 1, size=shape)
        return x


class HypothesisPick:
    """The same choices drawn through hypothesis (`st.data().draw`), so they shrink."""

    def __init__(self, draw):
        from hypothesis import strategies as st

        self._st = st
        self.draw = draw

    def int(self, lo, hi):
        return self.draw(self._st.integers(lo, hi))

    def bool(self):
        return self.draw(self._st.booleans())

    def choice(self, seq):
        return self.draw(self._st.sampled_from(list(seq)))

    def array(self, shape, complex_=False):
        # Values come from a drawn seed: shrinking works on shapes and flags, and a seed
        # replays the values exactly.
        return RandomPick(self.int(0, 2**32 - 1)).array(shape, complex_)


# ------------------------------------------------------------------ shape families
def matrix_dims(pick, count):
    """`count` matrix dimensions in 0..40, biased towards the small sizes that matter."""
    return [pick.choice([0, 1, 2, 3, 4, 5, 8, 16, 17]) if pick.bool()
            else pick.int(0, MAX_MATRIX_DIM) for _ in range(count)]


def broadcast_batches(pick, count):
    """Batch shapes of `count` operands that broadcast together: a common shape of rank
    0..4 with dims 0..3; each operand takes a suffix of it with some dims set to 1."""
    rank = pick.int(0, MAX_BATCH_RANK)
    full = [pick.int(0, MAX_BATCH_DIM) for _ in range(rank)]
    out = []
    for _ in range(count):
        r = pick.int(0, rank)
        out.append([1 if pick.bool() else d for d in full[rank - r:]])
    return out


def _op_flags(pick, side):
    """transpose_{side} / adjoint_{side}: never both (that is an error, not a product)."""
    t = pick.bool()
    return {f"transpose_{side}": t, f"adjoint_{side}": (not t) and pick.bool()}


def _swapped(flags, side):
    return flags[f"transpose_{side}"] or flags[f"adjoint_{side}"]


# ------------------------------------------------------------------ generators
def matmul_inputs(pick, dtype):
    c = tf.as_dtype(dtype).is_complex
    m, n, k = matrix_dims(pick, 3)
    ba, bb = broadcast_batches(pick, 2)
    fa, fb = _op_flags(pick, "a"), _op_flags(pick, "b")
    a = ba + ([k, m] if _swapped(fa, "a") else [m, k])
    b = bb + ([n, k] if _swapped(fb, "b") else [k, n])
    return Call([pick.array(a, c), pick.array(b, c)], {**fa, **fb})


def matvec_inputs(pick, dtype):
    c = tf.as_dtype(dtype).is_complex
    m, k = matrix_dims(pick, 2)
    ba, bb = broadcast_batches(pick, 2)
    fa = _op_flags(pick, "a")
    a = ba + ([k, m] if _swapped(fa, "a") else [m, k])
    return Call([pick.array(a, c), pick.array(bb + [k], c)], fa)


PUBLIC_OPS = [
    PublicOp("matmul", smm.matmul, tf.linalg.matmul, matmul_inputs),
    PublicOp("matvec", smm.matvec, tf.linalg.matvec, matvec_inputs),
]


# ------------------------------------------------------------------ raw-op references
def np_product(x, y, transpose_x=False, conjugate_x=False, transpose_y=False,
               conjugate_y=False):
    """op(x) @ op(y) in float64 / complex128 with numpy's broadcasting (raises like it)."""
    w = np.complex128 if (np.iscomplexobj(x) or np.iscomplexobj(y)) else np.float64
    x, y = np.asarray(x, w), np.asarray(y, w)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if conjugate_x:
        x = np.conj(x)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    if conjugate_y:
        y = np.conj(y)
    return np.matmul(x, y)


def np_reduce_to(full, batch_shape):
    """What SmallMMBatchMatMulReduce returns for the broadcast product `full`: batch axes
    that `batch_shape` lacks, or has as 1, are summed; the rest must broadcast with it.
    Raises ValueError where the op must raise."""
    target = [int(d) for d in batch_shape]
    if any(d < 0 for d in target):
        raise ValueError("negative batch_shape")
    fb = list(full.shape[:-2])
    both = np.broadcast_shapes(tuple(fb), tuple(target))  # raises on mismatch
    if len(both) > 8:
        raise ValueError("more than 8 batch dims")
    lead = len(fb) - len(target)
    out = full.sum(axis=tuple(range(lead))) if lead > 0 else full
    rank = out.ndim - 2
    for i in range(rank):
        t = target[len(target) - rank + i]
        if t == 1 and out.shape[i] != 1:
            out = out.sum(axis=i, keepdims=True)
    return np.broadcast_to(out, tuple(target) + full.shape[-2:])
