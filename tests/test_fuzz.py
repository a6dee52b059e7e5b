"""Bad-input fuzzing of every op: the public functions (tests/public_ops.py), the raw TF ops
and the pybind11 module. Each family runs thousands of cases in one subprocess (see
tests/fuzz_cases.py; the mutations and oracles are in fuzz_public.py, fuzz_raw.py and
fuzz_core.py): a crash or hang fails the test and names the case; every case must return
the oracle's result or raise a Python exception that names the problem, without
allocating absurd memory.

CI runs a fixed seed (SMALLMM_FUZZ_SEED overrides it); tests/fuzz_nightly.py runs many more
cases with fresh seeds. Below the families: regression tests for what fuzzing found.
"""

import os
import time

import numpy as np
import pytest
import tensorflow as tf

import fuzz_cases
import tf_smallmm as smm
from conftest import run_python
from public_ops import PUBLIC_OPS
from tf_smallmm import _smallmm_core as core
from tf_smallmm._core import dispatch, loader

SEED = int(os.environ.get("SMALLMM_FUZZ_SEED", "20261201"))
# About 17 000 cases, ~40 s on 2 shared cores (most of it TensorFlow start-up and tracing).
CI_CASES = {"public": 1500 * len(PUBLIC_OPS), "raw": 6000, "core": 8000}
TIMEOUT_S = 600


@pytest.mark.slow
@pytest.mark.parametrize("family", fuzz_cases.FAMILIES)
def test_bad_inputs_raise_clear_errors(family, capsys, record_property):
    want = CI_CASES[family]
    seed = SEED + fuzz_cases.FAMILIES.index(family)
    summary, crash = fuzz_cases.run_family(family, seed, want, TIMEOUT_S)
    assert not crash, crash
    record_property("fuzz_cases", summary["cases"])
    with capsys.disabled():
        print(f"\n[fuzz] {family}: {summary['cases']} cases {summary['per_op']} "
              f"{summary['outcomes']} in {summary['seconds']} s (seed {seed})")
    failures = "\n".join(f"case {f['case']}: {f['desc']}\n    " + "\n    ".join(f["problems"])
                         for f in summary["failures"])
    assert not summary["failures"], f"seed {seed}:\n{failures}"
    assert summary["cases"] >= 0.95 * want, summary  # inputs that could not be built


# ------------------------------------------------------------------ regressions
def test_core_empty_output_with_huge_stride0_batch_returns_at_once():
    """M = 0 with a 2**40-long stride-0 batch used to spin through every batch index."""
    x = np.ones((2**40, 0, 4), np.float32)
    y = np.broadcast_to(np.ones((4, 2), np.float32), (2**40, 4, 2))
    start = time.time()
    assert core.matmul(x, y).shape == (2**40, 0, 2)
    assert time.time() - start < 1.0


