"""The measured dispatch model (dispatch_model.json, `dispatch.choose`), the run-time branch
for sizes unknown at trace time, and the eager fast paths.

Model tests install a synthetic model (so they do not depend on what this CPU measured);
branch tests run graphs whose sizes only the run time knows and check which side ran from
the executor's step stats.
"""

import dataclasses
import itertools
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_smallmm as smm
from conftest import random_tensor, smallmm_ops
from tf_smallmm._core import contraction, dispatch

K = tf_keras.backend
BOUNDS = [1, 2, 4, 8, 12, 16, 24, 32, 64, 256, 1024, 4096]
CLASSES = range(len(BOUNDS) + 1)
M_ABOVE_8 = [[m, n, k] for m in CLASSES if m > 3 for n in CLASSES for k in CLASSES]


@pytest.fixture
def model(monkeypatch):
    """install({dtype name: cells where the built-in wins}, cpu_class=..., families=...,
    forward=...): a synthetic model measured for avx512+bf16, DENSE family only unless
    `families` gives {family: {dtype name: cells}} too; `forward` ({family: {dtype name:
    cells}}) adds cells where only the built-in's forward wins."""
    def install(cells=None, cpu_class="avx512+bf16", bounds=None, families=None,
                forward=None):
        classes = len(bounds or BOUNDS) + 1
        forward = forward or {}

        def encode(measured, family):
            split = forward.get(family, {})
            out = {}
            for dtype in set(measured) | set(split):
                only = {tuple(c) for c in split.get(dtype, ())}
                out[dtype] = dispatch.encode_cells(
                    {tuple(c) for c in measured.get(dtype, ())} | only, classes, only)
            return out

        families = dict({dispatch.DENSE: cells or {}}, **(families or {}))
        for family in forward:
            families.setdefault(family, {})
        entry = {"builtin": {f: encode(c, f) for f, c in families.items()}}
        if bounds:  # the entry's own size classes
            entry["size_bounds"] = bounds
        data = {"size_bounds": BOUNDS, "classes": {"avx512+bf16": entry}}
        monkeypatch.setattr(dispatch, "model", lambda: data)
        monkeypatch.setattr(dispatch, "isa_class", lambda: cpu_class)
        dispatch._table.cache_clear()
        dispatch._model_choice.cache_clear()

    yield install
    dispatch._table.cache_clear()
    dispatch._model_choice.cache_clear()


# ------------------------------------------------------------------ the model
def test_size_classes_cut_at_the_bounds():
    assert [dispatch.size_class(s, BOUNDS) for s in (1, 2, 3, 4, 5, 8, 9, 32, 33, 5000)] == \
        [0, 1, 2, 2, 3, 3, 4, 7, 8, 12]


def test_measured_cells_decide(model):
    model({"float32": [[7, 0, 1]], "float64": []})  # M 25-32, N 1, K 2: the built-in
    assert dispatch.choose(tf.float32, 32, 1, 2) == dispatch.BUILTIN
    assert dispatch.choose(tf.float32, 32, 1, 3) == dispatch.KERNEL
    assert dispatch.choose(tf.float64, 32, 1, 2) == dispatch.KERNEL
    assert dispatch.choose(tf.int32, 2, 2, 2) == dispatch.BUILTIN  # no kernel for int32


def test_cells_round_trip_through_the_file_form():
    cells = {(0, 0, 0), (3, 1, 12), (12, 12, 12)}
    rows = dispatch.encode_cells(cells, len(CLASSES))
    assert rows[3].split()[1] == "............B"
    assert dispatch.decode_cells(rows) == cells
    rows = dispatch.encode_cells(cells, len(CLASSES), forward={(3, 1, 12)})
    assert rows[3].split()[1] == "............F"
    assert dispatch.decode_cells(rows) == cells
    assert dispatch.decode_cells(rows, "F") == {(3, 1, 12)}


def test_a_family_the_model_has_not_measured_keeps_the_size_rule(model):
    """Only DENSE products are measured: a SHARED one (capsules, A-shared matmul) of the
    same sizes goes by MAX_SMALL_MACS."""
    model({"float32": M_ABOVE_8})
    assert dispatch.choose(tf.float32, 16, 4, 4) == dispatch.BUILTIN
    assert dispatch.choose(tf.float32, 16, 4, 4, dispatch.SHARED) == dispatch.KERNEL
    assert dispatch.choose(tf.float32, 32, 32, 32, dispatch.SHARED) == dispatch.BUILTIN


def test_a_16bit_family_not_measured_takes_the_dense_cells(model):
    model({"bfloat16": M_ABOVE_8, "float32": []})
    assert dispatch.choose(tf.bfloat16, 16, 4, 4, dispatch.SHARED) == dispatch.BUILTIN
    assert dispatch.choose(tf.bfloat16, 4, 4, 4, dispatch.SHARED) == dispatch.KERNEL
    # float16 has no dense cells here: the size rule.
    assert dispatch.choose(tf.float16, 16, 4, 4, dispatch.SHARED) == dispatch.KERNEL


def test_a_contraction_without_a_common_batch_is_asked_as_one_gemm(model, monkeypatch):
    """keras `dot` of [64,8,16] and [32,16,4] is one [512,16]·[16,128] GEMM for the built-in:
    the model is asked about that, DENSE, not about each row of x against a matrix of y."""
    asked = []
    choose = dispatch.choose

    def spy(dtype, m, n, k, family=dispatch.DENSE, per_product=None, split=False):
        asked.append((m, n, k, family))
        return choose(dtype, m, n, k, family, per_product, split)

    model({"float32": [[m, n, k] for m in CLASSES if m > 8 for n in CLASSES for k in CLASSES]})
    monkeypatch.setattr(dispatch, "choose", spy)
    x, y = random_tensor((64, 8, 16), tf.float32, 1), random_tensor((32, 16, 4), tf.float32, 2)
    want = np.tensordot(x.numpy(), y.numpy(), axes=([2], [1]))
    for run in (smm.dot, tf.function(smm.dot)):
        asked.clear()
        contraction._eager_lowering.cache_clear()
        np.testing.assert_allclose(run(x, y), want, rtol=1e-5, atol=1e-5)
        assert asked == [(512, 128, 16, dispatch.DENSE)]
    assert not smallmm_ops(tf.function(smm.dot).get_concrete_function(x, y))
    x = random_tensor((2, 3, 16), tf.float32, 3)  # 6×16 · 16×128: ours
    assert smallmm_ops(tf.function(smm.dot).get_concrete_function(x, y))


