"""The kernel core alone, through the pybind11 module (numpy in, numpy out, no TF)."""

import itertools
import pathlib

import ml_dtypes
import numpy as np
import pytest

from engine_dtypes import NP_DTYPES
from public_ops import np_product as ref
from public_ops import np_reduce_to
from tf_smallmm import _smallmm_core as core

# Every tile size, one past the largest, sizes that straddle tiles, and primes.
SIZES = sorted(set(core.tile_sizes) | {5, 7, 9, 13, 17, 31, 33})
ISAS = core.compiled_isas().split(",")


def ints(rng, shape, dtype):
    # Small integers: every product and sum below is exact in every dtype (bfloat16 has
    # 8 significant bits, so its entries stay in {-1, 0, 1}).
    hi = 2 if dtype == ml_dtypes.bfloat16 else 3
    x = rng.integers(-hi + 1, hi, size=shape).astype(np.float64)
    if np.issubdtype(dtype, np.complexfloating):
        x = x + 1j * rng.integers(-hi + 1, hi, size=shape)
    return x.astype(dtype)


def check_exact(got, want):
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.astype(want.dtype), want)


@pytest.fixture(params=ISAS)
def isa(request):
    """Each compiled instruction set in turn (skipped where this CPU lacks it), active for
    the test and restored after it."""
    before = core.active_isa()
    if not core.set_isa(request.param):
        pytest.skip(f"this CPU lacks {request.param}")
    yield request.param
    core.set_isa(before)


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("form", ["cube", "M", "N", "K", "matvec"])
def test_every_tile_size_exact(dtype, size, form):
    # Covers every kernel path: tiny direct products (all sizes <= 4), packed and in-place
    # micro-kernels (whole and partial tiles), and dot products (N = 1, K >= 4).
    m, n, k = {"cube": (size, size, size), "M": (size, 3, 5), "N": (2, size, 7),
               "K": (3, 4, size), "matvec": (size, 1, size + 3)}[form]
    rng = np.random.default_rng(size)
    x, y = ints(rng, (2, m, k), dtype), ints(rng, (2, k, n), dtype)
    check_exact(core.matmul(x, y), ref(x, y))


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("dtype", [np.float32, np.complex128], ids=lambda d: np.dtype(d).name)
def test_transpose_and_conjugate_flags(flags, dtype):
    tx, cx, ty, cy = flags
    rng = np.random.default_rng(1)
    x = ints(rng, (3, 5, 4) if tx else (3, 4, 5), dtype)
    y = ints(rng, (6, 5) if ty else (5, 6), dtype)
    got = core.matmul(x, y, transpose_x=tx, conjugate_x=cx, transpose_y=ty, conjugate_y=cy)
    check_exact(got, ref(x, y, tx, cx, ty, cy))


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_compiled_isa_agrees(isa, dtype):
    rng = np.random.default_rng(2)
    x, y = ints(rng, (4, 1, 9, 17), dtype), ints(rng, (3, 17, 5), dtype)
    check_exact(core.matmul(x, y), ref(x, y))


def test_stride_zero_and_strided_views():
    rng = np.random.default_rng(3)
    w = ints(rng, (8, 3), np.float32)
    xb = np.broadcast_to(w, (5, 7, 8, 3))  # strides of 0 on both batch axes
    assert xb.strides[0] == 0 and xb.strides[1] == 0
    y = ints(rng, (5, 7, 3, 2), np.float32)
    check_exact(core.matmul(xb, y), ref(xb, y))
    big = ints(rng, (6, 10, 12), np.float64)
    view = big[::2, 1::3, ::-2]  # non-unit, offset and negative strides
    check_exact(core.matmul(view, np.swapaxes(view, -1, -2)), ref(view, np.swapaxes(view, -1, -2)))


@pytest.mark.parametrize("xs,ys,target", [
    ((5, 3, 4), (4, 2), []),              # sum over the whole batch
    ((5, 3, 4), (5, 4, 2), [1]),          # keep the axis as size 1
    ((2, 5, 3, 4), (1, 5, 4, 2), [5]),    # leading axis summed
    ((2, 1, 3, 4), (1, 6, 4, 2), [2, 1]), # broadcast axis summed
    ((3, 4), (4, 2), [7]),                # expand: every output equal
    ((0, 3, 4), (4, 2), []),              # reduction over nothing gives zeros
])
def test_reduction_to_batch_shape(xs, ys, target):
    rng = np.random.default_rng(4)
    x, y = ints(rng, xs, np.float64), ints(rng, ys, np.float64)
    full = ref(x, y)
    want = full
    lead = full.ndim - 2 - len(target)
    want = want.sum(axis=tuple(range(lead))) if lead > 0 else want
    for i, t in enumerate(target):
        if t == 1:
            want = want.sum(axis=i, keepdims=True)
    want = np.broadcast_to(want, tuple(target) + full.shape[-2:])
    check_exact(core.matmul(x, y, batch_shape=target), want)


@pytest.mark.parametrize("xs,ys,out", [
    ((0, 3, 4), (4, 5), (0, 3, 5)),
    ((2, 3, 0), (0, 5), (2, 3, 5)),       # K = 0: zeros
    ((2, 0, 4), (4, 5), (2, 0, 5)),
    ((3, 4), (2, 0, 4, 5), (2, 0, 3, 5)),
])
def test_empty(xs, ys, out):
    got = core.matmul(np.ones(xs, np.float32), np.ones(ys, np.float32))
    assert got.shape == out
    assert not got.any()


def test_nan_and_inf_propagate():
    x = np.array([[np.nan, 1.0], [np.inf, 0.0], [1.0, 2.0]], np.float32)
    y = np.array([[1.0, 0.0], [2.0, np.inf]], np.float32)
    np.testing.assert_array_equal(core.matmul(x, y), ref(x, y).astype(np.float32))


@pytest.mark.parametrize("xs,ys,message", [
    ((3, 4), (5, 6), r"Matrix size-incompatible: In\[0\]: \[3,4\], In\[1\]: \[5,6\]"),
    ((2, 3, 4), (3, 4, 6),
     r"In\[0\] and In\[1\] must have compatible batch dimensions: \[2,3,4\] vs. \[3,4,6\]"),
    ((4,), (4, 6), r"In\[0\] ndims must be >= 2: 1"),
])
def test_bad_shapes_raise(xs, ys, message):
    with pytest.raises(ValueError, match=message):
        core.matmul(np.ones(xs, np.float32), np.ones(ys, np.float32))


def test_bad_dtypes_raise():
    with pytest.raises(TypeError, match="same dtype"):
        core.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float64))
    with pytest.raises(TypeError, match="unsupported dtype"):
        core.matmul(np.ones((2, 2), np.int32), np.ones((2, 2), np.int32))


# Operand-stationary kernels: K <= 32 (AVX-512; AVX2 11, baseline 8; half that for complex)
# and C contiguous along one side. The row kernel runs when C's rows are contiguous (every
# plain product with N >= 2), the column kernel when its columns are (capsule-style
# products: x [I, M, K] shared by a batch of vectors y [B, I, K, 1], which the planner turns
# into one M×K · K×B product per i). Strips are whole vectors, then one partial vector for
# the rest (31 rows of float32: 16 + 15 lanes of 16).
STATIONARY_K = [1, 2, 3, 5, 8, 9, 12, 16, 17, 20, 24, 25, 32, 33]
STATIONARY_SIDES = [4, 5, 8, 9, 16, 17, 20, 31, 33]


