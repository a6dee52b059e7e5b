"""The contraction planner: lowers a two-operand contraction to one `product` call. The
drop-ins `einsum`, `batch_dot` and `dot` and `capsule_predict` all run through it.

A two-operand contraction is written with one label per axis (x, y -> out). Each label is
one of
    batch       in x, y and out
    contracted  in x and y, not in out
    free        in one operand and out
    summed      in one operand only
The planner views both operands as `product`'s operands:
    operand = [batch axes ...] + [two matrix axes]      (matrix axes possibly transposed)
    output  = [kept batch axes ...] + [M, N]
where the matrix axes are (M, K) of the lhs and (K, N) of the rhs, every batch label
is a batch axis of both, a free label is a kept batch axis (the other operand has size 1
there: broadcast, never copied) or part of its operand's M or N, and a contracted or summed
label is part of K or a *reduced* batch axis (summed inside the kernel through
`product`'s batch_shape). Each axis of a view is a run of adjacent axes of the tensor
merged by a reshape, or a size-1 axis the tensor lacks. When the operands' and the
output's label orders agree once the matrix axes are set aside, the views' axes come in
the tensors' own order (preferred). Otherwise they come in another order, which the op
reads through an axis permutation (`product`'s perm_x / perm_y: strides, nothing is
transposed in memory) and writes the output through one (perm_output): attention's
'BTNH,BSNH->BNTS' and 'BNTS,BSNH->BTNH', whose heads axis N sits between the matrix
axes, run as products batched over (B, N) with rows strided by N·H. Either way the
contraction and its gradient run on the engine with no transpose or copy. For 1 or 3+
operands, repeated labels, unknown ranks, pure elementwise / outer products with no
contracted label, unsupported dtypes, big products, XLA without our XLA kernels)
`tf.einsum` runs.

Plans depend only on the labels (the equation and the static ranks), so they are computed
once per trace and cached. Equations are parsed into Contractions by `dropins.einsum`.
"""

import collections
import dataclasses
import functools
import typing

import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import ops
from tensorflow.python.ops import gen_array_ops

from tf_smallmm._core import dispatch, engine

# The name of the tf.cond that sends operands whose sizes do not fit to the built-in (see
# `run`): its false branch holds the built-in, which only runs to raise its own error.
SHAPE_GUARD = "smallmm_if_shapes_fit"


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
    # Each tensor's view as it is reshaped: its axes as groups of labels in the tensor's
    # own order (a group it lacks is a size-1 axis), and the op's permutation attr for it
    # (tf.transpose order; () for none).
    lhs_axes: tuple = ()
    rhs_axes: tuple = ()
    out_axes: tuple = ()
    perm_lhs: tuple = ()
    perm_rhs: tuple = ()
    perm_out: tuple = ()


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


def _adjacent(labels, run):
    """Whether `run` appears in `labels` as adjacent axes, in its order."""
    if not run or run[0] not in labels:
        return False
    i = labels.index(run[0])
    return tuple(labels[i:i + len(run)]) == tuple(run)


def _merge_batch_axes(batch, c):
    """Merges neighbouring batch labels that every tensor sees alike and side by side
    (fewer, larger loops; keeps the batch rank within the kernel's limit). Broadcast labels
    stay alone: merging a size-1 axis with a size-n one would break the broadcast."""
    groups = []
    for label in batch:
        key = (label in c.x, label in c.y, label in c.out)
        if (groups and label not in c.broadcast and groups[-1][1] == key
                and groups[-1][0][-1] not in c.broadcast
                and all(_adjacent(t, (groups[-1][0][-1], label))
                        for t, has in zip((c.x, c.y, c.out), key) if has)):
            groups[-1] = (groups[-1][0] + (label,), key)
        else:
            groups.append(((label,), key))
    return tuple(g for g, _ in groups), tuple(not key[2] for _, key in groups)


def _order(labels, groups):
    """The order of `groups` (axes of the op's view, each a run of `labels` or a group the
    tensor lacks) in the tensor itself: indices into `groups`. A lacking group, a size-1
    axis, stays right after the group before it."""
    keys, last = [], -1
    for g in groups:
        if g and g[0] in labels:
            last = labels.index(g[0])
        keys.append(last)
    return sorted(range(len(groups)), key=keys.__getitem__)


def _identity_as_empty(perm):
    return () if perm == tuple(range(len(perm))) else tuple(perm)


