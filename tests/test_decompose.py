"""Spec of tf_smallmm.decompose: layer factorisations, VBMF rank estimation, model rewriting.

Exactness is checked against the original layer (or, for CP, against a plain Conv2D holding
the CP kernel the new layers represent) in float64, with per-dtype tolerances from `tol`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_smallmm.decompose import (
    DecompositionReport,
    decompose_conv2d,
    decompose_dense,
    decompose_model,
    estimate_rank,
)

# ----------------------------------------------------------------------------- helpers


def tol(dtype):
    """Max abs error allowed, relative to the largest reference output, per dtype."""
    return {"float64": 1e-10, "float32": 2e-5}[dtype]


def to_np(x):
    """NumPy copy of a tensor or variable (np.array(variable) warns under NumPy 2)."""
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def run_chain(layers, x):
    for layer in layers:
        x = layer(x)
    return to_np(x)


def assert_close(actual, expected, dtype, factor=1.0):
    actual, expected = to_np(actual).astype(np.float64), to_np(expected).astype(np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(actual - expected))) / scale
    assert err <= factor * tol(dtype), f"max relative error {err:.3g}"


def make_dense(m, n, *, dtype="float64", activation="tanh", use_bias=True, seed=0):
    rng = np.random.default_rng(seed)
    layer = keras.layers.Dense(n, activation=activation, use_bias=use_bias, dtype=dtype)
    layer.build((None, m))
    layer.kernel.assign(rng.standard_normal((m, n)).astype(dtype))
    if use_bias:
        layer.bias.assign(rng.standard_normal(n).astype(dtype))
    return layer


def make_conv(
    S,
    T,
    kernel_size=(3, 3),
    *,
    strides=(1, 1),
    padding="same",
    dilation_rate=(1, 1),
    data_format="channels_last",
    dtype="float64",
    kernel=None,
    seed=0,
):
    rng = np.random.default_rng(seed)
    layer = keras.layers.Conv2D(
        T,
        kernel_size,
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        data_format=data_format,
        activation="tanh",
        dtype=dtype,
    )
    layer.build(conv_input_shape(S, data_format, batch=None, hw=(None, None)))
    if kernel is None:
        kernel = rng.standard_normal(tuple(layer.kernel.shape))
    layer.kernel.assign(kernel.astype(dtype))
    layer.bias.assign(rng.standard_normal(T).astype(dtype))
    return layer


def conv_input_shape(S, data_format, batch=2, hw=(9, 10)):
    if data_format == "channels_first":
        return (batch, S, *hw)
    return (batch, *hw, S)


def conv_input(S, data_format, dtype, hw=(9, 10), seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(conv_input_shape(S, data_format, hw=hw)).astype(dtype)


def reference_or_skip(layer, x):
    try:
        return to_np(layer(x))
    except tf.errors.UnimplementedError as err:  # e.g. NCHW convolution on some CPU builds
        pytest.skip(f"{layer.data_format} {layer.dtype} conv unsupported here: {err.message[:80]}")


def planted_cp_kernel(shape, rank, seed):
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((n, rank)) for n in shape]
    return np.einsum("hr,wr,sr,tr->hwst", *factors)


def cp_kernel_of(layers):
    """The (kh, kw, S, T) kernel that a CP chain from decompose_conv2d represents."""
    first, *spatial, last = layers
    A_s = to_np(first.kernel)[0, 0]  # (S, R)
    A_t = to_np(last.kernel)[0, 0].T  # (T, R)
    kernels = [to_np(layer.kernel) for layer in spatial]
    if len(kernels) == 2:  # depthwise kh x 1 then 1 x kw
        outer = np.einsum("hr,wr->hwr", kernels[0][:, 0, :, 0], kernels[1][0, :, :, 0])
    elif isinstance(spatial[0], keras.layers.DepthwiseConv2D):  # (kh, kw, R, 1)
        outer = kernels[0][:, :, :, 0]
    else:  # grouped Conv2D (kh, kw, 1, R)
        outer = kernels[0][:, :, 0, :]
    return np.einsum("hwr,sr,tr->hwst", outer, A_s, A_t)


def rel_error(kernel, approx):
    kernel = to_np(kernel)
    return float(np.linalg.norm(approx - kernel) / np.linalg.norm(kernel))


def tucker_kernel_of(layers):
    first, core, last = (to_np(layer.kernel) for layer in layers)
    return np.einsum("hwab,sa,tb->hwst", core, first[0, 0], last[0, 0].T)


# Stride / padding / dilation / kernel-size families shared by the conv tests.
CONV_GEOMETRIES = [
    pytest.param({"kernel_size": (3, 3)}, id="3x3"),
    pytest.param({"kernel_size": (3, 3), "padding": "valid"}, id="3x3-valid"),
    pytest.param({"kernel_size": (3, 3), "strides": (2, 2)}, id="3x3-same-s2"),
    pytest.param({"kernel_size": (3, 3), "strides": (2, 2), "padding": "valid"}, id="3x3-valid-s2"),
    pytest.param({"kernel_size": (2, 4), "strides": (2, 2)}, id="2x4-same-s2"),
    pytest.param({"kernel_size": (3, 3), "strides": (3, 3)}, id="3x3-same-s3"),
    pytest.param({"kernel_size": (3, 2), "strides": (2, 1)}, id="3x2-same-s21"),
    pytest.param(
        {"kernel_size": (3, 2), "strides": (1, 3), "padding": "valid"}, id="3x2-valid-s13"
    ),
    pytest.param({"kernel_size": (3, 3), "dilation_rate": (2, 2)}, id="3x3-same-d2"),
    pytest.param(
        {"kernel_size": (3, 3), "dilation_rate": (1, 2), "padding": "valid"}, id="3x3-d12"
    ),
    pytest.param({"kernel_size": (1, 3)}, id="1x3"),
    pytest.param({"kernel_size": (1, 1), "strides": (2, 2)}, id="1x1-s2"),
]
INPUT_SIZES = [(9, 10), (8, 11)]  # odd and even: "same" + stride pads by size mod stride


# ----------------------------------------------------------------------------- dense


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("m,n", [(12, 7), (5, 16), (9, 9)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_full_rank_reproduces_layer(dtype, m, n, use_bias):
    layer = make_dense(m, n, dtype=dtype, use_bias=use_bias)
    x = np.random.default_rng(1).standard_normal((6, 3, m)).astype(dtype)  # rank-3 input
    first, second = decompose_dense(layer)
    assert first.units == min(m, n) and not first.use_bias
    assert second.activation is layer.activation and second.use_bias == use_bias
    assert_close(run_chain([first, second], x), layer(x), dtype)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_dense_rank_sets_shapes_and_params(rank):
    m, n = 10, 6
    layers = decompose_dense(make_dense(m, n), rank)
    assert [tuple(layer.kernel.shape) for layer in layers] == [(m, rank), (rank, n)]
    assert sum(layer.count_params() for layer in layers) == rank * (m + n) + n


def test_dense_error_is_eckart_young_and_decreases_with_rank():
    layer = make_dense(20, 12)
    W = to_np(layer.kernel)
    s = np.linalg.svd(W, compute_uv=False)
    errors = []
    for rank in range(1, 13):
        first, second = decompose_dense(layer, rank)
        approx = to_np(first.kernel) @ to_np(second.kernel)
        errors.append(rel_error(W, approx))
        expected = np.sqrt(np.sum(s[rank:] ** 2)) / np.linalg.norm(W)
        assert errors[-1] == pytest.approx(expected, abs=1e-12)
    assert all(a > b for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_dense_energy_rank_is_smallest_keeping_energy(energy):
    layer = make_dense(16, 10)
    s2 = np.linalg.svd(to_np(layer.kernel), compute_uv=False) ** 2
    kept = np.cumsum(s2) / np.sum(s2)
    rank = decompose_dense(layer, energy)[0].units
    assert kept[rank - 1] >= energy - 1e-12
    assert rank == 1 or kept[rank - 2] < energy


def test_dense_vbmf_finds_planted_rank():
    rng = np.random.default_rng(3)
    layer = make_dense(64, 48)
    W = rng.standard_normal((64, 5)) @ rng.standard_normal((5, 48)) + 0.01 * rng.standard_normal(
        (64, 48)
    )
    layer.kernel.assign(W)
    assert decompose_dense(layer, "vbmf")[0].units == 5


# ----------------------------------------------------------------------------- Tucker-2


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
@pytest.mark.parametrize("hw", INPUT_SIZES)
def test_tucker_full_rank_reproduces_layer(geometry, hw):
    layer = make_conv(4, 6, **geometry)
    x = conv_input(4, "channels_last", "float64", hw=hw)
    layers = decompose_conv2d(layer, "tucker")
    assert [type(new).__name__ for new in layers] == ["Conv2D"] * 3
    assert_close(run_chain(layers, x), layer(x), "float64")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES[:3] + CONV_GEOMETRIES[6:9])
def test_tucker_full_rank_float32_both_layouts(data_format, geometry):
    layer = make_conv(5, 3, data_format=data_format, dtype="float32", **geometry)
    x = conv_input(5, data_format, "float32")
    expected = reference_or_skip(layer, x)
    assert_close(run_chain(decompose_conv2d(layer, "tucker"), x), expected, "float32")


def test_tucker_ranks_shape_the_layers():
    layer = make_conv(8, 12)
    first, core, last = decompose_conv2d(layer, "tucker", ranks=(3, 5))
    assert tuple(first.kernel.shape) == (1, 1, 8, 3)
    assert tuple(core.kernel.shape) == (3, 3, 3, 5)
    assert tuple(last.kernel.shape) == (1, 1, 5, 12)
    assert not first.use_bias and not core.use_bias and last.use_bias
    assert core.strides == layer.strides and core.padding == layer.padding


def test_tucker_error_decreases_with_rank():
    layer = make_conv(8, 8, seed=4)
    errors = [
        rel_error(layer.kernel, tucker_kernel_of(decompose_conv2d(layer, "tucker", ranks=r)))
        for r in range(1, 9)
    ]
    assert errors[-1] < 1e-12
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_tucker_vbmf_finds_planted_multilinear_ranks():
    rng = np.random.default_rng(5)
    core = rng.standard_normal((3, 3, 4, 6))
    U = np.linalg.qr(rng.standard_normal((32, 4)))[0]
    V = np.linalg.qr(rng.standard_normal((48, 6)))[0]
    kernel = 10 * np.einsum("hwab,sa,tb->hwst", core, U, V)
    kernel += 0.01 * rng.standard_normal(kernel.shape)
    layer = make_conv(32, 48, kernel=kernel)
    _, middle, _ = decompose_conv2d(layer, "tucker", ranks="vbmf")
    assert tuple(middle.kernel.shape) == (3, 3, 4, 6)


def test_tucker_is_no_worse_than_tensorly_partial_tucker():
    tensorly = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    layer = make_conv(10, 12, seed=6)
    kernel = to_np(layer.kernel)
    ours = rel_error(kernel, tucker_kernel_of(decompose_conv2d(layer, "tucker", ranks=(4, 5))))
    with tensorly.backend_context("numpy"):
        (core, factors), _ = partial_tucker(kernel, rank=[4, 5], modes=[2, 3], init="svd")
    theirs = rel_error(kernel, np.einsum("hwab,sa,tb->hwst", core, *factors))
    assert ours <= theirs + 1e-6


# ----------------------------------------------------------------------------- CP


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
@pytest.mark.parametrize("hw", INPUT_SIZES)
def test_cp_layers_compute_exactly_their_cp_kernel(geometry, hw):
    pytest.importorskip("tensorly")
    layer = make_conv(4, 6, **geometry)
    layers = decompose_conv2d(layer, "cp", ranks=3)  # 1x1, 4 -> 6 allows at most 4
    reference = keras.layers.Conv2D.from_config(layer.get_config())
    reference.build(conv_input_shape(4, "channels_last"))
    reference.set_weights([cp_kernel_of(layers), to_np(layer.bias)])
    x = conv_input(4, "channels_last", "float64", hw=hw)
    assert_close(run_chain(layers, x), reference(x), "float64")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(
    "geometry", [CONV_GEOMETRIES[0], CONV_GEOMETRIES[2], CONV_GEOMETRIES[3], CONV_GEOMETRIES[8]]
)
def test_cp_planted_kernel_float32_both_layouts(data_format, geometry):
    pytest.importorskip("tensorly")
    kernel = planted_cp_kernel((3, 3, 6, 8), 3, seed=7)
    layer = make_conv(6, 8, data_format=data_format, dtype="float32", kernel=kernel, **geometry)
    x = conv_input(6, data_format, "float32")
    expected = reference_or_skip(layer, x)
    assert_close(run_chain(decompose_conv2d(layer, "cp", ranks=3), x), expected, "float32", 10)


@pytest.mark.parametrize(
    "shape,rank", [((3, 3, 4, 6), 3), ((3, 3, 16, 16), 4), ((5, 2, 4, 6), 3), ((3, 3, 32, 8), 6)]
)
def test_cp_recovers_planted_rank(shape, rank):
    pytest.importorskip("tensorly")
    kernel = planted_cp_kernel(shape, rank, seed=8)
    layer = make_conv(shape[2], shape[3], shape[:2], kernel=kernel)
    layers = decompose_conv2d(layer, "cp", ranks=rank)
    assert tuple(layers[0].kernel.shape) == (1, 1, shape[2], rank)
    assert rel_error(kernel, cp_kernel_of(layers)) < 1e-6
    x = conv_input(shape[2], "channels_last", "float64")
    assert_close(run_chain(layers, x), layer(x), "float64", factor=1e4)


def test_cp_error_decreases_with_rank():
    pytest.importorskip("tensorly")
    layer = make_conv(8, 8, seed=9)
    errors = [
        rel_error(layer.kernel, cp_kernel_of(decompose_conv2d(layer, "cp", ranks=r)))
        for r in (1, 4, 16, 64)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-3


def test_cp_params():
    pytest.importorskip("tensorly")
    layers = decompose_conv2d(make_conv(16, 24), "cp", ranks=7)
    assert sum(layer.count_params() for layer in layers) == 7 * (16 + 3 + 3 + 24) + 24


def test_cp_without_tensorly_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorly", None)
    with pytest.raises(ImportError, match="pip install"):
        decompose_conv2d(make_conv(4, 4), "cp", ranks=2)


# ----------------------------------------------------------------------------- VBMF


@pytest.mark.parametrize(
    "L,M,rank,noise",
    [
        (20, 30, 3, 0.01),
        (64, 64, 8, 0.1),
        (100, 40, 5, 1.0),
        pytest.param(256, 576, 16, 0.5, marks=pytest.mark.slow),  # a real layer's size
        (30, 200, 1, 1.0),
        (50, 50, 10, 0.3),
        (9, 300, 2, 0.05),
    ],
)
def test_vbmf_recovers_planted_rank(L, M, rank, noise):
    rng = np.random.default_rng(L * M + rank)
    U = np.linalg.qr(rng.standard_normal((L, rank)))[0]
    V = np.linalg.qr(rng.standard_normal((M, rank)))[0]
    # Signal singular values 2-6x the largest singular value of the noise (its bulk edge).
    edge = noise * (np.sqrt(L) + np.sqrt(M))
    signal = U @ np.diag(edge * rng.uniform(2, 6, rank)) @ V.T
    Y = signal + noise * rng.standard_normal((L, M))
    assert estimate_rank(Y) == rank
    assert estimate_rank(Y.T) == rank


def test_vbmf_pure_noise_and_zero():
    rng = np.random.default_rng(10)
    assert estimate_rank(rng.standard_normal((40, 60))) == 0
    assert estimate_rank(np.zeros((5, 7))) == 0


def test_vbmf_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        estimate_rank(np.zeros((2, 3, 4)))


# ----------------------------------------------------------------------------- errors


def _dense_named(name):
    layer = keras.layers.Dense(4, name=name)
    layer.build((None, 6))
    return layer


def _conv_named(name, cls=keras.layers.Conv2D, **kwargs):
    layer = cls(4, 3, name=name, **kwargs)
    layer.build((None, 8, 8, 4))
    return layer


@pytest.mark.parametrize("rank", [0, -1, 5, 1.5, 0.0, True, "auto"])
def test_dense_bad_rank_names_layer(rank):
    with pytest.raises(ValueError, match="my_dense"):
        decompose_dense(_dense_named("my_dense"), rank)


@pytest.mark.parametrize(
    "ranks", [0, 5, (4, 0), (5, 4), (1, 2, 3), "auto", -0.5], ids=lambda r: repr(r)
)
def test_tucker_bad_ranks_name_layer(ranks):
    with pytest.raises(ValueError, match="my_conv"):
        decompose_conv2d(_conv_named("my_conv"), "tucker", ranks=ranks)


@pytest.mark.parametrize("ranks", [0, 37, 0.5, (2, 2)], ids=lambda r: repr(r))
def test_cp_bad_ranks_name_layer(ranks):
    pytest.importorskip("tensorly")
    with pytest.raises(ValueError, match="my_conv"):
        decompose_conv2d(_conv_named("my_conv"), "cp", ranks=ranks)


@pytest.mark.parametrize(
    "make,call",
    [
        (lambda: _conv_named("bad", groups=2), lambda l: decompose_conv2d(l)),
        (lambda: _conv_named("bad", keras.layers.Conv2DTranspose), lambda l: decompose_conv2d(l)),
        (lambda: _dense_named("bad"), lambda l: decompose_conv2d(l)),
        (lambda: _conv_named("bad"), lambda l: decompose_dense(l)),
        (lambda: _conv_named("bad"), lambda l: decompose_conv2d(l, method="svd")),
    ],
    ids=["groups", "transposed", "dense-as-conv", "conv-as-dense", "bad-method"],
)
def test_unsupported_layers_name_layer(make, call):
    with pytest.raises(ValueError, match="bad"):
        call(make())


def test_depthwise_is_unsupported():
    layer = keras.layers.DepthwiseConv2D(3, name="dw")
    layer.build((None, 8, 8, 4))
    with pytest.raises(ValueError, match="'dw'"):
        decompose_conv2d(layer)


def test_unbuilt_layer_is_rejected():
    with pytest.raises(ValueError, match="not built"):
        decompose_dense(keras.layers.Dense(3, name="lazy"))


# ----------------------------------------------------------------------------- models


def small_cnn(dtype="float32"):
    rng = np.random.default_rng(11)
    inputs = keras.Input((10, 10, 6), dtype=dtype)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv1", dtype=dtype)(
        inputs
    )
    x = keras.layers.BatchNormalization(name="bn", dtype=dtype)(x)
    a = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="conv2", dtype=dtype)(x)
    b = keras.layers.Conv2D(16, 1, strides=2, name="shortcut", dtype=dtype)(x)
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(24, activation="relu", name="fc", dtype=dtype)(x)
    outputs = keras.layers.Dense(5, name="head", dtype=dtype)(x)
    model = keras.Model(inputs, outputs, name="small_cnn")
    # Non-trivial BN statistics, so that copying them matters.
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.standard_normal(12).astype(dtype))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 12).astype(dtype))
    return model


def model_input(dtype="float32"):
    return np.random.default_rng(12).standard_normal((3, 10, 10, 6)).astype(dtype)


def test_model_full_rank_reproduces_outputs_and_copies_layers():
    model = small_cnn("float64")
    x = model_input("float64")
    policy = {"Conv2D": {"method": "tucker"}, "Dense": {"rank": None}}
    new, report = decompose_model(model, policy, allow_growth=True, measure_latency=False)
    assert_close(new(x, training=False), model(x, training=False), "float64")
    assert {row["layer"] for row in report} == {"conv1", "conv2", "shortcut", "fc", "head"}
    assert all(row["rel_error"] < 1e-12 for row in report)
    # Untouched layers are copies holding the same weights, not the same objects.
    assert new.get_layer("bn") is not model.get_layer("bn")
    for w_new, w_old in zip(new.get_layer("bn").get_weights(), model.get_layer("bn").get_weights()):
        np.testing.assert_array_equal(w_new, w_old)
    assert "conv1" in [layer.name for layer in model.layers]  # the original is unchanged


def test_model_policy_by_name_type_callable_and_min_params():
    model = small_cnn()
    policy = {"Dense": {"rank": 4}, "conv2": {"method": "tucker", "ranks": (4, 4)}}
    new, report = decompose_model(model, policy, min_params=200, measure_latency=False)
    assert [row["layer"] for row in report] == ["conv2", "fc"]  # head (125 params) < 200
    assert ("head", "125 params < min_params=200") in report.skipped
    names = [layer.name for layer in new.layers]
    assert "conv2_tucker_core" in names and "fc_svd_in" in names and "head" in names
    # A name in the dict is a request, whatever its size.
    _, report = decompose_model(
        model, {"head": {"rank": 2}}, min_params=10**6, measure_latency=False
    )
    assert [row["layer"] for row in report] == ["head"]

    def policy_fn(layer):
        return {"rank": 3} if layer.name == "fc" else None

    _, report = decompose_model(model, policy_fn, measure_latency=False)
    assert [row["layer"] for row in report] == ["fc"]


def test_model_skips_growth_unless_allowed():
    model = small_cnn()
    _, report = decompose_model(model, {"head": {"rank": None}}, measure_latency=False)
    assert len(report) == 0 and report.skipped[0][0] == "head"
    _, report = decompose_model(
        model, {"head": {"rank": None}}, allow_growth=True, measure_latency=False
    )
    assert report[0]["params_after"] > report[0]["params_before"]


def test_model_report_counts_params_flops_and_latency():
    model = small_cnn()
    new, report = decompose_model(
        model, {"fc": {"rank": 4}, "conv2": {"ranks": (3, 5)}}, latency_runs=3, latency_batch=4
    )
    assert isinstance(report, DecompositionReport)
    row = {r["layer"]: r for r in report}
    assert row["fc"]["params_before"] == 400 * 24 + 24
    assert row["fc"]["params_after"] == 4 * (400 + 24) + 24
    assert row["fc"]["flops_before"] == 2 * 400 * 24
    assert row["fc"]["flops_after"] == 2 * 4 * (400 + 24)
    # conv2: 3x3, 12 -> 16, stride 2 on 10x10: 5x5 outputs; Tucker 1x1 runs at 10x10.
    assert row["conv2"]["flops_before"] == 2 * 25 * 9 * 12 * 16
    assert row["conv2"]["flops_after"] == 2 * (100 * 12 * 3 + 25 * 9 * 3 * 5 + 25 * 5 * 16)
    assert 0 < row["conv2"]["rel_error"] < 1
    assert all(r["latency_ms_before"] > 0 and r["latency_ms_after"] > 0 for r in report)
    assert report.totals["params_after"] == new.count_params() < model.count_params()
    assert report.totals["latency_ms_before"] > 0
    text = str(report)
    assert "conv2" in text and "fc" in text and "(model)" in text


def test_model_rejects_unknown_policy_keys_and_bad_layers():
    model = small_cnn()
    with pytest.raises(ValueError, match="conv_9"):
        decompose_model(model, {"conv_9": {}}, measure_latency=False)
    with pytest.raises(ValueError, match="'conv2'"):
        decompose_model(model, {"conv2": {"ranks": 99}}, measure_latency=False)


def test_sequential_model_is_rewritten():
    model = keras.Sequential(
        [keras.Input((20,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(3)]
    )
    x = np.random.default_rng(13).standard_normal((4, 20)).astype("float32")
    new, report = decompose_model(
        model, {"Dense": {"rank": None}}, allow_growth=True, measure_latency=False
    )
    assert len(report) == 2 and isinstance(new, keras.Model)
    assert_close(new(x), model(x), "float32")


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param({"Conv2D": {"method": "tucker", "ranks": (5, 6)}}, id="tucker"),
        pytest.param({"conv2": {"method": "cp", "ranks": 6}}, id="cp-same-stride"),
        pytest.param({"conv1": {"method": "cp", "ranks": 6}}, id="cp"),
        pytest.param({"Dense": {"rank": "vbmf"}}, id="svd-vbmf"),
    ],
)
# Keras 3.15's .keras saving calls np.array(variable), which NumPy 2 flags; not ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_decomposed_model_saves_and_loads(policy, tmp_path):
    if any(opts.get("method") == "cp" for opts in policy.values()):
        pytest.importorskip("tensorly")
    model = small_cnn()
    new, report = decompose_model(model, policy, allow_growth=True, measure_latency=False)
    assert len(report) >= 1
    path = tmp_path / "decomposed.keras"
    new.save(path)
    loaded = keras.models.load_model(path)
    x = model_input()
    assert_close(loaded(x, training=False), new(x, training=False), "float32")
