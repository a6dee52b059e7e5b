"""Numerics of every public function (rows of tests/public_ops.py): NaN and ±Inf land
exactly where TensorFlow's own function puts them, float16 / bfloat16 results stay within
the documented bound below, and the build never trades IEEE semantics for speed.

Documented bound for float16 and bfloat16 (inputs and output in that type; products are
accumulated in float32, see cc/engine/smallmm.h): with y the exact result on the same
(already rounded) inputs, evaluated in float64, and |a|·|b| the same function applied to the
absolute values of the inputs,

    |ŷ − y| ≤ u·|y| + 1.01·K·2⁻²⁴·(|a|·|b|) + η

where u is the output's unit roundoff (2⁻¹¹ for float16, 2⁻⁸ for bfloat16), K the number
of products summed into the element, and η half the output's smallest subnormal (2⁻²⁵ for
float16, 2⁻¹³⁴ for bfloat16). Reasoning: a product of two float16 (11-bit) or bfloat16
(8-bit) significands is exact in float32; K float32 additions add at most K·2⁻²⁴·Σ|aᵢbᵢ|
(the 1.01 covers the second-order terms); the one final rounding to the output type adds
u·|ŷ₃₂| in the normal range or η below it.
"""

import ast
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import DTYPES
from public_ops import PUBLIC_OPS, RandomPick
from tf_smallmm._core import dispatch

OPS = pytest.mark.parametrize("op", PUBLIC_OPS, ids=lambda op: op.name)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_UNIT = {tf.float16: 2.0**-11, tf.bfloat16: 2.0**-8}
_ETA = {tf.float16: 2.0**-25, tf.bfloat16: 2.0**-134}


def _wide(t):
    return tf.cast(t, tf.complex128 if t.dtype.is_complex else tf.float64)


def _cases(op, dtype, n, seed):
    pick = RandomPick(seed)
    for _ in range(n):
        c = op.inputs(pick, dtype)
        yield [tf.cast(tf.constant(t), dtype) for t in c.tensors], c.kwargs


# ------------------------------------------------------------------ NaN / Inf
def _poison(t, rng, specials):
    """`t` with a few elements replaced by NaN / +Inf / -Inf (real or imaginary part)."""
    x = np.array(_wide(t))
    if x.size == 0:
        return t
    flat = x.reshape(-1)
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(flat.size)
        v = specials[rng.integers(len(specials))]
        if np.iscomplexobj(flat) and rng.integers(2):
            flat[i] = complex(flat[i].real, v)
        else:
            flat[i] = v if not np.iscomplexobj(flat) else complex(v, flat[i].imag)
    return tf.cast(tf.constant(x), t.dtype)


def _special_positions(x):
    x = np.asarray(_wide(tf.convert_to_tensor(x)))
    parts = [x.real, x.imag] if np.iscomplexobj(x) else [x]
    return [(np.isnan(p), np.isposinf(p), np.isneginf(p)) for p in parts]


def _assert_same_specials(got, want, what):
    for g, w in zip(_special_positions(got), _special_positions(want)):
        for kind, gm, wm in zip(("NaN", "+Inf", "-Inf"), g, w):
            assert np.array_equal(gm, wm), (
                f"{what}: {kind} at {np.argwhere(gm != wm)[:5].tolist()} differs from the "
                f"built-in")


@OPS
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nan_and_inf_positions_match_the_builtin(op, dtype):
    """The built-in runs on the same values widened to float64 / complex128 (exact, and no
    finite value here can overflow: inputs are in [-1, 1] and sums are short), which is
    where TensorFlow's own kernels put NaN/Inf too: ±Inf·0 and Inf − Inf give NaN, NaN
    spreads along its row / column, ±Inf along its row / column with its sign.

    Complex operands with infinite parts are the one exception, by design: TensorFlow's
    complex GEMM (Eigen), like numpy's (OpenBLAS), turns some infinite results into NaN —
    (x − yi)·(−Inf + 0.56i) summed with finite terms gives NaN+NaNj there, −Inf+Infj here
    (each complex product is (ar·br − ai·bi) + i(ar·bi + ai·br), as C99 would have it). For
    those the *set of non-finite elements* is identical; NaN-only inputs match exactly.

    Our kernels run every product here (kernels_everywhere): where the dispatch model sends
    one to the built-in, the result is the built-in's by construction, and that is not
    always the widened one: oneDNN's AMX bfloat16 GEMM (Xeon with AMX, TF 2.21) spreads a
    NaN to rows of the output that hold no special value."""
    rng = np.random.default_rng(7)
    checked = 0
    for args, kw in _cases(op, dtype, 25, seed=11):
        specials = [np.nan, np.inf, -np.inf] if not dtype.is_complex else [np.nan]
        poisoned = [_poison(a, rng, specials) for a in args]
        with dispatch.kernels_everywhere():
            got = op.fn(*poisoned, **kw)
        want = op.reference(*[_wide(a) for a in poisoned], **kw)
        _assert_same_specials(got, want, f"{op.name} {dtype.name} {kw}")
        checked += int(np.size(got))
        if dtype.is_complex:
            poisoned = [_poison(a, rng, [np.nan, np.inf, -np.inf]) for a in args]
            got = np.asarray(_wide(op.fn(*poisoned, **kw)))
            want = np.asarray(op.reference(*[_wide(a) for a in poisoned], **kw))
            assert np.array_equal(np.isfinite(got), np.isfinite(want)), (
                f"{op.name} {dtype.name} {kw}: non-finite elements differ from the built-in")
    assert checked > 0


