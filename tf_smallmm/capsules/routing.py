"""Capsule-network math: prediction vectors through the SmallMM engine, fused dynamic
routing, and the pure-TF reference of both (the fallback and the test oracle).

    û[b, i, j, k] = Σ_l W[i, j, k, l] · u[b, i, l]            predict(u, w)
    v[b, j, :]    = routing-by-agreement over i (Sabour et al. 2017)
                                                           dynamic_routing(u_hat, iterations)

`predict` is one SmallMM product: W reshaped to [I, J·K, L] (broadcast over the batch) times
u[..., None]; its gradient sums dW over the batch inside the kernel. `dynamic_routing` is
the fused op SmallMMDynamicRouting (all iterations of a batch row in one kernel while the
row's û stays in cache) with an exact gradient op. Each falls back to its `*_reference`
(tf.einsum, tf.nn.softmax and elementwise TF ops, the same maths) when the dispatch policy
says so: XLA compilation, TF_SMALLMM_DISABLE=1, no op library, a GPU without SmallMM
kernels, inside `builtin_ops()`, or an unsupported dtype. float16 / bfloat16 routing runs
the fused op in float32 (cast in, cast back); prediction runs in the 16-bit type itself
(the engine accumulates in float32).
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops

from tf_smallmm._core import dispatch, engine, loader

# Inside squash's square root: keeps v and its gradient finite at s = 0 (Keras' epsilon).
EPSILON = 1e-7

ROUTING_DTYPES = frozenset([tf.float32, tf.float64])  # the fused op's own dtypes
CAST_TO_FLOAT32 = frozenset([tf.float16, tf.bfloat16])  # routed in float32


# --------------------------------------------------------------------------- policy
def use_predict_kernel(dtype, macs=None):
    """Whether `predict` runs on the SmallMM engine for this dtype and J·K·L."""
    return dispatch.use_kernel(tf.as_dtype(dtype), macs)


def use_routing_kernel(dtype):
    """Whether `dynamic_routing` runs the fused op for this dtype (16-bit: in float32)."""
    dtype = tf.as_dtype(dtype)
    if dtype not in ROUTING_DTYPES | CAST_TO_FLOAT32:
        return False
    return dispatch.use_kernel(dtype) and not dispatch.gpu_without_kernels("SmallMMDynamicRouting")


# --------------------------------------------------------------------------- helpers
def _dims(t, *axes):
    """Sizes of t along axes: Python ints where static, scalar tensors otherwise."""
    static = t.shape.as_list() if t.shape.rank is not None else None
    dynamic = None
    out = []
    for a in axes:
        d = static[a] if static is not None else None
        if d is None:
            if dynamic is None:
                dynamic = tf.shape(t)
            d = dynamic[a]
        out.append(d)
    return out


def squash(s, axis=-1, epsilon=EPSILON):
    """squash(s) = s · |s|² / (1 + |s|²) / sqrt(|s|² + epsilon) along `axis`: keeps the
    direction, maps the length into [0, 1). 16-bit inputs are squashed in float32."""
    s = tf.convert_to_tensor(s)
    dtype = s.dtype
    if dtype in CAST_TO_FLOAT32:
        s = tf.cast(s, tf.float32)
    n2 = tf.reduce_sum(tf.square(s), axis=axis, keepdims=True)
    v = s * (n2 / (1.0 + n2)) / tf.sqrt(n2 + tf.cast(_op_epsilon(epsilon), s.dtype))
    return tf.cast(v, dtype)


def _op_epsilon(epsilon):
    # The op's epsilon attr is a float32: use the same value in the reference so that the
    # two agree to float64 rounding in tests.
    return float(np.float32(epsilon))


def _check_predict_shapes(u, w):
    if u.shape.rank is not None and u.shape.rank != 3:
        raise ValueError(f"capsule prediction: u must have shape [batch, in_caps, in_dim], "
                         f"got {u.shape}")
    if w.shape.rank is not None and w.shape.rank != 4:
        raise ValueError(f"capsule prediction: w must have shape [in_caps, out_caps, "
                         f"out_dim, in_dim], got {w.shape}")
    if u.shape.rank is not None and w.shape.rank is not None:
        for name, du, dw in (("in_caps", u.shape[1], w.shape[0]),
                             ("in_dim", u.shape[2], w.shape[3])):
            if du is not None and dw is not None and du != dw:
                raise ValueError(f"capsule prediction: {name} differs between u {u.shape} and "
                                 f"w {w.shape}")


# --------------------------------------------------------------------------- prediction
def predict_reference(u, w):
    """û = einsum('ijkl,bil->bijk', w, u) with TF's own ops."""
    u, w = tf.convert_to_tensor(u), tf.convert_to_tensor(w)
    _check_predict_shapes(u, w)
    return tf.einsum("ijkl,bil->bijk", w, u)


