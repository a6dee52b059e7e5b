"""Drop-in `matmul` and `matvec` (same signatures, results, static shapes and errors as
tf.linalg.matmul / tf.linalg.matvec)."""

import functools
import itertools

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context, record
from tensorflow.python.framework import composite_tensor, ops

from tf_smallmm._core import builtins, dispatch, engine


def _dispatched_by_builtin(*args):
    """Arguments the built-ins hand to other implementations through TF's API dispatch
    (SparseTensor, RaggedTensor, extension types): those calls go to the built-in as a
    whole, so their results and errors are its own. Variables are composite too, but
    plain dense operands."""
    return any(isinstance(x, composite_tensor.CompositeTensor) and not isinstance(x, tf.Variable)
               for x in args)


def _convert(a, b):
    # The same conversions tf.linalg.matmul makes (b takes a's dtype as a hint).
    if not (context.executing_eagerly() and isinstance(a, ops.EagerTensor)):
        a = ops.convert_to_tensor(a, name="a")
    if not (context.executing_eagerly() and isinstance(b, ops.EagerTensor)):
        b = ops.convert_to_tensor(b, dtype_hint=a.dtype.base_dtype, name="b")
    return a, b


# Sides of the single matrices that _single_small_product sends to the built-in.
SINGLE_MATRIX_MAX = 32


def _single_small_product(sa, sb):
    """Both operands are single matrices (rank 2) of at most SINGLE_MATRIX_MAX sides: the
    per-call cost is all there is to such a product, and the built-in MatMul's is the
    least eagerly (2×2: 45 µs through our op, 27 µs through tf.linalg.matmul; SWEEP.md of
    2026-12-02) and level inside tf.function (2×2 to 32×32: 0.99-1.04×, paired). Both
    modes take the built-in, so eager and tf.function results stay the same bits. Not
    within dispatch.kernels_everywhere()."""
    if sa is None or sb is None or len(sa) != 2 or len(sb) != 2 or None in sa or None in sb:
        return False
    return max(sa + sb) <= SINGLE_MATRIX_MAX and not dispatch.everywhere()


def _shape(t):
    """t's static shape as a tuple (None where unknown), or None for an unknown rank."""
    if isinstance(t, ops.EagerTensor):
        return t._shape_tuple()
    return tuple(t.shape.as_list()) if t.shape.rank is not None else None


