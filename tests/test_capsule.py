"""capsule_predict at CapsNet's real size (W [1152, 10, 16, 8], u [50, 1152, 8]): values,
the forward and backward graphs, memory; its argument errors, and 16-bit gradients. Each
argument test runs through both names of the one implementation: capsule_predict(w, u)
and tf_smallmm.layers.predict(u, w). (Small shapes, every dtype, float gradients and the
fallbacks are in test_dropins.py with the other drop-ins.)"""

import numpy as np
import pytest
import tensorflow as tf

import tf_smallmm as smm
from conftest import assert_close, random_tensor, smallmm_ops

# The one implementation under both of its names, as f(w, u).
ENTRY_POINTS = {"capsule_predict": smm.capsule_predict,
                "layers.predict": lambda w, u: smm.layers.predict(u, w)}
IN_CAPS, OUT_CAPS, OUT_DIM, IN_DIM, BATCH = 1152, 10, 16, 8, 50
EQ = "ijkl,bil->bijk"
# The tensor a per-batch dW would need: [batch, in_caps, out_caps, out_dim, in_dim].
PER_BATCH_DW = BATCH * IN_CAPS * OUT_CAPS * OUT_DIM * IN_DIM
FORBIDDEN = {"Transpose", "Tile", "BroadcastTo", "Einsum", "BatchMatMulV2", "MatMul", "Sum"}


def fwd_bwd(predict, batch=BATCH):
    """Concrete function (w, u, upstream gradient) -> (û, dW, du)."""
    def step(w, u, g):
        with tf.GradientTape() as tape:
            tape.watch([w, u])
            y = predict(w, u)
        return (y,) + tuple(tape.gradient(y, [w, u], output_gradients=g))

    return tf.function(step, input_signature=[
        tf.TensorSpec([IN_CAPS, OUT_CAPS, OUT_DIM, IN_DIM], tf.float32),
        tf.TensorSpec([batch, IN_CAPS, IN_DIM], tf.float32),
        tf.TensorSpec([batch, IN_CAPS, OUT_CAPS, OUT_DIM], tf.float32)]).get_concrete_function()


def tiled(w, u):
    """The tile-then-matmul formulation (seed answer 1), to show what the checks catch."""
    w = tf.tile(w[None], [tf.shape(u)[0], 1, 1, 1, 1])
    u = tf.tile(u[:, :, None, :, None], [1, 1, OUT_CAPS, 1, 1])
    return tf.squeeze(tf.matmul(w, u), -1)


def ops_with_elements(graph, count):
    return [op.name for op in graph.get_operations() for t in op.outputs
            if t.shape.is_fully_defined() and t.shape.num_elements() >= count]


@pytest.fixture(scope="module")
def data():
    w = random_tensor([IN_CAPS, OUT_CAPS, OUT_DIM, IN_DIM], tf.float32, seed=1)
    u = random_tensor([BATCH, IN_CAPS, IN_DIM], tf.float32, seed=2)
    g = random_tensor([BATCH, IN_CAPS, OUT_CAPS, OUT_DIM], tf.float32, seed=3)
    return w, u, g


@pytest.mark.slow
def test_values_and_gradients_match_einsum(data):
    got = fwd_bwd(smm.capsule_predict)(*data)
    w, u, g = [tf.cast(t, tf.float64) for t in data]
    want = fwd_bwd_eager(lambda a, b: tf.einsum(EQ, a, b), w, u, g)
    bound = fwd_bwd_eager(lambda a, b: tf.einsum(EQ, a, b), tf.abs(w), tf.abs(u), tf.abs(g))
    for a, b, bd in zip(got, want, bound):
        assert_close(a, b, tf.float32, bound=bd)


def fwd_bwd_eager(predict, w, u, g):
    with tf.GradientTape() as tape:
        tape.watch([w, u])
        y = predict(w, u)
    return (y,) + tuple(tape.gradient(y, [w, u], output_gradients=g))


def test_forward_and_backward_graph_is_two_engine_ops_and_no_per_batch_dw():
    graph = fwd_bwd(smm.capsule_predict).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("SmallMMBatchMatMul") == 1  # û
    # dW (summed over b in-kernel) and du together: dû is read from memory once.
    assert types.count("SmallMMBatchMatMulPair") == 1
    assert "SmallMMBatchMatMulReduce" not in types
    assert not FORBIDDEN & set(types)
    assert not ops_with_elements(graph, PER_BATCH_DW)
    # The check is not vacuous: the tiled formulation materialises W per batch row.
    assert ops_with_elements(fwd_bwd(tiled).graph, PER_BATCH_DW)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_batch_keeps_static_shapes_and_the_engine(entry):
    f = tf.function(ENTRY_POINTS[entry], input_signature=[
        tf.TensorSpec([IN_CAPS, OUT_CAPS, OUT_DIM, IN_DIM]),
        tf.TensorSpec([None, IN_CAPS, IN_DIM])]).get_concrete_function()
    assert f.structured_outputs.shape.as_list() == [None, IN_CAPS, OUT_CAPS, OUT_DIM]
    assert smallmm_ops(f) == {"SmallMMBatchMatMul"}
    empty = f(tf.zeros([IN_CAPS, OUT_CAPS, OUT_DIM, IN_DIM]), tf.zeros([0, IN_CAPS, IN_DIM]))
    assert empty.shape == (0, IN_CAPS, OUT_CAPS, OUT_DIM)


