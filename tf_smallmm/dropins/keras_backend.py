"""Drop-in `batch_dot` and `dot` (same signatures, results, static shapes and errors as
`tf_keras.backend.batch_dot` / `tf_keras.backend.dot`).

Both validate their arguments exactly as tf_keras does (same checks, same order, same
messages), then run the product as a Contraction on the engine when the planner finds a
transpose-free view of it (`contraction.plan`). Otherwise they compute it the way tf_keras
does (its transposes and tf.matmul, ported below), so results and errors match by
construction. tf_keras is not needed at run time.
"""

import functools

import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.ops import gen_array_ops

from tf_smallmm._core import builtins, contraction
from tf_smallmm.dropins import einsum, linalg


def _int_shape(x):
    # tf_keras.backend.int_shape
    try:
        shape = x.shape
        if not isinstance(shape, tuple):
            shape = tuple(shape.as_list())
        return shape
    except ValueError:
        return None


def _ndim(x):
    # tf_keras.backend.ndim
    return x.shape.rank


def _is_sparse(tensor):
    # tf_keras.backend.is_sparse
    spec = getattr(tensor, "_type_spec", None)
    if spec is not None:
        return isinstance(spec, tf.SparseTensorSpec)
    return isinstance(tensor, tf.SparseTensor)


def _contract(x, y, c, fallback):
    """Runs Contraction c on the engine, or None (the caller falls back). fallback(x, y)
    computes the same with the built-ins, for what run-time sizes decide: a dispatch
    choice, or shapes that do not fit (`contraction.run`)."""
    x, y = einsum._as_tensor(x), einsum._as_tensor(y)
    if x is None or y is None:
        return None
    return contraction.run(c, x, y, fallback=lambda: fallback(x, y))


# ------------------------------------------------------------------ batch_dot

def batch_dot(x, y, axes=None):
    """Drop-in for `tf_keras.backend.batch_dot(x, y, axes)`: batchwise dot product.

    Contracts x's axis axes[0] with y's axis axes[1] for every row of the batch (axis 0);
    the result has x's other axes followed by y's other non-batch axes, and (batch, 1)
    when both inputs have rank 2. `axes` is None (x's last axis with y's second-to-last,
    or last when y has rank 2), an int (the same axis of both) or a pair of ints;
    negative axes count from the end. Runs on the SmallMM kernels for small float
    products whose axes need no transpose; otherwise as tf_keras does it.
    """
    x_shape = _int_shape(x)
    y_shape = _int_shape(y)

    x_ndim = len(x_shape)
    y_ndim = len(y_shape)

    if x_ndim < 2 or y_ndim < 2:
        raise ValueError(
            "Cannot do batch_dot on inputs with rank < 2. Received inputs with shapes "
            + str(x_shape) + " and " + str(y_shape) + ".")

    x_batch_size = x_shape[0]
    y_batch_size = y_shape[0]
    if x_batch_size is not None and y_batch_size is not None and x_batch_size != y_batch_size:
        raise ValueError(
            "Cannot do batch_dot on inputs with different batch sizes. Received inputs "
            "with shapes " + str(x_shape) + " and " + str(y_shape) + ".")
    if isinstance(axes, int):
        axes = [axes, axes]

    if axes is None:
        if y_ndim == 2:
            axes = [x_ndim - 1, y_ndim - 1]
        else:
            axes = [x_ndim - 1, y_ndim - 2]

    if any(isinstance(a, (list, tuple)) for a in axes):
        raise ValueError(
            "Multiple target dimensions are not supported. Expected: None, int, (int, int), "
            "Provided: " + str(axes))

    axes = list(axes)
    if axes[0] < 0:
        axes[0] += x_ndim
    if axes[1] < 0:
        axes[1] += y_ndim

    if 0 in axes:
        raise ValueError(
            "Cannot perform batch_dot over axis 0. If your inputs are not batched, add a "
            "dummy batch dimension to your inputs using K.expand_dims(x, 0)")
    a0, a1 = axes
    d1 = x_shape[a0]
    d2 = y_shape[a1]

    if d1 is not None and d2 is not None and d1 != d2:
        raise ValueError(
            "Cannot do batch_dot on inputs with shapes " + str(x_shape) + " and "
            + str(y_shape) + " with axes=" + str(axes)
            + f". x.shape[{axes[0]:d}] != y.shape[{axes[1]:d}] ({d1:d} != {d2:d}).")

    if 0 < a0 < x_ndim and 0 < a1 < y_ndim:
        both_2d = x_ndim == 2 and y_ndim == 2

        def keras(x, y):  # the contraction's output: without the kept axis of two 2-D inputs
            result = _keras_batch_dot(x, y, a0, a1, x_ndim, y_ndim)
            return tf.squeeze(result, 1) if both_2d else result

        result = _contract(x, y, _batch_dot_contraction(x_ndim, y_ndim, a0, a1), keras)
        if result is not None:
            if both_2d:
                result = _expand_dims(result, 1)  # tf_keras keeps (batch, 1)
            return result
    return _keras_batch_dot(x, y, a0, a1, x_ndim, y_ndim)


@functools.lru_cache(maxsize=1024)
def _batch_dot_contraction(x_ndim, y_ndim, a0, a1):
    """One batch label "b" (broadcast 1 against n like tf.matmul's batch axis, as in
    tf_keras), one contracted label "k", the other axes free."""
    x_labels = ["b"] + [f"x{i}" for i in range(1, x_ndim)]
    y_labels = ["b"] + [f"y{i}" for i in range(1, y_ndim)]
    x_labels[a0] = y_labels[a1] = "k"
    out = ["b"] + [lb for lb in x_labels[1:] if lb != "k"]
    out += [lb for lb in y_labels[1:] if lb != "k"]
    return contraction.Contraction(tuple(x_labels), tuple(y_labels), tuple(out),
                                   frozenset(["b"]))


