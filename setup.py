"""Builds tf_smallmm: the TF op library and the pybind11 modules over the kernel core.

Install with ``pip install --no-build-isolation .`` after TensorFlow 2.21 and pybind11
(build isolation would download a second TensorFlow just to read its headers).

Environment:
  TF_SMALLMM_CUDA=0|1   build the CUDA kernels (default: when nvcc is found); 1 fails the
                        build when nvcc is missing, and any nvcc error fails it too
  TF_SMALLMM_JOBS=N     parallel compile jobs (default: CPU count)
  NVCC=path             nvcc to use
"""

import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

# Flags common to every C++ file. No -march=native and no -ffast-math: the library must
# run on any x86-64 CPU and keep IEEE semantics (NaN/Inf propagate as in tf.matmul).
CXXFLAGS = ["-O3", "-g0", "-fPIC", "-fvisibility=hidden", "-Wall",
            "-Wno-sign-compare", "-Wno-unused-function",
            "-Wno-psabi"]  # vector-extension values only cross internal functions
# Per-ISA builds of the kernel core; cc/engine/isa.cc dispatches between them at run time
# (an ISA left out here, as off x86, is simply not offered).
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma",
               "-mf16c", "-mprefer-vector-width=512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "baseline": [],
}
# Compiled once per entry of ISA_FLAGS (anonymous-namespace kernels, no std:: templates).
ISA_SOURCES = ["cc/engine/gemm/gemm_isa.cc", "cc/engine/routing_isa.cc"]
KERNEL_SOURCES = ["cc/engine/dtypes.cc", "cc/engine/gemm.cc", "cc/engine/isa.cc",
                  "cc/engine/plan.cc", "cc/engine/routing.cc"]
TF_SOURCES = ["cc/tf/smallmm_ops.cc", "cc/tf/routing_ops.cc"]
# With CUDA: the GPU Launch + registrations (host compiler, -DGOOGLE_CUDA=1) and the CUDA
# runtime shim (host-only code; `nvcc -x c++` for the CUDA include path). The kernels are
# every cuda/*.cu.cc.
TF_GPU_SOURCES = ["cc/tf/smallmm_ops_gpu.cc"]
CUDA_HOST_SOURCES = ["cuda/cuda_runtime_shim.cc"]
# pybind11 modules of the tf_smallmm package -> their source; each links the kernel core.
PYBIND_MODULES = {
    "_smallmm_core": "cc/python/module.cc",
    "_smallmm_gpu_sim": "cuda/testing/sim_module.cc",
}
CUDA_ARCHS = ["80", "90"]


def _run(cmd):
    print(" ".join(cmd), flush=True)
    subprocess.check_call(cmd, cwd=HERE)


def _up_to_date(cmd, o):
    """True when object o was built by exactly cmd and no file it depends on changed since
    (the compiler's own -MMD/-MD dependency list), so rebuilds only recompile what a change
    touches."""
    dep, rec = o[:-2] + ".d", o + ".cmd"
    if not all(os.path.exists(p) for p in (o, dep, rec)):
        return False
    with open(rec) as f:
        if f.read() != " ".join(cmd):
            return False
    with open(dep) as f:
        deps = f.read().replace("\\\n", " ").split(":", 1)[-1].split()
    t = os.path.getmtime(o)
    return all(os.path.exists(p) and os.path.getmtime(p) <= t
               for p in (os.path.join(HERE, d) for d in deps))


def _compile(cmd, o, force=False):
    """Compiles with a dependency file next to the object; skips work already done."""
    if not force and _up_to_date(cmd, o):
        return
    nv = os.path.basename(cmd[0]).startswith("nvcc")
    _run(cmd + (["-MD", "-MF", o[:-2] + ".d"] if nv else ["-MMD", "-MF", o[:-2] + ".d"]))
    with open(o + ".cmd", "w") as f:
        f.write(" ".join(cmd))


def _find_nvcc():
    want = os.environ.get("TF_SMALLMM_CUDA", "")
    if want == "0":
        return None
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if want == "1" and not nvcc:
        raise RuntimeError("TF_SMALLMM_CUDA=1 but nvcc was not found")
    return nvcc


EXTRA_OUTPUTS = ["_smallmm_ops.so", "_build_info.json"]

NO_TENSORFLOW = (
    "tf_smallmm is compiled against the TensorFlow it will run with, and none can be imported "
    "here: install tensorflow (or tensorflow-cpu) 2.21 first, then install tf_smallmm with "
    "`pip install --no-build-isolation .` (pip's default build isolation hides the "
    "TensorFlow you installed).")
NO_PYBIND11 = ("tf_smallmm needs pybind11 to build: `pip install pybind11`, then "
               "`pip install --no-build-isolation .` again.")


def _import_build_requirements():
    """(pybind11, tensorflow), or exit with one sentence saying what to install: the
    usual cause is `pip install .` with build isolation, which builds in a fresh
    environment without the installed TensorFlow."""
    try:
        import tensorflow as tf
    except ImportError:
        sys.exit(NO_TENSORFLOW)
    try:
        import pybind11
    except ImportError:
        sys.exit(NO_PYBIND11)
    return pybind11, tf


