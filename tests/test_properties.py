"""Property tests: random shapes, flags and dtypes for every public function (one row of
tests/public_ops.py each), checked against TensorFlow's own function in float64 /
complex128 on the same rounded inputs — values, gradients, and static shapes in graphs with
unknown dimensions — plus the raw reduce op and the kernel core on strided numpy views.

Error allowance (one formula for every op): |got − want| ≤ tol · (s·bound + 1) where
bound is the reference evaluated on |inputs| (the forward error scale, |a|·|b| for a
product), tol the per-dtype tolerance of conftest.py, and s = max(1, n·u / tol) widens it
for long sums: n is the number of products summed into one element (K forward; for the
gradient of an operand, all products of the forward pass over that operand's size) and u
the unit roundoff of the accumulation type (2⁻²⁴ for float16/bfloat16/float32/complex64,
2⁻⁵³ for float64/complex128). n·u·bound is the classical worst-case bound for a sum of n
products in any order.

Example counts come from tests/hypothesis_profiles.py (HYPOTHESIS_PROFILE=ci|nightly).
"""

import math

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import hypothesis_profiles  # noqa: F401  (registers and loads the profile)
from conftest import DTYPES, GRAD_DTYPES, assert_close, smallmm_ops, tolerance, wide
from public_ops import (
    PUBLIC_OPS,
    HypothesisPick,
    RandomPick,
    broadcast_batches,
    matrix_dims,
    np_product,
    np_reduce_to,
)
from tf_smallmm import _smallmm_core as core
from tf_smallmm._core import dispatch, loader
from tf_smallmm.dropins import linalg

pytestmark = pytest.mark.slow  # hypothesis

OPS = pytest.mark.parametrize("op", PUBLIC_OPS, ids=lambda op: op.name)

_ACC_UNIT = {tf.float16: 2.0**-24, tf.bfloat16: 2.0**-24, tf.float32: 2.0**-24,
             tf.complex64: 2.0**-24, tf.float64: 2.0**-53, tf.complex128: 2.0**-53}


def _scaled_bound(bound, terms, dtype):
    dtype = tf.as_dtype(dtype)
    s = max(1.0, 2.0 * terms * _ACC_UNIT[dtype] / tolerance(dtype))  # 2: complex rounding
    return np.abs(np.asarray(bound)) * s


def _cast_all(arrays, dtype):
    return [tf.cast(tf.constant(a), dtype) for a in arrays]


def _wide_all(tensors):
    return [tf.cast(t, wide(t.dtype)) for t in tensors]


def _abs_all(tensors):
    return [tf.cast(tf.abs(t), tf.float64) for t in tensors]


def _ones_all(tensors):
    return [tf.ones(t.shape, tf.float64) for t in tensors]


def _loss(out, w):
    s = tf.reduce_sum(out * w)
    return tf.math.real(s) if out.dtype.is_complex else s


def _grads(fn, args, kwargs, w):
    with tf.GradientTape() as tape:
        for a in args:
            tape.watch(a)
        out = fn(*args, **kwargs)
        loss = _loss(out, tf.cast(w, out.dtype))
    grads = tape.gradient(loss, args)
    return [tf.zeros_like(a) if g is None else tf.convert_to_tensor(g)
            for a, g in zip(args, grads)]


def _static(t):
    return None if t.shape.rank is None else t.shape.as_list()


def _draw_call(op, data, dtypes):
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    call = op.inputs(HypothesisPick(data.draw), dtype)
    return dtype, call, _cast_all(call.tensors, dtype)


@OPS
@given(data=st.data())
def test_values_match_reference(op, data):
    dtype, call, args = _draw_call(op, data, DTYPES)
    got = op.fn(*args, **call.kwargs)
    want = op.reference(*_wide_all(args), **call.kwargs)
    assert got.dtype == dtype
    assert got.shape == want.shape
    bound = op.reference(*_abs_all(args), **call.kwargs)
    terms = np.max(op.reference(*_ones_all(args), **call.kwargs), initial=1.0)
    assert_close(got, want, dtype, bound=_scaled_bound(bound, terms, dtype))


