"""Drop-in replacements with the signatures, results, static shapes and errors of the
TensorFlow / Keras functions they replace (exported at the top: tf_smallmm.matmul, ...).

    linalg         matmul, matvec          (tf.linalg.matmul / matvec)
    einsum         einsum                  (tf.einsum): equation parsing
    keras_backend  batch_dot, dot          (tf_keras.backend.batch_dot / dot)

May import tf_smallmm._core only.
"""