@pytest.mark.parametrize("call, family", [
    (lambda: smm.matmul(tf.ones([5, 2, 3]), tf.ones([5, 3, 4])), "dense"),
    (lambda: smm.matmul(tf.ones([2, 3]), tf.ones([5, 3, 4])), "shared"),
    (lambda: smm.matmul(tf.ones([5, 1, 2, 3]), tf.ones([1, 6, 3, 4])), "shared"),
    (lambda: smm.matmul(tf.ones([5, 2, 3]), tf.ones([3, 4])), "tall"),
    (lambda: smm.einsum("abc,cd->abd", tf.ones([5, 2, 3]), tf.ones([3, 4])), "dense"),
    (lambda: smm.capsule_predict(tf.ones([3, 2, 4, 5]), tf.ones([2, 3, 5])), "folded"),
    (lambda: smm.matvec(tf.ones([4, 5]), tf.ones([6, 5])), "folded"),
    (lambda: smm.einsum("bij,bjk->k", tf.ones([5, 2, 3]), tf.ones([5, 3, 4])), "shared"),
], ids=["matmul", "matmul A shared", "matmul rank-4 broadcast", "matmul B shared",
        "einsum folded", "capsule",
        "matvec A shared", "einsum summed batch"])
def test_wrappers_ask_for_their_products_family(call, family, monkeypatch):
    asked = []
    choose = dispatch.choose

    def spy(dtype, m, n, k, family=dispatch.DENSE, per_product=None, split=False):
        asked.append(family)
        return choose(dtype, m, n, k, family, per_product, split)

    monkeypatch.setattr(dispatch, "choose", spy)
    contraction._eager_lowering.cache_clear()
    call()
    assert asked == [family]


def test_a_folded_family_not_measured_asks_about_one_shared_product(model):
    """Capsule prediction 160×8 · 8×50 folded from 50 matrix-vector products: without
    FOLDED cells the model is asked about one 160×8 · 8×1 product, SHARED (the size rule
    here), not about the folded product, far above the size rule's bound."""
    model({"float32": []})
    assert dispatch.choose(tf.float32, 160, 50, 8, dispatch.FOLDED, (160, 1, 8)) == \
        dispatch.KERNEL
    assert dispatch.choose(tf.float32, 160, 50, 8, dispatch.SHARED) == dispatch.BUILTIN
    model({"float32": []}, families={dispatch.SHARED: {"float32": [[9, 0, 3]]}})
    assert dispatch.choose(tf.float32, 160, 50, 8, dispatch.FOLDED, (160, 1, 8)) == \
        dispatch.BUILTIN


def test_a_tall_family_not_measured_asks_about_its_pieces_as_dense(model):
    """B shared by 131072 matrices of 4 rows runs as 512-row pieces on the kernels:
    without TALL cells the model is asked about one piece, DENSE (here ours up to 8 rows),
    and with them about M of one matrix."""
    model({"float32": M_ABOVE_8})
    assert dispatch.choose(tf.float32, 4, 4, 4, dispatch.TALL, (512, 4, 4)) == \
        dispatch.BUILTIN
    assert dispatch.choose(tf.float32, 4, 4, 4, dispatch.TALL, (4, 4, 4)) == dispatch.KERNEL
    model({"float32": M_ABOVE_8}, families={dispatch.TALL: {"float32": [[2, 2, 2]]}})
    assert dispatch.choose(tf.float32, 4, 4, 4, dispatch.TALL, (512, 4, 4)) == \
        dispatch.BUILTIN
    assert dispatch.choose(tf.float32, 8, 4, 4, dispatch.TALL, (512, 4, 4)) == \
        dispatch.KERNEL


@pytest.mark.parametrize("measured", [False, True], ids=["dense-pieces", "tall"])
@pytest.mark.parametrize("batch", [1, 64, 131], ids=["one", "pieces", "prime"])
def test_b_shared_with_an_unknown_batch_takes_the_side_the_model_says(model, measured,
                                                                      batch):
    """[None, 4, 8] · [8, 8]: without TALL cells, the graph folds the run-time batch as
    the kernels do and asks the dense cells (ours up to 8 rows) about one piece: the
    built-in for 64 matrices (256 rows), ours for one or a prime batch (4-row pieces).
    With TALL cells (here ours for M of 3-4), M decides at trace time: no branch."""
    model({"float32": M_ABOVE_8},
          families={dispatch.TALL: {"float32": M_ABOVE_8}} if measured else None)
    a = random_tensor((batch, 4, 8), tf.float32, 1).numpy()
    b = random_tensor((8, 8), tf.float32, 2).numpy()
    feeds = [(tf.TensorSpec([None, 4, 8]), a), (tf.TensorSpec([8, 8]), b)]
    build = _product_and_grads(smm.matmul)
    with tf.Graph().as_default():
        build(*[tf.compat.v1.placeholder(tf.float32, spec.shape) for spec, _ in feeds])
        types = {op.type for op in tf.compat.v1.get_default_graph().get_operations()}
    assert ("If" in types or "StatelessIf" in types) != measured, types
    ran, got = ran_ops(build, feeds)
    _, want = ran_ops(_product_and_grads(tf.linalg.matmul), feeds)
    assert any(op.startswith("SmallMM") for op in ran) == (measured or batch != 64), ran
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5)


def test_measured_folded_cells_decide(model):
    """bfloat16: the built-in for one column, ours from two (the folded N)."""
    builtin = [[m, 0, k] for m in CLASSES for k in CLASSES]
    model({"bfloat16": M_ABOVE_8}, families={dispatch.FOLDED: {"bfloat16": builtin}})
    per_product = (160, 1, 8)
    assert dispatch.choose(tf.bfloat16, 160, 1, 8, dispatch.FOLDED, per_product) == \
        dispatch.BUILTIN
    for n in (2, 8, 50, 64):
        assert dispatch.choose(tf.bfloat16, 160, n, 8, dispatch.FOLDED, per_product) == \
            dispatch.KERNEL
    assert dispatch.choose(tf.bfloat16, 160, dispatch.AtLeast(1), 8, dispatch.FOLDED,
                           per_product) == dispatch.RUNTIME


@pytest.mark.parametrize("batch", [1, 7, 50], ids=["one-builtin", "prime-kernel", "kernel"])
def test_capsule_with_an_unknown_batch_branches_on_the_folded_columns(model, batch):
    """capsule_predict traced with a None batch: FOLDED cells send one column to the
    built-in; the graph folds the run-time batch as the kernels do (7 columns: ours)."""
    builtin = [[m, 0, k] for m in CLASSES for k in CLASSES]
    model({"float32": []}, families={dispatch.FOLDED: {"float32": builtin}})
    w = random_tensor((3, 2, 4, 5), tf.float64, 1).numpy().astype(np.float32)
    u = random_tensor((batch, 3, 5), tf.float64, 2).numpy().astype(np.float32)
    feeds = [(tf.TensorSpec([3, 2, 4, 5]), w), (tf.TensorSpec([None, 3, 5]), u)]
    ran, got = ran_ops(_product_and_grads(smm.capsule_predict), feeds)
    _, want = ran_ops(_product_and_grads(lambda w, u: tf.einsum("ijkl,bil->bijk", w, u)),
                      feeds)
    assert any(op.startswith("SmallMM") for op in ran) == (batch > 1), ran
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5)


