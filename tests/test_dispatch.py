"""The dispatch policy: its dtype list and limits against the library's, the products it
is asked about, and builtin_ops() blocks (nested, overlapping, from many threads) and what
they leave behind."""

import os
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

import tf_smallmm as smm
from conftest import smallmm_ops
from tf_smallmm import _smallmm_core as core
from tf_smallmm._core import dispatch, loader
from tf_smallmm.layers import builtin_ops


def test_supported_dtypes_are_the_librarys():
    """SUPPORTED_DTYPES is written once in Python; the library has its own list. Compared
    with the dtype names the kernel module exports where it does, and with the type attr
    the op registers (which the kernel registrations come from) in any case."""
    ours = {d.name for d in dispatch.SUPPORTED_DTYPES}
    names = getattr(core, "dtype_names", None)
    if names is not None:
        assert ours == set(names)
    assert loader.load() is not None
    attr = next(a for a in op_def_registry.get("SmallMMBatchMatMul").attr if a.name == "T")
    assert ours == {tf.as_dtype(t).name for t in attr.allowed_values.list.type}


def test_max_batch_dims_is_the_kernels():
    assert dispatch.MAX_BATCH_DIMS == core.max_batch_dims


def test_max_folded_rows_is_the_kernels():
    assert dispatch.MAX_FOLDED_ROWS == core.max_folded_rows


def test_max_folded_columns_is_the_kernels():
    assert dispatch.MAX_FOLDED_COLUMNS == core.max_folded_columns


def test_folded_columns_are_the_kernels_folds():
    """The largest divisor within MAX_FOLDED_COLUMNS (DivisorAtMost, cc/engine/plan.cc),
    the same from ints and at run time; an unknown size may give any."""
    sizes = list(range(200)) + [1024, 1031, 4096 * 3]
    expected = [max([d for d in range(1, min(s, 64) + 1) if s % d == 0], default=1)
                for s in sizes]
    assert [dispatch.folded_columns(s) for s in sizes] == expected
    run_time = tf.function(lambda s: tf.map_fn(dispatch.folded_columns, s))
    assert run_time(tf.constant(sizes, tf.int32)).numpy().tolist() == expected
    assert [_in_a_v1_graph(lambda s=s: dispatch.folded_columns(tf.constant(s)))
            for s in (7, 50, 128, 67)] == [7, 50, 64, 1]
    assert dispatch.folded_columns(dispatch.AtLeast(50)) == dispatch.AtLeast(1)


@pytest.mark.parametrize("batch, columns", [(50, 50), (128, 64), (67, 1), (1, 1)])
def test_shared_matrix_times_vectors_asks_about_the_folded_product(monkeypatch, batch,
                                                                    columns):
    """Capsule prediction W[i] · u[b, i] and a matvec of a matrix shared by a batch run as
    one product with the batch as columns: the model is asked about that product, eagerly,
    in a graph, and (through the run-time branch) with the batch unknown."""
    asked, real = [], dispatch.choose
    monkeypatch.setattr(dispatch, "choose",
                        lambda *a, **kw: asked.append(a) or real(*a, **kw))
    w, u = tf.ones([6, 10, 16, 8]), tf.ones([batch, 6, 8])
    for f in (smm.capsule_predict, tf.function(smm.capsule_predict)):
        asked.clear()
        f(w, u)
        assert [a[1:] for a in asked] == [(160, columns, 8, dispatch.FOLDED, (160, 1, 8))]
    m, x = tf.ones([16, 8]), tf.ones([batch, 8])
    # (A batch of one: B shared by A's one matrix, TALL.)
    family = dispatch.FOLDED if batch > 1 else dispatch.TALL
    for f in (smm.matvec, tf.function(smm.matvec)):
        asked.clear()
        f(m, x)
        assert {a[1:5] for a in asked} == {(16, columns, 8, family)}
    asked.clear()
    spec = tf.TensorSpec([None, 6, 8])
    got = tf.function(smm.capsule_predict, input_signature=[tf.TensorSpec(w.shape), spec])
    got = got(w, u)
    assert [a[1:5] for a in asked] == [(160, dispatch.AtLeast(1), 8, dispatch.FOLDED)]
    np.testing.assert_array_equal(got, tf.einsum("ijkl,bil->bijk", w, u))


@pytest.mark.parametrize("m, batch, rows", [
    (4, 131072, 512), (24, 3640, 480), (3, 233016, 504), (32, 2048, 512), (4, 7, 28),
    (5, 30011, 5), (600, 8, 600), (1, 1, 1), (4, 0, 4)])
