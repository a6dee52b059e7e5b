"""Low-rank decomposition of Keras `Dense` and `Conv2D` layers.

Replace a big layer by a chain of thinner ones whose product is a low-rank approximation of
the original kernel, then fine-tune briefly with a small learning rate. Three factorisations:

* `decompose_dense`: truncated SVD, W (m x n) ~ A (m x t) . B (t x n): two `Dense` layers,
  t (m + n) weights instead of m n.
* `decompose_conv2d(method="tucker")`: Tucker-2 over the channel modes (Kim et al. 2016,
  "Compression of deep convolutional neural networks for fast and low power mobile
  applications"): 1x1 conv S -> R1, k x k conv R1 -> R2 (the original strides, padding and
  dilation), 1x1 conv R2 -> T.
* `decompose_conv2d(method="cp")`: rank-R CP (Lebedev et al. 2015, "Speeding-up convolutional
  neural networks using fine-tuned CP-decomposition"): 1x1 conv S -> R, depthwise kh x 1,
  depthwise 1 x kw, 1x1 conv R -> T. Needs TensorLy (`pip install tf_smallmm[decompose]`).

Ranks can be given, chosen by an energy fraction, or estimated by empirical variational
Bayesian matrix factorisation (`estimate_rank`, Nakajima et al. 2013) on the kernel's mode
unfoldings. `decompose_model` applies a policy to a whole Keras model and reports parameters,
FLOPs, weight reconstruction error and measured latency per layer.

Example::

    import keras
    from tf_smallmm.decompose import decompose_model

    small, report = decompose_model(
        model,
        {"Dense": {"rank": "vbmf"}, "Conv2D": {"method": "tucker", "ranks": "vbmf"}},
        min_params=10_000,
    )
    print(report)
    small.compile(keras.optimizers.Adam(1e-4), loss=..., metrics=[...])
    small.fit(x, y, epochs=2)          # short fine-tune, small learning rate

The new layers are stock Keras layers, so decomposed models save and load as `.keras` files
without custom objects. Kernels are factorised in float64 NumPy and cast to the layer's
variable dtype. The bias and activation of the original layer go on the last new layer.
"""

from __future__ import annotations

import dataclasses
import numbers
import statistics
import time
import warnings

import keras
import numpy as np

from tf_smallmm.decompose.vbmf import estimate_rank, evbmf

try:  # Keras 3 keeps the functional model class private; Sequential and Model are public.
    from keras.src.models.functional import Functional as _Functional
except ImportError:  # pragma: no cover
    _Functional = keras.Model

__all__ = [
    "DecompositionReport",
    "decompose_conv2d",
    "decompose_dense",
    "decompose_model",
    "estimate_rank",
    "evbmf",
]

_TENSORLY_HINT = "pip install tf_smallmm[decompose]  (or: pip install tensorly)"

# Tucker-2 by HOOI: HOSVD start, then alternate the two channel factors. The fit rarely moves
# after a handful of sweeps on conv kernels; stop early when it changes by less than _HOOI_TOL.
_HOOI_MAX_ITERS = 20
_HOOI_TOL = 1e-10


# ----------------------------------------------------------------------------- helpers


def _layer_label(layer) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _to_numpy64(value) -> np.ndarray:
    # Variables and eager tensors: .numpy() (np.array(variable) warns under NumPy 2).
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value, dtype=np.float64)


def _assign(variable, value: np.ndarray) -> None:
    variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def _unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def _energy_rank(matrix: np.ndarray, energy: float) -> int:
    """Smallest rank whose leading singular values keep `energy` of the squared norm."""
    s2 = np.linalg.svd(matrix, compute_uv=False) ** 2
    cumulative = np.cumsum(s2)
    if cumulative[-1] == 0.0:
        return 1
    # The relative slack absorbs round-off so that energy=1.0 means "every non-zero value".
    k = int(np.searchsorted(cumulative, energy * cumulative[-1] * (1.0 - 1e-12))) + 1
    return min(k, s2.size)


def _resolve_rank(layer, what: str, spec, unfolding: np.ndarray, full: int, hint: str = "") -> int:
    """Turn a rank spec (None, int, 'vbmf', energy float) into an int in [1, full]."""
    if spec is None:
        return full
    if isinstance(spec, str):
        if spec.lower() == "vbmf":
            return min(full, max(1, estimate_rank(unfolding)))
        raise ValueError(
            f"{_layer_label(layer)}: {what}={spec!r} is not understood; use None, an int, "
            "'vbmf' or an energy fraction in (0, 1]"
        )
    if isinstance(spec, bool):
        raise ValueError(f"{_layer_label(layer)}: {what} must be an int, got {spec!r}")  # noqa: TRY004
    if isinstance(spec, numbers.Integral):
        if not 1 <= int(spec) <= full:
            raise ValueError(
                f"{_layer_label(layer)}: {what}={int(spec)} is out of range; it must be in "
                f"[1, {full}]{hint}"
            )
        return int(spec)
    if isinstance(spec, numbers.Real):
        if not 0.0 < float(spec) <= 1.0:
            raise ValueError(
                f"{_layer_label(layer)}: {what}={spec!r}: a float rank is an energy fraction "
                "and must be in (0, 1]; pass an int for an explicit rank"
            )
        return _energy_rank(unfolding, float(spec))
    raise ValueError(
        f"{_layer_label(layer)}: {what}={spec!r} is not understood; use None, an int, "
        "'vbmf' or an energy fraction in (0, 1]"
    )


