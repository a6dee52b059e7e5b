"""`tf_smallmm.patch()`: existing code, unmodified, runs on SmallMM.

What is routed, and restored exactly by `unpatch()`; every fallback reaching the original
built-in (no recursion); stock Keras 3 and tf_keras layers (EinsumDense, Dense,
MultiHeadAttention) and a CapsNet written against tf.matmul / tf.einsum / batch_dot giving
the built-ins' results and gradients with SmallMM ops in their graphs; `patched()` blocks
nested and across threads; build_info().
"""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tensorflow.python.framework import tensor as tensor_lib
from tensorflow.python.ops import variables

import tf_smallmm as smm
from conftest import random_tensor, smallmm_ops
from tf_smallmm.dropins import keras_ops
from tf_smallmm.dropins import patch as patch_module

K = tf_keras.backend


TARGETS = None


def entry_points():
    """Everything patch() routes (as found unpatched), with the object there now."""
    global TARGETS
    if TARGETS is None:
        TARGETS = [(owner, attr, name) for owner, attr, _, name in patch_module._targets()]
    return {(id(owner), attr, name): getattr(owner, attr) for owner, attr, name in TARGETS}


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends unpatched."""
    smm.unpatch()
    assert not smm.build_info()["patched"]
    yield
    smm.unpatch()


def test_patch_routes_every_entry_point_and_unpatch_restores_the_originals_exactly():
    before = entry_points()
    assert {name for _, _, name in before} >= {
        "tf.matmul", "tf.linalg.matmul", "tf.linalg.matvec", "tf.einsum", "tf.linalg.einsum",
        "tf.compat.v2.einsum", "tf.compat.v1.matmul",
        "tf.Tensor.__matmul__", "tf.Tensor.__rmatmul__", "tf.Variable.__matmul__",
        "tf.Variable.__rmatmul__", "keras.ops.matmul", "keras.ops.einsum",
        "tf_keras.backend.batch_dot", "tf_keras.backend.dot", "tf_keras.src.backend.batch_dot"}
    smm.patch()
    smm.patch()  # idempotent
    assert tf.matmul is smm.matmul and tf.linalg.matmul is smm.matmul
    assert tf.einsum is smm.einsum and tf.linalg.einsum is smm.einsum
    assert tf.linalg.matvec is smm.matvec
    assert K.batch_dot is smm.batch_dot and K.dot is smm.dot
    assert keras_ops.BACKEND.einsum is keras_ops.einsum
    after = entry_points()
    assert all(after[key] is not before[key] for key in before)
    assert sorted(smm.build_info()["patched"]) == sorted(name for _, _, name in before)
    smm.unpatch()
    restored = entry_points()
    assert all(restored[key] is before[key] for key in before)
    assert smm.build_info()["patched"] == []


def test_a_name_reassigned_after_patch_is_left_alone():
    original = tf.einsum
    smm.patch()

    def theirs(*args, **kwargs):
        return original(*args, **kwargs)

    tf.einsum = theirs
    try:
        smm.unpatch()
        assert tf.einsum is theirs and tf.matmul is not smm.matmul
    finally:
        tf.einsum = original


def test_patched_blocks_nest_and_overlap_across_threads():
    original = tf.einsum
    with smm.patched():
        with smm.patched():
            assert tf.einsum is smm.einsum
        assert tf.einsum is smm.einsum
    assert tf.einsum is original

    inside = threading.Barrier(8)
    seen = []

    def worker():
        with smm.patched():
            inside.wait()  # all 8 blocks open at once
            seen.append(tf.einsum is smm.einsum)
            x = tf.ones([2, 3])
            seen.append(bool(np.allclose(tf.einsum("ij,kj->ik", x, x).numpy(), 3.0)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(seen) and len(seen) == 16
    assert tf.einsum is original


def test_unpatch_waits_for_open_blocks():
    original = tf.matmul
    smm.patch()
    with smm.patched():
        smm.unpatch()
        assert tf.matmul is smm.matmul
    assert tf.matmul is original


# ------------------------------------------------------------------ fallbacks, no recursion

FALLBACKS = [
    ("transpose", lambda: tf.einsum("ij->ji", tf.ones([2, 3]))),
    ("three operands", lambda: tf.einsum("ij,jk,kl->il", tf.ones([2, 3]), tf.ones([3, 4]),
                                         tf.ones([4, 5]))),
    ("int32 einsum", lambda: tf.einsum("ij,jk->ik", tf.ones([2, 3], tf.int32),
                                       tf.ones([3, 4], tf.int32))),
    ("int32 matmul", lambda: tf.matmul(tf.ones([2, 3], tf.int32), tf.ones([3, 4], tf.int32))),
    ("big matmul", lambda: tf.linalg.matmul(tf.ones([64, 64]), tf.ones([64, 64]))),
    ("matvec int", lambda: tf.linalg.matvec(tf.ones([2, 3], tf.int32), tf.ones([3], tf.int32))),
    ("int @", lambda: tf.ones([2, 3], tf.int32) @ tf.ones([3, 4], tf.int32)),
    ("numpy @", lambda: tf.ones([2, 3]) @ np.ones([3, 4], np.float32)),
    ("@ numpy", lambda: np.ones([2, 3], np.float32) @ tf.ones([3, 4])),
    ("batch_dot transposed", lambda: K.batch_dot(tf.ones([2, 3, 4, 5]), tf.ones([2, 6, 3, 7]),
                                                  (1, 2))),
    ("keras einsum int", lambda: keras.ops.einsum("ij,jk->ik", np.ones([2, 3], "int32"),
                                                  np.ones([3, 4], "int32"))),
]


@pytest.mark.parametrize("name,call", FALLBACKS, ids=[n for n, _ in FALLBACKS])
def test_every_fallback_reaches_the_builtin(name, call):
    want = call()
    with smm.patched():
        got = call()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_transpose_einsum_works_patched_and_planned_ones_use_smallmm():
    x = random_tensor([3, 4], tf.float32, 1)
    with smm.patched():
        np.testing.assert_array_equal(tf.einsum("ij->ji", x).numpy(), tf.transpose(x).numpy())
        f = tf.function(lambda a: tf.einsum("ij,kj->ik", a, a))
        assert smallmm_ops(f.get_concrete_function(x)) == {"SmallMMBatchMatMul"}
        np.testing.assert_allclose(f(x).numpy(), (x @ tf.transpose(x)).numpy(), rtol=1e-6)


# ------------------------------------------------------------------ tf functions and @

TF_CALLS = [
    ("tf.matmul", lambda a, b, v: tf.matmul(a, b, transpose_a=True)),
    ("tf.linalg.matmul adjoint", lambda a, b, v: tf.linalg.matmul(a, b, adjoint_a=True)),
    ("tf.linalg.matvec", lambda a, b, v: tf.linalg.matvec(a, b[..., 0], transpose_a=True)),
    ("tf.einsum", lambda a, b, v: tf.einsum("bij,bik->bjk", a, b)),
    ("tf.linalg.einsum", lambda a, b, v: tf.linalg.einsum("bji,bjk->bik", a, b)),
    ("tensor @ tensor", lambda a, b, v: tf.transpose(a, [0, 2, 1]) @ b),
    ("variable @ tensor", lambda a, b, v: v @ b),
    ("tensor @ variable", lambda a, b, v: a @ v),
]


@pytest.mark.parametrize("name,call", TF_CALLS, ids=[n for n, _ in TF_CALLS])
def test_tf_entry_points_run_on_smallmm_with_the_builtins_values_and_gradients(name, call):
    a = random_tensor([5, 4, 3], tf.float64, 1)
    b = random_tensor([5, 4, 2], tf.float64, 2)
    v = tf.Variable(random_tensor([5, 3, 4], tf.float64, 3))

    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = call(a, b, v)
        return [y] + tape.gradient(y, [a, b, v], unconnected_gradients="zero")

    want = tf.function(step)(a, b)
    with smm.patched():
        f = tf.function(step)
        got = f(a, b)
        assert smallmm_ops(f.get_concrete_function(a, b)), name
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-12, atol=1e-12)


def test_the_at_operator_eagerly_and_on_variables():
    a, b = random_tensor([3, 4], tf.float32, 1), random_tensor([4, 2], tf.float32, 2)
    v = tf.Variable(b)
    want = (a @ b).numpy()
    with smm.patched():
        assert tensor_lib.Tensor.__matmul__ is patch_module._tensor_matmul
        assert variables.Variable.__matmul__ is patch_module._variable_matmul
        for got in (a @ b, a @ v, a.numpy() @ b, tf.transpose(v) @ tf.transpose(a)):
            got = np.asarray(got)
            np.testing.assert_allclose(got if got.shape == want.shape else got.T, want,
                                       rtol=1e-6)


def test_the_at_operator_of_a_shared_weight_on_the_builtin_takes_one_gemm_gradient(
        monkeypatch):
    # x[B, T, D] @ W[D, D] sent to the built-in: tf.matmul's forward, the one-GEMM gradient
    # (linalg.builtin_matmul) for the weight, as smm.matmul gives it.
    from tf_smallmm._core import dispatch

    monkeypatch.setattr(dispatch, "choose", lambda *args, **kw: dispatch.BUILTIN)
    x, w = random_tensor([6, 5, 16], tf.float64, 1), tf.Variable(random_tensor([16, 16],
                                                                               tf.float64, 2))

    def step(x):
        with tf.GradientTape() as tape:
            y = x @ w
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, w)

    want = step(x)
    with smm.patched():
        graph_step = tf.function(step)
        for got in (step(x), graph_step(x)):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
        ops = graph_step.get_concrete_function(x).graph.get_operations()
    assert [op.type for op in ops].count("Sum") == 1  # the loss's: no sum over the batch
    assert "BatchMatMulV2" in [op.type for op in ops] and not smallmm_ops(
        graph_step.get_concrete_function(x))


# ------------------------------------------------------------------ stock Keras layers

def _keras3_mha(seed=0):
    keras.utils.set_random_seed(seed)
    q = keras.Input((16, 32))
    mha = keras.layers.MultiHeadAttention(num_heads=8, key_dim=8)
    return keras.Model(q, mha(q, q))


def _keras3_mha_scores(seed=0):
    """MultiHeadAttention on its explicit-einsum path (attention scores returned)."""
    keras.utils.set_random_seed(seed)
    q = keras.Input((16, 32))
    out, scores = keras.layers.MultiHeadAttention(num_heads=8, key_dim=8)(
        q, q, return_attention_scores=True)
    return keras.Model(q, [out, scores])


def _keras3_einsum_dense(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 4))
    y = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 5))(x)
    return keras.Model(x, keras.layers.Dense(3)(y))


def _tf_keras_mha(seed=0):
    tf_keras.utils.set_random_seed(seed)
    q = tf_keras.Input((16, 32))
    out = tf_keras.layers.MultiHeadAttention(num_heads=8, key_dim=8)(q, q)
    return tf_keras.Model(q, tf_keras.layers.EinsumDense("abc,cd->abd", (None, 4))(out))


def _tf_keras_dot(seed=0):
    tf_keras.utils.set_random_seed(seed)
    x, y = tf_keras.Input((5, 4)), tf_keras.Input((4, 6))
    return tf_keras.Model([x, y], tf_keras.layers.Dot(axes=(2, 1))([x, y]))


def _tf_keras_dense_attention(seed=0):
    tf_keras.utils.set_random_seed(seed)
    x = tf_keras.Input((8,))
    q = tf_keras.layers.Reshape((4, 2))(tf_keras.layers.Dense(8)(x))
    return tf_keras.Model(x, tf_keras.layers.Attention()([q, q]))


MODELS = [("keras3 MultiHeadAttention", _keras3_mha, [(4, 16, 32)]),
          ("keras3 MultiHeadAttention scores", _keras3_mha_scores, [(4, 16, 32)]),
          ("keras3 EinsumDense + Dense", _keras3_einsum_dense, [(4, 6, 4)]),
          ("tf_keras MultiHeadAttention + EinsumDense", _tf_keras_mha, [(4, 16, 32)]),
          ("tf_keras Dot", _tf_keras_dot, [(4, 5, 4), (4, 4, 6)]),
          ("tf_keras Dense + Attention", _tf_keras_dense_attention, [(4, 8)])]


def _step(model):
    """forward + gradients for every weight, as one tf.function."""
    @tf.function
    def step(*xs):
        with tf.GradientTape() as tape:
            ys = tf.nest.flatten(model(list(xs) if len(xs) > 1 else xs[0]))
            loss = tf.add_n([tf.reduce_sum(tf.square(y)) for y in ys])
        return ys, tape.gradient(loss, model.trainable_weights)
    return step


def _patched_matches_builtin(make, shapes):
    """Builds `make()` (seeded: the same weights each time) unpatched and patched, checks
    that the two give the same outputs and gradients, and returns the SmallMM op types in
    the patched step's graph."""
    xs = [random_tensor(s, tf.float32, i) for i, s in enumerate(shapes)]
    want_ys, want_grads = _step(make())(*xs)
    with smm.patched():
        step = _step(make())
        got_ys, got_grads = step(*xs)
        ops = smallmm_ops(step.get_concrete_function(*xs))
    for got, want in zip(got_ys + got_grads, want_ys + want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
    return ops


@pytest.mark.parametrize("name,make,shapes", MODELS, ids=[m[0] for m in MODELS])
def test_stock_layers_run_on_smallmm_with_the_same_results_and_gradients(name, make, shapes):
    assert _patched_matches_builtin(make, shapes), name


@pytest.mark.parametrize("make", [lambda: keras.layers.MultiHeadAttention(8, 8),
                                  lambda: tf_keras.layers.MultiHeadAttention(8, 8)],
                         ids=["keras3", "tf_keras"])
def test_attention_runs_as_strided_products_without_transposes(make):
    """Keras 3's attention (tf.einsum 'BTNH,BSNH->BNTS' and 'BNTS,BSNH->BTNH') and tf_keras'
    ('aecd,abcd->acbe', 'acbe,aecd->abcd') each run as one SmallMM op forward, and no
    Transpose op is left in the graph. (The query / key / value / output projections are
    plain GEMMs that the dispatch model gives to either side.)"""
    x = random_tensor([2, 16, 32], tf.float32, 0)
    with smm.patched():
        layer = make()
        graph = tf.function(lambda t: layer(t, t)).get_concrete_function(x).graph
    ops = [(op.name, op.type) for op in graph.get_operations()]
    for fn in graph._functions.values():
        ops += [(node.name, node.op) for node in fn.definition.node_def]
    projections = ("query", "key", "value", "attention_output")
    attention = [name for name, op in ops if op == "SmallMMBatchMatMul"
                 and not any(f"/{p}" in name for p in projections)]
    assert len(attention) == 2 and "Transpose" not in {op for _, op in ops}, ops


# ------------------------------------------------------------------ a CapsNet written with TF

class ClassicRouting(keras.layers.Layer):
    """Capsule prediction and routing the way public CapsNet code writes them: tf.einsum
    for û, routing with tf.matmul / `@` and keras batch_dot-style contractions."""

    def __init__(self, num_capsules, capsule_dim, routings=3, **kwargs):
        super().__init__(**kwargs)
        self.num_capsules, self.capsule_dim, self.routings = num_capsules, capsule_dim, routings

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[1], self.num_capsules, self.capsule_dim,
                                        input_shape[2]),
                                 initializer=keras.initializers.RandomNormal(stddev=0.3, seed=1))

    def call(self, u):
        u_hat = tf.einsum("ijkl,bil->bijk", self.w, u)  # [B, I, J, K]
        b = tf.zeros(tf.shape(u_hat)[:3])
        for r in range(self.routings):
            c = tf.nn.softmax(b, axis=2)
            s = tf.squeeze(tf.matmul(tf.transpose(u_hat, [0, 2, 3, 1]),
                                     tf.transpose(c, [0, 2, 1])[..., None]), -1)  # [B, J, K]
            n2 = tf.reduce_sum(s * s, -1, keepdims=True)
            v = s * n2 / (1 + n2) / tf.sqrt(n2 + 1e-7)
            if r < self.routings - 1:
                b = b + tf.einsum("bijk,bjk->bij", u_hat, v)
        return v