def predict(u, w):
    """Capsule prediction vectors û [B, I, J, K] from u [B, I, L] and W [I, J, K, L].

    One SmallMM product: tf.reshape(W, [I, J·K, L]) broadcast over the batch times
    u[..., None] -> [B, I, J·K, 1]. The gradient for W is summed over the batch inside the
    kernel. Falls back to `predict_reference` where the dispatch policy says so.
    """
    u, w = tf.convert_to_tensor(u), tf.convert_to_tensor(w)
    _check_predict_shapes(u, w)
    if u.dtype != w.dtype:
        raise TypeError(f"capsule prediction: u is {u.dtype.name} but w is {w.dtype.name}")
    i, j, k, l_ = _dims(w, 0, 1, 2, 3)
    static = all(isinstance(d, int) for d in (j, k, l_))
    if not use_predict_kernel(u.dtype, j * k * l_ if static else None):
        return predict_reference(u, w)
    w_matrix = tf.reshape(w, [i, j * k, l_] if static else tf.stack([i, j * k, l_]))
    y = engine.product(w_matrix, tf.expand_dims(u, -1))  # [B, I, J·K, 1]; grad: a reshape
    (b,) = _dims(u, 0)
    shape = [b, i, j, k]
    if all(isinstance(d, int) for d in shape):
        return tf.reshape(y, shape)
    out = tf.reshape(y, tf.stack([tf.convert_to_tensor(d, tf.int32) for d in shape]))
    return tf.ensure_shape(out, [d if isinstance(d, int) else None for d in shape])


# --------------------------------------------------------------------------- routing
def _check_routing_args(u_hat, iterations):
    if u_hat.shape.rank is not None and u_hat.shape.rank != 4:
        raise ValueError(f"dynamic routing: u_hat must have shape [batch, in_caps, out_caps, "
                         f"out_dim], got {u_hat.shape}")
    if int(iterations) < 1:
        raise ValueError(f"dynamic routing: iterations must be >= 1, got {iterations}")


def dynamic_routing_reference(u_hat, iterations=3, epsilon=EPSILON):
    """Routing-by-agreement with TF ops: the fallback and the test oracle.

    logits = 0; repeat: c = softmax(logits over out_caps); s = Σ_i c·û; v = squash(s);
    logits += <û, v> (not after the last iteration). Returns v [B, J, K]. Differentiated
    by TF's tape through every iteration. 16-bit inputs are routed in float32.
    """
    u_hat = tf.convert_to_tensor(u_hat)
    _check_routing_args(u_hat, iterations)
    dtype = u_hat.dtype
    if dtype in CAST_TO_FLOAT32:
        u_hat = tf.cast(u_hat, tf.float32)
    logits = tf.zeros(tf.shape(u_hat)[:3], u_hat.dtype)  # [B, I, J]
    v = None
    for r in range(int(iterations)):
        c = tf.nn.softmax(logits, axis=2)
        s = tf.einsum("bij,bijk->bjk", c, u_hat)
        v = squash(s, epsilon=epsilon)
        if r < int(iterations) - 1:
            logits = logits + tf.einsum("bijk,bjk->bij", u_hat, v)
    return tf.cast(v, dtype)


def dynamic_routing(u_hat, iterations=3, epsilon=EPSILON):
    """Routing-by-agreement over û [B, I, J, K] -> v [B, J, K], fused (SmallMMDynamicRouting)
    where the dispatch policy allows, else `dynamic_routing_reference`; same results."""
    u_hat = tf.convert_to_tensor(u_hat)
    _check_routing_args(u_hat, iterations)
    if not use_routing_kernel(u_hat.dtype):
        return dynamic_routing_reference(u_hat, iterations, epsilon)
    dtype = u_hat.dtype
    x = tf.cast(u_hat, tf.float32) if dtype in CAST_TO_FLOAT32 else u_hat
    v = loader.load().small_mm_dynamic_routing(x, num_iterations=int(iterations),
                                                epsilon=float(epsilon))
    return tf.cast(v, dtype)


@ops.RegisterGradient("SmallMMDynamicRouting")
def _dynamic_routing_grad(op, grad):
    """dL/dû through every iteration, by the fused backward op (recomputes the forward
    iterations per row instead of keeping them).

    The control dependency on the forward op's output orders the two: the backward op then
    holds the last reference to û and writes dû over it (saving a batch-sized allocation),
    and the two never compete for the cache. A loss that uses v orders them anyway; one that
    does not (e.g. a sum in a benchmark) would otherwise let them run concurrently.
    """
    with ops.control_dependencies([op.outputs[0]]):
        return loader.load().small_mm_dynamic_routing_grad(
            op.inputs[0], grad, num_iterations=op.get_attr("num_iterations"),
            epsilon=op.get_attr("epsilon"))
# SmallMMDynamicRoutingGrad has no gradient: a second derivative raises TF's LookupError
# instead of silently being zero.
