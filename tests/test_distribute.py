"""Training a CapsNet with our layers under tf.distribute gives the weights single-device
training gives on the same global batches: MirroredStrategy over two logical CPU devices,
and MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1 (a custom training
loop there: Keras 3's fit() does not support that strategy, keras-team/keras#20585).

Every run starts from the same saved initial weights and trains with plain SGD on the
same data in the same order (global batch 16, no shuffling), so the only differences
allowed are the all-reduce's float32 summation order."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tf_smallmm as smm
from conftest import small_capsnet

pytestmark = pytest.mark.slow  # tf.distribute, two worker processes

TIMEOUT_S = 240
GLOBAL_BATCH = 16
STEPS = 4

TRAIN = textwrap.dedent('''
    """One training run; argv: mode (single | mirrored | worker), work dir, output file."""
    import json, os, sys
    mode, work, out = sys.argv[1], sys.argv[2], sys.argv[3]
    import tensorflow as tf
    if mode == "mirrored":  # two logical CPUs, configured before TF initialises
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    elif mode == "worker":  # TF_CONFIG comes from the test
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    import keras, numpy as np
    import tf_smallmm  # noqa: F401
    from tf_smallmm import layers as caps

    def capsnet():
        inp = keras.Input((6, 6, 1))
        x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
        x = caps.PrimaryCapsules(4, 4, 3)(x)
        v = caps.CapsuleLayer(3, 8, routings=3)(x)
        return keras.Model(inp, caps.Length()(v))

    data = np.load(os.path.join(work, "data.npz"))
    init = np.load(os.path.join(work, "init.npz"))
    batch = int(data["batch"])
    with strategy.scope():
        model = capsnet()
        model.set_weights([init[f"w{i}"] for i in range(len(init.files))])
        optimizer = keras.optimizers.SGD(0.5)
        model.compile(optimizer, caps.margin_loss)
    if mode != "worker":
        model.fit(data["x"], data["y"], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    else:
        # Keras 3's fit() does not run under MultiWorkerMirroredStrategy (keras-team/keras
        # #20585: its symbolic build reduces a tuple of PerReplica batches), so the workers
        # run the standard custom loop: per-replica loss scaled by the global batch, the
        # optimizer all-reduces (sums) the gradients across workers.
        with strategy.scope():
            optimizer.build(model.trainable_variables)
        dataset = tf.data.Dataset.from_tensor_slices((data["x"], data["y"])).batch(batch)
        dist = strategy.experimental_distribute_dataset(dataset)

        @tf.function
        def train_step(x, y):
            def replica_step(x, y):
                with tf.GradientTape() as tape:
                    per_sample = caps.margin_loss(y, model(x, training=True))
                    loss = tf.nn.compute_average_loss(per_sample, global_batch_size=batch)
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
            strategy.run(replica_step, args=(x, y))

        for x, y in dist:
            train_step(x, y)
    graph = tf.function(model).get_concrete_function(tf.TensorSpec([None, 6, 6, 1])).graph
    ops = sorted({op.type for op in graph.get_operations() if op.type.startswith("SmallMM")})
    np.savez(out, *model.get_weights())
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "ops": ops}))
''')


def _env(extra=None):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(smm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)
    env.update(extra or {})
    return env


def _start(work, mode, out, extra_env=None):
    return subprocess.Popen([sys.executable, str(work / "train.py"), mode, str(work), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(extra_env), cwd=str(work))


def _finish(procs):
    """Waits for every process within TIMEOUT_S in total; kills all of them otherwise."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, err[-4000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weights(path):
    z = np.load(path)
    return [z[f"arr_{i}"] for i in range(len(z.files))]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Training script, data and initial weights, and the single-device result."""
    import keras

    d = tmp_path_factory.mktemp("distribute")
    (d / "train.py").write_text(TRAIN)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (GLOBAL_BATCH * STEPS, 6, 6, 1)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, len(x)), 3).astype("float32")
    np.savez(d / "data.npz", x=x, y=y, batch=GLOBAL_BATCH)
    model = small_capsnet()  # the same layers as TRAIN's capsnet(), which loads these weights
    np.savez(d / "init.npz", **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    (single,) = _finish([_start(d, "single", d / "single.npz")])
    assert single["replicas"] == 1
    return d


def assert_same_training(work, result_file):
    init = np.load(work / "init.npz")
    init = [init[f"w{i}"] for i in range(len(init.files))]
    single, other = _weights(work / "single.npz"), _weights(result_file)
    moved = max(float(np.abs(s - i).max()) for s, i in zip(single, init))
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    for s, o in zip(single, other):
        np.testing.assert_allclose(o, s, rtol=1e-4, atol=2e-6)


def test_mirrored_strategy_two_logical_cpus_matches_single_device(work):
    (res,) = _finish([_start(work, "mirrored", work / "mirrored.npz")])
    assert res["replicas"] == 2
    assert "SmallMMDynamicRouting" in res["ops"] and "SmallMMBatchMatMul" in res["ops"]
    assert_same_training(work, work / "mirrored.npz")


def test_multi_worker_mirrored_two_processes_matches_single_device(work):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for i in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            procs.append(_start(work, "worker", work / f"worker{i}.npz",
                                {"TF_CONFIG": tf_config}))
    finally:
        results = _finish(procs)
    assert [r["replicas"] for r in results] == [2, 2]
    for i in range(2):
        assert_same_training(work, work / f"worker{i}.npz")