def test_folded_rows_are_the_cpu_kernels_folds(m, batch, rows):
    assert dispatch.folded_rows(m, batch) == rows
    assert int(dispatch.folded_rows_at_run_time(tf.constant(m, tf.int64),
                                                tf.constant(batch, tf.int64))) == rows
    assert _in_a_v1_graph(lambda: dispatch.folded_rows_at_run_time(
        tf.constant(m, tf.int64), tf.constant(batch, tf.int64))) == rows


def _in_a_v1_graph(build):
    """The value of build()'s tensor in a TF1-style graph and session (where a tensor's ==
    is not a graph op)."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        return session.run(build())


def _plain(sizes):
    return tuple(tuple(s.lo if isinstance(s, dispatch.AtLeast) else s for s in size[:4])
                 for size in sizes)


@pytest.mark.parametrize("sa, sb, ta, expected", [
    # B shared by every matrix of A: one tall product (TALL, M of one matrix).
    ((131072, 4, 4), (4, 4), False, (4, 4, 4, dispatch.TALL)),
    ((8, 16, 4, 4), (1, 1, 4, 4), False, (4, 4, 4, dispatch.TALL)),
    ((7, 5, 3), (3, 2), False, (5, 2, 3, dispatch.TALL)),
    ((1, 4, 4), (4, 4), False, (4, 4, 4, dispatch.TALL)),
    # No row fold: A transposed, B not shared by all.
    ((131072, 4, 4), (4, 4), True, (4, 4, 4, dispatch.SHARED)),
    ((8, 16, 4, 4), (16, 4, 4), False, (4, 4, 4, dispatch.SHARED)),
    ((4, 4), (131072, 4, 4), False, (4, 4, 4, dispatch.SHARED)),
    ((9, 4, 4), (9, 4, 4), False, (4, 4, 4, dispatch.DENSE)),
    # Matrix-vector products sharing A: the batch A lacks is N, up to a divisor of 64.
    ((4, 4), (50, 4, 1), False, (4, 50, 4, dispatch.FOLDED)),
    ((3, 1, 16, 8), (3, 128, 8, 1), False, (16, 64, 8, dispatch.FOLDED)),
    ((8, 4), (67, 8, 1), True, (4, 1, 8, dispatch.FOLDED)),
])
def test_product_sizes_ask_about_the_product_the_kernels_run(sa, sb, ta, expected):
    from tf_smallmm.dropins import linalg

    assert _plain(linalg._product_sizes(sa, sb, ta, False)) == (expected,)


@pytest.mark.parametrize("sa, sb, pieces", [
    ((131072, 4, 4), (4, 4), (512, 4, 4)), ((8, 16, 4, 4), (1, 1, 4, 4), (512, 4, 4)),
    ((7, 5, 3), (3, 2), (35, 2, 3)), ((1, 4, 4), (4, 4), (4, 4, 4)),
    ((30011, 5, 3), (3, 3), (5, 3, 3)),  # a prime batch: pieces of one matrix
    ((None, 4, 4), (4, 4), (dispatch.AtLeast(4), 4, 4))])
def test_a_b_shared_by_all_gives_the_pieces_the_kernels_run_as_per_product(sa, sb, pieces):
    """Where the model has not measured TALL, it is asked about one piece as DENSE: the
    rows of dispatch.folded_rows (at least M where the batch is unknown)."""
    from tf_smallmm.dropins import linalg

    (size,) = linalg._product_sizes(sa, sb, False, False)
    assert size[3] == dispatch.TALL and size[4] == pieces


@pytest.mark.parametrize("sa, sb, ta, expected", [
    # A batch only the run time knows: B shared by all.
    ((None, 4, 4), (4, 4), False, {(4, 4, 4, dispatch.TALL)}),
    ((9, None, 4), (4, 4), False, {(1, 4, 4, dispatch.TALL)}),
    # Batch axes that may or may not broadcast: every family.
    ((None, 4, 4), (None, 4, 4), False,
     {(4, 4, 4, dispatch.DENSE), (4, 4, 4, dispatch.SHARED), (4, 4, 4, dispatch.TALL)}),
    ((9, 4, 4), (None, 4, 4), True, {(4, 4, 4, dispatch.DENSE), (4, 4, 4, dispatch.SHARED)}),
    (None, (4, 4), False, {(1, 4, 4, dispatch.DENSE), (1, 4, 4, dispatch.TALL)}),
    ((4, 4), None, False, {(4, 1, 4, dispatch.DENSE), (4, 1, 4, dispatch.SHARED),
                           (4, 1, 4, dispatch.FOLDED), (4, 1, 4, dispatch.TALL)}),
    ((4, 4), (None, 4, 1), False, {(4, 1, 4, dispatch.TALL), (4, 1, 4, dispatch.FOLDED)}),
])
def test_product_sizes_with_unknown_batches_list_every_product(sa, sb, ta, expected):
    from tf_smallmm.dropins import linalg

    assert set(_plain(linalg._product_sizes(sa, sb, ta, False))) == expected


SHAPE_PAIRS = [
    ((131072, 4, 4), (4, 4)), ((8, 16, 4, 4), (1, 1, 4, 4)), ((7, 5, 3), (3, 2)),
    ((1, 4, 4), (4, 4)), ((8, 16, 4, 4), (16, 4, 4)), ((4, 4), (131072, 4, 4)),
    ((9, 4, 4), (9, 4, 4)), ((0, 25, 0), (1, 0, 0)), ((0, 3, 2), (2, 2)),
    ((5, 1, 600, 4), (3, 4, 2)), ((3, 1, 4, 4), (1, 1, 4, 4)), ((6, 33, 4), (1, 4, 1)),
    ((2, 3, 4), (2, 1, 4, 4)), ((1, 1, 8, 8), (8, 8)), ((30011, 5, 3), (3, 3)),
    # A shared by matrix-vector products: the batch it lacks folds into N.
    ((4, 4), (50, 4, 1)), ((12, 16, 8), (50, 12, 8, 1)), ((12, 16, 8), (67, 12, 8, 1)),
    ((3, 1, 16, 8), (3, 128, 8, 1)), ((12, 16, 8), (12, 8, 1))]


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("known", ["rank", "nothing"])
def test_run_time_product_is_the_static_answer(transpose_a, known):
    """What the graph computes from the run-time shapes (sizes, family, fold) is what the
    static shapes give, and among what they gave at trace time."""
    from tf_smallmm.dropins import linalg

    for sa, sb in SHAPE_PAIRS:
        if transpose_a:
            sa = sa[:-2] + sa[:-3:-1]
        specs = [tf.TensorSpec([None] * len(s) if known == "rank" else None) for s in (sa, sb)]
        f = tf.function(lambda a, b: linalg._run_time_product(a, b, transpose_a, False),
                        input_signature=specs)
        m, n, k, shared, tall, one, rows = (
            int(v) for v in f(tf.zeros(sa), tf.zeros(sb)))
        static = _plain(linalg._product_sizes(sa, sb, transpose_a, False))
        family = dispatch.TALL if tall else dispatch.DENSE if not shared else \
            dispatch.FOLDED if one == 1 else dispatch.SHARED
        assert not (shared and tall)
        assert static == ((m, n, k, family),), (sa, sb)
        # One product's N, which a folded N stands for, and the rows of a tall product's
        # pieces (per_product of dispatch.choose).
        assert one == sb[-1]
        per_product = linalg._product_sizes(sa, sb, transpose_a, False)[0][4]
        assert per_product == {dispatch.FOLDED: (m, 1, k), dispatch.TALL: (rows, n, k)}.get(
            family), (sa, sb)
        assert rows == m or tall
        traced = linalg._product_sizes(*(tuple(s.shape) if known == "rank" else None
                                         for s in specs), transpose_a, False)
        assert any(t[3] == family and (isinstance(t[0], dispatch.AtLeast) or t[0] == m)
                   for t in traced), (sa, sb, traced)


def matmul_ops():
    spec = tf.TensorSpec([4, 3, 3])
    return smallmm_ops(tf.function(smm.matmul).get_concrete_function(spec, spec))


def test_overlapping_blocks_closed_out_of_order_leave_nothing_forced():
    env, was_disabled = os.environ.get("TF_SMALLMM_DISABLE"), dispatch.disabled()
    first, second = builtin_ops(), builtin_ops()
    first.__enter__()
    try:
        second.__enter__()
        try:
            assert dispatch.disabled() and not matmul_ops()
        finally:
            first.__exit__(None, None, None)  # the first block closes first
        assert dispatch.disabled()  # the second is still open
    finally:
        second.__exit__(None, None, None)
    assert dispatch.disabled() == was_disabled
    assert os.environ.get("TF_SMALLMM_DISABLE") == env
    assert bool(matmul_ops()) == (not was_disabled)


def test_blocks_in_many_threads_force_the_builtins_until_the_last_closes():
    was_disabled = dispatch.disabled()
    threads = 8
    all_open, first_closed = threading.Barrier(threads), threading.Event()
    seen_while_open = []

    def block(i):
        with builtin_ops():
            all_open.wait()
            if i == 0:
                first_closed.wait()  # thread 0 closes last
            seen_while_open.append(dispatch.disabled())
        if i == 1:
            first_closed.set()

    workers = [threading.Thread(target=block, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert seen_while_open == [True] * threads
    assert dispatch.disabled() == was_disabled