class BuildSmallMM(build_ext):
    """Compiles cc/ (and cuda/) with g++/nvcc directly; setuptools' compiler abstraction
    cannot express per-file ISA flags or nvcc."""

    def copy_extensions_to_source(self):
        # --inplace / editable installs: setuptools copies only the declared extension.
        super().copy_extensions_to_source()
        src = os.path.join(self.build_lib, "tf_smallmm")
        for name in EXTRA_OUTPUTS:
            shutil.copy2(os.path.join(src, name), os.path.join(HERE, "tf_smallmm", name))

    def get_outputs(self):
        out_dir = os.path.dirname(self.get_ext_fullpath("tf_smallmm._smallmm_core"))
        return super().get_outputs() + [os.path.join(out_dir, n) for n in EXTRA_OUTPUTS]

    def build_extensions(self):
        pybind11, tf = _import_build_requirements()

        out_dir = os.path.dirname(self.get_ext_fullpath("tf_smallmm._smallmm_core"))
        obj_dir = os.path.join(self.build_temp, "smallmm_obj")
        os.makedirs(out_dir, exist_ok=True)
        os.makedirs(obj_dir, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        tf_cflags = tf.sysconfig.get_compile_flags()  # ABI + C++ standard, from TF itself
        tf_lflags = tf.sysconfig.get_link_flags()
        std = [f for f in tf_cflags if f.startswith(("--std", "-std"))] or ["-std=c++17"]
        # Every object gets TF's C++ standard and libstdc++ ABI, not only the TF-including
        # ones: std::string crosses from the kernel core into TF code (planner errors).
        abi = [f for f in tf_cflags if f.startswith("-D_GLIBCXX_USE_CXX11_ABI")]
        base = [cxx] + CXXFLAGS + std + abi + ["-I" + HERE]

        x86 = platform.machine().lower() in ("x86_64", "amd64")
        isas = list(ISA_FLAGS) if x86 else ["baseline"]
        jobs = []  # (command, object)

        def obj(name):
            return os.path.join(obj_dir, name.replace("/", "_") + ".o")

        core_objs = []
        for src in ISA_SOURCES:
            stem = os.path.basename(src).replace("_isa.cc", "")
            for isa in isas:
                o = obj(f"{stem}_{isa}")
                jobs.append(base + ISA_FLAGS[isa] + [f"-DSMALLMM_ISA={isa}", "-c", src, "-o", o])
                core_objs.append(o)
        for src in KERNEL_SOURCES:
            jobs.append(base + ["-c", src, "-o", obj(src)])
            core_objs.append(obj(src))

        tf_objs = []
        tf_base = base + [f for f in tf_cflags if f not in std + abi] + [
            "-Wno-deprecated-declarations", "--param", "destructive-interference-size=128"]
        nvcc = _find_nvcc()
        cuda_srcs = sorted(
            os.path.join("cuda", f) for f in os.listdir(os.path.join(HERE, "cuda"))
            if f.endswith(".cu.cc")) if os.path.isdir(os.path.join(HERE, "cuda")) else []
        cuda = bool(nvcc and cuda_srcs)
        if cuda:
            tf_base += ["-DGOOGLE_CUDA=1"]
        for src in TF_SOURCES + (TF_GPU_SOURCES if cuda else []):
            jobs.append(tf_base + ["-c", src, "-o", obj(src)])
            tf_objs.append(obj(src))
        if cuda:
            gencode = []
            for a in CUDA_ARCHS:
                gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            gencode += ["-gencode", f"arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
            nvcc_base = [nvcc, "-O3", "-DGOOGLE_CUDA=1", "-Xcompiler", "-fPIC", "-I" + HERE] + std \
                + [f for f in tf_cflags if not f.startswith(("--std", "-std"))]
            for src in cuda_srcs:
                o = obj(src)
                jobs.append(nvcc_base + ["-x", "cu", "--expt-relaxed-constexpr"] + gencode
                            + ["-Wno-deprecated-gpu-targets", "-c", src, "-o", o])
                tf_objs.append(o)
            for src in CUDA_HOST_SOURCES:
                jobs.append(nvcc_base + ["-x", "c++", "-c", src, "-o", obj(src)])
                tf_objs.append(obj(src))

        # The pybind11 modules (no TF): the kernel core, and the GPU block program on a
        # simulated grid (test support, host code only, built with or without CUDA).
        py_inc = ["-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"]]
        for src in PYBIND_MODULES.values():
            jobs.append(base + py_inc + ["-c", src, "-o", obj(src)])

        n = int(os.environ.get("TF_SMALLMM_JOBS", os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            for f in [pool.submit(_compile, j, j[-1], self.force) for j in jobs]:
                f.result()

        # The op library: loaded with tf.load_op_library. No -lcudart: TF's framework
        # library provides the CUDA runtime symbols; cuda/cuda_runtime_shim.cc looks them
        # up at first use (-ldl), so the library also loads under tensorflow-cpu, whose
        # framework library has none.
        _run([cxx, "-shared", "-o", os.path.join(out_dir, "_smallmm_ops.so")]
             + tf_objs + core_objs + tf_lflags + (["-ldl"] if cuda else []))
        for name, src in PYBIND_MODULES.items():
            so = os.path.join(out_dir, name + sysconfig.get_config_var("EXT_SUFFIX"))
            _run(base + ["-shared", obj(src), "-o", so] + core_objs)

        info = {
            "tf_version": tf.__version__,
            "isas": isas,
            "cuda": cuda,
            "cuda_archs": CUDA_ARCHS if cuda else [],
            "nvcc": subprocess.check_output([nvcc, "--version"], text=True).strip().splitlines()[-1]
            if cuda else None,
            "compiler": subprocess.check_output([cxx, "--version"], text=True).splitlines()[0],
            "built": datetime.date.today().isoformat(),
        }
        with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
            json.dump(info, f, indent=1)


setup(
    # Not "build/": on case-insensitive file systems that folder would collide with the
    # Bazel BUILD file at the root.
    options={"build": {"build_base": "_build"}},
    ext_modules=[Extension("tf_smallmm." + name, sources=[]) for name in PYBIND_MODULES],
    cmdclass={"build_ext": BuildSmallMM},
)
