"""Registers, spills and stack frames of every CUDA kernel, from `nvcc -Xptxas -v`.

    python scripts/ptxas_report.py [--nvcc PATH] [--arch 80 --arch 90] [--markdown]

Compiles cuda/*.cu.cc as the build does (setup.py's flags, object only, no GPU needed) with
ptxas' verbose output, and prints one row per kernel instance and arch: registers, spill
stores/loads and stack frame bytes. Exits 1 when a specialised matmul kernel (a variant of
SMALLMM_GPU_KERNELS other than `generic`) or a routing kernel spills or uses a stack frame:
those are sized to keep everything in registers. tests/test_gpu_ptxas.py runs the same check.
"""

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def build_archs():
    """setup.py's CUDA_ARCHS: the archs the build compiles machine code for."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        return ast.literal_eval(re.search(r"^CUDA_ARCHS = (\[.*\])$", f.read(), re.MULTILINE)[1])


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def compile_sources(nvcc, archs, sources=None):
    """ptxas' verbose report of each cuda/*.cu.cc (text)."""
    sources = sources or sorted(os.path.join("cuda", f) for f in os.listdir(os.path.join(
        ROOT, "cuda")) if f.endswith(".cu.cc"))
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cmd = [nvcc, "-O3", "-std=c++17", "-DGOOGLE_CUDA=1", "-I", ROOT, "-x", "cu",
                   "--expt-relaxed-constexpr", "-Xptxas", "-v", *gencode,
                   "-Wno-deprecated-gpu-targets", "-c", os.path.join(ROOT, src),
                   "-o", os.path.join(tmp, "k.o")]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{r.stderr[-4000:]}")
            out.append(r.stderr)
    return "\n".join(out)


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                       check=True)
    return dict(zip(names, r.stdout.splitlines()))


def describe(pretty):
    """(kind, dtype, variant) of a kernel's demangled name: kind "matmul" or "routing"."""
    dtype = re.search(r"DType\)(\d+)|DType::(\w+)|<(float|double)", pretty)
    dt = next((g for g in dtype.groups() if g), "?") if dtype else "?"
    dt = {"0": "float16", "1": "bfloat16", "2": "float32", "3": "float64", "4": "complex64",
          "5": "complex128", "kHalf": "float16", "kBFloat16": "bfloat16", "kFloat": "float32",
          "kDouble": "float64", "kComplex64": "complex64", "kComplex128": "complex128",
          "float": "float32", "double": "float64"}.get(dt, dt)
    if "Routing" in pretty:
        return "routing", dt, "backward" if "Backward" in pretty else "forward"
    shape = re.search(r"GpuShape<(\d+), (\d+), (\d+), (\d+), (\d+), (true|false)>", pretty)
    return "matmul", dt, "x".join(shape.groups()[:5]) if shape else "?"


def parse(report):
    """One dict per (kernel, arch): name, arch, registers, stack, spill_stores, spill_loads."""
    rows, cur = [], None
    for line in report.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m[1], "arch": m[2]}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _REGS.search(line)
        if m:
            cur["registers"] = int(m[1])
    names = demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kind"], r["dtype"], r["variant"] = describe(names[r["mangled"]])
    return rows


def variant_names():
    """{"threads x ept x bm x bn x kc": name} from SMALLMM_GPU_KERNELS."""
    with open(os.path.join(ROOT, "cuda", "smallmm_gpu_logic.h")) as f:
        text = f.read()
    table = text[text.index("#define SMALLMM_GPU_KERNELS(X)"):]
    table = table[:table.index("\n\n")]
    consts = {"kThreads": re.search(r"kThreads = (\d+);", text)[1],
              "kElemsPerThread": re.search(r"kElemsPerThread = (\d+);", text)[1]}
    out = {}
    for m in re.finditer(r"X\((\w+), (\w+), (\w+), (\d+), (\d+), (\d+), \w+\)", table):
        vals = [consts.get(v, v) for v in m.groups()[1:]]
        out["x".join(vals)] = m[1]
    return out


def must_not_spill(row, names):
    """Specialised matmul variants and the routing kernels keep everything in registers."""
    if row["kind"] == "routing":
        return True
    return names.get(row["variant"], "generic") != "generic"


def spills(row):
    """Whether ptxas gave the kernel a stack frame or spilled registers (a row without the
    numbers counts as spilling: the report could not be read)."""
    return any(row.get(k, 1) for k in ("stack", "spill_stores", "spill_loads"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvcc", default=os.environ.get("NVCC") or shutil.which("nvcc"))
    ap.add_argument("--arch", action="append")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if not args.nvcc:
        print("nvcc not found")
        return 2
    rows = parse(compile_sources(args.nvcc, args.arch or build_archs()))
    names = variant_names()
    bad = [r for r in rows if must_not_spill(r, names) and spills(r)]
    sep = " | " if args.markdown else "  "
    if args.markdown:
        print("| kernel | variant | dtype | arch | registers | stack | spill st/ld |")
        print("|---|---|---|---|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r["kind"], r["variant"], r["dtype"], r["arch"])):
        cells = [r["kind"], names.get(r["variant"], r["variant"]), r["dtype"], r["arch"],
                 str(r.get("registers")), str(r.get("stack")),
                 f"{r.get('spill_stores')}/{r.get('spill_loads')}"]
        print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    for r in bad:
        print(f"SPILL: {r['kind']} {names.get(r['variant'], r['variant'])} {r['dtype']} "
              f"{r['arch']}: stack {r['stack']}, spills {r['spill_stores']}/{r['spill_loads']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
