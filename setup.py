"""Builds tf_smallmm: the TF op library and the pybind11 modules over the kernel core.

Install with ``pip install --no-build-isolation .`` after TensorFlow 2.21 and pybind11
(build isolation would download a second TensorFlow just to read its headers).

Environment:
  TF_SMALLMM_CUDA=0|1   build the CUDA kernels (default: when nvcc is found); 1 fails the
                        build when nvcc is missing, and any nvcc error fails it too
  TF_SMALLMM_XLA=0|1    build the XLA kernels (default: when TensorFlow's headers have what they
                        need); 1 fails the build when they do not
  TF_SMALLMM_JOBS=N     parallel compile jobs (default: CPU count)
  NVCC=path             nvcc to use (default: the newest CUDA 12.x toolkit's nvcc under
                        /usr/local/cuda-12.*, else nvcc on PATH; see _find_nvcc)
"""

import concurrent.futures
import datetime
import functools
import glob
import importlib.metadata
import json
import os
import platform
import re
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
ISA_SOURCES = ["cc/engine/gemm/gemm_table.cc", "cc/engine/routing_isa.cc"]
# The GEMM kernels, compiled once per ISA and dtype (-DSMALLMM_DTYPE=<enumerator>, every
# entry of SMALLMM_DTYPES; the ISA's gemm_table.cc gathers them, and one missing fails the
# link). Apart, they compile in parallel: each real dtype's take 3-5 minutes (and AVX-512's
# together half an hour under the sanitizers, one job, when they were one file).
GEMM_SOURCE = "cc/engine/gemm/gemm_isa.cc"
with open(os.path.join(HERE, "cc", "engine", "dtypes.h")) as f:
    GEMM_DTYPES = re.findall(r"^\s*X\((k\w+),", f.read(), re.MULTILINE)
# gemm_isa.cc once more for an ISA, with extra flags: AVX-512's bfloat16 kernels on the
# CPU's bfloat16 instructions (AVX512-BF16), chosen at run time (cc/engine/gemm.cc).
ISA_VARIANTS = {"avx512": ("bf16", ["-mavx512bf16", "-DSMALLMM_BF16_ONLY",
                                     "-DSMALLMM_DTYPE=kBFloat16"])}
KERNEL_SOURCES = ["cc/engine/dtypes.cc", "cc/engine/execute.cc", "cc/engine/gemm.cc",
                  "cc/engine/isa.cc", "cc/engine/plan.cc", "cc/engine/routing.cc"]
TF_SOURCES = ["cc/tf/smallmm_ops.cc", "cc/tf/routing_ops.cc"]
# With CUDA: the GPU Launch + registrations (host compiler, -DGOOGLE_CUDA=1) and the CUDA
# runtime shim (host-only code; `nvcc -x c++` for the CUDA include path). The kernels are
# every cuda/*.cu.cc.
TF_GPU_SOURCES = ["cc/tf/smallmm_ops_gpu.cc", "cc/tf/routing_ops_gpu.cc"]
CUDA_HOST_SOURCES = ["cuda/cuda_runtime_shim.cc"]
# The XLA kernels (jit_compile=True): the compile side, which needs XLA's compiler headers
# (about a minute and 1 GB per compile, hence one file), and the FFI handlers, which need
# only XLA's header-only FFI API. XLA_HEADERS must all be in the wheel's include folder.
XLA_SOURCES = ["cc/xla/xla_kernels.cc", "cc/xla/ffi_handlers.cc"]
XLA_HEADERS = ["tensorflow/compiler/tf2xla/xla_op_kernel.h", "xla/hlo/builder/xla_builder.h",
               "xla/ffi/api/ffi.h", "xla/ffi/ffi_api.h"]
# The wheel's XLA headers include highwayhash/*.h (xla/printer.h) and farmhash.h
# (tsl/platform/fingerprint.h), which it does not ship: declaration-only stand-ins, so that
# no extra system package is needed (cc/xla/shims/README.md).
XLA_SHIMS = "cc/xla/shims"
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


