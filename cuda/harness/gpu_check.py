"""Correctness and speed of tf_smallmm's CUDA kernels on a real GPU, without TensorFlow.

Run by scripts/gpu_check.sh after it has built the `_smallmm_gpu_harness` extension (the
cuda/ kernels, the engine's planner and cuda/harness/harness_module.cc). It needs PyTorch
with CUDA: tensors cross into the harness as device addresses, and PyTorch gives the
references (float64 / complex128 on the GPU, TF32 off) and the speed baselines
(torch.matmul, torch.bmm = cuBLAS batched, torch.einsum).

    python gpu_check.py --harness-dir DIR [--out DIR] [--quick]
    python gpu_check.py --dry-run [--harness-dir DIR]   # no GPU, no torch

Correctness: every dtype × every matmul case (broadcasting, strided and stride-0 views,
transposes, conjugation, reductions to a batch_shape, the capsule shapes, every size the
kernel variants take and one past them) and the routing ops forward and backward against
PyTorch's unrolled routing, float32 and float64. Speed: paired, interleaved timing in one
process (CUDA events, medians), on the capsule shapes and batched n×n for n = 2..32,
reported as a fraction of the device's measured copy bandwidth. Writes gpu_check.json
and gpu_check.md to --out (default $OUT, else the current directory).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

DTYPES = ["float16", "bfloat16", "float32", "float64", "complex64", "complex128"]
# Relative tolerance against the forward error bound |a|·|b| (tests/conftest.py's values).
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-6, "float64": 1e-14,
       "complex64": 4e-6, "complex128": 2e-14}
# Routing: max abs error / (max |reference| + 1); sums over up to 1152 capsules in another
# order than the reference's.
ROUTING_TOL = {"float32": 1e-4, "float64": 1e-12}
EPSILON = float(np.float32(1e-7))  # the op's float32 epsilon attr

# (name, x shape, y shape, (transpose_x, conjugate_x, transpose_y, conjugate_y),
#  batch_shape or None, view): view "T" passes x as a transposed view of a dense array,
# "bcast" passes x as a stride-0 broadcast view.
MATMUL_CASES = [
    ("3x5x7 @ 3x7x4", (3, 5, 7), (3, 7, 4), (False,) * 4, None, None),
    ("broadcast both ways", (5, 1, 3, 4), (1, 7, 4, 2), (False,) * 4, None, None),
    ("capsule prediction", (6, 160, 8), (50, 6, 8, 1), (False,) * 4, None, None),
    ("capsule dW (reduce)", (50, 6, 160, 1), (50, 6, 8, 1), (False, False, True, False), [6],
     None),
    ("capsule du", (6, 160, 8), (50, 6, 160, 1), (True, False, False, False), None, None),
    ("several tiles", (2, 40, 33), (33, 35), (False,) * 4, None, None),
    ("adjoints", (3, 4, 5), (6, 4), (True, True, True, True), None, None),
    ("conjugate y", (3, 4, 5), (5, 6), (False, False, False, True), None, None),
    ("reduce to [2, 1]", (2, 1, 3, 4), (1, 6, 4, 2), (False,) * 4, [2, 1], None),
    ("expand to [7]", (3, 4), (4, 2), (False,) * 4, [7], None),
    ("long reduction", (300, 2, 3), (300, 3, 2), (False,) * 4, [], None),
    ("strided view", (4, 9, 6), (4, 9, 5), (True, False, False, False), None, "T"),
    ("stride-0 view", (5, 7, 8, 3), (5, 7, 3, 2), (False,) * 4, None, "bcast"),
    ("K = 0", (2, 3, 0), (0, 5), (False,) * 4, None, None),
    ("empty batch", (0, 3, 4), (4, 5), (False,) * 4, None, None),
] + [  # every square bucket's edge, one past it, and a prime
    (f"{n}x{n}x{n}", (17, n, n), (17, n, n), (False,) * 4, None, None)
    for n in (1, 2, 3, 4, 5, 8, 9, 13, 16, 17, 31, 32, 33)
] + [
    ("160x50x8 (k8)", (160, 8), (8, 50), (False,) * 4, None, None),
    ("160x50x16 (k16)", (3, 160, 16), (3, 16, 50), (False,) * 4, None, None),
]

# (u_hat shape [B, I, J, K], iterations)
ROUTING_CASES = [
    ((3, 7, 4, 5), 1), ((3, 7, 4, 5), 3), ((2, 40, 10, 16), 3), ((2, 33, 3, 8), 2),
    ((1, 600, 10, 16), 3), ((2, 0, 3, 4), 2), ((4, 1152, 10, 16), 3),
]

# Speed cases.
CAPSULE = {"in_caps": 1152, "out": 160, "in_dim": 8, "batch": 128}
SQUARE_SIZES = list(range(2, 33))
SQUARE_ELEMS = 1 << 23  # elements per operand of the batched n×n products (32 MiB float32)
ROUTING_SPEED = ((128, 1152, 10, 16), 3)


def matmul_shapes(case):
    """(output shape, leading batch axes summed away, batch axes summed to size 1) of a case,
    by numpy's broadcasting rules: the dry run's check and the real run's reduction."""
    _, xs, ys, (tx, _, ty, _), batch, _ = case
    m, k1 = (xs[-1], xs[-2]) if tx else (xs[-2], xs[-1])
    k2, n = (ys[-1], ys[-2]) if ty else (ys[-2], ys[-1])
    if k1 != k2:
        raise ValueError(f"{case[0]}: inner dimensions {k1} and {k2} differ")
    full = tuple(np.broadcast_shapes(xs[:-2], ys[:-2]))
    if batch is None:
        return full + (m, n), (), ()
    batch = tuple(batch)
    if len(batch) > len(full):  # the output repeats the product along new axes
        full = (1,) * (len(batch) - len(full)) + full
    lead = len(full) - len(batch)
    np.broadcast_shapes(batch, full[lead:])  # raises when they do not fit
    keep = tuple(lead + i for i, d in enumerate(batch) if d == 1 and full[lead + i] != 1)
    return batch + (m, n), tuple(range(lead)), keep


