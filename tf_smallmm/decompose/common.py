"""What the factorisations share: kernels as float64 NumPy arrays, rank specs (None, an
int, 'vbmf', an energy fraction) resolved to ints, the bias and activation arguments that
move to the last new layer, and `Factored`, one layer's result."""

from __future__ import annotations

import dataclasses
import numbers

import keras
import numpy as np

from tf_smallmm.decompose.vbmf import estimate_rank


def layer_label(layer) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def to_numpy64(value) -> np.ndarray:
    # Variables and eager tensors: .numpy() (np.array(variable) warns under NumPy 2).
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value, dtype=np.float64)


def assign(variable, value: np.ndarray) -> None:
    variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
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


def resolve_rank(layer, what: str, spec, unfolding: np.ndarray, full: int, hint: str = "") -> int:
    """Turn a rank spec (None, int, 'vbmf', energy float) into an int in [1, full]."""
    if spec is None:
        return full
    if isinstance(spec, str):
        if spec.lower() == "vbmf":
            return min(full, max(1, estimate_rank(unfolding)))
        raise ValueError(
            f"{layer_label(layer)}: {what}={spec!r} is not understood; use None, an int, "
            "'vbmf' or an energy fraction in (0, 1]"
        )
    if isinstance(spec, bool):
        raise ValueError(  # noqa: TRY004
            f"{layer_label(layer)}: {what} must be an int, got {spec!r}")
    if isinstance(spec, numbers.Integral):
        if not 1 <= int(spec) <= full:
            raise ValueError(
                f"{layer_label(layer)}: {what}={int(spec)} is out of range; it must be in "
                f"[1, {full}]{hint}"
            )
        return int(spec)
    if isinstance(spec, numbers.Real):
        if not 0.0 < float(spec) <= 1.0:
            raise ValueError(
                f"{layer_label(layer)}: {what}={spec!r}: a float rank is an energy fraction "
                "and must be in (0, 1]; pass an int for an explicit rank"
            )
        return _energy_rank(unfolding, float(spec))
    raise ValueError(
        f"{layer_label(layer)}: {what}={spec!r} is not understood; use None, an int, "
        "'vbmf' or an energy fraction in (0, 1]"
    )


def common_bias_kwargs(layer) -> dict:
    return {
        "activation": layer.activation,
        "use_bias": layer.use_bias,
        "bias_regularizer": layer.bias_regularizer,
        "bias_constraint": layer.bias_constraint,
        "activity_regularizer": layer.activity_regularizer,
        "dtype": layer.dtype_policy,
    }


@dataclasses.dataclass
class Factored:
    """Internal result of one layer decomposition."""

    layers: list
    approx_kernel: np.ndarray  # the product of the factors, in the original kernel layout
    ranks: tuple
    method: str
