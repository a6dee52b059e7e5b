"""The gradient of a B shared by every matrix of A on the built-in side: the drop-in's
built-in path (`tf_smallmm.dropins.linalg.builtin_matmul`, what `smm.matmul` runs for
A[G, M, K] · B[K, N] where the dispatch model sends the product to the built-in) against
tf.linalg.matmul, with the model forced to the built-in for every product.

TF's gradient of the broadcasting BatchMatMulV2 forms the [G, K, N] products A[i]ᴴ · dC[i]
and sums them; the drop-in's is one [K, G·M] · [G·M, N] GEMM where that was the faster
(linalg.tall_gradient_applies), else TF's own. Each row times both
sides as the sweep does (`sweep.paired`: both in tf.function, interleaved rounds, median of
per-round ratios tf.linalg.matmul / drop-in, above 1 the drop-in is faster): forward (the
same op on both sides, a control of the noise), forward with dB only (a frozen A or a
model's input), forward with both gradients.

    python benchmarks/tall_gradient.py [--out benchmarks/TALL_GRADIENT-xeon.md]
                                       [--dtypes float32 ...] [--rounds 7]
"""

import argparse
import os
import sys
import time

import numpy as np
import tensorflow as tf

try:
    import tf_smallmm  # noqa: F401
except ImportError:  # run from a source checkout with an in-place build
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tf_smallmm._core import dispatch
from tf_smallmm.dropins import linalg
from tf_smallmm.tools import sweep

# (M, K, N): both sides of the rule's bounds, matrix-vector products, and the [G, T, D] ·
# [D, D] of a transformer's projections written with tf.matmul.
POINTS = [(1, 8, 8), (1, 32, 32), (1, 64, 64), (1, 256, 256), (1, 512, 512), (3, 3, 1),
          (4, 8, 8), (4, 16, 16), (8, 8, 8), (16, 16, 4), (8, 32, 1), (32, 32, 8),
          (16, 32, 32), (8, 64, 64), (64, 64, 64), (16, 128, 128), (128, 128, 128),
          (128, 512, 512)]
# TF's gradient materialises G·K·N elements: at most this many bytes of them.
MATERIALISED_MAX = 1 << 31


def groups(m, k, n, dtype):
    g = sweep._batch(m * k, m * n)
    return max(1, min(g, MATERIALISED_MAX // (k * n * dtype.size)))


def row(m, k, n, dtype, rounds):
    g = groups(m, k, n, dtype)
    a, b = sweep._tensor((g, m, k), dtype, 1), sweep._tensor((k, n), dtype, 2)
    dc = sweep._tensor((g, m, n), dtype, 3)
    ours_f, ours_g = sweep._steps(linalg.matmul, None, None, dtype)
    base_f, base_g = sweep._steps(tf.linalg.matmul, None, None, dtype)
    out = {"shape": f"[{g}, {m}, {k}] · [{k}, {n}]", "dtype": dtype.name,
           "folded": linalg.tall_gradient_applies(m, k, n)}
    out["fwd"] = sweep.paired(ours_f, base_f, (a, b), rounds)[0]
    for mode in ("fwd_db", "fwd_bwd"):
        out[mode], ours_s, base_s = sweep.paired(ours_g[mode], base_g[mode], (a, b, dc), rounds)
        if mode == "fwd_bwd":
            out["ms"] = (ours_s * 1e3, base_s * 1e3)
    return out


def markdown(rows, args, seconds):
    lines = [f"# The built-in side's gradient of a B shared by every matrix of A ({args.stamp})",
             "",
             (f"`python benchmarks/tall_gradient.py{args.command}` on {sweep.machine()}, "
             f"TensorFlow {tf.__version__}, {seconds / 60:.0f} min. Ratios are "
             "tf.linalg.matmul's time / the drop-in's with the dispatch model forced to the "
             "built-in (median of per-round ratios, paired and interleaved; above 1 the "
             "drop-in is faster). *one GEMM*: the drop-in's gradient is one "
             "[K, G·M] · [G·M, N] GEMM for dB (yes) or TF's own (no, where TF's was the "
             f"faster: M > {linalg.TALL_GRADIENT_MAX_M} with N < M or K·N < "
             f"{linalg.TALL_GRADIENT_MIN_KN}). The forward is the same op on both sides: its "
             "column is the noise."),
             "",
             "| A · B | dtype | one GEMM | fwd | fwd + dB | fwd + dA + dB | ms (drop-in / TF) |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {'yes' if r['folded'] else 'no'} | "
                     f"{r['fwd']:.2f} | {r['fwd_db']:.2f} | {r['fwd_bwd']:.2f} | "
                     f"{r['ms'][0]:.3g} / {r['ms'][1]:.3g} |")
    folded = [r["fwd_bwd"] for r in rows if r["folded"]]
    kept = [r["fwd_bwd"] for r in rows if not r["folded"]]
    fwd = [r["fwd"] for r in rows]
    lines += ["", (f"Forward (the control): {min(fwd):.2f}-{max(fwd):.2f}. Forward + both "
                   f"gradients, one GEMM: {min(folded, default=np.nan):.2f}-"
                   f"{max(folded, default=np.nan):.2f} "
                   f"(median {np.median(folded or [np.nan]):.2f}); TF's own: "
                   f"{min(kept, default=np.nan):.2f}-{max(kept, default=np.nan):.2f}."), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=[d.name for d in sweep.DTYPES])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.command = "".join(f" {a}" for a in sys.argv[1:])
    args.stamp = time.strftime("%Y-%m-%d")
    dispatch.choose = lambda *a, **kw: dispatch.BUILTIN  # the built-in side for every product
    start, rows = time.perf_counter(), []
    for dtype in map(tf.as_dtype, args.dtypes):
        for m, k, n in POINTS:
            rows.append(row(m, k, n, dtype, args.rounds))
            r = rows[-1]
            print(f"{r['shape']:28s} {r['dtype']:10s} one GEMM {r['folded']!s:5s} fwd "
                  f"{r['fwd']:.2f} fwd+dB {r['fwd_db']:.2f} fwd+bwd {r['fwd_bwd']:.2f}",
                  flush=True)
    text = markdown(rows, args, time.perf_counter() - start)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