def _common_bias_kwargs(layer) -> dict:
    return {
        "activation": layer.activation,
        "use_bias": layer.use_bias,
        "bias_regularizer": layer.bias_regularizer,
        "bias_constraint": layer.bias_constraint,
        "activity_regularizer": layer.activity_regularizer,
        "dtype": layer.dtype_policy,
    }


@dataclasses.dataclass
class _Factored:
    """Internal result of one layer decomposition."""

    layers: list
    approx_kernel: np.ndarray  # the product of the factors, in the original kernel layout
    ranks: tuple
    method: str


# ----------------------------------------------------------------------------- Dense


def _check_dense(layer) -> None:
    # ValueError, not TypeError: callers catch one error type for "cannot decompose this".
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(  # noqa: TRY004
            f"{_layer_label(layer)}: decompose_dense supports keras.layers.Dense only"
        )
    if not layer.built:
        raise ValueError(f"{_layer_label(layer)} is not built; call it on an input first")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"{_layer_label(layer)}: quantized layers cannot be decomposed")


def _factor_dense(layer, rank=None, *, name=None) -> _Factored:
    _check_dense(layer)
    W = _to_numpy64(layer.kernel)
    m, n = W.shape
    t = _resolve_rank(layer, "rank", rank, W, min(m, n))
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    root = np.sqrt(s[:t])  # split sqrt(S) between the factors: balanced scales for training
    A = U[:, :t] * root
    B = root[:, None] * Vt[:t]

    base = name or layer.name
    first = keras.layers.Dense(t, use_bias=False, name=f"{base}_svd_in", dtype=layer.dtype_policy)
    second = keras.layers.Dense(n, name=f"{base}_svd_out", **_common_bias_kwargs(layer))
    first.build((None, m))
    second.build((None, t))
    _assign(first.kernel, A)
    _assign(second.kernel, B)
    if layer.use_bias:
        _assign(second.bias, _to_numpy64(layer.bias))
    return _Factored([first, second], A @ B, (t,), "svd")


def decompose_dense(layer, rank=None, *, name=None) -> list:
    """Factor a `Dense` layer into two by truncated SVD.

    W (m x n) = U S V^T is cut to rank t and split as (U sqrt(S)) (sqrt(S) V^T): the first
    layer is `Dense(t, use_bias=False)` (m t weights), the second `Dense(n)` with the original
    bias and activation (t n weights plus the bias). It is the best rank-t approximation of W
    in Frobenius norm (Eckart-Young); it saves weights and FLOPs when t < m n / (m + n).

    Args:
      layer: a built `keras.layers.Dense`.
      rank: None (full rank min(m, n): exact, for checks), an int in [1, min(m, n)], 'vbmf'
        (empirical VBMF estimate on W, at least 1), or a float in (0, 1]: the smallest rank
        keeping that fraction of the squared singular value energy. `1` is rank one; `1.0`
        is all the energy.
      name: base name for the new layers (default: the layer's name); they are named
        `<name>_svd_in` and `<name>_svd_out`.

    Returns:
      `[first, second]`, built and holding their weights. Apply them in order, e.g.
      `keras.Sequential([keras.Input((m,)), *decompose_dense(layer, 16)])`.

    Raises:
      ValueError: not a built Dense layer, or a rank out of range; the message names the layer.
    """
    return _factor_dense(layer, rank, name=name).layers


# ----------------------------------------------------------------------------- Conv2D


def _check_conv2d(layer) -> None:
    # ValueError, not TypeError: callers catch one error type for "cannot decompose this".
    if isinstance(layer, keras.layers.Conv2DTranspose):
        raise ValueError(  # noqa: TRY004
            f"{_layer_label(layer)}: transposed convolutions are not supported by decompose_conv2d"
        )
    if not isinstance(layer, keras.layers.Conv2D):
        raise ValueError(  # noqa: TRY004
            f"{_layer_label(layer)}: decompose_conv2d supports keras.layers.Conv2D only "
            "(not depthwise, separable, transposed, 1-D or 3-D convolutions)"
        )
    if layer.groups != 1:
        raise ValueError(
            f"{_layer_label(layer)}: grouped convolutions (groups={layer.groups}) are not supported"
        )
    if not layer.built:
        raise ValueError(f"{_layer_label(layer)} is not built; call it on an input first")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"{_layer_label(layer)}: quantized layers cannot be decomposed")


