"""`python -m tf_smallmm.bench`: SmallMM against every built-in way to do the same work.

For each case, in one run: our function and the TF built-ins (tf.einsum, tf.matmul, the
classic tile-then-matmul, tf.linalg.matvec, tf_keras batch_dot, multiply-then-reduce), the
best of them and ours under tf.function(jit_compile=True), forward and forward+backward (the step
returns y *and* the gradients for a fixed upstream gradient, so nothing is dead-code-eliminated
and no loss op is timed). Reports the
median time after warm-up, the peak extra memory of the forward+backward step, and the
fraction of this machine's bandwidth floor: the time the hardware takes to move the
minimum bytes the case must move (inputs and output once forward; forward + read upstream
gradient and inputs, write both gradients backward), timed in the same rounds as ours.

    python -m tf_smallmm.bench                  # full suite -> benchmarks/RESULTS.md + .png
    python -m tf_smallmm.bench --quick          # a subset, under two minutes
    python -m tf_smallmm.bench --sweep          # every drop-in vs its built-in over a grid of
                                                # small products -> benchmarks/SWEEP.md
    python -m tf_smallmm.bench --quick --only routings   # the CapsNet digit-caps step only
    python -m tf_smallmm.bench --xla            # ours under XLA vs XLA's own and ours without

Every run also repeats our own steps in a second process with one intra-op thread and
reports the speed-up from using all cores (--no-scaling skips it).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

import tf_smallmm as smm
from tf_smallmm._core import dispatch
from tf_smallmm.capsules import routing
from tf_smallmm.tools import sweep

MiB = 1 << 20


# --------------------------------------------------------------------------- measuring
def _fetch(x):
    # Wait for the work without copying the result out (a .numpy() of a 37 MB output
    # would add its own copy to every timing): CPU ops run synchronously; GPU streams are
    # synchronised explicitly.
    del x
    sync = getattr(getattr(tf.test, "experimental", None), "sync_devices", None)
    if sync is not None and tf.config.list_logical_devices("GPU"):
        sync()


# Warm-up before each timing, after the first call (which traces): calls for at least this
# long, two at least. After tracing, the first ~40 calls of the capsule step took 2.7-2.9
# ms and the rest 1.7 (float32 forward, the first case of a run; 2026-12-05, AMD EPYC, no
# page faults in either phase): with two warm-up calls RESULTS.md's first row, tf_smallmm's,
# took its median from them.
WARMUP_S = 0.25


def median_ms(fn, args, repeats, min_seconds=0.0):
    """Median wall time of fn(*args) in ms after warm-up (WARMUP_S; devices synced)."""
    _fetch(fn(*args))  # traces
    t_warm = time.perf_counter() + WARMUP_S
    _fetch(fn(*args))
    while time.perf_counter() < t_warm:
        _fetch(fn(*args))
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        _fetch(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return 1e3 * float(np.median(times))


def peak_extra_mib(fn, args):
    """Peak CPU allocator memory during one call, above what was allocated before it."""
    try:
        _fetch(fn(*args))
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        out = fn(*args)
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        _fetch(out)
        return (peak - before) / MiB
    except (ValueError, tf.errors.OpError):
        return float("nan")


# --------------------------------------------------------------------------- cases
def _nbytes(*ts):
    return sum(int(np.prod(t.shape)) * t.dtype.size for t in ts)


class Case:
    """Inputs a, b; implementations name -> f(a, b) that all return the same tensor."""

    def __init__(self, name, a, b, impls, ours, xla_candidates, eager=()):
        self.name, self.a, self.b, self.eager = name, a, b, tuple(eager)
        self.impls, self.ours, self.xla = impls, ours, xla_candidates
        y = impls[ours](a, b)
        self.y_shape, self.dtype = y.shape, y.dtype
        self.g = tf.ones_like(y)  # the fixed upstream gradient of the forward+backward step
        self.fwd_bytes = _nbytes(a, b, y)
        self.bwd_bytes = self.fwd_bytes + _nbytes(y, a, b, a, b)
        # Of them written: y; y and both gradients.
        self.fwd_written = _nbytes(y)
        self.bwd_written = _nbytes(y, a, b)


def _keras_backend():
    try:
        import tf_keras

        return tf_keras.backend
    except ImportError:
        return None


def capsule_case(dtype, batch=50):
    w = tf.cast(tf.random.normal([1152, 10, 16, 8], seed=1), dtype)
    u = tf.cast(tf.random.normal([batch, 1152, 8], seed=2), dtype)

    def via(mm):
        def f(w, u):
            y = mm(tf.reshape(w, [1152, 160, 8]), u[..., None])
            return tf.reshape(y, [-1, 1152, 10, 16])
        return f

    def tiled(w, u):  # the classic CapsNet formulation: W copied per batch row
        b = tf.shape(u)[0]
        wt = tf.tile(w[None], [b, 1, 1, 1, 1])
        ut = tf.tile(u[:, :, None, :, None], [1, 1, 10, 1, 1])
        return tf.squeeze(tf.matmul(wt, ut), -1)

    impls = {
        "tf_smallmm": lambda w, u: smm.capsule_predict(w, u),
        "tf.einsum": lambda w, u: tf.einsum("ijkl,bil->bijk", w, u),
        "tf.matmul (broadcast)": via(tf.linalg.matmul),
        "tf.matmul (tiled)": tiled,
        "multiply+reduce_sum": lambda w, u: tf.reduce_sum(w[None] * u[:, :, None, None, :], -1),
    }
    return Case(f"capsule W[1152,10,16,8] u[{batch},1152,8]", w, u, impls, "tf_smallmm",
                ["tf.einsum", "tf.matmul (broadcast)", "multiply+reduce_sum"])


def routing_case(dtype, batch=50, routings=3):
    """CapsNet's digit-caps step: û = W·u, then `routings` iterations of routing-by-agreement.
    Ours: the SmallMM product + the fused routing op (and their gradient ops); the others:
    the same layer in TF ops (capsules.dynamic_routing_reference) after each prediction."""
    w = tf.cast(tf.random.normal([1152, 10, 16, 8], seed=1), dtype)
    u = tf.cast(tf.random.normal([batch, 1152, 8], seed=2), dtype)

    def routed(predict):
        return lambda w, u: routing.dynamic_routing_reference(predict(w, u), routings)

    def broadcast_matmul(w, u):
        y = tf.linalg.matmul(tf.reshape(w, [1152, 160, 8]), u[..., None])
        return tf.reshape(y, [-1, 1152, 10, 16])

    impls = {
        "tf_smallmm": lambda w, u: routing.dynamic_routing(smm.capsule_predict(w, u), routings),
        "tf.einsum + TF ops": routed(lambda w, u: tf.einsum("ijkl,bil->bijk", w, u)),
        "tf.matmul (broadcast) + TF ops": routed(broadcast_matmul),
    }
    return Case(f"digit caps W[1152,10,16,8] u[{batch},1152,8] + {routings} routings", w, u,
                impls, "tf_smallmm", ["tf.einsum + TF ops"])


def matvec_case(count, n, dtype):
    a = tf.cast(tf.random.normal([count, n, n], seed=3), dtype)
    x = tf.cast(tf.random.normal([count, n], seed=4), dtype)
    impls = {
        # Every implementation is a two-argument function: tf.function's per-call
        # argument binding costs more for a long signature (tf.linalg.matvec's seven
        # parameters: ~0.1 ms), which would swamp the 900-matvec case.
        "tf_smallmm": lambda a, x: smm.matvec(a, x),
        "tf.linalg.matvec": lambda a, x: tf.linalg.matvec(a, x),
        "tf.einsum": lambda a, x: tf.einsum("bij,bj->bi", a, x),
        "tf.matmul": lambda a, x: tf.squeeze(tf.linalg.matmul(a, x[..., None]), -1),
    }
    kb = _keras_backend()
    if kb is not None:
        impls["keras batch_dot"] = lambda a, x: kb.batch_dot(a, x, axes=(2, 1))
    return Case(f"matvec {count}x({n}x{n})", a, x, impls, "tf_smallmm",
                ["tf.linalg.matvec", "tf.einsum"],
                eager=["tf_smallmm", "tf.linalg.matvec", "tf.matmul"] if count < 10_000 else ())


def matmul_case(m, k, n, dtype, elements=8_000_000):
    count = max(1, elements // max(m * k, k * n))
    a = tf.cast(tf.random.normal([count, m, k], seed=5), dtype)
    b = tf.cast(tf.random.normal([count, k, n], seed=6), dtype)
    impls = {
        "tf_smallmm": lambda a, b: smm.matmul(a, b),  # two-argument: see matvec_case
        "tf.matmul": lambda a, b: tf.linalg.matmul(a, b),
        "tf.einsum": lambda a, b: tf.einsum("bij,bjk->bik", a, b),
    }
    kb = _keras_backend()
    if kb is not None:
        impls["keras batch_dot"] = lambda a, b: kb.batch_dot(a, b, axes=(2, 1))
    return Case(f"matmul {count}x({m}x{k} @ {k}x{n})", a, b, impls, "tf_smallmm",
                ["tf.matmul", "tf.einsum"])


def steps(fn, g, jit=False):
    """The forward step and the forward+backward step: y and both gradients for the fixed
    upstream gradient g (no loss op, whose own reads and writes are not the product's)."""
    fwd = tf.function(fn, jit_compile=jit or None)

    @tf.function(jit_compile=jit or None)
    def fwd_bwd(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = fn(a, b)
        return (y, *tape.gradient(y, [a, b], output_gradients=g))

    return fwd, fwd_bwd


# --------------------------------------------------------------------------- running
def run_case(case, repeats, ours_only=False):
    rows = []
    impls = dict(case.impls)
    for name in case.xla + [case.ours]:
        impls[f"XLA: {name}"] = (case.impls[name], True)
    if ours_only:
        impls = {case.ours: impls[case.ours]}
    for name, impl in impls.items():
        fn, jit = impl if isinstance(impl, tuple) else (impl, False)
        fwd, fwd_bwd = steps(fn, case.g, jit)
        try:
            t_f = median_ms(fwd, (case.a, case.b), repeats)
            t_fb = median_ms(fwd_bwd, (case.a, case.b), repeats)
            mem = float("nan") if ours_only else peak_extra_mib(fwd_bwd, (case.a, case.b))
        except (tf.errors.OpError, ValueError, TypeError) as e:  # e.g. no bf16 kernel
            print(f"  {name}: skipped ({type(e).__name__})")
            continue
        row = {"impl": name, "fwd": t_f, "fwd_bwd": t_fb, "mem": mem}
        if name == case.ours:  # did the dispatch policy choose our kernels?
            ours_steps = fwd, fwd_bwd
            graph = fwd.get_concrete_function(case.a, case.b).graph
            row["engine"] = any(op.type.startswith("SmallMM") for op in graph.get_operations())
        rows.append(row)
        print(f"  {name:<28} fwd {t_f:8.2f} ms   fwd+bwd {t_fb:8.2f} ms   peak +{mem:7.1f} MiB",
              flush=True)
    # Per-call overhead without tf.function, for the cases small enough that it dominates.
    eager = {name: median_ms(case.impls[name], (case.a, case.b), repeats, min_seconds=0.5)
             for name in case.eager}
    # The floors, timed in the same rounds as our steps (sweep.FLOOR_METHOD).
    floor_ms = {"fwd": float("nan"), "fwd_bwd": float("nan")}
    ours = next(r for r in rows if r["impl"] == case.ours)
    if not ours_only:
        for step, moved, written, key in zip(ours_steps, (case.fwd_bytes, case.bwd_bytes),
                                              (case.fwd_written, case.bwd_written), floor_ms):
            run = sweep.in_one_call(step, (case.a, case.b))
            (t,), floor = sweep.timed_with_floor(
                [lambda run=run: _fetch(run())], moved, repeats, written)
            ours[f"x_floor_{key}"] = float(np.median(t / floor))
            floor_ms[key] = 1e3 * float(np.median(floor))
    ours_xla = next((r for r in rows if r["impl"] == f"XLA: {case.ours}"), None)
    xla = [r for r in rows if r["impl"].startswith("XLA") and r is not ours_xla]
    builtin = [r for r in rows if r["impl"] != case.ours and not r["impl"].startswith("XLA")]
    out_bytes = _nbytes(case.a, case.b) + int(np.prod(case.y_shape)) * case.dtype.size
    return {"case": case.name, "dtype": case.dtype.name, "rows": rows, "eager": eager,
            "floor_fwd": floor_ms["fwd"], "floor_fwd_bwd": floor_ms["fwd_bwd"], "ours": ours,
            "best_builtin": min(builtin, key=lambda r: r["fwd"]) if builtin else None,
            "best_builtin_fb": min(builtin, key=lambda r: r["fwd_bwd"]) if builtin else None,
            "best_xla": min(xla, key=lambda r: r["fwd"]) if xla else None,
            "best_xla_fb": min(xla, key=lambda r: r["fwd_bwd"]) if xla else None,
            "ours_xla": ours_xla,
            "out_mib": out_bytes / MiB}


def cases(quick):
    out = [lambda: capsule_case(tf.float32), lambda: routing_case(tf.float32),
           lambda: routing_case(tf.float32, batch=1)]
    sizes = [2, 8, 32] if quick else [2, 3, 4, 5, 6, 7, 8, 16, 20, 32]
    out += [lambda n=n: matmul_case(n, n, n, tf.float32) for n in sizes]
    out += [lambda: matvec_case(900, 20, tf.float32), lambda: matvec_case(100_000, 20, tf.float32)]
    if not quick:
        out += [lambda: matmul_case(16, 8, 1, tf.float32),
                lambda: matmul_case(8, 8, 64, tf.float32),
                lambda: capsule_case(tf.bfloat16), lambda: matmul_case(8, 8, 8, tf.bfloat16),
                lambda: routing_case(tf.float32, batch=8), lambda: routing_case(tf.bfloat16)]
    return out


def markdown(results, args):
    info = smm.build_info()
    lines = [
        "# Benchmark results",
        "",
        (f"`python -m tf_smallmm.bench{' --quick' if args.quick else ''}` on "
         f"{datetime.date.today().isoformat()}: {sweep.machine()}, "
         f"TensorFlow {tf.__version__}, SmallMM ISA {info['active_isa']}. "
         f"Times are medians in ms "
         f"after warm-up, one step per tf.function call; ×floor = time / the floor time of "
         f"the minimum bytes the case moves, 1.0 is the roofline: {sweep.FLOOR_METHOD}; for "
         f"tf_smallmm's rows the median of per-round ratios of those timings, for the others "
         f"their time of one step per call (with the call's own overhead) over the median "
         f"floor. "
         f"'ours ×' = this row's time / tf_smallmm's (above 1: we are faster); "
         f"peak = extra allocator memory of the forward+backward step, which returns y and "
         f"both gradients for a fixed upstream gradient (no loss op)."),
        "",
        ("| case | dtype | implementation | fwd ms | fwd ×floor | fwd+bwd ms | fwd+bwd ×floor | "
         "ours × (fwd) | ours × (fwd+bwd) | peak MiB |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        o = r["ours"]
        for row in r["rows"]:
            lines.append(
                f"| {r['case']} | {r['dtype']} | {row['impl']} | {row['fwd']:.2f} | "
                f"{row.get('x_floor_fwd', row['fwd'] / r['floor_fwd']):.1f} | "
                f"{row['fwd_bwd']:.2f} | "
                f"{row.get('x_floor_fwd_bwd', row['fwd_bwd'] / r['floor_fwd_bwd']):.1f} | "
                f"{row['fwd'] / o['fwd']:.2f} | "
                f"{row['fwd_bwd'] / o['fwd_bwd']:.2f} | {row['mem']:.1f} |")
    lines += ["", "Summary (ours vs the fastest built-in, and vs the fastest XLA variant):", "",
              ("| case | dtype | floor fwd ms | ours fwd ms | best built-in fwd | best XLA fwd | "
               "floor f+b ms | ours f+b ms | best built-in f+b | ours 1 thread fwd / f+b ms | "
               f"{os.cpu_count()} threads vs 1 (fwd / f+b) |"),
              "|---|---|---:|---:|---|---|---:|---:|---|---:|---:|"]
    for r in results:
        o, bb, bx, bf = r["ours"], r["best_builtin"], r["best_xla"], r["best_builtin_fb"]
        one = r.get("one_thread")
        fallback = "" if o.get("engine", True) else " (dispatch: built-in)"
        lines.append(
            f"| {r['case']}{fallback} | {r['dtype']} | {r['floor_fwd']:.2f} | {o['fwd']:.2f} | "
            f"{bb['impl']} {bb['fwd']:.2f} ({bb['fwd'] / o['fwd']:.1f}×) | "
            + (f"{bx['impl'][5:]} {bx['fwd']:.2f} ({bx['fwd'] / o['fwd']:.1f}×)" if bx else "-")
            + f" | {r['floor_fwd_bwd']:.2f} | {o['fwd_bwd']:.2f} | "
            f"{bf['impl']} {bf['fwd_bwd']:.2f} ({bf['fwd_bwd'] / o['fwd_bwd']:.1f}×) | "
            + (f"{one['fwd']:.2f} / {one['fwd_bwd']:.2f} | {one['fwd'] / o['fwd']:.2f}× / "
               f"{one['fwd_bwd'] / o['fwd_bwd']:.2f}× |" if one else "- | - |"))
    xla_rows = [r for r in results if r.get("ours_xla") and r.get("best_xla")]
    if xla_rows:
        lines += ["", ("Under XLA (jit_compile=True): ours vs the fastest XLA-compiled built-in "
                       "(× = its time / ours under XLA), and ours under XLA / ours without XLA:"),
                  "", ("| case | dtype | ours XLA fwd ms | best XLA built-in fwd | "
                       "ours XLA f+b ms | best XLA built-in f+b | ours XLA / ours (fwd / f+b) |"),
                  "|---|---|---:|---|---:|---|---:|"]
        for r in xla_rows:
            ox, o, bx, bxf = r["ours_xla"], r["ours"], r["best_xla"], r["best_xla_fb"]
            lines.append(
                f"| {r['case']} | {r['dtype']} | {ox['fwd']:.2f} | {bx['impl'][5:]} "
                f"{bx['fwd']:.2f} ({bx['fwd'] / ox['fwd']:.1f}×) | {ox['fwd_bwd']:.2f} | "
                f"{bxf['impl'][5:]} {bxf['fwd_bwd']:.2f} "
                f"({bxf['fwd_bwd'] / ox['fwd_bwd']:.1f}×) | "
                f"{ox['fwd'] / o['fwd']:.2f} / {ox['fwd_bwd'] / o['fwd_bwd']:.2f} |")
    eager_rows = [r for r in results if r.get("eager")]
    if eager_rows:
        lines += ["", "Eager calls (no tf.function; per-call overhead dominates), median ms:", "",
                  "| case | dtype | " + " | ".join(eager_rows[0]["eager"]) + " |",
                  "|---|---|" + "---:|" * len(eager_rows[0]["eager"])]
        for r in eager_rows:
            lines.append(f"| {r['case']} | {r['dtype']} | "
                         + " | ".join(f"{v:.3f}" for v in r["eager"].values()) + " |")
    lines += ["", ("'(dispatch: built-in)': the dispatch policy sends this shape to TensorFlow's "
                   "own op (our kernels were slower there when the threshold was measured), so "
                   "'ours' and that op are the same computation and their ratio is run-to-run "
                   "noise.")]
    lines += ["", ("Thread scaling: the 1-thread column is the same step in a separate process "
                   "with TensorFlow's intra-op pool set to one thread. Cases whose time is "
                   "already near the copy-bandwidth floor cannot scale: memory, not arithmetic, "
                   "limits them.")]
    return "\n".join(lines) + "\n"


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    pts = []
    for r in results:
        if r["case"].startswith("matmul") and r["dtype"] == "float32":
            dims = r["case"].split("(")[1].split(" @ ")[0].split("x")
            if dims[0] == dims[1]:
                pts.append((int(dims[0]), r))
    pts.sort(key=lambda p: p[0])
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [p[0] for p in pts]
    ax.plot(n, [r["best_builtin"]["fwd"] / r["ours"]["fwd"] for _, r in pts], "o-",
            label="forward vs best built-in")
    ax.plot(n, [r["best_builtin_fb"]["fwd_bwd"] / r["ours"]["fwd_bwd"] for _, r in pts], "s-",
            label="forward+backward vs best built-in")
    ax.plot(n, [r["best_xla"]["fwd"] / r["ours"]["fwd"] for _, r in pts], "^--",
            label="forward vs best XLA")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("n (batched n×n @ n×n, ~8M elements per operand, float32)")
    ax.set_ylabel("speed-up of tf_smallmm (×)")
    ax.set_title(f"tf_smallmm speed-up, TF {tf.__version__}, {os.cpu_count()} cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def interleaved_ms(fns, args, rounds):
    """Per-round wall times (ms) of one call of each fn(*args) (sweep.interleaved): on a
    shared, noisy machine only times taken side by side compare."""
    names = list(fns)
    times = sweep.interleaved([lambda f=fns[name]: _fetch(f(*args)) for name in names],
                              rounds, seconds=0)
    return {name: 1e3 * t for name, t in zip(names, times)}


def xla_comparison(rounds):
    """Ours under jit_compile=True against XLA's own ops on the same work and against ours
    without XLA, timed interleaved in this process: batched n×n matmul for n = 2..8 and
    the digit-caps step, forward and forward+backward. Returns a markdown table."""
    lines = [("| case | step | ours XLA ms | ours ms | ours XLA / ours | XLA built-ins ms "
              "(their time / ours XLA, median of per-round ratios) | our custom call in HLO |"),
             "|---|---|---:|---:|---:|---|---|"]
    for case in [matmul_case(n, n, n, tf.float32) for n in range(2, 9)] + [
            routing_case(tf.float32)]:
        print(case.name, flush=True)
        impls = {"ours XLA": (case.impls[case.ours], True), "ours": (case.impls[case.ours], False)}
        impls.update({f"XLA: {n}": (case.impls[n], True) for n in case.xla})
        for i, label in enumerate(("fwd", "fwd+bwd")):
            fns = {name: steps(fn, case.g, jit)[i] for name, (fn, jit) in impls.items()}
            ir = fns["ours XLA"].experimental_get_compiler_ir(case.a, case.b)(stage="hlo")
            ours_in_ir = 'custom_call_target="smallmm_' in ir
            t = interleaved_ms(fns, (case.a, case.b), rounds)
            med = {name: float(np.median(v)) for name, v in t.items()}

            def ratio(name, base="ours XLA", t=t):
                return float(np.median(np.array(t[name]) / np.array(t[base])))

            others = ", ".join(f"{n[5:]} {med[n]:.2f} ({ratio(n):.1f}×)" for n in impls
                               if n.startswith("XLA: "))
            lines.append(f"| {case.name} | {label} | {med['ours XLA']:.2f} | {med['ours']:.2f} | "
                         f"{ratio('ours XLA', 'ours'):.2f} | {others} | "
                         f"{ours_in_ir} |")
            print("  " + lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def one_thread(results, args, repeats):
    """Our step again in a fresh process with one intra-op thread (TF fixes its pool size
    at start-up, so this cannot be done in the running process)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "one.json")
        cmd = [sys.executable, "-m", "tf_smallmm.bench", "--ours-only", "--threads", "1",
               "--repeats", str(repeats), "--json", path] + (["--quick"] if args.quick else [])
        if args.only:
            cmd += ["--only", args.only]
        print("1-thread rerun:", " ".join(cmd[1:]), flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(smm.__file__)))]
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if subprocess.run(cmd, env=env, check=False).returncode != 0 or not os.path.exists(path):
            print("1-thread rerun failed: no thread-scaling column")
            return
        with open(path) as f:
            one = {(r["case"], r["dtype"]): r["ours"] for r in json.load(f)}
    for r in results:
        r["one_thread"] = one.get((r["case"], r["dtype"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a subset with fewer repeats")
    p.add_argument("--sweep", action="store_true",
                   help="every drop-in against its built-in over a grid of small products "
                   "-> benchmarks/SWEEP.md (see tf_smallmm/tools/sweep.py)")
    p.add_argument("--write-model", action="store_true",
                   help="with --sweep: first measure our kernels on the model grid and "
                   "rewrite the dispatch model for this CPU class")
    p.add_argument("--family", choices=["dense", "shared", "tall"], default=None,
                   help="with --write-model: measure and refit only this grid (shared: "
                   "the SHARED and FOLDED families; tall: B shared by every matrix of A)")
    p.add_argument("--refit-model", action="store_true",
                   help="fit the dispatch model for this CPU class again from the rows of "
                   "the last --write-model run (benchmarks/SWEEP.json), measuring nothing")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--only", default=None, metavar="TEXT",
                   help="run only the cases whose name contains TEXT (e.g. 'routings')")
    p.add_argument("--threads", type=int, default=None,
                   help="TensorFlow intra-op threads (default: TensorFlow's choice)")
    p.add_argument("--xla", action="store_true",
                   help="only ours under jit_compile vs XLA's own ops and vs ours without XLA "
                        "(batched n×n, n = 2..8, and the digit-caps step), interleaved")
    p.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-scaling", action="store_true",
                   help="skip the 1-thread rerun that gives the thread-scaling column")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/RESULTS.md "
                   "for a full run, benchmarks/RESULTS-quick.md for --quick)")
    args = p.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.refit_model:
        sweep.refit_model(sweep.MODEL_ROWS, dispatch._MODEL_PATH)
        print(f"wrote {dispatch._MODEL_PATH}")
        return
    if args.sweep:
        sweep.main(args)
        return
    repeats = args.repeats or (5 if args.quick else 15)
    if not smm.kernels_loaded():
        raise SystemExit("SmallMM kernels are not loaded: " + str(smm.build_info()["load_error"]))
    if args.xla:
        table = xla_comparison(args.repeats or 15)
        print(table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(f"`python -m tf_smallmm.bench --xla` on {datetime.date.today()}, "
                        f"{os.cpu_count()} cores, TensorFlow {tf.__version__}\n\n" + table)
        return
    results = []
    for make in cases(args.quick):
        case = make()
        if args.only and args.only not in case.name:
            continue
        print(f"{case.name} ({case.dtype.name})", flush=True)
        results.append(run_case(case, repeats, args.ours_only))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: r[k] for k in ("case", "dtype", "ours")} for r in results], f)
        return
    if not args.no_scaling and not args.threads:
        one_thread(results, args, repeats)
    out = args.out or os.path.join("benchmarks", "RESULTS-quick.md" if args.quick else "RESULTS.md")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(markdown(results, args))
    plot(results, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
