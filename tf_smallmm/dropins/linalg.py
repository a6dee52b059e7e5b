"""Drop-in `matmul` and `matvec` (same signatures, results, static shapes and errors as
tf.linalg.matmul / tf.linalg.matvec)."""

import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import composite_tensor, ops

from tf_smallmm._core import builtins, dispatch, engine


def _dim(shape, i):
    return shape[i] if shape is not None else None


def _dispatched_by_builtin(*args):
    """Arguments the built-ins hand to other implementations through TF's API dispatch
    (SparseTensor, RaggedTensor, extension types): those calls go to the built-in as a
    whole, so their results and errors are its own. Variables are composite too, but
    plain dense operands."""
    return any(isinstance(x, composite_tensor.CompositeTensor) and not isinstance(x, tf.Variable)
               for x in args)


def _convert(a, b):
    # The same conversions tf.linalg.matmul makes (b takes a's dtype as a hint).
    if not (context.executing_eagerly() and isinstance(a, ops.EagerTensor)):
        a = ops.convert_to_tensor(a, name="a")
    if not (context.executing_eagerly() and isinstance(b, ops.EagerTensor)):
        b = ops.convert_to_tensor(b, dtype_hint=a.dtype.base_dtype, name="b")
    return a, b


def _eligible(a, b, transpose_a, transpose_b):
    """Static checks: our kernel runs only where its result and errors match the built-in
    and it is faster; anything else (bad ranks, mismatched dims or dtypes, big products,
    unsupported dtypes, XLA) goes to tf.linalg.matmul, which raises its own errors."""
    if a.dtype != b.dtype:
        return False
    sa, sb = a.shape, b.shape
    if (sa.rank is not None and sa.rank < 2) or (sb.rank is not None and sb.rank < 2):
        return False
    if max(sa.rank or 0, sb.rank or 0) - 2 > dispatch.MAX_BATCH_DIMS:
        return False
    sa = sa.as_list() if sa.rank is not None else None
    sb = sb.as_list() if sb.rank is not None else None
    m = _dim(sa, -1 if transpose_a else -2)
    ka = _dim(sa, -2 if transpose_a else -1)
    kb = _dim(sb, -1 if transpose_b else -2)
    n = _dim(sb, -2 if transpose_b else -1)
    if ka is not None and kb is not None and ka != kb:
        return False
    k = ka if ka is not None else kb
    macs = m * n * k if None not in (m, n, k) else None
    if sa is not None and sb is not None:
        ba, bb = sa[:-2], sb[:-2]
        for da, db in zip(reversed(ba), reversed(bb)):
            if da is not None and db is not None and da != db and 1 not in (da, db):
                return False
    return dispatch.use_kernel(a.dtype.base_dtype, macs)


def _check_flags_like_builtin(a, b, transpose_a, adjoint_a, transpose_b, adjoint_b, grad_a,
                              grad_b):
    """tf.linalg.matmul passes its flags to an op that takes only Python bools (or None,
    the default; anything else is a TypeError), after folding transpose into adjoint
    (batch path: either rank unknown or above 2) or adjoint into transpose (two
    matrices). Check the same values in the same way, so that odd flags (0, 1.5, '',
    arrays, ...) raise exactly where the built-in raises."""
    ra, rb = a.shape.rank, b.shape.rank
    if ra is None or ra > 2 or rb is None or rb > 2:
        values = {"adj_x": True if transpose_a else adjoint_a,
                  "adj_y": True if transpose_b else adjoint_b}
    else:
        values = {"transpose_a": True if adjoint_a else transpose_a,
                  "transpose_b": True if adjoint_b else transpose_b}
    values.update(grad_x=grad_a, grad_y=grad_b)
    for arg, value in values.items():
        if value is not None and not isinstance(value, bool):  # None: the attr's default
            raise TypeError(f"Expected bool for argument '{arg}' not {value!r}.")


def matmul(a, b, transpose_a=False, transpose_b=False, adjoint_a=False, adjoint_b=False,
           a_is_sparse=False, b_is_sparse=False, output_type=None, grad_a=False,
           grad_b=False, name=None):
    """Drop-in for `tf.linalg.matmul`: the same arguments, results and errors.

    Small float/complex products run on the SmallMM kernel (batch broadcasting without
    copies, transposes as strides, gradients of broadcast operands summed inside the
    kernel); everything else calls `tf.linalg.matmul` with the same arguments.
    """
    builtin_kwargs = {"transpose_a": transpose_a, "transpose_b": transpose_b,
                      "adjoint_a": adjoint_a, "adjoint_b": adjoint_b, "a_is_sparse": a_is_sparse,
                      "b_is_sparse": b_is_sparse, "output_type": output_type, "grad_a": grad_a,
                      "grad_b": grad_b}
    with ops.name_scope(name, "MatMul", [a, b]) as scope:
        if (transpose_a and adjoint_a) or (transpose_b and adjoint_b):
            return builtins.matmul(a, b, name=scope, **builtin_kwargs)  # raises ValueError
        if a_is_sparse or b_is_sparse or _dispatched_by_builtin(a, b):
            return builtins.matmul(a, b, name=scope, **builtin_kwargs)
        a, b = _convert(a, b)
        _check_flags_like_builtin(a, b, transpose_a, adjoint_a, transpose_b, adjoint_b,
                                  grad_a, grad_b)
        # Past the check every flag is truth-testable (the built-in accepts e.g. a truthy
        # transpose_a on its batch path, where it only ever tests it with `if`).
        result = None
        if output_type is None or output_type == a.dtype:
            result = on_engine(a, b, bool(transpose_a), bool(adjoint_a), bool(transpose_b),
                               bool(adjoint_b), name=scope)
        if result is None:
            return builtins.matmul(a, b, name=scope, **builtin_kwargs)
        return result


def on_engine(a, b, transpose_a=False, adjoint_a=False, transpose_b=False, adjoint_b=False,
              name=None):
    """op(a) · op(b) on the SmallMM kernel for dense tensors a, b when the dispatch policy
    takes it (see `_eligible`), else None with nothing added to the graph. op transposes
    (transpose_x) and also conjugates (adjoint_x)."""
    ta, tb = transpose_a or adjoint_a, transpose_b or adjoint_b
    if not _eligible(a, b, ta, tb):
        return None
    return engine.product(a, b, transpose_x=ta, conjugate_x=adjoint_a, transpose_y=tb,
                          conjugate_y=adjoint_b, name=name)


def matvec(a, b, transpose_a=False, adjoint_a=False, a_is_sparse=False, b_is_sparse=False,
           name=None):
    """Drop-in for `tf.linalg.matvec`: op(a)[..., M, K] · b[..., K] -> [..., M]."""
    if _dispatched_by_builtin(a, b):
        return builtins.matvec(a, b, transpose_a=transpose_a, adjoint_a=adjoint_a,
                               a_is_sparse=a_is_sparse, b_is_sparse=b_is_sparse, name=name)
    with ops.name_scope(name, "MatVec", [a, b]):
        output = matmul(a, tf.expand_dims(b, axis=-1), transpose_a=transpose_a,
                        adjoint_a=adjoint_a, a_is_sparse=a_is_sparse, b_is_sparse=b_is_sparse)
        return tf.squeeze(output, axis=-1)