def test_unknown_sizes_branch_only_where_the_answer_depends_on_them(model):
    model({"float32": M_ABOVE_8})
    at_least = dispatch.AtLeast
    assert dispatch.choose(tf.float32, at_least(1), 8, 8) == dispatch.RUNTIME
    assert dispatch.choose(tf.float32, at_least(9), 8, 8) == dispatch.BUILTIN  # 9 and up
    assert dispatch.choose(tf.float32, 4, at_least(1), at_least(1)) == dispatch.KERNEL


def test_an_unmeasured_class_takes_its_isa_measurement_and_the_16bit_rule(model):
    """A CPU with AVX512-FP16 / AMX the model has not seen: the avx512+bf16 cells, and
    16-bit products from 16³ multiply-adds go to the built-in."""
    model({"float32": [], "bfloat16": [], "float16": []}, cpu_class="avx512+bf16+fp16+amx")
    for dtype in (tf.bfloat16, tf.float16):
        assert dispatch.choose(dtype, 16, 16, 16) == dispatch.BUILTIN
        assert dispatch.choose(dtype, 8, 8, 8) == dispatch.KERNEL
        assert dispatch.choose(dtype, 32, 1, 3) == dispatch.KERNEL
    assert dispatch.choose(tf.float32, 32, 32, 32) == dispatch.KERNEL  # as measured


def test_an_unmeasured_isa_takes_the_size_rule(model):
    model({"float32": []}, cpu_class="avx2")
    assert dispatch.choose(tf.float32, 24, 24, 24) == dispatch.KERNEL
    assert dispatch.choose(tf.float32, 32, 32, 32) == dispatch.BUILTIN  # above MAX_SMALL_MACS
    assert dispatch.choose(tf.float32, 4096, 4, 4) == dispatch.BUILTIN
    assert dispatch.choose(tf.bfloat16, 16, 16, 16) == dispatch.BUILTIN


def test_shipped_model_keeps_the_clear_cases():
    """Whatever this CPU measured: the issue's [B,32,3]@[B,3,1] class runs on our kernel
    and big products (also with a None batch folded into M) on the built-in."""
    dispatch._model_choice.cache_clear()
    assert dispatch.choose(tf.float32, 32, 1, 3) == dispatch.KERNEL
    assert dispatch.choose(tf.float32, 512, 512, 512) == dispatch.BUILTIN
    assert dispatch.choose(tf.float32, dispatch.AtLeast(128), 512, 512) == dispatch.BUILTIN


def test_kernels_everywhere_bypasses_the_model(model):
    model({"float32": M_ABOVE_8})
    with dispatch.kernels_everywhere():
        assert dispatch.choose(tf.float32, 64, 8, 8) == dispatch.KERNEL
    assert dispatch.choose(tf.float32, 64, 8, 8) == dispatch.BUILTIN


@pytest.mark.parametrize("cells", [M_ABOVE_8, [[m, n, k] for m in CLASSES for n in CLASSES
                                               for k in CLASSES if (m + n) % 3 == 0]],
                         ids=["threshold", "scattered"])
def test_run_time_predicate_agrees_with_the_table(model, cells):
    model({"float32": cells})
    m_in, n_in = tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)
    wins = tf.function(lambda m, n: dispatch.kernel_wins(tf.float32, m, n, 8),
                       input_signature=[m_in, n_in])
    for m in (1, 3, 8, 9, 100, 5000):
        for n in (1, 2, 33):
            want = dispatch.choose(tf.float32, m, n, 8) == dispatch.KERNEL
            assert bool(wins(m, n)) == want, (m, n)


# ------------------------------------------------------------------ run-time branch
def ran_ops(build, feeds):
    """Types of the ops a v1 graph executed for `build(*placeholders)`, and the results.
    feeds: [(spec, value), ...]."""
    executed, out = executed_ops(build, feeds)
    return set(executed), out