# The oldest NVIDIA driver that runs code built by each CUDA toolkit major version (CUDA's
# minor-version compatibility), as cudaDriverGetVersion() reports it and as the Linux driver
# release. From NVIDIA's "CUDA Compatibility" guide, Minor Version Compatibility, Table 1
# (read 2026-12-01): CUDA 11.x needs >= 450.80.02, 12.x >= 525.60.13, 13.x >= 580.
# https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html
# The fat binary holds machine code for every arch in CUDA_ARCHS; a GPU of another arch
# JIT-compiles its PTX, which needs a driver of the toolkit's own minor version or newer.
CUDA_MIN_DRIVER = {11: (11000, "450.80.02"), 12: (12000, "525.60.13"), 13: (13000, "580")}


@functools.cache
def _nvcc_version(nvcc):
    """What `nvcc --version` prints, or None if it does not run (asked once per nvcc)."""
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def _nvcc_release(nvcc):
    """(major, minor) of an nvcc, from `nvcc --version`, or None if it does not run."""
    m = re.search(r"release (\d+)\.(\d+)", _nvcc_version(nvcc) or "")
    return (int(m[1]), int(m[2])) if m else None


def _xla_missing(tf_include):
    """Why the XLA kernels cannot be built against this TensorFlow, or None."""
    if os.environ.get("TF_SMALLMM_XLA", "") == "0":
        return "TF_SMALLMM_XLA=0"
    missing = [h for h in XLA_HEADERS if not os.path.exists(os.path.join(tf_include, h))]
    if not missing:
        return None
    reason = f"TensorFlow's include folder {tf_include} lacks {', '.join(missing)}"
    if os.environ.get("TF_SMALLMM_XLA", "") == "1":
        raise RuntimeError(f"TF_SMALLMM_XLA=1 but {reason}")
    return reason


def _find_nvcc():
    """NVCC if set; else a CUDA 12.x nvcc when one is installed, else nvcc on PATH.

    Why 12.x first: TensorFlow 2.21's GPU wheel runs the CUDA 12 runtime, and its users'
    drivers need only support CUDA 12 (>= 525.60.13); code built by a CUDA 13 toolkit
    needs a 580+ driver (CUDA_MIN_DRIVER), and on an older one every launch would fail.
    """
    want = os.environ.get("TF_SMALLMM_CUDA", "")
    if want == "0":
        return None
    nvcc = os.environ.get("NVCC")
    if not nvcc:
        found = [shutil.which("nvcc")] + sorted(glob.glob("/usr/local/cuda-12*/bin/nvcc"))
        found = [(_nvcc_release(p), p) for p in dict.fromkeys(p for p in found if p)]
        cuda12 = sorted((r, p) for r, p in found if r and r[0] == 12)
        nvcc = cuda12[-1][1] if cuda12 else (found[0][1] if found else None)
    if want == "1" and not nvcc:
        raise RuntimeError("TF_SMALLMM_CUDA=1 but nvcc was not found")
    return nvcc


EXTRA_OUTPUTS = ["_smallmm_ops.so", "_build_info.json"]

# The TensorFlow release the sources target, for metadata written without TensorFlow
# installed (an sdist); a build takes the release it is compiled against.
TARGET_TF = "2.21"


def _tf_release():
    """major.minor of the installed TensorFlow (read from its metadata, without importing
    it), else TARGET_TF."""
    for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-intel"):
        try:
            major, minor = importlib.metadata.version(dist).split(".")[:2]
            return f"{major}.{minor}"
        except (importlib.metadata.PackageNotFoundError, ValueError):
            continue
    return TARGET_TF


def _extras():
    """Optional dependencies. "cpu" and "gpu" pin the TensorFlow release the op library is
    compiled against: a custom-op library runs only under the minor release it was built
    for, so `pip install tf_smallmm-*.whl[cpu]` pulls the one TensorFlow that can load it."""
    major, minor = (int(x) for x in _tf_release().split("."))
    tf_range = f">={major}.{minor},<{major}.{minor + 1}"
    return {
        "cpu": [f"tensorflow-cpu{tf_range}"],
        "gpu": [f"tensorflow[and-cuda]{tf_range}"],
        "decompose": ["tensorly>=0.8"],
        "demo": ["scikit-learn"],  # python -m tf_smallmm.demo (sklearn's digits)
        "bench": ["matplotlib"],  # python -m tf_smallmm.bench's plots
        "test": ["pytest>=7", "hypothesis>=6", "scikit-learn", "tensorly>=0.8"],
    }


NO_TENSORFLOW = (
    "tf_smallmm is compiled against the TensorFlow it will run with, and none can be imported "
    "here: install tensorflow (or tensorflow-cpu) {release} first, then install tf_smallmm with "
    "`pip install --no-build-isolation .` (pip's default build isolation hides the "
    "TensorFlow you installed), or install a prebuilt wheel: no compiler needed.")
