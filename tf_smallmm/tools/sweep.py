"""`python -m tf_smallmm.bench --sweep`: every drop-in against the built-in it replaces, over
a grid of small products, as a new user would call them.

Each case times our function and the built-in in the same process, paired and interleaved:
every round times both back to back (in an order shuffled each round), and the case's
figure is the median over rounds of the built-in's time / ours (above 1: ours is faster).
Both sides run in tf.function, forward (y = f(a, b)) and forward+backward (y and the
gradients for a and b, from tf.GradientTape.gradient with a fixed upstream gradient: no
loss ops); where one operand is a weight (shared or broadcast across the batch, capsule
prediction, a Dense-like einsum) also y with the gradient of a alone and of b alone (a
model's first layer, whose input needs none, or a frozen weight); eager cases call both
sides directly. Controls time the built-in against itself
(two separate tf.functions): their spread is the noise of this run.

    python -m tf_smallmm.bench --sweep                # full grid -> benchmarks/SWEEP.md, .png
    python -m tf_smallmm.bench --sweep --quick        # a coarser grid, a few minutes
    python -m tf_smallmm.bench --sweep --write-model  # first measures our kernels on the
        # model grid (forced, kernels_everywhere), rewrites tf_smallmm/_core/
        # dispatch_model.json for this CPU class, then sweeps with the new model
        # (--family dense | shared | tall: that product family's grid only)
"""

import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import time
from typing import Callable

import numpy as np
import tensorflow as tf

import tf_smallmm as smm
from tf_smallmm._core import dispatch, loader
from tf_smallmm.dropins import linalg

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.complex64, tf.complex128]
SIZES = [1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 24, 32]
# Per operand, about this many elements (8 MiB of float32: past this machine's L2, as the
# activations of a layer are), so that a call takes tens to hundreds of µs.
ELEMENTS = 1 << 21
# One timing of one side lasts about this long (calls repeated to fill it).
TIMING_S = 2e-3
FLOOR_TARGET = 0.95  # the target: no case below this ratio
# What a row times: forward, forward+backward (both gradients), forward with the gradient
# of a alone / b alone (one_sided cases), eager calls.
MODES = ("fwd", "fwd_bwd", "fwd_da", "fwd_db", "eager")


