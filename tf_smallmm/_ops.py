"""The SmallMM engine as TF ops: raw op calls and their gradients.

Every public function lowers to `product(x, y, ...)`: op(x) · op(y) with batch
broadcasting, optionally summed over batch axes into `batch_shape` inside the kernel.
"""

import tensorflow as tf
from tensorflow.python.framework import ops

from tf_smallmm import _loader


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
    lib = _loader.load()
    flags = dict(transpose_x=bool(transpose_x), conjugate_x=bool(conjugate_x),
                 transpose_y=bool(transpose_y), conjugate_y=bool(conjugate_y))
    if not x.dtype.is_complex:  # conjugation is the identity: keep graphs tidy
        flags["conjugate_x"] = flags["conjugate_y"] = False
    if batch_shape is None:
        return lib.small_mm_batch_mat_mul(x, y, name=name, **flags)
    return lib.small_mm_batch_mat_mul_reduce(x, y, batch_shape, name=name, **flags)


# A factor of a product: op(tensor) with op = conj^c ∘ transpose^t.
def _factor(t, transpose, conjugate):
    return (t, bool(transpose), bool(conjugate))


def _apply(lhs, rhs, transpose, conjugate, batch_shape):
    """Computes op(lhs·rhs) where op = conj^conjugate ∘ transpose^transpose, by pushing the
    op into the factors: (AB)ᵀ = BᵀAᵀ and conj(AB) = conj(A)conj(B). No transposes or
    conjugates are materialised."""
    if transpose:
        lhs, rhs = (rhs[0], not rhs[1], rhs[2]), (lhs[0], not lhs[1], lhs[2])
    if conjugate:
        lhs, rhs = (lhs[0], lhs[1], not lhs[2]), (rhs[0], rhs[1], not rhs[2])
    return product(lhs[0], rhs[0], lhs[1], lhs[2], rhs[1], rhs[2], batch_shape=batch_shape)


def _product_grad(op, grad):
    """Gradients of C = op_x(x) · op_y(y) (both ops; the reduce op's C is a batch sum).

    With X = op_x(x), Y = op_y(y): dX = g·Yᴴ and dY = Xᴴ·g, then dx = op_x⁻¹(dX) (op_x is
    its own inverse). Each is one SmallMM reduce op whose batch_shape is the operand's
    own: batch axes along which the operand was broadcast are summed inside the kernel,
    never through a per-batch intermediate.
    """
    x, y = op.inputs[0], op.inputs[1]
    tx, cx = op.get_attr("transpose_x"), op.get_attr("conjugate_x")
    ty, cy = op.get_attr("transpose_y"), op.get_attr("conjugate_y")
    g = _factor(grad, False, False)
    dx = _apply(g, _factor(y, not ty, not cy), tx, cx, _static_or_dynamic_batch(x))
    dy = _apply(_factor(x, not tx, not cx), g, ty, cy, _static_or_dynamic_batch(y))
    if len(op.inputs) == 3:
        return dx, dy, None
    return dx, dy


ops.RegisterGradient("SmallMMBatchMatMul")(_product_grad)
ops.RegisterGradient("SmallMMBatchMatMulReduce")(_product_grad)
