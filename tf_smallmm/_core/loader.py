"""Loads the compiled op library once and says what it contains.

The library is tied to the TensorFlow it was compiled against: on a mismatch (or any load
failure) we warn once, naming both versions and the reinstall command, and every wrapper
falls back to TensorFlow's built-in ops instead of crashing.
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


class _State:
    lib = None
    error = None
    info: ClassVar[dict] = {}


def _read_info():
    with open(_INFO_PATH) as f:
        return json.load(f)


def _built_for_running_tf(built):
    # Custom-op ABI is stable within a TF minor release (2.21.0 vs 2.21.1), not across.
    try:
        return Version(built).release[:2] == Version(tf.__version__).release[:2]
    except InvalidVersion:  # "unknown": the build did not record it
        return False


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
            _State.error = (
                f"tf_smallmm was built against TensorFlow {built} but TensorFlow "
                f"{tf.__version__} is installed; its kernels are disabled and TensorFlow's "
                f"built-in ops are used instead. Rebuild it with: {REINSTALL}")
    if _State.error is None:
        try:
            _State.lib = tf.load_op_library(_OPS_PATH)
        except Exception as e:  # noqa: BLE001 - NotFoundError (undefined symbol), OSError, ...
            _State.error = (f"tf_smallmm's op library failed to load ({e}); TensorFlow's "
                            f"built-in ops are used instead. Rebuild it with: {REINSTALL}")
    if _State.error is not None:
        warnings.warn(_State.error, RuntimeWarning, stacklevel=3)
    return _State.lib


def register_ops():
    """Registers the SmallMM ops with TensorFlow. `import tf_smallmm` calls it, so that the
    import is all a process needs before loading a SavedModel containing the ops.

    Quiet on purpose: a missing or mismatched library is reported once, by `load()`, when a
    function first needs the kernels; here it is only skipped.
    """
    try:
        if _built_for_running_tf(_read_info().get("tf_version", "unknown")):
            tf.load_op_library(_OPS_PATH)
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

    devs = set()
    for k in kernels.get_registered_kernels_for_op(op_name).kernel:
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
    info["xla_platforms"] = list(xla_platforms())
    try:
        from tf_smallmm import _smallmm_core as core

        info["active_isa"] = core.active_isa()
        info["tile_sizes"] = list(core.tile_sizes)
    except ImportError:
        info["active_isa"] = None
    return info
