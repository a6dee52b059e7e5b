"""The capsule layers for tf_keras models: the public path of
`tf_smallmm.capsules.tf_keras_layers` (its docstring, and `capsules/layers.py`'s, have the
usage)."""

from tf_smallmm.capsules.tf_keras_layers import *
from tf_smallmm.capsules.tf_keras_layers import __all__  # noqa: F401