@pytest.mark.slow
def test_core_huge_stride0_k_raises_memory_error_instead_of_overflowing():
    """K = 2**40 returned uninitialised memory; K = 2**60 wrapped the scratch size around
    2**64 and wrote past a few-byte buffer (segfault). In a subprocess: a regression
    crashes."""
    r = run_python("""
        import numpy as np
        from tf_smallmm import _smallmm_core as core
        for k in (2**40, 2**58, 2**60):
            x = np.broadcast_to(np.ones((), np.float16), (2, k))
            y = np.broadcast_to(np.ones((), np.float16), (k, 2))
            try:
                core.matmul(x, y)
            except MemoryError as e:
                assert "scratch" in str(e), e
            else:
                raise AssertionError(f"K={k}: no MemoryError")
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_core_rejects_byteswapped_and_misaligned_arrays():
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    with pytest.raises(TypeError, match="byte order"):
        core.matmul(a, a.T)  # same dtype object: used to read the bytes as '<f4'
    buf = np.zeros(8 * 9 + 1, np.uint8)
    m = np.frombuffer(buf.data, np.float64, 9, 1).reshape(3, 3)
    assert not m.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        core.matmul(m, m)
    # Equal dtypes that are distinct objects are the same dtype.
    meta = np.ones((2, 2), np.dtype(np.float32, metadata={"k": 1}))
    np.testing.assert_array_equal(core.matmul(meta, np.ones((2, 2), np.float32)),
                                  np.full((2, 2), 2.0, np.float32))


@pytest.mark.parametrize("extra", [1, 2])  # tf.matmul itself stops at rank 12
def test_more_batch_dims_than_the_kernels_take_fall_back(extra):
    rank = dispatch.MAX_BATCH_DIMS + extra
    a = tf.ones([1] * rank + [3, 4])
    b = tf.ones([2] + [1] * (rank - 1) + [4, 5])
    np.testing.assert_array_equal(smm.matmul(a, b), tf.linalg.matmul(a, b))
    np.testing.assert_array_equal(smm.matvec(a, tf.ones([4])),
                                  tf.linalg.matvec(a, tf.ones([4])))


@pytest.mark.parametrize("flag", ["transpose_a", "adjoint_a", "transpose_b", "adjoint_b",
                                  "grad_a"])
@pytest.mark.parametrize("value", [0, 1, 1.5, "", "yes", [], np.array([1, 0]), tf.float64,
                                   None, np.bool_(True)])
@pytest.mark.parametrize("rank", [2, 3])
def test_odd_flag_values_behave_like_the_builtin(flag, value, rank):
    a, b = tf.ones([2] * (rank - 2) + [3, 3]), tf.ones([3, 3])
    try:
        want = tf.linalg.matmul(a, b, **{flag: value})
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            smm.matmul(a, b, **{flag: value})
    else:
        np.testing.assert_array_equal(smm.matmul(a, b, **{flag: value}), want)


@pytest.mark.parametrize("batch_shape", [[2**40, 2**40], [2**62, 4], [2**63 - 1, 2],
                                         [3, 2**62]])
def test_reduce_batch_shape_whose_size_overflows_raises(batch_shape):
    lib = loader.load()
    with pytest.raises(tf.errors.InvalidArgumentError, match="overflows int64"):
        lib.small_mm_batch_mat_mul_reduce(tf.ones([3, 4]), tf.ones([4, 2]),
                                          tf.constant(batch_shape, tf.int64))


@pytest.mark.parametrize("fn,ref", [(smm.matmul, tf.linalg.matmul),
                                    (smm.matvec, tf.linalg.matvec)])
def test_ragged_arguments_go_to_the_builtin(fn, ref):
    ragged = tf.ragged.constant([[1.0], [2.0, 3.0]])
    dense = tf.ones([2, 2]) if fn is smm.matmul else tf.ones([2])
    for args in ((ragged, dense), (dense, ragged)):
        try:
            ref(*args)
        except Exception as e:  # noqa: BLE001
            with pytest.raises(type(e)):
                fn(*args)
        else:
            fn(*args)


@pytest.mark.parametrize("xs,ys,flags,batch_shape,want", [
    ([0, 2**62, 4, 3], [3, 2], {}, None, [0, 2**62, 4, 2]),
    ([0, 2**40, 2**40], [0, 2**40, 2**40], {}, None, [0, 2**40, 2**40]),
    ([2, 2**61, 0, 16], [0, 16], {"transpose_x": True}, [2, 1], [2, 1, 16, 16]),
    ([0, 3, 4], [4, 2], {}, [], [3, 2]),
])
def test_zero_element_operands_with_huge_dims(xs, ys, flags, batch_shape, want):
    """Shapes TF accepts because they hold no elements. Their dense strides overflow int64
    (signed overflow in the adapter and the planner, found by UBSan in
    scripts/sanitize.sh); the result is empty or zeros (K = 0 / empty reduction)."""
    lib = loader.load()
    x, y = (tf.reshape(tf.zeros([0]), s) if 0 in s else tf.ones(s) for s in (xs, ys))
    if batch_shape is None:
        got = lib.small_mm_batch_mat_mul(x, y, **flags)
    else:
        got = lib.small_mm_batch_mat_mul_reduce(x, y, tf.constant(batch_shape, tf.int64),
                                                **flags)
    assert got.shape.as_list() == want
    if got.shape.num_elements():
        assert not np.any(got.numpy())
