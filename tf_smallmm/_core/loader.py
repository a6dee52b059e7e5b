"""Loads the compiled op library once and says what it contains.

The library is tied to the TensorFlow minor release it was compiled against: on a mismatch
we warn once, at import, naming both versions and the two fixes (install the TensorFlow it
was built for, or rebuild it against the running one); on any other load failure we warn
once on first use. Either way every wrapper falls back to TensorFlow's built-in ops instead
of crashing.

A CUDA build's GPU kernels need a driver at least as new as the one the CUDA toolkit that
built them requires (`build_info()["cuda_min_driver"]`, in cudaDriverGetVersion's encoding).
They are registered only after that check (`_register_gpu_kernels`): under an older driver
none is, one warning says why and what to do, TensorFlow places the ops on the CPU and the
wrappers use TensorFlow's built-ins on the GPU.
"""

import ctypes
import functools
import json
import os
import warnings
from typing import ClassVar

import tensorflow as tf
from packaging.version import InvalidVersion, Version

# The compiled libraries sit at the package root, where setup.py writes them.
_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPS_PATH = os.path.join(_DIR, "_smallmm_ops.so")
_INFO_PATH = os.path.join(_DIR, "_build_info.json")
REINSTALL = "pip install --no-build-isolation --force-reinstall --no-deps <tf_smallmm source dir>"


# Tests only: pretend the CUDA driver reports this version (cudaDriverGetVersion's
# encoding, e.g. 12040) instead of asking it.
FAKE_DRIVER_ENV = "TF_SMALLMM_FAKE_CUDA_DRIVER"


class _State:
    lib = None
    error = None
    warned = False
    info: ClassVar[dict] = {}
    driver = None  # the CUDA driver's version as the GPU check saw it (None: not checked)


def _driver_version(so):
    """The CUDA driver's version as cudaDriverGetVersion reports it (12080 for CUDA 12.8), 0
    without a driver, -1 when TensorFlow provides no CUDA runtime (tensorflow-cpu)."""
    fake = os.environ.get(FAKE_DRIVER_ENV, "").strip()
    if fake:
        return int(fake)
    return int(so.SmallMMCudaDriverVersion())


def _format_cuda_version(v):
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_too_old(driver, needed):
    """Whether a driver of CUDA version `driver` cannot run kernels that need `needed`
    (both as cudaDriverGetVersion reports them). Without a driver (<= 0) no GPU can run
    anything, so registering the kernels is harmless: not "too old"."""
    return bool(needed) and driver > 0 and driver < needed