NO_PYBIND11 = ("tf_smallmm needs pybind11 to build: `pip install pybind11`, then "
               "`pip install --no-build-isolation .` again.")


def _import_build_requirements():
    """(pybind11, tensorflow), or exit with one sentence saying what to install: the
    usual cause is `pip install .` with build isolation, which builds in a fresh
    environment without the installed TensorFlow."""
    try:
        import tensorflow as tf
    except ImportError:
        sys.exit(NO_TENSORFLOW.format(release=_tf_release()))
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
        # The GEMM kernels first, the longest jobs (AVX-512's, its variant among them) at the
        # front, so that the pool does not end on one of them with its other workers idle.
        for isa in isas:
            for dtype in GEMM_DTYPES:
                o = obj(f"gemm_{isa}_{dtype}")
                jobs.append(base + ISA_FLAGS[isa] + [f"-DSMALLMM_ISA={isa}",
                                                     f"-DSMALLMM_DTYPE={dtype}", "-c",
                                                     GEMM_SOURCE, "-o", o])
                core_objs.append(o)
            if isa in ISA_VARIANTS:
                suffix, flags = ISA_VARIANTS[isa]
                o = obj(f"gemm_{isa}_{suffix}")
                jobs.append(base + ISA_FLAGS[isa] + flags +
                            [f"-DSMALLMM_ISA={isa}", "-c", GEMM_SOURCE, "-o", o])
                core_objs.append(o)
        for src in ISA_SOURCES:
            stem = os.path.splitext(os.path.basename(src))[0].replace("_isa", "")
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
        xla_missing = _xla_missing(tf.sysconfig.get_include())
        if xla_missing:
            print(f"WARNING: building without the XLA kernels ({xla_missing}): under "
                  "jit_compile=True tf_smallmm uses TensorFlow's built-in ops", flush=True)
        xla_srcs = [] if xla_missing else XLA_SOURCES
        for src in TF_SOURCES + (TF_GPU_SOURCES if cuda else []) + xla_srcs:
            # XLA's headers as system headers: their warnings (-Wcomment, -Wreturn-type,
            # enum bit-fields, the registrar objects of REGISTER_XLA_OP) are TF's, not ours.
            xla = ["-I" + os.path.join(HERE, XLA_SHIMS), "-isystem", tf.sysconfig.get_include()]
            jobs.append(tf_base + (xla if src in XLA_SOURCES else []) + ["-c", src, "-o", obj(src)])
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
        # framework library has none. The XLA kernels also need libtensorflow_cc.so.2
        # (tf.sysconfig names only the framework library): it has the XLA op registry,
        # XlaOpKernel, the XLA builder and XLA's FFI registry.
        xla_lflags = [] if xla_missing else ["-l:libtensorflow_cc.so.2"]
        _run([cxx, "-shared", "-o", os.path.join(out_dir, "_smallmm_ops.so")]
             + tf_objs + core_objs + tf_lflags + xla_lflags + (["-ldl"] if cuda else []))
        for name, src in PYBIND_MODULES.items():
            so = os.path.join(out_dir, name + sysconfig.get_config_var("EXT_SUFFIX"))
            _run(base + ["-shared", obj(src), "-o", so] + core_objs)

        release = _nvcc_release(nvcc) if cuda else None
        # (A toolkit newer than the table: its major version in the driver API's encoding.)
        min_driver = CUDA_MIN_DRIVER.get(release[0], (release[0] * 1000, None)) if release else None
        info = {
            "tf_version": tf.__version__,
            "isas": isas,
            "cuda": cuda,
            "xla": not xla_missing,
            "xla_missing": xla_missing,
            "cuda_archs": CUDA_ARCHS if cuda else [],
            "nvcc": _nvcc_version(nvcc).strip().splitlines()[-1] if cuda else None,
            # The toolkit that built the GPU kernels and the oldest driver that runs them
            # (the loader registers no GPU kernel under an older one).
            "cuda_toolkit": f"{release[0]}.{release[1]}" if release else None,
            "cuda_min_driver": min_driver[0] if min_driver else None,
            "cuda_min_driver_linux": min_driver[1] if min_driver else None,
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
    extras_require=_extras(),
)