@functools.lru_cache(maxsize=4096)
def _product_sizes(sa, sb, transpose_a, transpose_b):
    """What the dispatch model may be asked about for op(a) · op(b) with static shapes sa,
    sb: a tuple of the (M, N, K, product family, per_product) that the run-time shapes can
    give (dispatch.AtLeast where a size is unknown; per_product as in dispatch.choose),
    one where the static shapes decide; or
    None where our kernel must not run because its errors would not be the built-in's:
    ranks below 2 or above the kernel's batch limit, inner or batch sizes that cannot
    match. tf.linalg.matmul then runs and raises its own errors.

    The family is SHARED where an operand is broadcast over a batch axis, except that a B
    shared by every matrix of A runs as one [B·M, K] · [K, N] GEMM: TALL, asked with M of
    one matrix, per_product the pieces of dispatch.folded_rows the CPU kernels run it in
    (a DENSE product of that many rows where TALL was not measured: bfloat16
    [131072, 4, 4] · [4, 4] ran 0.65× the built-in asked as 4×4·4×4, SWEEP.md), and that
    matrix-vector products (N = 1) sharing a broadcast A run as one product with the batch
    axes A lacks as columns: FOLDED, N = dispatch.folded_columns of those axes. Unknown
    batch axes or ranks leave it to the run time: `_run_time_product` decides the same
    way from the shapes then."""
    if (sa is not None and len(sa) < 2) or (sb is not None and len(sb) < 2):
        return None
    if max(len(sa or ()), len(sb or ())) - 2 > dispatch.MAX_BATCH_DIMS:
        return None
    m = sa[-1 if transpose_a else -2] if sa is not None else None
    ka = sa[-2 if transpose_a else -1] if sa is not None else None
    kb = sb[-1 if transpose_b else -2] if sb is not None else None
    n = sb[-2 if transpose_b else -1] if sb is not None else None
    if ka is not None and kb is not None and ka != kb:
        return None
    k = ka if ka is not None else kb
    if sa is not None and sb is not None:
        for da, db in zip(reversed(sa[:-2]), reversed(sb[:-2])):
            if da is not None and db is not None and da != db and 1 not in (da, db):
                return None
    # (M, N, family, per_product's M and N or None), per product the shapes may give.
    one_column = (m, 1)  # FOLDED's per_product: one product of N = 1
    if sa is None or sb is None or None in sa[:-2] + sb[:-2]:
        # Every product the run-time shapes may give: equal batches (DENSE), a broadcast
        # one (SHARED; FOLDED where N may be 1), or B shared by all (TALL, in pieces of
        # at least M rows).
        families = set()
        if sa is None or sb is None or (
                len(sa) == len(sb) and all(None in (da, db) or da == db
                                           for da, db in zip(sa[:-2], sb[:-2]))):
            families.add((m, n, dispatch.DENSE, None))
        if transpose_a or sb is None or any(d != 1 for d in sb[:-2]):
            if n != 1:
                families.add((m, n, dispatch.SHARED, None))
            if n in (1, None):
                families.add((m, None, dispatch.FOLDED, one_column))
        if not transpose_a and (sb is None or all(d in (1, None) for d in sb[:-2])):
            families.add((m, n, dispatch.TALL, (dispatch.AtLeast(m or 1), n)))
    elif len(sa) == len(sb) and sa[:-2] == sb[:-2]:
        families = {(m, n, dispatch.DENSE, None)}
    elif not transpose_a and all(d == 1 for d in sb[:-2]):
        batch = int(np.prod(sa[:-2], dtype=np.int64))
        families = {(m, n, dispatch.TALL,
                     (None if m is None else dispatch.folded_rows(m, batch), n))}
    else:
        lacks = int(np.prod([db for da, db in itertools.zip_longest(
            reversed(sa[:-2]), reversed(sb[:-2]), fillvalue=1) if da == 1], dtype=np.int64))
        families = {(m, dispatch.folded_columns(lacks), dispatch.FOLDED, one_column)
                    if n == 1 else (m, n, dispatch.SHARED, None)}

    def bound(d):
        return dispatch.AtLeast(1) if d is None else d

    return tuple(sorted(((bound(rows), bound(cols), bound(k), family,
                          None if per is None else (bound(per[0]), bound(per[1]), bound(k)))
                         for rows, cols, family, per in families), key=repr))


def _run_time_product(a, b, transpose_a, transpose_b):
    """M, N, K and the product family, as `_product_sizes` decides them from static
    shapes, read from a and b at run time (scalar tensors where the static shapes do not
    know them): (m, n, k, shared, tall, one, rows). shared: SHARED, or FOLDED where one
    (the N of one product) is 1, n then the folded N; tall: TALL, rows then the rows of
    the pieces the kernels run (else m); neither: DENSE."""
    m, n, k = _run_time_sizes(a, b, transpose_a, transpose_b)
    one = n
    # Batch axes (shape[:-2] is empty below rank 2: the branch's op raises the error).
    ba, bb = tf.shape(a, tf.int64)[:-2], tf.shape(b, tf.int64)[:-2]
    rank_a, rank_b = tf.size(ba), tf.size(bb)
    longest = tf.maximum(rank_a, rank_b)
    pa = tf.pad(ba, [[longest - rank_a, 0]], constant_values=1)
    pb = tf.pad(bb, [[longest - rank_b, 0]], constant_values=1)
    same = tf.logical_and(tf.equal(rank_a, rank_b), tf.reduce_all(tf.equal(pa, pb)))
    # N = 1 with A broadcast: the axes A lacks are the columns (1 where nothing is shared).
    if not isinstance(n, int) or n == 1:
        n = tf.where(tf.equal(n, 1), dispatch.folded_columns(
            tf.reduce_prod(tf.where(tf.equal(pa, 1), pb, 1))), n)
    if transpose_a:
        return m, n, k, tf.logical_not(same), tf.constant(False), one, m
    tall = tf.logical_and(tf.logical_not(same), tf.reduce_all(tf.equal(bb, 1)))
    rows = dispatch.folded_rows_at_run_time(tf.cast(m, tf.int64), tf.reduce_prod(ba))
    rows = tf.cast(tf.where(tall, rows, tf.cast(m, tf.int64)), tf.int32)
    return m, n, k, tf.logical_and(tf.logical_not(same), tf.logical_not(tall)), tall, one, rows


