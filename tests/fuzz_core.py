"""Fuzz family "core": the pybind11 kernel module (_smallmm_core) called with mutated numpy
arguments, against the planner model and numpy (see tests/fuzz_cases.py). Not a test
module."""

import math

import ml_dtypes
import numpy as np
import tensorflow as tf

from conftest import DTYPES
from fuzz_common import (
    ANY,
    INT64_MAX,
    MAX_BATCH,
    P_ALIGN,
    P_BIG,
    P_DTYPE,
    WEIRD_FLAGS,
    Expect,
    SmallPick,
    describe,
    modes,
    mutate_dims,
    plan_model,
    random_rank,
    random_shape,
    random_target,
    small_enough,
    valid_operands,
    weird_objects,
)
from public_ops import np_product, np_reduce_to
from tf_smallmm import _smallmm_core as core

NP_DTYPES = {tf.float16: np.float16, tf.bfloat16: ml_dtypes.bfloat16, tf.float32: np.float32,
             tf.float64: np.float64, tf.complex64: np.complex64,
             tf.complex128: np.complex128}
TF_OF_NP = {np.dtype(v): k for k, v in NP_DTYPES.items()}
NP_OTHER = [np.int32, np.int64, np.uint8, np.bool_, np.float128 if hasattr(np, "float128")
            else np.float64, object, "U3", "V4", np.dtype([("a", np.float32)])]


def _np_values(pick, shape, np_dtype):
    c = np.issubdtype(np.dtype(np_dtype), np.complexfloating)
    return pick.array(shape, c).astype(np_dtype)


def _strided(pick, arr):
    """A view of `arr`'s values with non-unit, negative or zero strides."""
    kind = pick.int(0, 3)
    if kind == 0 or arr.ndim == 0:
        return arr
    if kind == 1:  # every other element of a bigger array, maybe reversed
        big = np.repeat(arr, 2, axis=-1)[..., ::2]
        return big[..., ::-1] if pick.bool() else big
    if kind == 2:
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(arr, -1, 0)), -1, 0)
    if arr.ndim >= 3:  # stride 0 on a batch axis
        return np.broadcast_to(arr[:1], arr.shape)
    return arr


