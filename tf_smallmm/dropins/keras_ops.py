"""Drop-in `matmul` and `einsum` for Keras 3's TensorFlow backend (what `keras.ops.matmul` /
`keras.ops.einsum`, Dense, EinsumDense and MultiHeadAttention call: the functions of
`keras.src.backend.tensorflow.numpy`), for `tf_smallmm.patch()`.

Each converts its operands as Keras does; where they are two dense tensors of one dtype
and the product runs on the SmallMM kernels, that is the result (Keras would cast it to
that same dtype). Everything else goes to Keras' own function, held here as imported.
"""

import tensorflow as tf

from tf_smallmm.dropins import einsum as _einsum
from tf_smallmm.dropins import linalg


def _keras_backend():
    """Keras 3's TensorFlow-backend numpy module, or None (no Keras 3, another backend)."""
    try:
        import keras
        from keras.src.backend.tensorflow import core
        from keras.src.backend.tensorflow import numpy as knp
    except ImportError:
        return None, None
    return (knp, core) if keras.backend.backend() == "tensorflow" else (None, None)


BACKEND, _CORE = _keras_backend()
KERAS_MATMUL = BACKEND.matmul if BACKEND is not None else None
KERAS_EINSUM = BACKEND.einsum if BACKEND is not None else None


def _dense_pair(x, y):
    """x and y converted as Keras converts them, and whether they are dense tensors of
    one dtype."""
    x, y = _CORE.convert_to_tensor(x), _CORE.convert_to_tensor(y)
    return x, y, isinstance(x, tf.Tensor) and isinstance(y, tf.Tensor) and x.dtype == y.dtype


def matmul(x1, x2):
    """Drop-in for Keras 3's `keras.ops.matmul` on the TensorFlow backend."""
    x1, x2, dense = _dense_pair(x1, x2)
    if dense and None not in (x1.shape.rank, x2.shape.rank) and min(
            x1.shape.rank, x2.shape.rank) >= 2:
        result = linalg.on_engine(x1, x2, fallback=lambda: KERAS_MATMUL(x1, x2))
        if result is not None:
            return result
    return KERAS_MATMUL(x1, x2)


def einsum(subscripts, *operands, **kwargs):
    """Drop-in for Keras 3's `keras.ops.einsum` on the TensorFlow backend."""
    if len(operands) == 2 and not kwargs:
        x, y, dense = _dense_pair(*operands)
        operands = (x, y)
        if dense:
            result = _einsum.on_engine(subscripts, x, y)
            if result is not None:
                return result
    return KERAS_EINSUM(subscripts, *operands, **kwargs)
