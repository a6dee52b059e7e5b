"""The SmallMM ops under XLA (tf.function(jit_compile=True)), where they compile to typed-FFI
custom calls that run the engine on XLA's buffers (cc/xla/).

Results and gradients equal the non-XLA path for every op, dtype and broadcast pattern;
the compiled HLO holds our custom calls (and no XLA dot); errors keep their class;
SavedModels with jit-compiled functions serve in a fresh process; a Keras model with
capsule layers trains with jit_compile=True; and where XLA cannot compile our ops (a
library without the XLA kernels, dtypes we lack, TF_SMALLMM_DISABLE=1) the built-ins run.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smallmm as smm
from conftest import (
    DTYPES,
    assert_close,
    random_tensor,
    run_python,
    small_capsnet,
    smallmm_ops,
    wide,
)
from test_dropins import FAST, inputs, sampled
from test_matmul import BROADCASTS, SIDES, shapes_for
from tf_smallmm import layers as caps
from tf_smallmm._core import dispatch, engine, loader
from tf_smallmm.capsules import routing

INFO = smm.build_info()
needs_xla = pytest.mark.skipif(not INFO["xla"], reason=f"built without the XLA kernels: "
                               f"{INFO.get('xla_missing')}")
MATMUL_CALL = 'custom_call_target="smallmm_batch_matmul"'
# Any of our custom calls. Not the bare word: HLO metadata carries source paths, and an
# install under a folder named after the project would match it.
ANY_CALL = 'custom_call_target="smallmm_'


def hlo(fn, *args):
    """The HLO that XLA compiles for jit-compiled `fn` on `args`."""
    return fn.experimental_get_compiler_ir(*args)(stage="hlo")


def step(fn):
    """fn's outputs and the gradients of a fixed weighting of them w.r.t. its inputs."""

    def run(*xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            ys = fn(*xs)
            ys = ys if isinstance(ys, (tuple, list)) else (ys,)
            loss = 0.0
            for y in ys:
                weights = tf.reshape(tf.sin(tf.range(tf.size(y), dtype=tf.float32)), tf.shape(y))
                loss += tf.reduce_sum(tf.cast(tf.math.real(y * tf.cast(weights, y.dtype)),
                                              tf.float32))
        return tuple(ys) + tuple(tape.gradient(loss, xs))

    return run


def compare(fn, *xs, target=MATMUL_CALL):
    """fn's step (outputs and gradients) under jit_compile equals the plain tf.function's,
    and its HLO calls `target` and has no dot of XLA's own."""
    plain = tf.function(step(fn))
    jit = tf.function(step(fn), jit_compile=True)
    assert smallmm_ops(plain.get_concrete_function(*xs)), "the plain path must use our ops"
    want, got = plain(*xs), jit(*xs)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, tf.cast(w, wide(w.dtype)).numpy(), w.dtype)
    text = hlo(jit, *xs)
    assert target in text
    assert " dot(" not in text
    return text


# --------------------------------------------------------------------------- the build
def test_build_info_says_whether_the_xla_kernels_were_built():
    if INFO["xla"]:
        assert INFO["xla_missing"] is None
        assert "Host" in INFO["xla_platforms"]
        assert ("CUDA" in INFO["xla_platforms"]) == bool(INFO["cuda"])
    else:
        assert INFO["xla_missing"] and INFO["xla_platforms"] == []


@pytest.mark.skipif(not INFO["cuda"], reason="library built without CUDA")
def test_cuda_build_registers_the_gpu_custom_call():
    # No GPU needed: XLA's FFI registry is asked for the "CUDA" handler by name.
    assert INFO["xla_platforms"] == ["Host", "CUDA"]


# --------------------------------------------------------------------------- matmul
def _flag_cases():
    """(dtype, side_a, side_b): every dtype with every flag pair; the fast tier runs the
    pairs with the same flags on both sides."""
    out = []
    for dtype in DTYPES:
        for sa in SIDES:
            for sb in SIDES:
                marks = [] if sa == sb else [pytest.mark.slow]
                out.append(pytest.param(dtype, sa, sb, marks=marks, id=f"{dtype.name}-{sa}-{sb}"))
    return out


