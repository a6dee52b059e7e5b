"""Fuzz family "raw": the SmallMM TF ops called directly with mutated arguments, against
the planner model and numpy (see tests/fuzz_cases.py). Not a test module."""

import math

import numpy as np
import tensorflow as tf

from conftest import DTYPES, wide
from fuzz_common import (
    ANY,
    EXTRA_DTYPES,
    INT64_MAX,
    MAX_BATCH,
    P_BIG,
    P_BSHAPE,
    P_DTYPE,
    WEIRD_FLAGS,
    Expect,
    SmallPick,
    describe,
    huge_zero_shape,
    huge_zero_tensor,
    modes,
    mutate_dims,
    plan_model,
    random_rank,
    random_shape,
    random_target,
    random_values,
    small_enough,
    valid_operands,
    weird_objects,
)
from public_ops import np_product, np_reduce_to
from tf_smallmm._core import loader

_GRAPH_CACHE = {}


def _raw_graph_fn(reduce, dtype, shape_dtype, flags):
    k = ("raw", reduce, dtype, shape_dtype, tuple(sorted(flags.items())))
    if k not in _GRAPH_CACHE:
        lib = loader.load()
        if reduce:
            specs = [tf.TensorSpec(None, dtype)] * 2 + [tf.TensorSpec([None], shape_dtype)]
            fn = lambda x, y, s: lib.small_mm_batch_mat_mul_reduce(x, y, s, **flags)
        else:
            specs = [tf.TensorSpec(None, dtype)] * 2
            fn = lambda x, y: lib.small_mm_batch_mat_mul(x, y, **flags)
        _GRAPH_CACHE[k] = tf.function(fn, input_signature=specs)
    return _GRAPH_CACHE[k]


GRAPH_FLAGS = [
    {"transpose_x": False, "conjugate_x": False, "transpose_y": False, "conjugate_y": False},
    {"transpose_x": True, "conjugate_x": True, "transpose_y": False, "conjugate_y": True},
]


def raw_case(pick):
    lib = loader.load()
    sp = SmallPick(pick.rng)
    reduce = pick.bool()
    mode = pick.choice(modes(["valid", "rank", "dims", "dims", "dtype", "nontensor", "flag",
                               "many", "huge", "bigshape", "bs", "bs", "graph", "graph"]))
    # Graph cases trace one tf.function per (dtype, flags): keep that set small.
    dtype = pick.choice(DTYPES if mode != "graph" else [tf.float32, tf.complex64])
    xs, ys, flags, full = valid_operands(sp)
    if mode == "graph":
        flags = dict(pick.choice(GRAPH_FLAGS))
    x, y = random_values(pick, xs, dtype), random_values(pick, ys, dtype)
    target = random_target(sp, full) if reduce else None
    bs = target  # what is passed as batch_shape (may be mutated to a non-shape)
    shape_dtype = pick.choice([tf.int32, tf.int64])
    j = pick.int(0, 1)
    graph = False

    def set_arg(i, v):
        nonlocal x, y
        if i == 0:
            x = v
        else:
            y = v

    if mode == "rank":
        set_arg(j, random_values(pick, random_shape(pick, random_rank(pick)), dtype))
    elif mode == "dims":
        set_arg(j, random_values(pick, mutate_dims(pick, [x, y][j].shape.as_list()), dtype))
    elif mode == "dtype":
        new = pick.choice(EXTRA_DTYPES)
        for i in ([0, 1] if pick.bool() else [j]):
            set_arg(i, random_values(pick, [x, y][i].shape.as_list(), new))
    elif mode == "nontensor":
        set_arg(j, pick.choice(weird_objects()))
    elif mode == "flag":
        flags[pick.choice(sorted(flags))] = pick.choice(WEIRD_FLAGS)
    elif mode == "many":  # more batch axes than the kernels take (maybe through target)
        extra = [pick.choice([1, 2]) for _ in range(MAX_BATCH + pick.int(-1, 2))]
        if reduce and pick.bool():
            bs = target = extra + list(target)
        else:
            set_arg(j, random_values(pick, extra + [x, y][j].shape.as_list(), dtype))
    elif mode == "huge":  # zero elements, astronomically large other dims
        set_arg(j, huge_zero_tensor(huge_zero_shape(pick, [x, y][j].shape[-2:]), dtype))
        if reduce and pick.bool():
            bs = target = [pick.choice([0, 1, 2])] + list(target)
    elif mode == "bigshape":
        # Outputs whose element count overflows int64 whatever M and N are. (Outputs that
        # merely cannot be allocated are cases of their own in fuzz_nightly.py: TF's
        # allocator retries for 10 s before it reports OOM.)
        reduce = True
        bs = target = pick.choice([[2**40, 2**40], [2**62, 4], [INT64_MAX, 2],
                                   [2**31, 2**31, 2**31], [3, 2**62], [2**40, 2**40, 0]])
        shape_dtype = tf.int64
    elif mode == "bs" and reduce:
        bs = pick.choice([[-1], [-5], [2, -1], [[2]], 3, [1] * (MAX_BATCH + 1), [1.5],
                          "ab", None, [2**63 - 1, 2], [], np.array([-(2**40)]),
                          tf.constant([[1, 2]]), tf.constant(2), tf.constant([1.0]),
                          tf.zeros([0], tf.int64), [True]])
        target = None
    elif mode == "graph":
        graph = True
        sub = pick.int(0, 3)
        if sub == 1:
            set_arg(j, random_values(pick, random_shape(pick, random_rank(pick)), dtype))
        elif sub == 2:
            set_arg(j, random_values(pick, mutate_dims(pick, [x, y][j].shape.as_list()),
                                     dtype))
        elif sub == 3 and reduce:
            bs = target = pick.choice([[-1], [2, -3], [1] * (MAX_BATCH + 1), [2**40, 2**40],
                                       [0]] + [random_shape(pick, 2)])

    # Tensors for batch_shape: as given (list / array / tensor), or as an int tensor.
    if reduce and isinstance(bs, list) and all(isinstance(v, int) for v in bs) and bs and \
            pick.bool():
        try:
            bs = tf.constant(bs, shape_dtype)
        except Exception:  # noqa: BLE001  (out of int32 range)
            bs = tf.constant(bs, tf.int64)
    # Half of the eager reduce cases go through the Pair op, the mutated product in slot
    # `slot` (0 or 1) next to a valid product of the same dtype in the other.
    # Only batch_shapes TF converts the same way with or without a second batch_shape
    # beside them (the Pair op infers one Tshape from both): int tensors and int lists.
    plain_bs = (isinstance(bs, tf.Tensor) and bs.dtype in (tf.int32, tf.int64)) or (
        isinstance(bs, list) and all(type(v) is int for v in bs))
    pair = reduce and not graph and plain_bs and pick.bool()
    slot = pick.int(0, 1)
    desc = (f"raw.{'pair' + str(slot + 1) if pair else 'reduce' if reduce else 'product'} "
            f"{mode}{' graph' if graph else ''} "
            f"x={describe(x)} y={describe(y)} batch_shape={describe(bs)} "
            f"flags={describe(flags)}")

    if graph:
        sd = bs.dtype if isinstance(bs, tf.Tensor) else tf.int32
        if reduce and not isinstance(bs, tf.Tensor):
            bs = tf.constant(bs, sd if max(map(abs, bs), default=0) < 2**31 else tf.int64)
            sd = bs.dtype
        f = _raw_graph_fn(reduce, dtype, sd, flags)

        def thunk():
            return f(x, y, bs) if reduce else f(x, y)
    elif pair:
        # The valid product: x's dtype (T is one attr for both), a batch_shape of the
        # mutated one's integer type.
        ok_dtype = x.dtype if isinstance(x, tf.Tensor) else dtype
        ok_bs = tf.constant([2], bs.dtype if isinstance(bs, tf.Tensor) else
                            tf.int64 if any(abs(v) >= 2**31 for v in bs) else tf.int32)
        ok = (tf.ones([2, 3, 4], ok_dtype), tf.ones([2, 4, 5], ok_dtype), ok_bs)
        ok_flags = {"transpose_x": False, "conjugate_x": False, "transpose_y": False,
                    "conjugate_y": False}

        def thunk():
            products = [(x, y, bs), ok] if slot == 0 else [ok, (x, y, bs)]
            attrs = [flags, ok_flags] if slot == 0 else [ok_flags, flags]
            kwargs = {f"{k}_{i + 1}": v for i, a in enumerate(attrs) for k, v in a.items()}
            return lib.small_mm_batch_mat_mul_pair(*products[0], *products[1], **kwargs)[slot]
    elif reduce:
        def thunk():
            return lib.small_mm_batch_mat_mul_reduce(x, y, bs, **flags)
    else:
        def thunk():
            return lib.small_mm_batch_mat_mul(x, y, **flags)

    def oracle():
        return raw_oracle(x, y, reduce, bs, flags)

    return desc, thunk, oracle