def test_peak_memory_has_no_per_batch_intermediate(data):
    """TF's CPU allocator peak for one fwd+bwd call: the outputs (42.5 MiB, rounded up by
    the allocator's chunks) and nothing like the 281 MiB a per-batch dW would take.
    python benchmarks/capsule_memory.py prints the same for tf.einsum and tiled matmul."""
    step = fwd_bwd(smm.capsule_predict)
    step(*data)
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    out = step(*data)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    if peak <= 0:
        pytest.skip("this TensorFlow build keeps no CPU allocator statistics")
    del out
    assert peak < 120 * 2**20, f"peak extra {peak / 2**20:.1f} MiB"
    assert peak < PER_BATCH_DW * 4 / 2


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("w_shape, u_shape, message", [
    ((10, 16, 8), (50, 6, 8), "w must have rank 4"),
    ((2, 6, 10, 16, 8), (50, 6, 8), "leading axis of size 1"),
    ((6, 10, 16, 8), (50, 6, 8, 1), "u must have rank 3"),
    ((6, 10, 16, 8), (50, 6), "u must have rank 3"),
    ((6, 10, 16, 8), (50, 5, 8), r"in_caps differs between w \(6\) and u \(5\)"),
    ((6, 10, 16, 8), (50, 6, 4), r"in_dim differs between w \(8\) and u \(4\)"),
    ((1, 6, 10, 16, 8), (50, 6, 4),
     r"w has shape \[1, 6, 10, 16, 8\] and u has shape \[50, 6, 4\]"),
])
def test_bad_arguments_raise_value_errors_naming_both_shapes(entry, w_shape, u_shape, message):
    predict = ENTRY_POINTS[entry]
    with pytest.raises(ValueError, match=message):
        predict(tf.zeros(w_shape), tf.zeros(u_shape))
    with pytest.raises(ValueError, match=message):  # also while tracing
        tf.function(lambda: predict(tf.zeros(w_shape), tf.zeros(u_shape)))()


def test_rank5_weights_with_unknown_leading_axis_are_checked_at_run_time():
    f = tf.function(smm.capsule_predict, input_signature=[
        tf.TensorSpec([None, 6, 10, 16, 8]), tf.TensorSpec([None, 6, 8])])
    assert f(tf.ones([1, 6, 10, 16, 8]), tf.ones([2, 6, 8])).shape == [2, 6, 10, 16]
    with pytest.raises(tf.errors.InvalidArgumentError):
        f(tf.ones([2, 6, 10, 16, 8]), tf.ones([2, 6, 8]))


def test_numpy_inputs_and_name():
    w = np.ones([6, 3, 4, 5], np.float32)
    u = np.ones([2, 6, 5], np.float32)
    np.testing.assert_array_equal(smm.capsule_predict(w, u, name="caps").numpy(),
                                  np.full([2, 6, 3, 4], 5.0, np.float32))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.float16, tf.bfloat16],
                         ids=lambda d: d.name)
@pytest.mark.usefixtures("on_kernels")
def test_every_float_dtype_with_gradients_on_two_engine_ops(entry, dtype):
    predict = ENTRY_POINTS[entry]
    w = random_tensor((6, 3, 4, 8), dtype, seed=14)
    u = random_tensor((5, 6, 8), dtype, seed=13)
    g = random_tensor((5, 6, 3, 4), dtype, seed=15)

    def step(predict, w, u):
        with tf.GradientTape() as tape:
            tape.watch([w, u])
            loss = tf.reduce_sum(tf.cast(predict(w, u), tf.float64) * tf.cast(g, tf.float64))
        return [predict(w, u)] + tape.gradient(loss, [w, u])

    got = step(predict, w, u)
    want = step(lambda a, b: tf.einsum(EQ, a, b), tf.cast(w, tf.float64), tf.cast(u, tf.float64))
    tol = {tf.float32: 1e-5, tf.float64: 1e-12, tf.float16: 5e-3, tf.bfloat16: 4e-2}[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        np.testing.assert_allclose(tf.cast(a, tf.float64), b, rtol=0,
                                   atol=tol * float(np.abs(b).max()))
    graph = tf.function(lambda w, u: step(predict, w, u)).get_concrete_function(w, u)
    assert smallmm_ops(graph) == {"SmallMMBatchMatMul", "SmallMMBatchMatMulPair"}
