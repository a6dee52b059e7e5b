"""The fused routing op (SmallMMDynamicRouting and its gradient) against the pure-TF
reference (einsum + softmax + squash) evaluated in float64. Capsule prediction is in
test_capsule.py."""

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import random_tensor, run_python, smallmm_ops
from tf_smallmm import layers
from tf_smallmm._core import dispatch, loader
from tf_smallmm.capsules import routing as caps
from tf_smallmm.layers import builtin_ops

# Per-dtype tolerance relative to the largest reference magnitude (routing is a chain of
# nonlinear steps, so an elementwise |a|·|b| bound like the matmul tests' does not apply).
TOL = {tf.float32: 2e-5, tf.float64: 1e-12, tf.float16: 2e-2, tf.bfloat16: 6e-2}

# [batch, in_caps, out_caps, out_dim]: K = 8 and 16 are compile-time instantiations, the
# others the run-time-K path; J = 1 (softmax of one logit), I = 1, odd sizes, and more
# input capsules than one softmax block (16).
SHAPES = [(3, 7, 4, 16), (2, 5, 3, 8), (2, 6, 5, 5), (1, 1, 1, 1), (2, 3, 1, 16),
          (2, 40, 10, 16), (3, 17, 2, 3), (2, 9, 7, 32)]


def _raw():
    return loader.load()


def reference(u_hat, iterations, upstream):
    """v and dL/dû (L = <v, upstream>) from the TF-ops routing in float64."""
    u = tf.cast(u_hat, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(u)
        v = caps.dynamic_routing_reference(u, iterations)
        loss = tf.reduce_sum(v * tf.cast(upstream, tf.float64))
    return v.numpy(), tape.gradient(loss, u).numpy()


def fused(u_hat, iterations, upstream):
    with tf.GradientTape() as tape:
        tape.watch(u_hat)
        v = caps.dynamic_routing(u_hat, iterations)
        loss = tf.reduce_sum(v * upstream)
    return v, tape.gradient(loss, u_hat)


def assert_close(got, want, dtype):
    got = np.asarray(tf.cast(got, tf.float64))
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_forward_and_exact_gradient_match_reference(dtype, shape, iterations):
    u = random_tensor(shape, dtype, seed=sum(shape) + iterations) * 2.0
    g = random_tensor((shape[0], shape[2], shape[3]), dtype, seed=7)
    v, du = fused(u, iterations, g)
    assert v.dtype == dtype and v.shape == (shape[0], shape[2], shape[3])
    want_v, want_du = reference(u, iterations, g)
    assert_close(v, want_v, dtype)
    assert_close(du, want_du, dtype)


def test_numeric_gradient_float64():
    # The reference's tape gradient is itself checked against finite differences here, so
    # "matches the reference" means "is the derivative".
    u = random_tensor((2, 5, 3, 4), tf.float64, seed=3) * 2.0
    for fn in (lambda x: caps.dynamic_routing(x, 3),
               lambda x: caps.dynamic_routing_reference(x, 3)):
        theoretical, numeric = tf.test.compute_gradient(fn, [u], delta=1e-6)
        np.testing.assert_allclose(theoretical[0], numeric[0], rtol=1e-6, atol=1e-8)


def test_capsnet_sized_row_in_a_tf_function():
    # The digit-caps shape (I = 1152, J = 10, K = 16), batch 3, inside a graph where the
    # gradient op may overwrite û in place.
    u = random_tensor((3, 1152, 10, 16), tf.float32, seed=1) * 0.1
    g = random_tensor((3, 10, 16), tf.float32, seed=2)

    @tf.function
    def step(u_hat):
        with tf.GradientTape() as tape:
            tape.watch(u_hat)
            x = u_hat * 1.0  # an intermediate nothing else holds: forwardable
            loss = tf.reduce_sum(caps.dynamic_routing(x, 3) * g)
        return loss, tape.gradient(loss, u_hat)

    loss, du = step(u)
    assert {"SmallMMDynamicRouting", "SmallMMDynamicRoutingGrad"} <= smallmm_ops(
        step.get_concrete_function(u))
    want_v, want_du = reference(u, 3, g)
    np.testing.assert_allclose(float(loss), float(np.sum(want_v * g.numpy())), rtol=1e-5)
    assert_close(du, want_du, tf.float32)


def test_rows_are_independent_and_nan_stays_in_its_row():
    u = random_tensor((5, 20, 4, 8), tf.float32, seed=4)
    whole = caps.dynamic_routing(u, 3).numpy()
    for b in range(5):
        np.testing.assert_array_equal(caps.dynamic_routing(u[b:b + 1], 3).numpy()[0], whole[b])
    # A NaN makes its row's v NaN (R >= 2: through every softmax row of b, as the float64
    # reference does; positions are compared in test_routing_numerics.py) and leaves the
    # other rows exactly as they were.
    bad = tf.tensor_scatter_nd_update(u, [[2, 3, 1, 0]], [np.nan])
    v = caps.dynamic_routing(bad, 3).numpy()
    ref = caps.dynamic_routing_reference(bad, 3).numpy()
    assert np.isnan(v[2]).all() and np.isnan(ref[2]).any()
    np.testing.assert_array_equal(np.delete(v, 2, axis=0), np.delete(whole, 2, axis=0))


@pytest.mark.parametrize("shape", [(0, 5, 3, 4), (2, 0, 3, 4), (2, 5, 0, 4), (2, 5, 3, 0)],
                         ids=str)
def test_empty_dimensions(shape):
    u = tf.zeros(shape)
    g = tf.ones((shape[0], shape[2], shape[3]))
    v, du = fused(u, 3, g)
    want_v, want_du = reference(u, 3, g)
    assert v.shape == want_v.shape and du.shape == want_du.shape
    np.testing.assert_array_equal(v.numpy(), want_v)  # no input capsules: v = squash(0) = 0
    np.testing.assert_array_equal(du.numpy(), want_du)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=lambda d: d.name)
