"""GPU kernels: registered for every advertised dtype when built with CUDA (checked on any
machine, GPU or not), and, on each device present, values and gradients of both ops
against float64 references (the GPU cases are skipped on machines without a GPU)."""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import kernels, op_def_registry

import tf_smallmm as smm
from conftest import DEVICES, DTYPES, assert_close, random_tensor, wide
from tf_smallmm._core import engine as _ops
from tf_smallmm._core import loader as _loader
from tf_smallmm.capsules import routing as _routing

OPS = ["SmallMMBatchMatMul", "SmallMMBatchMatMulReduce", "SmallMMBatchMatMulPair"]
ROUTING_OPS = ["SmallMMDynamicRouting", "SmallMMDynamicRoutingGrad"]
BUILT_WITH_CUDA = bool(smm.build_info().get("cuda"))
needs_cuda_build = pytest.mark.skipif(
    not BUILT_WITH_CUDA, reason="library built without CUDA (no nvcc, or TF_SMALLMM_CUDA=0)")


def advertised_dtypes(op_name):
    attr = next(a for a in op_def_registry.get(op_name).attr if a.name == "T")
    return {tf.as_dtype(t) for t in attr.allowed_values.list.type}


def registered(op_name, device):
    return [k for k in kernels.get_registered_kernels_for_op(op_name).kernel
            if k.device_type == device]


@needs_cuda_build
@pytest.mark.parametrize("op_name", OPS)
def test_gpu_kernel_for_every_advertised_dtype(op_name):
    assert advertised_dtypes(op_name) == set(DTYPES)
    found = set()
    for k in registered(op_name, "GPU"):
        (constraint,) = [c for c in k.constraint if c.name == "T"]
        found |= {tf.as_dtype(t) for t in constraint.allowed_values.list.type}
        if op_name == "SmallMMBatchMatMulReduce":
            assert list(k.host_memory_arg) == ["batch_shape"]
        if op_name == "SmallMMBatchMatMulPair":
            assert sorted(k.host_memory_arg) == ["batch_shape_1", "batch_shape_2"]
    assert found == advertised_dtypes(op_name)


@needs_cuda_build
@pytest.mark.parametrize("op_name", ROUTING_OPS)
def test_routing_gpu_kernel_for_every_advertised_dtype(op_name):
    found = set()
    for k in registered(op_name, "GPU"):
        (constraint,) = [c for c in k.constraint if c.name == "T"]
        found |= {tf.as_dtype(t) for t in constraint.allowed_values.list.type}
    assert found == advertised_dtypes(op_name) == {tf.float32, tf.float64}


@needs_cuda_build
def test_build_info_reports_gpu_kernels():
    info = smm.build_info()
    assert info["devices"] == ["CPU", "GPU"]
    assert info["cuda_archs"] == ["80", "90"]
    major = int(info["cuda_toolkit"].split(".")[0])
    assert info["cuda_min_driver"] == major * 1000 and info["cuda_driver"] is not None


# ---------------------------------------------------------------- the driver check
class FakeOpsLibrary:
    """What the loader calls in the op library through ctypes."""

    def __init__(self, driver):
        self.driver, self.registrations = driver, 0

    def SmallMMCudaDriverVersion(self):
        return self.driver

    def SmallMMRegisterGpuKernels(self):
        self.registrations += 1


def check_driver(monkeypatch, library_driver, needed, fake=None):
    """Runs the loader's GPU registration step for a CUDA build needing driver `needed`,
    against a fake op library; returns (registrations, warnings)."""
    lib = FakeOpsLibrary(library_driver)
    monkeypatch.setattr(_loader._State, "info", {
        "cuda": True, "cuda_toolkit": "13.0", "cuda_min_driver": needed,
        "cuda_min_driver_linux": "580"})
    monkeypatch.setattr(_loader._State, "driver", None)
    monkeypatch.setattr(_loader.ctypes, "CDLL", lambda *a, **k: lib)
    if fake is None:
        monkeypatch.delenv(_loader.FAKE_DRIVER_ENV, raising=False)
    else:
        monkeypatch.setenv(_loader.FAKE_DRIVER_ENV, str(fake))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loader._register_gpu_kernels.__wrapped__()  # uncached: the real one ran at import
    return lib.registrations, [str(w.message) for w in caught]