def _with_layouts(c, p):
    """Plan p with the tensors' reshapes and the op's permutations filled in."""
    x_labels, y_labels = (c.x, c.y) if p.lhs_is_x else (c.y, c.x)

    def operand(labels, matrix):
        groups = list(p.batch)
        while groups and not any(label in labels for label in groups[0]):
            groups.pop(0)  # the op broadcasts leading batch axes an operand lacks
        groups += matrix
        order = _order(labels, groups)
        inverse = tuple(order.index(j) for j in range(len(groups)))
        return tuple(groups[i] for i in order), _identity_as_empty(inverse)

    lhs_axes, perm_lhs = operand(x_labels, [p.k, p.m] if p.transpose_lhs else [p.m, p.k])
    rhs_axes, perm_rhs = operand(y_labels, [p.n, p.k] if p.transpose_rhs else [p.k, p.n])
    out_groups = list(p.batch) + [p.m, p.n]
    order = _order(c.out, out_groups)
    return dataclasses.replace(
        p, lhs_axes=lhs_axes, rhs_axes=rhs_axes, perm_lhs=perm_lhs, perm_rhs=perm_rhs,
        out_axes=tuple(out_groups[i] for i in order), perm_out=_identity_as_empty(tuple(order)))


def _maximal_runs(labels, allowed, others):
    """The longest runs of adjacent `labels` drawn from `allowed` that are also adjacent,
    in the same order, in every sequence of `others`."""
    runs = []
    for i in range(len(labels)):
        for j in range(len(labels), i, -1):
            run = tuple(labels[i:j])
            if set(run) <= allowed and all(_adjacent(o, run) for o in others):
                if not any(set(run) <= set(r) for r in runs):
                    runs.append(run)
                break
    return runs


@functools.lru_cache(maxsize=4096)
def plan(c):
    """The best lowering of Contraction `c` to `product`, or None: one that views the
    tensors in their own axis order if there is one (`_dense_plan`), else one that reads
    and writes them through axis permutations (`_permuted_plan`)."""
    if len(set(c.x)) != len(c.x) or len(set(c.y)) != len(c.y):
        return None
    if len(set(c.out)) != len(c.out) or not set(c.out) <= set(c.x) | set(c.y):
        return None
    best = _dense_plan(c) or _permuted_plan(c)
    return None if best is None else _with_layouts(c, best)


def _dense_plan(c):
    """The best plan whose views keep each tensor's axis order, or None.

    Preference: more labels in K (fewer, larger dot products), then larger matrices
    (more labels in M and N: fewer, larger GEMMs with the broadcast operand kept hot),
    then fewer transpose flags, then x as the lhs.
    """
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
                            if len(groups) > dispatch.MAX_BATCH_DIMS:
                                continue
                            score = (kk, mm + nn, -(ta + tb), lhs_is_x)
                            if best_score is None or score > best_score:
                                best_score = score
                                best = Plan(lhs_is_x, groups, reduced, mg, kg, ng, ta, tb)
    return best


def _permuted_plan(c):
    """The best plan whose views may reorder the tensors' axes, or None.

    M, K and N are each a run of labels adjacent in every tensor that has them (longest
    runs only); every other label is a batch axis, in the output's order where it has
    them. Preference: more labels in K, then in M and N, then fewer permuted tensors,
    then x as the lhs.
    """
    out = tuple(c.out)
    best, best_score = None, None
    for lhs_is_x in (True, False):
        a, b = (tuple(c.x), tuple(c.y)) if lhs_is_x else (tuple(c.y), tuple(c.x))
        contracted = (set(a) & set(b)) - set(out)
        free_a, free_b = (set(a) & set(out)) - set(b), (set(b) & set(out)) - set(a)
        for kg in _maximal_runs(a, contracted, [b]):
            for mg in [()] + _maximal_runs(a, free_a, [out]):
                for ng in [()] + _maximal_runs(b, free_b, [out]):
                    # The matrix axes' order inside each tensor is a transpose flag.
                    ta = bool(mg) and a.index(kg[0]) < a.index(mg[0])
                    tb = bool(ng) and b.index(ng[0]) < b.index(kg[0])
                    matrix = set(mg) | set(kg) | set(ng)
                    rest = [[label for label in t if label not in matrix] for t in (out, a, b)]
                    batch = _merge_orders(rest) or _merge_orders(rest[:2]) or tuple(
                        dict.fromkeys(rest[0] + rest[1] + rest[2]))
                    groups, reduced = _merge_batch_axes(batch, c)
                    if len(groups) > dispatch.MAX_BATCH_DIMS:
                        continue
                    p = _with_layouts(c, Plan(lhs_is_x, groups, reduced, mg, kg, ng, ta, tb))
                    permuted = sum(bool(q) for q in (p.perm_lhs, p.perm_rhs, p.perm_out))
                    score = (len(kg), len(mg) + len(ng), -permuted, lhs_is_x)
                    if best_score is None or score > best_score:
                        best, best_score = p, score
    return best


