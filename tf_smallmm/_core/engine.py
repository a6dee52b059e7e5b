"""The SmallMM engine as TF ops: raw op calls and their gradients.

Every public function lowers to `product(x, y, ...)`: op(x) · op(y) with batch
broadcasting, optionally summed over batch axes into `batch_shape` inside the kernel.
"""

import tensorflow as tf
from tensorflow.python.framework import ops

from tf_smallmm._core import loader


def _inverse(perm):
    """The inverse of a tf.transpose permutation (() for none)."""
    return tuple(perm.index(j) for j in range(len(perm))) if perm else ()


def _view_batch(t, perm):
    """The batch shape of tf.transpose(t, perm) (perm () for none): a Python list when
    known, else a tensor."""
    perm = list(perm) or None
    shape = t.shape if perm is None or t.shape.rank is None else tf.TensorShape(
        [t.shape[i] for i in perm])
    if shape.rank is not None and shape[:-2].is_fully_defined():
        return shape[:-2].as_list()
    dynamic = tf.shape(t) if perm is None else tf.gather(tf.shape(t), perm)
    return dynamic[:-2]


def product(x, y, transpose_x=False, conjugate_x=False, transpose_y=False,
            conjugate_y=False, batch_shape=None, name=None, perm_x=(), perm_y=(),
            perm_output=()):
    """op(X) @ op(Y) on the SmallMM kernels (no dispatch: the caller decided).

    op transposes the two matrix axes and/or conjugates. With `batch_shape`, the output
    has that batch shape and the broadcast batch axes it lacks (or has as 1) are summed.
    X and Y are x and y read through the axis permutations perm_x and perm_y
    (tf.transpose(x, perm_x), without the copy), and the result is written as
    tf.transpose(result, perm_output); () for none.
    """
    lib = loader.load()
    flags = _flags(_factor(x, transpose_x, conjugate_x, perm_x),
                   _factor(y, transpose_y, conjugate_y, perm_y))
    flags["perm_output"] = list(perm_output)
    if batch_shape is None:
        return lib.small_mm_batch_mat_mul(x, y, name=name, **flags)
    return lib.small_mm_batch_mat_mul_reduce(x, y, batch_shape, name=name, **flags)


# A factor of a product: op(tf.transpose(tensor, perm)) with op = conj^c ∘ transpose^t.
def _factor(t, transpose, conjugate, perm=()):
    return (t, bool(transpose), bool(conjugate), tuple(perm))


def _push(lhs, rhs, transpose, conjugate):
    """op(lhs·rhs) with op = conj^conjugate ∘ transpose^transpose, pushed into the factors:
    (AB)ᵀ = BᵀAᵀ and conj(AB) = conj(A)conj(B). No transposes or conjugates are
    materialised. Returns the two factors."""
    if transpose:
        lhs, rhs = (rhs[0], not rhs[1], rhs[2], rhs[3]), (lhs[0], not lhs[1], lhs[2], lhs[3])
    if conjugate:
        lhs, rhs = (lhs[0], lhs[1], not lhs[2], lhs[3]), (rhs[0], rhs[1], not rhs[2], rhs[3])
    return lhs, rhs


def _flags(lhs, rhs, suffix=""):
    """The op attrs of the product of two factors (attr names end in `suffix`)."""
    flags = {"transpose_x": lhs[1], "conjugate_x": lhs[2], "transpose_y": rhs[1],
             "conjugate_y": rhs[2]}
    if not lhs[0].dtype.is_complex:  # conjugation is the identity: keep graphs tidy
        flags["conjugate_x"] = flags["conjugate_y"] = False
    flags = {k + suffix: bool(v) for k, v in flags.items()}
    flags.update({"perm_x" + suffix: list(lhs[3]), "perm_y" + suffix: list(rhs[3])})
    return flags


def _batch_arg(shape):
    return tf.constant(shape, tf.int32) if isinstance(shape, list) else tf.cast(shape, tf.int32)


def product_pair(first, second):
    """Two reduce products in one SmallMMBatchMatMulPair op. Each argument is
    (lhs, rhs, batch_shape, perm_output) with lhs / rhs factors."""
    lib = loader.load()
    (l1, r1, b1, p1), (l2, r2, b2, p2) = first, second
    return lib.small_mm_batch_mat_mul_pair(
        l1[0], r1[0], _batch_arg(b1), l2[0], r2[0], _batch_arg(b2),
        **_flags(l1, r1, "_1"), **_flags(l2, r2, "_2"), perm_output_1=list(p1),
        perm_output_2=list(p2))