@needs_xla
@pytest.mark.parametrize("dtype,side_a,side_b", _flag_cases())
@pytest.mark.usefixtures("on_kernels")
def test_matmul_every_dtype_and_flag(dtype, side_a, side_b):
    (ta, aa), (tb, ab) = side_a, side_b
    sa, sb = shapes_for(5, 3, 7, ta or aa, tb or ab, (4,), (4,))
    a, b = random_tensor(sa, dtype, 1), random_tensor(sb, dtype, 2)
    compare(lambda a, b: smm.matmul(a, b, transpose_a=ta, adjoint_a=aa, transpose_b=tb,
                                    adjoint_b=ab), a, b)


@needs_xla
@pytest.mark.parametrize("sa,sb", BROADCASTS)
@pytest.mark.parametrize("dtype", [tf.float32, pytest.param(tf.complex128, marks=pytest.mark.slow),
                                   pytest.param(tf.bfloat16, marks=pytest.mark.slow)],
                         ids=lambda d: d.name)
@pytest.mark.usefixtures("on_kernels")
def test_matmul_batch_broadcasting(sa, sb, dtype):
    # Broadcast operands get their gradients from the Reduce / Pair ops, compiled too. On
    # our kernels whatever the dispatch model says of these sizes (a bfloat16 [7, 4, 3] ·
    # [3, 5] is asked as the folded 28×3 · 3×5, which it gives to the built-in).
    a, b = random_tensor(sa, dtype, 3), random_tensor(sb, dtype, 4)
    text = compare(smm.matmul, a, b)
    assert text.count(MATMUL_CALL) >= 2


@needs_xla
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.complex64], ids=lambda d: d.name)
def test_reduce_and_pair_ops(dtype):
    x, y = random_tensor((3, 4, 2, 5), dtype, 5), random_tensor((4, 5, 6), dtype, 6)

    def ops(x, y):
        reduced = engine.product(x, y, batch_shape=[4])  # sums the leading axis in-kernel
        # Factors (tensor, transpose, conjugate, perm), then batch_shape and perm_output.
        pair = engine.product_pair(((x, False, False, ()), (y, False, False, ()), [1, 4], ()),
                                   ((y, True, True, ()), (x, True, False, ()), [3, 4], ()))
        return (reduced,) + tuple(pair)

    assert {"SmallMMBatchMatMulReduce", "SmallMMBatchMatMulPair"} <= smallmm_ops(
        tf.function(ops).get_concrete_function(x, y))
    compare(ops, x, y)


def _perm_attrs(fn, *xs):
    """The non-empty perm attrs of the SmallMM ops in fn's plain graph."""
    found = []
    for op in tf.function(fn).get_concrete_function(*xs).graph.get_operations():
        if op.type.startswith("SmallMM"):
            found += [a for a in ("perm_x", "perm_y", "perm_output") if op.get_attr(a)]
    return found