@pytest.mark.parametrize("driver,needed,registers", [
    (13000, 13000, True),   # CUDA 13.0 toolkit, a 580 driver
    (13020, 13000, True),   # a newer driver
    (12080, 13000, False),  # CUDA 13 kernels, a CUDA 12.8 driver: every launch would fail
    (12000, 12000, True),   # CUDA 12 kernels on the oldest CUDA 12 driver
    (11080, 12000, False),
    (0, 13000, True),       # no driver at all: no GPU to place kernels on, nothing to refuse
    (-1, 13000, True),      # tensorflow-cpu: no CUDA runtime, no GPU
])
def test_gpu_kernels_are_registered_only_under_a_new_enough_driver(
        monkeypatch, driver, needed, registers):
    # Asked through the library (cudaDriverGetVersion behind the shim) ...
    count, caught = check_driver(monkeypatch, driver, needed)
    assert count == int(registers) and _loader._State.driver == driver
    assert len(caught) == (0 if registers else 1)
    # ... or overridden by the test hook, which the library is then not asked.
    count, caught = check_driver(monkeypatch, 99999, needed, fake=driver)
    assert count == int(registers) and _loader._State.driver == driver


def test_too_old_driver_warning_says_why_and_what_to_do(monkeypatch):
    count, (message,) = check_driver(monkeypatch, 12040, 13000)
    assert count == 0
    for part in ["built with CUDA 13.0", "CUDA 13.0 or newer", "Linux driver >= 580",
                 "supports CUDA 12.4", "built-in ops run on the GPU", "Update the NVIDIA driver",
                 "NVCC=/usr/local/cuda-12"]:
        assert part in message, (part, message)


def test_cpu_build_skips_the_driver_check(monkeypatch):
    lib = FakeOpsLibrary(12000)
    monkeypatch.setattr(_loader._State, "info", {"cuda": False})
    monkeypatch.setattr(_loader.ctypes, "CDLL", lambda *a, **k: lib)
    _loader._register_gpu_kernels.__wrapped__()
    assert lib.registrations == 0


def test_unreachable_library_registers_nothing_and_warns(monkeypatch):
    def no_library(*args, **kwargs):
        raise OSError("not loaded")

    monkeypatch.setattr(_loader._State, "info", {"cuda": True, "cuda_min_driver": 13000})
    monkeypatch.setattr(_loader._State, "driver", None)
    monkeypatch.delenv(_loader.FAKE_DRIVER_ENV, raising=False)
    monkeypatch.setattr(_loader.ctypes, "CDLL", no_library)
    with pytest.warns(RuntimeWarning, match="could not check the CUDA driver"):
        _loader._register_gpu_kernels.__wrapped__()


@needs_cuda_build
@pytest.mark.slow
def test_too_old_driver_leaves_the_ops_to_the_cpu_in_a_fresh_process():
    # The real library in a new process, the driver faked one version too old: no GPU
    # kernel is registered, one warning, the CPU kernels still work.
    needed = smm.build_info()["cuda_min_driver"]
    code = ("import tf_smallmm as s, tensorflow as tf; i = s.build_info(); "
            "print(i['devices'], i['cuda_driver'], "
            "float(s.matmul(tf.ones((1, 2, 2)), tf.ones((2, 2)))[0, 0, 0]))")
    env = dict(os.environ, **{_loader.FAKE_DRIVER_ENV: str(needed - 10)})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(smm.__file__)), check=True)
    assert f"['CPU'] {needed - 10} 2.0" in r.stdout
    assert r.stderr.count("which needs a driver for CUDA") == 1


def test_cpu_only_build_reports_no_gpu_kernels():
    if BUILT_WITH_CUDA:
        pytest.skip("library built with CUDA")
    assert registered("SmallMMBatchMatMul", "GPU") == []
    assert smm.build_info()["devices"] == ["CPU"]