def stationary_operands(kernel, k, side, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if kernel == "row":
        return ints(rng, (3, 9, k), dtype), ints(rng, (3, k, side), dtype)
    return ints(rng, (3, side, k), dtype), ints(rng, (9, 3, k, 1), dtype)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k", STATIONARY_K)
@pytest.mark.parametrize("side", STATIONARY_SIDES)
@pytest.mark.parametrize("kernel", ["row", "column"])
def test_stationary_kernels_exact(kernel, side, k, dtype):
    x, y = stationary_operands(kernel, k, side, dtype, seed=side * 31 + k)
    check_exact(core.matmul(x, y), ref(x, y))


@pytest.mark.parametrize("k", [3, 8, 16, 24, 32])
@pytest.mark.parametrize("kernel", ["row", "column"])
def test_stationary_kernels_on_every_isa(kernel, k, isa):
    # AVX-512 takes up to 32 K-vectors (some spilled to the stack past 27), AVX2 11 and the
    # baseline 8: K = 16 to 32 take the stationary path on one and the packed micro-kernels
    # on the others.
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        x, y = stationary_operands(kernel, k, 31, dtype, seed=k)
        check_exact(core.matmul(x, y), ref(x, y))


@pytest.mark.parametrize("kernel", ["row", "column"])
def test_stationary_kernels_read_strided_views(kernel):
    # The strip is gathered through a transposed copy unless its lanes are contiguous, and
    # the streamed side may have any K stride: transposes, negative and non-unit strides.
    rng = np.random.default_rng(7)
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        x, y = stationary_operands(kernel, 8, 20, dtype, seed=3)
        big_x = ints(rng, x.shape[:-2] + (2 * x.shape[-2], 3 * x.shape[-1]), dtype)
        big_y = ints(rng, y.shape[:-2] + (3 * y.shape[-2], 2 * y.shape[-1]), dtype)
        xv = big_x[..., ::-2, 1::3]
        yv = big_y[..., 2::3, ::-2]
        check_exact(core.matmul(xv, yv), ref(xv, yv))
        xt = np.ascontiguousarray(np.swapaxes(x, -1, -2))
        yt = np.ascontiguousarray(np.swapaxes(y, -1, -2))
        for tx, ty in itertools.product([False, True], repeat=2):
            got = core.matmul(xt if tx else x, yt if ty else y, transpose_x=tx, transpose_y=ty)
            check_exact(got, ref(x, y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_large_outputs_streamed_to_memory(dtype):
    # Outputs of 16 MiB and more are written with non-temporal stores where a whole
    # 64-byte line is stored at an aligned address, normal stores otherwise (numpy's
    # buffers are not always 64-byte aligned; TF's are, see test_capsule / test_matmul).
    rng = np.random.default_rng(11)
    w, u = ints(rng, (1152, 160, 8), dtype), ints(rng, (30, 1152, 8, 1), dtype)
    got = core.matmul(w, u)  # column kernel
    assert got.nbytes >= 16 << 20
    check_exact(got, ref(w, u))
    x, y = ints(rng, (9000, 8, 8), dtype), ints(rng, (9000, 8, 64), dtype)
    got = core.matmul(x, y)  # row kernel
    assert got.nbytes >= 16 << 20
    check_exact(got, ref(x, y))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_tiny_dense_batches_every_size_and_remainder(dtype, isa):
    # Back-to-back row-major products of every size <= 4 (with AVX-512, several to a vector
    # of C; see tiny.h): batches that end in every remainder of those groups, a batch over
    # two axes, and the same operands as views that are not back to back (one at a time).
    rng = np.random.default_rng(13)
    for m, n, k in itertools.product(range(1, 5), repeat=3):
        for batch in [(1,), (17,), (16 + m * n,), (5, 7)]:
            x, y = ints(rng, batch + (m, k), dtype), ints(rng, batch + (k, n), dtype)
            assert core.kernel_for(x, y) == "tiny"
            check_exact(core.matmul(x, y), ref(x, y))
        x, y = ints(rng, (2, 23, m, k), dtype), ints(rng, (2, 23, k, n), dtype)
        check_exact(core.matmul(x[:, ::2], y[:, ::2]), ref(x[:, ::2], y[:, ::2]))
    # -0·1 sums from +0 as in every GEMM; NaN and Inf stay in their own products.
    x = np.full((64, 2, 2), -0.0, dtype)
    got = core.matmul(x, np.ones((64, 2, 2), dtype))
    assert not np.signbit(got.astype(np.float64)).any()
    x[5, 1, 0], x[9, 0, 1] = np.nan, np.inf
    want = ref(x, np.ones((64, 2, 2), dtype))
    np.testing.assert_array_equal(core.matmul(x, np.ones((64, 2, 2), dtype)), want)
    assert np.isnan(want).sum() == 2 and np.isinf(want).sum() == 2


def test_tiny_dense_large_output_streamed():
    # 2×2 products with an output over 16 MiB: C written with non-temporal stores.
    rng = np.random.default_rng(14)
    x, y = ints(rng, (1 << 20, 2, 2), np.float32), ints(rng, (1 << 20, 2, 2), np.float32)
    got = core.matmul(x, y)
    assert got.nbytes >= 16 << 20
    check_exact(got, ref(x, y))


@pytest.mark.parametrize("dtype,n", [(np.float32, 8), (np.float32, 12), (np.float16, 12),
                                     (np.complex64, 8)], ids=str)
def test_stationary_large_output_staged(isa, dtype, n):
    # n×n products back to back with an output over 16 MiB whose rows are not whole cache
    # lines: computed through a staging buffer whose whole lines are streamed out. The
    # outputs run in 1 and 7 pieces, so runs start and end mid-line, next to another
    # run's output, and the bytes around them must stay untouched.
    rng = np.random.default_rng(n)
    count = (16 << 20) // (n * n * np.dtype(dtype).itemsize) + 3
    x, y = ints(rng, (count, n, n), dtype), ints(rng, (count, n, n), dtype)
    if core.kernel_for(x[:2], y[:2]) != "stationary":
        assert isa != "avx512"  # narrower vectors leave some of these to the packed kernels
        pytest.skip(f"{n}×{n} runs on the packed kernels with {isa}")
    want = ref(x, y)
    for ranges in (1, 7):
        check_exact(core.matmul(x, y, ranges=ranges), want)
    core.set_output_staging(False)  # the stores of the kernel itself give the same
    try:
        check_exact(core.matmul(x, y, ranges=7), want)
    finally:
        core.set_output_staging(True)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64,
                                   np.complex64, np.complex128], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("parts", [2, 3, 4, 5, 7, 10, 29, 30])
def test_reduction_split_into_partial_sums(dtype, parts):
    # The TF op splits a long reduction into few outputs (a shared weight's gradient) into
    # partial sums so every thread works; the sum of the parts is the whole reduction
    # (16-bit parts are added in float32: on these integers every part and sum is exact).
    # Parts that do not divide the 30 products leave a tail of the rest, one more partial.
    rng = np.random.default_rng(parts)
    g, x = ints(rng, (30, 4, 8, 5), dtype), ints(rng, (30, 4, 8, 3), dtype)
    got = core.matmul(g, x, transpose_x=True, batch_shape=[4], reduction_parts=parts)
    want = ref(g, x, transpose_x=True).sum(axis=0)
    check_exact(got, want)
    # The same with the items of each part run apart (8×5 · 5×3 outputs of one sum).
    y = ints(rng, (30, 3, 5), dtype)
    got = core.matmul(g[:, 0], y, transpose_y=True, batch_shape=[], reduction_parts=parts)
    check_exact(got, ref(g[:, 0], y, transpose_y=True).sum(axis=0))
    with pytest.raises(ValueError, match="at most"):
        core.matmul(g, x, transpose_x=True, batch_shape=[4], reduction_parts=31)


def test_reduction_split_policy():
    w, x = np.ones((8, 8), np.float32), np.ones((1000, 8, 8), np.float32)
    assert core.suggest_reduction_split(x, x, [], 2) == 4        # one output, 1000 products
    assert core.suggest_reduction_split(x, x, [1000], 2) == 1    # nothing reduced
    for half in (np.float16, ml_dtypes.bfloat16):  # float32 sums, rounded once per part
        assert core.suggest_reduction_split(x.astype(half), x.astype(half), [], 2) == 4
    assert core.suggest_reduction_split(x[:7], x[:7], [], 2) == 1  # 7 products: not worth it
    assert core.suggest_reduction_split(x[:409], x[:409], [], 2) == 4  # prime: 4 and a tail
    assert core.suggest_reduction_split(x[:15], x[:15], [], 2) == 3  # a divisor near 4
    del w


# ---------------------------------------------------------------- the kernel families
# The engine tries its kernel families in the order of core.kernel_families and runs the
# first that can implement a plan (the last implements every plan). FAMILY_CASES sweeps
# shapes, layouts and reductions widely enough that every family is chosen by some of them
# on every ISA, so a family added to the table is tested the day it is added (or this
# fails, asking for a case that reaches it).
def family_cases():
    cases = []
    for m, n, k in itertools.product([1, 2, 3, 4, 5, 8, 17], [1, 2, 4, 8, 20],
                                     [1, 3, 4, 8, 9, 24, 25]):
        cases.append(((3, m, k), (3, k, n), {}))
    for side, k in itertools.product([4, 9, 20], [2, 8, 16, 24]):
        cases.append(((3, side, k), (9, 3, k, 1), {}))  # capsule-style: batch folded into N
    cases.append(((5, 6, 3), (5, 6, 2), {"transpose_x": True, "batch_shape": []}))
    cases.append(((4, 20, 7), (4, 9, 20), {"transpose_x": True, "transpose_y": True}))
    return cases


FAMILY_CASES = family_cases()


@pytest.mark.parametrize("family", core.kernel_families)
def test_every_kernel_family_is_chosen_and_exact(isa, family):
    chosen = 0
    rng = np.random.default_rng(12)
    for dtype in NP_DTYPES:
        for xs, ys, kw in FAMILY_CASES:
            x, y = ints(rng, xs, dtype), ints(rng, ys, dtype)
            if core.kernel_for(x, y, **kw) != family:
                continue
            chosen += 1
            flags = {f: kw.get(f, False) for f in ("transpose_x", "transpose_y")}
            want = ref(x, y, **flags)
            if "batch_shape" in kw:
                want = np_reduce_to(want, kw["batch_shape"])
            check_exact(core.matmul(x, y, **kw), want)
    assert chosen > 0, f"no case in FAMILY_CASES runs the {family!r} kernels on {isa}"


def test_kernel_for_every_plan():
    # The last family implements every plan; an empty output runs no kernel.
    assert core.kernel_families[-1] == "packed"
    x = np.ones((2, 3, 4), np.complex64)
    assert core.kernel_for(x, np.ones((4, 5), np.complex64)) in core.kernel_families
    assert core.kernel_for(np.ones((0, 3, 4)), np.ones((4, 5))) == "none"
    with pytest.raises(ValueError, match="Matrix size-incompatible"):
        core.kernel_for(np.ones((3, 4)), np.ones((5, 6)))


def test_pool_parallel_for_runs_every_unit_once():
    # The parallel-for of the XLA custom calls (cc/engine/execute.h) over a stand-in pool.
    for units, threads in [(1, 4), (7, 2), (1000, 3), (5000, 8)]:
        for late in (False, True):  # helpers on threads, or only after the call returned
            counts = core.pool_parallel_for(units, 10**6, threads, late)
            assert counts == [1] * units, (units, threads, late)



def test_stream_fill_writes_every_element_and_rejects_bad_arrays():
    # The benchmarks' write probe (tools/sweep.py timed_with_floor): a scalar head up to the
    # vectors' alignment, streamed vectors, a scalar tail, split over threads.
    for size in [0, 1, 3, 17, 64, 1000]:
        for offset in range(0, 17, 5):
            for threads in (1, 2, 5):
                buf = np.zeros(size + 40, np.float32)
                view = buf[offset:offset + size]
                core.stream_fill(view, 2.5, threads)
                assert (view == 2.5).all() and buf.sum() == 2.5 * size, (size, offset, threads)
    with pytest.raises(TypeError, match="C-contiguous float32"):
        core.stream_fill(np.zeros(8), 1.0, 1)  # float64
    with pytest.raises(TypeError, match="C-contiguous float32"):
        core.stream_fill(np.zeros(8, np.float32)[::2], 1.0, 1)
    read_only = np.zeros(8, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match="writeable"):
        core.stream_fill(read_only, 1.0, 1)
    with pytest.raises(ValueError, match="threads"):
        core.stream_fill(np.zeros(8, np.float32), 1.0, 0)

# ---------------------------------------------------------------- matrix-vector kernels
# N = 1 runs on the matvec kernels (short K, vectorised across rows of A: plain row-major A,
# whose row blocks are picked apart with shuffles, or a transposed A, whose columns are
# vectors) or on the dot kernels (longer K, four rows at a time, K's last partial vector
# masked). M sweeps every remainder of a block of rows (16 floats with AVX-512, 8 with
# AVX2, 4 with SSE2; halve for doubles) and of the four-row groups, K every remainder of a
# vector.
MATVEC_M = list(range(1, 36)) + [47, 64, 65]
MATVEC_K = list(range(1, 35))


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_matvec_and_dot_kernels_exact(dtype, transpose, isa):
    rng = np.random.default_rng(21)
    seen = set()
    for m, k in itertools.product(MATVEC_M, MATVEC_K):
        x = ints(rng, (2, k, m) if transpose else (2, m, k), dtype)
        y = ints(rng, (2, k, 1), dtype)
        seen.add(core.kernel_for(x, y, transpose_x=transpose))
        check_exact(core.matmul(x, y, transpose_x=transpose), ref(x, y, transpose_x=transpose))
    assert "matvec" in seen
    if not transpose:
        assert "dot" in seen


def test_matvec_kernels_read_views_in_place():
    # Shared, broadcast and strided vectors; a batch of vectors against one matrix folds
    # into a matrix product, one vector against a batch of matrices does not.
    rng = np.random.default_rng(22)
    for k in (1, 3, 5, 7, 8, 13):
        a = ints(rng, (6, 37, k), np.float32)
        v = ints(rng, (k, 1), np.float32)
        check_exact(core.matmul(a, v), ref(a, v))
        vb = ints(rng, (6, 3 * k, 2), np.float32)[:, ::3, :1]  # strided K
        check_exact(core.matmul(a, vb), ref(a, vb))
        ab = np.broadcast_to(a[:1], a.shape)  # stride-0 batch
        check_exact(core.matmul(ab, vb), ref(ab, vb))


# The dot kernels with N = 1..4 columns, each contiguous along K: a batch of vectors against a
# shared matrix (x [I, M, K] · y [N, I, K, 1], folded into I products of N columns whose output
# is column-major, so no stationary kernel takes it) and a transposed B past the stationary
# kernels' K. M sweeps the blocks of four, two and one rows, K every remainder of a vector
# (16 floats with AVX-512, 8 doubles; complex types run as their (re, im) scalars, so a
# complex K is two), every dtype, with conjugates for the complex ones.
DOT_M = list(range(1, 10)) + [13, 16, 17, 64]
DOT_K = list(range(4, 18)) + [24, 31, 32, 33, 34, 63, 64, 65]


def dot_takes(isa, dtype, m, n, k):
    """Whether the dot kernels take N = 2..4 columns where no stationary kernel does
    (cc/engine/gemm/dot.h DotPays); the packed kernels take them otherwise."""
    d = np.dtype(dtype)
    scalars = 2 if d.kind == "c" else 1
    acc = d.itemsize // scalars if d.itemsize >= 4 else 4  # float16 / bfloat16 sum in float32
    lanes = {"avx512": 64, "avx2": 32}.get(isa, 16) // acc
    if isa != "avx512":
        return scalars * k % lanes == 0  # a whole number of vectors
    if d.kind == "c" or acc == 8:
        return True
    if n == 2:
        return m < 64 or k >= 12
    return m < 16 or k >= (16 if m < 64 else 24)


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_dot_kernels_with_up_to_four_columns(dtype, isa):
    rng = np.random.default_rng(33)
    real = not np.issubdtype(dtype, np.complexfloating)
    conj = [(False, False)] if real else [(False, False), (True, False), (False, True),
                                          (True, True)]
    seen = set()
    for n, m, k in itertools.product(range(1, 5), DOT_M, DOT_K):
        cx, cy = conj[(n + m + k) % len(conj)]
        x, y = ints(rng, (3, m, k), dtype), ints(rng, (n, 3, k, 1), dtype)
        want = ("tiny" if real and max(m, n, k) <= 4 else  # the families before it
                "matvec" if real and n == 1 and k <= 7 else
                "dot" if n == 1 or dot_takes(isa, dtype, m, n, k) else "packed")
        assert core.kernel_for(x, y) == want, (m, n, k)
        seen.add(want)
        got = core.matmul(x, y, conjugate_x=cx, conjugate_y=cy)
        check_exact(got, ref(x, y, False, cx, False, cy))
        if k > 32 and n > 1:  # past every stationary kernel's K
            xb, yt = ints(rng, (2, m, k), dtype), ints(rng, (2, n, k), dtype)
            want = "dot" if dot_takes(isa, dtype, m, n, k) else "packed"
            assert core.kernel_for(xb, yt, transpose_y=True) == want, (m, n, k)
            got = core.matmul(xb, yt, transpose_y=True, conjugate_x=cx, conjugate_y=cy)
            check_exact(got, ref(xb, yt, False, cx, True, cy))
    assert "dot" in seen


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bf16_instructions", [False, True], ids=["integer", "cpu"])
def test_16bit_vector_conversions_round_like_numpy(dtype, bf16_instructions, isa):
    # The matvec and stationary kernels widen and round float16 / bfloat16 a vector at a
    # time. A product of one term (K = 1) is exact in float32, so each output is that float32
    # rounded once: to nearest even, to Inf past the largest finite value, NaN kept, and
    # subnormals both ways. x holds every kind of 16-bit value (random bit patterns).
    # bfloat16 rounds with integer operations, or with the CPU's conversion (AVX512-BF16)
    # and the integer path for vectors holding a subnormal, which that instruction reads as
    # zero; the row and column kernels are then the dot product, which flushes subnormals
    # (see the test below), so there the matvec kernel alone rounds this way.
    if bf16_instructions and not (np.dtype(dtype) == ml_dtypes.bfloat16 and isa == "avx512"
                                  and core.set_bf16_dot(True)):
        pytest.skip("the CPU's bfloat16 conversion needs AVX512-BF16 and bfloat16")
    rng = np.random.default_rng(27)
    # Random bit patterns, and bfloat16's special ones (few random bfloat16 patterns are):
    # ±0, subnormals, the smallest normals (times |y| < 1: subnormal sums), the largest
    # finite (times |y| > 1: Inf), ±Inf, quiet and signalling NaN.
    special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x0040, 0x007F, 0x0080, 0x8081, 0x00FF,
                        0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC1], np.uint16)
    bits = rng.integers(0, 1 << 16, size=(3, 37, 1)).astype(np.uint16)
    x = np.concatenate([bits, np.broadcast_to(special[None, :, None], (3, 16, 1))], axis=1)
    x = x.view(dtype)
    cases = [(x, rng.standard_normal((3, 1, 1)).astype(dtype), "matvec")]
    if not bf16_instructions:  # the row kernel, and the column one (C contiguous along M)
        cases.append((x, rng.standard_normal((3, 1, 20)).astype(dtype), "stationary"))
        cases.append((x[None], rng.standard_normal((20, 3, 1, 1)).astype(dtype), "stationary"))
    dot = core.bf16_dot()
    try:
        core.set_bf16_dot(bf16_instructions)
        for x_, y, family in cases:
            assert core.kernel_for(x_, y) == family
            with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf are wanted here
                want = (x_.astype(np.float32) @ y.astype(np.float32)).astype(dtype)
            np.testing.assert_array_equal(core.matmul(x_, y).astype(np.float32),
                                          want.astype(np.float32))
    finally:
        core.set_bf16_dot(dot)