def test_16_bit_routes_in_float32(dtype):
    u = random_tensor((2, 12, 4, 8), dtype, seed=5)
    g = random_tensor((2, 4, 8), dtype, seed=6)
    v, du = fused(u, 3, g)
    assert v.dtype == dtype and du.dtype == dtype
    want_v, want_du = reference(u, 3, g)
    assert_close(v, want_v, dtype)
    assert_close(du, want_du, dtype)
    fn = tf.function(lambda x: caps.dynamic_routing(x, 3)).get_concrete_function(u)
    assert "SmallMMDynamicRouting" in smallmm_ops(fn)


# --------------------------------------------------------------------------- dispatch
def test_graph_uses_fused_ops_by_default_and_builtins_when_forced():
    u = random_tensor((2, 6, 3, 8), tf.float32, seed=8)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(caps.dynamic_routing(x, 3))
        return tape.gradient(loss, x)

    assert {"SmallMMDynamicRouting", "SmallMMDynamicRoutingGrad"} <= smallmm_ops(
        tf.function(step).get_concrete_function(u))
    with builtin_ops():
        forced = tf.function(step).get_concrete_function(u)
    assert not smallmm_ops(forced)
    np.testing.assert_allclose(forced(u), step(u), rtol=1e-5, atol=1e-6)


