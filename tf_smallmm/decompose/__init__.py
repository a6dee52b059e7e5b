"""Low-rank decomposition of Keras `Dense` and `Conv2D` layers.

Replace a big layer by a chain of thinner ones whose product is a low-rank approximation of
the original kernel, then fine-tune briefly with a small learning rate. Three factorisations:

* `decompose_dense`: truncated SVD, W (m x n) ~ A (m x t) . B (t x n): two `Dense` layers,
  t (m + n) weights instead of m n.
* `decompose_conv2d(method="tucker")`: Tucker-2 over the channel modes (Kim et al. 2016,
  "Compression of deep convolutional neural networks for fast and low power mobile
  applications"): 1x1 conv S -> R1, k x k conv R1 -> R2 (the original strides, padding and
  dilation), 1x1 conv R2 -> T.
* `decompose_conv2d(method="cp")`: rank-R CP (Lebedev et al. 2015, "Speeding-up convolutional
  neural networks using fine-tuned CP-decomposition"): 1x1 conv S -> R, depthwise kh x 1,
  depthwise 1 x kw, 1x1 conv R -> T. Needs TensorLy (`pip install tf_smallmm[decompose]`).

Ranks can be given, chosen by an energy fraction, or estimated by empirical variational
Bayesian matrix factorisation (`estimate_rank`, Nakajima et al. 2013) on the kernel's mode
unfoldings. `decompose_model` applies a policy to a whole Keras model and reports parameters,
FLOPs, weight reconstruction error and measured latency per layer.

Example::

    import keras
    from tf_smallmm.decompose import decompose_model

    small, report = decompose_model(
        model,
        {"Dense": {"rank": "vbmf"}, "Conv2D": {"method": "tucker", "ranks": "vbmf"}},
        min_params=10_000,
    )
    print(report)
    small.compile(keras.optimizers.Adam(1e-4), loss=..., metrics=[...])
    small.fit(x, y, epochs=2)          # short fine-tune, small learning rate

The new layers are stock Keras layers, so decomposed models save and load as `.keras` files
without custom objects. Kernels are factorised in float64 NumPy and cast to the layer's
variable dtype. The bias and activation of the original layer go on the last new layer.

Modules: `dense` (SVD), `conv` (Tucker-2, CP), `model` (`decompose_model`), `report`
(`DecompositionReport` and the measurements), `vbmf` (rank estimation), `common` (what
they share). May import Keras and NumPy (and TensorLy for CP), nothing else of
tf_smallmm: the new layers are stock Keras layers and run no SmallMM op.
"""

from tf_smallmm.decompose.conv import decompose_conv2d
from tf_smallmm.decompose.dense import decompose_dense
from tf_smallmm.decompose.model import decompose_model
from tf_smallmm.decompose.report import DecompositionReport
from tf_smallmm.decompose.vbmf import estimate_rank, evbmf

__all__ = [
    "DecompositionReport",
    "decompose_conv2d",
    "decompose_dense",
    "decompose_model",
    "estimate_rank",
    "evbmf",
]
