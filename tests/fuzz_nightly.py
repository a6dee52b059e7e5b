"""Long fuzzing run (not collected by pytest): many more cases than tests/test_fuzz.py, with
fresh seeds, plus the cases too slow for CI.

    python tests/fuzz_nightly.py                      # 3 rounds x 50 000 cases per family
    python tests/fuzz_nightly.py --rounds 10 --cases 200000 --seed 123
    python tests/fuzz_nightly.py --families core raw

Every round runs each family in its own subprocess with seed = base seed + round; a failure
prints the seed, the case and the problem, and the exit status is 1. Replay one with
    SMALLMM_FUZZ_SEED=<seed> python -m pytest tests/test_fuzz.py -k <family>
(CI adds the family's index to the seed: public +0, raw +1, core +2) or by calling
fuzz_cases.run_worker(family, seed, count, "/tmp/progress") directly.
"""

import argparse
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the helpers, and an in-place build

import fuzz_cases
from conftest import run_python

# Cases too slow for CI: outputs that cannot be allocated. TensorFlow's CPU allocator
# retries a failed allocation for 10 s before it reports OOM, so each costs 10 s.
SLOW_CASES = """
    import tensorflow as tf
    from tf_smallmm._core import loader
    lib = loader.load()
    x, y = tf.ones([3, 4]), tf.ones([4, 2])
    for bs in ([2**40], [2**31, 2**10], [3, 2**50]):
        try:
            lib.small_mm_batch_mat_mul_reduce(x, y, tf.constant(bs, tf.int64))
        except tf.errors.ResourceExhaustedError as e:
            assert "OOM" in str(e), e
        else:
            raise AssertionError(f"batch_shape {bs}: allocated")
    print("OK")
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=50_000, help="cases per family per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=None, help="base seed (default: random)")
    p.add_argument("--families", nargs="+", default=list(fuzz_cases.FAMILIES),
                   choices=fuzz_cases.FAMILIES)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per subprocess")
    p.add_argument("--skip-slow", action="store_true", help="skip the 10 s OOM cases")
    args = p.parse_args(argv)
    base = args.seed if args.seed is not None else random.randrange(2**31)
    total, bad, start = 0, 0, time.time()
    print(f"fuzz_nightly: base seed {base}, {args.rounds} rounds x {args.cases} cases x "
          f"{args.families}", flush=True)
    for r in range(args.rounds):
        for family in args.families:
            seed = base + 1000 * r + fuzz_cases.FAMILIES.index(family)
            summary, crash = fuzz_cases.run_family(family, seed, args.cases, args.timeout)
            if crash:
                bad += 1
                print(f"CRASH {crash}", flush=True)
                continue
            total += summary["cases"]
            print(f"  round {r} {family}: {summary['cases']} cases {summary['outcomes']} "
                  f"{summary['seconds']} s, seed {seed}", flush=True)
            for f in summary["failures"]:
                bad += 1
                print(f"FAIL seed {seed} case {f['case']}: {f['desc']}", flush=True)
                for problem in f["problems"]:
                    print(f"    {problem}", flush=True)
    if not args.skip_slow:
        r = run_python(SLOW_CASES, timeout=300)
        ok = r.returncode == 0 and "OK" in r.stdout
        bad += not ok
        print(f"  unallocatable outputs: {'OK' if ok else 'FAIL ' + r.stderr[-2000:]}")
    print(f"fuzz_nightly: {total} cases, {bad} failures, {time.time() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
