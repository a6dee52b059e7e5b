"""Capsule networks on the SmallMM engine (public as tf_smallmm.capsule_predict and
tf_smallmm.layers).

    prediction  capsule_predict: û = W·u as one broadcast product
    routing     dynamic routing (the fused SmallMMDynamicRouting op and its gradient),
                squash, and the TF-ops references
    layers      the Keras layers, margin_loss, and SavedModel export without the plugin

May import tf_smallmm._core only.
"""
