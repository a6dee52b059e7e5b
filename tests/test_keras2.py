"""The capsule layers for tf_keras (tf_smallmm.keras2.layers): the same names, arguments,
configs and results as the Keras 3 ones; weights that train in functional, Sequential and
subclassed tf_keras models; a clear error where a layer meets a model of the other Keras;
CapsNet-Keras' constructor names and checkpoints (examples/capsnet_keras_port.py)."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from conftest import random_tensor, run_python, smallmm_ops
from tf_smallmm import layers as caps3
from tf_smallmm.keras2 import layers as caps2

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def tf_keras_capsnet(seed=0):
    """conftest.small_capsnet, in tf_keras: Conv -> PrimaryCapsules -> CapsuleLayer -> Length."""
    tf_keras.utils.set_random_seed(seed)
    x = inp = tf_keras.Input((6, 6, 1))
    x = tf_keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = caps2.PrimaryCapsules(4, 4, 3)(x)
    v = caps2.CapsuleLayer(3, 8, routings=3, name="digitcaps",
                           kernel_initializer=tf_keras.initializers.RandomNormal(stddev=0.3,
                                                                                 seed=1))(x)
    return tf_keras.Model(inp, caps2.Length()(v))


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 6, 6, 1)).astype("float32")
    return x, np.eye(3, dtype="float32")[rng.integers(0, 3, n)]


def test_same_public_names_as_the_keras3_layers():
    assert caps2.__all__ == caps3.__all__
    for name in caps2.__all__:
        assert hasattr(caps2, name), name
    for name in ("CapsuleLayer", "CapsulePredict", "DynamicRouting", "PrimaryCapsules",
                 "Length", "Mask", "Squash"):
        assert issubclass(getattr(caps2, name), tf_keras.layers.Layer)
        assert issubclass(getattr(caps3, name), keras.layers.Layer)
        assert tf_keras.saving.get_registered_name(getattr(caps2, name)) == f"tf_smallmm>{name}"
        assert keras.saving.get_registered_name(getattr(caps3, name)) == f"tf_smallmm>{name}"


@pytest.mark.parametrize("name,args,input_shape", [
    ("PrimaryCapsules", (2, 3, 2), (2, 6, 6, 1)),
    ("CapsulePredict", (3, 4), (2, 5, 6)),
    ("DynamicRouting", (2,), (2, 5, 3, 4)),
    ("CapsuleLayer", (3, 4), (2, 5, 6)),
    ("Squash", (), (2, 3, 4)),
    ("Length", (), (2, 3, 4)),
    ("Mask", (), (2, 3, 4)),
])
def test_same_results_configs_and_shapes_in_both_kerases(name, args, input_shape):
    x = random_tensor(input_shape, tf.float32, 1)
    ours3, ours2 = getattr(caps3, name)(*args), getattr(caps2, name)(*args)
    y3 = ours3(x)
    ours2(x)
    ours2.set_weights(ours3.get_weights())
    np.testing.assert_allclose(ours2(x).numpy(), np.asarray(y3), rtol=1e-6, atol=1e-7)
    config2, config3 = ours2.get_config(), ours3.get_config()
    for key in set(config3) - {"name", "dtype", "trainable", "kernel_initializer", "autocast"}:
        assert config2.get(key) == config3[key], key
    clone = type(ours2).from_config(config2)
    clone(x)
    clone.set_weights(ours2.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), np.asarray(y3), rtol=1e-6, atol=1e-7)
    symbolic = ours2(tf_keras.Input(input_shape[1:]))
    assert tuple(symbolic.shape[1:]) == tuple(y3.shape[1:])


def _capsule_weights(model):
    layer = next(l for l in model.layers if isinstance(l, caps2.CapsuleLayer))
    return layer.get_weights()[0].copy(), layer


def test_functional_model_trains_the_capsule_weights_with_smallmm_ops():
    model = tf_keras_capsnet()
    before, layer = _capsule_weights(model)
    assert [w.name for w in model.trainable_weights].count(layer.kernel.name) == 1
    model.compile(tf_keras.optimizers.Adam(1e-2), caps2.margin_loss)
    x, y = data()
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < first
    assert np.abs(layer.get_weights()[0] - before).max() > 1e-4

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x))
        return tape.gradient(loss, model.trainable_weights)

    assert {"SmallMMBatchMatMul", "SmallMMDynamicRouting"} <= smallmm_ops(
        tf.function(step).get_concrete_function(tf.constant(x)))


def test_sequential_and_subclassed_models_train_the_capsule_weights():
    class Net(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.primary = caps2.PrimaryCapsules(4, 4, 3)
            self.digit = caps2.CapsuleLayer(num_capsule=3, dim_capsule=8)
            self.length = caps2.Length()

        def call(self, x):
            return self.length(self.digit(self.primary(x)))

    sequential = tf_keras.Sequential([tf_keras.Input((6, 6, 1)), caps2.PrimaryCapsules(4, 4, 3),
                                      caps2.CapsuleLayer(3, 8), caps2.Length()])
    x, y = data(16)
    for model in (sequential, Net()):
        model.compile(tf_keras.optimizers.Adam(1e-2), caps2.margin_loss)
        model(x[:1])
        before, layer = _capsule_weights(model)
        assert any(w is layer.kernel for w in model.trainable_weights)
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        assert np.abs(layer.get_weights()[0] - before).max() > 1e-4


def test_a_layer_refuses_a_model_of_the_other_keras():
    with pytest.raises(TypeError, match=r"tf_keras.*tf_smallmm\.keras2\.layers\.CapsuleLayer"):
        caps3.CapsuleLayer(3, 4)(tf_keras.Input((5, 6)))
    with pytest.raises(TypeError, match=r"Keras 3.*tf_smallmm\.layers\.CapsuleLayer"):
        caps2.CapsuleLayer(3, 4)(keras.Input((5, 6)))

    class Net(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.digit = caps3.CapsuleLayer(3, 4)

        def call(self, x):
            return self.digit(x)

    with pytest.raises(TypeError, match="would not be tracked"):
        Net()(tf.ones([2, 5, 6]))


def test_keras_files_roundtrip_in_tf_keras(tmp_path):
    model = tf_keras_capsnet()
    x, _ = data(4)
    for path in (str(tmp_path / "capsnet.keras"), str(tmp_path / "capsnet.h5")):
        model.save(path)
        loaded = tf_keras.models.load_model(path, compile=False)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                                   rtol=1e-6)
        assert any(isinstance(l, caps2.CapsuleLayer) for l in loaded.layers)


def test_capsnet_keras_constructor_names():
    for module in (caps2, caps3):
        layer = module.CapsuleLayer(num_capsule=10, dim_capsule=16, routings=2)
        assert (layer.num_capsules, layer.capsule_dim, layer.routings) == (10, 16, 2)
        with pytest.raises(TypeError, match="num_capsule"):
            module.CapsuleLayer(10, 16, num_capsule=10)
        with pytest.raises(TypeError, match="dim_capsule"):
            module.CapsuleLayer(num_capsule=10)


@pytest.mark.slow
def test_tf_smallmm_layers_follows_tf_use_legacy_keras():
    out = run_python("""
        import tf_keras
        from tf_smallmm import layers
        from tf_smallmm.keras2 import layers as keras2
        assert layers.CapsuleLayer is keras2.CapsuleLayer
        assert issubclass(layers.CapsuleLayer, tf_keras.layers.Layer)
        print("ok")
    """, env={"TF_USE_LEGACY_KERAS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# ------------------------------------------------------------------ CapsNet-Keras port

@pytest.fixture(scope="module")
def port():
    sys.path.insert(0, EXAMPLES)
    try:
        import capsnet_keras_port
    finally:
        sys.path.remove(EXAMPLES)
    return capsnet_keras_port


SMALL = {"input_shape": (20, 20, 1), "conv_filters": 16, "primary_channels": 2, "n_class": 4}


@pytest.mark.parametrize("version", [2, 3])
def test_a_capsnet_keras_checkpoint_loads_into_the_port(port, version, tmp_path):
    train, classic = port.classic_capsnet(**SMALL)
    # W as if trained (its initial values are small enough to give lengths of ~0 for all).
    w = classic.get_layer("digitcaps").get_weights()[0]
    classic.get_layer("digitcaps").set_weights([random_tensor(w.shape, tf.float32, 3) * 2])
    path = str(tmp_path / "trained_model.h5")
    train.save_weights(path)
    x = random_tensor((3, 20, 20, 1), tf.float32, 2).numpy()
    want = classic.predict(x, verbose=0)
    assert want[0].std() > 0.02  # class lengths that differ: the test can fail
    _, ported = port.capsnet(version, **SMALL)
    caps = caps2 if version == 2 else caps3
    caps.load_capsnet_keras_weights(ported, path)
    got = ported.predict(x, verbose=0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    digitcaps = ported.get_layer("digitcaps")
    np.testing.assert_array_equal(
        digitcaps.get_weights()[0],
        np.transpose(classic.get_layer("digitcaps").get_weights()[0], (1, 0, 2, 3)))


def test_loading_a_checkpoint_of_another_network_names_the_layers(port, tmp_path):
    train, _ = port.classic_capsnet(**SMALL)
    path = str(tmp_path / "trained_model.h5")
    train.save_weights(path)
    x = tf_keras.Input((20, 20, 1))
    other = tf_keras.Model(x, tf_keras.layers.Dense(2, name="head")(x))
    with pytest.raises(ValueError, match=r"only in .*digitcaps.*only in the model: \['head'\]"):
        caps2.load_capsnet_keras_weights(other, path)