def test_xla_compilation_falls_back_without_the_xla_kernels(monkeypatch):
    # With them the routing op compiles to a custom call (tests/test_xla.py).
    monkeypatch.setattr(dispatch, "xla_compiles_kernels", lambda: False)
    u = random_tensor((2, 6, 3, 8), tf.float32, seed=9)
    w = random_tensor((6, 3, 8, 4), tf.float32, seed=10)
    x = random_tensor((2, 6, 4), tf.float32, seed=11)

    @tf.function(jit_compile=True)
    def jit(u, w, x):
        return caps.dynamic_routing(u, 3), layers.predict(x, w)

    v, u_hat = jit(u, w, x)
    np.testing.assert_allclose(v, caps.dynamic_routing_reference(u, 3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_hat, layers.predict_reference(x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_disable_env_forces_reference():
    out = run_python("""
        import json, tensorflow as tf
        from tf_smallmm import layers
        from conftest import smallmm_ops
        u = tf.ones([2, 4, 3, 8]); w = tf.ones([4, 3, 8, 2]); x = tf.ones([2, 4, 2])
        f = tf.function(lambda u, x: (layers.dynamic_routing(u), layers.predict(x, w)))
        print(json.dumps(sorted(smallmm_ops(f.get_concrete_function(u, x)))))
    """, env={"TF_SMALLMM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_isa_matches_reference(isa):
    out = run_python("""
        import numpy as np, tensorflow as tf, tf_smallmm as smm
        from tf_smallmm.capsules import routing as caps
        rng = np.random.default_rng(0)
        worst = 0.0
        for shape in [(2, 40, 10, 16), (2, 9, 3, 8), (2, 7, 4, 5)]:
            for dt in (tf.float32, tf.float64):
                u = tf.constant(rng.uniform(-2, 2, shape), dt)
                g = tf.constant(rng.uniform(-1, 1, (shape[0], shape[2], shape[3])), dt)
                out = []
                for fn in (caps.dynamic_routing, caps.dynamic_routing_reference):
                    with tf.GradientTape() as t:
                        t.watch(u)
                        loss = tf.reduce_sum(fn(u, 3) * g)
                    out.append(t.gradient(loss, u).numpy())
                tol = 2e-5 if dt == tf.float32 else 1e-12
                err = float(np.abs(out[0] - out[1]).max() / np.abs(out[1]).max())
                worst = max(worst, err / tol)
        print(smm.build_info()["active_isa"], worst)
    """, env={"TF_SMALLMM_ISA": isa})
    assert out.returncode == 0, out.stderr[-3000:]
    active, worst = out.stdout.strip().splitlines()[-1].split()
    if active != isa:
        pytest.skip(f"this CPU lacks {isa}")
    assert float(worst) <= 1.0


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,message", [
    ("lib.small_mm_dynamic_routing(tf.ones([2, 3, 4]))", "rank 4"),
    ("lib.small_mm_dynamic_routing_grad(tf.ones([2, 3, 4, 5]), tf.ones([2, 4, 6]))",
     "grad_v must have shape [2,4,5]"),
    ("lib.small_mm_dynamic_routing(tf.ones([2, 3, 4, 5]), num_iterations=0)", "num_iterations"),
])
def test_bad_input_raises_invalid_argument_naming_shapes(call, message):
    lib = _raw()  # noqa: F841 - used by eval
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)) as e:
        eval(call)
    assert message in str(e.value)


def test_shape_function_rejects_bad_ranks_at_trace_time():
    lib = _raw()
    with pytest.raises(ValueError, match="rank 4"):
        tf.function(lambda: lib.small_mm_dynamic_routing(tf.ones([2, 3, 4])))()
    with pytest.raises(ValueError):
        tf.function(lambda: lib.small_mm_dynamic_routing_grad(tf.ones([2, 3, 4, 5]),
                                                              tf.ones([2, 4, 6])))()
    with pytest.raises(ValueError, match="u_hat must have shape"):
        caps.dynamic_routing(tf.ones([2, 3, 4]))
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        caps.dynamic_routing(tf.ones([2, 3, 4, 5]), 0)


def test_unsupported_dtype_has_no_kernel():
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError)):
        _raw().small_mm_dynamic_routing(tf.ones([1, 2, 3, 4], tf.int32))


def test_op_type_attr_lists_exactly_the_registered_dtypes():
    from tensorflow.python.framework import kernels, op_def_registry

    for op in ("SmallMMDynamicRouting", "SmallMMDynamicRoutingGrad"):
        attr = next(a for a in op_def_registry.get(op).attr if a.name == "T")
        registered = {c.allowed_values.list.type[0]
                      for k in kernels.get_registered_kernels_for_op(op).kernel
                      if k.device_type == "CPU" for c in k.constraint if c.name == "T"}
        assert set(attr.allowed_values.list.type) == registered == {
            d.as_datatype_enum for d in caps.ROUTING_DTYPES}
