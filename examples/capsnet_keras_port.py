"""Porting a CapsNet written in the style of the widely copied CapsNet-Keras code
(Sabour et al.'s MNIST CapsNet, tf_keras) to tf_smallmm's layers, checkpoint included.

`classic_capsnet` below is such a definition: capsule layers written with tf_keras'
backend and broadcast `tf.matmul`s, W stored [out_caps, in_caps, out_dim,
in_dim]. `capsnet` is the same network on tf_smallmm. The diff a user makes to their
model file is the import and the weight loading; the model definition stays:

    -from capsulelayers import CapsuleLayer, PrimaryCap, Length, Mask
    +from tf_smallmm.keras2.layers import CapsuleLayer, PrimaryCap, Length, Mask
    +from tf_smallmm.keras2.layers import load_capsnet_keras_weights
     ...
     primarycaps = PrimaryCap(conv1, dim_capsule=8, n_channels=32, kernel_size=9,
                              strides=2, padding='valid')
     digitcaps = CapsuleLayer(num_capsule=n_class, dim_capsule=16, routings=routings,
                              name='digitcaps')(primarycaps)
     ...
    -model.load_weights('trained_model.h5')
    +load_capsnet_keras_weights(model, 'trained_model.h5')

`tf_smallmm.keras2.layers` is for tf_keras (Keras 2) code; for Keras 3 import the same
names from `tf_smallmm.layers` and build with `keras` instead of `tf_keras`. Old
checkpoints load into either: `load_capsnet_keras_weights` reads the HDF5 file by layer
name and transposes W to tf_smallmm's [in_caps, out_caps, out_dim, in_dim].

Code that keeps its own capsule layer (written with tf.matmul / K.batch_dot) can instead
stay as it is and run under `tf_smallmm.patch()`, which routes those calls to SmallMM.

    python examples/capsnet_keras_port.py      # builds both, moves the weights, compares
"""

import os
import sys
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras

K = tf_keras.backend


# ------------------------------------------------------------------ the classic definition
def classic_squash(vectors, axis=-1):
    n2 = K.sum(K.square(vectors), axis, keepdims=True)
    return n2 / (1 + n2) / K.sqrt(n2 + K.epsilon()) * vectors


class ClassicLength(tf_keras.layers.Layer):
    def call(self, inputs):
        return K.sqrt(K.sum(K.square(inputs), -1) + K.epsilon())


class ClassicMask(tf_keras.layers.Layer):
    def call(self, inputs):
        if isinstance(inputs, list):
            inputs, mask = inputs
        else:
            lengths = K.sqrt(K.sum(K.square(inputs), -1))
            mask = K.one_hot(K.argmax(lengths, 1), lengths.shape[1])
        return K.batch_flatten(inputs * K.expand_dims(mask, -1))


class ClassicCapsuleLayer(tf_keras.layers.Layer):
    """Dynamic routing with W [num_capsule, input_num_capsule, dim_capsule, input_dim]."""

    def __init__(self, num_capsule, dim_capsule, routings=3, **kwargs):
        super().__init__(**kwargs)
        self.num_capsule, self.dim_capsule, self.routings = num_capsule, dim_capsule, routings

    def build(self, input_shape):
        self.input_num_capsule, self.input_dim_capsule = input_shape[1], input_shape[2]
        self.W = self.add_weight(
            name="W", initializer="glorot_uniform",
            shape=[self.num_capsule, self.input_num_capsule, self.dim_capsule,
                   self.input_dim_capsule])

    def call(self, inputs):
        u = inputs[:, None, :, :, None]  # [B, 1, in_caps, in_dim, 1]
        u_hat = tf.squeeze(tf.matmul(self.W[None], u), -1)  # [B, out_caps, in_caps, out_dim]
        b = tf.zeros(tf.shape(u_hat)[:3])  # [B, out_caps, in_caps]
        for i in range(self.routings):
            c = tf.nn.softmax(b, axis=1)
            outputs = classic_squash(tf.squeeze(tf.matmul(c[:, :, None, :], u_hat), 2))
            if i < self.routings - 1:
                b += tf.squeeze(tf.matmul(u_hat, outputs[..., None]), -1)  # <u_hat, v>
        return outputs