def compare_to_reference(fn, reference, *xs):
    """fn's step under jit_compile equals `reference`'s (TF ops) on wide copies of xs,
    and its HLO calls our matmul."""
    jit = tf.function(step(fn), jit_compile=True)
    got = jit(*xs)
    want = step(reference)(*(tf.cast(x, wide(x.dtype)) for x in xs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w.numpy(), g.dtype)
    assert MATMUL_CALL in hlo(jit, *xs)


@needs_xla
@pytest.mark.parametrize("equation,sx,sy", [
    ("btnh,bsnh->bnts", (2, 5, 3, 4), (2, 6, 3, 4)),
    ("bnts,bsnh->btnh", (2, 3, 5, 6), (2, 6, 3, 4)),
], ids=["scores", "context"])
@pytest.mark.parametrize("dtype", [tf.float32, pytest.param(tf.complex64, marks=pytest.mark.slow)],
                         ids=lambda d: d.name)
def test_einsum_with_interleaved_batch_axes(equation, sx, sy, dtype):
    """Attention's einsums, whose heads axis sits between the matrix axes, run as products
    read and written through the perm attrs; the XLA kernels apply the same permutations,
    forward and in the gradients (Pair ops with perms)."""
    x, y = random_tensor(sx, dtype, 13), random_tensor(sy, dtype, 14)

    def ours(a, b):
        return smm.einsum(equation, a, b)

    assert _perm_attrs(ours, x, y), "the plan must read or write through a permutation"
    compare(ours, x, y)
    compare_to_reference(ours, lambda a, b: tf.einsum(equation, a, b), x, y)


@needs_xla
def test_raw_permuted_products():
    """The matmul and reduce ops with every perm attr set, and their gradients, against
    the same products written with transposes."""
    x = random_tensor((2, 3, 5, 4), tf.float32, 15)  # read as [2, 5, 3, 4]: M=3, K=4
    y = random_tensor((5, 6, 2, 4), tf.float32, 16)  # read as [2, 5, 6, 4]: op(Y) [4, 6]
    px, py = (0, 2, 1, 3), (2, 0, 1, 3)

    def ours(x, y):
        full = engine.product(x, y, transpose_y=True, perm_x=px, perm_y=py,
                              perm_output=(1, 0, 3, 2))
        reduced = engine.product(x, y, transpose_y=True, batch_shape=[5], perm_x=px, perm_y=py,
                                 perm_output=(2, 0, 1))
        return full, reduced

    def reference(x, y):
        c = tf.matmul(tf.transpose(x, px), tf.transpose(y, py), transpose_b=True)
        return tf.transpose(c, (1, 0, 3, 2)), tf.transpose(tf.reduce_sum(c, 0), (2, 0, 1))

    assert len(_perm_attrs(ours, x, y)) == 6
    compare(ours, x, y)
    compare_to_reference(ours, reference, x, y)


@needs_xla
@pytest.mark.parametrize("sa,sb", [((0, 3, 4), (0, 4, 2)), ((2, 3, 0), (2, 0, 4)),
                                   ((2, 0, 4), (4, 5))], ids=["empty-batch", "K=0", "M=0"])
def test_empty_products(sa, sb):
    a, b = random_tensor(sa, tf.float32, 7), random_tensor(sb, tf.float32, 8)
    compare(smm.matmul, a, b)


@needs_xla
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
def test_threads_and_split_reductions(dtype):
    # Big enough to shard over XLA's pool; b's gradient sums 3000 products into one
    # output, which runs as partial sums in heap scratch.
    a, b = random_tensor((3000, 8, 8), dtype, 9), random_tensor((8, 8), dtype, 10)
    compare(smm.matmul, a, b)


# --------------------------------------------------------------------------- drop-ins
@needs_xla
@pytest.mark.parametrize("case", sampled(FAST), ids=str)
@pytest.mark.usefixtures("on_kernels")
def test_dropins(case):
    xs = inputs(case, tf.float32)
    if any(0 in s for s in case.shapes):
        pytest.skip("empty operands: test_empty_products")
    compare(case.ours, *xs)


# --------------------------------------------------------------------------- capsules
@needs_xla
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.float16, tf.bfloat16],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(3, 7, 4, 16), (2, 17, 2, 3), (1, 1, 1, 1)], ids=str)
def test_dynamic_routing(dtype, shape):
    u = random_tensor(shape, dtype, 11)
    text = compare(lambda u: routing.dynamic_routing(u, 3), u,
                   target='custom_call_target="smallmm_dynamic_routing"')
    assert 'custom_call_target="smallmm_dynamic_routing_grad"' in text