def require_bf16_dot(isa):
    """Skips the test unless the AVX-512 kernels can run bfloat16 on the CPU's dot product
    (AVX512-BF16), which this turns on."""
    if not (isa == "avx512" and core.set_bf16_dot(True)):
        pytest.skip("bfloat16 dot product needs the AVX-512 kernels and AVX512-BF16")


def flush_subnormals(x):
    """x (float32) with its subnormal values replaced by zeros of the same sign."""
    tiny = np.finfo(np.float32).tiny
    return np.where(np.abs(x) < tiny, np.copysign(np.float32(0), x), x).astype(np.float32)


def test_bf16_dot_product_flushes_subnormals(isa):
    # bfloat16 on the CPU's dot product instruction (AVX512-BF16) reads subnormal inputs as
    # zero and flushes subnormal sums to zero, as TensorFlow's own bfloat16 matmul does on
    # such CPUs; every other value rounds as float32 rounded once, like the kernels that
    # widen. The same random bit patterns as above. K = 1: each output one product, exact
    # before its rounding. K = 2: one instruction, which may also flush a subnormal partial
    # sum, so within one bfloat16 step (or the smallest normal) of the exact sum flushed.
    require_bf16_dot(isa)
    rng = np.random.default_rng(27)
    bf = ml_dtypes.bfloat16
    for k in (1, 2):
        x = rng.integers(0, 1 << 16, size=(3, 37, k)).astype(np.uint16).view(bf)
        # The row kernel, and the column kernel (C contiguous along M: x shared by a batch
        # of vectors), which runs the same dot product as Cᵀ = Bᵀ·Aᵀ.
        for xs, y in ((x, rng.standard_normal((3, k, 20)).astype(bf)),
                      (x[None], rng.standard_normal((20, 3, k, 1)).astype(bf))):
            assert core.kernel_for(xs, y) == "stationary"
            with np.errstate(invalid="ignore", over="ignore"):
                prod = flush_subnormals(xs.astype(np.float32))[..., None] * \
                    y.astype(np.float32)[..., None, :, :]
                want = flush_subnormals(prod.sum(axis=-2, dtype=np.float32)).astype(bf)
            got = core.matmul(xs, y).astype(np.float32)
            if k == 1:
                np.testing.assert_array_equal(got, want.astype(np.float32))
            else:
                np.testing.assert_allclose(got, want.astype(np.float32), rtol=2.0 ** -7,
                                           atol=2 * np.finfo(np.float32).tiny)


