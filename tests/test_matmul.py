"""tf_smallmm.matmul / matvec against tf.linalg.matmul / matvec (reference in float64)."""

import itertools
import json

import numpy as np
import pytest
import tensorflow as tf

import tf_smallmm as smm
from conftest import (
    DEVICES,
    DTYPES,
    GRAD_DTYPES,
    assert_close,
    random_tensor,
    run_python,
    smallmm_ops,
    wide,
)
from tf_smallmm._core import dispatch

# (transpose, adjoint) per side, as tf.linalg.matmul spells them.
SIDES = [(False, False), (True, False), (False, True)]


def reference(a, b, **kw):
    """tf.linalg.matmul in float64 / complex128, and the forward error scale |a|·|b|."""
    w = wide(a.dtype)
    want = tf.linalg.matmul(tf.cast(a, w), tf.cast(b, w), **kw)
    kw_abs = {k: v for k, v in kw.items() if k in ("transpose_a", "transpose_b")}
    kw_abs["transpose_a"] = kw.get("transpose_a", False) or kw.get("adjoint_a", False)
    kw_abs["transpose_b"] = kw.get("transpose_b", False) or kw.get("adjoint_b", False)
    bound = tf.linalg.matmul(tf.abs(tf.cast(a, w)), tf.abs(tf.cast(b, w)), **kw_abs)
    return want.numpy(), np.abs(bound.numpy())


def shapes_for(m, n, k, ta, tb, batch_a=(), batch_b=()):
    sa = (k, m) if ta else (m, k)
    sb = (n, k) if tb else (k, n)
    return tuple(batch_a) + sa, tuple(batch_b) + sb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("side_a,side_b", list(itertools.product(SIDES, SIDES)))
def test_values_every_dtype_and_flag(device, dtype, side_a, side_b):
    (ta, aa), (tb, ab) = side_a, side_b
    sa, sb = shapes_for(5, 3, 7, ta or aa, tb or ab, (2,), (2,))
    a, b = random_tensor(sa, dtype, 1), random_tensor(sb, dtype, 2)
    kw = {"transpose_a": ta, "adjoint_a": aa, "transpose_b": tb, "adjoint_b": ab}
    with tf.device(device):
        got = smm.matmul(a, b, **kw)
    want, bound = reference(a, b, **kw)
    assert got.dtype == dtype
    assert_close(got, want, dtype, bound)


