"""Dynamic routing of capsules (routing-by-agreement over the input capsules i, Sabour et
al. 2017): û [B, I, J, K] -> v [B, J, K], fused, and its pure-TF reference (the fallback and
the test oracle).

`dynamic_routing(u_hat, iterations)` is the fused op SmallMMDynamicRouting (all iterations
of a batch row in one kernel while the row's û stays in cache) with an exact gradient op.
It falls back to `dynamic_routing_reference` (tf.nn.softmax, tf.einsum and elementwise TF
ops, the same maths) when the dispatch policy says so: XLA compilation with a library built
without the XLA kernels, TF_SMALLMM_DISABLE=1 or `builtin_ops()`, no op library, a GPU
without SmallMM kernels, or an unsupported dtype.
float16 / bfloat16 are routed in float32 (cast in, cast back).
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops.parallel_for import pfor

from tf_smallmm._core import builtins, dispatch, loader

# Inside squash's square root: keeps v and its gradient finite at s = 0 (Keras' epsilon).
EPSILON = 1e-7

ROUTING_DTYPES = frozenset([tf.float32, tf.float64])  # the fused op's own dtypes
CAST_TO_FLOAT32 = frozenset([tf.float16, tf.bfloat16])  # routed in float32


# --------------------------------------------------------------------------- policy
def use_routing_kernel(dtype):
    """Whether `dynamic_routing` runs the fused op for this dtype (16-bit: in float32)."""
    dtype = tf.as_dtype(dtype)
    if dtype not in ROUTING_DTYPES | CAST_TO_FLOAT32:
        return False
    return dispatch.use_kernel(dtype) and not dispatch.gpu_without_kernels("SmallMMDynamicRouting")


# --------------------------------------------------------------------------- squash
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

    NaN / Inf: tf.nn.softmax makes a whole row NaN when one of its logits is NaN in
    float64, under XLA and on GPU, and the fused kernels follow that (the rule is in
    cc/engine/routing.h). TensorFlow's float32 CPU softmax with oneDNN (on by default on
    x86, TF_ENABLE_ONEDNN_OPTS) does not: it gives 0 to the row's finite logits, and NaN
    to some of them at positions that depend on the CPU's vector width (TF 2.21, J = 16:
    a NaN at j = 0 also makes j = 15 NaN with AVX-512, j = 8 and 15 with AVX2). In
    float32 on such a machine this function therefore confines a NaN in û to fewer output
    capsules than the fused op does (its gradient does not: softmax's gradient is not
    oneDNN's); compare NaN positions with it in float64.
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
        s = builtins.einsum("bij,bijk->bjk", c, u_hat)
        v = squash(s, epsilon=epsilon)
        if r < int(iterations) - 1:
            logits = logits + builtins.einsum("bijk,bjk->bij", u_hat, v)
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


@ops.RegisterGradient("SmallMMDynamicRoutingGrad")
def _dynamic_routing_grad_grad(op, grad):
    """Second order: the gradient of dû = Jᵀ·grad_v (J the routing's Jacobian at û) with
    respect to û (the Hessian term, for gradient penalties and Hessian-vector products) and
    to grad_v (J·grad, the forward-mode derivative that tf.autodiff.ForwardAccumulator
    gets by differentiating a gradient).

    A composite, not a fused op: it differentiates `dynamic_routing_reference` twice with
    nested tapes, in TF ops. Second derivatives are rare next to training steps, the
    composite is the exact same maths as the first-order kernels (and differentiable again,
    for third order), and it needs no second kernel pair to port to the GPU. It costs what
    the TF-ops layer's double backward costs.
    """
    u_hat, grad_v = op.inputs
    iterations, epsilon = op.get_attr("num_iterations"), op.get_attr("epsilon")
    with tf.GradientTape() as outer:
        outer.watch([u_hat, grad_v])
        with tf.GradientTape() as inner:
            inner.watch(u_hat)
            v = dynamic_routing_reference(u_hat, iterations, epsilon)
        grad_u_hat = inner.gradient(v, u_hat, output_gradients=grad_v)
    return outer.gradient(grad_u_hat, [u_hat, grad_v], output_gradients=grad)


# --------------------------------------------------------------------------- pfor
def _fold_loop_axis(pfor_input, op_fn):
    """Vectorises a routing op over tf.vectorized_map's / batch_jacobian's loop: each
    input gets the loop axis in front of its batch axis ([N, B, ...]); rows are
    independent, so the op runs once on [N·B, ...] and the result is unfolded again. A
    loop-invariant input is tiled over N (the op has no broadcasting of its own)."""
    pfor_input.stack_inputs()
    xs = [pfor_input.stacked_input(i) for i in range(pfor_input.num_inputs)]
    lead = tf.shape(xs[0])[:2]  # [N, B]
    rows = tf.reduce_prod(lead, keepdims=True)
    y = op_fn(*[tf.reshape(x, tf.concat([rows, tf.shape(x)[2:]], 0)) for x in xs])
    y = tf.reshape(y, tf.concat([lead, tf.shape(y)[1:]], 0))
    return pfor.wrap(y, True)


@pfor.RegisterPFor("SmallMMDynamicRouting")
def _dynamic_routing_pfor(pfor_input):
    attrs = {"num_iterations": pfor_input.get_attr("num_iterations"),
             "epsilon": pfor_input.get_attr("epsilon")}
    return _fold_loop_axis(
        pfor_input, lambda u: loader.load().small_mm_dynamic_routing(u, **attrs))


@pfor.RegisterPFor("SmallMMDynamicRoutingGrad")
def _dynamic_routing_grad_pfor(pfor_input):
    attrs = {"num_iterations": pfor_input.get_attr("num_iterations"),
             "epsilon": pfor_input.get_attr("epsilon")}
    return _fold_loop_axis(
        pfor_input, lambda u, g: loader.load().small_mm_dynamic_routing_grad(u, g, **attrs))
