"""Conv2D layers by Tucker-2 over the channel modes (HOSVD + HOOI in NumPy) or by CP
(TensorLy's parafac): `decompose_conv2d`."""

from __future__ import annotations

import numbers
import warnings

import keras
import numpy as np

from tf_smallmm.decompose.common import (
    Factored,
    assign,
    common_bias_kwargs,
    layer_label,
    resolve_rank,
    to_numpy64,
    unfold,
)
from tf_smallmm.decompose.vbmf import estimate_rank

_TENSORLY_HINT = "pip install tf_smallmm[decompose]  (or: pip install tensorly)"

# Tucker-2 by HOOI: HOSVD start, then alternate the two channel factors until the fit (the
# fraction of ||K||² kept) changes by less than _HOOI_TOL, at most _HOOI_MAX_ITERS sweeps.
# Measured 2026-12-01 on 3×3 kernels with S×T from 32×64 to 128×256 at a quarter and half
# of each channel rank, 2 shared cores: kernels of that multilinear rank plus 5% noise stop
# after 2 sweeps; i.i.d. Gaussian kernels (no structure: the worst case) still creep after
# 20, but by at most 1.8e-3 of ||K||² against 200 sweeps, at 0.03-1.8 s per sweep.
_HOOI_MAX_ITERS = 20
_HOOI_TOL = 1e-10


def _check_conv2d(layer) -> None:
    # ValueError, not TypeError: callers catch one error type for "cannot decompose this".
    if isinstance(layer, keras.layers.Conv2DTranspose):
        raise ValueError(  # noqa: TRY004
            f"{layer_label(layer)}: transposed convolutions are not supported by decompose_conv2d"
        )
    if not isinstance(layer, keras.layers.Conv2D):
        raise ValueError(  # noqa: TRY004
            f"{layer_label(layer)}: decompose_conv2d supports keras.layers.Conv2D only "
            "(not depthwise, separable, transposed, 1-D or 3-D convolutions)"
        )
    if layer.groups != 1:
        raise ValueError(
            f"{layer_label(layer)}: grouped convolutions (groups={layer.groups}) are not supported"
        )
    if not layer.built:
        raise ValueError(f"{layer_label(layer)} is not built; call it on an input first")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"{layer_label(layer)}: quantized layers cannot be decomposed")


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
    U_in = np.linalg.svd(unfold(K, 2), full_matrices=True)[0][:, :r_in]
    U_out = np.linalg.svd(unfold(K, 3), full_matrices=True)[0][:, :r_out]
    norm2 = float(np.sum(K * K))
    fit = -1.0
    for _ in range(_HOOI_MAX_ITERS):
        proj = np.einsum("hwst,tb->hwsb", K, U_out)
        U_in = np.linalg.svd(unfold(proj, 2), full_matrices=True)[0][:, :r_in]
        proj = np.einsum("hwst,sa->hwat", K, U_in)
        U_out = np.linalg.svd(unfold(proj, 3), full_matrices=True)[0][:, :r_out]
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
                f"{layer_label(layer)}: ranks={ranks!r}: a pair (input rank, output rank) is "
                "only meaningful for method='tucker'"
            )
        return tuple(ranks)
    return ranks, ranks


def _factor_conv2d_tucker(layer, ranks, *, name=None) -> Factored:
    K = to_numpy64(layer.kernel)
    kh, kw, S, T = K.shape
    spec_in, spec_out = _split_ranks(layer, ranks, "tucker")
    hint = "; pass a pair ranks=(input rank, output rank) to size the modes separately"
    r_in = resolve_rank(layer, "input rank", spec_in, unfold(K, 2), S, hint)
    r_out = resolve_rank(layer, "output rank", spec_out, unfold(K, 3), T, hint)
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
    last = _pointwise(T, layer, f"{base}_tucker_out", **common_bias_kwargs(layer))
    _build_conv(first, S, layer.data_format)
    _build_conv(middle, r_in, layer.data_format)
    _build_conv(last, r_out, layer.data_format)
    assign(first.kernel, U_in[None, None])
    assign(middle.kernel, core)
    assign(last.kernel, U_out.T[None, None])
    if layer.use_bias:
        assign(last.bias, to_numpy64(layer.bias))
    approx = np.einsum("hwab,sa,tb->hwst", core, U_in, U_out)
    return Factored([first, middle, last], approx, (r_in, r_out), "tucker")


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
    K = to_numpy64(layer.kernel)
    bound = _cp_rank_bound(K.shape)
    if isinstance(ranks, (tuple, list)):
        _split_ranks(layer, ranks, "cp")  # raises with the right message
    if isinstance(ranks, str) and ranks.lower() == "vbmf":
        # The CP rank is at least each multilinear rank; take the larger channel-mode estimate.
        R = max(1, estimate_rank(unfold(K, 2)), estimate_rank(unfold(K, 3)))
        R = min(R, bound)
    elif isinstance(ranks, numbers.Real) and not isinstance(ranks, numbers.Integral):
        raise ValueError(
            f"{layer_label(layer)}: energy-fraction ranks are not supported for method='cp'; "
            "pass an int or 'vbmf'"
        )
    else:
        R = resolve_rank(layer, "rank", ranks, unfold(K, 3), bound)

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
    return Factored(layers, approx, (R,), "cp")


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
        T, layer, f"{base}_cp_out", strides=last_strides, **common_bias_kwargs(layer)
    )

    _build_conv(first, S, fmt)
    kernels = [(first, A_s[None, None])]
    for conv, kernel in spatial:
        _build_conv(conv, R, fmt)
        kernels.append((conv, kernel))
    _build_conv(last, R, fmt)
    kernels.append((last, A_t.T[None, None]))
    for conv, kernel in kernels:
        assign(conv.kernel, kernel)
    if layer.use_bias:
        assign(last.bias, to_numpy64(layer.bias))
    return [first, *(conv for conv, _ in spatial), last]


def factor_conv2d(layer, method="tucker", ranks=None, *, name=None, **cp_options) -> Factored:
    _check_conv2d(layer)
    if method == "tucker":
        if cp_options:
            raise ValueError(
                f"{layer_label(layer)}: options {sorted(cp_options)} apply to method='cp' only"
            )
        return _factor_conv2d_tucker(layer, ranks, name=name)
    if method == "cp":
        return _factor_conv2d_cp(layer, ranks, name=name, **cp_options)
    raise ValueError(f"{layer_label(layer)}: method={method!r}; use 'tucker' or 'cp'")


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
    return factor_conv2d(layer, method, ranks, name=name, **options).layers
