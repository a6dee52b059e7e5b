"""`patch()`, `unpatch()` and `with patched():` — existing code runs on SmallMM without
edits, by routing the public entry points of TensorFlow and Keras to the drop-ins:

    tf.matmul, tf.linalg.matmul            -> tf_smallmm.matmul
    tf.linalg.matvec                       -> tf_smallmm.matvec
    tf.einsum, tf.linalg.einsum            -> tf_smallmm.einsum
        (and the same names in tf.compat.v2, which tf_keras uses, and tf.compat.v1)
    a @ b for tf tensors (eager and in tf.function) and tf.Variables -> tf_smallmm.matmul
    keras.ops.matmul, keras.ops.einsum (Keras 3 on the TensorFlow backend, the functions
        of keras.src.backend.tensorflow.numpy that Dense, EinsumDense and
        MultiHeadAttention reach)         -> dropins.keras_ops.matmul / einsum
    tf_keras.backend.batch_dot / dot (and tf.keras.backend's under TF_USE_LEGACY_KERAS=1)
                                           -> tf_smallmm.batch_dot / dot

Each drop-in runs the SmallMM kernels where they win and otherwise calls the original
built-in object, held since import (`_core.builtins`, `dropins.keras_ops`), never the
patched name: no recursion. Not reached: functions imported by name before `patch()`
(`from tensorflow import einsum`), TensorFlow's own internals (tf.tensordot, which
Keras' Dense uses for inputs of rank > 2, and layers that call math_ops directly), and
functions traced into a tf.function before `patch()` (they keep their ops until retraced).

`patch()` is idempotent and `unpatch()` restores every original object exactly (a name
someone reassigned after `patch()` is left as they set it). `patched()` blocks nest and may
overlap across threads: the patch is in place while `patch()` is in effect or any block
is open. All of it runs under one lock.
"""

import contextlib
import importlib
import sys
import threading

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.framework import tensor as tensor_lib
from tensorflow.python.ops import variables

from tf_smallmm._core import builtins
from tf_smallmm.dropins import einsum, keras_backend, keras_ops, linalg


class _State:
    lock = threading.Lock()
    explicit = False  # patch() called, unpatch() not since
    blocks = 0  # open patched() blocks, all threads together
    # (owner, attribute, original, replacement, public name), replaced under the lock only
    installed = ()


def _operand(t):
    """t as a dense tensor for the `@` fast path (tensors and tf.Variables), else None."""
    if isinstance(t, tf.Variable):
        return t.value()
    return t if isinstance(t, tensor_lib.Tensor) else None


def _matmul_operator(a, b):
    """a @ b on the engine when both are dense tensors it takes, else None."""
    a, b = _operand(a), _operand(b)
    if a is None or b is None:
        return None
    with ops.name_scope(None, "matmul", [a, b]) as scope:
        # (`a @ b` of two dense tensors is tf.matmul(a, b): the run-time branch's other side,
        # and where it goes to the built-in with the gradient of one GEMM, what runs.)
        result = linalg.on_engine(a, b, name=scope, fallback=lambda: linalg.builtin_matmul(a, b))
        if result is None and linalg.one_gemm_gradient(a, b):
            result = linalg.builtin_matmul(a, b, name=scope)
        return result


def _operator(original, reflected):
    """The `@` method (`__matmul__`, or `__rmatmul__` when reflected) that runs on the
    engine where it can and calls `original`, the method TensorFlow installed, otherwise."""
    def method(self, other):
        result = _matmul_operator(other, self) if reflected else _matmul_operator(self, other)
        return result if result is not None else original(self, other)
    return method


_tensor_matmul = _operator(builtins.tensor_matmul, reflected=False)
_tensor_rmatmul = _operator(builtins.tensor_rmatmul, reflected=True)
_variable_matmul = _operator(builtins.variable_matmul, reflected=False)
_variable_rmatmul = _operator(builtins.variable_rmatmul, reflected=True)


