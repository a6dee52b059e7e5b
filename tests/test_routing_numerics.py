"""NaN and ±Inf in the fused routing op (SmallMMDynamicRouting and its gradient) land
exactly where the TF-ops reference, `dynamic_routing_reference` evaluated in float64, puts
them, forward and backward, and the finite values agree: the rule in cc/engine/routing.h,
checked the way test_numerics.py checks the matmul ops.

Why float64: TensorFlow's float32 CPU softmax (oneDNN) does not propagate a NaN logit to the
rest of its row, and which other entries it makes NaN depends on the CPU's vector width
(see the reference's docstring; test_reference_float32_softmax_is_the_odd_one_out below
shows it). Every other softmax TensorFlow has (float64, XLA, GPU) makes the row NaN, as IEEE
arithmetic on exp(x - max) / Σ does, and so do the fused kernels in float32 and float64.

Poison patterns: one element, one input capsule, one output capsule, one k of every
capsule, several batch rows at once, each with NaN, +Inf and -Inf; and the same in the
upstream gradient dL/dv. Inputs are in [-2, 2], so no finite value overflows.
"""

import numpy as np
import pytest
import tensorflow as tf

from conftest import random_tensor, run_python
from tf_smallmm.capsules import routing as caps

TOL = {tf.float32: 2e-5, tf.float64: 1e-12}  # as test_routing.py, relative to the max
# K = 16 and 8 are compile-time instantiations, 5 the run-time-K path; I = 17 spans two
# softmax blocks; J = 1 is a softmax over one logit.
SHAPES = [(4, 7, 4, 16), (4, 17, 3, 5), (4, 5, 3, 8), (4, 3, 1, 4)]
SPECIALS = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def u_hat_patterns(shape):
    """(name, [(index into û, special name)]) poisonings; row 3 always stays finite."""
    _, i_caps, j_caps, k_dim = shape
    i, j, k = i_caps // 2, j_caps - 1, k_dim - 1
    out = []
    for name in SPECIALS:
        out += [
            (f"element {name}", [((1, i, j, k), name)]),
            (f"input capsule {name}", [((1, i, slice(None), slice(None)), name)]),
            (f"output capsule {name}", [((1, slice(None), j, slice(None)), name)]),
            (f"one k {name}", [((2, slice(None), slice(None), k), name)]),
        ]
    out.append(("rows 0 and 2, mixed", [((0, 0, 0, 0), "nan"), ((2, i, j, 0), "+inf"),
                                        ((2, 0, 0, k), "-inf")]))
    out.append(("+inf and -inf in one sum", [((1, 0, j, k), "+inf"), ((1, i, j, k), "-inf")]))
    return out


def grad_v_patterns(shape):
    """Poisonings of the upstream gradient dL/dv [B, J, K]."""
    _, _, j_caps, k_dim = shape
    out = []
    for name in SPECIALS:
        out += [
            (f"dv element {name}", [((1, j_caps - 1, k_dim - 1), name)]),
            (f"dv capsule {name}", [((2, 0, slice(None)), name)]),
        ]
    return out


def poison(x, pattern):
    x = np.array(x, np.float64)
    for index, name in pattern:
        x[index] = SPECIALS[name]
    return x


def reference(u, g, iterations):
    u, g = tf.constant(u, tf.float64), tf.constant(g, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(u)
        v = caps.dynamic_routing_reference(u, iterations)
    return v.numpy(), tape.gradient(v, u, output_gradients=g).numpy()


def fused(u, g, iterations, dtype):
    u, g = tf.constant(u, dtype), tf.constant(g, dtype)
    with tf.GradientTape() as tape:
        tape.watch(u)
        v = caps.dynamic_routing(u, iterations)
    du = tape.gradient(v, u, output_gradients=g)
    return np.asarray(tf.cast(v, tf.float64)), np.asarray(tf.cast(du, tf.float64))


def assert_same_specials(got, want, dtype, what):
    for kind, test in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        diff = test(got) != test(want)
        assert not diff.any(), (f"{what}: {kind} differs from the reference at "
                                f"{np.argwhere(diff)[:5].tolist()} ({int(diff.sum())} places)")
    finite = np.isfinite(want)
    if finite.any():
        scale = max(float(np.abs(want[finite]).max()), 1e-30)
        np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=TOL[dtype] * scale,
                                   err_msg=what)