@functools.cache
def _register_gpu_kernels():
    """Registers the GPU kernels of a CUDA build once the op library is loaded, unless the
    driver is too old for the toolkit that built them (then one warning)."""
    info = _State.info or _read_info()
    if not info.get("cuda"):
        return
    try:
        # The library TensorFlow already loaded (RTLD_NOLOAD: never a second copy).
        so = ctypes.CDLL(_OPS_PATH, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        _State.driver = _driver_version(so)
    except (OSError, AttributeError, ValueError) as e:
        warnings.warn(f"tf_smallmm could not check the CUDA driver ({e}); its GPU kernels are "
                      f"not registered and TensorFlow's built-in ops run on the GPU.",
                      RuntimeWarning, stacklevel=3)
        return
    needed = info.get("cuda_min_driver")
    if driver_too_old(_State.driver, needed):
        linux = info.get("cuda_min_driver_linux")
        warnings.warn(
            f"tf_smallmm's GPU kernels were built with CUDA {info.get('cuda_toolkit')}, which "
            f"needs a driver for CUDA {_format_cuda_version(needed)} or newer"
            f"{f' (Linux driver >= {linux})' if linux else ''}, but the installed driver "
            f"supports CUDA {_format_cuda_version(_State.driver)}. Its GPU kernels are "
            f"disabled and TensorFlow's built-in ops run on the GPU instead (its CPU kernels "
            f"still work). Update the NVIDIA driver, or rebuild with a CUDA 12 toolkit: "
            f"NVCC=/usr/local/cuda-12.x/bin/nvcc {REINSTALL}",
            RuntimeWarning, stacklevel=3)
        return
    so.SmallMMRegisterGpuKernels()


def _warn_once(stacklevel):
    if not _State.warned:
        _State.warned = True
        warnings.warn(_State.error, RuntimeWarning, stacklevel=stacklevel + 1)


def _read_info():
    with open(_INFO_PATH) as f:
        return json.load(f)


def _built_for_running_tf(built):
    # Custom-op ABI is stable within a TF minor release (2.21.0 vs 2.21.1), not across.
    try:
        return Version(built).release[:2] == Version(tf.__version__).release[:2]
    except InvalidVersion:  # "unknown": the build did not record it
        return False


def _mismatch(built):
    """The warning for a library built against another TensorFlow release."""
    from tf_smallmm._version import __version__

    try:
        release = "{}.{}".format(*Version(built).release[:2])
        want = (f'the TensorFlow it was built for (pip install "tensorflow-cpu=={release}.*" or '
                f'"tensorflow=={release}.*"; with a tf_smallmm wheel, install it as '
                f'"tf_smallmm[cpu]" or "tf_smallmm[gpu]" to get it)')
    except InvalidVersion:  # "unknown": the build did not record it
        want = "the TensorFlow it was built for"
    return (f"tf_smallmm {__version__} was built against TensorFlow {built} but TensorFlow "
            f"{tf.__version__} is installed; its kernels are disabled and TensorFlow's built-in "
            f"ops are used instead. Install {want}, or rebuild tf_smallmm against the installed "
            f"TensorFlow: {REINSTALL}")


@functools.cache
def load():
    """Returns the op-library module, or None (after one warning) if it cannot be used."""
    try:
        _State.info = _read_info()
    except OSError:
        _State.error = f"tf_smallmm's compiled library was not found next to {_DIR}"
    if _State.error is None:
        built = _State.info.get("tf_version", "unknown")
        if not _built_for_running_tf(built):
            _State.error = _mismatch(built)
    if _State.error is None:
        try:
            _State.lib = tf.load_op_library(_OPS_PATH)
        except Exception as e:  # noqa: BLE001 - NotFoundError (undefined symbol), OSError, ...
            _State.error = (f"tf_smallmm's op library failed to load ({e}); TensorFlow's "
                            f"built-in ops are used instead. Rebuild it with: {REINSTALL}")
        else:
            _register_gpu_kernels()
    if _State.error is not None:
        _warn_once(stacklevel=3)
    return _State.lib


def register_ops():
    """Registers the SmallMM ops with TensorFlow. `import tf_smallmm` calls it, so that the
    import is all a process needs before loading a SavedModel containing the ops.

    A library built against another TensorFlow release is reported here, at import (the
    one warning: `load()` does not repeat it); any other problem is reported once by
    `load()` when a function first needs the kernels.
    """
    try:
        built = _read_info().get("tf_version", "unknown")
    except (OSError, ValueError):
        return  # load() reports it on first use
    if not _built_for_running_tf(built):
        _State.error = _mismatch(built)
        _warn_once(stacklevel=3)
        return
    try:
        tf.load_op_library(_OPS_PATH)
        _register_gpu_kernels()
    except Exception:  # noqa: BLE001, S110 - load() reports it on first use
        pass


def kernels_loaded():
    """True when the SmallMM op library is loaded and usable."""
    return load() is not None


@functools.cache
def registered_devices(op_name):
    # Cached: registrations are fixed once the library is loaded, and the dispatch policy
    # asks on every call (uncached, the registry query cost ~350 us and leaked ~280 bytes
    # per call).
    from tensorflow.python.framework import kernels

    # XLA's JIT pseudo-devices (XLA_CPU_JIT, XLA_GPU_JIT) show up once XLA has started and
    # are not where TF places ops: the custom calls are `xla_platforms()`.
    devs = set()
    for k in kernels.get_registered_kernels_for_op(op_name).kernel:
        if not k.device_type.startswith("XLA_"):
            devs.add(k.device_type)
    return sorted(devs)


# The XLA custom call every SmallMM matmul op compiles to (cc/xla/custom_calls.h).
_XLA_PROBE_TARGET = b"smallmm_batch_matmul"


@functools.cache
def xla_platforms():
    """The platforms ("Host", "CUDA") for which XLA's FFI registry holds the handlers of
    our custom calls: where the SmallMM ops compile under jit_compile=True. Empty for a
    library built without the XLA kernels."""
    if load() is None or not _State.info.get("xla"):
        return ()
    # The library is loaded already: this gets the same handle, not a second copy.
    probe = ctypes.CDLL(_OPS_PATH).SmallMMXlaHandlerRegistered
    probe.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    probe.restype = ctypes.c_int
    return tuple(p for p in ("Host", "CUDA") if probe(_XLA_PROBE_TARGET, p.encode()))


def core_module():
    """The kernel core on numpy arrays without TensorFlow (_smallmm_core: the kernels one by
    one, the benchmarks' probes), or None where this build has none."""
    try:
        from tf_smallmm import _smallmm_core as core
    except ImportError:
        return None
    return core


def build_info():
    """What was compiled and what is running: TF versions, ISAs, devices with kernels,
    the XLA kernels ("xla", or why not: "xla_missing") and the platforms XLA runs them on
    ("xla_platforms")."""
    lib = load()
    info = dict(_State.info)
    info["tf_runtime_version"] = tf.__version__
    info["kernels_loaded"] = lib is not None
    info["load_error"] = _State.error
    info["devices"] = list(registered_devices("SmallMMBatchMatMul")) if lib is not None else []
    info["cuda_driver"] = _State.driver
    info["xla_platforms"] = list(xla_platforms())
    core = core_module()
    info["active_isa"] = None
    if core is not None:
        info["active_isa"] = core.active_isa()
        info["tile_sizes"] = list(core.tile_sizes)
    return info
