"""Kernel grid: the raw SmallMM op against tf.linalg.matmul, shape class by shape class.

For each case of a grid of small products (sizes M, N, K from 1 to 32, matrix-vector
products, transpose flags, shared and broadcast operands, all six dtypes) this times
`tf_smallmm._core.engine.product` and `tf.linalg.matmul` inside tf.function, forward and
forward+backward (both gradients for a fixed upstream gradient, through
`tf.GradientTape.gradient(y, [a, b], output_gradients=g)`), and prints the kernel family
that runs each product (`_smallmm_core.kernel_for`: the forward product, then the products
that form dA and dB).

Timing is paired and interleaved in one process: each round times both implementations
back to back (alternating which goes first), and a case reports the median over rounds of
the ratio time(tf.linalg.matmul) / time(SmallMM), so above 1 the SmallMM op is faster. On a
shared machine, compare ratios, never absolute times across runs. Batches are sized so the
operands and the output of one call take about --mib MiB together.

    python benchmarks/kernel_grid.py                       # the whole grid, a few minutes
    python benchmarks/kernel_grid.py --only 'B,32,3'       # cases whose name matches
    python benchmarks/kernel_grid.py --dtypes float32 --fwd-only --json before.json
    TF_SMALLMM_ISA=avx2 python benchmarks/kernel_grid.py   # another ISA's kernels

`--compare before.json` adds the ratios of an earlier run as columns; `--markdown
benchmarks/KERNELS.md` writes the table with the machine, ISA and command it came from.
"""

import argparse
import itertools
import json
import os
import re
import sys
import time

import ml_dtypes
import numpy as np
import tensorflow as tf

try:
    from tf_smallmm import _smallmm_core as core
except ImportError:  # run from a source checkout with an in-place build
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_smallmm import _smallmm_core as core
from tf_smallmm._core import engine
from tf_smallmm.tools import sweep

MiB = 1 << 20
SIZES = (1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 24, 32)
DTYPES = ("float32", "float16", "bfloat16", "float64", "complex64", "complex128")