def test_a_capsnet_written_with_tf_ops_runs_on_smallmm_unchanged():
    def make():
        keras.utils.set_random_seed(0)
        x = keras.Input((12, 4))
        return keras.Model(x, ClassicRouting(3, 8)(x))

    ops = _patched_matches_builtin(make, [(5, 12, 4)])
    assert "SmallMMBatchMatMul" in ops and "SmallMMBatchMatMulPair" in ops, ops


class Keras2Capsules(tf_keras.layers.Layer):
    """A tf_keras capsule layer in the style of CapsNet-Keras' TF2 port: W [out_caps,
    in_caps, out_dim, in_dim], û by a broadcast tf.matmul, routing with batch_dot."""

    def __init__(self, num_capsule, dim_capsule, routings=3, **kwargs):
        super().__init__(**kwargs)
        self.num_capsule, self.dim_capsule, self.routings = num_capsule, dim_capsule, routings

    def build(self, input_shape):
        self.W = self.add_weight(
            name="W", shape=[self.num_capsule, input_shape[1], self.dim_capsule, input_shape[2]],
            initializer=tf_keras.initializers.RandomNormal(stddev=0.3, seed=1))

    def call(self, inputs):
        j, i, k = self.num_capsule, inputs.shape[1], self.dim_capsule
        u = inputs[:, None, :, :, None]  # [B, 1, I, L, 1]
        u_hat = tf.squeeze(tf.matmul(self.W[None], u), -1)  # [B, J, I, K]
        u_flat = tf.reshape(u_hat, [-1, i, k])  # [B·J, I, K]
        b = tf.zeros(tf.shape(u_hat)[:3])  # [B, J, I]
        for r in range(self.routings):
            c = tf.reshape(tf.nn.softmax(b, axis=1), [-1, i])  # [B·J, I]
            s = tf.reshape(K.batch_dot(c, u_flat, (1, 1)), [-1, j, k])  # [B, J, K]
            n2 = K.sum(K.square(s), -1, keepdims=True)
            v = s * n2 / (1 + n2) / K.sqrt(n2 + K.epsilon())
            if r < self.routings - 1:
                agreement = K.batch_dot(tf.reshape(v, [-1, k]), u_flat, (1, 2))  # [B·J, I]
                b = b + tf.reshape(agreement, [-1, j, i])
        return v


def test_a_tf_keras_capsnet_with_matmul_and_batch_dot_runs_on_smallmm_unchanged():
    def make():
        tf_keras.utils.set_random_seed(0)
        x = tf_keras.Input((12, 4))
        return tf_keras.Model(x, Keras2Capsules(3, 8)(x))

    assert _patched_matches_builtin(make, [(5, 12, 4)])
