"""Drop-in `einsum` and the contraction planner that `batch_dot`, `dot` and
`capsule_predict` share.

A two-operand contraction is written with one label per axis (x, y -> out). Each label is
one of
    batch       in x, y and out
    contracted  in x and y, not in out
    free        in one operand and out
    summed      in one operand only
The planner looks for a way to view both operands, by reshapes that only merge adjacent
axes or insert size-1 axes, as `product`'s operands:
    operand = [batch axes ...] + [two matrix axes]      (matrix axes possibly transposed)
    output  = [kept batch axes ...] + [M, N]
where the matrix axes are (M, K) of the lhs and (K, N) of the rhs, every batch label
is a batch axis of both, a free label is a kept batch axis (the other operand has size 1
there: broadcast, never copied) or part of its operand's M or N, and a contracted or summed
label is part of K or a *reduced* batch axis (summed inside the kernel through
`product`'s batch_shape). Such a view exists exactly when the operands' and the output's
label orders agree once the matrix axes are set aside; then the contraction runs on the
engine with no transpose or copy, and its gradient does too. Otherwise (and for 1 or 3+
operands, repeated labels, unknown ranks, pure elementwise / outer products with no
contracted label, unsupported dtypes, big products, XLA) `tf.einsum` runs.

Plans depend only on the labels (the equation and the static ranks), so they are computed
once per trace and cached.
"""

import collections
import dataclasses
import functools
import re

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import composite_tensor, ops

from tf_smallmm import _dispatch, _ops

# `product` supports this many batch axes (kMaxBatchDims in cc/kernels/smallmm.h).
_MAX_BATCH_AXES = 8