# ------------------------------------------------------------------ running a plan

def _static_dims(c, x_shape, y_shape):
    """{label: static size or None}, or None when the static shapes (lists, None where
    unknown) already contradict the contraction (the built-in then raises its own error).
    A broadcast label's size is left None: the product's output says it."""
    dims = {}
    for labels, shape in ((c.x, x_shape), (c.y, y_shape)):
        for label, d in zip(labels, shape):
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


class _ResultAxis(typing.NamedTuple):
    """An output size read from the product's result (a broadcast label whose size only
    the run time knows): axis `i` of the result."""

    i: int


@dataclasses.dataclass(frozen=True)
class _Lowering:
    """What runs a plan for operands of given sizes: the lhs / rhs views (in the tensors'
    own axis order: the op reads them through the plan's perms), the product's
    batch_shape (None: no batch axis summed), the output's shape, the shared labels
    whose sizes must be checked at run time, and the M, N, K the dispatch model is asked
    about (_dispatch_shape). Sizes are ints where known
    (always in eager mode, where lowerings are cached per shape), else scalar tensors."""

    plan: Plan
    a_shape: tuple
    b_shape: tuple
    batch_shape: tuple  # or None
    out_shape: tuple
    checks: tuple  # (label, size in x, size in y)
    mnk: tuple
    per_product: tuple  # or None: see _folded
    # Eagerly: each shape above as an int32 tensor, made once. The raw ops' fast path takes
    # a shape tensor; a Python list makes them fall back to a conversion costing ~8× the
    # reshape itself.
    tensors: dict = dataclasses.field(default_factory=dict)


def _lower(c, p, dims, own):
    """The _Lowering of plan p of contraction c: `dims` from _static_dims, own(i, label)
    the size of `label` in operand i (0: x, 1: y), 1 where it lacks the label."""
    def size(label):
        """The size of a non-broadcast label (static when either operand knows it)."""
        return dims[label] if dims[label] is not None else own(0 if label in c.x else 1, label)

    # Shared labels whose sizes the static shapes cannot compare: `run` asks at run time.
    checks = []
    for label in sorted(set(c.x) & set(c.y), key=str):
        dx, dy = own(0, label), own(1, label)
        if not (isinstance(dx, int) and isinstance(dy, int)):
            checks.append((label, dx, dy))

    def view(i, axes):
        """Operand i reshaped to its view's axes in its own order; its own sizes, so the
        kernel sees what it really got."""
        return tuple(_prod(own(i, label) for label in g) for g in axes)

    def broadcast_size(label):
        dx, dy = own(0, label), own(1, label)
        if isinstance(dx, int) and isinstance(dy, int):
            return dy if dx == 1 else dx
        return tf.where(tf.equal(dx, 1), dy, dx)

    lhs, rhs = (0, 1) if p.lhs_is_x else (1, 0)
    a_shape = view(lhs, p.lhs_axes)
    b_shape = view(rhs, p.rhs_axes)
    batch_shape = None
    if any(p.reduced):
        batch_shape = tuple(
            1 if red else _prod(broadcast_size(label) if label in c.broadcast else size(label)
                                for label in group)
            for group, red in zip(p.batch, p.reduced))
    # Back to the output's axes: a broadcast label's size is the product's (the static
    # shape then follows TF's broadcasting rule, as tf.einsum's does), every other label's
    # the operands' (merged statically, as tf.einsum's shape function does).
    axis_of = {group[0]: i for i, group in enumerate(p.out_axes) if len(group) == 1}
    out_shape = []
    for label in c.out:
        if label in c.broadcast:
            d = broadcast_size(label)
            out_shape.append(d if isinstance(d, int) else _ResultAxis(axis_of[label]))
        else:
            out_shape.append(size(label))
    m, n, k, _, fold = _dispatch_shape(c, p)
    mnk = [_prod(size(label) for label in labels) for labels in (m, n, k)]
    return _Lowering(p, a_shape, b_shape, batch_shape, tuple(out_shape), tuple(checks),
                     *_folded(mnk, fold))


