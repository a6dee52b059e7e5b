"""Decompose a small CNN trained on scikit-learn's digits, then fine-tune it briefly.

Real data, no download: `sklearn.datasets.load_digits` (1,797 8x8 grey-scale images of
handwritten digits). Trains a four-layer CNN, replaces its big layers by low-rank factors
(Tucker-2 for convolutions, CP for one of them, truncated SVD for the dense layer, ranks
chosen by empirical VBMF), and prints accuracy before decomposition, right after it, and
after a short fine-tune with a small learning rate, with parameter counts and latency.

    python examples/decompose_digits.py            # about a minute on 2 CPU cores

CP needs TensorLy (`pip install tf_smallmm[decompose]`); without it the example uses Tucker
for every convolution.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util
import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tf_smallmm.decompose import decompose_model

SEED = 0
TRAIN_EPOCHS = 30
FINE_TUNE_EPOCHS = 5
FINE_TUNE_LR = 1e-4  # 10x below the training rate: nudge the factors, don't retrain them


def load_data():
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (n, 8, 8, 1) in [0, 1]
    return train_test_split(
        x, digits.target, test_size=0.25, stratify=digits.target, random_state=SEED
    )


def build_cnn():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(256, activation="relu", name="fc")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def accuracy(model, x, y):
    logits = model(x, training=False).numpy()  # 450 test images: one call, no predict loop
    return float(np.mean(np.argmax(logits, axis=1) == y))


def main():
    keras.utils.set_random_seed(SEED)
    x_train, x_test, y_train, y_test = load_data()
    start = time.perf_counter()

    model = build_cnn()
    compile_model(model, 1e-3)
    model.fit(x_train, y_train, batch_size=64, epochs=TRAIN_EPOCHS, verbose=0)
    acc_before = accuracy(model, x_test, y_test)
    print(f"trained {TRAIN_EPOCHS} epochs in {time.perf_counter() - start:.1f} s")

    conv_method = "cp" if importlib.util.find_spec("tensorly") else "tucker"
    policy = {
        "Conv2D": {"method": "tucker", "ranks": "vbmf"},
        "conv3": {"method": conv_method, "ranks": "vbmf"},
        "Dense": {"rank": "vbmf"},
    }
    # conv1 (1 input channel) and logits are too small to be worth factoring.
    small, report = decompose_model(model, policy, min_params=5_000, latency_batch=256)
    acc_decomposed = accuracy(small, x_test, y_test)

    compile_model(small, FINE_TUNE_LR)
    small.fit(x_train, y_train, batch_size=64, epochs=FINE_TUNE_EPOCHS, verbose=0)
    acc_fine_tuned = accuracy(small, x_test, y_test)

    print()
    print("Per layer (FLOPs per example; latency: median ms per batch of 256, same run):")
    print(report)
    print()
    t = report.totals
    rows = [
        ("original", acc_before, t["params_before"], t["latency_ms_before"]),
        ("decomposed, no fine-tune", acc_decomposed, t["params_after"], t["latency_ms_after"]),
        (
            f"+ fine-tune {FINE_TUNE_EPOCHS} epochs, lr {FINE_TUNE_LR:g}",
            acc_fine_tuned,
            t["params_after"],
            t["latency_ms_after"],
        ),
    ]
    print(f"{'model':<36} {'test acc':>8} {'params':>9} {'ratio':>6} {'ms/256':>7} {'ratio':>6}")
    for name, acc, params, ms in rows:
        print(
            f"{name:<36} {acc:>8.4f} {params:>9,} {params / t['params_before']:>6.3f} "
            f"{ms:>7.3f} {ms / t['latency_ms_before']:>6.3f}"
        )
    print(f"\ntest set: {len(y_test)} images; total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
