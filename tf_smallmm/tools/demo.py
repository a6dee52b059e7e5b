"""`python -m tf_smallmm.demo`: train a small CapsNet on real handwritten digits, on our
layers and on the same layers with TensorFlow's built-in ops, in one run.

Data: scikit-learn's `load_digits` (1797 8×8 images, bundled, no download), split 80/20
stratified. Model (Sabour et al. 2017, scaled to 8×8): Conv2D(64, 3×3, ReLU) ->
PrimaryCapsules(16 capsules × 8D, 3×3) = 256 input capsules -> CapsuleLayer(10 × 16D,
3 routing iterations) -> Length, margin loss, plus the reconstruction decoder (Mask ->
Dense 64 -> Dense 64) as a small regulariser. The reference run is a subprocess with
TF_SMALLMM_DISABLE=1 (same seed, same data order): tf.einsum prediction and TF-ops routing.
Prints test accuracy and seconds per epoch for both as a markdown table.

    python -m tf_smallmm.demo            # the full comparison (a few minutes on 2 cores)
    python -m tf_smallmm.demo --quick    # 2 epochs each, for CI
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np


def load_data(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # [1797, 8, 8, 1] in [0, 1]
    y = digits.target.astype("int64")
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)


def build_models(routings=3, lr=3e-3):
    """(train_model, eval_model): training takes [image, one-hot label] and returns
    [class scores, reconstruction]; evaluation takes the image and returns the scores."""
    from tf_smallmm import layers as caps

    image = keras.Input((8, 8, 1), name="image")
    label = keras.Input((10,), name="label")
    x = keras.layers.Conv2D(64, 3, activation="relu", name="conv")(image)
    x = caps.PrimaryCapsules(16, 8, 3, name="primary_caps")(x)
    digits = caps.CapsuleLayer(10, 16, routings=routings, name="digit_caps")(x)
    scores = caps.Length(name="scores")(digits)
    decoder = keras.Sequential([keras.Input((160,)), keras.layers.Dense(64, activation="relu"),
                                keras.layers.Dense(64, activation="sigmoid")], name="decoder")
    recon = keras.layers.Reshape((8, 8, 1), name="recon")(decoder(caps.Mask()([digits, label])))
    train_model = keras.Model([image, label], [scores, recon], name="capsnet")
    train_model.compile(optimizer=keras.optimizers.Adam(lr),
                        loss=[caps.margin_loss, "mse"], loss_weights=[1.0, 0.4])
    eval_model = keras.Model(image, scores, name="capsnet_eval")
    return train_model, eval_model


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch (Keras' progress bar shows it too, rounded)."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.t0)


def train(epochs, batch_size, seed, verbose=1):
    """Trains on the digits and returns test accuracy and per-epoch wall times."""
    import tensorflow as tf

    from tf_smallmm._core import dispatch

    keras.utils.set_random_seed(seed)
    x_train, x_test, y_train, y_test = load_data(seed)
    train_model, eval_model = build_models()
    timer = EpochTimer()
    onehot = keras.utils.to_categorical(y_train, 10)
    train_model.fit([x_train, onehot], [onehot, x_train], batch_size=batch_size, epochs=epochs,
                    shuffle=True, callbacks=[timer], verbose=verbose)
    pred = eval_model.predict(x_test, batch_size=256, verbose=0).argmax(-1)
    graph = tf.function(eval_model).get_concrete_function(
        tf.TensorSpec([None, 8, 8, 1], tf.float32)).graph
    return {"accuracy": float((pred == y_test).mean()), "epoch_s": timer.times,
            "smallmm_ops": sorted({op.type for op in graph.get_operations()
                                   if op.type.startswith("SmallMM")}),
            "disabled": dispatch.disabled(), "test_size": len(y_test),
            "train_size": len(y_train)}


def _steady(times):
    """Seconds per epoch without the first (which includes tracing the step)."""
    return float(np.median(times[1:])) if len(times) > 1 else float(times[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 epochs each (CI)")
    p.add_argument("--epochs", type=int, default=None, help="default 20 (2 with --quick)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true", help="skip the TF-ops run")
    p.add_argument("--result-json", help=argparse.SUPPRESS)  # used by the reference child
    args = p.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 20)

    if args.result_json:  # the child: one training run, result to a file
        result = train(epochs, args.batch_size, args.seed)
        with open(args.result_json, "w") as f:
            json.dump(result, f)
        return

    import tensorflow as tf

    import tf_smallmm as smm

    info = smm.build_info()
    print(f"tf_smallmm {smm.__version__} | TensorFlow {tf.__version__} | kernels loaded: "
          f"{info['kernels_loaded']} | ISA: {info['active_isa']} | {os.cpu_count()} CPU cores",
          flush=True)
    print(f"\n== CapsNet on sklearn digits with tf_smallmm layers ({epochs} epochs) ==", flush=True)
    ours = train(epochs, args.batch_size, args.seed)
    rows = [("tf_smallmm (SmallMM prediction + fused routing)", ours)]
    if not args.no_reference:
        print("\n== the same model with TensorFlow ops (TF_SMALLMM_DISABLE=1: tf.einsum "
              "prediction, TF-ops routing), in a subprocess ==", flush=True)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "reference.json")
            env = dict(os.environ, TF_SMALLMM_DISABLE="1")
            cmd = [sys.executable, "-m", "tf_smallmm.demo", "--result-json", path,
                   "--epochs", str(epochs), "--batch-size", str(args.batch_size),
                   "--seed", str(args.seed)]
            subprocess.run(cmd, env=env, check=True)
            with open(path) as f:
                ref = json.load(f)
        rows.append(("reference (tf.einsum + TF ops)", ref))

    print(f"\nCapsNet on sklearn load_digits: {ours['train_size']} train / {ours['test_size']} "
          f"test images, batch {args.batch_size}, {epochs} epochs, {os.cpu_count()} CPU cores")
    print("| layers | test accuracy | s/epoch | first epoch s (incl. tracing) | SmallMM ops |")
    print("|---|---:|---:|---:|---|")
    for name, r in rows:
        print(f"| {name} | {100 * r['accuracy']:.2f}% | {_steady(r['epoch_s']):.2f} | "
              f"{r['epoch_s'][0]:.2f} | {', '.join(r['smallmm_ops']) or '-'} |")
    if len(rows) == 2:
        print(f"\nspeed-up per epoch: {_steady(ref['epoch_s']) / _steady(ours['epoch_s']):.1f}x")


if __name__ == "__main__":
    main()