def executed_ops(build, feeds):
    """ran_ops' op types as a list, one entry per node executed."""
    with tf.Graph().as_default():
        holders = [tf.compat.v1.placeholder(spec.dtype, spec.shape) for spec, _ in feeds]
        fetches = build(*holders)
        with tf.compat.v1.Session() as sess:
            meta = tf.compat.v1.RunMetadata()
            out = sess.run(fetches, {h: v for h, (_, v) in zip(holders, feeds)},
                           options=tf.compat.v1.RunOptions(
                               trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
                           run_metadata=meta)
    ran = []
    for dev in meta.step_stats.dev_stats:
        for node in dev.node_stats:
            label = node.timeline_label
            if " = " in label:
                ran.append(label.split(" = ")[1].split("(")[0])
    return ran, out


def _product_and_grads(fn):
    def build(a, b):
        y = fn(a, b)
        g = tf.ones_like(y)
        return [y] + tf.gradients(y, [a, b], grad_ys=g)

    return build


BRANCH_CASES = [
    # (id, ours, reference, a shape, b shape, which axis of a is None)
    ("matmul", smm.matmul, tf.linalg.matmul, (2, 4, 8), (2, 8, 8), 1),
    ("einsum abc,cd->abd", lambda a, b: smm.einsum("abc,cd->abd", a, b),
     lambda a, b: tf.einsum("abc,cd->abd", a, b), (1, 2, 8), (8, 8), 0),  # M = a·2
    ("batch_dot", lambda a, b: smm.batch_dot(a, b, (2, 1)),
     lambda a, b: K.batch_dot(a, b, (2, 1)), (2, 4, 8), (2, 8, 8), 1),
]


@pytest.mark.parametrize("case", BRANCH_CASES, ids=[c[0] for c in BRANCH_CASES])
@pytest.mark.parametrize("unknown_size", [4, 64], ids=["small-kernel", "large-builtin"])
def test_run_time_branch_takes_the_side_the_model_says(model, case, unknown_size):
    """M is unknown at trace time; the model says ours up to M = 8: the graph branches on
    the run-time M, each side with gradients, and the static shapes are TF's."""
    model({"float32": M_ABOVE_8})
    _, ours, reference, a_shape, b_shape, axis = case
    a_shape = tuple(unknown_size if i == axis else d for i, d in enumerate(a_shape))
    a = random_tensor(a_shape, tf.float64, 1).numpy().astype(np.float32)
    b = random_tensor(b_shape, tf.float64, 2).numpy().astype(np.float32)
    spec_a = tf.TensorSpec([None if i == axis else d for i, d in enumerate(a_shape)])
    feeds = [(spec_a, a), (tf.TensorSpec(b_shape), b)]
    ran, got = ran_ops(_product_and_grads(ours), feeds)
    _, want = ran_ops(_product_and_grads(reference), feeds)
    m = a_shape[1] * (a_shape[0] if axis == 0 else 1)
    assert any(op.startswith("SmallMM") for op in ran) == (unknown_size == 4), ran
    assert (m <= 8) == (unknown_size == 4)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    spec_b = tf.TensorSpec(b_shape)
    ours_cf = tf.function(ours).get_concrete_function(spec_a, spec_b)
    ref_cf = tf.function(reference).get_concrete_function(spec_a, spec_b)
    assert ours_cf.structured_outputs.shape.as_list() == \
        ref_cf.structured_outputs.shape.as_list()
    assert smallmm_ops(ours_cf)  # in the kernel branch


def test_no_branch_where_the_model_says_ours_for_every_size(model):
    model({"float32": []})
    spec = tf.TensorSpec([None, 4, 8])
    f = tf.function(smm.matmul).get_concrete_function(spec, tf.TensorSpec([None, 8, 8]))
    types = {op.type for op in f.graph.get_operations()}
    assert "SmallMMBatchMatMul" in types and not types & {"If", "StatelessIf"}


def test_big_product_with_none_batch_goes_to_the_builtin_without_a_branch():
    """The issue's case: [None,128,512] @ [512,512] must not run on our kernel."""
    f = tf.function(lambda a, b: smm.einsum("abc,cd->abd", a, b)).get_concrete_function(
        tf.TensorSpec([None, 128, 512]), tf.TensorSpec([512, 512]))
    types = {op.type for op in f.graph.get_operations()}
    assert not smallmm_ops(f) and not types & {"If", "StatelessIf"}


@pytest.mark.parametrize("a_shape, b_shape, ours", [
    ((2, 2), (2, 2), False), ((32, 32), (32, 32), False), ((1, 16), (16, 1), False),
    ((33, 8), (8, 8), None),  # a side above SINGLE_MATRIX_MAX: the model decides
    ((None, 8), (8, 8), None), ((1, 2, 2), (2, 2), None)])
def test_single_small_matrices_take_the_builtin_in_both_modes(model, a_shape, b_shape, ours):
    """One small matrix times another is all call overhead: the built-in MatMul, eagerly
    and in tf.function alike (so both give the same bits), except where the test forces
    our kernels."""
    model({"float32": []})  # the model says ours everywhere: only the size rule differs
    expected = True if ours is None else ours
    f = tf.function(smm.matmul).get_concrete_function(tf.TensorSpec(a_shape),
                                                      tf.TensorSpec(b_shape))
    assert bool(smallmm_ops(f)) == expected
    with dispatch.kernels_everywhere():
        f = tf.function(smm.matmul).get_concrete_function(tf.TensorSpec(a_shape),
                                                          tf.TensorSpec(b_shape))
        assert smallmm_ops(f)
    if None not in a_shape:
        a, b = random_tensor(a_shape, tf.float32, 1), random_tensor(b_shape, tf.float32, 2)
        np.testing.assert_array_equal(smm.matmul(a, b), tf.function(smm.matmul)(a, b))


# ------------------------------------------------------------------ the built-in's forward, our gradients
EVERY_CELL = [list(c) for c in itertools.product(CLASSES, repeat=3)]
SPLIT_CASES = [
    # (a shape, b shape, matmul flags): a batch, adjoints, a rank-4 broadcast, a B shared
    ((6, 5, 4), (6, 4, 3), {}),
    ((6, 4, 5), (6, 3, 4), {"adjoint_a": True, "transpose_b": True}),
    ((2, 1, 5, 4), (3, 4, 3), {}),
    ((6, 5, 4), (3, 4), {"adjoint_b": True}),
]


@pytest.fixture
def split_everywhere(model):
    model(forward={family: {d.name: EVERY_CELL for d in dispatch.SUPPORTED_DTYPES}
                   for family in (dispatch.DENSE, dispatch.SHARED, dispatch.TALL)})


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.complex64])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=["batch", "adjoint", "broadcast", "tall"])
def test_the_split_runs_the_builtins_forward_with_our_gradients(split_everywhere, case,
                                                                dtype):
    """Forward: the built-in's op and bits, no SmallMM op. Gradients: our kernels', equal to
    tf.linalg.matmul's to rounding, in tf.function and eagerly."""
    sa, sb, flags = case
    a, b = random_tensor(sa, dtype, 1), random_tensor(sb, dtype, 2)
    want = tf.linalg.matmul(a, b, **flags)
    g = random_tensor(want.shape, dtype, 3)

    def grads(fn):
        def step(a, b, g):
            with tf.GradientTape() as tape:
                tape.watch([a, b])
                y = fn(a, b, **flags)
            return [y] + tape.gradient(y, [a, b], output_gradients=g)

        return step

    forward = tf.function(smm.matmul)
    assert not smallmm_ops(forward.get_concrete_function(a, b, **flags))
    np.testing.assert_array_equal(forward(a, b, **flags), want)
    np.testing.assert_array_equal(smm.matmul(a, b, **flags), want)  # eager, no tape
    ours = tf.function(grads(smm.matmul))
    assert smallmm_ops(ours.get_concrete_function(a, b, g))
    tol = 1e-5 if dtype.real_dtype == tf.float32 else 1e-12
    expected = grads(tf.linalg.matmul)(a, b, g)
    for run in (ours, grads(smm.matmul)):
        got = run(a, b, g)
        np.testing.assert_array_equal(got[0], want)
        for x, y in zip(got[1:], expected[1:]):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("call", [
    lambda a, b: smm.matvec(a, b[..., 0]),
    lambda a, b: a @ b,
    lambda a, b: keras.ops.matmul(a, b),
], ids=["matvec", "@", "keras.ops.matmul"])
def test_every_product_drop_in_splits(split_everywhere, call):
    a, b = random_tensor((6, 5, 4), tf.float32, 1), random_tensor((6, 4, 1), tf.float32, 2)

    def step(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = call(a, b)
        return [y] + tape.gradient(y, [a, b])

    with smm.patched():
        forward, grads = tf.function(call), tf.function(step)
        assert not smallmm_ops(forward.get_concrete_function(a, b))
        assert smallmm_ops(grads.get_concrete_function(a, b))
        got = grads(a, b)
    want = step(a, b)  # unpatched: the built-ins
    for x, w in zip(got, want):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5)


def test_the_split_has_second_derivatives_and_forward_mode(split_everywhere):
    a, b = random_tensor((6, 5, 4), tf.float64, 1), random_tensor((4, 3), tf.float64, 2)

    def second(mm, a, b):
        with tf.GradientTape() as outer:
            outer.watch(a)
            with tf.GradientTape() as inner:
                inner.watch(b)
                y = mm(a, b)
                loss = tf.reduce_sum(y * y)
            db = inner.gradient(loss, b)
        return outer.gradient(db, a)

    def forward_mode(mm, a, b):
        with tf.autodiff.ForwardAccumulator(a, tf.ones_like(a)) as acc:
            y = mm(a, b)
        return acc.jvp(y)

    for fn in (second, forward_mode):
        want = fn(tf.linalg.matmul, a, b)
        for run in (fn, tf.function(fn)):
            np.testing.assert_allclose(run(smm.matmul, a, b), want, rtol=1e-12, atol=1e-12)