def _pointwise(filters, layer, name, **kwargs):
    return keras.layers.Conv2D(filters, 1, data_format=layer.data_format, name=name, **kwargs)


def _build_conv(new_layer, in_channels: int, data_format: str) -> None:
    shape = (None, None, None, in_channels)
    if data_format == "channels_first":
        shape = (None, in_channels, None, None)
    new_layer.build(shape)


def _tucker2(K: np.ndarray, r_in: int, r_out: int):
    """Tucker-2 of a (kh, kw, S, T) kernel over modes 2 and 3, by HOSVD + HOOI (NumPy).

    Returns (core (kh, kw, r_in, r_out), U_in (S, r_in), U_out (T, r_out)) with orthonormal
    factor columns; K ~ core x_2 U_in x_3 U_out. Exact when r_in = S and r_out = T.
    Full SVDs: a mode's unfolding can have fewer columns than rows (1x1 kernels), and the
    factor still needs r columns.
    """
    U_in = np.linalg.svd(_unfold(K, 2), full_matrices=True)[0][:, :r_in]
    U_out = np.linalg.svd(_unfold(K, 3), full_matrices=True)[0][:, :r_out]
    norm2 = float(np.sum(K * K))
    fit = -1.0
    for _ in range(_HOOI_MAX_ITERS):
        proj = np.einsum("hwst,tb->hwsb", K, U_out)
        U_in = np.linalg.svd(_unfold(proj, 2), full_matrices=True)[0][:, :r_in]
        proj = np.einsum("hwst,sa->hwat", K, U_in)
        U_out = np.linalg.svd(_unfold(proj, 3), full_matrices=True)[0][:, :r_out]
        core = np.einsum("hwat,tb->hwab", proj, U_out)
        new_fit = float(np.sum(core * core)) / norm2 if norm2 else 1.0
        if abs(new_fit - fit) < _HOOI_TOL:
            break
        fit = new_fit
    core = np.einsum("hwst,sa,tb->hwab", K, U_in, U_out)
    return core, U_in, U_out


def _split_ranks(layer, ranks, method):
    if isinstance(ranks, (tuple, list)):
        if method != "tucker" or len(ranks) != 2:
            raise ValueError(
                f"{_layer_label(layer)}: ranks={ranks!r}: a pair (input rank, output rank) is "
                "only meaningful for method='tucker'"
            )
        return tuple(ranks)
    return ranks, ranks


def _factor_conv2d_tucker(layer, ranks, *, name=None) -> _Factored:
    K = _to_numpy64(layer.kernel)
    kh, kw, S, T = K.shape
    spec_in, spec_out = _split_ranks(layer, ranks, "tucker")
    hint = "; pass a pair ranks=(input rank, output rank) to size the modes separately"
    r_in = _resolve_rank(layer, "input rank", spec_in, _unfold(K, 2), S, hint)
    r_out = _resolve_rank(layer, "output rank", spec_out, _unfold(K, 3), T, hint)
    core, U_in, U_out = _tucker2(K, r_in, r_out)

    base = name or layer.name
    first = _pointwise(r_in, layer, f"{base}_tucker_in", use_bias=False, dtype=layer.dtype_policy)
    middle = keras.layers.Conv2D(
        r_out,
        (kh, kw),
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
        use_bias=False,
        name=f"{base}_tucker_core",
        dtype=layer.dtype_policy,
    )
    last = _pointwise(T, layer, f"{base}_tucker_out", **_common_bias_kwargs(layer))
    _build_conv(first, S, layer.data_format)
    _build_conv(middle, r_in, layer.data_format)
    _build_conv(last, r_out, layer.data_format)
    _assign(first.kernel, U_in[None, None])
    _assign(middle.kernel, core)
    _assign(last.kernel, U_out.T[None, None])
    if layer.use_bias:
        _assign(last.bias, _to_numpy64(layer.bias))
    approx = np.einsum("hwab,sa,tb->hwst", core, U_in, U_out)
    return _Factored([first, middle, last], approx, (r_in, r_out), "tucker")


def _import_tensorly():
    try:
        import tensorly
        import tensorly.decomposition
    except ImportError as err:
        raise ImportError(f"CP decomposition needs TensorLy: {_TENSORLY_HINT}") from err
    return tensorly


