"""Drop-ins `einsum`, `batch_dot`, `dot` and `capsule_predict` against the functions they
replace (tf.einsum, tf_keras.backend.batch_dot / dot, tf.einsum('ijkl,bil->bijk')).

Every case says whether it must run on the SmallMM engine ("fast") or call the built-in
("fallback"); the tests check values, gradients, static shapes, the ops in the forward and
backward graphs, the fallbacks (int32, XLA, TF_SMALLMM_DISABLE=1) and errors.
"""

import dataclasses
import json
import os
from typing import Callable

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_smallmm as smm
from conftest import DTYPES, GRAD_DTYPES, assert_close, random_tensor, run_python, smallmm_ops, wide
from tf_smallmm._core import contraction, dispatch
from tf_smallmm.dropins.einsum import parse

K = tf_keras.backend
# Ops that must not appear on the fast path, forward or backward: layout changes and
# copies (the engine reads transposed and broadcast operands through strides) and the
# built-ins the engine replaces.
FORBIDDEN = {"Transpose", "ConjugateTranspose", "Tile", "BroadcastTo", "Einsum",
             "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "MatMul", "Sum"}


@dataclasses.dataclass
class Case:
    id: str
    ours: Callable
    ref: Callable
    shapes: tuple
    fast: bool  # runs on the SmallMM engine (small float shapes)

    def __str__(self):
        return self.id


def _einsum_case(equation, *shapes, fast):
    return Case(f"einsum[{equation}]{'x'.join(map(str, shapes))}".replace(" ", ""),
                lambda *a: smm.einsum(equation, *a), lambda *a: tf.einsum(equation, *a),
                shapes, fast)


def _batch_dot_case(x, y, axes, fast):
    return Case(f"batch_dot{x}{y}axes={axes}".replace(" ", ""),
                lambda a, b: smm.batch_dot(a, b, axes), lambda a, b: K.batch_dot(a, b, axes),
                (x, y), fast)


def _dot_case(x, y, fast):
    return Case(f"dot{x}{y}".replace(" ", ""), smm.dot, K.dot, (x, y), fast)


CAPSULE_EQ = "ijkl,bil->bijk"
CASES = [
    # einsum patterns the planner takes (see docs/dropins.md)
    _einsum_case(CAPSULE_EQ, (6, 3, 4, 5), (2, 6, 5), fast=True),  # capsule prediction
    _einsum_case("bij,bjk->bik", (3, 4, 5), (3, 5, 2), fast=True),
    _einsum_case("bij,bj->bi", (3, 4, 5), (3, 5), fast=True),
    _einsum_case("bnij,bnj->bni", (2, 3, 4, 5), (2, 3, 5), fast=True),
    _einsum_case("bhqd,bhkd->bhqk", (2, 3, 4, 5), (2, 3, 6, 5), fast=True),  # attention
    _einsum_case("bij,bkj->bik", (3, 4, 5), (3, 6, 5), fast=True),  # rhs transposed
    _einsum_case("bji,bjk->bik", (3, 5, 4), (3, 5, 2), fast=True),  # lhs transposed
    _einsum_case("...ij,...jk->...ik", (2, 1, 3, 4), (5, 4, 6), fast=True),  # broadcast
    _einsum_case("ij,jk", (3, 4), (4, 5), fast=True),  # implicit output
    _einsum_case(" BIJ , BJK -> BIK ", (2, 3, 4), (2, 4, 5), fast=True),
    _einsum_case("ij,jk->...ik", (3, 4), (4, 5), fast=True),  # empty ellipsis
    _einsum_case("bi,ij->bj", (5, 3), (3, 4), fast=True),  # dense layer
    _einsum_case("ij,bj->bi", (4, 3), (5, 3), fast=True),  # shared matrix, batch of vectors
    _einsum_case("ijkl,bil->bik", (6, 3, 4, 5), (2, 6, 5), fast=True),  # sums j in-kernel
    _einsum_case("bij,bjk->bk", (3, 4, 5), (3, 5, 2), fast=True),  # sums i in-kernel
    _einsum_case("bij,bik->jk", (3, 4, 5), (3, 4, 2), fast=True),  # K = merged (b, i)
    _einsum_case("bij,bij->b", (3, 4, 5), (3, 4, 5), fast=True),  # K = merged (i, j)
    _einsum_case("i,i->", (7,), (7,), fast=True),
    _einsum_case("bij,bjk->bik", (0, 3, 4), (0, 4, 2), fast=True),  # empty batch
    _einsum_case("bij,bjk->bik", (2, 3, 0), (2, 0, 4), fast=True),  # K = 0: zeros
    # operands and output read / written through axis permutations (strides, no transposes)
    _einsum_case("BTNH,BSNH->BNTS", (2, 5, 3, 4), (2, 6, 3, 4), fast=True),  # Keras 3 attention
    _einsum_case("BNTS,BSNH->BTNH", (2, 3, 5, 6), (2, 6, 3, 4), fast=True),
    _einsum_case("aecd,abcd->acbe", (2, 6, 3, 4), (2, 5, 3, 4), fast=True),  # tf_keras attention
    _einsum_case("acbe,aecd->abcd", (2, 3, 5, 6), (2, 6, 3, 4), fast=True),
    _einsum_case("abcd,cdbe->ae", (2, 3, 4, 5), (4, 5, 3, 6), fast=True),  # b summed in-kernel
    _einsum_case("jikl,bil->bijk", (3, 6, 4, 5), (2, 6, 5), fast=True),  # CapsNet-Keras' W
    _einsum_case("bi,bi->i", (3, 4), (3, 4), fast=True),  # K = b, strided
    # einsum patterns that are not a product under reshapes: tf.einsum runs them
    _einsum_case("ii->i", (3, 3), fast=False),
    _einsum_case("ij->ji", (3, 4), fast=False),
    _einsum_case("ij,jk,kl->il", (2, 3), (3, 4), (4, 5), fast=False),
    _einsum_case("i,j->ij", (3,), (4,), fast=False),  # outer product: no contraction
    _einsum_case("ij,ij->ij", (3, 4), (3, 4), fast=False),  # elementwise
    _einsum_case("bii,bi->b", (2, 3, 3), (2, 3), fast=False),  # diagonal
    _einsum_case("ijkl,bil->bilk", (6, 3, 4, 5), (2, 6, 5), fast=False),  # seed answer (2)
    # batch_dot: every axes form, ranks 2..5
    _batch_dot_case((4, 5), (4, 5), None, fast=True),
    _batch_dot_case((4, 5), (4, 5, 6), None, fast=True),
    _batch_dot_case((4, 5, 6), (4, 6), None, fast=True),
    _batch_dot_case((4, 2, 3), (4, 3, 5), None, fast=True),
    _batch_dot_case((4, 2, 3), (4, 5, 3), (2, 2), fast=True),
    _batch_dot_case((4, 3, 2), (4, 3, 5), (1, 1), fast=True),
    _batch_dot_case((4, 2, 3), (4, 5, 3), -1, fast=True),
    _batch_dot_case((4, 2, 3), (4, 3), [-1, 1], fast=True),
    _batch_dot_case((4, 2, 3, 5), (4, 5, 6), None, fast=True),
    _batch_dot_case((4, 2, 3), (4, 5, 3, 6), None, fast=True),
    _batch_dot_case((4, 5, 3, 2), (4, 3, 6), (2, 1), fast=True),
    _batch_dot_case((2, 3, 4, 5, 6), (2, 6, 7), (4, 1), fast=True),
    _batch_dot_case((2, 3, 4), (2, 5, 3, 6), (1, 2), fast=True),  # y read permuted
    _batch_dot_case((2, 3, 4, 5), (2, 6, 3, 7), (1, 2), fast=True),
    # dot: Theano-style N-D
    _dot_case((2, 3, 4), (7, 4, 5), fast=True),
    _dot_case((1, 2, 3, 4), (8, 7, 4, 5), fast=True),
    _dot_case((1, 2, 4), (8, 7, 4, 5), fast=True),
    _dot_case((3, 7, 3), (3, 4), fast=True),
    _dot_case((2, 3), (4, 3, 5), fast=True),
    _dot_case((4,), (2, 4, 5), fast=True),
    _dot_case((2, 3), (3, 4), fast=True),  # 2-D: matmul
    # capsule_predict (w with and without the leading axis of size 1)
    Case("capsule_predict", smm.capsule_predict, lambda w, u: tf.einsum(CAPSULE_EQ, w, u),
         ((6, 3, 4, 5), (2, 6, 5)), True),
    Case("capsule_predict_w5", smm.capsule_predict,
         lambda w, u: tf.einsum(CAPSULE_EQ, w[0], u), ((1, 6, 3, 4, 5), (2, 6, 5)), True),
]
FAST = [c for c in CASES if c.fast]
BY_ID = {c.id: c for c in CASES}
# One case per function and path, for sweeps that the fast tier (-m "not slow") runs on
# these only and the full suite on every case.
SAMPLE = [f"einsum[{CAPSULE_EQ}](6,3,4,5)x(2,6,5)", "einsum[...ij,...jk->...ik](2,1,3,4)x(5,4,6)",
          "einsum[ijkl,bil->bilk](6,3,4,5)x(2,6,5)", "einsum[BTNH,BSNH->BNTS](2,5,3,4)x(2,6,3,4)",
          "einsum[acbe,aecd->abcd](2,3,5,6)x(2,6,3,4)", "batch_dot(4,2,3)(4,3,5)axes=None",
          "batch_dot(2,3,4)(2,5,3,6)axes=(1,2)", "dot(2,3,4)(7,4,5)", "capsule_predict",
          "capsule_predict_w5"]


def sampled(cases):
    """`cases` as parameters, those outside SAMPLE marked slow."""
    return [c if c.id in SAMPLE else pytest.param(c, marks=pytest.mark.slow) for c in cases]


def inputs(case, dtype, seed=0, integers=False):
    return [random_tensor(s, dtype, seed=seed + i, integers=integers)
            for i, s in enumerate(case.shapes)]


def op_types(graph):
    """Op types in a graph and in the functions it calls (gradients, nested functions),
    except the built-in that a shape guard (`contraction.SHAPE_GUARD`) runs only when sizes
    known at run time do not fit, to raise its own error."""
    nodes = [(op.type, op.name, op.node_def.attr) for op in graph.get_operations()]
    for f in graph._functions.values():
        nodes += [(node.op, node.name, node.attr) for node in f.definition.node_def]
    guarded = {attr["else_branch"].func.name for kind, name, attr in nodes
               if kind in ("If", "StatelessIf") and contraction.SHAPE_GUARD in name}
    types = [kind for kind, _, _ in nodes[:len(graph.get_operations())]]
    for name, f in graph._functions.items():
        if name not in guarded:
            types += [node.op for node in f.definition.node_def]
    return types


def outcome(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)


def widened(case, xs, absolute=False):
    """The reference on the inputs in float64 / complex128 (of |inputs| with absolute)."""
    w = wide(xs[0].dtype)
    return case.ref(*[tf.cast(tf.abs(x) if absolute else x, w) for x in xs])


# ------------------------------------------------------------------ values

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_values(case, dtype):
    xs = inputs(case, dtype)
    if case.fast:
        # Our rounding only: compare with the float64 reference within the error bound
        # of the same product on |x|, |y|.
        got = case.ours(*xs)
        assert got.dtype == dtype and got.shape == widened(case, xs).shape
        assert_close(got, widened(case, xs), dtype,
                     bound=np.real(widened(case, xs, absolute=True)))
    else:
        # The built-in runs: bit-identical results, or the same error where the built-in
        # has no kernel for the dtype.
        got, want = outcome(lambda: case.ours(*xs)), outcome(lambda: case.ref(*xs))
        if isinstance(want, type):
            assert got is want
        else:
            np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int32_falls_back_exactly(case):
    xs = inputs(case, tf.int32, integers=True)
    got, want = outcome(lambda: case.ours(*xs)), outcome(lambda: case.ref(*xs))
    if isinstance(want, type):
        assert got is want
    else:
        assert got.dtype == tf.int32
        np.testing.assert_array_equal(got.numpy(), want.numpy())


# ------------------------------------------------------------------ gradients

@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients(case, dtype):
    xs = inputs(case, dtype)
    with tf.GradientTape() as tape:
        tape.watch(xs)
        y = case.ours(*xs)
    g = random_tensor(y.shape, dtype, seed=9)
    got = tape.gradient(y, xs, output_gradients=g)

    def ref_grads(values, upstream):
        with tf.GradientTape() as t:
            t.watch(values)
            r = case.ref(*values)
        return t.gradient(r, values, output_gradients=upstream)

    w = wide(dtype)
    want = ref_grads([tf.cast(x, w) for x in xs], tf.cast(g, w))
    bound = ref_grads([tf.cast(tf.abs(x), w) for x in xs], tf.cast(tf.abs(g), w))
    for a, b, bd in zip(got, want, bound):
        assert_close(a, b, dtype, bound=np.real(bd))


# ------------------------------------------------------------------ static shapes, graphs

@pytest.mark.parametrize("unknown", ["batch", pytest.param("all", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", sampled(CASES), ids=str)
def test_static_shapes_with_unknown_dims(case, unknown):
    """Static shapes and the kernel path's ops with unknown dims. (The dispatch model is
    not asked: with every size unknown it branches at run time to the built-in's ops too;
    tests/test_dispatch_model.py tests that branch.)"""
    from tf_smallmm._core import dispatch

    def spec(shape):
        dims = [None] * len(shape) if unknown == "all" else [None] + list(shape[1:])
        return tf.TensorSpec(dims[:len(shape)], tf.float32)

    signature = [spec(s) for s in case.shapes]
    with dispatch.kernels_everywhere():
        ours = tf.function(case.ours, input_signature=signature).get_concrete_function()
    ref = tf.function(case.ref, input_signature=signature).get_concrete_function()
    assert ours.structured_outputs.shape.as_list() == ref.structured_outputs.shape.as_list()
    assert bool(smallmm_ops(ours)) == case.fast
    if case.fast:
        assert not FORBIDDEN & set(op_types(ours.graph))
    xs = inputs(case, tf.float32)
    assert_close(ours(*xs), widened(case, xs), tf.float32,
                 bound=widened(case, xs, absolute=True))


def forward_backward(case, dtype=tf.float32):
    """Concrete function returning the result and the gradients for every input."""
    def step(*args):
        xs, g = list(args[:-1]), args[-1]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = case.ours(*xs)
        return y, tape.gradient(y, xs, output_gradients=g)

    out_shape = case.ref(*inputs(case, dtype)).shape
    signature = [tf.TensorSpec(s, dtype) for s in case.shapes + (out_shape,)]
    return tf.function(step, input_signature=signature).get_concrete_function()


@pytest.mark.parametrize("case", sampled(FAST), ids=str)
@pytest.mark.usefixtures("on_kernels")
def test_forward_and_backward_graphs_run_on_smallmm_without_transposes(case):
    forward = tf.function(case.ours, input_signature=[
        tf.TensorSpec(s, tf.float32) for s in case.shapes]).get_concrete_function()
    types = op_types(forward_backward(case).graph)
    forward_count = sum(t.startswith("SmallMM") for t in op_types(forward.graph))
    assert forward_count == 1
    # One engine op forward and one backward: the Pair op computes both inputs' gradients
    # (reduce products: broadcast axes summed inside the kernel) in one pass.
    assert types.count("SmallMMBatchMatMulPair") == 1
    assert sum(t.startswith("SmallMM") for t in types) == 2
    assert not FORBIDDEN & set(types), FORBIDDEN & set(types)


@pytest.mark.parametrize("case", [c for c in CASES if not c.fast], ids=str)
def test_fallback_cases_do_not_use_smallmm(case):
    fn = tf.function(case.ours, input_signature=[tf.TensorSpec(s, tf.float32)
                                                 for s in case.shapes])
    assert not smallmm_ops(fn.get_concrete_function())


def test_tf_and_keras_variables_take_the_fast_path_with_gradients():
    import keras

    x = tf.Variable(random_tensor([3, 4, 5], tf.float64, seed=1))
    y = keras.Variable(random_tensor([3, 5, 2], tf.float64, seed=2).numpy())
    f = tf.function(lambda: smm.einsum("bij,bjk->bik", x, y))
    assert smallmm_ops(f.get_concrete_function()) == {"SmallMMBatchMatMul"}
    grads = []
    for fn in (smm.einsum, tf.einsum):
        with tf.GradientTape() as tape:
            r = fn("bij,bjk->bik", x, y)
        grads.append(tape.gradient(r, [x, y.value]))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


BATCH_DOT_AXES = [(xn, yn, a0, a1) for xn in range(2, 6) for yn in range(2, 6)
                  for a0 in range(1, xn) for a1 in range(1, yn)]


@pytest.mark.slow
@pytest.mark.parametrize("xn, yn, a0, a1", BATCH_DOT_AXES)
def test_batch_dot_every_axis_pair_of_ranks_2_to_5(xn, yn, a0, a1):
    """Values and static shapes against tf_keras for every axes pair, all on the engine:
    an operand contracted on a middle axis is read through an axis permutation. (The
    dispatch model is not asked: rank-5 cases merge into products it may send to the
    built-in, and this test is about the routing, not the size policy.)"""
    from tf_smallmm._core import dispatch

    xs = [2] + [3 + i for i in range(xn - 1)]
    ys = [2] + [6 + i for i in range(yn - 1)]
    ys[a1] = xs[a0]
    x, y = random_tensor(xs, tf.float64, 1), random_tensor(ys, tf.float64, 2)
    with dispatch.kernels_everywhere():
        f = tf.function(lambda a, b: smm.batch_dot(a, b, (a0, a1))).get_concrete_function(x, y)
    assert smallmm_ops(f) and "Transpose" not in {op.type for op in f.graph.get_operations()}
    want = K.batch_dot(x, y, (a0, a1))
    assert f.structured_outputs.shape == want.shape
    np.testing.assert_allclose(f(x, y).numpy(), want.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("xn, yn", [(xn, yn) for xn in range(1, 5) for yn in range(2, 5)
                                    if xn > 2 or yn > 2])
@pytest.mark.usefixtures("on_kernels")
def test_dot_every_rank_pair_runs_on_the_engine(xn, yn):
    xs = [2, 3, 4][:xn - 1] + [5]
    ys = [6, 7][:yn - 2] + [5, 3]
    x, y = random_tensor(xs, tf.float64, 1), random_tensor(ys, tf.float64, 2)
    f = tf.function(smm.dot).get_concrete_function(x, y)
    assert smallmm_ops(f) and not FORBIDDEN & set(op_types(f.graph))
    want = K.dot(x, y)
    assert f.structured_outputs.shape == want.shape
    np.testing.assert_allclose(f(x, y).numpy(), want.numpy(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the planner

def test_plans_are_cached_per_equation_and_ranks():
    parse.cache_clear()
    contraction.plan.cache_clear()
    contraction._eager_lowering.cache_clear()  # (which asks for the plan once per shapes)
    x, y = tf.ones([2, 3, 4]), tf.ones([2, 4, 5])
    for _ in range(3):
        smm.einsum("bij,bjk->bik", x, y)
    assert parse.cache_info().misses == 1 and parse.cache_info().hits == 2
    assert contraction.plan.cache_info().misses == 1


def test_capsule_plan_is_the_designed_lowering():
    # x = w viewed [in_caps, out_caps*out_dim, in_dim], y = u viewed [batch, in_caps,
    # in_dim, 1]: one matrix-vector product per (b, i), w broadcast over b.
    p = contraction.plan(parse(CAPSULE_EQ, 4, 3))
    assert (p.lhs_is_x, p.batch, p.m, p.k, p.n) == (True, (("b",), ("i",)), ("j", "k"),
                                                    ("l",), ())
    assert not (p.transpose_lhs or p.transpose_rhs or any(p.reduced))


LABELS = "abcdef"


@pytest.mark.slow
def test_random_two_operand_equations_match_tf_einsum():
    """Property: for random equations and shapes, einsum == tf.einsum (float64), and
    whatever the planner takes runs without transposes."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @st.composite
    def equations(draw):
        sizes = {label: draw(st.integers(1, 3)) for label in LABELS}
        x = draw(st.permutations(LABELS))[:draw(st.integers(1, 4))]
        y = draw(st.permutations(LABELS))[:draw(st.integers(1, 4))]
        union = sorted(set(x) | set(y))
        out = draw(st.permutations(union))[:draw(st.integers(0, len(union)))]
        eq = f"{''.join(x)},{''.join(y)}->{''.join(out)}"
        return eq, [sizes[a] for a in x], [sizes[a] for a in y]

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(equations())
    def check(args):
        eq, sx, sy = args
        x, y = random_tensor(sx, tf.float64, 1), random_tensor(sy, tf.float64, 2)
        np.testing.assert_allclose(smm.einsum(eq, x, y).numpy(), tf.einsum(eq, x, y).numpy(),
                                   rtol=1e-12, atol=1e-12)
        if contraction.plan(parse(eq, len(sx), len(sy))) is not None:
            f = tf.function(lambda a, b: smm.einsum(eq, a, b)).get_concrete_function(x, y)
            assert smallmm_ops(f) and not FORBIDDEN & set(op_types(f.graph))

    check()


# ------------------------------------------------------------------ fallbacks

@pytest.mark.parametrize("case", [BY_ID[i] for i in [
    f"einsum[{CAPSULE_EQ}](6,3,4,5)x(2,6,5)", "batch_dot(4,2,3)(4,5,3)axes=(2,2)",
    "dot(2,3,4)(7,4,5)", "capsule_predict"]], ids=str)
def test_xla_falls_back_to_the_builtins_without_the_xla_kernels(case, monkeypatch):
    # With them our ops compile to custom calls (tests/test_xla.py).
    monkeypatch.setattr(dispatch, "xla_compiles_kernels", lambda: False)
    xs = inputs(case, tf.float32)
    fn = tf.function(case.ours, jit_compile=True)
    assert not smallmm_ops(fn.get_concrete_function(*xs))
    assert_close(fn(*xs), widened(case, xs), tf.float32, bound=widened(case, xs, absolute=True))


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(smm.__file__)))
_PRELUDE = f"""
import json, sys
sys.path[:0] = [{PACKAGE_ROOT!r}, {TESTS_DIR!r}]
import numpy as np, tensorflow as tf
import test_dropins as T
"""


@pytest.mark.slow
def test_disabled_by_environment_runs_the_builtins_exactly():
    proc = run_python(_PRELUDE + """
    bad = []
    for case in T.CASES:
        xs = T.inputs(case, tf.float32)
        if not np.array_equal(case.ours(*xs).numpy(), case.ref(*xs).numpy()):
            bad.append(case.id + ": values differ")
        f = tf.function(case.ours).get_concrete_function(*xs)
        if T.smallmm_ops(f):
            bad.append(case.id + ": SmallMM op in the graph")
    print(json.dumps(bad))
    """.replace("\n    ", "\n"), env={"TF_SMALLMM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# ------------------------------------------------------------------ errors

def _sig(*shapes, dtype=tf.float32):
    return [tf.TensorSpec(s, dtype) for s in shapes]


def _in_graph(fn, *values, signature=None):
    """fn traced and run as a tf.function (shape-function errors surface as ValueError)."""
    return tf.function(fn, input_signature=signature)(*values)


def _t(*shape, dtype=tf.float32):
    return tf.ones(shape, dtype)


# (id, thunk for ours, thunk for the reference): each raises, and both raise the same type.
def _einsum_errors():
    cases = {
        "mismatched_k": ("ij,jk->ik", _t(2, 3), _t(4, 2)),
        "named_axes_do_not_broadcast": ("bij,bjk->bik", _t(1, 2, 3), _t(4, 3, 2)),
        "broadcast_dims_without_output_ellipsis": ("...ij,...jk", _t(5, 2, 3), _t(5, 3, 2)),
        "incompatible_ellipsis": ("...ij,...jk->...ik", _t(2, 3, 4), _t(5, 4, 6)),
        "label_not_in_inputs": ("ij,jk->il", _t(2, 3), _t(3, 4)),
        "repeated_output_label": ("ij,jk->ii", _t(2, 3), _t(3, 4)),
        "wrong_rank": ("ij,jk->ik", _t(2, 3, 1), _t(3, 4)),
        "mixed_dtypes": ("ij,jk->ik", _t(2, 3), _t(3, 4, dtype=tf.float64)),
        "invalid_character": ("i0,jk->ik", _t(2, 3), _t(3, 4)),
        "wrong_operand_count": ("ij,jk->ik", _t(2, 3), _t(3, 4), _t(4, 4)),
        "python_list_operand": ("ij,jk->ik", [[1.0, 2.0]], _t(2, 2)),
    }
    out = []
    for name, (eq, *args) in cases.items():
        out.append((f"einsum_{name}", lambda e=eq, a=args: smm.einsum(e, *a),
                    lambda e=eq, a=args: tf.einsum(e, *a)))
        out.append((f"einsum_{name}_graph",
                    lambda e=eq, a=args: _in_graph(lambda: smm.einsum(e, *a)),
                    lambda e=eq, a=args: _in_graph(lambda: tf.einsum(e, *a))))
    out.append(("einsum_bad_kwarg", lambda: smm.einsum("ij,jk->ik", _t(2, 3), _t(3, 4), foo=1),
                lambda: tf.einsum("ij,jk->ik", _t(2, 3), _t(3, 4), foo=1)))
    # Sizes unknown while tracing, different at run time: the engine must not broadcast
    # or reinterpret them (the batch label, and a K merged from two labels of equal total).
    for name, eq, sx, sy in [("runtime_batch", "bij,bjk->bik", (1, 2, 3), (4, 3, 2)),
                             ("runtime_merged_k", "bij,bij->b", (2, 3, 4), (2, 4, 3)),
                             ("runtime_free_dims", "ijkl,bil->bijk", (6, 3, 4, 5), (2, 5, 5))]:
        sig = _sig([None] * len(sx), [None] * len(sy))
        args = (_t(*sx), _t(*sy))
        out.append((f"einsum_{name}",
                    lambda e=eq, a=args, s=sig: _in_graph(
                        lambda p, q: smm.einsum(e, p, q), *a, signature=s),
                    lambda e=eq, a=args, s=sig: _in_graph(
                        lambda p, q: tf.einsum(e, p, q), *a, signature=s)))
    return out


def _keras_errors():
    cases = {
        "batch_dot_rank1": (smm.batch_dot, K.batch_dot, (_t(3), _t(3, 4))),
        "batch_dot_batch_sizes": (smm.batch_dot, K.batch_dot, (_t(3, 4), _t(2, 4))),
        "batch_dot_axis0": (smm.batch_dot, K.batch_dot, (_t(3, 4), _t(3, 4), 0)),
        "batch_dot_nested_axes": (smm.batch_dot, K.batch_dot, (_t(3, 4), _t(3, 4), [[1], [1]])),
        "batch_dot_mismatch": (smm.batch_dot, K.batch_dot, (_t(3, 4, 5), _t(3, 5, 4), -1)),
        "batch_dot_axis_out_of_range": (smm.batch_dot, K.batch_dot, (_t(3, 4), _t(3, 4), 5)),
        "batch_dot_very_negative_axis": (smm.batch_dot, K.batch_dot,
                                         (_t(3, 4, 5), _t(3, 4, 5), (-5, 1))),
        "batch_dot_three_axes": (smm.batch_dot, K.batch_dot, (_t(3, 4), _t(3, 4), (1, 1, 1))),
        "batch_dot_mixed_dtypes": (smm.batch_dot, K.batch_dot,
                                   (_t(3, 2, 4), _t(3, 4, 5, dtype=tf.float64))),
        "dot_theano_mismatch": (smm.dot, K.dot, (_t(3, 4, 5, 2), _t(2, 5, 3, 7))),
        "dot_vectors": (smm.dot, K.dot, (_t(3), _t(3))),
        "dot_y_rank1": (smm.dot, K.dot, (_t(2, 3, 4), _t(4))),
        "dot_numpy": (smm.dot, K.dot, (np.ones((2, 3, 4)), np.ones((4, 5)))),
        "dot_mixed_dtypes": (smm.dot, K.dot, (_t(2, 3, 4), _t(4, 5, dtype=tf.float64))),
    }
    out = []
    for name, (ours, ref, args) in cases.items():
        out.append((name, lambda f=ours, a=args: f(*a), lambda f=ref, a=args: f(*a)))
        out.append((name + "_graph", lambda f=ours, a=args: _in_graph(lambda: f(*a)),
                    lambda f=ref, a=args: _in_graph(lambda: f(*a))))
    sig = _sig([None, 3, 4], [None, 4, 5])
    out.append(("batch_dot_runtime_batch_mismatch",
                lambda: _in_graph(smm.batch_dot, _t(2, 3, 4), _t(3, 4, 5), signature=sig),
                lambda: _in_graph(K.batch_dot, _t(2, 3, 4), _t(3, 4, 5), signature=sig)))
    sig = _sig([2, None], [None, 5])
    out.append(("dot_runtime_k_mismatch",
                lambda: _in_graph(smm.dot, _t(2, 3), _t(4, 5), signature=sig),
                lambda: _in_graph(K.dot, _t(2, 3), _t(4, 5), signature=sig)))
    sig = _sig([2, 3, None], [None, 4, 5])
    out.append(("dot_nd_runtime_k_mismatch",
                lambda: _in_graph(smm.dot, _t(2, 3, 3), _t(7, 4, 5), signature=sig),
                lambda: _in_graph(K.dot, _t(2, 3, 3), _t(7, 4, 5), signature=sig)))
    return out


def bad_inputs():
    sig = _sig([None] * 4, [None] * 3)
    capsule = [("capsule_predict_runtime_in_caps",
                lambda: _in_graph(smm.capsule_predict, _t(6, 3, 4, 5), _t(2, 5, 5), signature=sig),
                lambda: _in_graph(lambda w, u: tf.einsum(CAPSULE_EQ, w, u), _t(6, 3, 4, 5),
                                  _t(2, 5, 5), signature=sig))]
    return _einsum_errors() + _keras_errors() + capsule


@pytest.fixture(scope="module")
def error_types():
    """Runs every bad input once, in one fresh interpreter (a crash fails the tests instead
    of the test process): {id: [our exception type, the reference's]}."""
    proc = run_python(_PRELUDE + """
    def kind(thunk):
        try:
            thunk()
        except Exception as e:
            return type(e).__name__
        return "no error"
    print(json.dumps({name: [kind(ours), kind(ref)] for name, ours, ref in T.bad_inputs()}))
    """.replace("\n    ", "\n"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, _, _ in bad_inputs()])
def test_bad_inputs_raise_what_the_reference_raises(error_types, name):
    ours, ref = error_types[name]
    assert ref != "no error", f"{name}: the reference accepts it"
    assert ours == ref