@OPS
@given(data=st.data())
def test_gradients_match_reference(op, data):
    dtype, call, args = _draw_call(op, data, GRAD_DTYPES)
    out_shape = op.reference(*_wide_all(args), **call.kwargs).shape
    w = RandomPick(data.draw(st.integers(0, 2**32 - 1), label="w seed")).array(
        out_shape, dtype.is_complex)
    got = _grads(op.fn, args, call.kwargs, w)
    want = _grads(op.reference, _wide_all(args), call.kwargs, w)
    # Error scale: the same gradient of the same op on |inputs| and |w|.
    bounds = _grads(op.reference, _abs_all(args), call.kwargs, np.abs(w))
    products = float(np.sum(op.reference(*_ones_all(args), **call.kwargs)))
    for a, g, r, b in zip(args, got, want, bounds):
        assert g.dtype == a.dtype and g.shape == a.shape
        terms = math.ceil(products / max(1, a.shape.num_elements()))
        assert_close(g, r, dtype, bound=_scaled_bound(b, terms, dtype))


def _kernel_takes(op, dtype, call, args):
    """Whether the dispatch model sends this call, at its actual sizes, to our kernel (not
    on a GPU machine with a CPU-only build). Then a graph traced with some of those sizes
    unknown holds the kernel too: alone, or in a run-time branch with the built-in."""
    if not dispatch.use_kernel(dtype):
        return False
    kw = call.kwargs
    ta = bool(kw.get("transpose_a") or kw.get("adjoint_a"))
    tb = bool(kw.get("transpose_b") or kw.get("adjoint_b"))
    sa, sb = tuple(args[0].shape), tuple(args[1].shape)
    if op.name == "matvec":
        sb += (1,)
    sizes = linalg._product_sizes(sa, sb, ta, tb)
    return linalg._choice(dtype, sa, sb, sizes) == dispatch.KERNEL