def _folded(mnk, fold):
    """(M, N, K asked, the per_product sizes of dispatch.choose) from sizes whose side
    `fold` (_dispatch_shape) holds the batch that side is folded from."""
    if fold is None:
        return tuple(mnk), None
    one = list(mnk)
    one[fold] = 1
    mnk = list(mnk)
    mnk[fold] = dispatch.folded_columns(mnk[fold])
    return tuple(mnk), tuple(one)


def _reshape(t, shape, tensors, name=None):
    """t reshaped to `shape` (ints and scalar tensors). Eagerly, a reshape to t's own shape
    is skipped, and the raw op is called with the shape's cached tensor."""
    if context.executing_eagerly():
        return t if t._shape_tuple() == shape else gen_array_ops.reshape(t, tensors[shape])
    return tf.reshape(t, shape, name=name)


def _execute(low, x, y, name=None):
    """The ops of lowering `low` on x, y (operands `run` found to fit): views, the
    product, the output reshape."""
    p = low.plan
    lhs, rhs = (x, y) if p.lhs_is_x else (y, x)
    a = _reshape(lhs, low.a_shape, low.tensors)
    b = _reshape(rhs, low.b_shape, low.tensors)
    # (Only eager lowerings have shape tensors; in a graph the sizes may be tensors,
    # which cannot be dictionary keys.)
    batch_shape = low.tensors.get(low.batch_shape) if low.tensors else low.batch_shape
    result = engine.product(a, b, transpose_x=p.transpose_lhs, transpose_y=p.transpose_rhs,
                            batch_shape=batch_shape, perm_x=p.perm_lhs, perm_y=p.perm_rhs,
                            perm_output=p.perm_out)
    shape = [d if not isinstance(d, _ResultAxis) else
             result.shape[d.i] if result.shape[d.i] is not None else tf.shape(result)[d.i]
             for d in low.out_shape]
    return _reshape(result, tuple(shape), low.tensors, name=name)


@functools.lru_cache(maxsize=4096)
def _family(c, p):
    """The dispatch model's product family of plan p: SHARED when an operand lacks one of
    the batch groups (it is broadcast over it) or a batch group is summed in the kernel."""
    shared = any(p.reduced) or any(not any(label in labels for label in group)
                                   for group in p.batch for labels in (c.x, c.y))
    return dispatch.SHARED if shared else dispatch.DENSE


@functools.lru_cache(maxsize=4096)
def _dispatch_shape(c, p):
    """What the dispatch model is asked about plan p: (M, N, K labels, product family,
    fold). Without a batch axis common to both operands the built-in runs the contraction
    as one GEMM (each operand's own free axes fold into its side: keras `dot` of
    [4096,8,16] and [32,16,4] is [32768,16]·[16,128]), so M and N take those axes and the
    family is DENSE; otherwise the engine's product itself, with _family. fold is None,
    or the index (0: M, 1: N) of a side the kernels fill from the batch: matrix-vector
    products sharing the matrix along batch axes run as one product with those axes as
    columns (capsule prediction W[i] · u[b, i] for all b is one 160×8 · 8×B product), so
    that side's labels are those axes and its size is dispatch.folded_columns of theirs."""
    lhs, rhs = (c.x, c.y) if p.lhs_is_x else (c.y, c.x)
    # (Output batch axes only: a summed one is not an output loop the kernels can fold.)
    kept = [g for g, summed in zip(p.batch, p.reduced) if not summed]
    only_lhs = tuple(label for g in kept if not any(x in rhs for x in g) for label in g)
    only_rhs = tuple(label for g in kept if not any(x in lhs for x in g) for label in g)
    if p.batch and not any(p.reduced) and \
            len(only_lhs) + len(only_rhs) == sum(len(g) for g in p.batch):
        return p.m + only_lhs, p.n + only_rhs, p.k, dispatch.DENSE, None
    # (As FoldLoopsIntoMatrix, cc/engine/plan.cc: N = 1 first, then M = 1.)
    if not p.n and only_rhs:
        return p.m, only_rhs, p.k, dispatch.FOLDED, 1
    if not p.m and only_lhs:
        return only_lhs, p.n, p.k, dispatch.FOLDED, 0
    return p.m, p.n, p.k, _family(c, p), None


