"""A/B of two builds of the kernel core in one process on one thread: this checkout's
`_smallmm_core` against another build's (a copy of `tf_smallmm/_smallmm_core*.so` from an
earlier commit), over a grid of products whose kernel family the two builds choose
differently, timed as the sweep times (`sweep.paired`: each round times both back to back,
in a shuffled order, each for a few ms of repeated calls). A row prints both families, the
median of per-round ratios time(before) / time(after) (above 1: this build is
faster) and the largest difference between the two results, relative to the largest output.

    cp tf_smallmm/_smallmm_core*.so /tmp/before.so  # on the earlier commit, built
    python benchmarks/core_ab.py /tmp/before.so [--grid folded|named|reduce|adjoint] [--dtypes ...]
                                 [--isa avx2] [--rounds 15] [--all]

`--grid folded`: x [I, M, K] · y [N, I, K, 1] (a matrix shared by N vectors, folded into N
columns) for N = 2 and 4, M in 4..64, K in 4..24, ~2M elements; `named`: a few shapes from
the sweep's slow rows (capsule-like folds, matvecs, transposed B); `reduce`: the gradient
of a weight shared by a batch, g[B, M, N] · y[B, K, N]ᵀ summed over B (and over 4 per
group); `adjoint`: the input gradient of a weight shared by a batch, W[G, M, K]ᴴ · g[Bt, G,
M, N] (the sweep's shared grid: N = 1 with Bt = 1, 4, 16 columns folded, Bt = 4 with N = 8,
and one W[M, K] against g[B, M, 8 or 32]). `--all` prints the rows whose family did not
change too (the same kernel on both sides: a control of the noise, or a kernel changed
within its family).
"""
import argparse
import functools
import importlib.util
import itertools
import os
import sys

import ml_dtypes
import numpy as np

try:
    from tf_smallmm import _smallmm_core as core
except ImportError:  # run from a source checkout with an in-place build
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_smallmm import _smallmm_core as core
from tf_smallmm.tools import sweep

DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")
NAMED = [  # label, x shape, y shape, transpose_y (and the batch_shape summed to, or the
    # keywords of the call)
    ("A-shared (409,160,32) @ (4,409,32,1)", (409, 160, 32), (4, 409, 32, 1), False),
    ("A-shared (2048,32,32) @ (4,2048,32,1)", (2048, 32, 32), (4, 2048, 32, 1), False),
    ("A-shared (1152,16,8) @ (4,1152,8,1)", (1152, 16, 8), (4, 1152, 8, 1), False),
    ("8192x(16x16 @ 16x1)", (8192, 16, 16), (8192, 16, 1), False),
    ("2048x(32x32 @ 32x1)", (2048, 32, 32), (2048, 32, 1), False),
    ("8192x(16x16 @ (4x16)^T)", (8192, 16, 16), (8192, 4, 16), True),
    ("2048x(16x64 @ (4x64)^T)", (2048, 16, 64), (2048, 4, 64), True),
    ("1024x(64x128 @ (2x128)^T)", (1024, 64, 128), (1024, 2, 128), True),
]


def load_before(path):
    # The module's init function is named after its file (PyInit__smallmm_core): load it
    # under that name inside a package of its own so that both builds live side by side.
    spec = importlib.util.spec_from_file_location("before._smallmm_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def array(rng, shape, dtype):
    x = rng.standard_normal(shape)
    if dtype.kind == "c":
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def cases(grid):
    if grid == "named":
        yield from NAMED
        return
    if grid == "reduce":
        # The gradient of a weight shared by a batch: g[B, M, N] · y[B, K, N]ᵀ summed
        # over B, and over the 4 of g[4, G, M, N] · y[4, G, K, N]ᵀ per group G.
        for m, n, k in itertools.product((1, 3, 8, 16, 32, 160), (8, 32), (3, 8, 16, 32)):
            b = max(2, 2_000_000 // (m * n + k * n))
            yield (f"sum_B ({b},{m},{n}) @ ({b},{k},{n})^T", (b, m, n), (b, k, n), True, [])
            g = max(1, b // 4)
            yield (f"sum_4 (4,{g},{m},{n}) @ (4,{g},{k},{n})^T", (4, g, m, n), (4, g, k, n),
                   True, [g])
        return
    if grid == "adjoint":
        adj = {"transpose_x": True, "conjugate_x": True}  # conjugate_x: ignored for reals
        for m, k in itertools.product((3, 8, 16, 32, 160), (3, 8, 16, 32)):
            for bt, n in ((1, 1), (4, 1), (16, 1), (4, 8)):
                g = max(1, 2_000_000 // (m * k + bt * m * n + bt * k * n))
                yield (f"W ({g},{m},{k})^H @ ({bt},{g},{m},{n})", (g, m, k), (bt, g, m, n), adj)
            for n in (8, 32):
                b = max(1, 2_000_000 // (m * n + k * n))
                yield f"W ({m},{k})^H @ ({b},{m},{n})", (m, k), (b, m, n), adj
        return
    for n, m, k in itertools.product((2, 4), (4, 8, 12, 16, 24, 64), (4, 5, 8, 12, 16, 24)):
        i = max(1, 2_000_000 // (m * k + n * k))
        yield f"A-shared ({i},{m},{k}) @ ({n},{i},{k},1)", (i, m, k), (n, i, k, 1), False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", help="the other build's _smallmm_core shared object")
    ap.add_argument("--grid", choices=("folded", "named", "reduce", "adjoint"), default="named")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--isa", help="run both builds on this ISA's kernels (set_isa)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--all", action="store_true", help="also rows on the same family")
    args = ap.parse_args(argv)
    before = load_before(args.before)
    if args.isa and not (core.set_isa(args.isa) and before.set_isa(args.isa)):
        sys.exit(f"this CPU lacks {args.isa}")
    print(f"ISA {core.active_isa()}; ratio = time(before) / time(after), one thread")
    rng = np.random.default_rng(0)
    for (label, xs, ys, how, *batch), name in itertools.product(cases(args.grid),
                                                                args.dtypes.split(",")):
        dtype = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
        x, y = array(rng, xs, dtype), array(rng, ys, dtype)
        if isinstance(how, dict):
            kw = dict(how)
        else:
            kw = {"transpose_y": how, "batch_shape": batch[0] if batch else None}
        fam_after, fam_before = core.kernel_for(x, y, **kw), before.kernel_for(x, y, **kw)
        if fam_after == fam_before and not args.all:
            continue
        got = core.matmul(x, y, **kw).astype(np.complex128)
        want = before.matmul(x, y, **kw).astype(np.complex128)
        diff = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
        ratio, _, _ = sweep.paired(functools.partial(core.matmul, **kw),
                                   functools.partial(before.matmul, **kw), (x, y),
                                   args.rounds)
        print(f"{label:40s} {name:10s} {fam_before:>10s} -> {fam_after:10s} {ratio:6.2f}x  "
              f"diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