def dense_strides(shape):
    """Row-major strides in elements."""
    return [int(np.prod(shape[i + 1:])) for i in range(len(shape))]


def plan_cases(harness):
    """Plans every matmul case on the harness (host code, no GPU): problems found, and the
    kernel variants the cases reach."""
    problems, reached = [], set()
    for case in MATMUL_CASES:
        name, xs, ys, (tx, cx, ty, cy), batch, _ = case
        shape, kernel = harness.plan_matmul(list(xs), dense_strides(xs), list(ys),
                                            dense_strides(ys), tx, cx, ty, cy, batch)
        if tuple(shape) != matmul_shapes(case)[0]:
            problems.append(f"{name}: the harness plans {shape}, numpy {matmul_shapes(case)[0]}")
        reached.add(kernel)
    missing = set(harness.gpu_kernels) - reached
    if missing:
        problems.append(f"no case runs the kernel variants {sorted(missing)}")
    return problems, reached


def dry_run(harness_dir=None):
    """Checks the case lists without a GPU or PyTorch: shapes agree, reductions fit, every
    dtype has a tolerance; with the built harness, every case plans to the shape numpy
    expects and every kernel variant is reached."""
    problems = []
    for case in MATMUL_CASES:
        try:
            matmul_shapes(case)
        except ValueError as e:
            problems.append(str(e))
        if case[5] not in (None, "T", "bcast"):
            problems.append(f"{case[0]}: unknown view {case[5]!r}")
    for shape, iterations in ROUTING_CASES:
        if len(shape) != 4 or iterations < 1:
            problems.append(f"routing case {shape}, {iterations}")
    if set(TOL) != set(DTYPES) or not set(ROUTING_TOL) <= set(DTYPES):
        problems.append("tolerances do not cover the dtypes")
    names = [c[0] for c in MATMUL_CASES]
    if len(set(names)) != len(names):
        problems.append("duplicate case names")
    print(f"dry run: {len(MATMUL_CASES)} matmul cases x {len(DTYPES)} dtypes, "
          f"{len(ROUTING_CASES)} routing cases x {len(ROUTING_TOL)} dtypes, "
          f"{len(SQUARE_SIZES)} square sizes timed")
    if harness_dir:
        sys.path.insert(0, harness_dir)
        import _smallmm_gpu_harness as harness

        found, reached = plan_cases(harness)
        problems += found
        print(f"dry run: harness imported (driver CUDA version {harness.driver_version()}), "
              f"cases reach kernels {sorted(reached)}")
    for p in problems:
        print("problem:", p)
    return not problems


