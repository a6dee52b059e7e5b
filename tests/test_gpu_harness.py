"""The TF-free GPU harness (cuda/harness/, scripts/gpu_check.sh) on a machine without a GPU:
its case lists are consistent, and (slow, needs nvcc) `gpu_check.sh --dry-run` builds the
extension from the library's own cuda/ sources, imports it and plans every case on it."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "gpu_check", os.path.join(ROOT, "cuda", "harness", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

NVCC = os.environ.get("NVCC") or shutil.which("nvcc")


def test_case_lists_are_consistent():
    assert gpu_check.dry_run()


@pytest.mark.parametrize("case,shape", [
    ("capsule dW (reduce)", (6, 160, 8)),
    ("reduce to [2, 1]", (2, 1, 3, 2)),
    ("expand to [7]", (7, 3, 2)),
    ("long reduction", (2, 2)),
    ("broadcast both ways", (5, 7, 3, 2)),
])
def test_expected_output_shapes(case, shape):
    (found,) = [c for c in gpu_check.MATMUL_CASES if c[0] == case]
    assert gpu_check.matmul_shapes(found)[0] == shape


def test_dry_run_reports_bad_cases(monkeypatch, capsys):
    bad = ("bad", (2, 3, 4), (5, 6), (False,) * 4, None, None)
    monkeypatch.setattr(gpu_check, "MATMUL_CASES", [*gpu_check.MATMUL_CASES, bad])
    assert not gpu_check.dry_run()
    assert "bad: inner dimensions 4 and 5 differ" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_gpu_check_dry_run_builds_and_plans_every_case(tmp_path):
    env = dict(os.environ, NVCC=NVCC, PYTHON=sys.executable, BUILD_DIR=str(tmp_path / "build"),
               OUT=str(tmp_path / "out"))
    r = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"],
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "harness imported" in r.stdout and "problem" not in r.stdout
