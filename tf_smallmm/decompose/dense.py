"""Dense layers by truncated SVD: `decompose_dense`."""

from __future__ import annotations

import keras
import numpy as np

from tf_smallmm.decompose.common import (
    Factored,
    assign,
    common_bias_kwargs,
    layer_label,
    resolve_rank,
    to_numpy64,
)


def _check_dense(layer) -> None:
    # ValueError, not TypeError: callers catch one error type for "cannot decompose this".
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(  # noqa: TRY004
            f"{layer_label(layer)}: decompose_dense supports keras.layers.Dense only"
        )
    if not layer.built:
        raise ValueError(f"{layer_label(layer)} is not built; call it on an input first")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"{layer_label(layer)}: quantized layers cannot be decomposed")


def factor_dense(layer, rank=None, *, name=None) -> Factored:
    _check_dense(layer)
    W = to_numpy64(layer.kernel)
    m, n = W.shape
    t = resolve_rank(layer, "rank", rank, W, min(m, n))
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    root = np.sqrt(s[:t])  # split sqrt(S) between the factors: balanced scales for training
    A = U[:, :t] * root
    B = root[:, None] * Vt[:t]

    base = name or layer.name
    first = keras.layers.Dense(t, use_bias=False, name=f"{base}_svd_in", dtype=layer.dtype_policy)
    second = keras.layers.Dense(n, name=f"{base}_svd_out", **common_bias_kwargs(layer))
    first.build((None, m))
    second.build((None, t))
    assign(first.kernel, A)
    assign(second.kernel, B)
    if layer.use_bias:
        assign(second.bias, to_numpy64(layer.bias))
    return Factored([first, second], A @ B, (t,), "svd")


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
    return factor_dense(layer, rank, name=name).layers