@functools.lru_cache(maxsize=4096)
def _eager_lowering(c, x_shape, y_shape):
    """The lowering of c for operands of these (fully known) shapes, or None (no plan,
    or shapes the built-in rejects). Cached: eager calls repeat the same shapes."""
    p = plan(c)
    if p is None or len(x_shape) != len(c.x) or len(y_shape) != len(c.y):
        return None
    dims = _static_dims(c, x_shape, y_shape)
    if dims is None:
        return None
    shapes = (dict(zip(c.x, x_shape)), dict(zip(c.y, y_shape)))
    low = _lower(c, p, dims, lambda i, label: shapes[i].get(label, 1))
    for shape in (low.a_shape, low.b_shape, low.batch_shape, low.out_shape):
        if shape is not None:
            low.tensors[shape] = tf.constant(shape, tf.int32)
    return low


def run(c, x, y, fallback, name=None):
    """Contraction `c` of tensors x, y on the engine, or None when it should not run
    there: no plan, static shapes that the built-in rejects, or the dispatch model prefers
    the built-in. Nothing is added to the graph when the answer is None.

    `fallback()` computes the same contraction with the built-in the caller replaces
    (`builtins`, never a possibly patched public name). The graph branches to it at run
    time (tf.cond) where sizes known only then decide: operands that do not fit (the
    SHAPE_GUARD cond; the built-in raises its own error, with its own text), or a
    dispatch-model answer that depends on them (`dispatch.kernel_wins`)."""
    if x.dtype != y.dtype:
        return None
    dtype = x.dtype.base_dtype
    if context.executing_eagerly():  # every size known: a cached lowering, no graph work
        low = _eager_lowering(c, x._shape_tuple(), y._shape_tuple())
        if low is None or dispatch.choose(dtype, *low.mnk, _dispatch_shape(c, low.plan)[3],
                                          low.per_product) != dispatch.KERNEL:
            return None
        return _execute(low, x, y)
    p = plan(c)
    if p is None or x.shape.rank != len(c.x) or y.shape.rank != len(c.y):
        return None
    dims = _static_dims(c, x.shape.as_list(), y.shape.as_list())
    if dims is None:
        return None

    def bound(labels):
        """The size of merged `labels`: an int, or AtLeast the product of the known."""
        sizes = [dims[label] for label in labels]
        known = _prod(s for s in sizes if s is not None)
        return dispatch.AtLeast(known) if None in sizes else known

    m, n, k, family, fold = _dispatch_shape(c, p)
    mnk, per_product = _folded([bound(m), bound(n), bound(k)], fold)
    choice = dispatch.choose(dtype, *mnk, family, per_product)
    if choice == dispatch.BUILTIN or (choice == dispatch.RUNTIME and fallback is None):
        return None
    with ops.name_scope(name, "einsum", [x, y]) as scope:
        dynamic_shapes = {}

        def own(i, label):
            """The size of `label` in operand i itself (1 if it lacks it): static when it
            knows it, else read at run time."""
            t, labels = (x, c.x) if i == 0 else (y, c.y)
            if label not in labels:
                return 1
            j = labels.index(label)
            if t.shape[j] is not None:
                return t.shape[j]
            if i not in dynamic_shapes:
                dynamic_shapes[i] = tf.shape(t)
            return dynamic_shapes[i][j]

        low = _lower(c, p, dims, own)
        # Shared labels must match exactly (tf.einsum does not broadcast named axes);
        # broadcast labels must broadcast. What the static shapes cannot tell (they did not
        # contradict it) is asked at run time: operands that do not fit go to the built-in,
        # which raises its own error, with its own text.
        fits = []
        for label, dx, dy in low.checks:
            same = tf.equal(dx, dy)
            if label in c.broadcast:
                same = tf.logical_or(same, tf.logical_or(tf.equal(dx, 1), tf.equal(dy, 1)))
            fits.append(same)
        wins = [] if choice == dispatch.KERNEL else [
            dispatch.kernel_wins(dtype, *low.mnk, family, low.per_product)]
        if not fits and not wins:
            return _execute(low, x, y, name=scope)
        shapes = []

        def engine_branch():
            shapes.append(_execute(low, x, y))
            return shapes[-1]

        result = tf.cond(tf.reduce_all(tf.stack(fits + wins)), engine_branch, fallback,
                         name=SHAPE_GUARD if fits else None)
        # Where the fallback runs, the operands fit and its result has the engine's shape,
        # or it raises; its static shape (tf_keras' batch_dot may lose even the rank) must
        # not widen the result's.
        result.set_shape(shapes[-1].shape)
        return tf.identity(result, name=scope)