@OPS
@given(data=st.data())
@settings(max_examples=max(3, settings.default.max_examples // 4))  # each traces twice
def test_graphs_with_unknown_dims_match_reference(op, data):
    """Inside tf.function with some dims (or whole ranks) unknown at trace time: the shape
    functions see None and the kernel validates at run time. Static output shapes must
    equal tf.linalg's, and the values its values."""
    dtype, call, args = _draw_call(op, data, [tf.float32, tf.complex128])
    pick = HypothesisPick(data.draw)
    specs = []
    for a in args:
        if pick.int(0, 3) == 0:
            specs.append(tf.TensorSpec(None, dtype))
        else:
            specs.append(tf.TensorSpec([None if pick.bool() else d for d in a.shape], dtype))
    ours = tf.function(lambda *xs: op.fn(*xs, **call.kwargs), input_signature=specs)
    theirs = tf.function(lambda *xs: op.reference(*xs, **call.kwargs), input_signature=specs)
    ours_cf, theirs_cf = ours.get_concrete_function(), theirs.get_concrete_function()
    assert _static(ours_cf.structured_outputs) == _static(theirs_cf.structured_outputs)
    if _kernel_takes(op, dtype, call, args):
        assert smallmm_ops(ours_cf), f"{op.name} did not run the SmallMM kernel"
    got = ours(*args)
    want = op.reference(*_wide_all(args), **call.kwargs)
    bound = op.reference(*_abs_all(args), **call.kwargs)
    assert_close(got, want, dtype, bound=_scaled_bound(bound, 64, dtype))


# ------------------------------------------------------------------ raw reduce op
def _target_for(pick, full_batch):
    """A batch_shape that SmallMMBatchMatMulReduce accepts for this broadcast batch: each
    axis kept, kept as 1 (summed), or dropped (summed) when leading; size-1 axes may be
    expanded, and new leading axes added."""
    target = []
    start = pick.int(0, len(full_batch))  # axes before `start` are dropped (summed)
    for d in full_batch[start:]:
        c = pick.int(0, 2)
        target.append(d if c == 0 else 1 if c == 1 else (pick.int(1, 3) if d == 1 else d))
    if start == 0 and pick.int(0, 3) == 0:
        target = [pick.int(1, 3)] + target
    return target


@given(data=st.data())
def test_reduce_op_sums_to_batch_shape(data):
    pick = HypothesisPick(data.draw)
    dtype = pick.choice(DTYPES)
    c = dtype.is_complex
    m, n, k = matrix_dims(pick, 3)
    bx, by = broadcast_batches(pick, 2)
    flags = {"transpose_x": pick.bool(), "conjugate_x": pick.bool(), "transpose_y": pick.bool(),
             "conjugate_y": pick.bool()}
    xs = bx + ([k, m] if flags["transpose_x"] else [m, k])
    ys = by + ([n, k] if flags["transpose_y"] else [k, n])
    x, y = _cast_all([pick.array(xs, c), pick.array(ys, c)], dtype)
    full_batch = list(np.broadcast_shapes(tuple(bx), tuple(by)))
    target = _target_for(pick, full_batch)
    as_tensor = pick.choice([None, tf.int32, tf.int64])
    batch_shape = (target if as_tensor is None
                   else tf.constant(target, as_tensor, shape=[len(target)]))
    got = loader.load().small_mm_batch_mat_mul_reduce(x, y, batch_shape, **flags)
    xw, yw = (np.asarray(t) for t in _wide_all([x, y]))
    want = np_reduce_to(np_product(xw, yw, **flags), target)
    bound = np_reduce_to(np_product(np.abs(xw), np.abs(yw), **flags), target)
    terms = np.max(np_reduce_to(np_product(np.ones_like(xw.real), np.ones_like(yw.real),
                                           **flags), target), initial=1.0)
    assert got.shape == want.shape
    assert_close(got, want, dtype, bound=_scaled_bound(bound, terms, dtype))


# ------------------------------------------------------------------ kernel core, views
NP_DTYPES = {tf.float16: np.float16, tf.bfloat16: ml_dtypes.bfloat16, tf.float32: np.float32,
             tf.float64: np.float64, tf.complex64: np.complex64, tf.complex128: np.complex128}


def _view(pick, shape, dtype):
    """An array of `shape` that is a view: every axis strided by 1..3 in either direction,
    or broadcast (stride 0) when the pick says so."""
    np_dtype = NP_DTYPES[dtype]
    steps = [pick.choice([1, 1, 2, 3, -1, -2]) for _ in shape]
    base_shape = [max(1, d) * abs(s) for d, s in zip(shape, steps)]
    base = pick.array(base_shape, dtype.is_complex).astype(np_dtype)
    view = base[tuple(slice(None, None, s) for s in steps)]
    view = view[tuple(slice(0, d) for d in shape)]
    if len(shape) > 2 and pick.bool():  # one batch axis broadcast with stride 0
        i = pick.int(0, len(shape) - 3)
        view = np.broadcast_to(view[(slice(None),) * i + (slice(0, 1),)], view.shape)
    return view


@given(data=st.data())
def test_core_on_strided_views_matches_numpy(data):
    pick = HypothesisPick(data.draw)
    dtype = pick.choice(DTYPES)
    m, n, k = matrix_dims(pick, 3)
    bx, by = broadcast_batches(pick, 2)
    flags = {"transpose_x": pick.bool(), "conjugate_x": pick.bool(), "transpose_y": pick.bool(),
             "conjugate_y": pick.bool()}
    x = _view(pick, bx + ([k, m] if flags["transpose_x"] else [m, k]), dtype)
    y = _view(pick, by + ([n, k] if flags["transpose_y"] else [k, n]), dtype)
    reduce = pick.bool()
    full_batch = list(np.broadcast_shapes(tuple(bx), tuple(by)))
    target = _target_for(pick, full_batch) if reduce else None
    got = core.matmul(x, y, batch_shape=target, **flags)
    xw, yw = x.astype(np.complex128 if dtype.is_complex else np.float64), \
        y.astype(np.complex128 if dtype.is_complex else np.float64)
    want = np_product(xw, yw, **flags)
    bound = np_product(np.abs(xw), np.abs(yw), **flags)
    if reduce:
        want, bound = np_reduce_to(want, target), np_reduce_to(bound, target)
    assert got.dtype == x.dtype and got.shape == want.shape
    terms = k * max(1, int(np.prod(full_batch)) if reduce else 1)
    assert_close(tf.constant(got), want, dtype, bound=_scaled_bound(bound, terms, dtype))