def core_case(pick):
    sp = SmallPick(pick.rng)
    tfd = pick.choice(DTYPES)
    npd = NP_DTYPES[tfd]
    reduce = pick.bool()
    xs, ys, flags, full = valid_operands(sp)
    x, y = _np_values(pick, xs, npd), _np_values(pick, ys, npd)
    x, y = _strided(pick, x), _strided(pick, y)
    target = random_target(sp, full) if reduce else None
    bs = target
    extra_kw = {}
    mode = pick.choice(modes(["valid", "valid", "rank", "dims", "dims", "dtype", "byteorder",
                               "misaligned", "nontensor", "flag", "bs", "many", "huge", "kw",
                               "isa"]))
    j = pick.int(0, 1)
    expect_override = None

    def set_arg(i, v):
        nonlocal x, y
        if i == 0:
            x = v
        else:
            y = v

    if mode == "rank":
        set_arg(j, _np_values(pick, random_shape(pick, random_rank(pick)), npd))
    elif mode == "dims":
        set_arg(j, _np_values(pick, mutate_dims(pick, [x, y][j].shape), npd))
    elif mode == "dtype":
        new = pick.choice(NP_OTHER + list(NP_DTYPES.values()))
        for i in ([0, 1] if pick.bool() else [j]):
            try:
                set_arg(i, np.zeros([x, y][i].shape, new))
            except TypeError:
                pass
    elif mode == "byteorder":
        set_arg(j, [x, y][j].astype([x, y][j].dtype.newbyteorder(">")))
    elif mode == "misaligned":
        a = np.ascontiguousarray([x, y][j])
        if a.dtype.alignment > 1 and a.size:
            buf = np.zeros(a.nbytes + 1, np.uint8)
            m = np.frombuffer(buf.data, np.uint8, a.nbytes, 1).view(a.dtype).reshape(a.shape)
            m[...] = a
            set_arg(j, m)
    elif mode == "nontensor":
        set_arg(j, pick.choice(weird_objects()))
    elif mode == "flag":
        flags[pick.choice(sorted(flags))] = pick.choice(WEIRD_FLAGS)
    elif mode == "bs":
        bs = pick.choice([[-1], [2, -3], [1] * (MAX_BATCH + 1), [1.5], "ab", [[2]], 3,
                          [2**63 - 1], [2**64], [2**40, 2**40], np.array([2, 1]),
                          (1,), [None], {"a": 1}])
        reduce = True
    elif mode == "many":
        extra = [pick.choice([1, 2]) for _ in range(MAX_BATCH + pick.int(-1, 2))]
        set_arg(j, _np_values(pick, extra + list([x, y][j].shape), npd))
    elif mode == "huge":
        # stride-0 views: huge in shape, one element in memory. Only shapes whose call
        # must return at once: an empty C, a huge K (scratch refused), or an output that
        # cannot be allocated.
        one = np.ones((), npd)
        kind = pick.int(0, 2)
        if kind == 0:    # empty C with a huge batch
            x = np.ones((2**40, 0, 3), npd)
            y = np.broadcast_to(one, (2**40, 3, pick.int(1, 4)))
        elif kind == 1:  # K huge: scratch must be refused (MemoryError), not overflow
            big = pick.choice([2**40, 2**58, 2**60])
            x = np.broadcast_to(np.ones((), np.float16), (2, big))
            y = np.broadcast_to(np.ones((), np.float16), (big, 2))
        else:            # output too big to allocate
            x = np.broadcast_to(one, (2**30, 2**10, 4, 4))
            y = np.broadcast_to(one, (4, 4))
        flags = dict.fromkeys(flags, False)
        bs, reduce = None, False
        expect_override = (Expect("ok", shape=[2**40, 0, y.shape[-1]]) if kind == 0 else
                           Expect("error", patterns=[r"scratch|memory|allocat|too big"]))
    elif mode == "kw":
        extra_kw = {pick.choice(["bogus", "transpose_a", "batch", "out"]): 1}
    elif mode == "isa":
        name = pick.choice(["avx512", "avx2", "baseline", "", "AVX2", "sse9", None, 3,
                            b"avx2", "avx2\x00x"])
        desc = f"core.set_isa isa name={name!r}"
        before = core.active_isa()

        def thunk():
            try:
                return core.set_isa(name)
            finally:
                core.set_isa(before)

        def oracle():
            if isinstance(name, (str, bytes)):
                return Expect("ok")
            return Expect("error", patterns=[r"incompatible|argument|type"])

        return desc, thunk, oracle

    kwargs = dict(flags, **extra_kw)
    if reduce:
        kwargs["batch_shape"] = bs
    desc = (f"core.matmul {mode} x={describe(x)} y={describe(y)} "
            f"kwargs={describe(kwargs)}")

    def thunk():
        return core.matmul(x, y, **kwargs)

    def oracle():
        if expect_override is not None:
            return expect_override
        return core_oracle(x, y, reduce, bs, flags, extra_kw)

    return desc, thunk, oracle


def core_oracle(x, y, reduce, bs, flags, extra_kw):
    if extra_kw or not all(isinstance(v, (bool, np.bool_)) for v in flags.values()):
        return ANY  # pybind11's argument conversion: TypeError, or a bool-convertible value
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
        return ANY
    problems = []
    unknown = x.dtype not in TF_OF_NP and x.dtype.newbyteorder("=") not in TF_OF_NP
    if x.dtype != y.dtype or unknown or not (x.dtype.isnative and y.dtype.isnative):
        problems.append(P_DTYPE)
    if problems:
        return Expect("error", patterns=problems)
    if not (x.flags.aligned and y.flags.aligned):
        return Expect("error", patterns=[P_ALIGN])
    target = None
    if reduce:
        if isinstance(bs, (list, tuple)) and all(type(v) is int and abs(v) < 2**63
                                                 for v in bs):
            target = list(bs)
        elif isinstance(bs, np.ndarray) and bs.ndim == 1 and bs.dtype.kind == "i":
            target = [int(v) for v in bs]
        else:
            return Expect("error", patterns=[r"incompatible|argument|type"])
    out, _, problems = plan_model(list(x.shape), list(y.shape), flags["transpose_x"],
                                  flags["transpose_y"], target)
    if problems:
        return Expect("error", patterns=problems)
    if math.prod(out) * x.itemsize > (1 << 32) or any(d * x.itemsize > INT64_MAX for d in out):
        # numpy refuses the output array (it also refuses zero-size arrays with one dim
        # whose byte extent overflows).
        return Expect("error", patterns=[P_BIG, r"memory|size"])
    if not small_enough(x.shape, y.shape, out):
        return Expect("ok", shape=out)
    w = np.complex128 if np.iscomplexobj(x) else np.float64
    xw, yw = x.astype(w), y.astype(w)
    want = np_product(xw, yw, **flags)
    bound = np_product(np.abs(xw), np.abs(yw), **flags)
    if reduce:
        want, bound = np_reduce_to(want, target), np_reduce_to(bound, target)
    return Expect("ok", value=want, bound=bound, shape=out)
