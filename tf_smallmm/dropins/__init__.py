"""Drop-in replacements with the signatures, results, static shapes and errors of the
TensorFlow / Keras functions they replace (exported at the top: tf_smallmm.matmul, ...).

    linalg         matmul, matvec          (tf.linalg.matmul / matvec)
    einsum         einsum                  (tf.einsum): equation parsing
    keras_backend  batch_dot, dot          (tf_keras.backend.batch_dot / dot)
    keras_ops      matmul, einsum          (Keras 3's keras.ops on the TensorFlow backend)
    patch          patch / unpatch / patched: routes the public TF and Keras entry points
                   above to these drop-ins (tf_smallmm.patch)

May import tf_smallmm._core only (and, among themselves, modules listed above it).
"""