def _choice(dtype, sa, sb, sizes):
    """KERNEL, BUILTIN, GRADIENTS or RUNTIME for a product of static shapes sa, sb whose
    `_product_sizes` are `sizes` (None: the built-in)."""
    if sizes is None or _single_small_product(sa, sb):
        return dispatch.BUILTIN
    choices = {dispatch.choose(dtype, *candidate, split=True) for candidate in sizes}
    if len(choices) > 1:  # the split where every reading of the shapes takes it only
        choices = {dispatch.BUILTIN if c == dispatch.GRADIENTS else c for c in choices}
    return choices.pop() if len(choices) == 1 else dispatch.RUNTIME


def _run_time_sizes(a, b, transpose_a, transpose_b):
    """M, N, K as ints where static, else read from a and b at run time. With an unknown
    rank the shape is read padded with 1s, so that a rank below 2 does not fail here but
    in whichever op the branch runs, with that op's error (the built-in's text)."""
    def size(t, i):
        if t.shape.rank is None:
            return tf.concat([[1, 1], tf.shape(t)], 0)[i]
        return t.shape[i] if t.shape[i] is not None else tf.shape(t)[i]

    k = size(a, -2 if transpose_a else -1)
    if not isinstance(k, int):
        k = size(b, -1 if transpose_b else -2)
    return size(a, -1 if transpose_a else -2), size(b, -2 if transpose_b else -1), k


def _check_flags_like_builtin(a, b, transpose_a, adjoint_a, transpose_b, adjoint_b, grad_a,
                              grad_b):
    """tf.linalg.matmul passes its flags to an op that takes only Python bools (or None,
    the default; anything else is a TypeError), after folding transpose into adjoint
    (batch path: either rank unknown or above 2) or adjoint into transpose (two
    matrices). Check the same values in the same way, so that odd flags (0, 1.5, '',
    arrays, ...) raise exactly where the built-in raises."""
    ra, rb = a.shape.rank, b.shape.rank
    if ra is None or ra > 2 or rb is None or rb > 2:
        values = {"adj_x": True if transpose_a else adjoint_a,
                  "adj_y": True if transpose_b else adjoint_b}
    else:
        values = {"transpose_a": True if adjoint_a else transpose_a,
                  "transpose_b": True if adjoint_b else transpose_b}
    values.update(grad_x=grad_a, grad_y=grad_b)
    for arg, value in values.items():
        if value is not None and not isinstance(value, bool):  # None: the attr's default
            raise TypeError(f"Expected bool for argument '{arg}' not {value!r}.")


