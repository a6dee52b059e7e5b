"""The GPU kernels' block program, run on the host over a simulated grid (no GPU needed).

`sim.simulate_gpu_matmul` (the test-support module tf_smallmm._smallmm_gpu_sim) runs
cuda/smallmm_gpu_logic.h — the code the CUDA kernels execute — for every block and thread
of the launch the GPU would get, with shared memory emulated per block (see
cuda/testing/smallmm_gpu_sim.h for how, and where that is not faithful).
Besides returning the product, it raises if any thread touches shared memory outside the
block's allocation, reads shared memory nobody wrote, misses a barrier between a write and
another thread's access, loads outside an operand, or stores an output element other than
exactly once.

The reference is the CPU engine with its baseline ISA (no FMA): the block program sums in
the same order, so the results must be identical bit for bit, random data included. (The
dot kernels sum along K in vector lanes; products they would run are read through a
strided view that sends them to a kernel summing in K order: `k_ordered`.)

The CUDA build has one kernel per variant of SMALLMM_GPU_KERNELS (`sim.gpu_kernels`: square
buckets holding several small matrices per block, capsule-shaped tiles with a short K, and
the generic kernel); the simulation runs the variant the launcher would choose, or the one
named by `kernel`, and the tests loop over the table.
"""

import itertools

import numpy as np
import pytest

from engine_dtypes import NP_DTYPES
from tf_smallmm import _smallmm_core as core
from tf_smallmm import _smallmm_gpu_sim as sim

# Every CPU tile size, sizes around them and around the GPU's 32-column tile, and primes.
SIZES = [1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32, 33]
# Threads per block of the generic kernel: the real launch (256), one warp, sizes that
# divide nothing, extremes.
BLOCKS = [1, 32, 96, 256, 1024]
KERNELS = {k["name"]: k for k in sim.gpu_kernels}


@pytest.fixture(autouse=True)
def _baseline_cpu_reference():
    before = core.active_isa()
    assert core.set_isa("baseline")
    yield
    core.set_isa(before)


def rand(rng, shape, dtype):
    x = rng.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def same_bits(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = np.ascontiguousarray(got), np.ascontiguousarray(want)
    if not np.array_equal(g.view(np.uint8), w.view(np.uint8)):
        diff = np.abs(g.astype(np.complex128) - w.astype(np.complex128))
        i = np.unravel_index(np.argmax(diff), diff.shape)
        raise AssertionError(f"{(g.view(np.uint8) != w.view(np.uint8)).sum()} bytes differ; "
                             f"worst at {i}: got {g[i]}, want {w[i]}")


def k_ordered(x, y, flags):
    """y, or where the CPU would run the product on its dot kernels (which sum along K in
    vector lanes, then across the lanes: another order than the block program's) the same
    values through a view with every stride doubled, which those kernels do not take, so
    that the reference sums in K order."""
    if core.kernel_for(x, y, **flags) != "dot":
        return y
    wide = np.zeros(y.shape[:-1] + (2 * y.shape[-1],), y.dtype)[..., ::2]
    wide[...] = y
    assert core.kernel_for(x, wide, **flags) != "dot"
    return wide


def check(x, y, block=None, smem_budget=None, max_blocks=None, kernel=None, **flags):
    """Simulated GPU result == CPU engine result, bit for bit; returns the launch info. A
    `block` size other than the kernel's own runs the generic kernel."""
    kw = {}
    if block is not None:
        kw.update(block=block, kernel="generic")
    if kernel is not None:
        kw["kernel"] = kernel
    if smem_budget is not None:
        kw["smem_budget"] = smem_budget
    if max_blocks is not None:
        kw["max_blocks"] = max_blocks
    got, info = sim.simulate_gpu_matmul(x, y, **flags, **kw)
    # The block program keeps one running sum over a reduction's items, as the packed
    # kernels do: the reference must not run the items apart and add their sums.
    core.set_reduction_items(False)
    try:
        want = core.matmul(x, k_ordered(x, y, flags), **flags)
    finally:
        core.set_reduction_items(True)
    same_bits(got, want)
    if info["blocks"]:
        k = KERNELS[info["kernel"]]
        assert info["group"] * info["tile"][0] * info["tile"][1] <= (
            k["elements_per_thread"] * info["threads"])
        assert info["smem_bytes"] <= kw.get("smem_budget", 24 * 1024)
        if k["max_k_chunk"]:  # a specialised kernel: its own block size and bounds
            assert info["threads"] == k["threads"] and info["kc"] <= k["max_k_chunk"]
            if not k["tiles"]:
                assert info["tiles"] == (1, 1)
            assert info["tile"][0] <= k["max_tile"][0] and info["tile"][1] <= k["max_tile"][1]
    return info


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("form", ["cube", "M", "N", "K"])
def test_every_size_every_dtype(dtype, size, form):
    m, n, k = {"cube": (size, size, size), "M": (size, 3, 5), "N": (2, size, 7),
               "K": (3, 4, size)}[form]
    rng = np.random.default_rng(size)
    check(rand(rng, (3, m, k), dtype), rand(rng, (3, k, n), dtype))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (33, 17, 9), (64, 40, 3), (7, 70, 2)],
                         ids=str)