def test_bf16_dot_rounds_ties_to_even_and_overflows_to_inf(isa):
    # The dot product kernel rounds its float32 sums with the CPU's own conversion
    # (vcvtneps2bf16): sums exactly halfway between two bfloat16 go to the even one, a sum
    # past the largest bfloat16 (halfway or more) to Inf, Inf - Inf is NaN. K = 2,
    # rows (1, s) · (1, 1)ᵀ: each sum exact in float32, so the want is it rounded once.
    require_bf16_dot(isa)
    bf = ml_dtypes.bfloat16
    big = float(ml_dtypes.finfo(bf).max)
    rows = [(1, 2.0**-8), (1 + 2.0**-7, 2.0**-8), (-1, -(2.0**-8)), (-1 - 2.0**-7, -(2.0**-8)),
            (1, 2.0**-9), (1 + 2.0**-7, 2.0**-9), (big, 2.0**119), (-big, -(2.0**119)),
            (big, 2.0**118), (np.inf, 0), (np.inf, -np.inf), (3, -3), (0.1, 0.2)]
    x = np.array(rows, np.float32).astype(bf)
    with np.errstate(invalid="ignore", over="ignore"):
        sums = x.astype(np.float32).sum(axis=1)  # exact in float32
    for n in (5, 20):  # the half-width strip and two strips
        y = np.ones((2, n), bf)
        assert core.kernel_for(x, y) == "stationary"
        got = core.matmul(x, y).astype(np.float32)
        want = np.repeat(sums.astype(bf).astype(np.float32)[:, None], n, axis=1)
        np.testing.assert_array_equal(got, want)
    assert np.isposinf(want[6]).all() and np.isneginf(want[7]).all() and np.isnan(want[10]).all()
    assert want[0, 0] == 1 and want[1, 0] == 1 + 2.0**-6 and want[8, 0] == big


