"""The capsule layers, written once for both Kerases: Keras 3 (`capsules/layers.py`) and
tf_keras (`capsules/tf_keras_layers.py`) each define every layer as a thin subclass of the
class here and of its own `Layer`, naming its Keras module (`_keras`). Arguments,
weights, maths and configs are the same in both, so a model ports between them unchanged.

A layer of one Keras in a model of the other would not have its weights tracked (tf_keras
wraps a foreign layer as a Lambda and trains everything else), so each layer refuses, with
a TypeError naming the layer to use instead, inputs or a calling layer from the other Keras.
"""

import sys

import numpy as np
import tensorflow as tf

from tf_smallmm._core import dispatch
from tf_smallmm._core.dispatch import builtin_ops
from tf_smallmm.capsules.prediction import predict, predict_reference
from tf_smallmm.capsules.routing import (
    EPSILON,
    dynamic_routing,
    dynamic_routing_reference,
    squash,
)

# The functions each Keras' layers module re-exports (`from keras_common import *`) next to
# its layers.
__all__ = ["builtin_ops", "capsnet_keras_kernel", "dynamic_routing", "dynamic_routing_reference",
           "export_without_plugin", "load_capsnet_keras_weights", "margin_loss", "predict",
           "predict_reference", "smallmm_ops_in_saved_model", "squash"]

KERAS3_PATH = "tf_smallmm.layers"  # with TF_USE_LEGACY_KERAS unset
TF_KERAS_PATH = "tf_smallmm.keras2.layers"


def in_keras3_model(values):
    """Whether `values` hold Keras 3 symbolic tensors or a Keras 3 layer is calling."""
    if "keras" not in sys.modules:
        return False
    import keras
    from keras.src.backend.common import global_state

    return global_state.get_global_attribute("current_call_ctx") is not None or any(
        isinstance(v, keras.KerasTensor) for v in tf.nest.flatten(values))


def in_tf_keras_model(values):
    """Whether `values` hold tf_keras symbolic tensors or a tf_keras layer is calling."""
    if "tf_keras" not in sys.modules:
        return False
    from tf_keras.src.engine import base_layer_utils, keras_tensor

    return base_layer_utils.call_context().in_call or any(
        isinstance(v, keras_tensor.KerasTensor) for v in tf.nest.flatten(values))


class SameKeras:
    """Refuses to be called from a model of the other Keras (see the module docstring).

    Per-Keras classes set `_keras` (the module), `_kind` and `_other`: the other Keras' name,
    the function that detects it and where its layers are."""

    _keras = None
    _kind = ""
    _other = ("", None, "")

    def __call__(self, *args, **kwargs):
        other, detect, path = self._other
        if detect((args, kwargs)):
            raise TypeError(
                f"{type(self).__name__} here is a {self._kind} layer and this model is built "
                f"with {other}: its weights would not be tracked or trained. Use "
                f"{path}.{type(self).__name__} for {other} models.")
        return super().__call__(*args, **kwargs)


def _one_of(value, alias, name, alias_name):
    """An argument that also has CapsNet-Keras' name (num_capsule / dim_capsule)."""
    if (value is None) == (alias is None):
        raise TypeError(f"pass one of {name} and {alias_name} (CapsNet-Keras' name for it), "
                        f"got {name}={value!r}, {alias_name}={alias!r}")
    return int(value if value is not None else alias)


def _routings(routings):
    if int(routings) < 1:
        raise ValueError(f"routings must be >= 1, got {routings}")
    return int(routings)