# ---------------------------------------------------------------- on the GPU
class Gpu:
    def __init__(self, harness_dir):
        import torch

        sys.path.insert(0, harness_dir)
        import _smallmm_gpu_harness as harness

        self.torch, self.h = torch, harness
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.dev = torch.device("cuda")
        self.tdtype = {n: getattr(torch, n) for n in DTYPES}

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def rand(self, shape, dtype, gen):
        t = self.torch
        x = t.rand(shape, generator=gen, dtype=t.float64, device=self.dev) * 2 - 1
        if dtype.startswith("complex"):
            x = t.complex(x, t.rand(shape, generator=gen, dtype=t.float64, device=self.dev) * 2 - 1)
        return x.to(self.tdtype[dtype])

    def matmul(self, x, y, flags=(False,) * 4, batch_shape=None, out=None):
        """Ours: op(x) @ op(y) through the harness (x, y: any strided torch tensors)."""
        tx, cx, ty, cy = flags
        shape, _ = self.h.plan_matmul(list(x.shape), list(x.stride()), list(y.shape),
                                      list(y.stride()), tx, cx, ty, cy, batch_shape)
        if out is None:
            out = self.torch.empty(shape, dtype=x.dtype, device=self.dev)
        self.h.matmul(str(x.dtype).replace("torch.", ""), x.data_ptr(), list(x.shape),
                      list(x.stride()), y.data_ptr(), list(y.shape), list(y.stride()),
                      out.data_ptr(), self.stream(), tx, cx, ty, cy, batch_shape)
        return out

    def routing(self, u, iterations, grad_v=None):
        """Ours: v, or dû when grad_v is given."""
        t = self.torch
        name = str(u.dtype).replace("torch.", "")
        backward = grad_v is not None
        nbytes = self.h.routing_scratch_bytes(name, list(u.shape), iterations, EPSILON, backward)
        scratch = t.empty(max(nbytes, 1), dtype=t.uint8, device=self.dev)
        if backward:
            out = t.empty_like(u)
            self.h.routing_grad(name, u.data_ptr(), list(u.shape), grad_v.data_ptr(),
                                out.data_ptr(), scratch.data_ptr(), self.stream(), iterations,
                                EPSILON)
        else:
            out = t.empty(u.shape[0], u.shape[2], u.shape[3], dtype=u.dtype, device=self.dev)
            self.h.routing(name, u.data_ptr(), list(u.shape), out.data_ptr(),
                           scratch.data_ptr(), self.stream(), iterations, EPSILON)
        return out

    def routing_reference(self, u, iterations):
        """The TF-ops reference layer (tf_smallmm.capsules.routing.dynamic_routing_reference)
        in PyTorch ops."""
        t = self.torch
        logits = t.zeros(u.shape[:3], dtype=u.dtype, device=self.dev)
        v = None
        for r in range(iterations):
            c = t.softmax(logits, dim=2)
            s = t.einsum("bij,bijk->bjk", c, u)
            n2 = (s * s).sum(-1, keepdim=True)
            v = s * (n2 / (1 + n2)) / t.sqrt(n2 + EPSILON)
            if r < iterations - 1:
                logits = logits + t.einsum("bijk,bjk->bij", u, v)
        return v

    # ------------------------------------------------------------ correctness
    def check_matmul(self, case, dtype, gen):
        t = self.torch
        _, xs, ys, flags, batch, view = case
        tx, cx, ty, cy = flags
        if view == "T":  # x as a transposed view of a dense array
            x = self.rand(xs[:-2] + (xs[-1], xs[-2]), dtype, gen).transpose(-1, -2)
        elif view == "bcast":  # x as a stride-0 view of one matrix
            x = self.rand(xs[-2:], dtype, gen).expand(xs)
        else:
            x = self.rand(xs, dtype, gen)
        y = self.rand(ys, dtype, gen)
        got = self.matmul(x, y, flags, batch)
        wide = t.complex128 if dtype.startswith("complex") else t.float64

        def op(a, transpose, conj):
            a = a.to(wide)
            a = a.transpose(-1, -2) if transpose else a
            return a.conj() if conj else a

        a, b = op(x, tx, cx), op(y, ty, cy)
        want, bound = t.matmul(a, b), t.matmul(a.abs(), b.abs())
        shape, lead, keep = matmul_shapes(case)
        pad = len(shape) - want.dim()  # new leading axes of an expanding batch_shape
        want, bound = want.reshape((1,) * pad + tuple(want.shape)), bound.reshape(
            (1,) * pad + tuple(bound.shape))
        if keep:
            want, bound = want.sum(dim=keep, keepdim=True), bound.sum(dim=keep, keepdim=True)
        if lead:
            want, bound = want.sum(dim=lead), bound.sum(dim=lead)
        want, bound = t.broadcast_to(want, shape), t.broadcast_to(bound, shape)
        err = (got.to(wide) - want).abs()
        ok = tuple(got.shape) == shape and bool((err <= TOL[dtype] * (bound + 1)).all())
        kernel = self.h.plan_matmul(list(x.shape), list(x.stride()), list(y.shape),
                                    list(y.stride()), tx, cx, ty, cy, batch)[1]
        return ok, float(err.max()) if err.numel() else 0.0, kernel

    def check_routing(self, shape, iterations, dtype, gen):
        t = self.torch
        u = self.rand(shape, dtype, gen)
        gv = self.rand((shape[0], shape[2], shape[3]), dtype, gen)
        v = self.routing(u, iterations)
        du = self.routing(u.clone(), iterations, gv)
        uw = u.to(t.float64).requires_grad_(True)
        vw = self.routing_reference(uw, iterations)
        (duw,) = t.autograd.grad(vw, uw, gv.to(t.float64)) if uw.numel() else (t.zeros_like(uw),)
        tol = ROUTING_TOL[dtype]
        ev = (v.to(t.float64) - vw.detach()).abs().max().item() if v.numel() else 0.0
        eg = (du.to(t.float64) - duw).abs().max().item() if du.numel() else 0.0
        sv = 1.0 + (vw.abs().max().item() if v.numel() else 0.0)
        sg = 1.0 + (duw.abs().max().item() if du.numel() else 0.0)
        return ev <= tol * sv and eg <= tol * sg, max(ev, eg)

    # ------------------------------------------------------------ speed
    def time_interleaved(self, fns, rounds=7, reps=20):
        """Median seconds per call of each fn, interleaved round by round (CUDA events)."""
        t = self.torch
        for f in fns.values():  # warm-up (and first-launch costs)
            f()
        t.cuda.synchronize()
        samples = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                start, end = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    f()
                end.record()
                end.synchronize()
                samples[k].append(start.elapsed_time(end) / 1e3 / reps)
        return {k: statistics.median(v) for k, v in samples.items()}

    def copy_bandwidth(self):
        t = self.torch
        a = t.empty(1 << 28, dtype=t.uint8, device=self.dev)
        b = t.empty_like(a)
        sec = self.time_interleaved({"copy": lambda: b.copy_(a)}, rounds=5, reps=10)["copy"]
        return 2 * a.numel() / sec  # bytes read + written per second


