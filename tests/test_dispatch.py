"""The dispatch policy's switches: builtin_ops() blocks (nested, overlapping, from many
threads) and what they leave behind."""

import os
import threading

import tensorflow as tf
from conftest import smallmm_ops

import tf_smallmm as smm
from tf_smallmm._core import dispatch
from tf_smallmm.layers import builtin_ops


def matmul_ops():
    spec = tf.TensorSpec([4, 3, 3])
    return smallmm_ops(tf.function(smm.matmul).get_concrete_function(spec, spec))


def test_overlapping_blocks_closed_out_of_order_leave_nothing_forced():
    env, was_disabled = os.environ.get("TF_SMALLMM_DISABLE"), dispatch.disabled()
    first, second = builtin_ops(), builtin_ops()
    first.__enter__()
    try:
        second.__enter__()
        try:
            assert dispatch.disabled() and not matmul_ops()
        finally:
            first.__exit__(None, None, None)  # the first block closes first
        assert dispatch.disabled()  # the second is still open
    finally:
        second.__exit__(None, None, None)
    assert dispatch.disabled() == was_disabled
    assert os.environ.get("TF_SMALLMM_DISABLE") == env
    assert bool(matmul_ops()) == (not was_disabled)


def test_blocks_in_many_threads_force_the_builtins_until_the_last_closes():
    was_disabled = dispatch.disabled()
    threads = 8
    all_open, first_closed = threading.Barrier(threads), threading.Event()
    seen_while_open = []

    def block(i):
        with builtin_ops():
            all_open.wait()
            if i == 0:
                first_closed.wait()  # thread 0 closes last
            seen_while_open.append(dispatch.disabled())
        if i == 1:
            first_closed.set()

    workers = [threading.Thread(target=block, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert seen_while_open == [True] * threads
    assert dispatch.disabled() == was_disabled
