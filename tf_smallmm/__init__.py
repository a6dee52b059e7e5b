"""tf_smallmm: fast many-small-matrix products for TensorFlow."""
