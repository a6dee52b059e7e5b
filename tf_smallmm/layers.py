"""Keras 3 layers for capsule networks, and the functions they are built from: the public
path of `tf_smallmm.capsules.layers` (its docstring has the usage)."""

from tf_smallmm.capsules.layers import *
from tf_smallmm.capsules.layers import __all__  # noqa: F401
