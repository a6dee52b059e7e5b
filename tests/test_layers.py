"""tf_smallmm.layers: shapes, configs, equivalence with the TF-ops reference layers,
Keras integration (jit, training, .keras files), mixed precision, and the demo."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smallmm as smm
from conftest import small_capsnet, smallmm_ops
from tf_smallmm import layers as caps
from tf_smallmm._core import dispatch


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 6, 6, 1)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, n), 3)
    return x, y


# --------------------------------------------------------------------------- shapes, configs
@pytest.mark.parametrize("layer,input_shape,output_shape", [
    (caps.PrimaryCapsules(4, 8, 3), (2, 6, 6, 5), (2, 64, 8)),
    (caps.PrimaryCapsules(2, 3, 2, strides=2, padding="same"), (2, 6, 6, 1), (2, 18, 3)),
    (caps.CapsulePredict(3, 4), (2, 5, 6), (2, 5, 3, 4)),
    (caps.DynamicRouting(2), (2, 5, 3, 4), (2, 3, 4)),
    (caps.CapsuleLayer(3, 4, routings=2), (2, 5, 6), (2, 3, 4)),
    (caps.Length(), (2, 3, 4), (2, 3)),
    (caps.Mask(), (2, 3, 4), (2, 12)),
], ids=lambda x: type(x).__name__ if isinstance(x, keras.layers.Layer) else None)
def test_output_shapes_and_config_roundtrip(layer, input_shape, output_shape):
    x = tf.random.uniform(input_shape, seed=1)
    y = layer(x)
    assert tuple(y.shape) == output_shape
    assert tuple(layer.compute_output_shape(input_shape)) == output_shape
    symbolic = layer(keras.Input(input_shape[1:]))
    assert tuple(symbolic.shape) == (None,) + output_shape[1:]
    clone = type(layer).from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x), y, rtol=1e-6)
    assert keras.saving.get_registered_name(type(layer)).startswith("tf_smallmm>")


@pytest.mark.parametrize("make", [lambda: caps.CapsulePredict(3, 4), lambda: caps.DynamicRouting(2),
                                  lambda: caps.CapsuleLayer(3, 4)],
                         ids=["CapsulePredict", "DynamicRouting", "CapsuleLayer"])
def test_layers_opt_out_of_keras_auto_xla_only_without_the_xla_kernels(make, monkeypatch):
    # With the XLA kernels XLA compiles our ops (tests/test_xla.py); without them it would
    # compile the TF-ops fallback instead, so the layers keep Keras from choosing XLA.
    assert make().supports_jit is dispatch.xla_compiles_kernels()
    monkeypatch.setattr(dispatch, "xla_compiles_kernels", lambda: False)
    assert make().supports_jit is False


def test_keras_does_not_jit_compile_a_model_with_our_layers_without_the_xla_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "xla_compiles_kernels", lambda: False)
    model = small_capsnet()
    with pytest.warns(UserWarning):
        model.compile("sgd", caps.margin_loss, jit_compile=True)
    assert model.jit_compile is False
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain.compile("sgd", "mse", jit_compile=True)
    assert plain.jit_compile is True


# --------------------------------------------------------------------------- equivalence
def test_capsule_layer_is_predict_then_routing_and_matches_reference():
    u = tf.random.uniform((4, 10, 6), -1, 1, seed=2)
    layer = caps.CapsuleLayer(5, 8, routings=3,
                              kernel_initializer=keras.initializers.RandomNormal(stddev=0.5))
    v = layer(u)
    pred, route = caps.CapsulePredict(5, 8), caps.DynamicRouting(3)
    pred.build(u.shape)
    pred.set_weights(layer.get_weights())
    np.testing.assert_allclose(route(pred(u)), v, rtol=1e-6, atol=1e-7)
    w = layer.kernel
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(u) ** 2)
    ours = tape.gradient(loss, w)
    with caps.builtin_ops(), tf.GradientTape() as tape:
        ref_v = layer(u)
        loss = tf.reduce_sum(ref_v ** 2)
    theirs = tape.gradient(loss, w)
    np.testing.assert_allclose(ref_v, v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_training_graph_uses_smallmm_ops_and_forced_builtins_do_not():
    model = small_capsnet()
    x, _ = data(4)

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x))
        return tape.gradient(loss, model.trainable_weights)

    ops = smallmm_ops(tf.function(step).get_concrete_function(tf.constant(x)))
    assert {"SmallMMBatchMatMul", "SmallMMDynamicRouting", "SmallMMDynamicRoutingGrad"} <= ops
    assert ops & {"SmallMMBatchMatMulReduce", "SmallMMBatchMatMulPair"}
    with caps.builtin_ops():
        assert not smallmm_ops(tf.function(step).get_concrete_function(tf.constant(x)))


def test_squash_length_mask_and_margin_loss():
    s = tf.constant([[[3.0, 4.0], [0.0, 0.0]]])  # |s| = 5 and 0
    v = caps.squash(s).numpy()
    np.testing.assert_allclose(np.linalg.norm(v[0, 0]), 25 / 26, rtol=1e-6)
    np.testing.assert_array_equal(v[0, 1], [0, 0])
    np.testing.assert_allclose(caps.Length()(s), [[5.0, np.sqrt(1e-7)]], rtol=1e-6)

    v = tf.constant([[[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])  # longest: capsule 1
    np.testing.assert_array_equal(caps.Mask()(v), [[0, 0, 0, 3, 0, 0]])
    np.testing.assert_array_equal(caps.Mask()([v, tf.constant([[1.0, 0, 0]])]),
                                  [[1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(caps.Mask()([v, tf.constant([2])]), [[0, 0, 0, 0, 1, 1]])

    lengths = np.array([[0.95, 0.3, 0.05], [0.5, 0.05, 0.2]], np.float32)
    labels = np.array([0, 2])
    t = np.eye(3)[labels]
    want = (t * np.maximum(0, 0.9 - lengths) ** 2
            + 0.5 * (1 - t) * np.maximum(0, lengths - 0.1) ** 2).sum(-1)
    np.testing.assert_allclose(caps.margin_loss(t, lengths), want, rtol=1e-6)
    np.testing.assert_allclose(caps.margin_loss(labels, lengths), want, rtol=1e-6)
    np.testing.assert_allclose(caps.margin_loss(labels[:, None], lengths), want, rtol=1e-6)


def test_routings_must_be_positive():
    with pytest.raises(ValueError, match="routings"):
        caps.DynamicRouting(0)
    with pytest.raises(ValueError, match="routings"):
        caps.CapsuleLayer(3, 4, routings=0)
    with pytest.raises(ValueError, match="in_caps"):
        caps.CapsuleLayer(3, 4).build((None, None, 8))


# --------------------------------------------------------------------------- Keras
def test_fit_reduces_loss_and_keras_file_roundtrip(tmp_path):
    model = small_capsnet()
    model.compile(keras.optimizers.Adam(1e-2), caps.margin_loss)
    x, y = data(32)
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < first
    path = str(tmp_path / "capsnet.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)
    assert loaded.loss is caps.margin_loss or "margin_loss" in str(loaded.loss)
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)  # the optimizer state came along


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_forward_and_train_step(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = small_capsnet()
        caps_layer = next(l for l in model.layers if isinstance(l, caps.CapsuleLayer))
        assert caps_layer.compute_dtype == policy.split("_")[1]
        assert caps_layer.kernel.dtype == "float32"
        model.compile(keras.optimizers.Adam(1e-2), caps.margin_loss)
        x, y = data(16)
        out = model(x)
        assert out.dtype == policy.split("_")[1]
        before = caps_layer.get_weights()[0].copy()
        loss = model.train_on_batch(x, y)
        assert np.isfinite(loss)
        assert not np.array_equal(caps_layer.get_weights()[0], before)

        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(model(x), tf.float32))
            return tape.gradient(loss, model.trainable_weights)

        assert {"SmallMMBatchMatMul", "SmallMMDynamicRouting"} <= smallmm_ops(
            tf.function(step).get_concrete_function(tf.constant(x)))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_exported_under_layers_namespace():
    assert smm.layers is caps
    for name in caps.__all__:
        assert hasattr(caps, name), name


@pytest.mark.slow
def test_demo_quick_runs_and_prints_the_table():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(smm.__file__))]
                                          + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-m", "tf_smallmm.demo", "--quick"], capture_output=True,
                         text=True, timeout=300, env=env, cwd=os.path.dirname(__file__),
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [l for l in out.stdout.splitlines() if l.startswith("| ")]
    assert len(table) == 3, out.stdout[-2000:]
    ours, ref = table[1], table[2]
    assert "SmallMMDynamicRouting" in ours and ref.endswith("| - |")
    assert "Epoch 2/2" in out.stdout  # Keras' progress bar
