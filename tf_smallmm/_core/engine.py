"""The SmallMM engine as TF ops: raw op calls and their gradients.

Every public function lowers to `product(x, y, ...)`: op(x) · op(y) with batch
broadcasting, optionally summed over batch axes into `batch_shape` inside the kernel.
"""

import tensorflow as tf
from tensorflow.python.framework import ops

from tf_smallmm._core import loader


def _static_or_dynamic_batch(t):
    """t.shape[:-2] as a Python list when known, else as a tensor."""
    if t.shape.rank is not None and t.shape[:-2].is_fully_defined():
        return t.shape[:-2].as_list()
    return tf.shape(t)[:-2]


def product(x, y, transpose_x=False, conjugate_x=False, transpose_y=False,
            conjugate_y=False, batch_shape=None, name=None):
    """op(x) @ op(y) on the SmallMM kernels (no dispatch: the caller decided).

    op transposes the two matrix axes and/or conjugates. With `batch_shape`, the output
    has that batch shape and the broadcast batch axes it lacks (or has as 1) are summed.
    """
    lib = loader.load()
    flags = _flags((x, transpose_x, conjugate_x), (y, transpose_y, conjugate_y))
    if batch_shape is None:
        return lib.small_mm_batch_mat_mul(x, y, name=name, **flags)
    return lib.small_mm_batch_mat_mul_reduce(x, y, batch_shape, name=name, **flags)


# A factor of a product: op(tensor) with op = conj^c ∘ transpose^t.
def _factor(t, transpose, conjugate):
    return (t, bool(transpose), bool(conjugate))


def _push(lhs, rhs, transpose, conjugate):
    """op(lhs·rhs) with op = conj^conjugate ∘ transpose^transpose, pushed into the factors:
    (AB)ᵀ = BᵀAᵀ and conj(AB) = conj(A)conj(B). No transposes or conjugates are
    materialised. Returns the two factors."""
    if transpose:
        lhs, rhs = (rhs[0], not rhs[1], rhs[2]), (lhs[0], not lhs[1], lhs[2])
    if conjugate:
        lhs, rhs = (lhs[0], lhs[1], not lhs[2]), (rhs[0], rhs[1], not rhs[2])
    return lhs, rhs


def _flags(lhs, rhs, suffix=""):
    """The op attrs of the product of two factors (attr names end in `suffix`)."""
    flags = {"transpose_x": lhs[1], "conjugate_x": lhs[2], "transpose_y": rhs[1],
             "conjugate_y": rhs[2]}
    if not lhs[0].dtype.is_complex:  # conjugation is the identity: keep graphs tidy
        flags["conjugate_x"] = flags["conjugate_y"] = False
    return {k + suffix: bool(v) for k, v in flags.items()}


def _batch_arg(shape):
    return tf.constant(shape, tf.int32) if isinstance(shape, list) else tf.cast(shape, tf.int32)


def product_pair(first, second):
    """Two reduce products in one SmallMMBatchMatMulPair op. Each argument is
    (lhs, rhs, batch_shape) with lhs / rhs factors (tensor, transpose, conjugate)."""
    lib = loader.load()
    (l1, r1, b1), (l2, r2, b2) = first, second
    return lib.small_mm_batch_mat_mul_pair(
        l1[0], r1[0], _batch_arg(b1), l2[0], r2[0], _batch_arg(b2),
        **_flags(l1, r1, "_1"), **_flags(l2, r2, "_2"))


def _grads(x, y, tx, cx, ty, cy, grad, need_x=True, need_y=True):
    """Gradients of C = op_x(x) · op_y(y) (C possibly a batch sum) for upstream `grad`.

    With X = op_x(x), Y = op_y(y): dX = g·Yᴴ and dY = Xᴴ·g, then dx = op_x⁻¹(dX) (op_x is
    its own inverse). Each is a SmallMM reduce product whose batch_shape is the operand's
    own: batch axes along which the operand was broadcast are summed inside the kernel,
    never through a per-batch intermediate. When both are needed they are one Pair op,
    which reads `grad` once for both.
    """
    g = _factor(grad, False, False)
    jobs = []
    if need_x:
        jobs.append(_push(g, _factor(y, not ty, not cy), tx, cx) + (_static_or_dynamic_batch(x),))
    if need_y:
        jobs.append(_push(_factor(x, not tx, not cx), g, ty, cy) + (_static_or_dynamic_batch(y),))
    if len(jobs) == 2:
        return product_pair(*jobs)
    outs = [product(l[0], r[0], l[1], l[2], r[1], r[2], batch_shape=b) for l, r, b in jobs]
    return (outs.pop(0) if need_x else None), (outs.pop(0) if need_y else None)


def _skipped(op):
    # Inputs the tape does not need gradients for (e.g. a model's input data).
    return set(getattr(op, "skip_input_indices", None) or ())


def _product_grad(op, grad):
    """Gradients of SmallMMBatchMatMul / SmallMMBatchMatMulReduce (see _grads)."""
    skip = _skipped(op)
    dx, dy = _grads(op.inputs[0], op.inputs[1], op.get_attr("transpose_x"),
                    op.get_attr("conjugate_x"), op.get_attr("transpose_y"),
                    op.get_attr("conjugate_y"), grad, 0 not in skip, 1 not in skip)
    if len(op.inputs) == 3:
        return dx, dy, None
    return dx, dy


def _pair_grad(op, grad_1, grad_2):
    """Gradients of the Pair op: each output is an independent reduce product."""
    skip = _skipped(op)
    out = []
    for p, grad in ((1, grad_1), (2, grad_2)):
        first = 3 * (p - 1)
        if grad is None:
            out += [None, None, None]
            continue
        flags = [op.get_attr(f"{name}_{p}")
                 for name in ("transpose_x", "conjugate_x", "transpose_y", "conjugate_y")]
        dx, dy = _grads(op.inputs[first], op.inputs[first + 1], *flags, grad,
                        first not in skip, first + 1 not in skip)
        out += [dx, dy, None]
    return out


ops.RegisterGradient("SmallMMBatchMatMul")(_product_grad)
ops.RegisterGradient("SmallMMBatchMatMulReduce")(_product_grad)
ops.RegisterGradient("SmallMMBatchMatMulPair")(_pair_grad)
