"""Writes the files in this folder with tf_smallmm 0.1.0 (run once, from the repository
root, against an in-tree build): a `.keras` file and a SavedModel of a small CapsNet that
uses every capsule layer and the registered margin loss, the input they were run on and
their outputs. tests/test_saved_files.py loads them with the current code, so a change that
breaks files users already have fails there.

    python tests/data/release_0_1_0/make.py
"""

import os

import keras
import numpy as np

import tf_smallmm
from tf_smallmm import layers as caps

HERE = os.path.dirname(os.path.abspath(__file__))


def capsnet():
    """Conv -> PrimaryCapsules (16 capsules of 4) -> two capsule branches, CapsuleLayer and
    CapsulePredict + DynamicRouting, added (3 capsules of 4) -> Length (scores) and
    Mask -> Dense (decoder). Small on purpose: the files are committed."""
    keras.utils.set_random_seed(0)
    init = keras.initializers.RandomNormal(stddev=0.3, seed=1)
    x = image = keras.Input((6, 6, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = caps.PrimaryCapsules(4, 4, 3, name="primary")(x)
    v = caps.CapsuleLayer(3, 4, routings=3, kernel_initializer=init, name="digits")(x)
    u_hat = caps.CapsulePredict(3, 4, kernel_initializer=init, name="predict")(x)
    v = keras.layers.Add(name="add")([v, caps.DynamicRouting(2, name="routing")(u_hat)])
    scores = caps.Length(name="scores")(v)
    decoded = keras.layers.Dense(12, activation="sigmoid", name="decoder")(
        caps.Mask(name="mask")(v))
    model = keras.Model(image, [scores, decoded], name="capsnet")
    model.compile(keras.optimizers.SGD(1e-2), loss=[caps.margin_loss, "mse"])
    return model


def main():
    assert tf_smallmm.kernels_loaded(), tf_smallmm.build_info()["load_error"]
    model = capsnet()
    x = np.random.default_rng(0).uniform(0, 1, (4, 6, 6, 1)).astype("float32")
    scores, decoded = model.predict(x, verbose=0)
    np.savez(os.path.join(HERE, "expected.npz"), x=x, scores=scores, decoded=decoded)
    model.save(os.path.join(HERE, "capsnet.keras"))
    model.export(os.path.join(HERE, "capsnet_savedmodel"), verbose=False)
    found = caps.smallmm_ops_in_saved_model(os.path.join(HERE, "capsnet_savedmodel"))
    assert {"SmallMMBatchMatMul", "SmallMMDynamicRouting"} <= found, found
    print(f"tf_smallmm {tf_smallmm.__version__}: wrote {HERE} ({sorted(found)})")


if __name__ == "__main__":
    main()
