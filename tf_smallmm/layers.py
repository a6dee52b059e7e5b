"""The capsule-network layers, and the functions they are built from, for the Keras that
tf.keras is: Keras 3 (`tf_smallmm.capsules.layers`, whose docstring has the usage), or
tf_keras when TF_USE_LEGACY_KERAS is set as TensorFlow reads it
(`tf_smallmm.capsules.tf_keras_layers`, always at tf_smallmm.keras2.layers)."""

import os

if os.environ.get("TF_USE_LEGACY_KERAS", None) in ("true", "True", "1"):  # as TensorFlow's
    from tf_smallmm.capsules import layers as _keras3_layers  # noqa: F401 - registers them
    from tf_smallmm.capsules.tf_keras_layers import *
    from tf_smallmm.capsules.tf_keras_layers import __all__
else:
    from tf_smallmm.capsules.layers import *
    from tf_smallmm.capsules.layers import __all__  # noqa: F401