def run(args):
    gpu = Gpu(args.harness_dir)
    t = gpu.torch
    gen = t.Generator(device=gpu.dev)
    gen.manual_seed(1)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": t.cuda.get_device_name(),
        "capability": ".".join(map(str, t.cuda.get_device_capability())),
        "driver_cuda": gpu.h.driver_version(),
        "torch": t.__version__,
        "kernels": list(gpu.h.gpu_kernels),
        "checks": [],
        "timings": [],
    }
    started = time.time()
    failures = 0
    for case in MATMUL_CASES:
        for dtype in DTYPES:
            ok, err, kernel = gpu.check_matmul(case, dtype, gen)
            failures += not ok
            report["checks"].append({"op": "matmul", "case": case[0], "dtype": dtype,
                                     "kernel": kernel, "ok": ok, "max_abs_err": err})
    for shape, iterations in ROUTING_CASES:
        for dtype in ROUTING_TOL:
            ok, err = gpu.check_routing(shape, iterations, dtype, gen)
            failures += not ok
            report["checks"].append({"op": "routing fwd+bwd", "case": f"{shape} R={iterations}",
                                     "dtype": dtype, "ok": ok, "max_abs_err": err})
    t.cuda.synchronize()
    report["check_seconds"] = time.time() - started

    bw = gpu.copy_bandwidth()
    report["copy_bandwidth_GBps"] = bw / 1e9
    rounds = 3 if args.quick else 7

    def add(name, secs, bytes_moved, baseline):
        ours = secs["ours"]
        row = {"case": name, "ours_us": ours * 1e6,
               "bandwidth_fraction": bytes_moved / ours / bw if bytes_moved else None}
        for k, v in secs.items():
            if k != "ours":
                row[f"{k}_us"] = v * 1e6
                row[f"speedup_vs_{k}"] = v / ours
        row["target"] = baseline
        report["timings"].append(row)

    # Capsule prediction û[b,i,:] = W[i] u[b,i]: W [I, 160, 8], u [B, I, 8, 1].
    c = CAPSULE
    w = gpu.rand((c["in_caps"], c["out"], c["in_dim"]), "float32", gen)
    u = gpu.rand((c["batch"], c["in_caps"], c["in_dim"], 1), "float32", gen)
    out = gpu.matmul(w, u)
    moved = 4 * (w.numel() + u.numel() + out.numel())
    secs = gpu.time_interleaved({
        "ours": lambda: gpu.matmul(w, u, out=out),
        "torch.matmul": lambda: t.matmul(w, u),
        "torch.einsum": lambda: t.einsum("ijl,bil->bij", w, u[..., 0]),
    }, rounds=rounds)
    add("capsule prediction fwd W[1152,160,8] u[128,1152,8] f32", secs, moved,
        ">= 0.8 of copy bandwidth")
    g = gpu.rand(tuple(out.shape), "float32", gen)
    dw = gpu.matmul(g, u, (False, False, True, False), [c["in_caps"]])
    secs = gpu.time_interleaved({
        "ours": lambda: gpu.matmul(g, u, (False, False, True, False), [c["in_caps"]], out=dw),
        "torch.einsum": lambda: t.einsum("bij,bil->ijl", g[..., 0], u[..., 0]),
    }, rounds=rounds)
    add("capsule dW (sum over batch in-kernel) f32", secs,
        4 * (g.numel() + u.numel() + dw.numel()), None)

    for n in SQUARE_SIZES:
        batch = max(1, SQUARE_ELEMS // (n * n))
        a = gpu.rand((batch, n, n), "float32", gen)
        b = gpu.rand((batch, n, n), "float32", gen)
        o = gpu.matmul(a, b)
        secs = gpu.time_interleaved({
            "ours": lambda a=a, b=b, o=o: gpu.matmul(a, b, out=o),
            "torch.bmm": lambda a=a, b=b: t.bmm(a, b),
            "torch.matmul": lambda a=a, b=b: t.matmul(a, b),
        }, rounds=rounds)
        add(f"{batch} x ({n}x{n}) @ ({n}x{n}) f32", secs, 4 * 3 * a.numel(),
            ">= 3x torch.bmm" if n <= 16 else None)

    shape, iterations = ROUTING_SPEED
    u = gpu.rand(shape, "float32", gen)
    gv = gpu.rand((shape[0], shape[2], shape[3]), "float32", gen)

    def ours_fb():
        gpu.routing(u, iterations)
        gpu.routing(u, iterations, gv)

    def reference_fb():
        uu = u.detach().requires_grad_(True)
        v = gpu.routing_reference(uu, iterations)
        t.autograd.grad(v, uu, gv)

    secs = gpu.time_interleaved({"ours": ours_fb, "torch reference": reference_fb},
                                rounds=rounds, reps=5)
    add(f"routing fwd+bwd u_hat{list(shape)} R={iterations} f32", secs, 0,
        ">= 5x torch reference")
    report["failures"] = failures
    report["seconds"] = time.time() - started
    return report


def markdown(report):
    passed = len(report["checks"]) - report["failures"]
    lines = [(f"# GPU check: {report['device']} (sm_{report['capability'].replace('.', '')}), "
              f"{report['date']}"), "",
             (f"Driver CUDA version {report['driver_cuda']}, torch {report['torch']}; "
              f"measured copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s "
              f"(read + write). Correctness: {passed} of {len(report['checks'])} checks "
              f"passed."), "",
             "| case | ours µs | baseline µs | ours vs baseline | of copy bandwidth | target |",
             "|---|---:|---:|---:|---:|---|"]
    for row in report["timings"]:
        bases = [k[:-3] for k in row if k.endswith("_us") and k != "ours_us"]
        base = "; ".join(f"{k} {row[k + '_us']:.1f}" for k in bases)
        speed = "; ".join(f"{row['speedup_vs_' + k]:.2f}x" for k in bases)
        frac = row["bandwidth_fraction"]
        lines.append(f"| {row['case']} | {row['ours_us']:.1f} | {base} | {speed} | "
                     f"{'' if frac is None else f'{frac:.2f}'} | {row['target'] or ''} |")
    bad = [c for c in report["checks"] if not c["ok"]]
    if bad:
        lines += ["", "Failed checks:", ""]
        lines += [f"- {c['op']} {c['case']} {c['dtype']}: max abs error {c['max_abs_err']:.3g}"
                  for c in bad]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness-dir", help="folder holding the built _smallmm_gpu_harness")
    ap.add_argument("--out", default=os.environ.get("OUT") or ".",
                    help="where gpu_check.json and gpu_check.md go (default: $OUT or .)")
    ap.add_argument("--quick", action="store_true", help="fewer timing rounds")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the case lists only (no GPU, no PyTorch)")
    args = ap.parse_args(argv)
    if args.dry_run:
        return 0 if dry_run(args.harness_dir) else 1
    if not args.harness_dir:
        ap.error("--harness-dir is required unless --dry-run")
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print(md)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
