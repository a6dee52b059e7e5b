"""Routing under TF's other autodiff and vectorisation machinery, against the TF-ops
reference (dynamic_routing_reference) in float64: second derivatives (Hessian-vector
products, gradient penalties), forward mode (tf.autodiff.ForwardAccumulator), and pfor
(tf.vectorized_map, GradientTape.batch_jacobian). First-order results are in
test_routing.py, NaN/Inf in test_routing_numerics.py."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import random_tensor, smallmm_ops
from tf_smallmm import layers
from tf_smallmm._core import loader
from tf_smallmm.capsules import routing as caps

ROUTINGS = [caps.dynamic_routing, caps.dynamic_routing_reference]
SHAPES = [(2, 5, 3, 4), (2, 17, 2, 8), (1, 3, 1, 16)]  # run-time K, > one block, J = 1


def close(got, want, rtol=1e-10):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(np.abs(want).max(), 1e-30))


def inputs(shape, seed):
    u = random_tensor(shape, tf.float64, seed=seed) * 2.0
    g = random_tensor((shape[0], shape[2], shape[3]), tf.float64, seed=seed + 1)
    t = random_tensor(shape, tf.float64, seed=seed + 2)
    return u, g, t


# --------------------------------------------------------------------------- second order
def hessian_vector_product(routing, u, g, t, iterations, eager=True):
    """d/dû <dL/dû, t> for L = <routing(û), g>."""
    def hvp():
        with tf.GradientTape() as outer:
            outer.watch(u)
            with tf.GradientTape() as inner:
                inner.watch(u)
                loss = tf.reduce_sum(routing(u, iterations) * g)
            z = tf.reduce_sum(inner.gradient(loss, u) * t)
        return outer.gradient(z, u)

    return hvp() if eager else tf.function(hvp)()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "tf.function"])
def test_hessian_vector_product_matches_reference(shape, iterations, eager):
    u, g, t = inputs(shape, seed=sum(shape) + iterations)
    got, want = (hessian_vector_product(r, u, g, t, iterations, eager) for r in ROUTINGS)
    close(got, want)


@pytest.mark.slow  # ~25 s: two gradient evaluations per element of û
def test_second_derivative_is_the_numeric_derivative_of_the_gradient():
    u, g, _ = inputs((2, 5, 3, 4), seed=3)

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(caps.dynamic_routing(x, 3) * g)
        return tape.gradient(loss, x)

    theoretical, numeric = tf.test.compute_gradient(gradient, [u], delta=1e-6)
    np.testing.assert_allclose(theoretical[0], numeric[0], rtol=1e-6, atol=1e-8)


def test_gradient_of_the_gradient_op_covers_both_inputs():
    # d/d grad_v of the backward op is the forward-mode derivative (what ForwardAccumulator
    # relies on); d/dû is the Hessian term. Both against the reference's double backward.
    u, g, t = inputs((2, 6, 3, 8), seed=5)
    lib = loader.load()
    results = []
    for fused in (True, False):
        with tf.GradientTape() as outer:
            outer.watch([u, g])
            if fused:
                du = lib.small_mm_dynamic_routing_grad(u, g, num_iterations=3,
                                                       epsilon=caps.EPSILON)
            else:
                with tf.GradientTape() as inner:
                    inner.watch(u)
                    v = caps.dynamic_routing_reference(u, 3)
                du = inner.gradient(v, u, output_gradients=g)
        results.append(outer.gradient(du, [u, g], output_gradients=t))
    for got, want in zip(*results):
        close(got, want)


def test_gradient_penalty_through_the_capsule_layer():
    # WGAN-GP style: the loss contains |dv/dx|², so training differentiates the routing
    # gradient with respect to the layer's weights.
    x = random_tensor((3, 6, 4), tf.float64, seed=6)
    layer = layers.CapsuleLayer(3, 8, routings=3, dtype="float64",
                                kernel_initializer=keras.initializers.RandomNormal(stddev=0.5))
    layer.build(x.shape)

    def penalty_grad():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                v = layer(x)
                score = tf.reduce_sum(tf.sqrt(tf.reduce_sum(v * v, -1) + 1e-9))
            gx = inner.gradient(score, x)
            penalty = tf.reduce_sum(tf.square(gx))
        return outer.gradient(penalty, layer.kernel)

    step = tf.function(penalty_grad)
    ours = step()
    assert {"SmallMMDynamicRouting", "SmallMMDynamicRoutingGrad"} <= smallmm_ops(
        step.get_concrete_function())
    with layers.builtin_ops():
        theirs = tf.function(penalty_grad)()
    close(ours, theirs)


# --------------------------------------------------------------------------- forward mode
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("iterations", [1, 3])
def test_forward_accumulator_jvp_matches_reference(shape, iterations):
    u, _, t = inputs(shape, seed=sum(shape) * 3 + iterations)
    jvps = []
    for routing in ROUTINGS:
        with tf.autodiff.ForwardAccumulator(u, t) as acc:
            v = routing(u, iterations)
        jvps.append(acc.jvp(v))
    close(*jvps)


def test_forward_accumulator_through_the_capsule_layer():
    x = random_tensor((2, 5, 4), tf.float64, seed=7)
    layer = layers.CapsuleLayer(3, 8, routings=3, dtype="float64")
    layer.build(x.shape)
    kernel = layer.kernel.value  # the tf.Variable behind the Keras variable
    tangent = random_tensor(kernel.shape, tf.float64, seed=8)
    out = []
    for forced in (False, True):
        with tf.autodiff.ForwardAccumulator(kernel, tangent) as acc:
            if forced:
                with layers.builtin_ops():
                    v = layer(x)
            else:
                v = layer(x)
        out.append(acc.jvp(v))
    close(*out)

# --------------------------------------------------------------------------- pfor
def test_vectorized_map_converts_both_ops_without_a_while_loop():
    # fallback_to_while_loop=False: an op without a pfor converter raises instead.
    u, g, _ = inputs((4, 6, 3, 8), seed=9)
    lib = loader.load()

    def forward(x):
        return lib.small_mm_dynamic_routing(x[None], num_iterations=3)[0]

    def backward(x, y):
        return lib.small_mm_dynamic_routing_grad(x[None], y[None], num_iterations=3)[0]

    close(tf.vectorized_map(forward, u, fallback_to_while_loop=False),
          caps.dynamic_routing_reference(u, 3))
    want = tf.stack([backward(u[b], g[b]) for b in range(4)])
    close(tf.vectorized_map(lambda a: backward(*a), (u, g), fallback_to_while_loop=False), want)
    # û loop-invariant, grad_v per iteration (what batch_jacobian builds).
    close(tf.vectorized_map(lambda y: backward(u[0], y), g, fallback_to_while_loop=False),
          tf.stack([backward(u[0], g[b]) for b in range(4)]))


def test_vectorized_map_over_a_batch_of_batches():
    # The loop axis in front of the batch axis: folded into the op's rows and back.
    u = random_tensor((3, 2, 7, 4, 5), tf.float32, seed=10)
    got = tf.vectorized_map(lambda x: caps.dynamic_routing(x, 2), u,
                            fallback_to_while_loop=False)
    assert got.shape == (3, 2, 4, 5)
    want = caps.dynamic_routing_reference(tf.reshape(u, [6, 7, 4, 5]), 2)
    np.testing.assert_allclose(tf.reshape(got, [6, 4, 5]), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape", [(3, 6, 3, 4), (2, 17, 2, 8)], ids=str)
def test_batch_jacobian_matches_reference(shape):
    u = random_tensor(shape, tf.float64, seed=11) * 2.0
    jacobians = []
    for routing in ROUTINGS:
        with tf.GradientTape() as tape:
            tape.watch(u)
            v = routing(u, 3)
        jacobians.append(tape.batch_jacobian(v, u))
    assert jacobians[0].shape == (shape[0], shape[2], shape[3]) + shape[1:]
    close(*jacobians)


def test_batch_jacobian_and_vectorized_map_through_the_capsule_layer():
    # CapsuleLayer = capsule prediction (SmallMM products) + routing; pfor converts the
    # routing ops and falls back to a loop for any op it has no converter for.
    x = random_tensor((3, 5, 4), tf.float64, seed=12)
    layer = layers.CapsuleLayer(3, 8, routings=3, dtype="float64",
                                kernel_initializer=keras.initializers.RandomNormal(stddev=0.5))
    layer.build(x.shape)
    out = []
    for forced in (False, True):
        with layers.builtin_ops() if forced else contextlib.nullcontext():
            with tf.GradientTape() as tape:
                tape.watch(x)
                v = layer(x)
            jac = tape.batch_jacobian(v, x)
            mapped = tf.vectorized_map(lambda row: layer(row[None])[0], x)
        out.append((jac, mapped))
    assert out[0][0].shape == (3, 3, 8, 5, 4)
    close(out[0][0], out[1][0])
    close(out[0][1], out[1][1])
