"""TensorFlow's own functions that the drop-ins replace, held once for every fallback.

Taken from the modules that define them (not through `tf.matmul` / `tf.einsum`, which
`tf_smallmm.patch()` or a user may have reassigned), so a fallback always reaches the
built-in and never the drop-in that called it.
"""

from tensorflow.python.framework import tensor as _tensor
from tensorflow.python.ops import gen_math_ops, math_ops, special_math_ops, variables

matmul = math_ops.matmul  # tf.matmul, tf.linalg.matmul
# The op tf.matmul ends in for two rank-2 tensors of one dtype and no flags.
mat_mul = gen_math_ops.mat_mul
matvec = math_ops.matvec  # tf.linalg.matvec
einsum = special_math_ops.einsum  # tf.einsum, tf.linalg.einsum

# The `@` operator of tensors (eager and symbolic) and of tf.Variable, as TensorFlow
# installed it (tf.Variable keeps its own copy of the tensor's, taken when it was defined).
tensor_matmul = _tensor.Tensor.__matmul__
tensor_rmatmul = _tensor.Tensor.__rmatmul__
variable_matmul = variables.Variable.__matmul__
variable_rmatmul = variables.Variable.__rmatmul__