@needs_xla
def test_capsule_layer_step():
    layer = caps.CapsuleLayer(5, 8, routings=3)
    u = random_tensor((6, 20, 4), tf.float32, 12)
    layer.build(u.shape)
    text = compare(lambda u, w: routing.dynamic_routing(caps.predict(u, w), 3), u,
                   tf.convert_to_tensor(layer.kernel))
    assert 'custom_call_target="smallmm_dynamic_routing_grad"' in text


@needs_xla
def test_layers_support_jit():
    for layer in (caps.CapsulePredict(3, 4), caps.DynamicRouting(2), caps.CapsuleLayer(3, 4)):
        assert layer.supports_jit is True


@needs_xla
def test_keras_model_trains_with_jit_compile():
    model = small_capsnet()
    model.compile(keras.optimizers.Adam(1e-2), caps.margin_loss, jit_compile=True)
    assert model.jit_compile is True
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (32, 6, 6, 1)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 32), 3)
    capsule = next(layer for layer in model.layers if isinstance(layer, caps.CapsuleLayer))
    before = capsule.kernel.numpy().copy()
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert np.abs(capsule.kernel.numpy() - before).max() > 1e-4

    # The same training step, jit-compiled by hand: our custom calls, forward and backward.
    @tf.function(jit_compile=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(caps.margin_loss(y, model(x, training=True)))
        return loss, tape.gradient(loss, capsule.kernel)

    text = hlo(train_step, tf.constant(x[:16]), tf.constant(y[:16], tf.float32))
    for target in ("smallmm_batch_matmul", "smallmm_dynamic_routing",
                   "smallmm_dynamic_routing_grad"):
        assert f'custom_call_target="{target}"' in text


# --------------------------------------------------------------------------- errors
@needs_xla
def test_static_shape_errors_keep_their_class():
    a, b = tf.ones([2, 3, 4]), tf.ones([2, 5, 6])
    for jit in (False, True):
        with pytest.raises(ValueError, match="Dimensions must be equal|size-incompatible"):
            tf.function(lambda a, b: engine.product(a, b), jit_compile=jit)(a, b)


@needs_xla
@pytest.mark.parametrize("jit", [False, True])
def test_shape_errors_known_only_when_compiling_are_invalid_argument(jit):
    spec = tf.TensorSpec([None, None, None], tf.float32)
    f = tf.function(lambda a, b: engine.product(a, b), jit_compile=jit,
                    input_signature=[spec, spec])
    with pytest.raises(tf.errors.InvalidArgumentError, match="Matrix size-incompatible"):
        f(tf.ones([2, 3, 4]), tf.ones([2, 5, 6]))
    g = tf.function(lambda u, gv: loader.load().small_mm_dynamic_routing_grad(u, gv),
                    jit_compile=jit, input_signature=[tf.TensorSpec(None, tf.float32)] * 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="grad_v must have shape"):
        g(tf.ones([2, 3, 4, 5]), tf.ones([2, 4, 4]))


@needs_xla
def test_batch_shape_must_be_a_compile_time_constant():
    # Our wrappers pass static shapes. A batch_shape given as an argument becomes a
    # compile-time constant (XLA compiles per value); one that depends on the data cannot,
    # an InvalidArgumentError, as for XLA's own ops with shape inputs.
    x, y = random_tensor((3, 2, 2), tf.float32, 15), random_tensor((3, 2, 2), tf.float32, 16)

    @tf.function(jit_compile=True)
    def f(x, y, n):
        return engine.product(x, y, batch_shape=tf.reshape(n, [1]))

    want = tf.reduce_sum(tf.linalg.matmul(x, y), 0, keepdims=True)
    assert_close(f(x, y, tf.constant(1)), tf.cast(want, tf.float64).numpy(), tf.float32)

    @tf.function(jit_compile=True)
    def g(x, y):
        n = tf.shape(tf.where(x[:, 0, 0] > 100))[0] + 1
        return engine.product(x, y, batch_shape=tf.reshape(n, [1]))

    with pytest.raises(tf.errors.InvalidArgumentError, match="compile-time constant"):
        g(x, y)


# --------------------------------------------------------------------------- fallbacks
def test_without_the_xla_kernels_the_builtins_run(monkeypatch):
    monkeypatch.setattr(dispatch, "xla_compiles_kernels", lambda: False)
    a, b = random_tensor((10, 4, 4), tf.float32, 1), random_tensor((10, 4, 4), tf.float32, 2)
    u = random_tensor((2, 6, 3, 8), tf.float32, 3)

    @tf.function(jit_compile=True)
    def f(a, b, u):
        return smm.matmul(a, b), routing.dynamic_routing(u, 3)

    assert not smallmm_ops(f.get_concrete_function(a, b, u))
    assert ANY_CALL not in hlo(f, a, b, u)
    y, v = f(a, b, u)
    np.testing.assert_allclose(y, tf.linalg.matmul(a, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, routing.dynamic_routing_reference(u, 3), rtol=1e-5, atol=1e-6)
    assert caps.CapsuleLayer(3, 4).supports_jit is False


@needs_xla
def test_dtypes_without_kernels_fall_back_under_xla():
    a, b = tf.constant([[[1, 2], [3, 4]]]), tf.constant([[[5], [6]]])
    f = tf.function(lambda a, b: smm.matmul(a, b), jit_compile=True)
    assert ANY_CALL not in hlo(f, a, b)
    np.testing.assert_array_equal(f(a, b), tf.linalg.matmul(a, b))


@pytest.mark.slow
def test_disable_env_forces_builtins_under_xla():
    out = run_python(f"""
        import tensorflow as tf, tf_smallmm as smm
        f = tf.function(lambda a, b: smm.matmul(a, b), jit_compile=True)
        a = tf.ones([9, 4, 4])
        print({ANY_CALL!r} in f.experimental_get_compiler_ir(a, a)(stage="hlo"))
    """, env={"TF_SMALLMM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


# --------------------------------------------------------------------------- serving
class _Jitted(tf.Module):
    def __init__(self):
        super().__init__()
        self.layer = caps.CapsuleLayer(3, 4, routings=2)
        self.layer.build((None, 5, 6))

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None, 5, 6], tf.float32),
                                                    tf.TensorSpec([None, 4, 4], tf.float32)])
    def serve(self, u, a):
        return {"v": self.layer(u), "aa": smm.matmul(a, a, adjoint_b=True)}