def _cp_rank_bound(shape) -> int:
    # Every tensor has CP rank <= (product of its dimensions) / (largest dimension).
    return int(np.prod(shape) // max(shape))


def _factor_conv2d_cp(layer, ranks, *, name=None, n_iter_max=500, tol=1e-10, random_state=0):
    tl = _import_tensorly()
    K = _to_numpy64(layer.kernel)
    bound = _cp_rank_bound(K.shape)
    if isinstance(ranks, (tuple, list)):
        _split_ranks(layer, ranks, "cp")  # raises with the right message
    if isinstance(ranks, str) and ranks.lower() == "vbmf":
        # The CP rank is at least each multilinear rank; take the larger channel-mode estimate.
        R = max(1, estimate_rank(_unfold(K, 2)), estimate_rank(_unfold(K, 3)))
        R = min(R, bound)
    elif isinstance(ranks, numbers.Real) and not isinstance(ranks, numbers.Integral):
        raise ValueError(
            f"{_layer_label(layer)}: energy-fraction ranks are not supported for method='cp'; "
            "pass an int or 'vbmf'"
        )
    else:
        R = _resolve_rank(layer, "rank", ranks, _unfold(K, 3), bound)

    with tl.backend_context("numpy"), warnings.catch_warnings():
        # TensorLy warns when the SVD start asks for more vectors than a mode has (3 x 3
        # kernels and R > 3: the rest of the start is random, which is what we want).
        warnings.simplefilter("ignore", UserWarning)
        cp = tl.decomposition.parafac(
            K,
            R,
            init="svd",
            n_iter_max=n_iter_max,
            tol=tol,
            random_state=random_state,
            linesearch=True,  # fewer iterations and fewer stalls than plain ALS on kernels
        )
    weights, factors = cp
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    factors[-1] = factors[-1] * np.asarray(weights, dtype=np.float64)[None, :]
    # Give the four factors of each component the same column norm (|lambda_r|^(1/4)), so no
    # layer carries the whole scale; the signs stay in the factors.
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    scale = np.prod(norms, axis=0) ** 0.25
    factors = [
        f * np.where(n > 0, scale / np.where(n > 0, n, 1.0), 0.0)[None, :]
        for f, n in zip(factors, norms)
    ]
    A_h, A_w, A_s, A_t = factors

    approx = np.einsum("hr,wr,sr,tr->hwst", A_h, A_w, A_s, A_t)
    layers = _cp_layers(layer, A_h, A_w, A_s, A_t, name or layer.name)
    return _Factored(layers, approx, (R,), "cp")


def _cp_layers(layer, A_h, A_w, A_s, A_t, base):
    """The layer chain for CP factors of `layer`'s kernel; exact for any stride and padding.

    TensorFlow's CPU depthwise kernel accepts unequal row/column strides only on the oneDNN
    float32/bfloat16 path, so the depthwise layers here always get equal strides:

      strides (1, 1):              1x1, depthwise kh x 1, depthwise 1 x kw, 1x1
      "valid", strides (s, s):     1x1, depthwise kh x 1 (stride 1), depthwise 1 x kw (s, s), 1x1
      "valid", strides (sh, sw):   1x1, depthwise kh x 1, depthwise 1 x kw, 1x1 with (sh, sw)
      "same",  strides (s, s):     1x1, depthwise kh x kw (s, s) holding the rank-1 outer
                                   product a_h a_w^T per channel, 1x1
      "same",  strides (sh, sw):   as above with a grouped Conv2D (groups=R) for the spatial
                                   step, the only stock layer with unequal strides everywhere
                                   (slow on CPU, where Keras runs grouped convs through XLA)

    Why "same" with a stride cannot be split: "same" pads (out - 1) s + k_eff - size rows in
    total, top half first, so the alignment of the strided output grid depends on size mod s.
    A stride-1 kh x 1 pass pads (k_eff - 1) / 2 rows on top regardless, so a later 1 x kw pass
    would sample the wrong rows for some input sizes. With "valid" there is no padding and any
    later layer can take the stride.
    """
    kh, kw, S, T = A_h.shape[0], A_w.shape[0], A_s.shape[0], A_t.shape[0]
    R = A_s.shape[1]
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    fmt = layer.data_format
    dtype = layer.dtype_policy

    def depthwise(kernel_size, strides, dilation, padding, suffix):
        return keras.layers.DepthwiseConv2D(
            kernel_size,
            strides=strides,
            padding=padding,
            dilation_rate=dilation,
            data_format=fmt,
            use_bias=False,
            name=f"{base}_cp_{suffix}",
            dtype=dtype,
        )

    first = _pointwise(R, layer, f"{base}_cp_in", use_bias=False, dtype=dtype)
    last_strides = (1, 1)
    if (sh, sw) == (1, 1) or layer.padding == "valid":
        equal = sh == sw
        vertical = depthwise((kh, 1), (1, 1), (dh, 1), layer.padding, "h")
        horizontal = depthwise((1, kw), (sh, sw) if equal else (1, 1), (1, dw), layer.padding, "w")
        if not equal:
            last_strides = (sh, sw)
        spatial = [(vertical, A_h[:, None, :, None]), (horizontal, A_w[None, :, :, None])]
    else:
        outer = np.einsum("hr,wr->hwr", A_h, A_w)  # dilation is 1 whenever a stride is > 1
        if sh == sw:
            conv = depthwise((kh, kw), (sh, sw), (1, 1), "same", "hw")
            spatial = [(conv, outer[:, :, :, None])]
        else:
            conv = keras.layers.Conv2D(
                R,
                (kh, kw),
                strides=(sh, sw),
                padding="same",
                data_format=fmt,
                groups=R,
                use_bias=False,
                name=f"{base}_cp_hw",
                dtype=dtype,
            )
            spatial = [(conv, outer[:, :, None, :])]
    last = _pointwise(
        T, layer, f"{base}_cp_out", strides=last_strides, **_common_bias_kwargs(layer)
    )

    _build_conv(first, S, fmt)
    kernels = [(first, A_s[None, None])]
    for conv, kernel in spatial:
        _build_conv(conv, R, fmt)
        kernels.append((conv, kernel))
    _build_conv(last, R, fmt)
    kernels.append((last, A_t.T[None, None]))
    for conv, kernel in kernels:
        _assign(conv.kernel, kernel)
    if layer.use_bias:
        _assign(last.bias, _to_numpy64(layer.bias))
    return [first, *(conv for conv, _ in spatial), last]


def _factor_conv2d(layer, method="tucker", ranks=None, *, name=None, **cp_options) -> _Factored:
    _check_conv2d(layer)
    if method == "tucker":
        if cp_options:
            raise ValueError(
                f"{_layer_label(layer)}: options {sorted(cp_options)} apply to method='cp' only"
            )
        return _factor_conv2d_tucker(layer, ranks, name=name)
    if method == "cp":
        return _factor_conv2d_cp(layer, ranks, name=name, **cp_options)
    raise ValueError(f"{_layer_label(layer)}: method={method!r}; use 'tucker' or 'cp'")


def decompose_conv2d(
    layer, method="tucker", ranks=None, *, name=None, n_iter_max=500, tol=1e-10, random_state=0
) -> list:
    """Factor a `Conv2D` layer into a chain of smaller convolutions.

    The kernel K has Keras layout (kh, kw, S, T): S input, T output channels.

    method="tucker" (Tucker-2, HOSVD + HOOI in NumPy; TensorLy not needed):
      K ~ G x_S U x_T V. Returns three `Conv2D` layers: 1x1 S -> R1 (kernel U, no bias),
      kh x kw R1 -> R2 with the original strides/padding/dilation (kernel G, no bias), and
      1x1 R2 -> T (kernel V^T, original bias and activation). Weights
      S R1 + kh kw R1 R2 + R2 T. At full rank (R1, R2) = (S, T) it reproduces the layer
      exactly (to rounding).
    method="cp" (rank-R CP by ALS with line search, `tensorly.decomposition.parafac`, SVD
      start; needs TensorLy):
      K[h, w, s, t] ~ sum_r a_h[h, r] a_w[w, r] a_s[s, r] a_t[t, r]. Returns 1x1 `Conv2D`
      S -> R (no bias), `DepthwiseConv2D` (kh, 1) with dilation (dh, 1), `DepthwiseConv2D`
      (1, kw) with dilation (1, dw), and 1x1 `Conv2D` R -> T with the bias and activation;
      weights R (S + kh + kw + T). Strides: with padding "valid" the (1, kw) layer takes
      equal strides (s, s) and the last 1x1 conv takes unequal ones. With padding "same" and
      a stride > 1 no split into kh x 1 then 1 x kw reproduces TF's padding for every input
      size, so the two spatial layers become one `DepthwiseConv2D` (kh, kw) holding the
      rank-1 product a_h a_w^T per channel (a grouped `Conv2D` when the strides differ);
      weights R (S + kh kw + T). In every case the layers compute exactly the convolution with
      the CP kernel; how close that kernel is to K depends on R (ALS finds a local optimum,
      so the error is not guaranteed to fall strictly with R).

    Args:
      layer: a built `keras.layers.Conv2D` (groups=1; channels_last or channels_first).
      method: "tucker" or "cp".
      ranks: for Tucker, None (full: (S, T)), an int for both modes, 'vbmf' (empirical VBMF
        on each channel-mode unfolding), an energy float in (0, 1] per mode, or a pair
        (input rank, output rank) of any of those. For CP, an int R in
        [1, kh kw S T / max(kh, kw, S, T)], 'vbmf' (the larger of the two channel-mode VBMF
        estimates) or None (that upper bound).
      name: base name for the new layers (default: the layer's name), suffixed
        `_tucker_in/_tucker_core/_tucker_out` or `_cp_in/_cp_h/_cp_w/_cp_out`.
      n_iter_max, tol, random_state: passed to `parafac` (method="cp" only; random_state
        seeds the random part of the SVD start, so results are reproducible).

    Returns:
      The new layers, built and holding their weights, to be applied in order.

    Raises:
      ValueError: not a Conv2D (transposed, depthwise, ...), groups > 1, unbuilt, or a bad
        rank; the message names the layer.
      ImportError: method="cp" without TensorLy (`pip install tf_smallmm[decompose]`).
    """
    options = {}
    if method == "cp":
        options = {"n_iter_max": n_iter_max, "tol": tol, "random_state": random_state}
    return _factor_conv2d(layer, method, ranks, name=name, **options).layers


# ----------------------------------------------------------------------------- measuring


def _macs(layer, output_shape) -> int | None:
    """Multiply-adds per example of a Dense / Conv2D / DepthwiseConv2D layer."""
    dims = tuple(output_shape)[1:]
    if any(d is None for d in dims):
        return None
    kernel_shape = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        per_output = kernel_shape[0] * kernel_shape[1]
    else:
        per_output = int(np.prod(kernel_shape[:-1]))
    return int(np.prod(dims)) * per_output


def _flops(pairs) -> int | None:
    total = 0
    for layer, shape in pairs:
        macs = _macs(layer, shape)
        if macs is None:
            return None
        total += 2 * macs
    return total


def _random_input(shape, dtype, batch, seed):
    dims = tuple(shape)[1:]
    if any(d is None for d in dims):
        return None
    rng = np.random.default_rng(seed)
    return keras.ops.convert_to_tensor(rng.standard_normal((batch, *dims)), dtype=dtype)


def _time_interleaved(functions, args, runs: int) -> list:
    """Median wall time in ms of each function on `args`, measured alternately in one run."""
    import tensorflow as tf

    compiled = [tf.function(f, autograph=False, reduce_retracing=True) for f in functions]
    for f in compiled:  # trace and warm up
        for _ in range(2):
            keras.tree.map_structure(_to_numpy64, f(*args))
    samples = [[] for _ in compiled]
    for _ in range(runs):
        for f, times in zip(compiled, samples):
            start = time.perf_counter()
            keras.tree.map_structure(_to_numpy64, f(*args))
            times.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in samples]


