"""What `decompose_model` reports: parameters, FLOPs per example (from each layer's kernel
and output shape), latency from interleaved runs, and `DecompositionReport`, the table."""

from __future__ import annotations

import statistics
import time

import keras
import numpy as np

from tf_smallmm.decompose.common import to_numpy64


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


def flops(pairs) -> int | None:
    total = 0
    for layer, shape in pairs:
        macs = _macs(layer, shape)
        if macs is None:
            return None
        total += 2 * macs
    return total


def random_input(shape, dtype, batch, seed):
    dims = tuple(shape)[1:]
    if any(d is None for d in dims):
        return None
    rng = np.random.default_rng(seed)
    return keras.ops.convert_to_tensor(rng.standard_normal((batch, *dims)), dtype=dtype)


def time_interleaved(functions, args, runs: int) -> list:
    """Median wall time in ms of each function on `args`, measured alternately in one run."""
    import tensorflow as tf

    compiled = [tf.function(f, autograph=False, reduce_retracing=True) for f in functions]
    for f in compiled:  # trace and warm up
        for _ in range(2):
            keras.tree.map_structure(to_numpy64, f(*args))
    samples = [[] for _ in compiled]
    for _ in range(runs):
        for f, times in zip(compiled, samples):
            start = time.perf_counter()
            keras.tree.map_structure(to_numpy64, f(*args))
            times.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in samples]


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