BROADCASTS = [
    ((1, 4, 3), (6, 3, 5)),
    ((6, 4, 3), (1, 3, 5)),
    ((2, 1, 4, 3), (1, 5, 3, 2)),
    ((4, 3), (2, 1, 2, 3, 3, 5)),   # rank 2 with rank 6
    ((3, 1, 2, 1, 4, 3), (2, 1, 5, 3, 2)),
    ((7, 4, 3), (3, 5)),
    ((2, 3), (4, 1, 3, 5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sa,sb", BROADCASTS)
@pytest.mark.parametrize("dtype", [tf.float32, tf.complex128], ids=lambda d: d.name)
def test_batch_broadcasting(device, sa, sb, dtype):
    a, b = random_tensor(sa, dtype, 3), random_tensor(sb, dtype, 4)
    with tf.device(device):
        got = smm.matmul(a, b)
    want, bound = reference(a, b)
    assert_close(got, want, dtype, bound)


@pytest.mark.parametrize("size", range(1, 34))
@pytest.mark.parametrize("which", ["M", "N", "K"])
def test_every_size_up_to_33(size, which):
    m, n, k = {"M": (size, 5, 3), "N": (4, size, 6), "K": (3, 2, size)}[which]
    a, b = random_tensor((3, m, k), tf.float32, size), random_tensor((3, k, n), tf.float32, 7)
    want, bound = reference(a, b)
    assert_close(smm.matmul(a, b), want, tf.float32, bound)


@pytest.mark.parametrize("sa,sb,out", [
    ((0, 3, 4), (0, 4, 5), (0, 3, 5)),
    ((2, 3, 0), (2, 0, 5), (2, 3, 5)),     # K = 0 gives zeros
    ((3, 0), (0, 5), (3, 5)),
    ((0, 4), (4, 5), (0, 5)),
    ((2, 0, 3, 4), (1, 4, 5), (2, 0, 3, 5)),
])
def test_empty_and_k_zero(sa, sb, out):
    a, b = tf.ones(sa), tf.ones(sb)
    got = smm.matmul(a, b)
    assert got.shape == out
    np.testing.assert_array_equal(got.numpy(), tf.linalg.matmul(a, b).numpy())


def test_nan_and_inf_propagate_like_tf():
    a = tf.constant([[[np.nan, 1.0], [np.inf, 0.0], [1.0, -np.inf]]], tf.float32)
    b = tf.constant([[1.0, 0.0], [2.0, np.inf]], tf.float32)
    np.testing.assert_array_equal(smm.matmul(a, b).numpy(), tf.linalg.matmul(a, b).numpy())


def test_tf_function_and_static_shapes():
    a, b = random_tensor((4, 3, 5), tf.float32, 1), random_tensor((5, 2), tf.float32, 2)
    specs = [
        (tf.TensorSpec([None, 3, 5]), tf.TensorSpec([5, 2])),
        (tf.TensorSpec([None, None, None]), tf.TensorSpec([None, None])),
        (tf.TensorSpec(None), tf.TensorSpec(None)),
        (tf.TensorSpec([4, 3, 5]), tf.TensorSpec(None)),
    ]
    for spec in specs:
        ours = tf.function(smm.matmul).get_concrete_function(*spec)
        theirs = tf.function(tf.linalg.matmul).get_concrete_function(*spec)
        assert ours.output_shapes == theirs.output_shapes, spec
        assert "SmallMMBatchMatMul" in smallmm_ops(ours)
        np.testing.assert_allclose(ours(a, b), tf.linalg.matmul(a, b), rtol=1e-6, atol=1e-6)


def test_matvec_values_and_shapes():
    for dtype in DTYPES:
        a, x = random_tensor((3, 1, 6, 4), dtype, 1), random_tensor((5, 4), dtype, 2)
        w = wide(dtype)
        want = tf.linalg.matvec(tf.cast(a, w), tf.cast(x, w)).numpy()
        bound = np.abs(tf.linalg.matvec(tf.abs(tf.cast(a, w)), tf.abs(tf.cast(x, w))).numpy())
        assert_close(smm.matvec(a, x), want, dtype, bound)
        at = random_tensor((2, 4, 6), dtype, 3)
        got = smm.matvec(at, x[:2], adjoint_a=True)
        assert_close(got, tf.linalg.matvec(tf.cast(at, w), tf.cast(x[:2], w), adjoint_a=True),
                     dtype, np.abs(got.numpy()) + 10)
    spec = (tf.TensorSpec([None, 6, 4]), tf.TensorSpec([None]))
    ours = tf.function(smm.matvec).get_concrete_function(*spec)
    assert ours.output_shapes == tf.function(tf.linalg.matvec).get_concrete_function(
        *spec).output_shapes


# --------------------------------------------------------------------------- gradients
def _grads(fn, a, b, **kw):
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        y = fn(a, b, **kw)
        # A non-linear, complex-aware loss so every output element gets its own weight.
        re = tf.math.real(y)
        weights = tf.reshape(tf.cast(tf.range(tf.size(re)) % 7, re.dtype), tf.shape(re))
        loss = tf.reduce_sum(tf.math.real(y * tf.math.conj(y))) + tf.reduce_sum(re * weights)
    return tape.gradient(loss, [a, b])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("sa,sb", [((2, 4, 3), (2, 3, 5)), ((4, 3), (6, 3, 5)),
                                   ((2, 1, 4, 3), (1, 5, 3, 2)), ((7, 4, 3), (3, 5))])
@pytest.mark.parametrize("side_a,side_b", [(SIDES[0], SIDES[0]), (SIDES[1], SIDES[2]),
                                           (SIDES[2], SIDES[1]), (SIDES[2], SIDES[2])])
def test_gradients_match_tf(device, dtype, sa, sb, side_a, side_b):
    (ta, aa), (tb, ab) = side_a, side_b
    if ta or aa:
        sa = sa[:-2] + sa[-2:][::-1]
    if tb or ab:
        sb = sb[:-2] + sb[-2:][::-1]
    a, b = random_tensor(sa, dtype, 5), random_tensor(sb, dtype, 6)
    kw = {"transpose_a": ta, "adjoint_a": aa, "transpose_b": tb, "adjoint_b": ab}
    with tf.device(device):
        ours = _grads(smm.matmul, a, b, **kw)
    theirs = _grads(tf.linalg.matmul, a, b, **kw)
    for g, r, x in zip(ours, theirs, (a, b)):
        assert g.shape == x.shape
        assert_close(g, tf.cast(r, wide(dtype)).numpy(), dtype, np.abs(r.numpy()) * 4 + 10)


def test_numeric_gradient_float64():
    a = random_tensor((3, 1, 4, 3), tf.float64, 1)
    b = random_tensor((5, 3, 2), tf.float64, 2)
    for f in (lambda a, b: smm.matmul(a, b), lambda a, b: smm.matmul(b, a, transpose_a=True,
                                                                     transpose_b=True)):
        theoretical, numerical = tf.test.compute_gradient(f, [a, b])
        for t, n in zip(theoretical, numerical):
            np.testing.assert_allclose(t, n, rtol=1e-7, atol=1e-8)


def test_second_order_gradient():
    a, b = random_tensor((4, 2, 3), tf.float64, 1), random_tensor((3, 2), tf.float64, 2)

    def hess(fn):
        with tf.GradientTape() as t2:
            t2.watch(a)
            with tf.GradientTape() as t1:
                t1.watch(a)
                y = tf.reduce_sum(fn(a, b) ** 3)
            g = t1.gradient(y, a)
        return t2.gradient(g, a)

    np.testing.assert_allclose(hess(smm.matmul), hess(tf.linalg.matmul), rtol=1e-10)


def test_gradient_graph_uses_smallmm_and_reduces_in_kernel():
    @tf.function
    def step(w, x):
        with tf.GradientTape() as tape:
            tape.watch(w)
            y = smm.matmul(w, x)  # w [8, 8] broadcast over a batch of 1000
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, w)

    f = step.get_concrete_function(tf.TensorSpec([8, 8]), tf.TensorSpec([1000, 8, 8]))
    types = [op.type for op in f.graph.get_operations()]
    # Only w is watched: its gradient alone, as one reduce op (no Pair computing dx too).
    assert "SmallMMBatchMatMul" in types and "SmallMMBatchMatMulReduce" in types
    assert "SmallMMBatchMatMulPair" not in types
    # The broadcast weight's gradient is summed in the kernel: no per-batch dW then Sum.
    ops_ = f.graph.get_operations()
    reduce_op = next(op for op in ops_ if op.type == "SmallMMBatchMatMulReduce")
    assert reduce_op.outputs[0].shape == [8, 8]
    assert types.count("Sum") == 1 and "BroadcastTo" not in types  # the loss's own Sum


def test_capsule_sized_cases_use_the_kernel():
    f = tf.function(smm.matmul).get_concrete_function(tf.TensorSpec([1000, 8, 8]),
                                                       tf.TensorSpec([1000, 8, 8]))
    assert "SmallMMBatchMatMul" in smallmm_ops(f)
    g = tf.function(smm.matvec).get_concrete_function(tf.TensorSpec([900, 20, 20]),
                                                       tf.TensorSpec([900, 20]))
    assert "SmallMMBatchMatMul" in smallmm_ops(g)


# --------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("case", ["int32", "large", "sparse_flag", "output_type"])
def test_fallback_paths_match_builtin(case):
    if case == "int32":
        a, b, kw = tf.constant([[1, 2], [3, 4]]), tf.constant([[5], [6]]), {}
    elif case == "large":
        a, b, kw = random_tensor((2, 128, 96), tf.float32), random_tensor((96, 80), tf.float32), {}
    elif case == "sparse_flag":
        a, b, kw = random_tensor((4, 3), tf.float32), random_tensor((3, 2), tf.float32), {
            "a_is_sparse": True}
    else:
        a, b = tf.constant([[1, 2]], tf.int8), tf.constant([[3], [4]], tf.int8)
        kw = {"output_type": tf.int32}
    f = tf.function(lambda a, b: smm.matmul(a, b, **kw)).get_concrete_function(a, b)
    assert not smallmm_ops(f)
    np.testing.assert_allclose(f(a, b), tf.linalg.matmul(a, b, **kw), rtol=1e-6)


# B shared by every matrix of A, on the built-in: its forward is tf.linalg.matmul's op, its
# gradient one GEMM of A's rows stacked where TF's sums per-matrix products
# (linalg.builtin_matmul). (A, B shapes, flags of B, whether that gradient applies.)
TALL_BUILTIN = [((6, 1, 5), (5, 4), {}, True),  # M <= TALL_GRADIENT_MAX_M
                ((3, 2, 7, 20), (20, 16), {}, True),  # N >= M, K·N >= TALL_GRADIENT_MIN_KN
                ((2, 6, 16), (1, 16, 16), {}, True),  # B's batch axis of 1
                ((4, 3, 5), (1, 1, 4, 5), {"transpose_b": True}, True),  # output of B's rank
                ((5, 2, 4), (6, 4), {"adjoint_b": True}, True),
                ((4, 8, 16), (16, 4), {}, False),  # M = 8, K·N = 64: TF's own gradient
                ((3, 32, 32), (32, 8), {}, False)]  # N < M: TF's own gradient


def _on_builtin(monkeypatch):
    monkeypatch.setattr(dispatch, "choose", lambda *args, **kw: dispatch.BUILTIN)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("sa,sb,flags,folded", TALL_BUILTIN)
def test_b_shared_builtin_gradient(monkeypatch, dtype, sa, sb, flags, folded):
    _on_builtin(monkeypatch)
    a, b = random_tensor(sa, dtype, 3), random_tensor(sb, dtype, 4)
    step = tf.function(lambda a, b: _grads(smm.matmul, a, b, **flags))
    for ours in (_grads(smm.matmul, a, b, **flags), step(a, b)):
        theirs = _grads(tf.linalg.matmul, tf.cast(a, wide(dtype)), tf.cast(b, wide(dtype)),
                        **flags)
        for g, r, x in zip(ours, theirs, (a, b)):
            assert g.shape == x.shape and g.dtype == x.dtype
            assert_close(g, r.numpy(), dtype, np.abs(r.numpy()) * 4 + 10)
    # The forward is the built-in's op: the same bits, eagerly and in a tf.function.
    want = tf.linalg.matmul(a, b, **flags).numpy()
    np.testing.assert_array_equal(smm.matmul(a, b, **flags).numpy(), want)
    np.testing.assert_array_equal(tf.function(smm.matmul)(a, b, **flags).numpy(), want)
    # TF's gradient sums the per-matrix products over the broadcast axes (a Sum for each
    # operand); one GEMM does not.
    graph = step.get_concrete_function(a, b).graph
    sums = [op for op in graph.get_operations() if op.type == "Sum"]
    assert len(sums) == (2 if folded else 4)  # the loss's two, and TF's
    assert not smallmm_ops(graph)


def test_b_shared_builtin_gradient_unknown_batch_and_second_order(monkeypatch):
    _on_builtin(monkeypatch)
    a, b = random_tensor((7, 2, 5), tf.float64, 1), random_tensor((5, 3), tf.float64, 2)
    step = tf.function(lambda a, b: _grads(smm.matmul, a, b),
                       input_signature=[tf.TensorSpec([None, 2, 5], tf.float64),
                                        tf.TensorSpec([5, 3], tf.float64)])
    for g, r in zip(step(a, b), _grads(tf.linalg.matmul, a, b)):
        np.testing.assert_allclose(g, r, rtol=1e-12)

    def second(fn):
        with tf.GradientTape(persistent=True) as t2:
            t2.watch([a, b])
            with tf.GradientTape() as t1:
                t1.watch([a, b])
                y = tf.reduce_sum(fn(a, b) ** 3)
            ga, gb = t1.gradient(y, [a, b])
        return t2.gradient(ga, [a, b]) + t2.gradient(gb, [a, b])

    for g, r in zip(second(smm.matmul), second(tf.linalg.matmul)):
        np.testing.assert_allclose(g, r, rtol=1e-10)


def test_b_shared_builtin_gradient_not_under_builtin_ops(monkeypatch):
    # dispatch.builtin_ops() (and TF_SMALLMM_DISABLE) trace tf.linalg.matmul as it is.
    _on_builtin(monkeypatch)
    a, b = random_tensor((6, 1, 5), tf.float32, 1), random_tensor((5, 4), tf.float32, 2)
    with dispatch.builtin_ops():
        graph = tf.function(lambda a, b: _grads(smm.matmul, a, b)).get_concrete_function(
            a, b).graph
    assert len([op for op in graph.get_operations() if op.type == "Sum"]) == 4


def test_xla_compilation_falls_back_without_the_xla_kernels(monkeypatch):
    # With them our ops compile to custom calls (tests/test_xla.py).
    monkeypatch.setattr(dispatch, "xla_compiles_kernels", lambda: False)
    a, b = random_tensor((10, 4, 4), tf.float32, 1), random_tensor((10, 4, 4), tf.float32, 2)

    @tf.function(jit_compile=True)
    def f(a, b):
        with tf.GradientTape() as tape:
            tape.watch(a)
            y = smm.matmul(a, b)
        return y, tape.gradient(tf.reduce_sum(y), a)

    y, _ = f(a, b)
    np.testing.assert_allclose(y, tf.linalg.matmul(a, b), rtol=1e-5, atol=1e-6)
    assert not smallmm_ops(f.get_concrete_function(a, b))


@pytest.mark.slow
def test_disable_env_forces_builtin():
    out = run_python("""
        import tensorflow as tf, tf_smallmm as smm
        f = tf.function(smm.matmul).get_concrete_function(tf.TensorSpec([9, 4, 4]),
                                                          tf.TensorSpec([9, 4, 4]))
        print(sorted({op.type for op in f.graph.get_operations()}))
    """, env={"TF_SMALLMM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr
    assert "SmallMM" not in out.stdout and "BatchMatMulV2" in out.stdout


def test_name_is_honoured_and_flags_conflict_like_tf():
    @tf.function
    def f(a, b):
        return smm.matmul(a, b, name="my_product"), smm.matvec(a, b[..., 0], name="my_mv")

    g = f.get_concrete_function(tf.TensorSpec([2, 3, 3]), tf.TensorSpec([2, 3, 3])).graph
    names = {op.name: op.type for op in g.get_operations()}
    assert names.get("my_product") == "SmallMMBatchMatMul"
    assert any(n.startswith("my_mv/") for n in names)
    for kw in ({"transpose_a": True, "adjoint_a": True}, {"transpose_b": True, "adjoint_b": True}):
        with pytest.raises(ValueError, match="Only one of"):
            smm.matmul(tf.ones([2, 2]), tf.ones([2, 2]), **kw)


# --------------------------------------------------------------------------- bad input
# Each case runs in a subprocess: a crash fails the test instead of killing pytest.
BAD_INPUTS = [
    # (code producing the call, expected exception name, substring of the message)
    ("smm.matmul(tf.ones([2, 3]), tf.ones([4, 5]))", "InvalidArgumentError", "3"),
    ("smm.matmul(tf.ones([2, 2, 3]), tf.ones([2, 4, 5]))", "InvalidArgumentError", "[2,2,3]"),
    ("smm.matmul(tf.ones([3]), tf.ones([3, 2]))", "InvalidArgumentError", "ndims"),
    ("smm.matvec(tf.ones([3, 2]), tf.ones([]))", "InvalidArgumentError", ""),
    ("smm.matmul(tf.ones([2, 3, 4]), tf.ones([3, 4, 5]))", "InvalidArgumentError", "[2,3,4]"),
    ("smm.matmul(tf.ones([2, 2]), tf.ones([2, 2], tf.float64))", "InvalidArgumentError", "double"),
    ("smm.matmul(tf.ones([2, 2]), tf.ones([2, 2], tf.int32))", "InvalidArgumentError", "int32"),
    # Graph mode with unknown dims: the error comes from our kernel at run time.
    (("tf.function(smm.matmul, input_signature=[tf.TensorSpec([None, None, None]), "
      "tf.TensorSpec([None, None, None])])(tf.ones([2, 2, 3]), tf.ones([2, 4, 5]))"),
     "InvalidArgumentError", "[2,2,3]"),
    (("tf.function(smm.matmul, input_signature=[tf.TensorSpec(None), tf.TensorSpec(None)])"
      "(tf.ones([3]), tf.ones([3, 2]))"), "InvalidArgumentError", "ndims must be >= 2"),
    (("tf.function(smm.matmul, input_signature=[tf.TensorSpec([None, None, None]), "
      "tf.TensorSpec([None, None, None])])(tf.ones([2, 2, 3]), tf.ones([5, 3, 5]))"),
     "InvalidArgumentError", "must have compatible batch dimensions"),
    # Graph construction with known shapes: ValueError / TypeError like TF.
    ("tf.function(lambda: smm.matmul(tf.ones([2, 3]), tf.ones([4, 5])))()", "ValueError", ""),
    ("tf.function(lambda: smm.matmul(tf.ones([2, 2, 3]), tf.ones([5, 3, 5])))()", "ValueError", ""),
    ("tf.function(lambda: smm.matmul(tf.ones([2, 2]), tf.ones([2, 2], tf.float64)))()",
     "TypeError", ""),
]


@pytest.mark.slow
@pytest.mark.parametrize("call,exc,message", BAD_INPUTS)
def test_bad_input_raises_like_tf(call, exc, message):
    code = f"""
        import json, tensorflow as tf, tf_smallmm as smm
        def outcome(fn):
            try:
                fn()
                return ["ok", ""]
            except Exception as e:
                return [type(e).__name__, str(e)]
        ours = outcome(lambda: {call})
        theirs = outcome(lambda: {call.replace('smm.', 'tf.linalg.')})
        print(json.dumps([ours, theirs]))
    """
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    ours, theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert ours[0] == theirs[0] == exc, (ours, theirs)
    assert message in ours[1], ours[1]


# --------------------------------------------------------------------------- packaging
def test_build_info_and_every_dtype_has_a_kernel():
    from tensorflow.python.framework import kernels

    info = smm.build_info()
    assert info["kernels_loaded"] and info["tf_version"] == tf.__version__
    assert "baseline" in info["isas"] and info["active_isa"] in info["isas"]
    for op in ("SmallMMBatchMatMul", "SmallMMBatchMatMulReduce", "SmallMMBatchMatMulPair"):
        registered = {(k.device_type, c.allowed_values.list.type[0])
                      for k in kernels.get_registered_kernels_for_op(op).kernel
                      for c in k.constraint if c.name == "T"}
        cpu_types = {t for d, t in registered if d == "CPU"}
        assert {d.as_datatype_enum for d in DTYPES} == cpu_types, op


def test_op_type_attr_lists_exactly_the_registered_dtypes():
    from tensorflow.python.framework import op_def_registry

    for op in ("SmallMMBatchMatMul", "SmallMMBatchMatMulReduce", "SmallMMBatchMatMulPair"):
        op_def = op_def_registry.get(op)
        attr = next(a for a in op_def.attr if a.name == "T")
        assert set(attr.allowed_values.list.type) == {d.as_datatype_enum for d in DTYPES}


@pytest.mark.slow
def test_version_mismatch_warns_once_and_falls_back(tmp_path):
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"tf_version": "2.20.0"}))
    out = run_python(f"""
        import warnings, tensorflow as tf
        import tf_smallmm._core.loader as loader
        loader._INFO_PATH = {str(info)!r}
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import tf_smallmm as smm
            y = smm.matmul(tf.ones([3, 2, 2]), tf.ones([3, 2, 2]))
            y = smm.matmul(tf.ones([3, 2, 2]), tf.ones([3, 2, 2]))
        msgs = [str(x.message) for x in w if "TensorFlow" in str(x.message)]
        print(len(msgs)); print(msgs[0]); print(float(tf.reduce_sum(y)))
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    count, msg, total = out.stdout.strip().splitlines()[-3:]
    assert count == "1" and "2.20.0" in msg and tf.__version__ in msg and "pip install" in msg
    assert float(total) == 24.0


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64,
                                   tf.complex128], ids=lambda d: d.name)
def test_shared_weight_gradient_over_a_long_batch(dtype):
    # dW is one output summed over 1000 products: the op splits it into partial sums
    # across threads (fp16 / bf16 parts summed in float32, each rounded once).
    w, x = random_tensor((8, 8), dtype, 1), random_tensor((1000, 8, 8), dtype, 2)
    wx, ww = tf.cast(x, wide(dtype)), tf.cast(w, wide(dtype))
    want = _grads(tf.linalg.matmul, wx, ww)[1].numpy()
    # Forward error scale of dW = Σ_b x_bᵀ g_b: Σ_b |x_b|ᵀ |g_b|, with g = dloss/dy.
    with tf.GradientTape() as tape:
        y = tf.linalg.matmul(wx, ww)
        tape.watch(y)
        re = tf.math.real(y)
        weights = tf.reshape(tf.cast(tf.range(tf.size(re)) % 7, re.dtype), tf.shape(re))
        loss = tf.reduce_sum(tf.math.real(y * tf.math.conj(y))) + tf.reduce_sum(re * weights)
    g = tape.gradient(loss, y)
    bound = tf.reduce_sum(tf.linalg.matmul(tf.abs(wx), tf.abs(g), transpose_a=True), 0).numpy()
    assert_close(_grads(smm.matmul, x, w)[1], want, dtype, bound)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
@pytest.mark.parametrize("shapes", [((9000, 8, 8), (9000, 8, 64)),       # row kernel
                                    ((1152, 160, 8), (30, 1152, 8, 1))],  # column kernel
                         ids=["8x8@8x64", "capsule"])
@pytest.mark.usefixtures("on_kernels")
def test_outputs_over_16mib_are_exact(shapes, dtype):
    # Outputs of 16 MiB and more go to memory with non-temporal stores (TF's buffers are
    # 64-byte aligned, so every whole line takes that path), with a fence before the op
    # returns: the values must be exactly tf.matmul's on integer data, read from another op.
    a, b = (random_tensor(s, dtype, seed=i, integers=True) for i, s in enumerate(shapes))
    got = tf.function(lambda a, b: tf.reduce_sum(tf.abs(smm.matmul(a, b) - tf.linalg.matmul(a, b))))
    y = smm.matmul(a, b)
    assert y.shape.num_elements() * dtype.size >= 16 << 20
    assert "SmallMMBatchMatMul" in smallmm_ops(tf.function(smm.matmul).get_concrete_function(a, b))
    np.testing.assert_array_equal(y.numpy(), tf.linalg.matmul(a, b).numpy())
    assert float(got(a, b)) == 0.0


# --------------------------------------------------------------------------- perm attrs
PERMUTED = [  # x shape, perm_x, y shape, perm_y, perm_output, transpose_x, transpose_y
    ((2, 5, 3, 4), (0, 2, 1, 3), (2, 6, 3, 4), (0, 2, 3, 1), (0, 2, 1, 3), False, False),
    ((2, 3, 5, 6), (), (2, 6, 3, 4), (0, 2, 1, 3), (0, 2, 1, 3), False, False),
    ((4, 3, 2), (2, 0, 1), (2, 5, 4), (), (), True, True),
    ((3, 4), (1, 0), (3, 5), (), (1, 0), False, False),
]


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.complex128])
@pytest.mark.parametrize("xs,px,ys,py,po,tx,ty", PERMUTED)
def test_perm_attrs_read_and_write_through_strides(xs, px, ys, py, po, tx, ty, dtype):
    """The op with perm_x / perm_y / perm_output is tf.transpose, product, tf.transpose;
    its gradients are too (and are themselves permuted products)."""
    from tf_smallmm._core import engine

    x, y = random_tensor(xs, dtype, 1), random_tensor(ys, dtype, 2)

    def ours(x, y):
        return engine.product(x, y, transpose_x=tx, transpose_y=ty, perm_x=px, perm_y=py,
                              perm_output=po)

    def reference(x, y):
        a = tf.transpose(x, px) if px else x
        b = tf.transpose(y, py) if py else y
        c = tf.linalg.matmul(a, b, transpose_a=tx, transpose_b=ty)
        return tf.transpose(c, po) if po else c

    def with_grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            out = fn(x, y)
            loss = tf.reduce_sum(out * random_tensor(out.shape, dtype, 3))
        return [out] + tape.gradient(loss, [x, y])

    f = tf.function(lambda: with_grads(ours))
    for got, want in zip(f(), with_grads(reference)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    types = {op.type for op in f.get_concrete_function().graph.get_operations()}
    for fn in f.get_concrete_function().graph._functions.values():
        types |= {node.op for node in fn.definition.node_def}
    assert "Transpose" not in types and "SmallMMBatchMatMulPair" in types


@pytest.mark.parametrize("perms,message", [
    ({"perm_x": [0, 0, 1]}, r"perm_x must be empty or a permutation of \[0, 3\), got \[0,0,1\]"),
    ({"perm_y": [1, 0]}, r"perm_y has 2 axes but y has shape \[2,4,3\]"),
    ({"perm_output": [0, 1]}, r"not a permutation of the output's 3 axes"),
])
def test_bad_perm_attrs_raise(perms, message):
    from tf_smallmm._core import loader

    x, y = tf.ones([2, 3, 4]), tf.ones([2, 4, 3])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        loader.load().small_mm_batch_mat_mul(x, y, **perms)