def matmul(a, b, transpose_a=False, transpose_b=False, adjoint_a=False, adjoint_b=False,
           a_is_sparse=False, b_is_sparse=False, output_type=None, grad_a=False,
           grad_b=False, name=None):
    """Drop-in for `tf.linalg.matmul`: the same arguments, results and errors.

    Small float/complex products run on the SmallMM kernel (batch broadcasting without
    copies, transposes as strides, gradients of broadcast operands summed inside the
    kernel); everything else calls `tf.linalg.matmul` with the same arguments.
    """
    if (type(a) is type(b) is ops.EagerTensor and name is None and output_type is None
            and transpose_a is False and transpose_b is False and adjoint_a is False
            and adjoint_b is False and a_is_sparse is False and b_is_sparse is False
            and grad_a is False and grad_b is False
            and _single_small_product(a._shape_tuple(), b._shape_tuple())):
        # The usual eager call of two small matrices goes straight to the built-in, given
        # no argument it was not given (each costs its dispatch wrapper time: ~5 µs for all
        # nine), with plain comparisons only (this is all per-call cost). Any other call
        # takes the checks below, and on_engine sends it to the built-in too. With one
        # dtype that is the MatMul op, called as tf.linalg.matmul ends up calling it: its
        # Python layers cost ~10 µs of an eager 2×2 product's ~26.
        if a.dtype is b.dtype:
            return builtins.mat_mul(a, b)
        return builtins.matmul(a, b)
    builtin_kwargs = {"transpose_a": transpose_a, "transpose_b": transpose_b,
                      "adjoint_a": adjoint_a, "adjoint_b": adjoint_b, "a_is_sparse": a_is_sparse,
                      "b_is_sparse": b_is_sparse, "output_type": output_type, "grad_a": grad_a,
                      "grad_b": grad_b}
    with ops.name_scope(name, "MatMul", [a, b]) as scope:
        if (transpose_a and adjoint_a) or (transpose_b and adjoint_b):
            return builtins.matmul(a, b, name=scope, **builtin_kwargs)  # raises ValueError
        if a_is_sparse or b_is_sparse or _dispatched_by_builtin(a, b):
            return builtins.matmul(a, b, name=scope, **builtin_kwargs)
        a, b = _convert(a, b)
        _check_flags_like_builtin(a, b, transpose_a, adjoint_a, transpose_b, adjoint_b,
                                  grad_a, grad_b)
        # Past the check every flag is truth-testable (the built-in accepts e.g. a truthy
        # transpose_a on its batch path, where it only ever tests it with `if`).
        result = None
        if output_type is None or output_type == a.dtype:
            result = on_engine(a, b, transpose_a, adjoint_a, transpose_b, adjoint_b, name=scope,
                               fallback=lambda: builtin_matmul(a, b, builtin_kwargs))
        if result is None:
            return builtin_matmul(a, b, builtin_kwargs, name=scope)
        return result


# Where TF's gradient of a B shared by every matrix of A is slower than one GEMM's
# (builtin_matmul): M up to TALL_GRADIENT_MAX_M, or N >= M with K·N of TALL_GRADIENT_MIN_KN
# up. TF's per-matrix products make [G, K, N], N/M times A's size: with N < M that is less
# than A, and their sum was level with one GEMM or faster for bfloat16 and complex (complex64
# A[2048, 32, 32] · B[32, 8]: one GEMM 0.80× tf.linalg.matmul forward+backward,
# SWEEP-xeon-tall.md of 30cc7ba; dB of A[8192, 16, 16] · B[16, 4] alone 0.57-0.63×; Xeon with AMX,
# 2026-12-07), as with K·N < 256 (bfloat16 dB of A[32768, 8, 8] · B[8, 8] 0.91×). Within
# the rule the forward with both gradients ran 1.02-226× tf.linalg.matmul's, the more the
# smaller M (M = 1, K = N = 512 at 11-226×), benchmarks/TALL_GRADIENT-xeon.md (python
# benchmarks/tall_gradient.py).
TALL_GRADIENT_MIN_KN = 256
TALL_GRADIENT_MAX_M = 4


def tall_gradient_applies(m, k, n):
    """Whether builtin_matmul gives A[..., M, K] · B[K, N] (B shared) its one-GEMM gradient."""
    return m <= TALL_GRADIENT_MAX_M or (n >= m and k * n >= TALL_GRADIENT_MIN_KN)


# tf.linalg.matmul's flags at their defaults (`a @ b`).
MATMUL_DEFAULTS = {"transpose_a": False, "transpose_b": False, "adjoint_a": False,
                   "adjoint_b": False, "a_is_sparse": False, "b_is_sparse": False,
                   "output_type": None, "grad_a": False, "grad_b": False}


