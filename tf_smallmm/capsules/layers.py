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

The same layers for tf_keras are in `capsules/tf_keras_layers.py` (tf_smallmm.keras2.layers;
tf_smallmm.layers is that module when TF_USE_LEGACY_KERAS=1): both are thin subclasses of
`capsules/keras_common.py`. A layer refuses a model of the other Keras with a TypeError.

CapsNet-Keras code ports with its names: `CapsuleLayer(num_capsule=..., dim_capsule=...,
routings=...)`, `PrimaryCap(inputs, dim_capsule, n_channels, kernel_size, strides,
padding)`, `Length`, `Mask`, `squash`; `load_capsnet_keras_weights(model, path)` loads its
checkpoints (examples/capsnet_keras_port.py).

Every layer is serialisable (`.keras`, `get_config`). The layers with SmallMM ops declare
`supports_jit = True` where XLA compiles those ops (`dispatch.supports_jit`), and False
with a library built without the XLA kernels, so that Keras' automatic XLA on GPU machines
does not silently compile the fallback instead. A SavedModel of a model with these layers
contains SmallMM ops: the serving process must `import tf_smallmm` before loading it, or
use `export_without_plugin(model, path)` to export the same model with TF built-ins only.
"""

import keras

from tf_smallmm.capsules import keras_common
from tf_smallmm.capsules.keras_common import *  # the shared functions

__all__ = ["CapsuleLayer", "CapsulePredict", "DynamicRouting", "Length", "Mask", "PrimaryCap",
           "PrimaryCapsules", "Squash"]
__all__ += keras_common.__all__

_register = keras.saving.register_keras_serializable(package="tf_smallmm")


class _Keras3(keras_common.SameKeras, keras.layers.Layer):
    _keras = keras
    _kind = "Keras 3"
    _other = ("tf_keras", keras_common.in_tf_keras_model, keras_common.TF_KERAS_PATH)


@_register
class PrimaryCapsules(keras_common.PrimaryCapsules, _Keras3):
    __doc__ = keras_common.PrimaryCapsules.__doc__


@_register
class CapsulePredict(keras_common.CapsulePredict, _Keras3):
    __doc__ = keras_common.CapsulePredict.__doc__


@_register
class DynamicRouting(keras_common.DynamicRouting, _Keras3):
    __doc__ = keras_common.DynamicRouting.__doc__


@_register
class CapsuleLayer(keras_common.CapsuleLayer, _Keras3):
    __doc__ = keras_common.CapsuleLayer.__doc__


@_register
class Squash(keras_common.Squash, _Keras3):
    __doc__ = keras_common.Squash.__doc__


@_register
class Length(keras_common.Length, _Keras3):
    __doc__ = keras_common.Length.__doc__


@_register
class Mask(keras_common.Mask, _Keras3):
    __doc__ = keras_common.Mask.__doc__


def PrimaryCap(inputs, dim_capsule, n_channels, kernel_size, strides, padding):
    """CapsNet-Keras' PrimaryCap (see keras_common.primary_cap)."""
    return keras_common.primary_cap(keras, Squash, inputs, dim_capsule, n_channels, kernel_size,
                                    strides, padding)


_register(margin_loss)