# --------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    """ours(a, b) and builtin(a, b) compute the same; `spec` (TensorSpecs) traces both with
    unknown dims; `point` = (M, N, K) marks a case of the model grid."""

    group: str
    label: str
    dtype: tf.DType
    ours: Callable
    builtin: Callable
    shapes: tuple
    spec: tuple = None  # TensorSpecs, or None: static shapes
    point: tuple = None  # (M, N, K) on the model grid, or None
    family: str = dispatch.DENSE  # the model's product family of a grid point
    eager: bool = False
    grads: bool = True
    one_sided: bool = False  # also time the gradient of each operand alone
    # What the model's forced-kernel row is measured against where the wrapper's built-in
    # side is not `builtin` itself (None: it is).
    model_builtin: Callable = None


def _tensor(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=shape)
    if dtype.is_complex:
        x = x + 1j * rng.uniform(-1, 1, size=shape)
    return tf.cast(tf.constant(x), dtype)


def _batch(*matrix_sizes, elements=ELEMENTS):
    return max(1, elements // max(matrix_sizes))


def matmul_case(m, n, k, dtype, group="grid", **flags):
    """Batched op(A)[B, M, K] · op(B)[B, K, N] through smm.matmul vs tf.linalg.matmul."""
    ta, tb = flags.get("transpose_a") or flags.get("adjoint_a"), \
        flags.get("transpose_b") or flags.get("adjoint_b")
    batch = _batch(m * k, k * n, m * n)
    a_shape = (batch, k, m) if ta else (batch, m, k)
    b_shape = (batch, n, k) if tb else (batch, k, n)
    text = "".join(f" {f}" for f, v in flags.items() if v)
    return Case(group, f"matmul {batch}×({m}×{k} @ {k}×{n}){text}", dtype,
                lambda a, b: smm.matmul(a, b, **flags),
                lambda a, b: tf.linalg.matmul(a, b, **flags), (a_shape, b_shape),
                point=(m, n, k) if group == "grid" else None)


def grid(quick):
    """The model grid: M, K over SIZES (sampled) per N, for every dtype."""
    out = []
    # Sampled so that the full sweep takes about 15 minutes on an idle 2-core machine (most
    # of it tracing): float32 densest, every dtype with the N = 1 and K = 3 rows.
    for dtype in DTYPES:
        if dtype == tf.float32:
            mk = [1, 3, 8, 16, 24, 32] if quick else [1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 24, 32]
            ns = [1, 8, 32] if quick else [1, 4, 8, 16, 32]
        else:
            mk = [1, 3, 8, 32] if quick else [1, 3, 4, 8, 16, 32]
            ns = [1, 8, 32]
        points = [(m, n, k) for n in ns for m in mk for k in mk]
        # And the cubes: a cell off the sampled sizes takes the nearest measured cells'
        # score, and complex64 [3640, 24, 24] @ [3640, 24, 24] ran 0.75-0.89x on a model
        # that had interpolated 24³ between 16 and 32, where our kernels win.
        points += [(n, n, n) for n in ([8, 16, 24] if quick else SIZES)
                   if (n, n, n) not in points]
        out += [matmul_case(m, n, k, dtype) for m, n, k in points]
        # Beyond the small sizes: where the built-in takes over.
        big = [(64, 64, 64), (128, 128, 128), (4096, 8, 8), (4096, 64, 64), (1024, 512, 512)]
        out += [matmul_case(m, n, k, dtype) for m, n, k in (big[:3] if quick else big)]
    return out


def shared_case(m, n, k, dtype, folded, one=False):
    """A[G, M, K] broadcast against B[Bt, G, K, N'] through smm.matmul vs tf.linalg.matmul:
    a point (M, N, K) of the model's FOLDED family where `folded` (N' = 1 and Bt = N: the
    batch of matrix-vector products the kernels run as one product of N columns, as
    capsule prediction), else of the SHARED family (Bt = 4 and N' = N). `one`: the SHARED
    family's other end, one A[M, K] against a batch B[Bt, K, N] (a weight applied to a
    batch of matrices). Its gradient for A is one long reduction instead of G of them,
    so it runs on other code (no fused pair, 16-bit sums not split over threads): in the
    2026-12-04 sweep, fitted from the G-many points only, bfloat16 A[32, 3] @ B[2048, 3,
    32] ran forward+backward at 0.48× on a cell those points gave to our kernels."""
    if one:
        bt = _batch(k * n, m * n)
        return Case("shared grid", f"matmul A-shared ({m}, {k}) @ ({bt}, {k}, {n})", dtype,
                    smm.matmul, tf.linalg.matmul, ((m, k), (bt, k, n)), point=(m, n, k),
                    family=dispatch.SHARED, one_sided=True)
    bt, cols = (n, 1) if folded else (4, n)
    groups = _batch(m * k, bt * k * cols, bt * m * cols)
    a_shape, b_shape = (groups, m, k), (bt, groups, k, cols)
    return Case("shared grid", f"matmul A-shared {a_shape} @ {b_shape}", dtype, smm.matmul,
                tf.linalg.matmul, (a_shape, b_shape), point=(m, n, k),
                family=dispatch.FOLDED if folded else dispatch.SHARED, one_sided=True)


def shared_grid(quick):
    """The model grids of the FOLDED and SHARED families (products whose A is broadcast
    over a batch axis of B), for every dtype."""
    ms = [1, 4, 16, 160] if quick else [1, 3, 8, 16, 32, 160]
    ks = [3, 8, 32] if quick else [3, 8, 16, 32]
    out = []
    for dtype in DTYPES:
        out += [shared_case(m, n, k, dtype, True) for m in ms for k in ks
                for n in ([1, 8, 64] if quick else [1, 4, 16, 64])]
        out += [shared_case(m, 8, k, dtype, False) for m in ms for k in ks]
        out += [shared_case(m, n, k, dtype, False, one=True) for m in ms for k in ks
                for n in ([8] if quick else [8, 32])]
    return out


def tall_case(m, n, k, dtype):
    """A[G, M, K] · B[K, N], B shared by every matrix of A: a point (M, N, K) of the model's
    TALL family (one [G·M, K] · [K, N] GEMM for the built-in, pieces of up to
    dispatch.MAX_FOLDED_ROWS rows for the kernels). G a power of two, so that the pieces
    are as long as the kernels make them (M times the largest divisor of G that fits)."""
    groups = 1 << int(np.log2(_batch(m * k, m * n)))
    a_shape, b_shape = (groups, m, k), (k, n)
    # Where the wrapper's built-in side is not tf.linalg.matmul (its gradient is one GEMM
    # where TF's sums per-matrix products, linalg.builtin_matmul), the model measures the
    # kernels against that side, the one they compete with; the table compares the
    # wrapper with tf.linalg.matmul.
    side = linalg.builtin_matmul if linalg.tall_gradient_applies(m, k, n) else None
    return Case("tall grid", f"matmul B shared {a_shape} @ {b_shape}", dtype, smm.matmul,
                tf.linalg.matmul, (a_shape, b_shape), point=(m, n, k), family=dispatch.TALL,
                one_sided=True, model_builtin=side)


def tall_grid(quick):
    """The model grid of the TALL family, for every dtype."""
    ms = [1, 4, 16] if quick else [1, 3, 4, 8, 16, 32]
    # K = 4 measured, not interpolated from K = 3 and 8: points in homogeneous
    # coordinates, x[G, M, 4] · T[4, 4], are a common B-shared product.
    ks = [3, 8, 32] if quick else [3, 4, 8, 16, 32]
    ns = [1, 8, 32] if quick else [1, 4, 8, 16, 32]
    # And beyond the small sizes, where the built-in's one GEMM takes over: without them the
    # fit extended the 32s' cells to every larger size (float32 [B, 128, 512] · [512, 512]
    # to our kernels), and without the M = 1 ones the M = 1, N = K = 32 cell to N = K = 512.
    big = [(1, 64, 64), (1, 512, 512), (4, 64, 64), (64, 64, 64), (128, 128, 128),
           (4096, 8, 8), (16, 256, 256), (1024, 512, 512)]
    points = [(m, n, k) for m in ms for k in ks for n in ns] + (big[3:6] if quick else big)
    return [tall_case(m, n, k, dtype) for dtype in DTYPES for m, n, k in points]


def variants(quick):
    """Transposes and adjoints, broadcasts, small batches."""
    out = []
    sizes = [(3, 1, 3), (8, 8, 8), (16, 4, 16)] if quick else \
        [(3, 1, 3), (4, 4, 4), (8, 8, 8), (16, 4, 16), (32, 32, 3), (24, 24, 24)]
    for m, n, k in sizes:
        for flags in ({"transpose_a": True}, {"transpose_b": True},
                      {"transpose_a": True, "transpose_b": True}):
            out.append(matmul_case(m, n, k, tf.float32, "transpose", **flags))
        out.append(matmul_case(m, n, k, tf.complex64, "transpose", adjoint_a=True))
        out.append(matmul_case(m, n, k, tf.complex64, "transpose", adjoint_b=True))
    for m, n, k in sizes:
        for dtype in (tf.float32,) if quick else (tf.float32, tf.bfloat16, tf.float64):
            batch = _batch(m * k, k * n, m * n)
            for name, a_shape, b_shape in (
                    ("A shared", (m, k), (batch, k, n)),
                    ("B shared", (batch, m, k), (k, n)),
                    ("rank-4 A[B,1] B[1,C]", (batch // 64 or 1, 1, m, k), (1, 64, k, n))):
                out.append(Case("broadcast", f"matmul {name} {a_shape} @ {b_shape}", dtype,
                                smm.matmul, tf.linalg.matmul, (a_shape, b_shape),
                                one_sided=True))
    for batch in (1, 4, 16, 64):
        for n in (2, 8, 32):
            out.append(Case("small batch", f"matmul {batch}×({n}×{n} @ {n}×{n})", tf.float32,
                            smm.matmul, tf.linalg.matmul, ((batch, n, n), (batch, n, n))))
    return out


def _einsum(equation, a_shape, b_shape, dtype=tf.float32, group="einsum", spec=None,
            one_sided=False):
    return Case(group, f"einsum {equation} {a_shape} {b_shape}", dtype,
                lambda a, b: smm.einsum(equation, a, b),
                lambda a, b: tf.einsum(equation, a, b), (a_shape, b_shape), spec=spec,
                one_sided=one_sided)


def _keras_backend():
    try:
        import tf_keras

        return tf_keras.backend
    except ImportError:
        return None


def equations(quick):
    """Common einsum equations, keras batch_dot / dot, capsule prediction."""
    out = [
        _einsum("bij,bjk->bik", (65536, 4, 4), (65536, 4, 4)),
        _einsum("bij,bjk->bik", (8192, 16, 8), (8192, 8, 16)),
        _einsum("bhqd,bhkd->bhqk", (64, 8, 32, 16), (64, 8, 32, 16)),  # attention scores
        _einsum("bhqk,bhkd->bhqd", (64, 8, 32, 32), (64, 8, 32, 16)),  # attention values
        _einsum("abc,cd->abd", (512, 32, 8), (8, 8), one_sided=True),
        _einsum("abc,cd->abd", (64, 128, 64), (64, 64), one_sided=True),
        _einsum("bij,bj->bi", (65536, 20, 20), (65536, 20)),
        _einsum("ijkl,bil->bijk", (1152, 10, 16, 8), (50, 1152, 8), one_sided=True),  # CapsNet
        _einsum("ijkl,bil->bijk", (32, 10, 16, 8), (64, 32, 8), one_sided=True),
    ]
    kb = _keras_backend()
    if kb is not None:
        for x, y, axes in (((65536, 8, 8), (65536, 8, 8), None), ((65536, 20), (65536, 20), None),
                           ((65536, 16, 8), (65536, 8), None), ((65536, 8, 16), (65536, 8, 16), 1),
                           ((65536, 8, 16), (65536, 16, 8), (2, 1)),
                           ((65536, 8, 16), (65536, 4, 16), (2, 2))):
            out.append(Case("batch_dot", f"batch_dot {x} {y} axes={axes}", tf.float32,
                            lambda a, b, axes=axes: smm.batch_dot(a, b, axes),
                            lambda a, b, axes=axes: kb.batch_dot(a, b, axes), (x, y)))
        out.append(Case("batch_dot", "dot (4096,8,16) (32,16,4)", tf.float32, smm.dot, kb.dot,
                        ((4096, 8, 16), (32, 16, 4)), one_sided=True))
    out.append(Case("capsule", "capsule_predict W[1152,10,16,8] u[50,1152,8]", tf.float32,
                    smm.capsule_predict, lambda w, u: tf.einsum("ijkl,bil->bijk", w, u),
                    ((1152, 10, 16, 8), (50, 1152, 8)), one_sided=True))
    return out[:4] + out[-1:] if quick else out


def unknown_batch(quick):
    """The same products traced with a None batch (Keras fit, input_signature, serving)."""
    def spec(shape, unknown=(0,)):
        return tf.TensorSpec([None if i in unknown else d for i, d in enumerate(shape)])

    out = []
    for a_shape, b_shape in (((65536, 4, 4), (65536, 4, 4)), ((8192, 16, 16), (8192, 16, 16)),
                             ((65536, 32, 3), (65536, 3, 1))):
        out.append(Case("unknown batch", f"matmul [None,{a_shape[1]},{a_shape[2]}] @ "
                        f"[None,{b_shape[1]},{b_shape[2]}] (run: {a_shape[0]})", tf.float32,
                        smm.matmul, tf.linalg.matmul, (a_shape, b_shape),
                        spec=(spec(a_shape), spec(b_shape))))
    for eq, a_shape, b_shape in (("abc,cd->abd", (64, 128, 512), (512, 512)),
                                 ("bi,ij->bj", (1024, 512), (512, 512)),
                                 ("abc,cd->abd", (512, 32, 8), (8, 8)),
                                 ("abc,cd->abd", (8, 4, 8), (8, 8)),
                                 ("bi,ij->bj", (65536, 16), (16, 16)),
                                 ("bi,ij->bj", (16, 16), (16, 16))):
        out.append(_einsum(eq, a_shape, b_shape, group="unknown batch",
                           spec=(spec(a_shape), spec(b_shape, ()))))
        out[-1].label += " batch None"
    out.append(Case("unknown batch", "capsule_predict W[32,10,16,8] u[None,32,8]", tf.float32,
                    smm.capsule_predict, lambda w, u: tf.einsum("ijkl,bil->bijk", w, u),
                    ((32, 10, 16, 8), (64, 32, 8)),
                    spec=(spec((32, 10, 16, 8), ()), spec((64, 32, 8)))))
    return out[::2] if quick else out


def eager_cases():
    """Tiny inputs called eagerly: per-call overhead only."""
    kb = _keras_backend()
    out = [
        Case("eager", "matmul [2,2] @ [2,2]", tf.float32, smm.matmul, tf.linalg.matmul,
             ((2, 2), (2, 2)), eager=True),
        Case("eager", "matmul [2,3,3] @ [2,3,3]", tf.float32, smm.matmul, tf.linalg.matmul,
             ((2, 3, 3), (2, 3, 3)), eager=True),
        Case("eager", "matvec [2,3,3] · [2,3]", tf.float32, smm.matvec, tf.linalg.matvec,
             ((2, 3, 3), (2, 3)), eager=True),
        Case("eager", "einsum bij,bjk->bik [2,3,3]", tf.float32,
             lambda a, b: smm.einsum("bij,bjk->bik", a, b),
             lambda a, b: tf.einsum("bij,bjk->bik", a, b), ((2, 3, 3), (2, 3, 3)), eager=True),
        Case("eager", "capsule_predict W[3,2,4,5] u[2,3,5]", tf.float32, smm.capsule_predict,
             lambda w, u: tf.einsum("ijkl,bil->bijk", w, u), ((3, 2, 4, 5), (2, 3, 5)),
             eager=True),
    ]
    if kb is not None:
        out += [Case("eager", "batch_dot [2,3,3] [2,3,3]", tf.float32, smm.batch_dot,
                     kb.batch_dot, ((2, 3, 3), (2, 3, 3)), eager=True),
                Case("eager", "dot [2,3,4] [5,4,2]", tf.float32, smm.dot, kb.dot,
                     ((2, 3, 4), (5, 4, 2)), eager=True)]
    return out


# --------------------------------------------------------------------------- timing
def _seconds(fn, args, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps


def paired(ours, builtin, args, rounds, seconds=None):
    """(median of per-round builtin / ours time ratios, median ours s, median builtin s):
    interleaved() timings of the two, each for about `seconds` (default TIMING_S) of
    repeated calls. benchmarks/kernel_grid.py times with it too."""
    t_ours, t_builtin = interleaved(
        [functools.partial(ours, *args), functools.partial(builtin, *args)], rounds, seconds)
    return (float(np.median(t_builtin / t_ours)), float(np.median(t_ours)),
            float(np.median(t_builtin)))


def _steps(fn, spec, y_shape, dtype):
    """tf.functions of the forward step of fn(a, b) and {mode: its step with gradients} for
    the modes fwd_bwd (both gradients), fwd_da and fwd_db (only that operand watched, as a
    model's input or a frozen weight is not: the other gradient is never formed)."""
    fwd = tf.function(fn, input_signature=spec)
    g_spec = None if spec is None else spec + (tf.TensorSpec(y_shape, dtype),)

    def with_grads(which):
        @tf.function(input_signature=g_spec)
        def step(a, b, g):
            with tf.GradientTape() as tape:
                sources = [(a, b)[i] for i in which]
                tape.watch(sources)
                y = fn(a, b)
            return (y, *tape.gradient(y, sources, output_gradients=g))

        return step

    return fwd, {"fwd_bwd": with_grads((0, 1)), "fwd_da": with_grads((0,)),
                 "fwd_db": with_grads((1,))}


def _uses_kernel(fwd, args):
    """(a SmallMM op is in the traced graph, a run-time branch is)."""
    graph = fwd.get_concrete_function(*args).graph
    names = {op.type for op in graph.get_operations()}
    for f in graph._functions.values():  # cond branches
        names |= {node.op for node in f.definition.node_def}
    return any(n.startswith("SmallMM") for n in names), "If" in names or "StatelessIf" in names


def measure(case, rounds, model=False):
    """The case's row: ratios forward / forward+backward (or eager), times, kernel use.
    model: a forced-kernel row of the model, against case.model_builtin where it has one."""
    if model and case.model_builtin is not None:
        case = dataclasses.replace(case, builtin=case.model_builtin)
    a, b = _tensor(case.shapes[0], case.dtype, 1), _tensor(case.shapes[1], case.dtype, 2)
    row = {"group": case.group, "case": case.label, "dtype": case.dtype.name,
           "point": case.point, "family": case.family}
    if case.eager:
        row["eager"], row["ours_s"], row["builtin_s"] = paired(case.ours, case.builtin,
                                                               (a, b), rounds)
        return row
    y = case.builtin(a, b)
    g = _tensor(y.shape, y.dtype, 3)
    ours_f, ours_g = _steps(case.ours, case.spec, [None] + y.shape[1:]
                            if case.spec else None, case.dtype)
    base_f, base_g = _steps(case.builtin, case.spec, [None] + y.shape[1:]
                            if case.spec else None, case.dtype)
    row["kernel"], row["branch"] = _uses_kernel(ours_f, (a, b))
    if case.grads and not (row["kernel"] or row["branch"]):
        # The built-in's forward with our gradients (dispatch.GRADIENTS)?
        row["gradients"] = _uses_kernel(ours_g["fwd_bwd"], (a, b, g))[0]
    row["fwd"], row["ours_s"], row["builtin_s"] = paired(ours_f, base_f, (a, b), rounds)
    if case.grads:
        row["fwd_bwd"], row["ours_fb_s"], row["builtin_fb_s"] = paired(
            ours_g["fwd_bwd"], base_g["fwd_bwd"], (a, b, g), rounds)
    if case.grads and case.one_sided:
        for mode in ("fwd_da", "fwd_db"):
            row[mode], _, _ = paired(ours_g[mode], base_g[mode], (a, b, g), rounds)
    return row


def control(case, rounds):
    """The built-in against itself: two tf.functions of the same code."""
    twin = dataclasses.replace(case, group="control", label=f"control: {case.label}",
                               ours=lambda a, b: case.builtin(a, b), point=None)
    return measure(twin, rounds)


# --------------------------------------------------------------------------- the model
# A cell goes to the built-in only where our kernels lose by more than this run's noise:
# where its worst point (the worse of forward and forward+backward) is below the noise
# floor, the 10th percentile of the ratios of the controls measured in the same pass (the
# built-in against itself), and at most NEAR: a difference of under 3% is not worth a
# different code path. On 2026-12-01, with five other engineers building on the 2-core
# machine, the controls ranged 0.72-1.33 and the floor came out at 0.86.
NEAR = 0.97

# The model's size classes: each of M, N and K is cut at these bounds. The cuts follow
# the kernels' own rules, so one class does not mix sizes that run on different kernels:
# 3 | 4 (the tiny kernels' sizes; one to three rows take the row kernel with AVX-512),
# 7 | 8 (from 8 rows the row kernel, below it the packed kernels beyond one strip). With
# 4 | 8 only (2026-12-02), M = 5, 7 and 8 shared a class: float32 [B, 5 or 7, K] · [B, K, 32]
# lose on the packed kernels (0.72-0.91×, forced) and sent 8×8 · 8×64, which the row
# kernel runs at 1.3× and RESULTS.md at 2.07× tf.matmul, to the built-in with them.
# The shipped 2026-12-02 model is still the fit with the old classes: refitted with these
# (--refit-model), its sweep had 9 cases below 0.95×, mostly K = 3 with N = 32 products
# whose cells the 3 | 4 cut moved to our kernels (bfloat16 B-shared 0.69× forward+backward);
# the next --write-model fits these classes from fresh rows, and its sweep decides.
MODEL_BOUNDS = (1, 2, 3, 4, 7, 8, 12, 16, 24, 32, 64, 256, 1024, 4096)


# A cell whose forward loses keeps the built-in's forward and takes our gradients (mark
# 'F', dispatch.GRADIENTS) where every mode with gradients, measured with our forward, won
# by at least SPLIT_MIN: with the built-in's faster forward in its place each of them is
# faster still (the gradient products do not read the forward's output). The 10% covers
# the Pair op the split gives up (its two gradient products run as separate ops) and noise.
SPLIT_MIN = 1.1
GRADIENT_MODES = ("fwd_bwd", "fwd_da", "fwd_db")


def _scores(r):
    """A row's (worst, forward, worst with gradients) ratios; 0 without gradient modes."""
    return (_worst(r), r.get("fwd", np.inf),
            min((r[k] for k in GRADIENT_MODES if k in r), default=0.0))


def noise_floor(controls):
    ratios = [r[k] for r in controls for k in MODES if k in r]
    return min(NEAR, float(np.percentile(ratios, 10))) if ratios else NEAR


def fit_model(rows, bounds, floor):
    """{dtype name: the cells where the built-in wins, and those where only its forward
    does (SPLIT_MIN), in dispatch.encode_cells' form}, from the forced-kernel rows of one
    family's model grid. A cell's scores (_scores) are its points' lowest; a cell without a
    point takes the geometric mean of the scores of the nearest measured cells (in size
    classes), i.e. it is interpolated between them, and is never split: the nearest cells
    of a product beyond the grid are smaller products, whose gradients say nothing of it."""
    import itertools

    out = {}
    for dtype in sorted({r["dtype"] for r in rows if r.get("point")}):
        scores = {}
        for r in rows:
            if r.get("point") and r["dtype"] == dtype:
                cell = tuple(dispatch.size_class(s, bounds) for s in r["point"])
                scores[cell] = tuple(map(min, scores.get(cell, (np.inf,) * 3), _scores(r)))
        builtin, forward = set(), set()
        for cell in itertools.product(range(len(bounds) + 1), repeat=3):
            score, measured = scores.get(cell), cell in scores
            if score is None:
                dist = {c: sum(abs(i - j) for i, j in zip(c, cell)) for c in scores}
                nearest = [scores[c] for c in scores if dist[c] == min(dist.values())]
                score = [float(np.exp(np.mean(np.log(np.maximum(v, 1e-9)))))
                         for v in zip(*nearest)]
            worst, fwd, gradients = score
            if worst < floor:
                builtin.add(cell)
                if measured and fwd < floor and gradients >= SPLIT_MIN:
                    forward.add(cell)
        out[dtype] = dispatch.encode_cells(builtin, len(bounds) + 1, forward)
    return out


def write_model(rows, controls, path, command, stamp=None):
    """Rewrites this CPU class's entry of the model file for the product families of the
    forced-kernel rows, from them and the controls measured with them. Cut at MODEL_BOUNDS
    where every family the entry holds is fitted again, else at the entry's own bounds
    (one set of size classes per entry). `stamp` ({family: {date, command, machine,
    tensorflow}}) says when and how each family's rows were measured, by default now."""
    with open(path) as f:
        data = json.load(f)
    old = data["classes"].get(dispatch.isa_class(), {})
    families = sorted({r.get("family", dispatch.DENSE) for r in rows if r.get("point")})
    kept = {f: cells for f, cells in old.get("builtin", {}).items() if f not in families}
    bounds = tuple(old.get("size_bounds", data["size_bounds"])) if kept else MODEL_BOUNDS
    floor = noise_floor(controls)
    ratios = [r[k] for r in controls for k in MODES if k in r] or [np.nan]
    now = {"date": datetime.date.today().isoformat(), "command": command,
           "machine": machine(), "tensorflow": tf.__version__}
    noise = f"{len(controls)} controls {min(ratios):.2f}-{max(ratios):.2f}, floor {floor:.2f}"
    # The entry's top-level stamp is its dense family's; other families carry their own.
    entry = {k: v for k, v in old.items() if k != "builtin"} if kept else {}
    for family in families:
        measured = dict(stamp[family]) if stamp else dict(now)
        if stamp:
            measured["fitted"] = f"{datetime.date.today().isoformat()}: {command}"
        measured["noise"] = noise
        if family == dispatch.DENSE:
            entry.update(measured)
        else:
            entry.setdefault("families", {})[family] = measured
    entry["size_bounds"] = list(bounds)
    entry["builtin"] = dict(kept, **{
        f: fit_model([r for r in rows if r.get("family", dispatch.DENSE) == f], bounds, floor)
        for f in families})
    data["classes"][dispatch.isa_class()] = entry
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


# Where a sweep keeps the rows each CPU class's model was fitted from (saved_models).
MODEL_ROWS = os.path.join("benchmarks", "SWEEP.json")


def saved_models(saved):
    """{CPU class: {"rows", "controls"}}: the forced-kernel rows each class's model was
    fitted from, as a sweep's JSON keeps them (one machine's sweep must not drop another
    class's rows). A file from before the per-class layout holds one class's rows at the
    top level: taken as this machine's."""
    if "models" in saved:
        return saved["models"]
    if not saved.get("model_rows"):
        return {}
    return {dispatch.isa_class(): {"rows": saved["model_rows"],
                                   "controls": saved.get("model_controls", [])}}


def with_new_rows(models, rows, controls, families):
    """saved_models' dict with this CPU class's forced-kernel rows of `families` measured
    again. The rows the shipped model was fitted from stay with it (--refit-model reads
    them): those of the families not measured again, with their controls, and every other
    CPU class's."""
    mine = models.get(dispatch.isa_class(), {"rows": [], "controls": []})
    kept = [r for r in mine["rows"] if r.get("family", dispatch.DENSE) not in families]
    return dict(models, **{dispatch.isa_class(): {
        "rows": kept + list(rows), "controls": (mine["controls"] if kept else []) + list(controls)}})


def save_run(saved, run, new_model_rows=None):
    """Writes a sweep's rows (`run`) to `saved`, and the model rows of every CPU class to
    MODEL_ROWS whatever --out names (a Xeon's run writes SWEEP-xeon.json): --refit-model
    reads them there. new_model_rows: (rows, controls, families) of a --write-model run,
    this CPU class's rows for those families; the other classes' rows are kept."""
    kept = {}
    if os.path.exists(MODEL_ROWS):
        with open(MODEL_ROWS) as f:
            kept = json.load(f)
    models = saved_models(kept)
    if new_model_rows is not None:
        models = with_new_rows(models, *new_model_rows)
    if os.path.abspath(saved) == os.path.abspath(MODEL_ROWS):
        run = dict(run, models=models)
    elif new_model_rows is not None:
        os.makedirs(os.path.dirname(MODEL_ROWS) or ".", exist_ok=True)
        with open(MODEL_ROWS, "w") as f:
            json.dump(dict(kept, models=models), f, indent=0)
    with open(saved, "w") as f:
        json.dump(run, f, indent=0)


def refit_model(sweep_json, path):
    """Fits this CPU class's model again from the forced-kernel rows a --write-model run
    left in sweep_json (after a change of MODEL_BOUNDS or of the fit), measuring nothing."""
    with open(sweep_json) as f:
        mine = saved_models(json.load(f)).get(dispatch.isa_class(), {})
    if not mine.get("rows"):
        raise SystemExit(f"{sweep_json} holds no model rows for CPU class "
                         f"{dispatch.isa_class()}: run --sweep --write-model")
    with open(path) as f:
        old = json.load(f)["classes"].get(dispatch.isa_class(), {})
    # Each family keeps its own stamp (the dense one is the entry's top level).
    stamp = {}
    for family in {r.get("family", dispatch.DENSE) for r in mine["rows"]}:
        source = old.get("families", {}).get(family, old)
        stamp[family] = {k: source[k] for k in ("date", "command", "machine", "tensorflow")
                         if k in source}
    write_model(mine["rows"], mine["controls"], path,
                "python -m tf_smallmm.bench --refit-model", stamp=stamp)


# --------------------------------------------------------------------------- report
def machine():
    """The CPU's model name, cores and the model's CPU class."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, CPU class {dispatch.isa_class()}"


def interleaved(fns, rounds, seconds=None):
    """Per-round seconds per call of each argument-less fn in `fns`, after two warm-up
    calls each: each round times all of them back to back, so slow phases of a shared
    machine hit every side of a ratio alike. The order is shuffled each round (seeded):
    what ran just before decides how much of an operand is still cached, and a rotating
    order would keep each fn behind the same neighbour. Each timing repeats its fn for
    about `seconds` (default TIMING_S; 0: one call)."""
    for _ in range(2):
        for fn in fns:
            fn()
    one = max(max(_seconds(fn, (), 1) for fn in fns), 1e-7)
    reps = max(1, int((TIMING_S if seconds is None else seconds) / one))
    times = [[] for _ in fns]
    order = np.random.default_rng(len(fns))
    for _ in range(rounds):
        for k in order.permutation(len(fns)):
            times[k].append(_seconds(fns[k], (), reps))
    return [np.array(t) for t in times]


# Steps each tf.function call of a ×floor timing runs (in_one_call). A tf.function call
# has a cost of its own, which a training step pays once however many ops it holds: for a
# ×floor figure that bounds one op, it is spread over several. Here it is large and grows
# with the output (2026-12-06, AMD EPYC, 2 cores, interleaved): a call of x * 1.5 on 10
# floats 0.26 ms; on 32 MB 2.64-2.95 ms a call, 1.87-2.07 ms each four to a call; batched
# 16×16 matmul (32 MB out) 3.12 against 2.13 ms, the capsule forward (37 MB) 2.19-2.53
# against 1.76-1.97 ms. Counted once per call, it made the x * 1.5 probe slower and pulled
# every ×floor figure towards 1.
IN_ONE_CALL = 4

FLOOR_METHOD = (f"each timing runs the step {IN_ONE_CALL} times in one tf.function call, one "
                f"after another on copies of its inputs, and counts 1/{IN_ONE_CALL} of it (a "
                f"call's own overhead is paid once per training step, however many ops the "
                f"step holds); the "
                "floor is the time the hardware takes to move the same bytes, measured in "
                "the same rounds: the faster of a NumPy copy of half of them (glibc's memcpy "
                "writes copies this large with non-temporal stores: read the source, write "
                "the destination) and TF's x * 1.5 on a third of them (read the source, read "
                "the destination for ownership, write it; run like the steps), and never "
                "less than the time the bytes the step writes take to write alone "
                "(non-temporal stores from every core, _smallmm_core.stream_fill): on some "
                "machines writing alone is slower than reading and writing as many bytes")


def in_one_call(step, args, k=IN_ONE_CALL):
    """An argument-less function that runs step k times in one tf.function call, each after
    the one before (control dependencies), returning every result. Each step reads its own
    copy of `args` (as separate calls would find the last call's inputs evicted by what ran
    between them, not in the cache) through its own placeholders (so that no graph pass
    merges the steps)."""
    per_step = [tuple(tf.constant(t.numpy()) for t in args) for _ in range(k)]

    @tf.function
    def run(*flat):
        outs = []
        for i in range(k):
            with tf.control_dependencies(tf.nest.flatten(outs[-1:])):
                outs.append(step(*flat[i * len(args):(i + 1) * len(args)]))
        return outs

    return functools.partial(run, *[t for step_args in per_step for t in step_args])


def _probe_threads():
    """Threads of the write probe: as many as TensorFlow's ops run on."""
    return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1


def timed_with_floor(steps, moved, rounds, written=0):
    """interleaved() of `steps` (argument-less functions, each made by in_one_call: their
    times are divided by IN_ONE_CALL) and of the probes that bound a step moving `moved`
    bytes, of which it writes `written`: (the times of each step, the floor time of each
    round: the faster of the two probes that move `moved` bytes, or the write probe of
    `written` bytes where that is slower; see FLOOR_METHOD)."""
    src = np.ones(moved // 8, np.float32)  # a memcpy moves twice its size
    dst = np.empty_like(src)
    x = tf.ones([moved // 12])  # x * 1.5 moves three times its size
    # not x + 0: grappler folds that to an identity
    scale = in_one_call(tf.function(lambda x: x * 1.5), (x,))
    probes = [lambda: np.copyto(dst, src), scale]
    if written:
        core = loader.core_module()
        if core is None:
            raise RuntimeError("the write probe needs tf_smallmm._smallmm_core, which this "
                               "build lacks")
        out = np.empty(written // 4, np.float32)
        threads = _probe_threads()
        probes.append(lambda: core.stream_fill(out, 1.0, threads))
    timed = interleaved([*steps, *probes], rounds)
    n = len(steps)
    floor = np.minimum(timed[n], timed[n + 1] / IN_ONE_CALL)
    if written:
        floor = np.maximum(floor, timed[n + 2])
    return [t / IN_ONE_CALL for t in timed[:n]], floor


def roofline(rounds, quick):
    """Batched n×n @ n×n forward, ~8M elements per operand: our time over the bandwidth
    floor, timed in the same rounds as ours (see FLOOR_METHOD)."""
    out = []
    for n in [2, 4, 8, 16, 32] if quick else [2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32]:
        count = max(1, 8_000_000 // (n * n))
        a, b = _tensor((count, n, n), tf.float32, 1), _tensor((count, n, n), tf.float32, 2)
        # Two-argument functions on both sides, like the floor's probe: tf.function binds
        # each call's arguments to the wrapped signature in Python, and matmul's ten
        # parameters cost ~0.3 ms a call more than a lambda's two (1×2×2 operands, 300
        # interleaved calls, two runs: tf.function(tf.linalg.matmul) 0.56-0.59 ms, of
        # lambda a, b: tf.linalg.matmul(a, b) 0.25-0.26 ms, ours alike; AMD EPYC, TF 2.21,
        # 2026-12-05), time the op itself does not take.
        ours = tf.function(lambda a, b: smm.matmul(a, b))
        base = tf.function(lambda a, b: tf.linalg.matmul(a, b))
        moved = 3 * count * n * n * 4  # read A and B, write C
        (t_ours, t_base), t_floor = timed_with_floor(
            [in_one_call(ours, (a, b)), in_one_call(base, (a, b))], moved, rounds,
            written=moved // 3)
        out.append({"n": n, "count": count, "ours_ms": 1e3 * np.median(t_ours),
                    "floor_ms": 1e3 * np.median(t_floor),
                    "floor_gbs": moved / np.median(t_floor) / 1e9,
                    "x_floor": float(np.median(t_ours / t_floor)),
                    "vs_builtin": float(np.median(t_base / t_ours))})
    return out


def _ratio(v):
    return "" if v is None else f"{v:.2f}"


def _path(r):
    if "kernel" not in r:
        return "eager"
    if r["branch"]:
        return "run-time branch"
    if r.get("gradients"):
        return "built-in, SmallMM gradients"
    return "SmallMM" if r["kernel"] else "built-in"


def _worst(r):
    return min(r.get(k, np.inf) for k in MODES)


TABLE_HEAD = ("| group | case | dtype | path | fwd × | fwd+bwd × | dA only × | dB only × "
              "| eager × | first × |")


def markdown(rows, controls, roof, args, seconds, image):
    cases = [r for r in rows if r["group"] != "control"]
    spread = [r[k] for r in controls for k in MODES if k in r]
    lo, hi = (min(spread), max(spread)) if spread else (float("nan"), float("nan"))
    below = [r for r in cases if _worst(r) < FLOOR_TARGET]
    rechecked = [r for r in cases if "first" in r]
    on_ours = [r for r in cases if r.get("kernel") or r.get("branch") or r.get("gradients")]
    same_ops = [r for r in cases
                if "kernel" in r and not (r["kernel"] or r["branch"] or r.get("gradients"))]
    # The command as run: --family and --only leave cases out of the tables.
    family, only, out = (getattr(args, a, None) for a in ("family", "only", "out"))
    cmd = "python -m tf_smallmm.bench --sweep" + (" --quick" if args.quick else "") + \
        (" --write-model" if getattr(args, "write_model", False) else "") + \
        (f" --family {family}" if family else "") + \
        (f" --only {shlex.quote(only)}" if only else "") + (f" --out {out}" if out else "")
    lines = [
        "# Sweep: every drop-in against the built-in it replaces",
        "",
        (f"`{cmd}` on {datetime.date.today().isoformat()}, {seconds / 60:.0f} min: "
         f"{machine()}, TensorFlow {tf.__version__}, SmallMM ISA "
         f"{smm.build_info()['active_isa']}, dispatch model {_model_stamp()}."),
        "",
        ("Each figure is the built-in's time / ours (above 1: ours is faster): the median "
         "over rounds of paired, interleaved timings in one process (each round times both "
         "sides back to back, in an order shuffled each round), both sides in tf.function; "
         "forward = y, forward+backward = y and the gradients for both inputs from "
         "GradientTape.gradient with a fixed upstream gradient; 'dA only' / 'dB only' = y "
         "and the gradient of that input alone (the other not watched: a model's input, a "
         "frozen weight), for cases with a weight. Eager cases call both sides "
         "directly. 'path' is what our side ran: SmallMM, the built-in (the dispatch model's "
         "choice), the built-in's forward with SmallMM gradients (the model's choice where "
         "only our gradients win), or a run-time branch between SmallMM and the built-in "
         "(sizes unknown at trace time)."),
        "",
        (f"Noise: {len(controls)} controls (the built-in against itself) ranged "
         f"{lo:.2f}–{hi:.2f}. {len(rechecked)} cases below {FLOOR_TARGET} were measured "
         f"again with three times the rounds (the tables "
         f"give the second measurement; 'first ×' the first pass's worst ratio). Below "
         f"{FLOOR_TARGET} after that: {len(below)} of {len(cases)} cases: "
         f"{sum(r in below for r in on_ours)} of the {len(on_ours)} that run SmallMM ops "
         f"(or a run-time branch, or SmallMM gradients), {sum(r in below for r in same_ops)} of the "
         f"{len(same_ops)} that the dispatch sends to the built-in (the same ops on both "
         f"sides: noise), {sum('kernel' not in r and r in below for r in cases)} of the "
         f"{sum('kernel' not in r for r in cases)} eager calls."),
        "",
        *([f"![speed-up heatmaps]({image})", ""] if image else []),
        "## Worst cases",
        "",
        TABLE_HEAD,
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    def row(r):
        return (f"| {r['group']} | {r['case']} | {r['dtype']} | {_path(r)} | "
                f"{_ratio(r.get('fwd'))} | {_ratio(r.get('fwd_bwd'))} | "
                f"{_ratio(r.get('fwd_da'))} | {_ratio(r.get('fwd_db'))} | "
                f"{_ratio(r.get('eager'))} | "
                f"{_ratio(_worst(r['first'])) if 'first' in r else ''} |")

    lines += [row(r) for r in sorted(cases, key=_worst)[:15]]
    lines += ["", "## By group", "", "| group | cases | on SmallMM | min × | median × |",
              "|---|---:|---:|---:|---:|"]
    for group in dict.fromkeys(r["group"] for r in cases):
        sel = [r for r in cases if r["group"] == group]
        worst = [_worst(r) for r in sel]
        lines.append(f"| {group} | {len(sel)} | {sum(bool(r.get('kernel')) for r in sel)} | "
                     f"{min(worst):.2f} | {np.median(worst):.2f} |")
    if roof:
        lines += ["", "## Batched n×n matmul against the memory-bandwidth floor", "",
                  (f"Forward, ~8M elements per operand, float32: A and B read, C written. "
                   f"Each figure is the median over rounds that time ours, tf.matmul and "
                   f"the floor back to back, each a tf.function of two arguments; "
                   f"{FLOOR_METHOD}. 'floor GB/s' is the bandwidth that floor stands for."),
                  "",
                  ("| n | batch | ours ms | floor ms | floor GB/s | ours ×floor | "
                   "tf.matmul / ours |"),
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['n']} | {r['count']} | {r['ours_ms']:.2f} | {r['floor_ms']:.2f} | "
                  f"{r['floor_gbs']:.1f} | {r['x_floor']:.2f} | {r['vs_builtin']:.2f} |"
                  for r in roof]
    lines += ["", "## Every case", "",
              TABLE_HEAD, "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [row(r) for r in cases]
    lines += ["", "Controls:", "", "| case | fwd × | fwd+bwd × | dA only × | dB only × |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {_ratio(r.get('fwd'))} | {_ratio(r.get('fwd_bwd'))} | "
              f"{_ratio(r.get('fwd_da'))} | {_ratio(r.get('fwd_db'))} |" for r in controls]
    return "\n".join(lines) + "\n"


def _model_stamp():
    data = dispatch.model()
    entry = data["classes"].get(dispatch._measured_class(dispatch.isa_class(), data["classes"]))
    if not entry:
        return f"not measured for {dispatch.isa_class()} (default size rule)"
    return f"of {entry['date']} ({entry['machine']})"


def heatmap(rows, path):
    """Speed-up of the wrapper over M×K, one panel per (dtype, N): the worse of forward
    and forward+backward, on a log colour scale centred on 1. Whether it drew one (rows
    of the dense grid, and matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        print("matplotlib not installed: no heatmap")
        return False
    grid_rows = [r for r in rows if r.get("point") and max(r["point"]) <= max(SIZES)
                 and r.get("family", dispatch.DENSE) == dispatch.DENSE]
    panels = sorted({(r["dtype"], r["point"][1]) for r in grid_rows},
                    key=lambda p: ([d.name for d in DTYPES].index(p[0]), p[1]))
    if not panels:
        return False
    cols = max(sum(1 for p in panels if p[0] == d) for d in {p[0] for p in panels})
    dtypes = list(dict.fromkeys(p[0] for p in panels))
    fig, axes = plt.subplots(len(dtypes), cols, figsize=(3.2 * cols, 3.0 * len(dtypes)),
                             squeeze=False, layout="constrained")
    norm = LogNorm(vmin=0.25, vmax=4)
    image = None
    for i, dtype in enumerate(dtypes):
        ns = [p[1] for p in panels if p[0] == dtype]
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(ns):
                ax.axis("off")
                continue
            sel = [r for r in grid_rows if r["dtype"] == dtype and r["point"][1] == ns[j]]
            ms = sorted({r["point"][0] for r in sel})
            ks = sorted({r["point"][2] for r in sel})
            z = np.full((len(ms), len(ks)), np.nan)
            for r in sel:
                z[ms.index(r["point"][0]), ks.index(r["point"][2])] = _worst(r)
            image = ax.imshow(z, cmap="RdYlGn", norm=norm, origin="lower", aspect="auto")
            ax.set_xticks(range(len(ks)), [str(k) for k in ks], fontsize=6)
            ax.set_yticks(range(len(ms)), [str(m) for m in ms], fontsize=6)
            ax.set_title(f"{dtype}, N = {ns[j]}", fontsize=8)
            if j == 0:
                ax.set_ylabel("M", fontsize=7)
            ax.set_xlabel("K", fontsize=7)
            for (y, x), v in np.ndenumerate(z):
                if not np.isnan(v) and v < FLOOR_TARGET:
                    ax.text(x, y, "×", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="built-in time / ours (worse of fwd, "
                 "fwd+bwd); × below 0.95")
    fig.suptitle(f"tf_smallmm drop-ins vs TF built-ins, TF {tf.__version__}, {machine()}",
                 fontsize=9)
    fig.savefig(path, dpi=90)
    return True


# --------------------------------------------------------------------------- running

def run_cases(cases, rounds, controls_every=0, reuse=None, model=False):
    """Rows and control rows of `cases`; a case in `reuse` (by label and dtype) takes that
    row instead of being measured again. model: the model's forced-kernel rows (measure)."""
    rows, controls = [], []
    for i, case in enumerate(cases):
        try:
            r = (reuse or {}).get((case.label, case.dtype.name)) or measure(case, rounds, model)
        except (tf.errors.OpError, ValueError, TypeError) as e:
            print(f"  {case.label} ({case.dtype.name}): skipped ({type(e).__name__}: {e})")
            continue
        rows.append(r)
        print(f"  {r['group']:<14} {r['case']:<58} {r['dtype']:<10} {_path(r):<16} "
              + " ".join(f"{k} {r[k]:.2f}" for k in MODES if k in r), flush=True)
        if controls_every and i % controls_every == 0 and not case.eager:
            controls.append(control(case, rounds))
    return rows, controls


def recheck(cases, rows, rounds):
    """Rows below FLOOR_TARGET measured again with `rounds` rounds (a case lands there by
    a loss of ours or by a burst of load from other processes on a shared machine, which
    also moves the controls by ±10%): the row keeps the second measurement, and the first
    under "first" (both are reported)."""
    by_label = {(c.label, c.dtype.name): c for c in cases}
    out = []
    for r in rows:
        case = by_label.get((r["case"], r["dtype"]))
        if case is not None and _worst(r) < FLOOR_TARGET:
            again = measure(case, rounds)
            again["first"] = {k: r[k] for k in MODES if k in r}
            print(f"  recheck {r['case']} ({r['dtype']}): "
                  + " ".join(f"{k} {r[k]:.2f} -> {again[k]:.2f}" for k in again["first"]),
                  flush=True)
            r = again
        out.append(r)
    return out


def main(args):
    t0 = time.perf_counter()
    rounds = args.repeats or (7 if args.quick else 11)
    family = getattr(args, "family", None) or "all"
    model_grid = (grid(args.quick) if family in ("all", dispatch.DENSE) else []) + \
        (shared_grid(args.quick) if family in ("all", dispatch.SHARED) else []) + \
        (tall_grid(args.quick) if family in ("all", dispatch.TALL) else [])
    measured = {r.family for r in model_grid}
    if args.only:
        model_grid = [c for c in model_grid if args.only in c.label]
    reuse, forced, forced_controls = {}, [], []
    if args.write_model:
        print("model grid, our kernels forced:", flush=True)
        with dispatch.kernels_everywhere():
            forced, forced_controls = run_cases(model_grid, rounds,
                                                controls_every=25 if args.quick else 40,
                                                model=True)
        path = dispatch._MODEL_PATH
        write_model(forced, forced_controls, path,
                    "python -m tf_smallmm.bench --sweep --write-model"
                    + (" --quick" if args.quick else "")
                    + (f" --family {args.family}" if args.family else ""))
        dispatch.model.cache_clear()
        dispatch._table.cache_clear()
        dispatch._model_choice.cache_clear()
        print(f"wrote {path}", flush=True)
        # Where the new model keeps our kernels, the wrapper runs what was just measured
        # (against what the table compares with: not where that was model_builtin).
        apart = {(c.label, c.dtype.name) for c in model_grid if c.model_builtin is not None}
        reuse = {(r["case"], r["dtype"]): r for r in forced
                 if dispatch.choose(tf.as_dtype(r["dtype"]), *r["point"], r["family"])
                 == dispatch.KERNEL and (r["case"], r["dtype"]) not in apart}
    cases = model_grid + variants(args.quick) + equations(args.quick) + \
        unknown_batch(args.quick) + eager_cases()
    if args.only:
        cases = [c for c in cases if args.only in c.label]
    rows, controls = run_cases(cases, rounds, controls_every=25 if args.quick else 40,
                               reuse=reuse)
    rows = recheck(cases, rows, 3 * rounds)
    roof = [] if args.only else roofline(rounds, args.quick)
    out = args.out or os.path.join("benchmarks", "SWEEP-quick.md" if args.quick else "SWEEP.md")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    image = os.path.splitext(out)[0] + ".png"
    drawn = heatmap(rows, image)  # (a run without the dense grid has no figure)
    with open(out, "w") as f:
        f.write(markdown(rows, controls, roof, args, time.perf_counter() - t0,
                         os.path.basename(image) if drawn else None))
    save_run(os.path.splitext(out)[0] + ".json",
             {"rows": rows, "controls": controls, "roofline": roof},
             (forced, forced_controls, measured) if args.write_model else None)
    print(f"wrote {out}")