def one_gemm_gradient(a, b, builtin_kwargs=MATMUL_DEFAULTS):
    """(K, N) where builtin_matmul gives tf.linalg.matmul(a, b, **builtin_kwargs) the
    gradient of one GEMM: a product of a kernel dtype that _product_sizes reads as TALL
    only (B of rank 2 or batch axes of 1 shared by every matrix of A, A not transposed),
    M, K, N static and within tall_gradient_applies, a tape that may record, not under
    dispatch.disabled(); else None."""
    kw = builtin_kwargs
    if (kw["output_type"] is not None or kw["grad_a"] or kw["grad_b"] or kw["a_is_sparse"]
            or kw["b_is_sparse"] or a.dtype != b.dtype
            or a.dtype.base_dtype not in dispatch.SUPPORTED_DTYPES or dispatch.disabled()
            or (context.executing_eagerly() and not record.could_possibly_record())):
        return None
    # The family and sizes as the dispatch reads them: TALL only (B shared, A not transposed).
    sizes = _product_sizes(_shape(a), _shape(b), bool(kw["transpose_a"] or kw["adjoint_a"]),
                           bool(kw["transpose_b"] or kw["adjoint_b"]))
    if sizes is None or len(sizes) != 1 or sizes[0][3] != dispatch.TALL:
        return None
    m, n, k = sizes[0][:3]
    if not all(isinstance(s, int) for s in (m, n, k)) or not tall_gradient_applies(m, k, n):
        return None
    return k, n


def builtin_matmul(a, b, builtin_kwargs=MATMUL_DEFAULTS, name=None):
    """tf.linalg.matmul(a, b, **builtin_kwargs), with one change for a B shared by every
    matrix of A (A[..., M, K] · op(B)[K, N], B of rank 2 or batch axes of 1): its gradient.
    TF's gradient of the broadcasting BatchMatMulV2 forms the [..., K, N] products
    A[i]ᴴ · dC[i] of every matrix and then sums them, which for [4096, 1, 512] · [512, 512]
    is 4 GiB of float32; this gradient is one [K, ·M] · [·M, N] GEMM of the matrices'
    rows stacked (as TF's einsum and Keras's Dense already run such products), and dA one
    [·M, N] · [N, K] GEMM. The forward is the built-in's own op, so results and errors stay
    the built-in's bits; gradients agree to rounding. Where TF's own gradient was the faster
    (tall_gradient_applies), where no tape can record (eager), and under dispatch.disabled()
    (one_gemm_gradient) this is tf.linalg.matmul itself."""
    kw = builtin_kwargs
    sizes = one_gemm_gradient(a, b, kw)
    if sizes is None:
        return builtins.matmul(a, b, name=name, **kw)
    k, n = sizes

    @tf.custom_gradient
    def product(a, b):
        def gradient(dc):
            # The gradients of C = A · B (Bᴴ, Bᵀ) for A's rows stacked: dA = dC · Bᴴ (B, B̄)
            # and dB = Aᴴ · dC ((Aᴴ · dC)ᴴ, its transpose).
            a2, dc2 = tf.reshape(a, [-1, k]), tf.reshape(dc, [-1, n])
            b2 = tf.reshape(b, tf.shape(b)[-2:])
            if kw["adjoint_b"]:
                da, db = builtins.matmul(dc2, b2), builtins.matmul(dc2, a2, adjoint_a=True)
            elif kw["transpose_b"]:
                da = builtins.matmul(dc2, tf.math.conj(b2))
                db = tf.math.conj(builtins.matmul(dc2, a2, adjoint_a=True))
            else:
                da, db = (builtins.matmul(dc2, b2, adjoint_b=True),
                          builtins.matmul(a2, dc2, adjoint_a=True))
            return tf.reshape(da, tf.shape(a)), tf.reshape(db, tf.shape(b))

        return builtins.matmul(a, b, name=name, **kw), gradient

    return product(a, b)


