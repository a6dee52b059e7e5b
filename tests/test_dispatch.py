"""The dispatch policy: its dtype list against the library's, and builtin_ops() blocks
(nested, overlapping, from many threads) and what they leave behind."""

import os
import threading

import tensorflow as tf
from tensorflow.python.framework import op_def_registry

import tf_smallmm as smm
from conftest import smallmm_ops
from tf_smallmm import _smallmm_core as core
from tf_smallmm._core import dispatch, loader
from tf_smallmm.layers import builtin_ops


def test_supported_dtypes_are_the_librarys():
    """SUPPORTED_DTYPES is written once in Python; the library has its own list. Compared
    with the dtype names the kernel module exports where it does, and with the type attr
    the op registers (which the kernel registrations come from) in any case."""
    ours = {d.name for d in dispatch.SUPPORTED_DTYPES}
    names = getattr(core, "dtype_names", None)
    if names is not None:
        assert ours == set(names)
    assert loader.load() is not None
    attr = next(a for a in op_def_registry.get("SmallMMBatchMatMul").attr if a.name == "T")
    assert ours == {tf.as_dtype(t).name for t in attr.allowed_values.list.type}


def test_max_batch_dims_is_the_kernels():
    assert dispatch.MAX_BATCH_DIMS == core.max_batch_dims


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