def test_block_sizes_that_do_not_divide_the_work(block, shape):
    m, n, k = shape
    rng = np.random.default_rng(block)
    info = check(rand(rng, (11, m, k), np.float32), rand(rng, (11, k, n), np.float32),
                 block=block)
    assert info["items"] >= 1


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.complex128],
                         ids=lambda d: np.dtype(d).name)
def test_transpose_and_conjugate_flags(flags, dtype):
    tx, cx, ty, cy = flags
    rng = np.random.default_rng(1)
    x = rand(rng, (3, 5, 4) if tx else (3, 4, 5), dtype)
    y = rand(rng, (6, 5) if ty else (5, 6), dtype)
    check(x, y, transpose_x=tx, conjugate_x=cx, transpose_y=ty, conjugate_y=cy)


@pytest.mark.parametrize("budget", [256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("dtype", [np.float32, np.complex128], ids=lambda d: np.dtype(d).name)
def test_small_shared_memory_forces_k_chunks_and_smaller_groups(budget, dtype):
    rng = np.random.default_rng(budget)
    x, y = rand(rng, (6, 9, 45), dtype), rand(rng, (6, 45, 4), dtype)
    info = check(x, y, smem_budget=budget)
    if budget <= 2048:
        assert info["chunks"] > 1  # K is staged in several steps
        assert info["kc"] < 45


@pytest.mark.parametrize("max_blocks", [1, 2, 3, 7, 1000])
def test_grid_smaller_than_the_work(max_blocks):
    # Several work items per block, the last block short.
    rng = np.random.default_rng(max_blocks)
    x, y = rand(rng, (5, 7, 3, 4), np.float64), rand(rng, (5, 7, 4, 6), np.float64)
    info = check(x, y, block=32, max_blocks=max_blocks)
    assert info["blocks"] <= max_blocks
    assert info["blocks"] * info["items_per_block"] >= info["items"]


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_capsule_prediction_stages_the_shared_weight_once(dtype):
    # û[b,i] = W[i] · u[b,i] with W[i] 160×8, as in CapsNet (fewer capsules). The planner
    # folds the data batch b (along which W is broadcast) into the product's columns, so
    # each capsule is one 160×8 · 8×50 product: W[i] is staged once per output tile, not
    # once per batch row (which would be 50 × 6 stagings).
    rng = np.random.default_rng(5)
    w = rand(rng, (6, 160, 8), dtype)
    u = rand(rng, (50, 6, 8, 1), dtype)
    info = check(w, u, max_blocks=4)
    tiles = info["tiles"][0] * info["tiles"][1]
    assert info["items"] == 6 * tiles
    assert info["a_stages"] <= info["items"] < 50 * 6
    assert info["chunks"] == 1  # K = 8 is staged in one step


@pytest.mark.parametrize("xs,ys,tiled", [
    ((300, 4), (10, 4, 2), "m"),          # x shared by every output, several row tiles
    ((10, 3, 4), (4, 70), "n"),           # y shared by every output, 3 column tiles
])
def test_shared_operand_is_reused_only_for_the_same_tile(xs, ys, tiled):
    # Small blocks cut the shared operand into several tiles; one block's items cross
    # from one tile to the next while the shared operand's offset stays the same.
    rng = np.random.default_rng(10)
    info = check(rand(rng, xs, np.float32), rand(rng, ys, np.float32), block=32, max_blocks=2)
    assert info["tiles"][0 if tiled == "m" else 1] > 1
    assert info["a_shared" if tiled == "m" else "b_shared"]
    assert info["a_reused" if tiled == "m" else "b_reused"] > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.complex64],
                         ids=lambda d: np.dtype(d).name)
def test_capsule_gradients_reduce_inside_the_kernel(dtype):
    rng = np.random.default_rng(6)
    g = rand(rng, (50, 6, 160, 1), dtype)
    u = rand(rng, (50, 6, 8, 1), dtype)
    w = rand(rng, (6, 160, 8), dtype)
    # dW[i] = Σ_b g[b,i] · u[b,i]ᵀ: K = 1, so the planner folds the batch reduction into
    # K = 50 (one 160×50 · 50×8 product per capsule), staged in K chunks.
    info = check(g, u, transpose_y=True, batch_shape=[6])
    assert info["nrc"] == 1 and info["kc"] * info["chunks"] >= 50
    if dtype == np.complex64:  # twice the shared memory: K takes two chunks
        assert info["chunks"] == 2
    else:
        assert info["chunks"] == 1
    # du[b,i] = W[i]ᵀ · g[b,i]: the batch folds into N; K = 160 in several chunks.
    info = check(w, g, transpose_x=True)
    assert info["chunks"] > 1


