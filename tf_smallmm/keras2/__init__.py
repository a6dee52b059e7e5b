"""tf_keras (Keras 2) versions of tf_smallmm's Keras APIs, for code that imports tf_keras:

    from tf_smallmm.keras2 import layers as caps   # the capsule layers, for tf_keras models

The public path of `capsules/tf_keras_layers.py`. May import tf_smallmm.capsules only.
"""
