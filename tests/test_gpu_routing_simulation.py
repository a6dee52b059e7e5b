"""The GPU routing kernels' block program (cuda/routing_gpu_logic.h), run on the host over a
simulated grid (no GPU needed), against the CPU routing kernel (the SmallMMDynamicRouting
ops on the CPU) and a float64 numpy reference.

`sim.simulate_gpu_routing` runs every block and thread of the launch the GPU would get and
raises if a thread touches the workspace outside the block's share, reads workspace nobody
wrote, misses a barrier between a write and another thread's access, loads outside û or
dL/dv, or stores an output element other than exactly once (cuda/testing/smallmm_gpu_sim.h).
The GPU sums in another order than the CPU kernel (per-thread sums over capsule chunks vs
vector lanes, the device's exp): results agree within rounding, not bit for bit.

Non-finite inputs: the GPU puts NaN exactly where the CPU kernel does (the NaN/Inf rule in
cc/engine/routing.h, which tests/test_routing_numerics.py checks against the TF-ops reference).
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_smallmm import _smallmm_gpu_sim as sim
from tf_smallmm.capsules import routing

EPS = float(np.float32(1e-7))
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def numpy_routing(u, iterations, eps=EPS):
    """Routing-by-agreement in float64 numpy: the contract of cc/engine/routing.h."""
    u = u.astype(np.float64)
    logits = np.zeros(u.shape[:3])
    v = None
    for r in range(iterations):
        e = np.exp(logits - logits.max(axis=2, keepdims=True))
        c = e / e.sum(axis=2, keepdims=True)
        s = np.einsum("bij,bijk->bjk", c, u)
        n2 = (s * s).sum(-1, keepdims=True)
        v = s * (n2 / (1 + n2)) / np.sqrt(n2 + eps)
        if r < iterations - 1:
            logits = logits + np.einsum("bijk,bjk->bij", u, v)
    return v


def cpu_kernel(u, iterations, grad_v=None):
    """The CPU routing kernel (the fused op on the CPU): v, or dL/du given grad_v."""
    with tf.device("/CPU:0"):
        ut = tf.constant(u)
        if grad_v is None:
            return routing.dynamic_routing(ut, iterations).numpy()
        with tf.GradientTape() as tape:
            tape.watch(ut)
            v = routing.dynamic_routing(ut, iterations)
        return tape.gradient(v, ut, output_gradients=tf.constant(grad_v)).numpy()


def close(got, want, dtype):
    scale = 1.0 + np.abs(want).max(initial=0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


SHAPES = [
    (3, 7, 4, 5),     # I not a multiple of the chunk
    (2, 40, 10, 16),  # CapsNet's J and K
    (2, 33, 3, 8),
    (1, 130, 10, 16),  # several chunks of 51 capsules
    (4, 1, 1, 1),
    (2, 5, 1, 3),     # one output capsule: c = 1
    (2, 0, 3, 4),     # no input capsule: v = squash(0) = 0
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_the_cpu_kernel(shape, iterations, dtype):
    rng = np.random.default_rng(sum(shape) + iterations)
    u = rng.uniform(-1, 1, shape).astype(dtype)
    gv = rng.uniform(-1, 1, (shape[0], shape[2], shape[3])).astype(dtype)
    v, info = sim.simulate_gpu_routing(u, iterations)
    close(v, cpu_kernel(u, iterations), dtype)
    close(v, numpy_routing(u, iterations), dtype)
    du, _ = sim.simulate_gpu_routing(u, iterations, grad_v=gv)
    close(du, cpu_kernel(u, iterations, gv), dtype)
    assert info["blocks"] == shape[0] and info["threads"] == 256


@pytest.mark.parametrize("block,max_blocks", [(1, 1000), (32, 2), (96, 3), (1024, 1)])
def test_block_sizes_and_rows_per_block(block, max_blocks):
    # Few threads (every loop strides several times), and fewer blocks than rows (each
    # block routes several rows with one workspace).
    rng = np.random.default_rng(block)
    u = rng.uniform(-1, 1, (5, 23, 6, 4))
    gv = rng.uniform(-1, 1, (5, 6, 4))
    v, info = sim.simulate_gpu_routing(u, 3, block=block, max_blocks=max_blocks)
    close(v, numpy_routing(u, 3), np.float64)
    assert info["blocks"] == min(5, max_blocks) and info["threads"] == block
    du, _ = sim.simulate_gpu_routing(u, 3, grad_v=gv, block=block, max_blocks=max_blocks)
    close(du, cpu_kernel(u, 3, gv), np.float64)


@pytest.mark.parametrize("iterations", [1, 3])
def test_backward_in_place_over_u_hat(iterations):
    # The op may hand û's buffer to dû: the last phase must not read û.
    rng = np.random.default_rng(7)
    u = rng.uniform(-1, 1, (3, 70, 5, 6))
    gv = rng.uniform(-1, 1, (3, 5, 6))
    apart, _ = sim.simulate_gpu_routing(u, iterations, grad_v=gv, max_blocks=2)
    inplace, _ = sim.simulate_gpu_routing(u, iterations, grad_v=gv, in_place=True, max_blocks=2)
    np.testing.assert_array_equal(inplace, apart)


def test_gradient_against_finite_differences():
    rng = np.random.default_rng(3)
    u = rng.uniform(-1, 1, (1, 6, 3, 4))
    gv = rng.uniform(-1, 1, (1, 3, 4))
    du, _ = sim.simulate_gpu_routing(u, 3, grad_v=gv)
    h = 1e-6
    for idx in [(0, 0, 0, 0), (0, 5, 2, 3), (0, 2, 1, 1)]:
        up, um = u.copy(), u.copy()
        up[idx] += h
        um[idx] -= h
        fd = ((sim.simulate_gpu_routing(up, 3)[0] - sim.simulate_gpu_routing(um, 3)[0]) * gv).sum()
        assert abs(du[idx] - fd / (2 * h)) < 1e-7


def test_capsnet_workspace_goes_to_global_scratch_backward():
    # CapsNet's digit caps: the forward workspace fits in shared memory, the backward one
    # (every iteration's coefficients) does not; the block program is the same either way.
    rng = np.random.default_rng(4)
    u = rng.uniform(-0.1, 0.1, (1, 1152, 10, 16)).astype(np.float32)
    v, info = sim.simulate_gpu_routing(u, 3)
    close(v, cpu_kernel(u, 3), np.float32)
    assert info["workspace_bytes"] <= 48 * 1024
    gv = rng.uniform(-1, 1, (1, 10, 16)).astype(np.float32)
    du, info = sim.simulate_gpu_routing(u, 3, grad_v=gv)
    assert info["workspace_bytes"] > 48 * 1024
    close(du, cpu_kernel(u, 3, gv), np.float32)


def same_nonfinite(got, want, dtype):
    """NaN exactly where the CPU kernel has NaN, never ±Inf, the finite rest close."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert not np.isinf(got).any()
    ok = np.isfinite(want)
    close(got[ok], want[ok], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_values_land_where_the_cpu_kernel_puts_them(bad, iterations, dtype):
    rng = np.random.default_rng(11)
    u = rng.uniform(-1, 1, (3, 9, 4, 5)).astype(dtype)
    gv = rng.uniform(-1, 1, (3, 4, 5)).astype(dtype)
    u_bad = u.copy()
    u_bad[0, 2, 1, 3] = bad  # row 0: one prediction; rows 1, 2 stay finite
    gv_bad = gv.copy()
    gv_bad[1, 2, 0] = bad  # row 1: one upstream gradient
    same_nonfinite(sim.simulate_gpu_routing(u_bad, iterations)[0],
                   cpu_kernel(u_bad, iterations), dtype)
    for uu, gg in ((u_bad, gv), (u, gv_bad)):
        same_nonfinite(sim.simulate_gpu_routing(uu, iterations, grad_v=gg)[0],
                       cpu_kernel(uu, iterations, gg), dtype)


def test_bad_input_raises():
    with pytest.raises(TypeError, match="float32 and float64"):
        sim.simulate_gpu_routing(np.ones((1, 2, 3, 4), np.float16))
    with pytest.raises(ValueError, match="rank 4"):
        sim.simulate_gpu_routing(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="num_iterations"):
        sim.simulate_gpu_routing(np.ones((1, 2, 3, 4)), iterations=0)
    with pytest.raises(ValueError, match="grad_v must have shape"):
        sim.simulate_gpu_routing(np.ones((1, 2, 3, 4)), grad_v=np.ones((1, 3, 5)))