@dataclasses.dataclass(frozen=True)
class Contraction:
    """out[out] = Σ x[x] · y[y] over the labels missing from `out`. Labels are unique
    within each tuple. Labels in `broadcast` (ellipsis axes, Keras' batch axis) broadcast
    1 against n like tf.matmul's batch axes; every other shared label must match in size."""

    x: tuple
    y: tuple
    out: tuple
    broadcast: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a Contraction runs as one `product` call (see the module docstring)."""

    lhs_is_x: bool
    batch: tuple  # the batch axes, outermost first; each a tuple of merged labels
    reduced: tuple  # per batch axis: summed inside the kernel
    m: tuple  # labels merged into M (from the lhs), K (both), N (from the rhs)
    k: tuple
    n: tuple
    transpose_lhs: bool  # lhs matrix axes are (K, M) instead of (M, K)
    transpose_rhs: bool  # rhs matrix axes are (N, K) instead of (K, N)


def _merge_orders(sequences):
    """A sequence containing every label of `sequences` in an order consistent with each
    of them (a topological sort of their successions), or None if they conflict."""
    order = []
    for seq in sequences:
        order.extend(label for label in seq if label not in order)
    rank = {label: i for i, label in enumerate(order)}
    after = collections.defaultdict(set)
    for seq in sequences:
        for a, b in zip(seq, seq[1:]):
            after[a].add(b)
    indegree = collections.Counter(b for a in after for b in after[a])
    ready = [label for label in order if indegree[label] == 0]
    merged = []
    while ready:
        ready.sort(key=rank.get)
        label = ready.pop(0)
        merged.append(label)
        for b in after[label]:
            indegree[b] -= 1
            if indegree[b] == 0:
                ready.append(b)
    return tuple(merged) if len(merged) == len(order) else None


def _merge_batch_axes(batch, c):
    """Merges neighbouring batch labels that every tensor sees alike (fewer, larger
    loops; keeps the batch rank within the kernel's limit). Broadcast labels stay alone:
    merging a size-1 axis with a size-n one would break the broadcast."""
    groups = []
    for label in batch:
        key = (label in c.x, label in c.y, label in c.out)
        if (groups and label not in c.broadcast and groups[-1][1] == key
                and groups[-1][0][-1] not in c.broadcast):
            groups[-1] = (groups[-1][0] + (label,), key)
        else:
            groups.append(((label,), key))
    return tuple(g for g, _ in groups), tuple(not key[2] for _, key in groups)


@functools.lru_cache(maxsize=4096)
def plan(c):
    """The best transpose-free lowering of Contraction `c` to `product`, or None.

    Preference: more labels in K (fewer, larger dot products), then larger matrices
    (more labels in M and N: fewer, larger GEMMs with the broadcast operand kept hot),
    then fewer transpose flags, then x as the lhs.
    """
    if len(set(c.x)) != len(c.x) or len(set(c.y)) != len(c.y):
        return None
    if len(set(c.out)) != len(c.out) or not set(c.out) <= set(c.x) | set(c.y):
        return None
    out = tuple(c.out)
    best, best_score = None, None
    for lhs_is_x in (True, False):
        a, b = (tuple(c.x), tuple(c.y)) if lhs_is_x else (tuple(c.y), tuple(c.x))
        contracted = (set(a) & set(b)) - set(out)
        for nn in range(len(out) + 1):
            ng = out[len(out) - nn:]
            if any(label not in b or label in a for label in ng):
                break
            for mm in range(len(out) - nn + 1):
                mg = out[len(out) - nn - mm:len(out) - nn]
                if any(label not in a or label in b for label in mg):
                    break
                kept = out[:len(out) - nn - mm]
                for kk in range(1, len(contracted) + 1):
                    if mm + kk > len(a) or nn + kk > len(b):
                        break
                    for ta in (False, True) if mm else (False,):
                        suffix = a[len(a) - mm - kk:]
                        kg = suffix[:kk] if ta else suffix[mm:]
                        if (suffix[kk:] if ta else suffix[:mm]) != mg:
                            continue
                        if not set(kg) <= contracted:
                            continue
                        for tb in (False, True) if nn else (False,):
                            if b[len(b) - nn - kk:] != ((ng + kg) if tb else (kg + ng)):
                                continue
                            batch = _merge_orders(
                                [kept, a[:len(a) - mm - kk], b[:len(b) - nn - kk]])
                            if batch is None:
                                continue
                            groups, reduced = _merge_batch_axes(batch, c)
                            if len(groups) > _MAX_BATCH_AXES:
                                continue
                            score = (kk, mm + nn, -(ta + tb), lhs_is_x)
                            if best_score is None or score > best_score:
                                best_score = score
                                best = Plan(lhs_is_x, groups, reduced, mg, kg, ng, ta, tb)
    return best


# ------------------------------------------------------------------ running a plan

def _static_dims(c, x, y):
    """{label: static size or None}, or None when the static shapes already contradict the
    contraction (the built-in then raises its own error). A broadcast label's size is left
    None: the product's output says it."""
    dims = {}
    for labels, t in ((c.x, x), (c.y, y)):
        for label, d in zip(labels, t.shape.as_list()):
            prev = dims.get(label)
            if (prev is not None and d is not None and d != prev
                    and (label not in c.broadcast or 1 not in (prev, d))):
                return None
            if prev is None:
                dims[label] = d
    for label in c.broadcast:
        dims[label] = None
    return dims


def _prod(values):
    """Product of sizes (ints and scalar tensors) without multiplying by constant 1s."""
    out = 1
    for v in values:
        if isinstance(v, int) and v == 1:
            continue
        out = v if isinstance(out, int) and out == 1 else out * v
    return out


def run(c, x, y, name=None):
    """Contraction `c` of tensors x, y on the engine, or None when it should not run
    there (no plan, static shapes that the built-in rejects, dispatch policy). Nothing is
    added to the graph when the answer is None."""
    p = plan(c)
    if p is None or x.dtype != y.dtype:
        return None
    if x.shape.rank != len(c.x) or y.shape.rank != len(c.y):
        return None
    dims = _static_dims(c, x, y)
    if dims is None:
        return None

    def static_size(labels):
        sizes = [dims[label] for label in labels]
        return None if None in sizes else _prod(sizes)

    m, n, k = static_size(p.m), static_size(p.n), static_size(p.k)
    macs = m * n * k if None not in (m, n, k) else None
    if not _dispatch.use_kernel(x.dtype.base_dtype, macs):
        return None

    with ops.name_scope(name, "einsum", [x, y]) as scope:
        dynamic_shapes = {}

        def own(t, labels, label):
            """The size of `label` in t itself (1 if t lacks it): static when t knows it."""
            if label not in labels:
                return 1
            i = labels.index(label)
            if t.shape[i] is not None:
                return t.shape[i]
            if id(t) not in dynamic_shapes:
                dynamic_shapes[id(t)] = tf.shape(t)
            return dynamic_shapes[id(t)][i]

        def size(label):
            """The size of a non-broadcast label (static when either operand knows it)."""
            if dims[label] is not None:
                return dims[label]
            return own(x, c.x, label) if label in c.x else own(y, c.y, label)

        # Shared labels must match exactly (tf.einsum does not broadcast named axes): the
        # kernel checks K when it is a single label, the rest is checked here at run time
        # when the static shapes cannot tell.
        checks = []
        for label in sorted(set(c.x) & set(c.y) - c.broadcast, key=str):
            if p.k == (label,):
                continue
            dx, dy = own(x, c.x, label), own(y, c.y, label)
            if not (isinstance(dx, int) and isinstance(dy, int)):
                checks.append(tf.debugging.assert_equal(
                    dx, dy, message=f"einsum: label {label!r} has different sizes in the inputs"))

        def view(t, labels, matrix):
            """t reshaped to [batch axes it has, outermost dropped if it lacks them] + the
            two matrix axes; its own sizes, so the kernel sees what it really got."""
            groups = list(p.batch)
            while groups and not any(label in labels for label in groups[0]):
                groups.pop(0)
            shape = [_prod(own(t, labels, label) for label in g) for g in groups + matrix]
            return tf.reshape(t, shape)

        lhs, rhs = (x, y) if p.lhs_is_x else (y, x)
        lhs_labels, rhs_labels = (c.x, c.y) if p.lhs_is_x else (c.y, c.x)
        with tf.control_dependencies(checks):
            a = view(lhs, lhs_labels, [p.k, p.m] if p.transpose_lhs else [p.m, p.k])
            b = view(rhs, rhs_labels, [p.n, p.k] if p.transpose_rhs else [p.k, p.n])

        def broadcast_size(label):
            dx, dy = own(x, c.x, label), own(y, c.y, label)
            if isinstance(dx, int) and isinstance(dy, int):
                return dy if dx == 1 else dx
            return tf.where(tf.equal(dx, 1), dy, dx)

        batch_shape = None
        if any(p.reduced):
            batch_shape = [
                1 if red else _prod(broadcast_size(label) if label in c.broadcast
                                    else size(label) for label in group)
                for group, red in zip(p.batch, p.reduced)]
        result = _ops.product(a, b, transpose_x=p.transpose_lhs, transpose_y=p.transpose_rhs,
                              batch_shape=batch_shape)

        # Back to the output's axes: a broadcast label's size is the product's (the static
        # shape then follows TF's broadcasting rule, as tf.einsum's does), every other
        # label's the operands' (merged statically, as tf.einsum's shape function does).
        axis_of = {group[0]: i for i, group in enumerate(p.batch) if len(group) == 1}
        out_shape = []
        for label in c.out:
            if label in c.broadcast:
                i = axis_of[label]
                d = result.shape[i]
                if d is None:
                    if id(result) not in dynamic_shapes:
                        dynamic_shapes[id(result)] = tf.shape(result)
                    d = dynamic_shapes[id(result)][i]
                out_shape.append(d)
            else:
                out_shape.append(size(label))
        return tf.reshape(result, out_shape, name=scope)


# ------------------------------------------------------------------ einsum equations

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
    return Contraction(x, y, out, broadcast)


def _as_tensor(t):
    """t as a dense tensor when tf.einsum would take it as one (tensors, tf / Keras
    variables, numpy arrays); None for anything else (ragged, sparse, Python lists), which
    goes to the built-in as is."""
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

    Two-operand equations that are a batched matmul / matvec / dot product under reshape
    views (see `plan`) run on the SmallMM kernels, forward and backward, without
    transposes or copies: e.g. 'ijkl,bil->bijk' (capsule prediction), 'bij,bjk->bik',
    'bij,bj->bi', 'bhqd,bhkd->bhqk', '...ij,...jk->...ik', 'bij,bjk->bk'. Everything else
    calls `tf.einsum(equation, *inputs, **kwargs)`.
    """
    if len(inputs) == 2 and isinstance(equation, str) and set(kwargs) <= {"name", "optimize"}:
        x, y = _as_tensor(inputs[0]), _as_tensor(inputs[1])
        if x is not None and y is not None and None not in (x.shape.rank, y.shape.rank):
            c = parse(equation, x.shape.rank, y.shape.rank)
            if c is not None:
                result = run(c, x, y, name=kwargs.get("name"))
                if result is not None:
                    return result
    return tf.einsum(equation, *inputs, **kwargs)