# ----------------------------------------------------------------------------- the model


class DecompositionReport(list):
    """What `decompose_model` did: a list of per-layer dicts that prints as a table.

    Each row has: layer, class, method, ranks, params_before, params_after, flops_before,
    flops_after (per example, 2 x multiply-adds; None for unknown spatial sizes), rel_error
    (||K - K_approx||_F / ||K||_F of the kernel), latency_ms_before, latency_ms_after (median
    of interleaved runs of the original layer and of its replacement on the same random batch,
    in the same process; None when not measured) and new_layers (their names).

    `totals` holds whole-model params_before/params_after and latency_ms_before/after;
    `skipped` lists (layer name, reason) for layers the policy matched but that were left as
    they were.
    """

    def __init__(self, rows=(), totals=None, skipped=()):
        super().__init__(rows)
        self.totals = dict(totals or {})
        self.skipped = list(skipped)

    def to_string(self) -> str:
        def num(v):
            return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"

        def fmt_ratio(before, after):
            if before is None or after is None:
                return "-"
            ratio = f" ({after / before:.2f}x)" if before else ""
            return f"{num(before)} -> {num(after)}{ratio}"

        def mflops(v):
            return None if v is None else v / 1e6

        header = ("layer", "method", "ranks", "params", "MFLOPs", "rel.err", "latency ms")
        lines = [header]
        for r in self:
            lines.append(
                (
                    r["layer"],
                    r["method"],
                    "x".join(str(x) for x in r["ranks"]),
                    fmt_ratio(r["params_before"], r["params_after"]),
                    fmt_ratio(mflops(r["flops_before"]), mflops(r["flops_after"])),
                    f"{r['rel_error']:.3g}",
                    fmt_ratio(r["latency_ms_before"], r["latency_ms_after"]),
                )
            )
        t = self.totals
        if t:
            lines.append(
                (
                    "(model)",
                    "",
                    "",
                    fmt_ratio(t.get("params_before"), t.get("params_after")),
                    "",
                    "",
                    fmt_ratio(t.get("latency_ms_before"), t.get("latency_ms_after")),
                )
            )
        widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
        out = []
        for k, row in enumerate(lines):
            out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
            if k == 0:
                out.append("  ".join("-" * w for w in widths))
        for layer_name, reason in self.skipped:
            out.append(f"skipped {layer_name}: {reason}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"DecompositionReport({list.__repr__(self)}, totals={self.totals!r})"


_DECOMPOSABLE = ("Dense", "Conv2D")
_NEW_SUFFIXES = (
    "_svd_in",
    "_svd_out",
    "_tucker_in",
    "_tucker_core",
    "_tucker_out",
    "_cp_in",
    "_cp_h",
    "_cp_w",
    "_cp_hw",
    "_cp_out",
)


def _policy_lookup(layer, policy):
    """(options or None, how) for a layer; how is "name", "class", "base" or "callable".

    "name": the dict names the layer; "class": it names the layer's own class; "base": it
    names a base class (e.g. "Conv2D" for a subclass, or "Layer").
    """
    if callable(policy):
        return policy(layer), "callable"
    if layer.name in policy:
        return policy[layer.name], "name"
    if type(layer).__name__ in policy:
        return policy[type(layer).__name__], "class"
    for cls in type(layer).__mro__[1:]:
        if cls.__name__ in policy:
            return policy[cls.__name__], "base"
    return None, None


def _check_policy(model, policy, layers) -> None:
    if callable(policy):
        return
    if not isinstance(policy, dict):
        raise TypeError(
            "decompose_model: policy must be a dict {layer name or class name: options} or "
            f"a callable(layer) -> options or None; got {type(policy).__name__}"
        )
    known = {layer.name for layer in layers} | set(_DECOMPOSABLE)
    for layer in layers:
        known |= {cls.__name__ for cls in type(layer).__mro__}
    unknown = sorted(str(k) for k in policy if k not in known)
    if unknown:
        raise ValueError(
            f"decompose_model: policy keys {unknown} match no layer name or layer class of "
            f"model {model.name!r}"
        )


def _apply_options(layer, options, name) -> _Factored:
    if options is True:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(
            f"{_layer_label(layer)}: policy options must be a dict (or True/None/False), "
            f"got {options!r}"
        )
    options = dict(options)
    if isinstance(layer, keras.layers.Dense):
        method = options.pop("method", "svd")
        if method != "svd":
            raise ValueError(f"{_layer_label(layer)}: Dense layers support method='svd' only")
        unknown = set(options) - {"rank"}
        if unknown:
            raise ValueError(f"{_layer_label(layer)}: unknown options {sorted(unknown)}")
        return _factor_dense(layer, options.get("rank"), name=name)
    unknown = set(options) - {"method", "ranks", "n_iter_max", "tol", "random_state"}
    if unknown:
        raise ValueError(f"{_layer_label(layer)}: unknown options {sorted(unknown)}")
    method = options.pop("method", "tucker")
    ranks = options.pop("ranks", None)
    return _factor_conv2d(layer, method, ranks, name=name, **options)


def _count(layers) -> int:
    return int(sum(layer.count_params() for layer in layers))


def _all_layers(model):
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def decompose_model(
    model,
    policy,
    *,
    min_params=0,
    allow_growth=False,
    measure_latency=True,
    latency_batch=32,
    latency_runs=30,
):
    """Return a new functional model with the layers chosen by `policy` decomposed.

    Args:
      model: a built Keras `Sequential` or functional model (not subclassed). It is left
        unchanged. Layers of nested models are not decomposed (the nested model is copied).
      policy: which layers to decompose, and how. Either a dict whose keys are layer names or
        layer class names (a name wins over a class; a class matches subclasses) and whose
        values are option dicts -- for `Dense`: {"rank": ...}; for `Conv2D`:
        {"method": "tucker" | "cp", "ranks": ..., and for CP optionally "n_iter_max", "tol",
        "random_state"} -- or None/False to leave the layer alone; or a callable
        `policy(layer) -> options or None`. Example:
        `{"Dense": {"rank": "vbmf"}, "conv1": {"method": "tucker", "ranks": "vbmf"}}`.
      min_params: layers with fewer weights than this are skipped (and listed in
        `report.skipped`), unless the dict names the layer.
        A layer matched by its name, by its own class name or by a callable is a request: if
        it cannot be decomposed (e.g. groups > 1) that raises. A key naming a base class
        (e.g. "Layer") silently skips layers that cannot be decomposed.
      allow_growth: if False (default), a decomposition that would have more weights than
        the original layer (e.g. a rank VBMF found too high to pay off) is not applied and
        is listed in `report.skipped`.
      measure_latency: time each original layer against its replacement (median of
        `latency_runs` interleaved runs, batch `latency_batch`, under `tf.function`) and the
        whole model before/after. Needs static non-batch input shapes; else None.

    Returns:
      (new_model, report): `new_model` is a functional `keras.Model` with the same inputs and
      outputs, fresh copies of the untouched layers (weights copied) and the new layers in
      place of the decomposed ones; `report` is a `DecompositionReport` (list of dicts;
      `print(report)` shows a table).

    Raises:
      ValueError: unknown policy keys, bad options, or a policy that selects a layer that
        cannot be decomposed (the message names the layer).
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError("decompose_model: expected a built keras.Model")
    is_sequential = isinstance(model, keras.Sequential)
    if not is_sequential and not isinstance(model, _Functional):
        raise ValueError(
            f"decompose_model: model {model.name!r} is subclassed; only Sequential and "
            "functional models have a graph that can be rewritten"
        )
    layers = _all_layers(model)
    _check_policy(model, policy, layers)

    taken = {layer.name for layer in model.layers}
    factored = {}  # id(original layer) -> (original layer, _Factored)
    skipped = []
    for layer in layers:
        options, how = _policy_lookup(layer, policy)
        if options is None or options is False:
            continue
        if how == "base" and not isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            continue  # a base-class key such as "Layer" also matches layers we cannot decompose
        if how != "name" and layer.count_params() < min_params:
            skipped.append((layer.name, f"{layer.count_params()} params < min_params={min_params}"))
            continue
        base, k = layer.name, 0
        while any(base + suffix in taken for suffix in _NEW_SUFFIXES):
            k += 1
            base = f"{layer.name}_{k}"
        taken |= {base + suffix for suffix in _NEW_SUFFIXES}
        result = _apply_options(layer, options, base)
        before, after = layer.count_params(), _count(result.layers)
        if after > before and not allow_growth:
            skipped.append(
                (layer.name, f"ranks {result.ranks} would grow params {before} -> {after}")
            )
            continue
        factored[id(layer)] = (layer, result)

    copies = []  # (original, copy) for weight transfer
    shapes = {}  # id(original) -> (input shape, output shape, [new output shapes])

    def clone_function(layer):
        if id(layer) in factored:
            return layer  # never called: call_function routes it to the new layers
        copy = layer.__class__.from_config(layer.get_config())
        copies.append((layer, copy))
        return copy

    def call_function(layer, *args, **kwargs):
        if id(layer) not in factored:
            return layer(*args, **kwargs)
        x = args[0]
        in_shape = tuple(x.shape)
        new_shapes = []
        for new_layer in factored[id(layer)][1].layers:
            x = new_layer(x)
            new_shapes.append(tuple(x.shape))
        shapes.setdefault(id(layer), (in_shape, new_shapes[-1], new_shapes))
        return x

    if is_sequential:
        inputs = [
            keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in model.inputs
        ]
        x = inputs[0]
        for layer in layers:
            x = call_function(clone_function(layer), x)
        new_model = keras.Model(inputs[0], x, name=model.name)
        if model.compiled:
            new_model.compile_from_config(model.get_compile_config())
    else:
        new_model = keras.models.clone_model(
            model, clone_function=clone_function, call_function=call_function
        )
    for original, copy in copies:
        copy.set_weights(original.get_weights())

    rows = []
    for layer, result in factored.values():
        in_shape, out_shape, new_shapes = shapes.get(id(layer), (None, None, None))
        K = _to_numpy64(layer.kernel)
        norm = np.linalg.norm(K)
        row = {
            "layer": layer.name,
            "class": type(layer).__name__,
            "method": result.method,
            "ranks": result.ranks,
            "params_before": layer.count_params(),
            "params_after": _count(result.layers),
            "flops_before": None,
            "flops_after": None,
            "rel_error": float(np.linalg.norm(K - result.approx_kernel) / norm) if norm else 0.0,
            "latency_ms_before": None,
            "latency_ms_after": None,
            "new_layers": [new.name for new in result.layers],
        }
        if in_shape is not None:
            row["flops_before"] = _flops([(layer, out_shape)])
            row["flops_after"] = _flops(zip(result.layers, new_shapes))
            x = _random_input(in_shape, layer.compute_dtype, latency_batch, seed=0)
            if measure_latency and x is not None:

                def chain(x, new_layers=tuple(result.layers)):
                    for new_layer in new_layers:
                        x = new_layer(x)
                    return x

                row["latency_ms_before"], row["latency_ms_after"] = _time_interleaved(
                    [layer, chain], (x,), latency_runs
                )
        rows.append(row)

    totals = {"params_before": model.count_params(), "params_after": new_model.count_params()}
    if measure_latency:
        xs = [_random_input(t.shape, t.dtype, latency_batch, seed=1) for t in model.inputs]
        if all(x is not None for x in xs):
            args = (xs[0] if len(xs) == 1 else xs,)
            before, after = _time_interleaved(
                [lambda x: model(x, training=False), lambda x: new_model(x, training=False)],
                args,
                latency_runs,
            )
            totals.update(latency_ms_before=before, latency_ms_after=after)
    return new_model, DecompositionReport(rows, totals, skipped)
