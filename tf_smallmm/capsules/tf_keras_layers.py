"""The capsule layers for tf_keras (Keras 2: `import tf_keras`, or tf.keras under
TF_USE_LEGACY_KERAS=1), public as tf_smallmm.keras2.layers: the same names, arguments,
maths and configs as the Keras 3 layers in `capsules/layers.py` (whose docstring has the
usage), from the same definitions (`capsules/keras_common.py`), registered with tf_keras'
serialisation under the same names ("tf_smallmm>CapsuleLayer", ...).
"""

import tf_keras

from tf_smallmm.capsules import keras_common
from tf_smallmm.capsules.keras_common import *  # the shared functions

__all__ = ["CapsuleLayer", "CapsulePredict", "DynamicRouting", "Length", "Mask", "PrimaryCap",
           "PrimaryCapsules", "Squash"]
__all__ += keras_common.__all__

_register = tf_keras.saving.register_keras_serializable(package="tf_smallmm")


class _TfKeras(keras_common.SameKeras, tf_keras.layers.Layer):
    _keras = tf_keras
    _kind = "tf_keras"
    _other = ("Keras 3", keras_common.in_keras3_model, keras_common.KERAS3_PATH)


@_register
class PrimaryCapsules(keras_common.PrimaryCapsules, _TfKeras):
    __doc__ = keras_common.PrimaryCapsules.__doc__


@_register
class CapsulePredict(keras_common.CapsulePredict, _TfKeras):
    __doc__ = keras_common.CapsulePredict.__doc__


@_register
class DynamicRouting(keras_common.DynamicRouting, _TfKeras):
    __doc__ = keras_common.DynamicRouting.__doc__


@_register
class CapsuleLayer(keras_common.CapsuleLayer, _TfKeras):
    __doc__ = keras_common.CapsuleLayer.__doc__


@_register
class Squash(keras_common.Squash, _TfKeras):
    __doc__ = keras_common.Squash.__doc__


@_register
class Length(keras_common.Length, _TfKeras):
    __doc__ = keras_common.Length.__doc__


@_register
class Mask(keras_common.Mask, _TfKeras):
    __doc__ = keras_common.Mask.__doc__


def PrimaryCap(inputs, dim_capsule, n_channels, kernel_size, strides, padding):
    """CapsNet-Keras' PrimaryCap (see keras_common.primary_cap)."""
    return keras_common.primary_cap(tf_keras, Squash, inputs, dim_capsule, n_channels,
                                    kernel_size, strides, padding)


_register(margin_loss)