def classic_primary_cap(inputs, dim_capsule, n_channels, kernel_size, strides, padding):
    x = tf_keras.layers.Conv2D(dim_capsule * n_channels, kernel_size, strides=strides,
                               padding=padding, name="primarycap_conv2d")(inputs)
    x = tf_keras.layers.Reshape((-1, dim_capsule), name="primarycap_reshape")(x)
    return tf_keras.layers.Lambda(classic_squash, name="primarycap_squash")(x)


# ------------------------------------------------------------------ one network, two layer sets
def build(keras, layers, input_shape=(28, 28, 1), n_class=10, routings=3, conv_filters=256,
          primary_channels=32):
    """The MNIST CapsNet and its decoder, as CapsNet-Keras' `CapsNet()` lays it out:
    (train model [x, y] -> [lengths, reconstruction], eval model x -> [lengths, recon]).
    `layers` has CapsuleLayer, PrimaryCap, Length and Mask."""
    x = keras.Input(input_shape)
    conv1 = keras.layers.Conv2D(conv_filters, 9, activation="relu", name="conv1")(x)
    primarycaps = layers.PrimaryCap(conv1, dim_capsule=8, n_channels=primary_channels,
                                    kernel_size=9, strides=2, padding="valid")
    digitcaps = layers.CapsuleLayer(num_capsule=n_class, dim_capsule=16, routings=routings,
                                    name="digitcaps")(primarycaps)
    out_caps = layers.Length(name="capsnet")(digitcaps)

    y = keras.Input((n_class,))
    decoder = keras.Sequential(name="decoder", layers=[
        keras.Input((16 * n_class,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(int(np.prod(input_shape)), activation="sigmoid"),
        keras.layers.Reshape(input_shape, name="out_recon")])
    train = keras.Model([x, y], [out_caps, decoder(layers.Mask()([digitcaps, y]))])
    evaluate = keras.Model(x, [out_caps, decoder(layers.Mask()(digitcaps))])
    return train, evaluate


class _Classic:
    CapsuleLayer = ClassicCapsuleLayer
    PrimaryCap = staticmethod(classic_primary_cap)
    Length = ClassicLength
    Mask = ClassicMask


def classic_capsnet(**kwargs):
    """The classic definition (tf_keras, its own capsule layers)."""
    return build(tf_keras, _Classic, **kwargs)


def capsnet(keras_version=2, **kwargs):
    """The port: the same definition on tf_smallmm's layers, for tf_keras (2) or Keras 3."""
    if keras_version == 2:
        from tf_smallmm.keras2 import layers
        return build(tf_keras, layers, **kwargs)
    import keras

    from tf_smallmm import layers
    return build(keras, layers, **kwargs)


def main(argv):
    from tf_smallmm.keras2.layers import load_capsnet_keras_weights

    small = {"input_shape": (20, 20, 1), "conv_filters": 32, "primary_channels": 4}
    if "--full" in argv:
        small = {}
    _, classic = classic_capsnet(**small)
    rng = np.random.default_rng(0)
    digitcaps = classic.get_layer("digitcaps")  # as if trained: W far from its small init
    digitcaps.set_weights([rng.normal(0, 3, w.shape) for w in digitcaps.get_weights()])
    x = rng.uniform(0, 1, (4,) + classic.input_shape[1:]).astype("float32")
    want = classic.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trained_model.h5")
        classic.save_weights(path)  # what CapsNet-Keras writes
        for version in (2, 3):
            _, ported = capsnet(version, **small)
            load_capsnet_keras_weights(ported, path)
            got = ported.predict(x, verbose=0)
            err = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
            print(f"Keras {version}: class lengths {np.round(got[0][0], 4)}; "
                  f"max |ported - classic| = {err:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