@needs_cuda_build
@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm not installed")
def test_library_leaves_no_cuda_symbol_to_the_loader():
    # TF loads op libraries with RTLD_NOW and the tensorflow-cpu wheel exports no CUDA
    # runtime: every CUDA symbol must be resolved inside the library (the shim,
    # cuda/cuda_runtime_shim.cc), and none exported.
    out = subprocess.run(["nm", "-D", _loader._OPS_PATH], capture_output=True, text=True,
                         check=True).stdout
    cuda = [line.split()[-1] for line in out.splitlines()
            if line.split() and line.split()[-1].lstrip("_").startswith("cuda")]
    assert cuda == []


# ---------------------------------------------------------------- on each device

def run_on(device, fn):
    with tf.device(f"/{device}:0"):
        out = fn()
    assert out.device.endswith(f"{device}:0"), f"ran on {out.device}, not {device}"
    return out


def reference(x, y, tx=False, cx=False, ty=False, cy=False):
    w = wide(x.dtype)
    x, y = tf.cast(x, w), tf.cast(y, w)
    if tx:
        x = tf.linalg.matrix_transpose(x)
    if cx:
        x = tf.math.conj(x)
    if ty:
        y = tf.linalg.matrix_transpose(y)
    if cy:
        y = tf.math.conj(y)
    return tf.matmul(x, y), tf.matmul(tf.abs(x), tf.abs(y))  # value, error bound


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    # TF's own float32 GPU matmuls (used nowhere here, but by anything comparing with
    # them) would use TF32 on Ampere+; the SmallMM kernels never do.
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("xs,ys", [
    ((3, 5, 7), (3, 7, 4)),
    ((5, 1, 3, 4), (1, 7, 4, 2)),       # broadcast both ways
    ((6, 160, 8), (50, 6, 8, 1)),       # capsule prediction: W shared over the batch
    ((2, 40, 33), (33, 35)),            # more than one tile per matrix
    ((4, 1, 1), (4, 1, 1)),
])
def test_values(device, dtype, xs, ys):
    x, y = random_tensor(xs, dtype, seed=1), random_tensor(ys, dtype, seed=2)
    got = run_on(device, lambda: _ops.product(x, y))
    want, bound = reference(x, y)
    assert_close(got, want, dtype, bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", [(True, False, False, False), (False, False, True, True),
                                   (True, True, True, True), (False, True, False, False)])
@pytest.mark.parametrize("dtype", [tf.float32, tf.complex64, tf.complex128],
                         ids=lambda d: d.name)
def test_transpose_and_conjugate(device, flags, dtype):
    tx, cx, ty, cy = flags
    x = random_tensor((3, 5, 4) if tx else (3, 4, 5), dtype, seed=3)
    y = random_tensor((6, 5) if ty else (5, 6), dtype, seed=4)
    got = run_on(device, lambda: _ops.product(x, y, tx, cx, ty, cy))
    want, bound = reference(x, y, tx, cx, ty, cy)
    assert_close(got, want, dtype, bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("xs,ys,target", [
    ((5, 3, 4), (4, 2), []),
    ((2, 1, 3, 4), (1, 6, 4, 2), [2, 1]),
    ((50, 6, 160, 1), (50, 6, 1, 8), [6]),  # capsule dW: sum over the batch in-kernel
    ((3, 4), (4, 2), [7]),
    ((0, 3, 4), (4, 2), []),
])
def test_reduce_op(device, dtype, xs, ys, target):
    x, y = random_tensor(xs, dtype, seed=5), random_tensor(ys, dtype, seed=6)
    got = run_on(device, lambda: _ops.product(x, y, batch_shape=target))
    full, full_bound = reference(x, y)

    def reduce(t):
        lead = t.shape.rank - 2 - len(target)
        t = tf.reduce_sum(t, axis=list(range(lead))) if lead > 0 else t
        for i, d in enumerate(target):
            if d == 1:
                t = tf.reduce_sum(t, axis=i, keepdims=True)
        return tf.broadcast_to(t, list(target) + t.shape[-2:].as_list())

    assert_close(got, reduce(full), dtype, reduce(full_bound))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xs,ys,out", [((0, 3, 4), (4, 5), (0, 3, 5)),
                                       ((2, 3, 0), (0, 5), (2, 3, 5))])