def test_the_split_forms_only_the_gradient_asked_for(split_everywhere):
    """A custom gradient is not told which inputs need theirs: each is its own product, and
    a graph that needs only dA (a frozen weight) runs only that one."""
    a, b = random_tensor((6, 5, 4), tf.float32, 1), random_tensor((6, 4, 3), tf.float32, 2)

    def build(which):
        def fn(x, y):
            out = smm.matmul(x, y)
            return tf.gradients(out, [(x, y)[i] for i in which], grad_ys=tf.ones_like(out))
        return fn

    feeds = [(tf.TensorSpec(a.shape), a.numpy()), (tf.TensorSpec(b.shape), b.numpy())]
    for which in ((0,), (1,), (0, 1)):
        ran, out = executed_ops(build(which), feeds)
        # (The forward does not run at all: no gradient reads it.)
        assert sum(op.startswith("SmallMM") for op in ran) == len(which), ran
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = tf.linalg.matmul(a, b)
        want = tape.gradient(y, [(a, b)[i] for i in which], output_gradients=tf.ones_like(y))
        for x, w in zip(out, want):
            np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ eager fast paths
EAGER_CASES = [
    ("matmul", smm.matmul, tf.linalg.matmul, (2, 3, 3), (2, 3, 3)),
    ("matmul 2-D", smm.matmul, tf.linalg.matmul, (2, 2), (2, 2)),
    ("matvec", smm.matvec, tf.linalg.matvec, (2, 3, 3), (2, 3)),
    ("einsum", lambda a, b: smm.einsum("bij,bjk->bik", a, b),
     lambda a, b: tf.einsum("bij,bjk->bik", a, b), (2, 3, 4), (2, 4, 5)),
    ("einsum reduced", lambda a, b: smm.einsum("bij,bjk->bk", a, b),
     lambda a, b: tf.einsum("bij,bjk->bk", a, b), (2, 3, 4), (2, 4, 5)),
    ("einsum broadcast", lambda a, b: smm.einsum("...ij,...jk->...ik", a, b),
     lambda a, b: tf.einsum("...ij,...jk->...ik", a, b), (2, 1, 3, 4), (5, 4, 6)),
    ("batch_dot", smm.batch_dot, K.batch_dot, (2, 3, 4), (2, 4, 5)),
    ("batch_dot 2-D", lambda a, b: smm.batch_dot(a, b, 1),
     lambda a, b: K.batch_dot(a, b, 1), (4, 3), (4, 3)),
    ("dot", smm.dot, K.dot, (2, 3, 4), (5, 4, 2)),
    ("capsule_predict", smm.capsule_predict, lambda w, u: tf.einsum("ijkl,bil->bijk", w, u),
     (3, 2, 4, 5), (2, 3, 5)),
]


@pytest.mark.parametrize("case", EAGER_CASES, ids=[c[0] for c in EAGER_CASES])
@pytest.mark.parametrize("dtype", [tf.float32, tf.complex128], ids=lambda d: d.name)
def test_eager_fast_path_gives_the_graph_result(case, dtype):
    _, ours, reference, a_shape, b_shape = case
    a, b = random_tensor(a_shape, dtype, 1), random_tensor(b_shape, dtype, 2)
    eager = ours(a, b)
    graph = tf.function(ours)(a, b)
    want = reference(a, b)
    assert eager.shape == want.shape and eager.dtype == want.dtype
    np.testing.assert_array_equal(eager.numpy(), graph.numpy())
    np.testing.assert_allclose(eager.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        y = ours(a, b)
    grads = tape.gradient(y, [a, b])
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        y = reference(a, b)
    for g, w in zip(grads, tape.gradient(y, [a, b])):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtypes", [(tf.int32, tf.int32), (tf.bfloat16, tf.bfloat16),
                                    (tf.bfloat16, tf.float32)], ids=str)
def test_eager_single_matrices_are_the_builtins_bits(dtypes):
    """Two small single matrices take the MatMul op eagerly, as tf.linalg.matmul does
    (mixed dtypes through tf.linalg.matmul itself): the same dtype, shape and bits."""
    a = tf.cast(random_tensor((3, 4), tf.float32, 1) * 4, dtypes[0])
    b = tf.cast(random_tensor((4, 2), tf.float32, 2) * 4, dtypes[1])
    ours, want = smm.matmul(a, b), tf.linalg.matmul(a, b)
    assert ours.dtype == want.dtype and ours.shape == want.shape
    np.testing.assert_array_equal(ours.numpy(), want.numpy())


def test_eager_lowerings_are_cached_per_signature():
    contraction._eager_lowering.cache_clear()
    x, y = tf.ones([2, 3, 4]), tf.ones([2, 4, 5])
    for _ in range(3):
        smm.einsum("bij,bjk->bik", x, y)
    smm.einsum("bij,bjk->bik", x[:1], y[:1])
    info = contraction._eager_lowering.cache_info()
    assert (info.misses, info.hits) == (2, 2)


@pytest.mark.parametrize("call", [
    lambda: smm.einsum("bij,bjk->bik", tf.ones([2, 3, 4]), tf.ones([2, 5, 6])),
    lambda: smm.einsum("bij,bjk->bik", tf.ones([2, 3, 4]), tf.ones([3, 4, 6])),
    lambda: smm.batch_dot(tf.ones([2, 3, 4]), tf.ones([2, 5, 6])),
    lambda: smm.capsule_predict(tf.ones([3, 2, 4, 5]), tf.ones([2, 4, 5])),
    lambda: smm.matmul(tf.ones([2, 3, 4]), tf.ones([2, 5, 6])),
    lambda: smm.matmul(tf.ones([2, 3]), tf.ones([2, 2])),
    lambda: smm.matmul(tf.ones([2, 2], tf.bool), tf.ones([2, 2], tf.bool)),
], ids=["einsum K", "einsum batch", "batch_dot", "capsule", "matmul", "matmul 2-D K",
        "matmul 2-D bool"])
def test_eager_errors_are_the_builtins(call):
    """Eagerly, shapes that do not fit raise what the built-in raises (type and text)."""
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)) as ours:
        call()
    with smm.layers.builtin_ops(), pytest.raises(type(ours.value)) as builtin:
        call()
    assert str(ours.value) == str(builtin.value)


def test_a_cell_where_only_the_forward_loses_splits_for_the_callers_that_ask(model):
    """A cell marked 'F': the built-in for choose() and for the run-time branch, the
    built-in's forward with our gradients for choose(..., split=True)."""
    model({"float32": [[3, 6, 3]]}, forward={dispatch.DENSE: {"float32": [[3, 5, 3]]}})
    assert dispatch.choose(tf.float32, 8, 16, 8) == dispatch.BUILTIN
    assert dispatch.choose(tf.float32, 8, 16, 8, split=True) == dispatch.GRADIENTS
    assert dispatch.choose(tf.float32, 8, 24, 8, split=True) == dispatch.BUILTIN
    assert dispatch.choose(tf.float32, 8, 4, 8, split=True) == dispatch.KERNEL
    # Sizes the run time decides: the split only where every class it may be splits.
    assert dispatch.choose(tf.float32, 8, dispatch.AtLeast(13), 8,
                           split=True) == dispatch.RUNTIME
    n = tf.constant(16)
    assert not bool(dispatch.kernel_wins(tf.float32, 8, n, 8))
    with dispatch.builtin_ops():
        assert dispatch.choose(tf.float32, 8, 16, 8, split=True) == dispatch.BUILTIN