def raw_oracle(x, y, reduce, bs, flags):
    if not all(isinstance(v, bool) for v in flags.values()):
        return ANY  # TF's attr conversion decides (it takes None as the default)
    if not (isinstance(x, tf.Tensor) and isinstance(y, tf.Tensor)):
        return ANY  # conversion of odd objects: any clear error, or a valid result
    problems = []
    supported = set(DTYPES)
    if x.dtype not in supported or y.dtype not in supported or x.dtype != y.dtype:
        problems.append(P_DTYPE)
    target = None
    if reduce:
        if isinstance(bs, tf.Tensor):
            if bs.dtype not in (tf.int32, tf.int64):
                problems.append(P_DTYPE)
            elif bs.shape.rank != 1:
                problems.append(P_BSHAPE)
            else:
                target = [int(v) for v in bs.numpy()]
        elif isinstance(bs, list) and all(type(v) is int for v in bs):
            target = bs
            if any(abs(v) >= 2**63 for v in bs):
                return ANY
        elif isinstance(bs, (int, np.ndarray)) or (isinstance(bs, list) and bs and
                                                   isinstance(bs[0], list)):
            # TF's eager conversion turns a numpy array into the attr's default dtype
            # (int32), wrapping values around as tf.reshape does: model that.
            arr = np.asarray(bs).astype(np.int32)
            if arr.ndim != 1:
                problems.append(P_BSHAPE)
            else:
                target = [int(v) for v in arr]
        else:
            return ANY  # None, strings, floats, bools: conversion errors of any kind
    if problems:
        return Expect("error", patterns=problems)
    out, _, problems = plan_model(x.shape.as_list(), y.shape.as_list(),
                                  flags["transpose_x"], flags["transpose_y"], target)
    if problems:
        return Expect("error", patterns=problems)
    itemsize = x.dtype.size
    if math.prod(out) * itemsize > (1 << 32):
        return Expect("error", patterns=[P_BIG])
    if not small_enough(x.shape.as_list(), y.shape.as_list(), out):
        return Expect("ok", shape=out)
    xw = tf.cast(x, wide(x.dtype)).numpy()
    yw = tf.cast(y, wide(y.dtype)).numpy()
    want = np_product(xw, yw, **flags)
    bound = np_product(np.abs(xw), np.abs(yw), **flags)
    if reduce:
        want, bound = np_reduce_to(want, target), np_reduce_to(bound, target)
    return Expect("ok", value=want, bound=bound, shape=out)