def test_empty_and_k0(device, xs, ys, out):
    got = run_on(device, lambda: _ops.product(tf.ones(xs), tf.ones(ys)))
    assert got.shape == out and not np.asarray(got).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.complex128], ids=lambda d: d.name)
@pytest.mark.parametrize("xs,ys,flags", [
    ((6, 16, 8), (5, 6, 8, 1), (False, False)),   # x broadcast over the leading axis
    ((5, 1, 3, 4), (1, 7, 2, 4), (False, True)),  # both broadcast, y transposed
    ((4, 3), (2, 4, 5), (True, False)),
])
def test_gradients_against_tf_matmul(device, dtype, xs, ys, flags):
    tx, ty = flags
    x, y = random_tensor(xs, dtype, seed=7), random_tensor(ys, dtype, seed=8)
    out_shape = reference(x, y, tx, False, ty, False)[0].shape
    g = random_tensor(out_shape, dtype, seed=9)

    def grads(fn, dev):
        with tf.device(f"/{dev}:0"):
            with tf.GradientTape() as tape:
                tape.watch([x, y])
                loss = tf.reduce_sum(fn(x, y) * g)
            return tape.gradient(loss, [x, y])

    got = grads(lambda a, b: _ops.product(a, b, transpose_x=tx, transpose_y=ty), device)
    w = wide(dtype)
    xw, yw, gw = tf.cast(x, w), tf.cast(y, w), tf.cast(g, w)
    with tf.GradientTape() as tape:
        tape.watch([xw, yw])
        loss = tf.reduce_sum(tf.matmul(xw, yw, transpose_a=tx, transpose_b=ty) * gw)
    want = tape.gradient(loss, [xw, yw])
    # Error bound of each gradient entry: the same sums over |g|, |x|, |y|.
    with tf.GradientTape() as tape:
        ax, ay = tf.abs(xw), tf.abs(yw)
        tape.watch([ax, ay])
        loss = tf.reduce_sum(tf.matmul(ax, ay, transpose_a=tx, transpose_b=ty) * tf.abs(gw))
    bound = tape.gradient(loss, [ax, ay])
    for gt, wt, bd in zip(got, want, bound):
        if device == "GPU":
            assert gt.device.endswith("GPU:0"), gt.device
        assert_close(gt, wt, dtype, bd)


@pytest.mark.skipif(os.environ.get("TF_SMALLMM_DISABLE", "") not in ("", "0"),
                    reason="kernels disabled")
@pytest.mark.parametrize("device", DEVICES)
def test_numeric_gradient_float64(device):
    x, y = random_tensor((3, 1, 4, 3), tf.float64, 1), random_tensor((5, 3, 2), tf.float64, 2)

    def f(a, b):
        with tf.device(f"/{device}:0"):
            return _ops.product(a, b)

    theoretical, numerical = tf.test.compute_gradient(f, [x, y])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- routing
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,iterations", [((3, 7, 4, 5), 3), ((2, 40, 10, 16), 3),
                                              ((2, 5, 3, 8), 1)], ids=str)
