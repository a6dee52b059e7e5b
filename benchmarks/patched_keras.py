"""Stock Keras layers before and after `tf_smallmm.patch()`: time per step of unmodified
keras.layers.MultiHeadAttention (Keras 3 and tf_keras) with small head dims, and
EinsumDense, forward and forward + backward, as tf.functions.

    python benchmarks/patched_keras.py [--repeats 7] [--rounds 5] [--batch 32]

For each case one model (same weights) is traced twice in one process: once unpatched
(TensorFlow's einsum / matmul) and once inside `tf_smallmm.patched()` (SmallMM; the
attention einsums 'BTNH,BSNH->BNTS' / 'BNTS,BSNH->BTNH' and tf_keras' 'aecd,abcd->acbe' /
'acbe,aecd->abcd' run as strided products, no transposes). The two are then timed
interleaved, `--rounds` times, each round the median of `--repeats` calls, and the
reported figure is the median over rounds of the per-round ratio built-in / patched
(> 1: patched is faster). Ratios within one process, never absolute times across runs:
the machine may be shared. The op's result is fetched with a single-element reduction,
not a `.numpy()` copy of the whole output.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

try:
    import tf_smallmm as smm
except ImportError:  # run from a source checkout with an in-place build
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tf_smallmm as smm


def keras3_mha(heads, head_dim, seq):
    import keras

    keras.utils.set_random_seed(0)
    return keras.layers.MultiHeadAttention(heads, head_dim), (seq, heads * head_dim)


def tf_keras_mha(heads, head_dim, seq):
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    return tf_keras.layers.MultiHeadAttention(heads, head_dim), (seq, heads * head_dim)


def keras3_einsum_dense(heads, head_dim, seq):
    import keras

    keras.utils.set_random_seed(0)
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, heads, head_dim))
    return layer, (seq, heads * head_dim)


def step_fns(layer, x, backward):
    """A tf.function for the layer's forward (and its gradients), returning one scalar."""
    attention = "Attention" in type(layer).__name__
    layer(x, x) if attention else layer(x)  # build the weights

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, x) if attention else layer(x)
            loss = tf.reduce_sum(y)
        if not backward:
            return loss
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads])

    return step


def median_seconds(fn, x, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        float(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(make, heads, head_dim, seq, batch, backward, repeats, rounds):
    layer, shape = make(heads, head_dim, seq)
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch,) + shape), tf.float32)
    builtin = step_fns(layer, x, backward)
    builtin.get_concrete_function(x)
    with smm.patched():
        patched = step_fns(layer, x, backward)
        patched.get_concrete_function(x)
    graph = patched.get_concrete_function(x).graph
    ops = sorted({n.op for f in graph._functions.values() for n in f.definition.node_def
                  if n.op.startswith("SmallMM")} | {o.type for o in graph.get_operations()
                                                     if o.type.startswith("SmallMM")})
    np.testing.assert_allclose(float(patched(x)), float(builtin(x)), rtol=1e-4)
    for fn in (builtin, patched):  # warm up
        median_seconds(fn, x, 3)
    ratios, base = [], []
    for _ in range(rounds):
        b = median_seconds(builtin, x, repeats)
        p = median_seconds(patched, x, repeats)
        ratios.append(b / p)
        base.append(b)
    return statistics.median(ratios), min(ratios), max(ratios), statistics.median(base), ops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    cases = [("Keras 3 MultiHeadAttention", keras3_mha, 8, 8, 16),
             ("Keras 3 MultiHeadAttention", keras3_mha, 8, 8, 32),
             ("Keras 3 MultiHeadAttention", keras3_mha, 8, 8, 64),
             ("tf_keras MultiHeadAttention", tf_keras_mha, 8, 8, 16),
             ("tf_keras MultiHeadAttention", tf_keras_mha, 8, 8, 32),
             ("tf_keras MultiHeadAttention", tf_keras_mha, 8, 8, 64),
             ("Keras 3 MultiHeadAttention", keras3_mha, 4, 16, 32),
             ("Keras 3 EinsumDense abc,cde->abde", keras3_einsum_dense, 8, 8, 32)]
    print(f"batch {args.batch}; ratio = built-in time / patched time (> 1: patched faster), "
          f"median [min, max] of {args.rounds} interleaved rounds of {args.repeats} calls")
    print("| layer | heads × dim | seq | pass | built-in ms | ratio | SmallMM ops |")
    print("|---|---|---|---|---|---|---|")
    for name, make, heads, head_dim, seq in cases:
        for backward in (False, True):
            ratio, lo, hi, base, ops = compare(make, heads, head_dim, seq, args.batch, backward,
                                               args.repeats, args.rounds)
            print(f"| {name} | {heads} × {head_dim} | {seq} | "
                  f"{'fwd+bwd' if backward else 'fwd'} | {base * 1e3:.3f} | "
                  f"{ratio:.2f} [{lo:.2f}, {hi:.2f}] | {', '.join(ops) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