def grad_jobs(x, y, tx, cx, ty, cy, grad, need_x=True, need_y=True, perms=((), (), ())):
    """The products that form _grads' dx and dy (those needed), each as (lhs factor, rhs
    factor, batch_shape, perm_output); a factor is (tensor, transpose, conjugate, perm).
    benchmarks/kernel_grid.py asks which kernels run them."""
    px, py, pout = perms
    g = _factor(grad, False, False, _inverse(pout))
    jobs = []
    if need_x:
        jobs.append(_push(g, _factor(y, not ty, not cy, py), tx, cx)
                    + (_view_batch(x, px), _inverse(px)))
    if need_y:
        jobs.append(_push(_factor(x, not tx, not cx, px), g, ty, cy)
                    + (_view_batch(y, py), _inverse(py)))
    return jobs


def _grads(x, y, tx, cx, ty, cy, grad, need_x=True, need_y=True, perms=((), (), ())):
    """Gradients of C = op_x(X) · op_y(Y) (C possibly a batch sum) for upstream `grad`,
    where X, Y are x, y read through perms[0], perms[1] and the op's output is C written
    through perms[2] (see `product`).

    dX = op_x⁻¹(G·op_y(Y)ᴴ) and dY = op_y⁻¹(op_x(X)ᴴ·G) (op is its own inverse), with G the
    upstream gradient read through perms[2]'s inverse; dx is dX written through perms[0]'s
    inverse, dy likewise: products of the same kind, no transpose in memory. Each is a
    SmallMM reduce product whose batch_shape is the operand's own: batch axes along which
    the operand was broadcast are summed inside the kernel, never through a per-batch
    intermediate. When both are needed they are one Pair op, which reads `grad` once for
    both.
    """
    jobs = grad_jobs(x, y, tx, cx, ty, cy, grad, need_x, need_y, perms)
    if len(jobs) == 2:
        return product_pair(*jobs)
    outs = [product(lhs[0], rhs[0], lhs[1], lhs[2], rhs[1], rhs[2], batch_shape=batch,
                    perm_x=lhs[3], perm_y=rhs[3], perm_output=perm)
            for lhs, rhs, batch, perm in jobs]
    return (outs.pop(0) if need_x else None), (outs.pop(0) if need_y else None)


def separate_gradients(x, y, transpose_x, conjugate_x, transpose_y, conjugate_y, grad):
    """(dx, dy) of product(x, y, transpose_x, ...) for upstream `grad` (see _grads), as two
    ops: a tf.custom_gradient is not told which inputs need theirs, and a graph runs only
    the one it needs (a frozen weight's dx, a model input's dy) where one op would form both."""
    flags = (x, y, transpose_x, conjugate_x, transpose_y, conjugate_y, grad)
    return _grads(*flags, need_y=False)[0], _grads(*flags, need_x=False)[1]


def _skipped(op):
    # Inputs the tape does not need gradients for (e.g. a model's input data).
    return set(getattr(op, "skip_input_indices", None) or ())


def _perms(op, suffix=""):
    """An op's (perm_x, perm_y, perm_output) attrs as tuples."""
    return tuple(tuple(op.get_attr(name + suffix)) for name in ("perm_x", "perm_y", "perm_output"))


def _product_grad(op, grad):
    """Gradients of SmallMMBatchMatMul / SmallMMBatchMatMulReduce (see _grads)."""
    skip = _skipped(op)
    dx, dy = _grads(op.inputs[0], op.inputs[1], op.get_attr("transpose_x"),
                    op.get_attr("conjugate_x"), op.get_attr("transpose_y"),
                    op.get_attr("conjugate_y"), grad, 0 not in skip, 1 not in skip,
                    _perms(op))
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
                        first not in skip, first + 1 not in skip, _perms(op, f"_{p}"))
        out += [dx, dy, None]
    return out


ops.RegisterGradient("SmallMMBatchMatMul")(_product_grad)
ops.RegisterGradient("SmallMMBatchMatMulReduce")(_product_grad)
ops.RegisterGradient("SmallMMBatchMatMulPair")(_pair_grad)