def test_routing_against_the_tf_ops_reference(device, dtype, shape, iterations):
    u = random_tensor(shape, dtype, seed=11)
    g = random_tensor((shape[0], shape[2], shape[3]), dtype, seed=12)

    def value_and_grad(fn):
        with tf.device(f"/{device}:0"):
            with tf.GradientTape() as tape:
                tape.watch(u)
                v = fn(u, iterations)
            return v, tape.gradient(v, u, output_gradients=g)

    got = value_and_grad(_routing.dynamic_routing)
    if device == "GPU":
        assert got[0].device.endswith("GPU:0"), got[0].device
    want = value_and_grad(_routing.dynamic_routing_reference)
    tol = 1e-4 if dtype == tf.float32 else 1e-11  # sums over capsules in another order
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- the Pair op
PAIR_CASES = [
    # (x, y, batch_shape) of each product, as shapes; both gradients of a product.
    # capsule prediction's dW (summed over b) and du: equal output counts, run together.
    (((4, 6, 16, 1), (4, 6, 3, 1), [6], False, True),
     ((6, 16, 3), (4, 6, 16, 1), [4, 6], True, False)),
    # a weight shared by a long batch: dW is split into partial sums, so each runs alone.
    (((500, 8, 8), (500, 8, 8), [], True, False), ((8, 8), (500, 8, 8), [500], True, False)),
    # different output counts (x broadcast over the batch): one after the other.
    (((7, 5, 3), (7, 3, 4), [7], False, False), ((3, 5), (7, 3, 4), [], True, False)),
    # a product with no elements next to one with some.
    (((0, 5, 3), (0, 3, 4), [0], False, False), ((2, 5, 3), (2, 3, 4), [2], False, False)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", range(len(PAIR_CASES)))
def test_pair_equals_two_reduce_products(device, dtype, case):
    jobs = []
    for p, (xs, ys, batch, tx, ty) in enumerate(PAIR_CASES[case]):
        x = random_tensor(xs, dtype, seed=10 * case + 2 * p)
        y = random_tensor(ys, dtype, seed=10 * case + 2 * p + 1)
        # (lhs, rhs, batch_shape, perm_output); factors (tensor, transpose, conjugate, perm)
        jobs.append(((x, tx, False, ()), (y, ty, dtype.is_complex, ()), batch, ()))
    pair = [run_on(device, lambda: _ops.product_pair(*jobs)[p]).numpy() for p in (0, 1)]
    for (l, r, batch, _), value in zip(jobs, pair):
        want = run_on(device, lambda: _ops.product(l[0], r[0], l[1], l[2], r[1], r[2],
                                                   batch_shape=batch))
        if device == "CPU":  # the same kernels on the same plans: identical bits
            np.testing.assert_array_equal(value, want.numpy())
        full, bound = reference(l[0], r[0], l[1], l[2], r[1], r[2])
        lead = len(full.shape) - 2 - len(batch)
        axes = list(range(lead)) + [lead + i for i, n in enumerate(batch) if n == 1]
        assert_close(value, tf.reduce_sum(full, axes), dtype, tf.reduce_sum(bound, axes))


def test_pair_gradients_and_unused_outputs():
    # The Pair op is what gradients produce; its own gradient (second order) treats each
    # output as the reduce product it is; an output nobody uses contributes nothing.
    x, y = random_tensor((3, 4, 5), tf.float64, seed=1), random_tensor((3, 5, 2), tf.float64, seed=2)
    g = random_tensor((3, 4, 2), tf.float64, seed=3)
    jobs = (((g, False, False, ()), (y, True, False, ()), [3], ()),
            ((x, True, False, ()), (g, False, False, ()), [3], ()))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, y, g])
        dx, dy = _ops.product_pair(*jobs)
        only_first = tf.reduce_sum(dx * dx)
        both = tf.reduce_sum(dx) + tf.reduce_sum(dy * dy)
    got = tape.gradient(only_first, [x, y, g])
    assert got[0] is None or not np.any(got[0].numpy())  # dx does not depend on x
    with tf.GradientTape() as t2:
        t2.watch([y, g])
        ref_dx = tf.matmul(g, y, transpose_b=True)
        ref = tf.reduce_sum(ref_dx * ref_dx)
    for a, b in zip(got[1:], t2.gradient(ref, [y, g])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    got = tape.gradient(both, [x, y, g])
    with tf.GradientTape() as t3:
        t3.watch([x, y, g])
        ref = (tf.reduce_sum(tf.matmul(g, y, transpose_b=True))
               + tf.reduce_sum(tf.matmul(x, g, transpose_a=True) ** 2))
    for a, b in zip(got, t3.gradient(ref, [x, y, g])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
