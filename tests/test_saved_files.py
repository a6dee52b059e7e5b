"""Files written by tf_smallmm 0.1.0 (tests/data/release_0_1_0, made by its make.py) load
with the current code and give the outputs they gave then: the `.keras` file in this process
(Keras finds the layer classes and margin_loss by their registered names), the SavedModel in
a fresh interpreter that imports tf_smallmm and nothing else of ours before loading it."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_python, smallmm_ops
from tf_smallmm import layers as caps

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "release_0_1_0")
OUTPUTS = ("scores", "decoded")


def expected():
    with np.load(os.path.join(DATA, "expected.npz")) as f:
        return {k: f[k] for k in f.files}


def test_keras_file_loads_with_its_layers_loss_and_ops():
    want = expected()
    model = keras.saving.load_model(os.path.join(DATA, "capsnet.keras"))
    names = {type(layer).__name__ for layer in model.layers}
    assert {"PrimaryCapsules", "CapsuleLayer", "CapsulePredict", "DynamicRouting", "Length",
            "Mask"} <= names
    assert caps.margin_loss in list(model.loss)
    for got, name in zip(model.predict(want["x"], verbose=0), OUTPUTS):
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    graph = tf.function(model).get_concrete_function(tf.constant(want["x"]))
    assert {"SmallMMBatchMatMul", "SmallMMDynamicRouting"} <= smallmm_ops(graph)


@pytest.mark.slow
def test_saved_model_serves_in_a_fresh_process_after_import_tf_smallmm():
    out = run_python(f"""
        import json, numpy as np
        import tf_smallmm
        import tensorflow as tf
        with np.load({os.path.join(DATA, "expected.npz")!r}) as f:
            want = {{k: f[k] for k in f.files}}
        loaded = tf.saved_model.load({os.path.join(DATA, "capsnet_savedmodel")!r})
        got = loaded.serve(want["x"])
        print(json.dumps([float(np.abs(g.numpy() - want[k]).max())
                          for g, k in zip(got, {OUTPUTS!r})]))
    """, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(errors) <= 1e-6, dict(zip(OUTPUTS, errors))
