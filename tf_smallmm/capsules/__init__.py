"""Capsule networks on the SmallMM engine (public as tf_smallmm.capsule_predict,
tf_smallmm.layers and tf_smallmm.keras2.layers).

    prediction  capsule_predict: û = W·u as one broadcast product
    routing     dynamic routing (the fused SmallMMDynamicRouting op and its gradient),
                squash, and the TF-ops references
    keras_common     the capsule layers written once for both Kerases, margin_loss,
                     SavedModel export without the plugin, CapsNet-Keras checkpoints
    layers           the Keras 3 layers (thin subclasses of keras_common's)
    tf_keras_layers  the tf_keras layers (likewise)

May import tf_smallmm._core only.
"""
