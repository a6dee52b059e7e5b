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

`kernels_loaded()` and `build_info()` report what was compiled and what runs;
TF_SMALLMM_DISABLE=1 forces the built-ins everywhere.
"""

from tf_smallmm._capsule import capsule_predict
from tf_smallmm._einsum import einsum
from tf_smallmm._keras_ops import batch_dot, dot
from tf_smallmm._loader import build_info, kernels_loaded
from tf_smallmm._matmul import matmul, matvec
from tf_smallmm import layers  # noqa: E402  (capsule layers; registers the ops for serving)

__version__ = "0.1.0"

__all__ = ["batch_dot", "build_info", "capsule_predict", "dot", "einsum", "kernels_loaded",
           "matmul", "matvec"]
