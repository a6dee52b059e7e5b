"""`decompose_model`: applies a policy to the layers of a Sequential or functional model and
rebuilds the model around the new layers, with a report of what changed."""

from __future__ import annotations

import keras
import numpy as np

from tf_smallmm.decompose.common import Factored, layer_label, to_numpy64
from tf_smallmm.decompose.conv import factor_conv2d
from tf_smallmm.decompose.dense import factor_dense
from tf_smallmm.decompose.report import (
    DecompositionReport,
    flops,
    random_input,
    time_interleaved,
)

try:  # Keras 3 keeps the functional model class private; Sequential and Model are public.
    from keras.src.models.functional import Functional as _Functional
except ImportError:  # pragma: no cover
    _Functional = keras.Model


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


def _apply_options(layer, options, name) -> Factored:
    if options is True:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(
            f"{layer_label(layer)}: policy options must be a dict (or True/None/False), "
            f"got {options!r}"
        )
    options = dict(options)
    if isinstance(layer, keras.layers.Dense):
        method = options.pop("method", "svd")
        if method != "svd":
            raise ValueError(f"{layer_label(layer)}: Dense layers support method='svd' only")
        unknown = set(options) - {"rank"}
        if unknown:
            raise ValueError(f"{layer_label(layer)}: unknown options {sorted(unknown)}")
        return factor_dense(layer, options.get("rank"), name=name)
    unknown = set(options) - {"method", "ranks", "n_iter_max", "tol", "random_state"}
    if unknown:
        raise ValueError(f"{layer_label(layer)}: unknown options {sorted(unknown)}")
    method = options.pop("method", "tucker")
    ranks = options.pop("ranks", None)
    return factor_conv2d(layer, method, ranks, name=name, **options)


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
    factored = {}  # id(original layer) -> (original layer, Factored)
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
        K = to_numpy64(layer.kernel)
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
            row["flops_before"] = flops([(layer, out_shape)])
            row["flops_after"] = flops(zip(result.layers, new_shapes))
            x = random_input(in_shape, layer.compute_dtype, latency_batch, seed=0)
            if measure_latency and x is not None:

                def chain(x, new_layers=tuple(result.layers)):
                    for new_layer in new_layers:
                        x = new_layer(x)
                    return x

                row["latency_ms_before"], row["latency_ms_after"] = time_interleaved(
                    [layer, chain], (x,), latency_runs
                )
        rows.append(row)

    totals = {"params_before": model.count_params(), "params_after": new_model.count_params()}
    if measure_latency:
        xs = [random_input(t.shape, t.dtype, latency_batch, seed=1) for t in model.inputs]
        if all(x is not None for x in xs):
            args = (xs[0] if len(xs) == 1 else xs,)
            before, after = time_interleaved(
                [lambda x: model(x, training=False), lambda x: new_model(x, training=False)],
                args,
                latency_runs,
            )
            totals.update(latency_ms_before=before, latency_ms_after=after)
    return new_model, DecompositionReport(rows, totals, skipped)