@pytest.mark.parametrize("xs,ys,target", [
    ((5, 3, 4), (4, 2), []),              # sum over the whole batch
    ((5, 3, 4), (5, 4, 2), [1]),          # keep the axis as size 1
    ((2, 5, 3, 4), (1, 5, 4, 2), [5]),    # leading axis summed
    ((2, 1, 3, 4), (1, 6, 4, 2), []),     # two reduction loops that cannot merge
    ((2, 1, 3, 4), (1, 6, 4, 2), [2, 1]), # broadcast axis summed
    ((3, 4), (4, 2), [7]),                # expand: every output equal (both operands shared)
    ((0, 3, 4), (4, 2), []),              # reduction over nothing gives zeros
    ((300, 2, 3), (300, 3, 2), []),       # long reduction: several chunks of whole items
    ((3, 2, 200), (3, 200, 2), []),       # K longer than a chunk, reduced too
])
@pytest.mark.parametrize("dtype", [np.float64, np.complex64], ids=lambda d: np.dtype(d).name)
def test_reduction_to_batch_shape(xs, ys, target, dtype):
    rng = np.random.default_rng(4)
    check(rand(rng, xs, dtype), rand(rng, ys, dtype), batch_shape=target)


@pytest.mark.parametrize("budget", [512, 24 * 1024])
def test_reduction_with_chunks_that_split_reduction_items(budget):
    rng = np.random.default_rng(8)
    x, y = rand(rng, (7, 4, 3, 5), np.float32), rand(rng, (7, 4, 5, 3), np.float32)
    info = check(x, y, batch_shape=[4], smem_budget=budget, max_blocks=3)
    if budget == 512:
        assert info["chunks"] > 1


@pytest.mark.parametrize("xs,ys", [
    ((8, 3), (5, 7, 3, 2)),               # x broadcast over every batch axis
    ((5, 1, 3, 4), (1, 7, 4, 2)),         # each operand broadcast along one axis
    ((5, 1, 3, 4), (1, 2, 4, 2)),         # short innermost broadcast loop: no sharing
    ((1, 3, 4), (9, 4, 2)),
    ((9, 3, 4), (1, 4, 2)),
    ((4, 3, 4), (4, 2)),
])
@pytest.mark.parametrize("block", [32, 256])
def test_batch_broadcasting(xs, ys, block):
    rng = np.random.default_rng(9)
    check(rand(rng, xs, np.float32), rand(rng, ys, np.float32), block=block, max_blocks=5)


def test_stride_zero_and_strided_views():
    rng = np.random.default_rng(3)
    w = rand(rng, (8, 3), np.float32)
    xb = np.broadcast_to(w, (5, 7, 8, 3))  # strides of 0 on both batch axes
    check(xb, rand(rng, (5, 7, 3, 2), np.float32), max_blocks=3)
    big = rand(rng, (6, 10, 12), np.complex128)
    view = big[::2, 1::3, ::-2]  # non-unit, offset and negative strides
    check(view, np.swapaxes(view, -1, -2), conjugate_y=True)
    mat0 = np.broadcast_to(rand(rng, (1, 4), np.float64), (3, 4))  # a zero matrix stride
    check(mat0, rand(rng, (2, 4, 5), np.float64))


@pytest.mark.parametrize("xs,ys,out", [
    ((0, 3, 4), (4, 5), (0, 3, 5)),
    ((2, 3, 0), (0, 5), (2, 3, 5)),       # K = 0: zeros, nothing staged
    ((2, 0, 4), (4, 5), (2, 0, 5)),
    ((3, 4), (2, 0, 4, 5), (2, 0, 3, 5)),
])
def test_empty(xs, ys, out):
    got, info = sim.simulate_gpu_matmul(np.ones(xs, np.float32), np.ones(ys, np.float32))
    assert got.shape == out
    assert not got.any()
    assert info["blocks"] == (1 if np.prod(out) else 0)


def test_nan_and_inf_propagate():
    x = np.array([[np.nan, 1.0], [np.inf, 0.0], [1.0, 2.0]], np.float32)
    y = np.array([[1.0, 0.0], [2.0, np.inf]], np.float32)
    check(x, y)


def test_bad_shapes_raise_like_the_cpu_engine():
    with pytest.raises(ValueError, match="Matrix size-incompatible"):
        sim.simulate_gpu_matmul(np.ones((3, 4), np.float32), np.ones((5, 6), np.float32))