# Streamed columns at least 1024 elements apart (the capsule prediction's u[b, i, :]) are
# copied to a contiguous 16 KiB buffer, a block of columns at a time, where more than one
# strip reads them: one block, several blocks and a partial last one, K read in place and
# through a strided view. float16 / bfloat16 columns are widened into it wherever they
# lie (near ones too: the last case); bfloat16 with the CPU's instructions on and off.
@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_far_streamed_columns_copied_in_blocks(dtype, isa):
    rng = np.random.default_rng(27)
    longest = {"avx512": 32, "avx2": 11}.get(isa, 8) // (2 if np.dtype(dtype).kind == "c" else 1)
    before = core.bf16_dot()
    settings = [True, False] if np.dtype(dtype) == ml_dtypes.bfloat16 and before else [before]
    try:
        for on, (m, k, b, far) in itertools.product(
                settings, [(17, 8, 9, 1), (33, 32, 150, 1), (20, 16, 300, 1), (40, 5, 40, 1),
                           (40, 7, 30, 0)]):
            core.set_bf16_dot(on)
            caps = 1024 // k + 1 if far else 2  # u[b] is caps·k >= 1024 elements long
            x = ints(rng, (caps, m, k), dtype)
            y = ints(rng, (b, caps, 2 * k, 1), dtype)[:, :, ::2]  # K stride 2
            for yy in (np.ascontiguousarray(y), y):
                if k <= longest:
                    assert core.kernel_for(x, yy) == "stationary", (dtype, m, k, b)
                check_exact(core.matmul(x, yy), ref(x, yy))
    finally:
        core.set_bf16_dot(before)


# ---------------------------------------------------------------- stationary kernels
# The row kernel takes M >= 8 with N >= 4, with AVX-512 also M <= 3 with N >= 4 (one or
# a few rows times a matrix: a lone streamed row sums its K products in split chains), and
# any M where N >= 2 fits one strip of B's contiguous columns (complex: any N): whole
# vector strips, then one partial strip. N sweeps every remainder of the strip (16 floats or 8
# complex64 with AVX-512), K up to the longest stationary K (32 real, 16 complex on
# AVX-512) and one past it.
ROW_N = list(range(1, 34))
ROW_K = [1, 2, 3, 5, 7, 8, 11, 12, 16, 17, 24, 25, 32, 33]


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_row_kernel_every_strip_remainder(dtype, isa):
    rng = np.random.default_rng(23)
    for n, k in itertools.product(ROW_N, ROW_K):
        m = 1 + (n * 7 + k) % 9  # every M from 1 to 9 across the sweep
        x, y = ints(rng, (2, m, k), dtype), ints(rng, (2, k, n), dtype)
        check_exact(core.matmul(x, y), ref(x, y))


def test_few_rows_times_a_wide_matrix_take_the_row_kernel_with_avx512(isa):
    rng = np.random.default_rng(25)
    for dtype, m, n, k in itertools.product(NP_DTYPES, [1, 2, 3], [17, 33, 64], [8, 13, 16]):
        x, y = ints(rng, (3, m, k), dtype), ints(rng, (3, k, n), dtype)
        if isa == "avx512":
            assert core.kernel_for(x, y) == "stationary", (dtype, m, n, k)
        check_exact(core.matmul(x, y), ref(x, y))


# A real strip whose lanes are rows of contiguous elements (B transposed on the row
# kernel, a row-major A on the column kernel) is transposed in registers, 8 columns at a
# time: every strip remainder, every remainder of the 8-column groups, each ISA.
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_strips_transposed_in_registers(dtype, isa):
    rng = np.random.default_rng(26)
    for n, k in itertools.product(range(2, 34), [1, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32]):
        m = 8 + (n + k) % 3
        x, y = ints(rng, (2, m, k), dtype), ints(rng, (2, n, k), dtype)
        if isa == "avx512":
            assert core.kernel_for(x, y, transpose_y=True) == "stationary", (dtype, n, k)
        check_exact(core.matmul(x, y, transpose_y=True), ref(x, y, False, False, True, False))


# The packed kernels' tiles of operands whose K is contiguous (A row-major along the
# vectors in column mode, Bᵀ in row mode) are transposed in registers, 8 K steps at a time,
# with AVX-512: every K remainder of those groups, tiles of 8 and 16 rows with the edge tile
# of every width, reduced over the batch (a shared weight's gradient g·Bᵀ) or not.
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_packed_tiles_transposed_in_registers(dtype, isa, packed_sums):
    rng = np.random.default_rng(32)
    for m, n, k in itertools.product((8, 9, 16, 20, 24, 33), (2, 3, 17, 40),
                                     (2, 3, 8, 9, 17, 33, 40)):
        x, y = ints(rng, (5, m, k), dtype), ints(rng, (5, n, k), dtype)
        assert core.kernel_for(x, y, transpose_y=True, batch_shape=[]) == "packed", (m, n, k)
        want = ref(x, y, False, False, True, False)
        check_exact(core.matmul(x, y, transpose_y=True, batch_shape=[]), np_reduce_to(want, []))
        if k > 32:  # past the stationary kernels
            check_exact(core.matmul(x, y, transpose_y=True), want)


# The packed kernels with A transposed (rows contiguous: a shared weight's input gradient
# Wᴴ·g), whose 8- and 16-row tiles pack a K step as one vector load with zero lanes past
# the rows, and complex tiles vectorised along M (C column-major: N columns folded from a
# batch) or along N: every M remainder, every dtype and ISA, with conjugates, summed over a
# batch or not.
@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_packed_tiles_of_a_transposed_a_and_complex_tiles_both_ways(dtype, isa, packed_sums):
    rng = np.random.default_rng(34)
    conjs = (False, True) if np.issubdtype(dtype, np.complexfloating) else (False,)
    for m, n in itertools.product((1, 2, 3, 5, 8, 9, 12, 16, 17, 20, 24, 31, 33), (1, 3, 4, 9)):
        k = 40  # past the stationary kernels: packed
        w, g = ints(rng, (3, k, m), dtype), ints(rng, (2, 3, k, n), dtype)
        for conj in conjs:
            kw = {"transpose_x": True, "conjugate_x": conj}
            if m > 1:  # (one row of Wᵀ is contiguous along K: the dot kernel)
                assert core.kernel_for(w, g, **kw) == "packed", (m, n)
            check_exact(core.matmul(w, g, **kw), ref(w, g, True, conj))
            check_exact(core.matmul(w, g, batch_shape=[], **kw),
                        np_reduce_to(ref(w, g, True, conj), []))
            # Row-major C, N columns contiguous: the tiles vectorise along N.
            x, y = ints(rng, (2, m, k), dtype), ints(rng, (2, k, n + 4), dtype)
            check_exact(core.matmul(x, y, conjugate_x=conj), ref(x, y, False, conj))


@pytest.fixture
def packed_sums():
    """Reductions summed on the packed kernels (not run as items) for the test."""
    core.set_reduction_items(False)
    yield
    core.set_reduction_items(True)


