"""Drop-in `einsum`: parses a two-operand equation into a Contraction (labels per axis,
ellipsis axes spelled out) and runs it through the contraction planner
(`tf_smallmm._core.contraction`); everything the planner does not take goes to TensorFlow's
own einsum.
"""

import collections
import functools
import re

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import composite_tensor, ops

from tf_smallmm._core import builtins, contraction

_OPERAND = r"[a-zA-Z]*(?:\.\.\.)?[a-zA-Z]*"
_EQUATION = re.compile(rf"^({_OPERAND}),({_OPERAND})(?:->({_OPERAND}))?$")


def _expand(subscripts, rank, ellipsis_rank):
    """Labels of one operand with its ellipsis axes spelled out as ('...', i) labels,
    right-aligned against the widest operand."""
    if "..." not in subscripts:
        return tuple(subscripts) if len(subscripts) == rank else None
    head, tail = subscripts.split("...")
    own = rank - len(head) - len(tail)
    if own < 0:
        return None
    return (tuple(head) + tuple(("...", ellipsis_rank - own + i) for i in range(own))
            + tuple(tail))


@functools.lru_cache(maxsize=4096)
def parse(equation, rank_x, rank_y):
    """The Contraction a two-operand equation describes at these ranks, or None when it
    is not one (the built-in decides what it means, or raises)."""
    match = _EQUATION.match(equation.replace(" ", ""))
    if not match:
        return None
    xs, ys, outs = match.groups()
    if outs is None:  # implicit output, as tf.einsum: labels seen once, sorted, '...' first
        counts = collections.Counter(xs.replace("...", "0") + ys.replace("...", "0"))
        outs = "".join(label for label in sorted(counts) if counts[label] == 1)
        outs = outs.replace("0", "...")
    own = [rank - len(s.replace("...", "")) for s, rank in ((xs, rank_x), (ys, rank_y))
           if "..." in s]
    ellipsis_rank = max(own, default=0)
    x, y = _expand(xs, rank_x, ellipsis_rank), _expand(ys, rank_y, ellipsis_rank)
    if x is None or y is None:
        return None
    if "..." in outs:
        out = _expand(outs, len(outs) - 3 + ellipsis_rank, ellipsis_rank)
    elif ellipsis_rank:
        return None  # broadcast axes without '...' in the output: an error for the built-in
    else:
        out = tuple(outs)
    broadcast = frozenset(label for label in set(x) & set(y) if isinstance(label, tuple))
    return contraction.Contraction(x, y, out, broadcast)


def _as_tensor(t):
    """t as a dense tensor when tf.einsum would take it as one (tensors, tf / Keras
    variables, numpy arrays); None for anything else (ragged, sparse, Python lists), which
    goes to the built-in as is."""
    if isinstance(t, ops.EagerTensor):  # the common eager case, without the conversion
        return t
    # (tf.Variable is itself a CompositeTensor, hence the order.)
    if not isinstance(t, (tf.Variable, np.ndarray)) and (
            isinstance(t, composite_tensor.CompositeTensor) or not tf.is_tensor(t)):
        return None
    try:
        return ops.convert_to_tensor(t)
    except (TypeError, ValueError):
        return None


def einsum(equation, *inputs, **kwargs):
    """Drop-in for `tf.einsum`: the same equations, arguments, results, static shapes and
    errors.

    Two-operand equations that are a batched matmul / matvec / dot product of views of
    the operands (see `contraction.plan`) run on the SmallMM kernels, forward and backward,
    without transposes or copies: e.g. 'ijkl,bil->bijk' (capsule prediction),
    'bij,bjk->bik', 'bij,bj->bi', 'bhqd,bhkd->bhqk', 'BTNH,BSNH->BNTS' (attention scores
    with the heads axis between the matrix axes), '...ij,...jk->...ik', 'bij,bjk->bk'.
    Everything else calls TensorFlow's einsum with the same arguments.
    """
    result = on_engine(equation, *inputs, **kwargs)
    return result if result is not None else builtins.einsum(equation, *inputs, **kwargs)


def on_engine(equation, *inputs, **kwargs):
    """`einsum(equation, *inputs, **kwargs)` where it runs on the SmallMM kernels, else None
    with nothing added to the graph."""
    if len(inputs) == 2 and isinstance(equation, str) and set(kwargs) <= {"name", "optimize"}:
        x, y = _as_tensor(inputs[0]), _as_tensor(inputs[1])
        if x is not None and y is not None and None not in (x.shape.rank, y.shape.rank):
            c = parse(equation, x.shape.rank, y.shape.rank)
            if c is not None:
                return contraction.run(
                    c, x, y, lambda: builtins.einsum(equation, *inputs, **kwargs),
                    name=kwargs.get("name"))
    return None
