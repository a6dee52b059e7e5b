"""Register use of the CUDA kernels, from ptxas (`nvcc -Xptxas -v`, object only, no GPU
needed; skipped where nvcc is absent): the size-specialised matmul variants and the routing
kernels must keep everything in registers (no spill, no stack frame) on every arch the build
targets. The generic matmul kernel may spill; it is reported, not checked.

scripts/ptxas_report.py does the compiling and parsing (and prints the table by hand).
"""

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "ptxas_report", os.path.join(ROOT, "scripts", "ptxas_report.py"))
ptxas = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ptxas)

NVCC = os.environ.get("NVCC") or shutil.which("nvcc")

SAMPLE = """\
ptxas info    : Compiling entry function '_ZN7smallmm3gpu50_GLOBAL__N__4103617e_17_smallmm_gpu_cu_cc_b70e001717BatchMatMulKernelILNS_5DTypeE2ENS0_8GpuShapeILi128ELi2ELi4ELi4ELi4ELb0EEEEEvNS_8GemmPlanENS0_12LaunchConfigEPKvS9_Pv' for 'sm_90'
ptxas info    : Function properties for _ZN7smallmm3gpu50_GLOBAL__N__4103617e_17_smallmm_gpu_cu_cc_b70e001717BatchMatMulKernelILNS_5DTypeE2ENS0_8GpuShapeILi128ELi2ELi4ELi4ELi4ELb0EEEEEvNS_8GemmPlanENS0_12LaunchConfigEPKvS9_Pv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compiling entry function '_ZN7smallmm3gpu50_GLOBAL__N__4103617e_17_smallmm_gpu_cu_cc_b70e001717BatchMatMulKernelILNS_5DTypeE5ENS0_8GpuShapeILi256ELi4ELi0ELi0ELi0ELb1EEEEEvNS_8GemmPlanENS0_12LaunchConfigEPKvS9_Pv' for 'sm_80'
ptxas info    : Function properties for _ZN7smallmm3gpu50_GLOBAL__N__4103617e_17_smallmm_gpu_cu_cc_b70e001717BatchMatMulKernelILNS_5DTypeE5ENS0_8GpuShapeILi256ELi4ELi0ELi0ELi0ELb1EEEEEvNS_8GemmPlanENS0_12LaunchConfigEPKvS9_Pv
    48 bytes stack frame, 44 bytes spill stores, 44 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers
"""


def test_report_parser_reads_registers_spills_and_variants():
    rows = ptxas.parse(SAMPLE)
    names = ptxas.variant_names()
    assert [(r["arch"], r["registers"], r["stack"], r["spill_stores"]) for r in rows] == [
        ("sm_90", 40, 0, 0), ("sm_80", 128, 48, 44)]
    if shutil.which("c++filt"):
        assert [(r["kind"], r["dtype"], names.get(r["variant"])) for r in rows] == [
            ("matmul", "float32", "sq4"), ("matmul", "complex128", "generic")]
        assert ptxas.must_not_spill(rows[0], names) and not ptxas.must_not_spill(rows[1], names)
    assert not ptxas.spills(rows[0]) and ptxas.spills(rows[1])
    assert ptxas.spills({"registers": 10})  # numbers missing: not taken as "no spill"


def test_variant_names_cover_the_kernel_table():
    names = set(ptxas.variant_names().values())
    assert {"sq4", "sq8", "sq16", "sq32", "k8", "k16", "generic"} <= names
    assert ptxas.build_archs() == ["80", "90"]


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_specialised_and_routing_kernels_do_not_spill():
    rows = ptxas.parse(ptxas.compile_sources(NVCC, ptxas.build_archs()))
    names = ptxas.variant_names()
    checked = [r for r in rows if ptxas.must_not_spill(r, names)]
    # Every variant but the generic one, every dtype, every arch; and the routing kernels.
    archs = {f"sm_{a}" for a in ptxas.build_archs()}
    specialised = {n for n in names.values() if n != "generic"}
    assert {(names.get(r["variant"]), r["arch"]) for r in checked if r["kind"] == "matmul"} == {
        (n, a) for n in specialised for a in archs}
    assert {(r["variant"], r["dtype"]) for r in checked if r["kind"] == "routing"} == {
        (d, t) for d in ("forward", "backward") for t in ("float32", "float64")}
    bad = [f"{r['kind']} {names.get(r['variant'], r['variant'])} {r['dtype']} {r['arch']}: "
           f"{r['registers']} registers, stack {r['stack']}, spills {r['spill_stores']}/"
           f"{r['spill_loads']}" for r in checked if ptxas.spills(r)]
    assert bad == []
