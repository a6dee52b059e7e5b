"""Keras 3 capsule-network layers (Sabour et al. 2017) on the SmallMM kernels.

    x = PrimaryCapsules(num_capsules=16, capsule_dim=8, kernel_size=3)(features)  # [B, I, 8]
    v = CapsuleLayer(num_capsules=10, capsule_dim=16, routings=3)(x)             # [B, 10, 16]
    scores = Length()(v)                                                       # [B, 10]
    model.compile(loss=margin_loss, ...)

`CapsuleLayer` = `CapsulePredict` (û = W·u through the SmallMM engine, dW summed over the
batch inside the kernel) followed by `DynamicRouting` (all routing iterations of a batch
row in one fused kernel, exact gradient by a second fused kernel), under XLA
(jit_compile=True) too, as custom calls. Both fall back to the same maths in TF ops
(`predict_reference`, `dynamic_routing_reference`) under TF_SMALLMM_DISABLE=1, without the
op library, or for dtypes the kernels lack; float16 / bfloat16 (mixed precision) route in
float32 inside the fused op.

Every layer is serialisable (`.keras`, `get_config`). The layers with SmallMM ops declare
`supports_jit = True` where XLA compiles those ops (`dispatch.supports_jit`), and False
with a library built without the XLA kernels, so that Keras' automatic XLA on GPU machines
does not silently compile the fallback instead. A SavedModel of a model with these layers
contains SmallMM ops: the serving process must `import tf_smallmm` before loading it, or
use `export_without_plugin(model, path)` to export the same model with TF built-ins only.
"""

import keras
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

__all__ = [
    "CapsuleLayer",
    "CapsulePredict",
    "DynamicRouting",
    "Length",
    "Mask",
    "PrimaryCapsules",
    "builtin_ops",
    "dynamic_routing",
    "dynamic_routing_reference",
    "export_without_plugin",
    "margin_loss",
    "predict",
    "predict_reference",
    "smallmm_ops_in_saved_model",
    "squash",
]

_register = keras.saving.register_keras_serializable(package="tf_smallmm")


def _known(d):
    return None if d is None else int(d)


@_register
class PrimaryCapsules(keras.layers.Layer):
    """Conv2D -> capsules -> squash: [B, H, W, C] -> [B, H'·W'·num_capsules, capsule_dim].

    The convolution has num_capsules·capsule_dim filters; each spatial position gives
    num_capsules capsules of capsule_dim values (filters grouped capsule-major).
    """

    def __init__(self, num_capsules, capsule_dim, kernel_size, strides=1, padding="valid",
                 kernel_initializer="glorot_uniform", epsilon=EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.num_capsules = int(num_capsules)
        self.capsule_dim = int(capsule_dim)
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.epsilon = float(epsilon)
        self.conv = keras.layers.Conv2D(self.num_capsules * self.capsule_dim, kernel_size,
                                        strides=strides, padding=padding,
                                        kernel_initializer=self.kernel_initializer,
                                        dtype=self.dtype_policy, name="conv")

    def build(self, input_shape):
        self.conv.build(input_shape)

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
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      epsilon=self.epsilon)
        return config


class _CapsuleWeights(keras.layers.Layer):
    """Owns W [in_caps, num_capsules, capsule_dim, in_dim] for inputs u [B, in_caps, in_dim]."""

    def __init__(self, num_capsules, capsule_dim, kernel_initializer="glorot_uniform",
                 kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.num_capsules = int(num_capsules)
        self.capsule_dim = int(capsule_dim)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
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

    def _u_hat(self, u):
        w = tf.convert_to_tensor(self.kernel)
        if w.dtype != u.dtype:  # mixed precision: float32 variable, 16-bit compute
            w = tf.cast(w, u.dtype)
        return predict(u, w)

    def get_config(self):
        config = super().get_config()
        config.update(num_capsules=self.num_capsules, capsule_dim=self.capsule_dim,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer))
        return config


@_register
class CapsulePredict(_CapsuleWeights):
    """Prediction vectors û[b, i, j, k] = Σ_l W[i, j, k, l]·u[b, i, l]:
    [B, in_caps, in_dim] -> [B, in_caps, num_capsules, capsule_dim], through the SmallMM
    engine (one broadcast product; dW summed over the batch inside the kernel)."""

    def call(self, inputs):
        return self._u_hat(inputs)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.num_capsules, self.capsule_dim)


@_register
class DynamicRouting(keras.layers.Layer):
    """Routing-by-agreement: û [B, in_caps, out_caps, out_dim] -> v [B, out_caps, out_dim],
    `routings` iterations fused into one kernel per batch row (no weights)."""

    def __init__(self, routings=3, epsilon=EPSILON, **kwargs):
        super().__init__(**kwargs)
        if int(routings) < 1:
            raise ValueError(f"routings must be >= 1, got {routings}")
        self.routings = int(routings)
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


@_register
class CapsuleLayer(_CapsuleWeights):
    """A capsule layer: u [B, in_caps, in_dim] -> v [B, num_capsules, capsule_dim] =
    DynamicRouting(CapsulePredict(u)), with W owned here (CapsNet's DigitCaps)."""

    def __init__(self, num_capsules, capsule_dim, routings=3, epsilon=EPSILON, **kwargs):
        super().__init__(num_capsules, capsule_dim, **kwargs)
        if int(routings) < 1:
            raise ValueError(f"routings must be >= 1, got {routings}")
        self.routings = int(routings)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        return dynamic_routing(self._u_hat(inputs), self.routings, self.epsilon)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_capsules, self.capsule_dim)

    def get_config(self):
        config = super().get_config()
        config.update(routings=self.routings, epsilon=self.epsilon)
        return config


@_register
class Length(keras.layers.Layer):
    """Capsule lengths sqrt(|v|² + epsilon): [B, J, K] -> [B, J], the class scores."""

    def __init__(self, epsilon=EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        return tf.sqrt(tf.reduce_sum(tf.square(inputs), axis=-1)
                       + tf.cast(self.epsilon, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


@_register
class Mask(keras.layers.Layer):
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


@_register
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
        model.export(filepath, format="tf_saved_model", **kwargs)
    left = smallmm_ops_in_saved_model(filepath)
    if left:
        raise RuntimeError(f"export_without_plugin: {filepath} still contains {sorted(left)}; "
                           f"a layer calls SmallMM ops without the dispatch policy")
    return filepath