class PrimaryCapsules(SameKeras):
    """Conv2D -> capsules -> squash: [B, H, W, C] -> [B, H'·W'·num_capsules, capsule_dim].

    The convolution has num_capsules·capsule_dim filters; each spatial position gives
    num_capsules capsules of capsule_dim values (filters grouped capsule-major).
    """

    def __init__(self, num_capsules, capsule_dim, kernel_size, strides=1, padding="valid",
                 kernel_initializer="glorot_uniform", epsilon=EPSILON, **kwargs):
        super().__init__(**kwargs)
        k = self._keras
        self.num_capsules = int(num_capsules)
        self.capsule_dim = int(capsule_dim)
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.kernel_initializer = k.initializers.get(kernel_initializer)
        self.epsilon = float(epsilon)
        self.conv = k.layers.Conv2D(self.num_capsules * self.capsule_dim, kernel_size,
                                    strides=strides, padding=padding,
                                    kernel_initializer=self.kernel_initializer,
                                    dtype=self.dtype_policy, name="conv")

    def build(self, input_shape):
        self.conv.build(input_shape)
        super().build(input_shape)

    def _num_out(self, input_shape):
        s = self.conv.compute_output_shape(input_shape)
        if s[1] is None or s[2] is None:
            return None
        return int(s[1]) * int(s[2]) * self.num_capsules

    def call(self, inputs):
        y = self.conv(inputs)
        n = self._num_out(inputs.shape)
        if n is None:
            y = tf.reshape(y, tf.stack([tf.shape(y)[0], -1, self.capsule_dim]))
        else:
            y = tf.reshape(y, [-1, n, self.capsule_dim])
        return squash(y, epsilon=self.epsilon)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self._num_out(input_shape), self.capsule_dim)

    def get_config(self):
        config = super().get_config()
        config.update(num_capsules=self.num_capsules, capsule_dim=self.capsule_dim,
                      kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
                      kernel_initializer=self._keras.initializers.serialize(
                          self.kernel_initializer),
                      epsilon=self.epsilon)
        return config


class CapsuleWeights(SameKeras):
    """Owns W [in_caps, num_capsules, capsule_dim, in_dim] for inputs u [B, in_caps, in_dim].
    `num_capsule` / `dim_capsule` are accepted for num_capsules / capsule_dim (the names
    of CapsNet-Keras' CapsuleLayer)."""

    def __init__(self, num_capsules=None, capsule_dim=None, kernel_initializer="glorot_uniform",
                 kernel_regularizer=None, *, num_capsule=None, dim_capsule=None, **kwargs):
        super().__init__(**kwargs)
        k = self._keras
        self.num_capsules = _one_of(num_capsules, num_capsule, "num_capsules", "num_capsule")
        self.capsule_dim = _one_of(capsule_dim, dim_capsule, "capsule_dim", "dim_capsule")
        self.kernel_initializer = k.initializers.get(kernel_initializer)
        self.kernel_regularizer = k.regularizers.get(kernel_regularizer)
        self.supports_jit = dispatch.supports_jit()

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-2] is None or input_shape[-1] is None:
            raise ValueError(f"{type(self).__name__} expects inputs [batch, in_caps, in_dim] "
                             f"with known in_caps and in_dim, got {tuple(input_shape)}")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(input_shape[-2]), self.num_capsules, self.capsule_dim,
                   int(input_shape[-1])),
            initializer=self.kernel_initializer, regularizer=self.kernel_regularizer)
        super().build(input_shape)

    def _u_hat(self, u):
        w = tf.convert_to_tensor(self.kernel)
        if w.dtype != u.dtype:  # mixed precision: float32 variable, 16-bit compute
            w = tf.cast(w, u.dtype)
        return predict(u, w)

    def get_config(self):
        k = self._keras
        config = super().get_config()
        config.update(num_capsules=self.num_capsules, capsule_dim=self.capsule_dim,
                      kernel_initializer=k.initializers.serialize(self.kernel_initializer),
                      kernel_regularizer=k.regularizers.serialize(self.kernel_regularizer))
        return config


class CapsulePredict(CapsuleWeights):
    """Prediction vectors û[b, i, j, k] = Σ_l W[i, j, k, l]·u[b, i, l]:
    [B, in_caps, in_dim] -> [B, in_caps, num_capsules, capsule_dim], through the SmallMM
    engine (one broadcast product; dW summed over the batch inside the kernel)."""

    def call(self, inputs):
        return self._u_hat(inputs)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.num_capsules, self.capsule_dim)