# A sum over one reduction loop whose items another family takes runs as those items, a
# window of them at a time summed in the accumulation type (cc/engine/gemm.cc RunItems):
# exact against numpy and equal to the packed kernels' running sum, every dtype and ISA.
# One output summed over a long batch; many outputs of a few items each, in windows that
# end inside an output's items and span several outputs; items larger than a window;
# scratch in both orientations (column-major: fewer columns than a vector, more rows);
# adjoints; a sum over one axis of two.
@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_reductions_run_as_items(dtype, isa):
    rng = np.random.default_rng(33)
    cases = [  # x, yᵀ shapes, batch_shape summed to
        ((300, 1, 8), (300, 3, 8), []),
        ((37, 16, 5), (37, 3, 5), []),
        ((37, 3, 5), (37, 16, 5), []),
        ((4, 9, 2, 6), (4, 9, 12, 6), [9]),
        ((3, 700, 5, 4), (3, 700, 6, 4), [700]),
        ((3, 2, 24, 7), (3, 2, 24, 7), [1, 2]),
        ((3, 200, 8), (3, 120, 8), []),
    ]
    items = 0
    for xs, ys, batch in cases:
        x, y = ints(rng, xs, dtype), ints(rng, ys, dtype)
        for conj in (False, True) if np.iscomplexobj(x) else (False,):
            kw = {"transpose_y": True, "conjugate_y": conj, "batch_shape": batch}
            want = np_reduce_to(ref(x, y, False, False, True, conj), batch)
            got = core.matmul(x, y, **kw)
            check_exact(got, want)
            core.set_reduction_items(False)
            try:
                assert core.kernel_for(x, y, **kw) == "packed", (xs, ys)
                np.testing.assert_array_equal(core.matmul(x, y, **kw), got)
            finally:
                core.set_reduction_items(True)
            items += core.kernel_for(x, y, **kw) != "packed"
    assert items >= 3  # (the others stay packed on some ISAs)


def check_straight_runs(rng, cases, dtype, on_stationary, switch=core.set_one_strip_runs):
    """Each (m, n, k) of `cases` against float64 with a kernel path on and off (`switch`,
    by default the straight-through row runs): B and Bᵀ, A transposed and with K stride 2.
    on_stationary(m, n, k): whether the product must be on the stationary family."""
    for m, n, k in cases:
        x, y = ints(rng, (3, m, k), dtype), ints(rng, (3, k, n), dtype)
        xt = np.ascontiguousarray(np.swapaxes(x, -1, -2))
        yt = np.ascontiguousarray(np.swapaxes(y, -1, -2))
        xs = ints(rng, (3, m, 2 * k), dtype)[..., ::2]  # A's K stride 2
        want, want_s = ref(x, y), ref(xs, y)
        if on_stationary(m, n, k):
            assert core.kernel_for(x, y) == "stationary", (m, n, k)
        try:
            for on in (True, False):
                switch(on)
                check_exact(core.matmul(x, y), want)
                check_exact(core.matmul(x, yt, transpose_y=True), want)
                check_exact(core.matmul(xt, y, transpose_x=True), want)
                check_exact(core.matmul(xs, y), want_s)
        finally:
            switch(True)