# --------------------------------------------------------------------------- the grid
class Case:
    """op(A) @ op(B), A of shape a_shape and B of b_shape (batch axes included)."""

    def __init__(self, group, m, n, k, dtype, layout="batch", ta=False, tb=False, adj=False,
                 mib=4.0):
        self.group, self.m, self.n, self.k, self.dtype = group, m, n, k, dtype
        self.layout, self.ta, self.tb, self.adj = layout, ta, tb, adj
        itemsize = np.dtype(np_dtype(dtype)).itemsize
        a_mat = (k, m) if ta else (m, k)
        b_mat = (n, k) if tb else (k, n)
        per_item = {"batch": m * k + k * n + m * n, "b_shared": m * k + m * n,
                    "b_shared1": m * k + m * n, "a_shared": k * n + m * n,
                    "rank4": m * n}[layout]
        batch = max(1, int(mib * MiB / (itemsize * per_item)))
        self.batch = batch
        if layout == "batch":
            self.a_shape, self.b_shape = (batch,) + a_mat, (batch,) + b_mat
        elif layout == "b_shared":  # [B, M, K] @ [K, N]
            self.a_shape, self.b_shape = (batch,) + a_mat, b_mat
        elif layout == "b_shared1":  # [B, M, K] @ [1, K, N]
            self.a_shape, self.b_shape = (batch,) + a_mat, (1,) + b_mat
        elif layout == "a_shared":  # [M, K] @ [B, K, N]
            self.a_shape, self.b_shape = a_mat, (batch,) + b_mat
        else:  # rank 4, both broadcast: [8, 1, M, K] @ [1, B/8, K, N]
            b2 = max(1, batch // 8)
            self.batch = 8 * b2
            self.a_shape, self.b_shape = (8, 1) + a_mat, (1, b2) + b_mat

    @property
    def name(self):
        def shape(s, batch):
            dims = ["B" if d == batch and d > 32 else str(d) for d in s]
            return "[" + ",".join(dims) + "]"

        batch = max(self.a_shape[0] if len(self.a_shape) > 2 else 1,
                    self.b_shape[-3] if len(self.b_shape) > 2 else 1)
        flags = ""
        if self.ta or self.tb:
            op = "adjoint" if self.adj else "transpose"
            flags = " " + ",".join(f"{op}_{x}" for x, on in (("a", self.ta), ("b", self.tb))
                                   if on)
        return f"{shape(self.a_shape, batch)}@{shape(self.b_shape, batch)}{flags}"


def grid(mib):
    """The cases, grouped by the shape class they probe."""
    out = []
    f32 = "float32"
    # Matrix-vector products: every M, short and long K (N = 1 is its own kernel family).
    for m, k in itertools.product(SIZES, (3, 8, 24)):
        out.append(Case("matvec", m, 1, k, f32, mib=mib))
    for k in (1, 2, 4, 5, 7, 12, 32):
        out.append(Case("matvec", 32, 1, k, f32, mib=mib))
    # n×n×n.
    for n in SIZES:
        out.append(Case("cube", n, n, n, f32, mib=mib))
    # The classes the issue names, then a fixed sample of the whole M×N×K cube.
    named = [(5, 12, 7), (7, 7, 7), (7, 5, 12), (6, 16, 8), (16, 2, 8), (32, 3, 12), (20, 2, 20),
             (8, 3, 3), (8, 8, 32), (12, 16, 32), (5, 5, 32), (32, 32, 3), (16, 24, 3)]
    for m, n, k in named:
        out.append(Case("class", m, n, k, f32, mib=mib))
    rng = np.random.default_rng(13)
    seen = {(c.m, c.n, c.k) for c in out}
    cube = [t for t in itertools.product(SIZES, repeat=3) if t[1] > 1 and t not in seen]
    for i in rng.choice(len(cube), size=50, replace=False):
        m, n, k = cube[i]
        out.append(Case("sample", m, n, k, f32, mib=mib))
    # Transpose flags.
    for (m, n, k), (ta, tb) in itertools.product(
            [(5, 12, 7), (8, 8, 8), (16, 16, 16), (20, 1, 20), (32, 1, 3), (12, 3, 16)],
            [(True, False), (False, True), (True, True)]):
        out.append(Case("flags", m, n, k, f32, ta=ta, tb=tb, mib=mib))
    # Shared and broadcast operands.
    for (m, n, k), layout in itertools.product(
            [(4, 4, 4), (8, 8, 8), (5, 12, 7), (32, 1, 3), (16, 4, 16), (20, 20, 20)],
            ["b_shared", "b_shared1", "a_shared", "rank4"]):
        out.append(Case("broadcast", m, n, k, f32, layout=layout, mib=mib))
    # The other dtypes.
    for dtype, (m, n, k) in itertools.product(
            DTYPES[1:], [(2, 2, 2), (4, 4, 4), (5, 12, 7), (8, 8, 8), (16, 16, 16), (20, 20, 20),
                         (32, 32, 32), (32, 1, 3), (20, 1, 20), (12, 3, 16)]):
        out.append(Case("dtype", m, n, k, dtype, mib=mib))
    for dtype in ("complex64", "complex128"):
        out.append(Case("dtype", 8, 8, 8, dtype, tb=True, adj=True, mib=mib))
    return out


# --------------------------------------------------------------------------- data
def np_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def tensor(shape, dtype, seed):
    x = tf.random.stateless_uniform(shape, (seed, 1), -1, 1, tf.float64)
    if dtype.startswith("complex"):
        x = tf.complex(x, tf.random.stateless_uniform(shape, (seed, 2), -1, 1, tf.float64))
    return tf.cast(x, dtype)


def families(case):
    """Kernel families of the forward product and of the products forming dA and dB
    (the op's own gradient products, tf_smallmm._core.engine.grad_jobs)."""
    dt = np_dtype(case.dtype)
    a, b = np.zeros(case.a_shape, dt), np.zeros(case.b_shape, dt)
    out_shape = np.broadcast_shapes(case.a_shape[:-2], case.b_shape[:-2]) + (case.m, case.n)
    ca, cb = case.adj and case.ta, case.adj and case.tb
    names = [core.kernel_for(a, b, case.ta, ca, case.tb, cb)]
    for lhs, rhs, batch, _ in engine.grad_jobs(tf.constant(a), tf.constant(b), case.ta, ca,
                                               case.tb, cb, tf.zeros(out_shape, case.dtype)):
        names.append(core.kernel_for(lhs[0].numpy(), rhs[0].numpy(), lhs[1], lhs[2], rhs[1],
                                     rhs[2], batch_shape=list(batch)))
    return names


# --------------------------------------------------------------------------- timing
def steps(case, ours):
    """The forward and the forward+backward step of one implementation."""
    ta, tb, adj = case.ta, case.tb, case.adj

    def fn(a, b):
        if ours:
            return engine.product(a, b, ta, adj and ta, tb, adj and tb)
        if adj:
            return tf.linalg.matmul(a, b, adjoint_a=ta, adjoint_b=tb)
        return tf.linalg.matmul(a, b, transpose_a=ta, transpose_b=tb)

    fwd = tf.function(fn)

    @tf.function
    def fwd_bwd(a, b, g):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = fn(a, b)
        # y is returned too, or the forward product would be pruned from the graph.
        return [y] + tape.gradient(y, [a, b], output_gradients=g)

    return fwd, fwd_bwd


def paired_ratio(f_ours, f_tf, args, rounds, min_seconds):
    """Median over rounds of time(tf) / time(ours), timed back to back, alternating order
    (tf_smallmm.tools.sweep.paired); also the median per-call times in ms."""
    ratio, t_ours, t_tf = sweep.paired(f_ours, f_tf, args, rounds, seconds=min_seconds)
    return ratio, 1e3 * t_ours, 1e3 * t_tf


def run(case, args):
    a = tensor(case.a_shape, case.dtype, 1)
    b = tensor(case.b_shape, case.dtype, 2)
    ours_f, ours_fb = steps(case, True)
    tf_f, tf_fb = steps(case, False)
    g = tensor(ours_f(a, b).shape, case.dtype, 3)
    row = {"group": case.group, "case": case.name, "dtype": case.dtype, "batch": case.batch,
           "families": families(case)}
    row["fwd"], row["ours_ms"], row["tf_ms"] = paired_ratio(ours_f, tf_f, (a, b), args.rounds,
                                                            args.min_seconds)
    if not args.fwd_only:
        row["fwd_bwd"], row["ours_fb_ms"], row["tf_fb_ms"] = paired_ratio(
            ours_fb, tf_fb, (a, b, g), args.rounds, args.min_seconds)
    return row


# --------------------------------------------------------------------------- report
def fmt(x):
    return "-" if x is None else f"{x:.2f}"


def report(rows, before):
    keyed = {(r["case"], r["dtype"]): r for r in before}
    head = "| group | case | dtype | kernels fwd / dA / dB | fwd × | f+b × |"
    rule = "|---|---|---|---|---:|---:|"
    if before:
        head += " before fwd × | before f+b × |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['group']} | {r['case']} | {r['dtype']} | {' / '.join(r['families'])} | "
                f"{fmt(r['fwd'])} | {fmt(r.get('fwd_bwd'))} |")
        if before:
            old = keyed.get((r["case"], r["dtype"]), {})
            line += f" {fmt(old.get('fwd'))} | {fmt(old.get('fwd_bwd'))} |"
        lines.append(line)
    ratios = [r["fwd"] for r in rows] + [r["fwd_bwd"] for r in rows if "fwd_bwd" in r]
    lines.append("")
    lines.append(f"{len(rows)} cases: ratios below 0.95 {sum(x < 0.95 for x in ratios)}, "
                 f"below 1.0 {sum(x < 1.0 for x in ratios)} of {len(ratios)}; "
                 f"min {min(ratios):.2f}, median {np.median(ratios):.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="regular expression on the case name or group")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--groups", help="comma-separated groups (matvec, cube, class, sample, "
                   "flags, broadcast, dtype)")
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.01, help="per timed measurement")
    p.add_argument("--mib", type=float, default=4.0, help="operands + output per call")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--compare", help="rows of an earlier run (--json), shown alongside")
    p.add_argument("--list", action="store_true", help="list the cases and their kernels")
    p.add_argument("--markdown", help="write the table here, headed by machine and command")
    args = p.parse_args(argv)
    dtypes = set(args.dtypes.split(","))
    groups = set(args.groups.split(",")) if args.groups else None
    cases = [c for c in grid(args.mib) if c.dtype in dtypes
             and (groups is None or c.group in groups)
             and (not args.only or re.search(args.only, f"{c.group} {c.name}"))]
    print(f"SmallMM ISA {core.active_isa()}, TF {tf.__version__}, {len(cases)} cases",
          file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    for c in cases:
        if args.list:
            rows.append({"group": c.group, "case": c.name, "dtype": c.dtype, "batch": c.batch,
                         "families": families(c), "fwd": float("nan")})
            continue
        rows.append(run(c, args))
        r = rows[-1]
        print(f"{r['group']:9} {r['case']:40} {r['dtype']:10} {'/'.join(r['families']):30} "
              f"fwd {r['fwd']:5.2f}  f+b {r.get('fwd_bwd', float('nan')):5.2f}",
              file=sys.stderr, flush=True)
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    before = []
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
    table = report(rows, before)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Kernel grid: the raw SmallMM op against tf.linalg.matmul\n\n"
                    f"{time.strftime('%Y-%m-%d')}, {sweep.machine()}, SmallMM ISA "
                    f"{core.active_isa()}, TensorFlow {tf.__version__}; "
                    f"`python benchmarks/kernel_grid.py {' '.join(argv or sys.argv[1:])}`.\n"
                    "Ratios are the median over rounds of time(tf.linalg.matmul) / time(ours), "
                    "paired and interleaved in one process: above 1, ours is faster. Kernels: "
                    "the families that run the forward product, dA and dB.\n\n"
                    + table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=0)


if __name__ == "__main__":
    main()