class DynamicRouting(SameKeras):
    """Routing-by-agreement: û [B, in_caps, out_caps, out_dim] -> v [B, out_caps, out_dim],
    `routings` iterations fused into one kernel per batch row (no weights)."""

    def __init__(self, routings=3, epsilon=EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.routings = _routings(routings)
        self.epsilon = float(epsilon)
        self.supports_jit = dispatch.supports_jit()

    def call(self, inputs):
        return dynamic_routing(inputs, self.routings, self.epsilon)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2], input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(routings=self.routings, epsilon=self.epsilon)
        return config


class CapsuleLayer(CapsuleWeights):
    """A capsule layer: u [B, in_caps, in_dim] -> v [B, num_capsules, capsule_dim] =
    DynamicRouting(CapsulePredict(u)), with W owned here (CapsNet's DigitCaps).

    Takes CapsNet-Keras' arguments too: `CapsuleLayer(num_capsule=10, dim_capsule=16,
    routings=3)` is the same layer (its W layout differs: see `load_capsnet_keras_weights`).
    """

    def __init__(self, num_capsules=None, capsule_dim=None, routings=3, epsilon=EPSILON,
                 **kwargs):
        super().__init__(num_capsules, capsule_dim, **kwargs)
        self.routings = _routings(routings)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        return dynamic_routing(self._u_hat(inputs), self.routings, self.epsilon)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_capsules, self.capsule_dim)

    def get_config(self):
        config = super().get_config()
        config.update(routings=self.routings, epsilon=self.epsilon)
        return config


class _Epsilon(SameKeras):
    """A weightless layer whose only argument is the epsilon under its square root."""

    def __init__(self, epsilon=EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


class Squash(_Epsilon):
    """squash along the last axis, as a layer (CapsNet-Keras' Lambda(squash))."""

    def call(self, inputs):
        return squash(inputs, epsilon=self.epsilon)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


class Length(_Epsilon):
    """Capsule lengths sqrt(|v|² + epsilon): [B, J, K] -> [B, J], the class scores."""

    def call(self, inputs):
        return tf.sqrt(tf.reduce_sum(tf.square(inputs), axis=-1)
                       + tf.cast(self.epsilon, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])


class Mask(SameKeras):
    """Keeps one capsule per sample and flattens for the decoder: [B, J, K] -> [B, J·K].

    Called on `[v, y]` (y one-hot [B, J] or class ids [B]) it keeps the capsule of class y
    (training with the true label); on `v` alone, the longest capsule (inference).
    """

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            v, y = inputs
            y = tf.convert_to_tensor(y)
            if y.dtype.is_integer or y.shape.rank == 1:
                y = tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), tf.shape(v)[1])
        else:
            v = inputs
            y = tf.one_hot(tf.argmax(tf.reduce_sum(tf.square(v), -1), axis=1), tf.shape(v)[1])
        masked = v * tf.cast(y, v.dtype)[..., None]
        j, k = v.shape[1], v.shape[2]
        if j is not None and k is not None:
            return tf.reshape(masked, [-1, int(j) * int(k)])
        return tf.reshape(masked, tf.stack([tf.shape(v)[0], -1]))

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(
                input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        j, k = input_shape[1], input_shape[2]
        return (input_shape[0], None if j is None or k is None else int(j) * int(k))


def primary_cap(keras, squash_layer, inputs, dim_capsule, n_channels, kernel_size, strides,
                padding):
    """CapsNet-Keras' `PrimaryCap` built with `keras` and our `squash_layer` (Squash): Conv2D
    'primarycap_conv2d' -> [B, -1, dim_capsule] -> squash, the same layers and names, so
    that its checkpoints load by layer name."""
    x = keras.layers.Conv2D(dim_capsule * n_channels, kernel_size, strides=strides,
                            padding=padding, name="primarycap_conv2d")(inputs)
    x = keras.layers.Reshape((-1, dim_capsule), name="primarycap_reshape")(x)
    return squash_layer(name="primarycap_squash")(x)


def margin_loss(y_true, y_pred, m_plus=0.9, m_minus=0.1, down_weight=0.5):
    """CapsNet's margin loss per sample, summed over classes:
    T·max(0, m⁺ - |v|)² + λ·(1 - T)·max(0, |v| - m⁻)².

    y_pred: capsule lengths [B, J] (`Length`); y_true: one-hot [B, J] or class ids [B] /
    [B, 1]. Computed in float32 (mixed precision included).
    """
    y_pred = tf.cast(y_pred, tf.float32)
    y_true = tf.convert_to_tensor(y_true)
    num_classes = y_pred.shape[-1] if y_pred.shape[-1] is not None else tf.shape(y_pred)[-1]
    if y_true.shape.rank is not None and (
            y_true.shape.rank == 1 or (y_true.shape[-1] == 1 and y_pred.shape[-1] != 1)):
        y_true = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), num_classes)
    t = tf.cast(y_true, tf.float32)
    present = t * tf.square(tf.nn.relu(m_plus - y_pred))
    absent = down_weight * (1.0 - t) * tf.square(tf.nn.relu(y_pred - m_minus))
    return tf.reduce_sum(present + absent, axis=-1)