# Products whose output rows fit one strip run straight through on the row kernel (real,
# K <= 16, M <= 64): every M across its groups of 8 and 4 rows and past its limit, N across
# the half-width strips (up to half a vector) and the full ones and one past a strip, B and
# Bᵀ, A transposed or strided, with that path on and off.
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_one_strip_runs_every_shape(dtype, isa):
    lanes = 64 // max(np.dtype(dtype).itemsize, 4)
    cases = [(m, n, k) for m in (1, 2, 3, 4, 5, 7, 8, 9, 23, 64, 65)
             for n in (2, 3, 5, lanes // 2, lanes // 2 + 1, lanes - 1, lanes, lanes + 1)
             for k in (1, 3, 5, 8, 9, 12, 16, 17)]
    check_straight_runs(
        np.random.default_rng(27), cases, dtype,
        lambda m, n, k: isa == "avx512" and dtype == np.float32 and max(m, n, k) > 4 and n <= 16)


# Products whose output rows span two to four strips run in blocks of rows on the row kernel
# (real, AVX-512, M >= 4): every M across its blocks (8 or 4, then 2 and 1 rows), N across
# the strips' widths (the last strip half-width up to half a vector; two whole strips,
# which float32 / float64 read in B's rows in place) and one past the fourth, K up to one
# past the stationary limit, B and Bᵀ, A transposed or strided, with that path on and off.
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_strip_blocks_every_shape(dtype, isa):
    lanes = 64 // max(np.dtype(dtype).itemsize, 4)
    cases = [(m, n, k) for m in (3, 4, 5, 8, 11, 12, 13, 16, 23)
             for n in (lanes + 1, lanes + 3, lanes + lanes // 2, lanes + lanes // 2 + 1,
                       2 * lanes, 2 * lanes + 1, 3 * lanes, 3 * lanes + lanes // 2,
                       4 * lanes - 1, 4 * lanes, 4 * lanes + 1)
             for k in (1, 5, 16, 17, 32, 33)]
    check_straight_runs(
        np.random.default_rng(28), cases, dtype,
        lambda m, n, k: isa == "avx512" and dtype == np.float32 and m >= 4 and n <= 64 and k <= 32)


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
def test_complex_stationary_kernels_conjugate(flags):
    # Complex strips hold (re, im) pairs and a copy turned by 90°; conjugation of either
    # side (adjoint flags) flips the strip's imaginary lanes or the streamed value's.
    tx, cx, ty, cy = flags
    rng = np.random.default_rng(24)
    for dtype, (m, n, k) in itertools.product(
            [np.complex64, np.complex128], [(3, 5, 4), (9, 17, 8), (20, 5, 16), (5, 1, 3)]):
        x = ints(rng, (3, k, m) if tx else (3, m, k), dtype)
        y = ints(rng, (n, k) if ty else (k, n), dtype)
        kw = {"transpose_x": tx, "conjugate_x": cx, "transpose_y": ty, "conjugate_y": cy}
        assert core.kernel_for(x, y, **kw) in ("stationary", "tiny")
        check_exact(core.matmul(x, y, **kw), ref(x, y, tx, cx, ty, cy))
    x, y = ints(rng, (4, 6, 9), np.complex64), ints(rng, (9, 20), np.complex64)
    assert core.kernel_for(np.swapaxes(x, -1, -2), y, transpose_x=True) == "stationary"


# bfloat16 on the CPU's dot product (AVX512-BF16): every product of the row kernel whose
# layout it reads (B row-major or transposed, A with any K stride, C row-major): N across
# the half-width strip (up to 8 columns), the 16-column strips and the 64-column blocks,
# odd and even K up to the stationary limit, M across the 8, 4, 2 and 1 row blocks, against
# float64 with the dot product on and off.
def test_bf16_dot_every_shape(isa):
    require_bf16_dot(isa)
    cases = [(m, n, k) for m in (1, 3, 4, 7, 8, 13, 70)
             for n in (2, 5, 8, 9, 15, 16, 17, 33, 48, 63, 64, 65, 100, 130)
             for k in (1, 2, 3, 8, 15, 16, 17, 31, 32)]
    check_straight_runs(np.random.default_rng(29), cases, ml_dtypes.bfloat16,
                        lambda m, n, k: False, switch=core.set_bf16_dot)


# The column kernel's bfloat16 products (C contiguous along M: capsule-style x [I, M, K]
# shared by a batch of vectors y [B, I, K, 1]) on the dot product, run as Cᵀ = Bᵀ·Aᵀ: M
# across the half-width strip, the 16-row strips and the 64-row blocks, B (the streamed
# vectors, pages apart) across the 8, 4, 2 and 1 row blocks, odd and even K, A row-major
# or transposed and y with K stride 2, against float64 with the dot product on and off.
def test_bf16_dot_column_kernel_every_shape(isa):
    require_bf16_dot(isa)
    rng = np.random.default_rng(31)
    bf = ml_dtypes.bfloat16
    try:
        for m, b, k in itertools.product((4, 5, 8, 9, 16, 17, 33, 64, 65, 130),
                                         (8, 9, 13, 50), (1, 2, 3, 8, 15, 16, 31, 32)):
            x, y = ints(rng, (3, m, k), bf), ints(rng, (b, 3, k, 1), bf)
            xt = np.ascontiguousarray(np.swapaxes(x, -1, -2))
            ys = ints(rng, (b, 3, 2 * k, 1), bf)[:, :, ::2]  # K stride 2
            assert core.kernel_for(x, y) == "stationary", (m, b, k)
            want, want_s = ref(x, y), ref(x, ys)
            for on in (True, False):
                core.set_bf16_dot(on)
                check_exact(core.matmul(x, y), want)
                check_exact(core.matmul(xt, y, transpose_x=True), want)
                check_exact(core.matmul(x, ys), want_s)
    finally:
        core.set_bf16_dot(True)


# The packed family's bfloat16 plans on the dot product: K past the stationary kernels
# (odd and even), C written along columns (the column kernel's layout), reductions over
# batch axes (a weight gradient) and a broadcast operand packed once; every edge tile of
# 1, 2, 4 and 8 rows and 16 or 32 columns.
def test_bf16_dot_packed_every_shape(isa):
    require_bf16_dot(isa)
    rng = np.random.default_rng(30)
    bf = ml_dtypes.bfloat16
    try:
        for m, n, k in itertools.product((1, 2, 3, 5, 8, 9, 17), (1, 7, 16, 17, 33, 70),
                                         (33, 40, 65)):
            x, y = ints(rng, (3, m, k), bf), ints(rng, (3, k, n), bf)
            assert core.kernel_for(x, y) in ("packed", "dot", "matvec"), (m, n, k)
            want = ref(x, y)
            yt = np.ascontiguousarray(np.swapaxes(y, -1, -2))
            for on in (True, False):
                core.set_bf16_dot(on)
                check_exact(core.matmul(x, y), want)
                check_exact(core.matmul(x, yt, transpose_y=True), want)
                check_exact(core.matmul(x, y, batch_shape=[]), np_reduce_to(want, []))
                check_exact(core.matmul(x[:1], y), ref(x[:1], y))  # A packed once
        for m, n, k in itertools.product((4, 9, 20), (8, 20), (3, 16)):
            # C along columns: Cᵀ = (yᵀ xᵀ) written through a transposed view.
            x, y = ints(rng, (6, k, m), bf), ints(rng, (6, k, n), bf)
            want = ref(x, y, True, False, False, False)
            for on in (True, False):
                core.set_bf16_dot(on)
                check_exact(core.matmul(x, y, transpose_x=True), want)
                check_exact(core.matmul(x, y, transpose_x=True, batch_shape=[]),
                            np_reduce_to(want, []))
    finally:
        core.set_bf16_dot(True)


def test_bf16_dot_setting():
    # On by default exactly where the CPU has AVX512-BF16; never turned on without it.
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    has = "avx512_bf16" in flags and "avx512" in ISAS
    assert core.bf16_dot() == has
    assert core.set_bf16_dot(True) == has
    assert core.set_bf16_dot(False) is False and core.bf16_dot() is False
    core.set_bf16_dot(True)


# ---------------------------------------------------------------- fused gradient pairs
REAL_DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


def fuses(dtype, s, n, r, contiguous):
    # Where PlanFusedPair fuses (measured): only where X's R rows are not one dense block
    # (`contiguous`: rows S apart) and R > 1; 16-bit at any S, from R = 32 where rows of P
    # and Q hold one or two elements; float32 from S = 20.
    if contiguous or r <= 1 or n > 16:
        return False
    if np.dtype(dtype).itemsize == 2:
        return n > 2 or r >= 32
    return dtype == np.float32 and s >= 20


def capsule_backward_pair(rng, dtype, b, i, s, n, **kw):
    """The Pair op of capsule prediction's backward, as the TF gradient builds it:
    dW[i] = Σ_b g[b,i]·u[b,i]ᵀ and du[b,i] = W[i]ᵀ·g[b,i]; returns (got..., wants)."""
    w, u, g = ints(rng, (i, s, n), dtype), ints(rng, (b, i, n, 1), dtype), \
        ints(rng, (b, i, s, 1), dtype)
    got = core.matmul_pair(g, u, False, True, [i], w, g, True, False, [b, i], **kw)
    want_dw = np_reduce_to(ref(g, u, transpose_y=True), [i])
    want_du = ref(w, g, transpose_x=True)
    return got, (want_dw, want_du)


# Both gradients of a broadcast weight in one pass over the upstream gradient: every
# remainder of the register blocks (S rows of 6 / 3, R rows of 4 / 2), every vector width
# (n = 1..16, one past it; float32 / float64 rows of n = 4, 8 and 16 are read and summed in
# place, the others staged), X in one pass or several (B = 50, S = 160), batches that the
# planner folds only in part (B > 64), outputs split into ranges as threads split them, on
# every ISA and real dtype, exact against float64; the same with the fused path off.
@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_fused_pair_every_shape(dtype, isa):
    rng = np.random.default_rng(31)
    cases = [(1, 1, 1, 1), (3, 2, 5, 8), (5, 3, 7, 4), (4, 1, 6, 3), (7, 2, 13, 9),
             (9, 3, 12, 16), (2, 4, 1, 5), (130, 2, 11, 8), (50, 3, 160, 8), (6, 2, 4, 17),
             (5, 2, 23, 5), (130, 2, 21, 16), (3, 3, 20, 1)]
    try:
        for b, i, s, n in cases:
            for on, ranges in ((True, 1), (True, 3), (False, 1)):
                core.set_fused_pairs(on)
                (dw, du, fused), (want_dw, want_du) = capsule_backward_pair(
                    rng, dtype, b, i, s, n, ranges=ranges)
                # X = g[:, i] has rows b, I·S apart: one dense block when I = 1.
                assert fused == (on and fuses(dtype, s, n, b, i == 1)), (b, i, s, n)
                check_exact(dw, want_dw)
                check_exact(du, want_du)
    finally:
        core.set_fused_pairs(True)


@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_fused_pair_other_forms(dtype):
    # The shared operand as the left factor of both products, rows of P and Q of different
    # widths: P = Σ_i X[i]ᵀ·Y[i], Q[i] = X[i]·Z with X stored [I, R, S] (Z broadcast over
    # i, as a weight is), so that R runs over i and r. X's rows are padded (S + 3 apart):
    # rows S apart, one dense block, do not fuse.
    rng = np.random.default_rng(32)
    for i, r, s, n_p, n_q in [(2, 5, 9, 3, 16), (3, 17, 4, 8, 1), (1, 1, 7, 2, 2),
                              (2, 6, 25, 16, 3)]:
        x = ints(rng, (i, r, s + 3), dtype)[..., :s]
        y, z = ints(rng, (i, r, n_p), dtype), ints(rng, (1, s, n_q), dtype)
        p, q, fused = core.matmul_pair(x, y, True, False, [1], x, z, False, False, None)
        assert fused == fuses(dtype, s, max(n_p, n_q), i * r, False), (i, r, s, n_p, n_q)
        check_exact(p, np_reduce_to(ref(x, y, transpose_x=True), [1]))
        check_exact(q, ref(x, z))
        # The gradients of a plain batched product (X one dense block per output) run as
        # two products, each slice of X shared in cache, not fused.
        x, z = np.ascontiguousarray(x), ints(rng, (i, s, n_q), dtype)
        p, q, fused = core.matmul_pair(x, y, True, False, None, x, z, False, False, None)
        assert not fused
        check_exact(p, ref(x, y, transpose_x=True))
        check_exact(q, ref(x, z))
    # Not a pair of that form: a product sharing nothing, a copy of X (another buffer),
    # rows wider than a vector. All run as two products, with the same results.
    x, y, z = ints(rng, (2, 5, 9), dtype), ints(rng, (2, 5, 3), dtype), ints(rng, (2, 9, 4), dtype)
    for args, want in [((x, y, True, False, None, z, z, True, False, None),
                        (ref(x, y, transpose_x=True), ref(z, z, transpose_x=True))),
                       ((x, y, True, False, None, x.copy(), z, False, False, None),
                        (ref(x, y, transpose_x=True), ref(x, z)))]:
        p, q, fused = core.matmul_pair(*args)
        assert not fused
        check_exact(p, want[0])
        check_exact(q, want[1])
    z17 = ints(rng, (2, 9, 17), dtype)
    p, q, fused = core.matmul_pair(x, y, True, False, None, x, z17, False, False, None)
    assert not fused
    check_exact(q, ref(x, z17))


def test_fused_pair_through_the_tf_op():
    # The capsule layer's backward is one Pair op, which runs fused (on TF's intra-op pool)
    # and matches tf.einsum's gradients, with a batch the planner folds only in part.
    import tensorflow as tf

    import tf_smallmm as tsm

    def step(f):
        @tf.function
        def run(w, u, g):
            with tf.GradientTape() as t:
                t.watch([w, u])
                y = f(w, u)
            return t.gradient(y, [w, u], output_gradients=g)
        return run

    ours, ref_step = step(tsm.capsule_predict), step(lambda w, u: tf.einsum("ijkl,bil->bijk", w, u))
    rng = np.random.default_rng(33)
    for b in (3, 100):
        w = tf.constant(rng.standard_normal((96, 10, 16, 8)), tf.float32)
        u = tf.constant(rng.standard_normal((b, 96, 8)), tf.float32)
        g = tf.constant(rng.standard_normal((b, 96, 10, 16)), tf.float32)
        graph = ours.get_concrete_function(w, u, g).graph
        assert "SmallMMBatchMatMulPair" in {op.type for op in graph.get_operations()}, b
        for got, want in zip(ours(w, u, g), ref_step(w, u, g)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-4)



def run_benchmark_program(tmp, name, opt, runs):
    """Builds benchmarks/<name>.cc with the flags setup.py gives the ISA this CPU runs and
    runs it once per argument tuple of `runs`: the finished processes, in that order."""
    import ast
    import os
    import shutil
    import subprocess

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++")
    root = pathlib.Path(__file__).resolve().parents[1]
    tree = ast.parse((root / "setup.py").read_text())
    isa_flags = next(ast.literal_eval(node.value) for node in tree.body
                     if isinstance(node, ast.Assign) and node.targets[0].id == "ISA_FLAGS")
    isa = core.active_isa()
    # The compiler and the harness are not ours to sanitize (scripts/sanitize.sh preloads
    # the ASan runtime into this process).
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    exe = pathlib.Path(tmp) / name
    built = subprocess.run([compiler, opt, "-std=c++17", "-pthread", f"-I{root}",
                            *isa_flags[isa], f"-DSMALLMM_ISA={isa}",
                            str(root / "benchmarks" / f"{name}.cc"), "-o", str(exe)],
                           check=False, capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0, built.stderr
    return [subprocess.run([str(exe), *args], check=False, capture_output=True, text=True,
                           timeout=120, env=env) for args in runs]


@pytest.mark.slow
def test_pair_kernel_benchmark_builds_and_matches(tmp_path):
    # benchmarks/pair_kernel.cc times the fused pair without TF and checks dW and du
    # against a double loop (exit status 1 if they differ), on shapes through every path of
    # Run (rows below and above the prefetch threshold, several passes of X, N of 4, 8 and
    # 16, hot and cold, threads).
    # threads, hot, B, I, S, N, dtype, timed runs
    runs = [("1", "0", "50", "7", "160", "8", "float32", "2"),
            ("2", "0", "9", "13", "37", "5", "float32", "2"),
            ("1", "1", "4", "6", "20", "16", "float32", "2"),
            ("2", "0", "64", "5", "300", "3", "float32", "2"),
            ("1", "0", "7", "9", "33", "16", "float64", "2")]
    for args, run in zip(runs, run_benchmark_program(tmp_path, "pair_kernel", "-O2", runs)):
        assert run.returncode == 0, (args, run.stderr)
        assert "us per output" in run.stdout


@pytest.mark.slow
def test_nn_kernel_benchmark_builds_and_matches(tmp_path):
    # benchmarks/nn_kernel.cc times batched n×n through StationaryRun without TF and checks
    # three products against a double loop (exit status 1 if they differ), on runs through
    # OneStripRun (n = 5, staged), the strip layers (16) and BlockRun (20, 32), with one and
    # two threads; exit status 2 for arguments out of range, 3 for a size that this ISA runs
    # on another kernel family.
    # n, threads, rounds, elements per operand
    runs = [("5", "1", "1", "30000"), ("5", "2", "1", "5000000"), ("16", "2", "1", "300000"),
            ("20", "2", "1", "5000000"), ("32", "1", "1", "300000"),
            ("32", "2", "1", "5000000")]
    bad = [("9",), ("3",), ("5", "0")]
    done = run_benchmark_program(tmp_path, "nn_kernel", "-O1", runs + bad)
    for args, run in zip(runs, done):
        if run.returncode == 3 and core.active_isa() != "avx512":
            continue
        assert run.returncode == 0, (args, run.stderr)
        assert "x floor" in run.stdout
    for args, run in zip(bad, done[len(runs):]):
        assert run.returncode == 2, args


# ---------------------------------------------------------------- planner folds
@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("m,n,k", [(2, 2, 2), (5, 12, 7), (32, 1, 3), (16, 4, 16), (7, 3, 32)])
def test_shared_rhs_folds_into_rows(m, n, k, dtype):
    # [B, M, K] @ [K, N] (and [1, K, N]) is one [B·M, K] @ [K, N] product per work item,
    # and its gradient Σ_b A[b]ᵀ·g[b] is one product whose K is B·M.
    rng = np.random.default_rng(m * 100 + n * 10 + k)
    x = ints(rng, (30, m, k), dtype)
    for y in (ints(rng, (k, n), dtype), ints(rng, (1, k, n), dtype)):
        plan = core.plan(x, y)
        assert plan["m"] > m and plan["m"] % m == 0
        assert plan["m"] * plan["num_outputs"] == 30 * m
        check_exact(core.matmul(x, y), ref(x, y))
        g = ints(rng, (30, m, n), dtype)
        shape = list(y.shape[:-2])
        plan = core.plan(x, g, transpose_x=True, batch_shape=shape)
        assert plan["k"] > m and plan["k"] * plan["num_reduced"] == 30 * m
        want = np_reduce_to(ref(x, g, transpose_x=True), shape)
        check_exact(core.matmul(x, g, transpose_x=True, batch_shape=shape), want)


def test_folds_leave_other_layouts_alone():
    x = np.ones((30, 5, 7), np.float32)
    # A transposed: its rows do not run on from one matrix to the next.
    xt = np.ascontiguousarray(np.swapaxes(x, -1, -2))
    plan = core.plan(xt, np.ones((7, 3), np.float32), transpose_x=True)
    assert plan["m"] == 5 and plan["num_outputs"] == 30
    # B not shared: nothing folds.
    assert core.plan(x, np.ones((30, 7, 3), np.float32))["num_outputs"] == 30
    # A prime batch has no divisor to fold by, and stays correct.
    xp = ints(np.random.default_rng(25), (31, 5, 7), np.float32)
    y = ints(np.random.default_rng(26), (7, 3), np.float32)
    check_exact(core.matmul(xp, y), ref(xp, y))