# ------------------------------------------------------------------ fitting the model
def test_the_fit_acts_only_on_losses_beyond_the_noise_and_interpolates():
    """A cell goes to the built-in where its worst point is below the controls' noise
    floor; a cell between a win and a loss takes their geometric mean."""
    from tf_smallmm.tools import sweep

    controls = [{"fwd": 0.8 + 0.02 * i, "fwd_bwd": 1.0} for i in range(10)]
    floor = sweep.noise_floor(controls)
    assert 0.8 < floor < 0.9
    assert sweep.noise_floor([{"fwd": 1.0, "fwd_bwd": 1.01}]) == sweep.NEAR
    rows = [{"dtype": "float32", "point": p, "fwd": f, "fwd_bwd": fb} for p, f, fb in [
        ((8, 1, 8), 1.5, 1.6),     # cell (3, 0, 3): ours
        ((8, 2, 8), 1.2, floor + 0.01),  # (3, 1, 3): a loss within the noise: ours
        ((8, 4, 8), 2.0, 0.5),     # (3, 2, 3): the worse mode decides: the built-in
        ((8, 16, 8), 1.5, 1.5),    # (3, 5, 3)
        ((8, 32, 8), 0.8, 0.9),    # (3, 7, 3): the built-in
    ]]
    # (3, 4, 3): fast with both gradients, slow with the weight's alone: the built-in
    rows.append({"dtype": "float32", "point": (8, 12, 8), "fwd": 1.5, "fwd_bwd": 1.5,
                 "fwd_da": 1.4, "fwd_db": 0.6})
    cells = dispatch.decode_cells(sweep.fit_model(rows, BOUNDS, floor)["float32"])
    assert (3, 0, 3) not in cells and (3, 1, 3) not in cells and (3, 2, 3) in cells
    assert (3, 7, 3) in cells and (3, 4, 3) in cells
    # Unmeasured: N 5-8 (3, 3, 3) is next to (3, 2, 3) only -> the built-in; N 17-24
    # (3, 6, 3) is between 1.5 and 0.8 -> sqrt(1.2) -> ours; N 33-64 next to 0.8.
    assert (3, 3, 3) in cells and (3, 6, 3) not in cells and (3, 8, 3) in cells
    assert not dispatch.decode_cells(sweep.fit_model(rows, BOUNDS, floor)["float32"], "F")


def test_the_fit_splits_measured_cells_whose_gradients_win():
    """Where the forward loses and every mode with gradients wins by SPLIT_MIN, a measured
    cell takes the built-in's forward with our gradients ('F'); a smaller win, a lost
    gradient mode, or an interpolated cell stays the built-in's."""
    from tf_smallmm.tools import sweep

    win = sweep.SPLIT_MIN + 0.1
    rows = [{"dtype": "float32", "point": p, "fwd": 0.8, "fwd_bwd": fb, **extra}
            for p, fb, extra in [
                ((8, 1, 8), win, {}),                                 # (3, 0, 3): split
                ((8, 2, 8), win, {"fwd_da": win, "fwd_db": win}),     # (3, 1, 3): split
                ((8, 4, 8), win, {"fwd_da": win, "fwd_db": 1.0}),     # (3, 2, 3): dB only
                ((8, 12, 8), sweep.SPLIT_MIN - 0.05, {}),             # (3, 4, 3): too close
                ((8, 16, 8), win, {}), ((8, 16, 7), 0.9, {}),         # (3, 5, 3): one point
                ((8, 64, 8), win, {}),                                # (3, 8, 3): split
            ]]
    fitted = sweep.fit_model(rows, BOUNDS, sweep.NEAR)["float32"]
    cells, split = dispatch.decode_cells(fitted), dispatch.decode_cells(fitted, "F")
    assert split == {(3, 0, 3), (3, 1, 3), (3, 8, 3)}
    assert {(3, 2, 3), (3, 4, 3), (3, 5, 3), (3, 6, 3)} <= cells  # (3, 6, 3): interpolated


def test_a_class_entry_cuts_sizes_at_its_own_bounds(model):
    """A measurement fitted with other size classes than the file's top-level ones keeps
    them: M = 8 and M = 7 fall in different classes with a bound at 7."""
    own = [1, 2, 3, 4, 7, 8, 12, 16, 24, 32, 64, 256, 1024, 4096]
    m7 = dispatch.size_class(7, own)
    model({"float32": [(m7, n, k) for n in range(len(own) + 1) for k in range(len(own) + 1)]},
          bounds=own)
    assert dispatch.choose(tf.float32, 7, 64, 8) == dispatch.BUILTIN
    assert dispatch.choose(tf.float32, 5, 64, 8) == dispatch.BUILTIN
    assert dispatch.choose(tf.float32, 8, 64, 8) == dispatch.KERNEL
    assert dispatch.choose(tf.float32, 4, 64, 8) == dispatch.KERNEL


