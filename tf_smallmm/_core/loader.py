"""Loads the compiled op library once and says what it contains.

The library is tied to the TensorFlow minor release it was compiled against: on a mismatch
we warn once, at import, naming both versions and the two fixes (install the TensorFlow it
was built for, or rebuild it against the running one); on any other load failure we warn
once on first use. Either way every wrapper falls back to TensorFlow's built-in ops instead
of crashing.
"""

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
    warned = False
    info: ClassVar[dict] = {}


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


def build_info():
    """What was compiled and what is running: TF versions, ISAs, devices with kernels."""
    lib = load()
    info = dict(_State.info)
    info["tf_runtime_version"] = tf.__version__
    info["kernels_loaded"] = lib is not None
    info["load_error"] = _State.error
    info["devices"] = list(registered_devices("SmallMMBatchMatMul")) if lib is not None else []
    try:
        from tf_smallmm import _smallmm_core as core

        info["active_isa"] = core.active_isa()
        info["tile_sizes"] = list(core.tile_sizes)
    except ImportError:
        info["active_isa"] = None
    return info
