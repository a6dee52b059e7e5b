"""The engine's Python side: what every public function lowers to.

    loader       loads the op library once, checks the TensorFlow it was built for, says
                 what was compiled (build_info)
    dispatch     whether a SmallMM op or TensorFlow's built-in runs (dtype, XLA without our
                 XLA kernels, a GPU without our kernels, TF_SMALLMM_DISABLE, and the model
                 measured per CPU class and dtype in dispatch_model.json, written by the
                 sweep benchmark)
    engine       `product` / `product_pair`: the SmallMM matmul ops, and their gradients
    contraction  the planner that lowers a two-operand contraction to one `product`

May import TensorFlow, the compiled libraries and `_version` at the package root, nothing else of
tf_smallmm: dropins/, capsules/ and tools/ import from here, never the other way.
"""
