"""tf_smallmm: fast many-small-matrix products for TensorFlow.

Drop-in replacements for TensorFlow functions that run on SmallMM kernels when the
matrices are small (and fall back to the built-ins otherwise):

    import tf_smallmm as smm
    y = smm.matmul(a, b)          # tf.linalg.matmul
    v = smm.matvec(a, x)          # tf.linalg.matvec
    e = smm.einsum(eq, a, b)      # tf.einsum
    z = smm.batch_dot(x, y, axes) # tf_keras.backend.batch_dot
    d = smm.dot(x, y)             # tf_keras.backend.dot
    uhat = smm.capsule_predict(W, u)  # tf.einsum('ijkl,bil->bijk', W, u)

`patch()` (or `with patched():`) routes tf.matmul, tf.einsum, `@`, keras.ops.matmul /
einsum and tf_keras' batch_dot / dot to these, so existing models run on SmallMM without
edits; `unpatch()` restores the originals.

`kernels_loaded()` and `build_info()` report what was compiled and what runs;
TF_SMALLMM_DISABLE=1 forces the built-ins everywhere.

The package, one subpackage per domain (each imports only from those below it):

    tools/       python -m tf_smallmm.bench / .demo
    dropins/     matmul, matvec, einsum, batch_dot, dot
    capsules/    capsule_predict, dynamic routing, the Keras layers (tf_smallmm.layers)
    decompose/   low-rank decomposition of Keras layers (tf_smallmm.decompose)
    _core/       the op library's loader, the dispatch policy, the ops' Python side and
                 gradients, the contraction planner

`layers`, `bench` and `demo` at the top are the public paths of what lives in
`capsules/` and `tools/`. The compiled libraries (_smallmm_ops.so, _smallmm_core*.so,
_build_info.json) sit here, at the package root, where setup.py writes them.
"""

from tf_smallmm import layers
from tf_smallmm._core import loader as _loader
from tf_smallmm._core.loader import kernels_loaded
from tf_smallmm._version import __version__ as __version__  # re-exported
from tf_smallmm.capsules.prediction import capsule_predict
from tf_smallmm.dropins import patch as _patch
from tf_smallmm.dropins.einsum import einsum
from tf_smallmm.dropins.keras_backend import batch_dot, dot
from tf_smallmm.dropins.linalg import matmul, matvec
from tf_smallmm.dropins.patch import patch, patched, unpatch

# SavedModels with SmallMM ops load after `import tf_smallmm`, before any function runs.
_loader.register_ops()


def build_info():
    """What was compiled and what is running: TF versions, ISAs, devices with kernels, and
    under "patched" the entry points `patch()` routes to SmallMM now (empty when none)."""
    info = _loader.build_info()
    info["patched"] = _patch.patched_names()
    return info


__all__ = [
    "__version__",
    "batch_dot",
    "build_info",
    "capsule_predict",
    "dot",
    "einsum",
    "kernels_loaded",
    "layers",
    "matmul",
    "matvec",
    "patch",
    "patched",
    "unpatch",
]