def on_engine(a, b, transpose_a=False, adjoint_a=False, transpose_b=False, adjoint_b=False,
              name=None, fallback=None):
    """op(a) · op(b) on the SmallMM kernel for dense tensors a, b where the dispatch model
    takes it (`_product_sizes`, `dispatch.choose`), else None with nothing added to the
    graph. op transposes (transpose_x) and also conjugates (adjoint_x). Where sizes only
    the run time knows decide (e.g. a None batch folded into M), the result is a tf.cond
    between the kernel and `fallback()` (the same product by the built-in the caller
    replaces); where the model takes the built-in's forward with our gradients
    (dispatch.GRADIENTS), it is `fallback()` with them. Without a fallback such products
    are None too."""
    ta, tb = bool(transpose_a or adjoint_a), bool(transpose_b or adjoint_b)
    sa, sb, dtype = _shape(a), _shape(b), a.dtype.base_dtype
    sizes = _product_sizes(sa, sb, ta, tb) if a.dtype == b.dtype else None
    choice = _choice(dtype, sa, sb, sizes)
    if choice == dispatch.BUILTIN or (choice != dispatch.KERNEL and fallback is None):
        return None
    if choice == dispatch.GRADIENTS:
        return _with_our_gradients(a, b, ta, bool(adjoint_a), tb, bool(adjoint_b), fallback)

    def ours(name=None):
        return engine.product(a, b, transpose_x=ta, conjugate_x=bool(adjoint_a),
                              transpose_y=tb, conjugate_y=bool(adjoint_b), name=name)

    if choice == dispatch.KERNEL:
        return ours(name)
    m, n, k, shared, tall, one, rows = _run_time_product(a, b, ta, tb)
    per_product = {dispatch.FOLDED: (m, one, k), dispatch.TALL: (rows, n, k)}
    wins = {family: dispatch.kernel_wins(dtype, m, n, k, family, per_product.get(family))
            for family in {size[3] for size in sizes}}
    # Where several families are possible, the run-time shapes say which.
    if dispatch.SHARED in wins and dispatch.FOLDED in wins:
        wins[dispatch.SHARED] = tf.where(tf.equal(one, 1), wins.pop(dispatch.FOLDED),
                                         wins[dispatch.SHARED])
    broadcast = wins.pop(dispatch.SHARED, wins.pop(dispatch.FOLDED, None))
    win = wins.pop(dispatch.DENSE, None)
    for flag, other in ((tall, wins.pop(dispatch.TALL, None)), (shared, broadcast)):
        if other is not None:
            win = other if win is None else tf.where(flag, other, win)
    return tf.cond(win, ours, fallback, name=name)


def _with_our_gradients(a, b, ta, ca, tb, cb, forward):
    """forward() (the built-in's op(a) · op(b), ta / tb: transposed, ca / cb: conjugated)
    with our kernels' gradients (dispatch.GRADIENTS). Where no tape can record (eager),
    forward() alone."""
    if context.executing_eagerly() and not record.could_possibly_record():
        return forward()

    @tf.custom_gradient
    def product(a, b):
        def gradient(dc):
            return engine.separate_gradients(a, b, ta, ca, tb, cb, dc)

        return forward(), gradient

    return product(a, b)


def matvec(a, b, transpose_a=False, adjoint_a=False, a_is_sparse=False, b_is_sparse=False,
           name=None):
    """Drop-in for `tf.linalg.matvec`: op(a)[..., M, K] · b[..., K] -> [..., M]."""
    if _dispatched_by_builtin(a, b):
        return builtins.matvec(a, b, transpose_a=transpose_a, adjoint_a=adjoint_a,
                               a_is_sparse=a_is_sparse, b_is_sparse=b_is_sparse, name=name)
    with ops.name_scope(name, "MatVec", [a, b]):
        output = matmul(a, tf.expand_dims(b, axis=-1), transpose_a=transpose_a,
                        adjoint_a=adjoint_a, a_is_sparse=a_is_sparse, b_is_sparse=b_is_sparse)
        return tf.squeeze(output, axis=-1)
