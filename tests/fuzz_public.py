"""Fuzz family "public": every row of tests/public_ops.py called with mutated arguments,
against TensorFlow's own function (see tests/fuzz_cases.py). Not a test module."""

import numpy as np
import tensorflow as tf

from conftest import DTYPES, wide
from fuzz_common import (
    ANY,
    EXTRA_DTYPES,
    MAX_BATCH,
    WEIRD_FLAGS,
    Expect,
    SmallPick,
    close,
    describe,
    error_kind,
    huge_zero_shape,
    huge_zero_tensor,
    modes,
    mutate_dims,
    random_rank,
    random_shape,
    random_values,
    weird_objects,
)

_GRAPH_CACHE = {}


def _graph_fn(fn, key, n_args, dtype, kwargs):
    """fn(*tensors, **kwargs) inside a tf.function whose inputs have unknown rank."""
    k = (key, dtype, n_args, tuple(sorted((a, repr(b)) for a, b in kwargs.items())))
    if k not in _GRAPH_CACHE:
        specs = [tf.TensorSpec(None, dtype)] * n_args
        _GRAPH_CACHE[k] = tf.function(lambda *xs: fn(*xs, **kwargs), input_signature=specs)
    return _GRAPH_CACHE[k]


def _wide_abs(args):
    return [tf.cast(tf.abs(a), tf.float64) for a in args]


def public_case(op, pick):
    """One mutated call of a table row: (description, thunk, oracle)."""
    dtype = pick.choice(DTYPES)
    call = op.inputs(SmallPick(pick.rng), dtype)
    args = [tf.cast(tf.constant(t), dtype) for t in call.tensors]
    kw = dict(call.kwargs)
    mode = pick.choice(modes(["valid", "rank", "dims", "dims", "dtype", "nontensor",
                               "kwarg", "numpy", "huge", "graph", "graph"]))
    j = pick.int(0, len(args) - 1)
    graph = False
    if mode == "rank":
        args[j] = random_values(pick, random_shape(pick, random_rank(pick)), dtype)
    elif mode == "dims":
        args[j] = random_values(pick, mutate_dims(pick, args[j].shape.as_list()), dtype)
    elif mode == "dtype":
        new = pick.choice(EXTRA_DTYPES)
        targets = range(len(args)) if pick.bool() else [j]
        for i in targets:
            args[i] = random_values(pick, args[i].shape.as_list(), new)
    elif mode == "nontensor":
        args[j] = pick.choice(weird_objects())
    elif mode == "kwarg":
        key = pick.choice(sorted(kw) + ["name", "output_type", "a_is_sparse", "bogus_kw"])
        kw[key] = pick.choice(WEIRD_FLAGS + [True, False, tf.float64, "x/y"])
    elif mode == "numpy":
        args = [np.asarray(a) if pick.bool() else np.asarray(a).tolist() for a in args]
    elif mode == "huge":
        if dtype in (tf.float32, tf.float64, tf.complex64):
            args[j] = huge_zero_tensor(huge_zero_shape(pick, args[j].shape.as_list()[-2:]),
                                       dtype)
    elif mode == "graph":
        dtype = pick.choice([tf.float32, tf.complex64])
        call = op.inputs(SmallPick(pick.rng), dtype)
        args = [tf.cast(tf.constant(t), dtype) for t in call.tensors]
        kw = dict(call.kwargs)
        sub = pick.int(0, 2)
        if sub == 1:
            args[j] = random_values(pick, random_shape(pick, random_rank(pick)), dtype)
        elif sub == 2:
            args[j] = random_values(pick, mutate_dims(pick, args[j].shape.as_list()), dtype)
        graph = True

    desc = (f"public.{op.name} {mode} "
            f"args=({', '.join(describe(a) for a in args)}) kwargs={describe(kw)}")
    huge = mode == "huge"
    # Batch axes beyond the kernels' limit (a vector argument gains a matrix axis).
    ranks_over = any(isinstance(a, tf.Tensor) and a.shape.rank is not None
                     and a.shape.rank - 1 > MAX_BATCH for a in args)

    if graph:
        f = _graph_fn(op.fn, op.name, len(args), dtype, kw)

        def thunk():
            return f(*args)
    else:
        def thunk():
            return op.fn(*args, **kw)

    def oracle():
        if huge:
            return ANY  # the built-in is not called: TF's own kernels overflow on these
        if graph and ranks_over:
            return ANY  # known limit: > 8 batch dims with unknown rank raise in the kernel
        try:
            want = op.reference(*args, **kw)
        except Exception as e:  # noqa: BLE001
            return Expect("error", exc=e)
        bound = None
        if isinstance(want, tf.Tensor) and (want.dtype.is_floating or want.dtype.is_complex):
            try:
                bound = np.asarray(op.reference(*_wide_abs([tf.convert_to_tensor(a)
                                                            for a in args]), **kw))
            except Exception:  # noqa: BLE001
                bound = None
        return Expect("ok", value=want, bound=bound)

    return desc, thunk, oracle


def check_public(got, err, exp):
    """Differential check against the reference: problems as strings."""
    if exp.kind == "any":
        return []
    if exp.kind == "error":
        if err is None:
            return [(f"returned {describe(got)} where the reference raised "
                     f"{type(exp.exc).__name__}: {str(exp.exc)[:150]}")]
        if error_kind(err) != error_kind(exp.exc):
            return [(f"raised {error_kind(err)} where the reference raised "
                     f"{error_kind(exp.exc)} ({str(exp.exc)[:120]})")]
        return []
    if err is not None:
        return [(f"rejected a call the reference accepts: {type(err).__name__}: "
                 f"{str(err)[:200]}")]
    want = exp.value
    if not isinstance(got, tf.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
        return [f"returned {describe(got)}, reference {describe(want)}"]
    if exp.bound is not None and want.shape.num_elements():
        w = tf.cast(want, wide(want.dtype)).numpy()
        if not close(tf.cast(got, wide(got.dtype)).numpy(), w, exp.bound, want.dtype):
            return ["values differ from the reference beyond tolerance"]
    elif ((want.dtype.is_integer or want.dtype == tf.bool)
          and not np.array_equal(got.numpy(), want.numpy())):
        return ["values differ from the reference"]
    return []