def _expand_dims(t, axis):
    # The raw op eagerly: tf.expand_dims' Python layers cost more than the product.
    if context.executing_eagerly():
        return gen_array_ops.expand_dims(t, axis)
    return tf.expand_dims(t, axis)


def _keras_batch_dot(x, y, a0, a1, x_ndim, y_ndim):
    """tf_keras' formulation after validation: transposes, reshapes, tf.matmul."""
    orig_x_ndim = x_ndim
    orig_y_ndim = y_ndim

    if x_ndim == 2:
        x = tf.expand_dims(x, 1)
        a0 += 1
        x_ndim += 1
    if y_ndim == 2:
        y = tf.expand_dims(y, 2)
        y_ndim += 1

    if a0 != x_ndim - 1:  # x's contracted axis to the end
        pattern = list(range(x_ndim))
        for i in range(a0, x_ndim - 1):
            pattern[i] = pattern[i + 1]
        pattern[-1] = a0
        x = tf.compat.v1.transpose(x, pattern)

    if a1 != 1:  # y's contracted axis to position 1
        pattern = list(range(y_ndim))
        for i in range(a1, 1, -1):
            pattern[i] = pattern[i - 1]
        pattern[1] = a1
        y = tf.compat.v1.transpose(y, pattern)

    if x_ndim > 3:
        x_shape = tf.shape(x)
        x_mid_dims = x_shape[1:-1]
        x = tf.reshape(x, tf.stack([x_shape[0], -1, x_shape[-1]]))
        x_squashed = True
    else:
        x_squashed = False

    if y_ndim > 3:
        y_shape = tf.shape(y)
        y_trail_dims = y_shape[2:]
        y = tf.reshape(y, tf.stack([y_shape[0], y_shape[1], -1]))
        y_squashed = True
    else:
        y_squashed = False

    result = builtins.matmul(x, y)

    output_shape = tf.shape(result)
    do_reshape = False
    if x_squashed:
        output_shape = tf.concat([output_shape[:1], x_mid_dims, output_shape[-1:]], 0)
        do_reshape = True
    if y_squashed:
        output_shape = tf.concat([output_shape[:-1], y_trail_dims], 0)
        do_reshape = True
    if do_reshape:
        result = tf.reshape(result, output_shape)

    if orig_x_ndim == 2:
        result = tf.squeeze(result, 1)
    elif orig_y_ndim == 2:
        result = tf.squeeze(result, -1)
    return result


# ------------------------------------------------------------------ dot

def dot(x, y):
    """Drop-in for `tf_keras.backend.dot(x, y)`: numpy/Theano-style N-D dot product.

    Sums over x's last axis and y's second-to-last: x [..., K] · y [..., K, N] ->
    x.shape[:-1] + y.shape[:-2] + y.shape[-1:], e.g. (2,3,4)·(7,4,5) -> (2,3,7,5).
    2-D inputs are a plain matmul. Runs on the SmallMM kernels for small float
    products: every (row of x, matrix of y) pair is one small product, with x and y
    broadcast against each other through inserted size-1 axes (no transposes or copies).
    """
    if _ndim(x) is not None and (_ndim(x) > 2 or _ndim(y) > 2):
        x_ndim, y_ndim = _ndim(x), _ndim(y)
        if x_ndim >= 1 and y_ndim is not None and y_ndim >= 2:
            result = _contract(x, y, _dot_contraction(x_ndim, y_ndim), _keras_dot_nd)
            if result is not None:
                return result
        return _keras_dot_nd(x, y)
    if _is_sparse(x):
        return tf.sparse.sparse_dense_matmul(x, y)
    return linalg.matmul(x, y)


@functools.lru_cache(maxsize=1024)
def _dot_contraction(x_ndim, y_ndim):
    """x's last axis with y's second-to-last ("k"), every other axis free."""
    x_labels = [f"x{i}" for i in range(x_ndim - 1)] + ["k"]
    y_labels = [f"y{i}" for i in range(y_ndim - 2)] + ["k", "n"]
    return contraction.Contraction(tuple(x_labels), tuple(y_labels),
                                   tuple(x_labels[:-1] + y_labels[:-2] + ["n"]))


def _keras_dot_nd(x, y):
    """tf_keras' N-D formulation: transpose y's contracted axis first, then a 2-D matmul."""
    x_shape = []
    for i, s in zip(_int_shape(x), tf.unstack(tf.shape(x))):
        x_shape.append(i if i is not None else s)
    x_shape = tuple(x_shape)
    y_shape = []
    for i, s in zip(_int_shape(y), tf.unstack(tf.shape(y))):
        y_shape.append(i if i is not None else s)
    y_shape = tuple(y_shape)
    y_permute_dim = list(range(_ndim(y)))
    y_permute_dim = [y_permute_dim.pop(-2)] + y_permute_dim
    xt = tf.reshape(x, [-1, x_shape[-1]])
    yt = tf.reshape(tf.compat.v1.transpose(y, perm=y_permute_dim), [y_shape[-2], -1])
    return tf.reshape(builtins.matmul(xt, yt), x_shape[:-1] + y_shape[:-2] + y_shape[-1:])
