"""Shapes that do not fit raise TensorFlow's own exception with TensorFlow's own text:
each drop-in against the built-in it replaces, on the same bad inputs, with shapes known
only at run time (the kernels' and the shape guards' path) and eagerly."""

import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_smallmm as smm
from tf_smallmm._core import builtins

CASES = [
    # (name, ours, built-in, shapes)
    ("matmul inner", smm.matmul, builtins.matmul, [(2, 2), (3, 2)]),
    ("matmul batched inner", smm.matmul, builtins.matmul, [(2, 2, 3), (2, 4, 5)]),
    ("matmul batch", smm.matmul, builtins.matmul, [(2, 3, 4), (5, 4, 2)]),
    ("matmul broadcast batch", smm.matmul, builtins.matmul, [(2, 2, 3, 4), (3, 4, 2)]),
    ("matmul rank 1", smm.matmul, builtins.matmul, [(3,), (3, 2)]),
    ("matmul transpose_a", lambda a, b: smm.matmul(a, b, transpose_a=True),
     lambda a, b: builtins.matmul(a, b, transpose_a=True), [(2, 3, 4), (2, 4, 5)]),
    ("matmul adjoint_b", lambda a, b: smm.matmul(a, b, adjoint_b=True),
     lambda a, b: builtins.matmul(a, b, adjoint_b=True), [(3, 4), (5, 3)]),
    ("matvec inner", smm.matvec, builtins.matvec, [(2, 3), (4,)]),
    ("matvec batch", smm.matvec, builtins.matvec, [(2, 3, 4), (5, 4)]),
    ("einsum inner", lambda a, b: smm.einsum("bij,bjk->bik", a, b),
     lambda a, b: builtins.einsum("bij,bjk->bik", a, b), [(2, 3, 4), (2, 5, 6)]),
    ("einsum batch", lambda a, b: smm.einsum("bij,bjk->bik", a, b),
     lambda a, b: builtins.einsum("bij,bjk->bik", a, b), [(2, 3, 4), (3, 4, 6)]),
    ("einsum attention", lambda a, b: smm.einsum("BTNH,BSNH->BNTS", a, b),
     lambda a, b: builtins.einsum("BTNH,BSNH->BNTS", a, b), [(2, 5, 3, 4), (2, 6, 2, 4)]),
    ("einsum capsules", lambda a, b: smm.einsum("ijkl,bil->bijk", a, b),
     lambda a, b: builtins.einsum("ijkl,bil->bijk", a, b), [(6, 3, 4, 5), (2, 6, 4)]),
    ("batch_dot inner", smm.batch_dot, tf_keras.backend.batch_dot, [(2, 3, 4), (2, 5, 6)]),
    ("batch_dot batch", smm.batch_dot, tf_keras.backend.batch_dot, [(2, 3, 4), (3, 4, 6)]),
    ("dot", smm.dot, tf_keras.backend.dot, [(2, 3, 4), (5, 6)]),
]


def _error(fn, args):
    with pytest.raises(Exception) as info:
        out = fn(*args)
        np.asarray(out)
    e = info.value
    message = e.message if isinstance(e, tf.errors.OpError) else str(e)
    # Graph errors end with the failing node's name ("\n\t [[{{node ...}}]]"): TF's node
    # names differ from ours, the text before them must not.
    # Graph errors name the function that failed ("{{function_node __inference_f_123}} "):
    # the names differ between two tf.functions, the text after them must not.
    return type(e), re.sub(r"^\{\{function_node [^}]*\}\} ", "", message.split("\n")[0])


@pytest.mark.parametrize("name,ours,builtin,shapes", CASES, ids=[c[0] for c in CASES])
def test_run_time_shape_errors_match_the_builtin(name, ours, builtin, shapes):
    args = [tf.ones(s) for s in shapes]
    # Ranks known (sizes not), except where the rank itself is wrong: a known bad rank is a
    # static error, raised while tracing.
    spec = [tf.TensorSpec(None if "rank" in name else [None] * len(s)) for s in shapes]
    want = _error(tf.function(builtin, input_signature=spec), args)
    got = _error(tf.function(ours, input_signature=spec), args)
    assert got == want
    assert want[0] is tf.errors.InvalidArgumentError


@pytest.mark.parametrize("name,ours,builtin,shapes", CASES, ids=[c[0] for c in CASES])
def test_eager_shape_errors_match_the_builtin(name, ours, builtin, shapes):
    args = [tf.ones(s) for s in shapes]
    assert _error(ours, args) == _error(builtin, args)
