"""Capsule prediction vectors û[b, i, j, k] = Σ_l W[i, j, k, l] · u[b, i, l], on the SmallMM
engine: `capsule_predict(w, u)` (tf_smallmm.capsule_predict), `predict(u, w)` (the same
function with the layers' argument order, tf_smallmm.layers.predict) and
`predict_reference(u, w)` (TensorFlow's einsum: the fallback's maths and the test oracle).
"""

import tensorflow as tf
from tensorflow.python.framework import ops

from tf_smallmm._core import builtins, contraction

EQUATION = "ijkl,bil->bijk"
CONTRACTION = contraction.Contraction(tuple("ijkl"), tuple("bil"), tuple("bijk"))


def _shape(t):
    return t.shape.as_list() if t.shape.rank is not None else "<unknown rank>"


def _check(w, u):
    """ValueError naming the argument and both shapes when they cannot be capsule weights
    [in_caps, out_caps, out_dim, in_dim] (or [1, in_caps, ...]) and inputs
    [batch, in_caps, in_dim]. Unknown ranks pass (w is then taken as rank 4): tf.einsum
    checks them at run time."""
    def fail(text):  # the shapes are formatted only for the error (eager calls run this)
        raise ValueError(f"capsule_predict: {text}; w has shape {_shape(w)} and u has shape "
                         f"{_shape(u)}")

    w_rank, u_rank = w.shape.rank, u.shape.rank
    if w_rank not in (None, 4, 5):
        fail("w must have rank 4 [in_caps, out_caps, out_dim, in_dim] or 5 "
             "[1, in_caps, out_caps, out_dim, in_dim]")
    if w_rank == 5 and w.shape[0] not in (None, 1):
        fail("a rank-5 w must have a leading axis of size 1 [1, in_caps, out_caps, out_dim, "
             "in_dim]")
    if u_rank not in (None, 3):
        fail("u must have rank 3 [batch, in_caps, in_dim]")
    if w_rank is None or u_rank is None:
        return
    for what, dw, du in (("in_caps", w.shape[-4], u.shape[1]),
                         ("in_dim", w.shape[-1], u.shape[2])):
        if dw is not None and du is not None and dw != du:
            fail(f"{what} differs between w ({dw}) and u ({du})")


def _arguments(w, u):
    """w and u as checked tensors, w without its leading axis of size 1."""
    if not isinstance(w, ops.EagerTensor):
        w = ops.convert_to_tensor(w, name="w")
    if not isinstance(u, ops.EagerTensor):
        u = ops.convert_to_tensor(u, dtype_hint=w.dtype, name="u")
    _check(w, u)
    if w.shape.rank == 5:
        w = tf.squeeze(w, axis=0)  # raises at run time if the axis is not 1
    return w, u


def capsule_predict(w, u, name=None):
    """Prediction vectors of a capsule layer: û[b, i, j, k] = Σ_l w[i, j, k, l] · u[b, i, l].

    Args:
      w: weights [in_caps, out_caps, out_dim, in_dim] (or with a leading axis of size 1).
      u: input capsules [batch, in_caps, in_dim], same dtype.
      name: optional name scope.

    Returns:
      û [batch, in_caps, out_caps, out_dim]; the same as
      `tf.einsum('ijkl,bil->bijk', w, u)`, which is what runs where the SmallMM kernels
      do not (other dtypes, big products, XLA without our XLA kernels,
      TF_SMALLMM_DISABLE=1, builtin_ops()).

    On the engine this is one product per (b, i): w[i] viewed as an
    [out_caps·out_dim, in_dim] matrix times u[b, i] as a column, with w broadcast over the
    batch (never tiled). The gradient for w is summed over the batch inside the kernel, so
    training allocates no [batch, in_caps, out_caps, out_dim, in_dim] intermediate.

    Raises:
      ValueError: wrong ranks, or in_caps / in_dim that differ between w and u.
    """
    with ops.name_scope(name, "CapsulePredict", [w, u]):
        w, u = _arguments(w, u)
        result = contraction.run(CONTRACTION, w, u, lambda: builtins.einsum(EQUATION, w, u))
        return result if result is not None else builtins.einsum(EQUATION, w, u)


def predict(u, w):
    """`capsule_predict(w, u)`, with the arguments in the order the layers use."""
    return capsule_predict(w, u)


def predict_reference(u, w):
    """û with TensorFlow's own ops (tf.einsum), after the same checks."""
    w, u = _arguments(w, u)
    return builtins.einsum(EQUATION, w, u)