def test_unrealistic_launch_is_refused():
    with pytest.raises(RuntimeError, match="shared-memory budget"):
        sim.simulate_gpu_matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32),
                                 smem_budget=8)


# ---------------------------------------------------------------- kernel variants
@pytest.mark.parametrize("shape,kernel", [
    ((1, 1, 1), "sq4"), ((3, 3, 3), "sq4"), ((4, 4, 4), "sq4"), ((5, 5, 5), "sq8"),
    ((8, 3, 8), "sq8"), ((9, 9, 9), "sq16"), ((16, 16, 16), "sq16"), ((17, 17, 17), "sq32"),
    ((32, 32, 32), "sq32"), ((33, 33, 33), "generic"),
    ((160, 50, 8), "k8"), ((160, 50, 16), "k16"), ((40, 3, 5), "k8"), ((8, 50, 160), "generic"),
], ids=str)
def test_launcher_runs_the_first_variant_that_fits(shape, kernel):
    m, n, k = shape
    rng = np.random.default_rng(m + n + k)
    info = check(rand(rng, (2, m, k), np.float32), rand(rng, (2, k, n), np.float32))
    assert info["kernel"] == kernel


def test_kernel_table_ends_with_the_generic_kernel():
    names = [k["name"] for k in sim.gpu_kernels]
    assert names[-1] == "generic" and KERNELS["generic"]["max_k_chunk"] == 0
    assert len(set(names)) == len(names)


# Shapes around each variant's bounds: the edges, one inside, and with several matrices,
# tiles or K chunks; each runs on every variant that can take it.
def _variant_cases():
    cases = []
    for k in sim.gpu_kernels:
        bm, bn = k["max_tile"]
        kc = k["max_k_chunk"] or 40
        bm, bn = bm or 33, bn or 33
        sizes = {(bm, bn, kc), (1, 1, 1), (max(1, bm - 1), max(1, bn // 2), max(1, kc - 1))}
        if k["tiles"]:
            sizes |= {(3 * bm + 1, bn + 5, kc), (2 * bm, 1, 1)}
        for mnk in sorted(sizes):
            cases.append(pytest.param(k["name"], mnk, id=f"{k['name']}-{mnk}"))
    return cases


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.complex128],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kernel,mnk", _variant_cases())
def test_every_variant_on_shapes_at_its_bounds(kernel, mnk, dtype):
    m, n, k = mnk
    rng = np.random.default_rng(m * 31 + n * 7 + k)
    info = check(rand(rng, (5, m, k), dtype), rand(rng, (5, k, n), dtype), kernel=kernel)
    assert info["kernel"] == kernel


@pytest.mark.parametrize("kernel", [k["name"] for k in sim.gpu_kernels])
@pytest.mark.parametrize("xs,ys,flags,target", [
    ((7, 3, 4), (4, 2), (False, False), None),          # y broadcast: staged once per block
    ((3, 4), (7, 2, 4), (False, True), None),           # x broadcast, y transposed
    ((6, 4, 2), (6, 4, 3), (True, False), []),          # reduction over the batch
    ((5, 1, 3, 4), (1, 4, 4, 2), (False, False), [1, 4]),
], ids=str)
def test_every_variant_broadcasts_and_reduces(kernel, xs, ys, flags, target):
    rng = np.random.default_rng(12)
    x, y = rand(rng, xs, np.complex64), rand(rng, ys, np.complex64)
    check(x, y, kernel=kernel, transpose_x=flags[0], transpose_y=flags[1], conjugate_y=True,
          batch_shape=target, max_blocks=3)


def test_variant_that_cannot_run_a_plan_is_refused():
    with pytest.raises(RuntimeError, match="cannot run this plan"):
        sim.simulate_gpu_matmul(np.ones((5, 5), np.float32), np.ones((5, 5), np.float32),
                                kernel="sq4")
    with pytest.raises(RuntimeError, match="its own number of threads"):
        sim.simulate_gpu_matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32),
                                kernel="sq4", block=64)
    with pytest.raises(ValueError, match="no GPU kernel variant named"):
        sim.simulate_gpu_matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32),
                                kernel="nope")


def test_capsule_prediction_output_is_written_along_its_unit_stride():
    # û's rows (the 160 values of one (b, i)) are contiguous; the columns (b) are far apart.
    # Consecutive threads must own consecutive rows for coalesced stores.
    rng = np.random.default_rng(2)
    info = check(rand(rng, (4, 160, 8), np.float32), rand(rng, (50, 4, 8, 1), np.float32))
    assert info["kernel"] == "k8" and info["rows_fastest"]
    info = check(rand(rng, (9, 8, 8), np.float32), rand(rng, (9, 8, 8), np.float32))
    assert not info["rows_fastest"]