# --------------------------------------------------------------------------- deployment
def smallmm_ops_in_saved_model(path):
    """The SmallMM* op types a SavedModel's graphs (functions included) contain."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(tf.io.gfile.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    found = set()
    for mg in sm.meta_graphs:
        nodes = list(mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            nodes.extend(fn.node_def)
        found.update(n.op for n in nodes if n.op.startswith("SmallMM"))
    return found


def export_without_plugin(model, filepath, **kwargs):
    """Exports `model` as a SavedModel (`model.export(filepath, **kwargs)`) whose graph uses
    TensorFlow's built-in ops only, for serving binaries without the tf_smallmm op library
    (TF Serving, another language's TF runtime). Same maths and weights; slower than an
    export with the SmallMM ops, which needs `import tf_smallmm` (or the .so loaded) where it
    is served. Raises RuntimeError if a SmallMM op still made it into the export (e.g. a
    layer that calls the raw ops directly). Returns `filepath`.
    """
    with builtin_ops():
        if type(model).__module__.startswith("tf_keras"):
            model.export(filepath, **kwargs)  # tf_keras writes SavedModels only
        else:
            model.export(filepath, format="tf_saved_model", **kwargs)
    left = smallmm_ops_in_saved_model(filepath)
    if left:
        raise RuntimeError(f"export_without_plugin: {filepath} still contains {sorted(left)}; "
                           f"a layer calls SmallMM ops without the dispatch policy")
    return filepath


def capsnet_keras_kernel(w):
    """A CapsNet-Keras CapsuleLayer's W [out_caps, in_caps, out_dim, in_dim] as our
    CapsuleLayer's kernel [in_caps, out_caps, out_dim, in_dim] (a numpy array)."""
    return np.transpose(np.asarray(w), (1, 0, 2, 3))


def load_capsnet_keras_weights(model, filepath):
    """Loads a CapsNet-Keras checkpoint into `model`, a model built with tf_smallmm's layers
    (either Keras) under the same layer names (examples/capsnet_keras_port.py is one).

    `filepath` is an HDF5 file from Keras 2's `model.save_weights('....h5')` or
    `model.save('....h5')`, what CapsNet-Keras writes. Every layer's weights load by layer
    name; a CapsuleLayer's W is converted to our layout (`capsnet_keras_kernel`). Raises
    ValueError naming the layers with weights that only one side has (shapes are checked
    by `set_weights`).
    """
    import h5py

    def names(values):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]

    with h5py.File(filepath, "r") as f:
        root = f.get("model_weights", f)
        saved = {}
        for layer in names(root.attrs["layer_names"]):
            group = root[layer]
            values = [np.asarray(group[w]) for w in names(group.attrs.get("weight_names", []))]
            if values:
                saved[layer] = values
    ours = {layer.name: layer for layer in model.layers if layer.weights}
    if set(saved) != set(ours):
        raise ValueError(
            f"load_capsnet_keras_weights: layers with weights only in {filepath}: "
            f"{sorted(set(saved) - set(ours))}; only in the model: "
            f"{sorted(set(ours) - set(saved))}")
    for name, layer in ours.items():
        values = saved[name]
        if isinstance(layer, CapsuleWeights):
            values = [capsnet_keras_kernel(values[0])] + values[1:]
        layer.set_weights(values)