def test_refit_fits_the_saved_rows_again_and_keeps_their_stamp(tmp_path, monkeypatch):
    """--refit-model: the cells come from the rows a --write-model run saved, cut at
    MODEL_BOUNDS; the entry still says when and where those rows were measured."""
    import json

    from tf_smallmm.tools import sweep

    monkeypatch.setattr(dispatch, "isa_class", lambda: "avx512+bf16")
    rows = [{"dtype": "float32", "point": p, "fwd": f, "fwd_bwd": 1.2} for p, f in [
        ((7, 32, 8), 0.7), ((8, 32, 8), 1.3), ((8, 1, 8), 1.5)]]
    tall = [dict(r, family=dispatch.TALL) for r in rows]
    controls = [{"fwd": 1.0, "fwd_bwd": 1.0}] * 10
    saved = tmp_path / "SWEEP.json"
    saved.write_text(json.dumps({"rows": [], "model_rows": rows + tall,
                                 "model_controls": controls}))
    stamp = {"date": "2026-01-02", "command": "python -m tf_smallmm.bench --sweep "
             "--write-model", "machine": "somewhere", "tensorflow": "2.21.0"}
    tall_stamp = dict(stamp, date="2026-01-03", command=stamp["command"] + " --family tall")
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"size_bounds": BOUNDS, "classes": {
        "avx512+bf16": dict(stamp, builtin={}, families={dispatch.TALL: tall_stamp})}}))
    sweep.refit_model(str(saved), str(path))
    entry = json.loads(path.read_text())["classes"]["avx512+bf16"]
    assert {k: entry[k] for k in stamp} == stamp and "refit-model" in entry["fitted"]
    # Each family keeps when and how its own rows were measured.
    own = entry["families"][dispatch.TALL]
    assert {k: own[k] for k in tall_stamp} == tall_stamp and "refit-model" in own["fitted"]
    assert entry["size_bounds"] == list(sweep.MODEL_BOUNDS)
    cells = dispatch.decode_cells(entry["builtin"][dispatch.DENSE]["float32"])
    assert cells == dispatch.decode_cells(
        sweep.fit_model(rows, sweep.MODEL_BOUNDS, sweep.noise_floor(controls))["float32"])
    cls = [dispatch.size_class(s, sweep.MODEL_BOUNDS) for s in (7, 8, 32)]
    assert (cls[0], cls[2], cls[1]) in cells      # M 5-7: the built-in
    assert (cls[1], cls[2], cls[1]) not in cells  # M 8: ours
    saved.write_text(json.dumps({"rows": [], "model_rows": []}))
    with pytest.raises(SystemExit, match="no model rows"):
        sweep.refit_model(str(saved), str(path))
    # A sweep's JSON keeps each CPU class's rows: the refit reads this class's only.
    other = [dict(r, fwd=0.5) for r in rows]
    saved.write_text(json.dumps({"rows": [], "models": {
        "avx512+bf16+fp16+amx": {"rows": other, "controls": controls},
        "avx512+bf16": {"rows": rows, "controls": controls}}}))
    sweep.refit_model(str(saved), str(path))
    assert json.loads(path.read_text())["classes"]["avx512+bf16"]["builtin"] == entry["builtin"]
    saved.write_text(json.dumps({"rows": [], "models": {
        "avx512+bf16+fp16+amx": {"rows": other, "controls": controls}}}))
    with pytest.raises(SystemExit, match="no model rows for CPU class avx512"):
        sweep.refit_model(str(saved), str(path))


def test_the_model_grids_ask_about_the_products_the_wrappers_ask_about():
    """Each point of the sweep's TALL, SHARED and FOLDED grids is what the drop-in asks the
    model for that case's shapes, and each TALL case runs in pieces as long as the kernels
    make them (at least 256 rows where M·G allows)."""
    from tf_smallmm.dropins import linalg
    from tf_smallmm.tools import sweep

    for case in sweep.tall_grid(quick=False) + sweep.shared_grid(quick=False):
        sa, sb = case.shapes
        (size,) = linalg._product_sizes(sa, sb, False, False)
        assert size[3] == case.family, case.label
        assert size[:3] == (case.point if case.family != dispatch.FOLDED else
                            (case.point[0], dispatch.folded_columns(sb[0]), case.point[2]))
        if case.family == dispatch.TALL:
            assert size[4][0] >= min(256, sa[0] * sa[1]), case.label


def test_tall_model_rows_are_measured_against_the_wrappers_builtin_side(monkeypatch):
    """Where the drop-in's built-in side of a TALL product is not tf.linalg.matmul (its
    one-GEMM gradient), the model's forced rows are measured against that side, and the
    table's rows against tf.linalg.matmul."""
    from tf_smallmm.dropins import linalg
    from tf_smallmm.tools import sweep

    cases = sweep.tall_grid(quick=False)
    for case in cases:
        m, n, k = case.point
        assert (case.model_builtin is not None) == linalg.tall_gradient_applies(m, k, n)
        assert case.builtin is tf.linalg.matmul
    assert {c.model_builtin is None for c in cases} == {True, False}
    seen = []
    monkeypatch.setattr(sweep, "paired", lambda ours, base, args, rounds: (
        seen.append(base.python_function) or (1.0, 1.0, 1.0)))
    monkeypatch.setattr(sweep, "_uses_kernel", lambda fwd, args: (True, False))
    case = sweep.tall_case(1, 4, 3, tf.float32)
    for model, want in ((True, linalg.builtin_matmul), (False, tf.linalg.matmul)):
        seen.clear()
        sweep.measure(case, 1, model)
        assert seen[0] is want and len(seen) == 4
    # The built-in side is tf.linalg.matmul's forward and the one-GEMM gradient.
    a, b = sweep._tensor((64, 1, 3), tf.float64, 1), sweep._tensor((3, 4), tf.float64, 2)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        y = linalg.builtin_matmul(a, b)
    np.testing.assert_array_equal(y, tf.linalg.matmul(a, b))
    with tf.GradientTape() as tape2:
        tape2.watch([a, b])
        want = tf.linalg.matmul(a, b)
    for g, r in zip(tape.gradient(y, [a, b]), tape2.gradient(want, [a, b])):
        np.testing.assert_allclose(g, r, rtol=1e-12)


def test_a_sweep_keeps_the_model_rows_of_other_classes_and_families(monkeypatch):
    from tf_smallmm.tools import sweep

    monkeypatch.setattr(dispatch, "isa_class", lambda: "avx512+bf16")
    xeon = {"rows": [{"family": dispatch.DENSE, "fwd": 1.0}], "controls": [{"fwd": 1.0}]}
    mine = {"rows": [{"family": dispatch.DENSE, "fwd": 0.5}, {"family": dispatch.SHARED,
                                                               "fwd": 0.6}],
            "controls": [{"fwd": 0.9}]}
    legacy = sweep.saved_models({"model_rows": mine["rows"], "model_controls": mine["controls"]})
    assert legacy == {"avx512+bf16": mine}
    models = {"avx512+bf16+fp16+amx": xeon, "avx512+bf16": mine}
    new = [{"family": dispatch.SHARED, "fwd": 2.0}]
    got = sweep.with_new_rows(models, new, [{"fwd": 1.1}], {dispatch.SHARED})
    assert got["avx512+bf16+fp16+amx"] == xeon
    assert got["avx512+bf16"] == {"rows": [mine["rows"][0]] + new,
                                  "controls": [{"fwd": 0.9}, {"fwd": 1.1}]}
    # Every family measured again: none of this class's old rows or controls stays.
    got = sweep.with_new_rows(models, new, [{"fwd": 1.1}], {dispatch.SHARED, dispatch.DENSE})
    assert got["avx512+bf16"] == {"rows": new, "controls": [{"fwd": 1.1}]}
    assert got["avx512+bf16+fp16+amx"] == xeon and models["avx512+bf16"] == mine