def check(shape, iterations, dtype):
    """Every poisoning of û and of dL/dv for one shape; returns how many non-finite values
    the reference produced (so that a test cannot pass on inputs that poison nothing)."""
    u = np.asarray(random_tensor(shape, tf.float64, seed=sum(shape) + iterations)) * 2.0
    g = np.asarray(random_tensor((shape[0],) + shape[2:], tf.float64, seed=iterations))
    cases = [(name, poison(u, p), g) for name, p in u_hat_patterns(shape)]
    cases += [(name, u, poison(g, p)) for name, p in grad_v_patterns(shape)]
    non_finite = 0
    for name, uu, gg in cases:
        # Cast first: the reference sees exactly the fused op's (rounded) inputs.
        uu = np.asarray(tf.cast(tf.constant(uu, dtype), tf.float64))
        gg = np.asarray(tf.cast(tf.constant(gg, dtype), tf.float64))
        want_v, want_du = reference(uu, gg, iterations)
        got_v, got_du = fused(uu, gg, iterations, dtype)
        what = f"{dtype.name} {shape} R={iterations} {name}"
        assert_same_specials(got_v, want_v, dtype, what + ": v")
        assert_same_specials(got_du, want_du, dtype, what + ": dL/du_hat")
        assert np.isfinite(want_v[3]).all() and np.isfinite(want_du[3]).all(), what
        non_finite += int((~np.isfinite(want_v)).sum() + (~np.isfinite(want_du)).sum())
    return non_finite


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nan_and_inf_positions_match_the_reference(shape, iterations, dtype):
    assert check(shape, iterations, dtype) > 0


def test_one_iteration_confines_a_nan_to_its_output_capsule():
    # The rule's two regimes, spelled out: R = 1 touches only output capsule j (v and dû),
    # R >= 2 routes the NaN through every logit of the row.
    u = np.array(random_tensor((2, 5, 3, 4), tf.float64, seed=1))
    u[0, 2, 1, 3] = np.nan
    g = np.ones((2, 3, 4))
    v, du = fused(u, g, 1, tf.float32)
    assert np.isnan(v[0, 1]).all() and np.isfinite(np.delete(v[0], 1, axis=0)).all()
    assert np.isnan(du[0, :, 1]).all() and np.isfinite(np.delete(du[0], 1, axis=1)).all()
    v, du = fused(u, g, 2, tf.float32)
    assert np.isnan(v[0]).all() and np.isnan(du[0]).all()
    assert np.isfinite(v[1]).all() and np.isfinite(du[1]).all()


def test_reference_float32_softmax_is_the_odd_one_out():
    # Why the comparison is in float64: if TensorFlow's float32 softmax propagated NaN like
    # its float64 one, this would fail, and float32 could be compared directly.
    x = np.random.default_rng(0).uniform(size=(1, 16))
    x[0, 0] = np.nan
    assert np.isnan(tf.nn.softmax(tf.constant(x, tf.float64))).all()
    f32 = tf.nn.softmax(tf.constant(x, tf.float32)).numpy()
    if np.isnan(f32).all():
        pytest.skip("this TensorFlow's float32 softmax propagates NaN like IEEE arithmetic")
    assert np.isnan(f32).sum() < 16


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_isa_puts_nan_and_inf_in_the_same_places(isa):
    out = run_python("""
        import tensorflow as tf, tf_smallmm as smm
        import test_routing_numerics as t
        n = 0
        for shape in t.SHAPES:
            for r in (1, 3):
                for dt in (tf.float32, tf.float64):
                    n += t.check(shape, r, dt)
        print(smm.build_info()["active_isa"], n)
    """, env={"TF_SMALLMM_ISA": isa}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    active, n = out.stdout.strip().splitlines()[-1].split()
    if active != isa:
        pytest.skip(f"this CPU lacks {isa}")
    assert int(n) > 0
