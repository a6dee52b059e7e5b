"""`python -m tf_smallmm.demo`: the capsule-prediction product on SmallMM vs TensorFlow.

Times û = W·u for W [1152, 10·16, 8] shared across u [50, 1152, 8] (the CapsNet digit
capsules) forward and forward+backward, with our matmul and with tf.linalg.matmul on the
same broadcast operands, in the same run, and shows which ops the traced graphs contain.
"""

import argparse
import time

import numpy as np
import tensorflow as tf

import tf_smallmm as smm


def median_ms(fn, *args, repeats=20):
    """Median wall time of fn(*args) after two warm-up calls; results are fetched so
    nothing is left running asynchronously."""
    for _ in range(2):
        tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def capsule_steps(matmul):
    fwd = tf.function(lambda w, u: matmul(w, u))

    @tf.function
    def fwd_bwd(w, u):
        with tf.GradientTape() as tape:
            tape.watch([w, u])
            y = matmul(w, u)
            loss = tf.reduce_sum(y * y)
        return loss, tape.gradient(loss, [w, u])

    return fwd, fwd_bwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    info = smm.build_info()
    print(f"tf_smallmm {smm.__version__} | TensorFlow {info['tf_runtime_version']} | "
          f"kernels loaded: {info['kernels_loaded']} | ISA: {info['active_isa']} | "
          f"devices: {','.join(info['devices']) or '-'}")
    w = tf.random.normal([1152, 160, 8], seed=1)
    u = tf.random.normal([args.batch, 1152, 8, 1], seed=2)
    rows = []
    results = {}
    for name, mm in (("tf_smallmm.matmul", smm.matmul), ("tf.linalg.matmul", tf.linalg.matmul)):
        fwd, fwd_bwd = capsule_steps(mm)
        results[name] = fwd(w, u)
        ops = sorted({op.type for op in fwd_bwd.get_concrete_function(w, u).graph.get_operations()
                      if "MatMul" in op.type})
        rows.append((name, median_ms(fwd, w, u, repeats=args.repeats),
                     median_ms(fwd_bwd, w, u, repeats=args.repeats), ", ".join(ops)))
    diff = float(tf.reduce_max(tf.abs(results["tf_smallmm.matmul"] - results["tf.linalg.matmul"])))
    print(f"\ncapsule prediction: W [1152,160,8] x u [{args.batch},1152,8,1] (float32), "
          f"median of {args.repeats}")
    print(f"| {'function':<18} | fwd ms | fwd+bwd ms | matmul ops in the graph |")
    print(f"|{'-' * 20}|-------:|-----------:|{'-' * 25}|")
    for name, f, fb, ops in rows:
        print(f"| {name:<18} | {f:6.2f} | {fb:10.2f} | {ops} |")
    print(f"\nspeed-up fwd {rows[1][1] / rows[0][1]:.2f}x, fwd+bwd {rows[1][2] / rows[0][2]:.2f}x;"
          f" max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