def test_a_sweep_saves_the_model_rows_where_refit_reads_them_whatever_out_names(
        tmp_path, monkeypatch):
    """--out benchmarks/SWEEP-xeon.md: the run's rows go to SWEEP-xeon.json, the model rows
    (this class's new ones, the other classes' kept) to MODEL_ROWS, whose own run stays."""
    import json

    from tf_smallmm.tools import sweep

    monkeypatch.setattr(dispatch, "isa_class", lambda: "avx512+bf16+fp16+amx")
    rows_file = tmp_path / "SWEEP.json"
    monkeypatch.setattr(sweep, "MODEL_ROWS", str(rows_file))
    amd = {"rows": [{"family": dispatch.DENSE, "fwd": 1.0}], "controls": [{"fwd": 1.0}]}
    rows_file.write_text(json.dumps({"rows": ["amd run"], "models": {"avx512+bf16": amd}}))
    run = {"rows": ["xeon run"], "controls": [], "roofline": []}
    new = [{"family": dispatch.DENSE, "fwd": 2.0}]
    sweep.save_run(str(tmp_path / "SWEEP-xeon.json"), run, (new, [{"fwd": 1.1}],
                                                              {dispatch.DENSE}))
    assert json.loads((tmp_path / "SWEEP-xeon.json").read_text()) == run
    kept = json.loads(rows_file.read_text())
    assert kept["rows"] == ["amd run"] and kept["models"] == {
        "avx512+bf16": amd, "avx512+bf16+fp16+amx": {"rows": new, "controls": [{"fwd": 1.1}]}}
    # Without --write-model another file's run leaves MODEL_ROWS as it was; a run written to
    # MODEL_ROWS itself carries the model rows along.
    sweep.save_run(str(tmp_path / "SWEEP-quick.json"), run)
    assert json.loads(rows_file.read_text()) == kept
    sweep.save_run(str(rows_file), run)
    assert json.loads(rows_file.read_text()) == dict(run, models=kept["models"])


def test_the_sweep_measures_rows_below_the_target_again_and_reports_both():
    """A row below FLOOR_TARGET is measured again (here the same op on both sides, so the
    second measurement is near 1); the first pass stays in the row and the report."""
    import types

    from tf_smallmm.tools import sweep

    case = sweep.Case("grid", "matmul 4×(3×3 @ 3×3)", tf.float32, tf.linalg.matmul,
                      tf.linalg.matmul, ((4, 3, 3), (4, 3, 3)))
    fast = {"group": "grid", "case": "fast", "dtype": "float32", "point": None,
            "kernel": True, "branch": False, "fwd": 1.5, "fwd_bwd": 1.4}
    slow = {"group": "grid", "case": case.label, "dtype": "float32", "point": None,
            "kernel": False, "branch": False, "fwd": 0.5, "fwd_bwd": 0.6}
    rows = sweep.recheck([case], [fast, slow], rounds=3)
    assert rows[0] is fast
    assert rows[1]["first"] == {"fwd": 0.5, "fwd_bwd": 0.6}
    assert rows[1]["fwd"] > 0.5 and rows[1]["fwd_bwd"] > 0.6
    args = types.SimpleNamespace(quick=True, repeats=None)
    text = sweep.markdown(rows, [], [], args, 60.0, "x.png")
    assert "1 cases below 0.95 were measured again" in text
    assert "| 0.50 |" in text  # the first pass's worst ratio
    assert "](x.png)" in text and "![" not in sweep.markdown(rows, [], [], args, 60.0, None)


def test_the_sweep_times_each_gradient_alone_where_an_operand_is_a_weight():
    """A one_sided case's row has forward with dA alone and with dB alone besides forward
    and forward+backward; those steps return the gradient of that operand only."""
    from tf_smallmm.tools import sweep

    case = sweep.Case("broadcast", "matmul A shared (3, 4) @ (5, 4, 2)", tf.float32,
                      smm.matmul, tf.linalg.matmul, ((3, 4), (5, 4, 2)), one_sided=True)
    row = sweep.measure(case, rounds=1)
    assert {"fwd", "fwd_bwd", "fwd_da", "fwd_db"} <= set(row)
    assert "fwd_da" not in sweep.measure(dataclasses.replace(case, one_sided=False), 1)
    a, b = tf.ones((3, 4)), tf.ones((5, 4, 2))
    g = tf.ones((5, 3, 2))
    _, steps = sweep._steps(tf.linalg.matmul, None, None, tf.float32)
    _, da = steps["fwd_da"](a, b, g)
    assert da.shape == a.shape and len(steps["fwd_db"](a, b, g)) == 2
    np.testing.assert_allclose(steps["fwd_db"](a, b, g)[1], steps["fwd_bwd"](a, b, g)[2])
    text = sweep.markdown([row], [], [], types.SimpleNamespace(quick=True, repeats=None),
                          1.0, "x.png")
    assert "dA only" in text and "dB only" in text


def test_floor_timed_in_the_same_rounds():
    # The sweep's and the benchmarks' ×floor figures: every round times each function and
    # both floor probes once, so a slow phase of the machine hits both sides of the ratio.
    from tf_smallmm.tools import sweep
    calls = []
    (t_a, t_b), floor = sweep.timed_with_floor(
        [lambda: calls.append("a"), lambda: calls.append("b")], 3 << 20, rounds=5)
    assert t_a.shape == t_b.shape == floor.shape == (5,)
    assert (floor > 0).all() and (t_a > 0).all()
    # Each: two warm-up calls, one to size the timings, then `reps` calls in each round.
    reps = (calls.count("a") - 3) // 5
    assert reps >= 1 and calls.count("a") == calls.count("b") == 3 + 5 * reps


def test_in_one_call_runs_the_step_on_copies_one_after_another():
    # ×floor timings run IN_ONE_CALL steps per tf.function call, each on its own copy of
    # the inputs: no step may be merged with another or read another's buffers.
    from tf_smallmm.tools import sweep
    a, b = tf.random.normal([3, 4, 5], seed=1), tf.random.normal([3, 5, 2], seed=2)
    step = tf.function(lambda a, b: tf.linalg.matmul(a, b))
    run = sweep.in_one_call(step, (a, b))
    outs = run()
    assert len(outs) == sweep.IN_ONE_CALL
    for out in outs:
        np.testing.assert_allclose(out, step(a, b), rtol=1e-6)
    copies = run.args  # (a, b) copied once per step
    assert len(copies) == 2 * sweep.IN_ONE_CALL
    assert not any(c is a or c is b for c in copies)
    for i, c in enumerate(copies):
        np.testing.assert_array_equal(c, (a, b)[i % 2])
    graph = run.func.get_concrete_function(*copies).graph
    calls = [op for op in graph.get_operations() if "Call" in op.type]
    assert len(calls) == sweep.IN_ONE_CALL
    for before, after in zip(calls, calls[1:]):  # each waits for the one before
        assert before in after.control_inputs


def test_floor_never_below_writing_the_written_bytes():
    # A case that writes most of what it moves is bounded by the write probe too: 64 MiB
    # written take far longer than the 1 MiB the mixed probes move.
    from tf_smallmm.tools import sweep
    _, mixed = sweep.timed_with_floor([lambda: None], 1 << 20, rounds=3)
    _, writes = sweep.timed_with_floor([lambda: None], 1 << 20, rounds=3, written=64 << 20)
    assert np.median(writes) > 5 * np.median(mixed)