@needs_xla
@pytest.mark.slow
def test_saved_model_with_jit_compiled_function_serves_in_a_fresh_process(tmp_path):
    module = _Jitted()
    u, a = random_tensor((3, 5, 6), tf.float32, 13), random_tensor((7, 4, 4), tf.float32, 14)
    want = module.serve(u, a)
    assert 'custom_call_target="smallmm_dynamic_routing"' in hlo(module.serve, u, a)
    tf.saved_model.save(module, str(tmp_path / "jit"))
    assert {"SmallMMBatchMatMul", "SmallMMDynamicRouting"} <= caps.smallmm_ops_in_saved_model(
        str(tmp_path / "jit"))
    np.save(tmp_path / "u.npy", u.numpy())
    np.save(tmp_path / "a.npy", a.numpy())
    out = run_python(f"""
        import json, numpy as np, tensorflow as tf
        import tf_smallmm
        d = {str(tmp_path)!r}
        loaded = tf.saved_model.load(d + "/jit")
        u, a = np.load(d + "/u.npy"), np.load(d + "/a.npy")
        got = loaded.serve(tf.constant(u), tf.constant(a))
        ir = loaded.serve.experimental_get_compiler_ir(tf.constant(u), tf.constant(a))("hlo")
        print(json.dumps({{"v": got["v"].numpy().tolist(), "aa": got["aa"].numpy().tolist(),
                          "custom_call": {MATMUL_CALL!r} in ir}}))
    """, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["v"], want["v"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["aa"], want["aa"], rtol=1e-6, atol=1e-7)
    assert got["custom_call"]
