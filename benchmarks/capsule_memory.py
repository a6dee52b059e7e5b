"""Peak extra memory and time of capsule prediction, forward + backward.

    python benchmarks/capsule_memory.py [--batch 50] [--repeats 5] [--tiled]

Measures û = einsum('ijkl,bil->bijk', W, u) with W [1152, 10, 16, 8], u [batch, 1152, 8]
and its gradients for W and u (given an upstream gradient), as one tf.function, for
`tf_smallmm.capsule_predict` and `tf.einsum` (and, with --tiled, the tile-then-matmul
formulation of the classic CapsNet notebook), one after the other in the same process.

"Peak extra" is TensorFlow's CPU allocator peak during the first call of the traced
function minus what was allocated just before (tf.config.experimental.get_memory_info /
reset_memory_stats on 'CPU:0'; on TF 2.21 with oneDNN the CPU allocator keeps these
statistics). It includes the three outputs û, dW and du (42.5 MiB at batch 50), which
every formulation allocates, and the allocator's rounding: a 35 MiB tensor can occupy a
64 MiB chunk. "Largest tensor" is the biggest tensor in the traced graph (exact, no
rounding). Process RSS is useless here: the allocator pools memory.
"""

import argparse
import os
import sys
import time

import tensorflow as tf

try:
    import tf_smallmm as smm
except ImportError:  # run from a source checkout with an in-place build
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tf_smallmm as smm

IN_CAPS, OUT_CAPS, OUT_DIM, IN_DIM = 1152, 10, 16, 8


def predict(variant, w, u):
    if variant == "smallmm":
        return smm.capsule_predict(w, u)
    if variant == "einsum":
        return tf.einsum("ijkl,bil->bijk", w, u)
    # tiled: W copied once per batch row, u once per output capsule, then one matmul.
    n = tf.shape(u)[0]
    w_tiled = tf.tile(w[None], [n, 1, 1, 1, 1])
    u_tiled = tf.tile(u[:, :, None, :, None], [1, 1, OUT_CAPS, 1, 1])
    return tf.squeeze(tf.matmul(w_tiled, u_tiled), -1)


def measure(variant, w, u, g, repeats):
    @tf.function
    def step(w, u, g):
        with tf.GradientTape() as tape:
            tape.watch([w, u])
            y = predict(variant, w, u)
        dw, du = tape.gradient(y, [w, u], output_gradients=g)
        return y, dw, du

    graph = step.get_concrete_function(w, u, g).graph  # trace without running
    largest = max((t.shape.num_elements() * t.dtype.size for op in graph.get_operations()
                   for t in op.outputs if t.shape.is_fully_defined()), default=0)
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    out = step(w, u, g)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    del out
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = step(w, u, g)
        times.append(time.perf_counter() - start)
        del out
    return peak, largest, min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (best of)")
    parser.add_argument("--tiled", action="store_true", help="also the tile+matmul form")
    parser.add_argument("--reverse", action="store_true", help="measure in reverse order")
    args = parser.parse_args()
    w = tf.random.normal([IN_CAPS, OUT_CAPS, OUT_DIM, IN_DIM])
    u = tf.random.normal([args.batch, IN_CAPS, IN_DIM])
    g = tf.random.normal([args.batch, IN_CAPS, OUT_CAPS, OUT_DIM])
    outputs = 4 * (g.shape.num_elements() + w.shape.num_elements() + u.shape.num_elements())
    print(f"capsule prediction fwd+bwd, W {w.shape.as_list()}, u {u.shape.as_list()}, "
          f"float32; outputs û+dW+du = {outputs / 2**20:.1f} MiB")
    print(f"{'variant':<10} {'peak extra MiB':>15} {'beyond outputs':>15} "
          f"{'largest tensor':>15} {'best ms':>9}")
    variants = ["smallmm", "einsum"] + (["tiled"] if args.tiled else [])
    for variant in (variants[::-1] if args.reverse else variants):
        peak, largest, seconds = measure(variant, w, u, g, args.repeats)
        print(f"{variant:<10} {peak / 2**20:>15.1f} {(peak - outputs) / 2**20:>15.1f} "
              f"{largest / 2**20:>15.1f} {1e3 * seconds:>9.1f}")


if __name__ == "__main__":
    main()
