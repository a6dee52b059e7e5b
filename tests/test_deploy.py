"""Deployment of models with capsule layers: .keras files, SavedModels (keras export and
tf.saved_model.save) served in fresh processes, and the export without the plugin.

Two fresh interpreters serve everything: one that imports tf_smallmm before loading (the
documented requirement for SavedModels with SmallMM ops) and one that never imports it
(TF alone: the plugin export must fail to load there, the built-in export must serve)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_python, small_capsnet
from tf_smallmm import layers as caps


class Serving(tf.Module):
    """A plain tf.Module around the model, for tf.saved_model.save."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 1], tf.float32)])
    def serve(self, x):
        return {"scores": self.model(x)}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    model = small_capsnet()
    model.compile(keras.optimizers.Adam(1e-2), caps.margin_loss)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 6, 6, 1)).astype("float32")
    model.fit(x, keras.utils.to_categorical(rng.integers(0, 3, 16), 3), epochs=2, verbose=0)
    np.save(d / "x.npy", x)
    np.save(d / "expected.npy", model.predict(x, verbose=0))
    model.save(d / "model.keras")
    model.export(str(d / "plugin"), verbose=False)
    tf.saved_model.save(Serving(model), str(d / "module"))
    caps.export_without_plugin(model, str(d / "builtin"), verbose=False)
    return d


def serve_in_fresh_process(d, import_tf_smallmm):
    code = f"""
        import json, sys, numpy as np
        {"import tf_smallmm" if import_tf_smallmm else ""}
        import tensorflow as tf
        d = {str(d)!r}
        x = np.load(d + "/x.npy")
        expected = np.load(d + "/expected.npy")
        out = {{}}
        def attempt(name, fn):
            try:
                out[name] = float(np.abs(fn() - expected).max())
            except Exception as e:
                out[name] = type(e).__name__ + ": " + str(e)[:400]
        def serve(name, key=None):
            loaded = tf.saved_model.load(d + "/" + name)  # keep it alive while serving
            y = loaded.serve(x)
            return (y[key] if key else y).numpy()
        attempt("plugin", lambda: serve("plugin"))
        attempt("module", lambda: serve("module", "scores"))
        attempt("builtin", lambda: serve("builtin"))
        if {import_tf_smallmm!r}:
            import keras
            def keras_predict():
                return keras.models.load_model(d + "/model.keras").predict(x, verbose=0)
            attempt("keras", keras_predict)
        out["tf_smallmm_imported"] = "tf_smallmm" in sys.modules
        print(json.dumps(out))
    """
    res = run_python(code, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def with_plugin(artifacts):
    return serve_in_fresh_process(artifacts, import_tf_smallmm=True)


@pytest.fixture(scope="module")
def without_plugin(artifacts):
    return serve_in_fresh_process(artifacts, import_tf_smallmm=False)


@pytest.mark.slow
def test_plugin_exports_contain_smallmm_ops(artifacts):
    for name in ("plugin", "module"):
        assert {"SmallMMBatchMatMul", "SmallMMDynamicRouting"} <= caps.smallmm_ops_in_saved_model(
            str(artifacts / name)), name


@pytest.mark.slow
@pytest.mark.parametrize("artifact", ["plugin", "module", "keras"])
def test_serves_in_a_fresh_process_that_imports_tf_smallmm(with_plugin, artifact):
    assert with_plugin["tf_smallmm_imported"]
    assert with_plugin[artifact] == pytest.approx(0.0, abs=1e-6), with_plugin[artifact]


@pytest.mark.slow
def test_plugin_export_needs_the_op_library(without_plugin):
    assert not without_plugin["tf_smallmm_imported"]
    for name in ("plugin", "module"):
        assert "Op type not registered 'SmallMM" in str(without_plugin[name]), without_plugin[name]


@pytest.mark.slow
def test_export_without_plugin_has_no_smallmm_ops_and_serves_without_tf_smallmm(
        artifacts, without_plugin, with_plugin):
    assert caps.smallmm_ops_in_saved_model(str(artifacts / "builtin")) == set()
    assert not without_plugin["tf_smallmm_imported"]
    # TF-ops routing vs the fused kernel: float32 rounding differences only.
    assert without_plugin["builtin"] == pytest.approx(0.0, abs=1e-5), without_plugin["builtin"]
    assert with_plugin["builtin"] == pytest.approx(0.0, abs=1e-5)


def test_export_without_plugin_leaves_the_policy_as_it_was(tmp_path):
    import os

    from tf_smallmm._core import dispatch

    before = os.environ.get("TF_SMALLMM_DISABLE")
    model = small_capsnet()
    caps.export_without_plugin(model, str(tmp_path / "again"), verbose=False)
    assert os.environ.get("TF_SMALLMM_DISABLE") == before
    assert not dispatch.disabled()
    x = tf.zeros([2, 6, 6, 1])
    graph = tf.function(model).get_concrete_function(x).graph
    assert any(op.type == "SmallMMDynamicRouting" for op in graph.get_operations())