@OPS
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_nan_and_inf_match_the_builtin_in_its_own_dtype(op, dtype):
    """The same against the built-in in the very same dtype, on shapes without batch
    broadcasting (TF 2.21's oneDNN batch matmul corrupts memory on some broadcasts in
    float32, so the broadcast families are checked in float64 above)."""
    rng = np.random.default_rng(8)
    pick = RandomPick(12)
    for _ in range(20):
        k, m, n = pick.int(1, 9), pick.int(1, 9), pick.int(1, 9)
        a = _poison(tf.constant(pick.array([2, m, k]), dtype), rng, [np.nan, np.inf, -np.inf])
        b = _poison(tf.constant(pick.array([2, k, n]), dtype), rng, [np.nan, np.inf, -np.inf])
        if op.name == "matvec":
            b = b[:, :, 0]
        elif op.name != "matmul":
            pytest.skip(f"{op.name}: covered by the float64 comparison")
        got, want = op.fn(a, b), op.reference(a, b)
        for g, w in zip(_special_positions(got), _special_positions(want)):
            for gm, wm in zip(g, w):
                assert np.array_equal(gm, wm)


# ------------------------------------------------------------------ 16-bit floats
@OPS
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["unit", "large"])
def test_16bit_results_within_documented_bound(op, dtype, scale):
    worst = 0.0
    for args, kw in _cases(op, dtype, 40, seed=int(scale)):
        args = [tf.cast(_wide(a) * scale, dtype) for a in args]
        got = np.asarray(_wide(op.fn(*args, **kw)))
        exact = np.asarray(op.reference(*[_wide(a) for a in args], **kw))
        absval = np.asarray(op.reference(*[tf.abs(_wide(a)) for a in args], **kw))
        k = np.asarray(op.reference(*[tf.ones_like(_wide(a)) for a in args], **kw))
        bound = (_UNIT[dtype] * np.abs(exact) + 1.01 * k * 2.0**-24 * absval + _ETA[dtype])
        err = np.abs(got - exact)
        assert np.all(err <= bound), (
            f"{op.name} {dtype.name} {kw}: error {err.max()} above the bound at "
            f"{np.unravel_index(np.argmax(err - bound), err.shape)}")
        if err.size:
            worst = max(worst, float(np.max(err / bound)))
    assert worst > 0.05, "the bound is never approached: is the test exercising rounding?"


def test_16bit_accumulates_in_float32_not_in_the_storage_type():
    """1 + 2⁻¹¹ + ... : a float16 accumulator would lose every small term, float32 keeps
    them. 2048 terms of 2⁻¹¹ (exact in float16) on top of 1.0 sum to exactly 2.0."""
    import tf_smallmm as smm

    a = tf.constant(np.concatenate([[1.0], np.full(2048, 2.0**-11)])[None, :], tf.float16)
    b = tf.ones([2049, 1], tf.float16)
    assert float(smm.matmul(a, b)[0, 0]) == 2.0


# ------------------------------------------------------------------ build flags
_UNSAFE_FLAGS = ("-ffast-math", "-Ofast", "-funsafe-math-optimizations", "-ffinite-math-only",
                 "-fno-honor-nans", "-fno-honor-infinities", "-fno-signed-zeros",
                 "-freciprocal-math", "-fassociative-math", "-fcx-limited-range",
                 "--use_fast_math", "-use_fast_math", "--ftz=true", "-ftz=true",
                 "-march=native", "-mtune=native")


def _flag_strings(path):
    """Every string constant in a Python file that looks like a compiler flag (comments
    are not in the AST, so a comment saying 'no -ffast-math' does not count)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value.lstrip().startswith("-")]


def test_build_uses_no_fast_math_or_native_flags():
    flags = _flag_strings(os.path.join(ROOT, "setup.py"))
    assert "-O3" in flags, "setup.py's flags were not found: did the file change shape?"
    bad = [f for f in flags for u in _UNSAFE_FLAGS if u in f.split()]
    assert not bad, f"setup.py passes flags that break IEEE semantics or portability: {bad}"
    tf_bad = [f for f in tf.sysconfig.get_compile_flags() if f in _UNSAFE_FLAGS]
    assert not tf_bad, f"tf.sysconfig adds {tf_bad}"


def test_inf_times_zero_and_signed_zeros_as_the_builtin():
    """IEEE details that -ffast-math would lose: Inf·0 = NaN, and the sign of zero results
    (a sum that starts from +0, as every GEMM does, gives +0 for −0·1)."""
    import tf_smallmm as smm

    a = tf.constant([[np.inf, 0.0]], tf.float32)
    b = tf.constant([[0.0], [1.0]], tf.float32)
    assert math.isnan(float(smm.matmul(a, b)[0, 0]))
    for x, y in [([[-0.0]], [[1.0]]), ([[-0.0, -0.0]], [[1.0], [1.0]]), ([[0.0]], [[-1.0]])]:
        x, y = tf.constant(x, tf.float64), tf.constant(y, tf.float64)
        np.testing.assert_array_equal(np.signbit(smm.matmul(x, y)),
                                      np.signbit(tf.linalg.matmul(x, y)))