def _targets():
    """(owner, attribute, replacement, public name) of every entry point to route."""
    # tf_keras reaches TensorFlow as tensorflow.compat.v2, TF1-style code as compat.v1.
    targets = [(owner, attr, replacement, f"{prefix}.{attr}")
               for owner, prefix in ((tf, "tf"), (tf.linalg, "tf.linalg"),
                                     (tf.compat.v2, "tf.compat.v2"),
                                     (tf.compat.v2.linalg, "tf.compat.v2.linalg"),
                                     (tf.compat.v1, "tf.compat.v1"),
                                     (tf.compat.v1.linalg, "tf.compat.v1.linalg"))
               for attr, original, replacement in (
                   ("matmul", builtins.matmul, linalg.matmul),
                   ("matvec", builtins.matvec, linalg.matvec),
                   ("einsum", builtins.einsum, einsum.einsum))
               if getattr(owner, attr, None) is original]
    targets += [(tensor_lib.Tensor, "__matmul__", _tensor_matmul, "tf.Tensor.__matmul__"),
                (tensor_lib.Tensor, "__rmatmul__", _tensor_rmatmul, "tf.Tensor.__rmatmul__"),
                (variables.Variable, "__matmul__", _variable_matmul, "tf.Variable.__matmul__"),
                (variables.Variable, "__rmatmul__", _variable_rmatmul,
                 "tf.Variable.__rmatmul__")]
    if keras_ops.BACKEND is not None:
        targets += [(keras_ops.BACKEND, "matmul", keras_ops.matmul, "keras.ops.matmul"),
                    (keras_ops.BACKEND, "einsum", keras_ops.einsum, "keras.ops.einsum")]
    return targets + _tf_keras_targets()


def _tf_keras_targets():
    """tf_keras' batch_dot and dot in every tf_keras module that exports them: the backend
    module its layers use, tf_keras.backend, and the v1 / v2 API modules (tf.keras.backend
    under TF_USE_LEGACY_KERAS=1). None when tf_keras is not installed."""
    try:
        from tf_keras.src import backend
    except ImportError:
        return []
    for api in ("tf_keras.backend", "tf_keras.api._v2.keras.backend",
                "tf_keras.api._v1.keras.backend"):
        with contextlib.suppress(ImportError):
            importlib.import_module(api)
    targets = []
    for name, module in sorted(sys.modules.items()):
        if not name.startswith("tf_keras") or module is None:
            continue
        for attr, replacement in (("batch_dot", keras_backend.batch_dot),
                                  ("dot", keras_backend.dot)):
            if getattr(module, attr, None) is getattr(backend, attr):
                targets.append((module, attr, replacement, f"{name}.{attr}"))
    return targets


def _sync():
    """Installs or removes the patch to match the state (callers hold the lock)."""
    want = _State.explicit or _State.blocks > 0
    if want and not _State.installed:
        for owner, attr, replacement, name in _targets():
            original = getattr(owner, attr)
            setattr(owner, attr, replacement)
            _State.installed += ((owner, attr, original, replacement, name),)
    elif not want and _State.installed:
        for owner, attr, original, replacement, _ in reversed(_State.installed):
            if getattr(owner, attr, None) is replacement:
                setattr(owner, attr, original)
        _State.installed = ()


def patch():
    """Routes TensorFlow's and Keras' matrix-product entry points to the SmallMM drop-ins
    (the list is in this module's docstring). Idempotent; `unpatch()` undoes it."""
    with _State.lock:
        _State.explicit = True
        _sync()


def unpatch():
    """Restores the original functions `patch()` replaced (at once, unless a `patched()`
    block is still open: then when the last one closes)."""
    with _State.lock:
        _State.explicit = False
        _sync()


@contextlib.contextmanager
def patched():
    """`patch()` for the duration of the block. Blocks nest and may overlap across
    threads; the originals come back when the last one closes (unless `patch()` is in
    effect)."""
    with _State.lock:
        _State.blocks += 1
        _sync()
    try:
        yield
    finally:
        with _State.lock:
            _State.blocks -= 1
            _sync()


def patched_names():
    """The entry points currently routed to the drop-ins (empty when not patched)."""
    with _State.lock:
        return [name for *_, name in _State.installed]
