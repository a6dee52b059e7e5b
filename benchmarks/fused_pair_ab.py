"""A/B of the fused gradient pair (cc/engine/gemm/pair.h) against the two-product path, in
one process on one thread: capsule prediction's backward pair, dW[i] = Σ_b g[b,i]·u[b,i]ᵀ and
du[b,i] = W[i]ᵀ·g[b,i], through `_smallmm_core.matmul_pair` with `set_fused_pairs` toggled,
order alternating each round; prints the medians and the median of per-round ratios.

    python benchmarks/fused_pair_ab.py [B] [float32|float16|float64] [I,S,N] [rounds]

e.g. `python benchmarks/fused_pair_ab.py 50 float32 1152,160,8` (CapsNet's digit capsules).
"""
import sys
import time

import numpy as np

from tf_smallmm import _smallmm_core as core


def main(argv):
    b = int(argv[1]) if len(argv) > 1 else 50
    dtype = np.dtype(argv[2] if len(argv) > 2 else "float32")
    i, s, n = map(int, argv[3].split(",")) if len(argv) > 3 else (1152, 160, 8)
    rounds = int(argv[4]) if len(argv) > 4 else 15
    rng = np.random.default_rng(0)
    w = rng.standard_normal((i, s, n)).astype(dtype)
    u = rng.standard_normal((b, i, n, 1)).astype(dtype)
    g = rng.standard_normal((b, i, s, 1)).astype(dtype)

    def once(fused):
        core.set_fused_pairs(fused)
        t0 = time.perf_counter()
        _, _, ran_fused = core.matmul_pair(g, u, False, True, [i], w, g, True, False, [b, i])
        elapsed = time.perf_counter() - t0
        return elapsed, ran_fused

    try:
        _, fuses = once(True)
        once(False)
        times = {True: [], False: []}
        ratios = []
        for r in range(rounds):
            got = {f: once(f)[0] for f in ((True, False) if r % 2 else (False, True))}
            for f, t in got.items():
                times[f].append(t)
            ratios.append(got[False] / got[True])
    finally:
        core.set_fused_pairs(True)
    print(f"B={b} I,S,N={i},{s},{n} {dtype.name}: fused={fuses} "
          f"fused {np.median(times[True]) * 1e3:.2f} ms, two products "
          f"{np.median(times[False]) * 1e3:.2f} ms, two products / fused {np.median(ratios):.2f}")


if __name__ == "__main__":
    main(sys.argv)
