"""Global batch moments across replicas: exact, and a payload that does not grow with R.

Synchronized batch normalization needs the mean and (biased) variance of the
*global* batch (or of a replica group's batch): every example of every
replica, each replica weighted by the number of values it holds. Two
exchanges implement this, both exact for uneven and empty replicas; the
replica count picks one (`TABLE_MAX_REPLICAS`, set from the measured
crossover, see the README's P5).

Centered sums (above `TABLE_MAX_REPLICAS` replicas)
---------------------------------------------------
Every replica of a group holds the same per-channel reference `r`: the
group's mean at the previous synchronized step (`MeanMemory`, one copy per
replica, written by every replica from the same reduced values), or the
moving mean before the first one. Replica `i` sends

    [n_i, S1_i = sum(x - r), S2_i = sum((x - r)^2)]

that is `2C + 1` floats (`3C` with a mask, whose counts differ by channel),
and after an all-reduce SUM every replica has `N`, `S1`, `S2` and

    o   = S1 / N                    mean = r + o
    var = S2 / N - o^2              biased, as Keras BN

The output is normalized as `(x - r) - o`, so a large channel mean is never
rounded: `x - r` is exact when `x` and `r` are within a factor of 2
(Sterbenz), and `o` is small. The single-pass variance loses precision as
`o^2` grows against `var` (float32 cancellation). What the output needs is
precision relative to `var + epsilon`: the rounding error of `S2 / N` is about
`u * log2(n) * (var + o^2)` (`u` = 6e-8), so while

    o^2 <= CANCELLATION_RATIO * (var + epsilon)          (every channel)

the error stays within `(1 + CANCELLATION_RATIO)` times that of a two-pass
variance, and the mean's within `(1 + sqrt(CANCELLATION_RATIO))` times.
When any channel of any group breaks the bound (the reduced values are the
same everywhere, so every replica decides the same), a **second exchange**
sends `[sum(x - m), sum((x - m)^2)]` (`2C`) around the fresh mean `m` of the
first, which is within rounding of the true mean, so the bound then holds
by a wide margin. With `r` the previous step's mean it fires when the data
move by more than about a standard deviation between two steps: at the
first step from scratch (moving mean 0, data at 1000) and rarely after.

`tf.distribute` sends every replica-context collective through
`merge_call`, which may not sit inside control flow (`tf.cond`), so the
second all-reduce cannot be skipped: it is always issued, and sized at run
time from the reduced values, 2C floats when it fires and **0** otherwise.
The common case therefore moves `2C + 1` floats (Keras's synchronized BN:
`2C + 1` in three all-reduces), in one all-reduce that carries data plus
one empty one; the gradient is the same again, in the backward pass.

Why this and not the alternatives: an all-gather of per-replica rows
(PyTorch) or the table below grows with R; `E[x^2] - E[x]^2` around zero
(Keras) loses every digit at mean 1000, std 0.01; a Chan/Welford combination
needs per-replica means, hence rows; compensated (two-float) sums still
round inside the all-reduce. A reference that every replica already holds
costs no traffic and turns the common case into plain sums, with a
cancellation test that needs nothing but the reduced values.

Row table (R <= `TABLE_MAX_REPLICAS`)
-------------------------------------
Replica `i` fills row `i` of an otherwise-zero `[R, 4C]` table with
`[n_i, s_i, mu_i, M2_i]` (a local shift, the local mean of `x - s_i` and the
two-pass sum of squared deviations); one all-reduce SUM gives every row to
every replica, and Chan's parallel formula combines the rows around the
shift of the replica with most values. Always exactly one collective, no
state; at a few replicas its payload is small and one collective beats two.

Replica groups
--------------
`group_size=k` synchronizes groups of `k` consecutive replicas. The exchange
is still one all-reduce over all replicas (plus the second, usually empty,
one of the centered sums): each replica writes into its group's row of a
`[R / k, P]` buffer (centered sums) or its own row of the table, and every
replica sees every group's statistics. A replica normalizes with its own
group's; the moving statistics blend in the average over groups
(`moving_targets`), the same on every replica, so that mirrored variables
stay identical. The centered payload is `R / k` rows, which grows with R for
a fixed `k`: `tf.distribute` exposes no collective over a replica subset.

Everything stays in the input's float type (float32 works where float64 does
not, e.g. TPUs), and gradients flow through the all-reduce (whose gradient is
again an all-reduce SUM), so they equal those of single-device BN on the
concatenated batch of the group.
"""

import collections

import tensorflow as tf

GlobalMoments = collections.namedtuple(
    "GlobalMoments",
    ["shift", "correction", "mean", "variance", "count", "groups"],
    defaults=[None],
)
# Every group's statistics, `[groups, C]` each (every replica sees them all).
GroupMoments = collections.namedtuple("GroupMoments", ["mean", "variance", "count"])

# Up to this many replicas the [R, 4C] table is used; above it, the centered
# sums. Measured (README, P5; 2-core CPU, logical devices): the table's one
# collective beats the centered sums' two (one usually empty) at 2, 4, 8 and
# 16 replicas, where its payload is still small; the cost of a call there is
# the collective's latency, not its bytes.
TABLE_MAX_REPLICAS = 16
# The second exchange fires when a channel's o^2 > RATIO * (var + epsilon).
CANCELLATION_RATIO = 1.0


def replica_context():
    """Returns the replica context to synchronize over, or `None`.

    `None` means there is nothing to synchronize: no strategy, a strategy of
    one replica, or cross-replica context (e.g. `strategy.scope()` outside
    `strategy.run`), where a layer call sees the whole batch anyway.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def group_size_for(replicas, group_size):
    """The number of replicas per group; raises if `replicas` do not split."""
    if not group_size or group_size == replicas:
        return replicas
    if replicas % group_size:
        raise ValueError(
            f"SyncBatchNormalization cannot split {replicas} replicas into "
            f"groups of {group_size}: the number of replicas must be a multiple "
            f"of `sync_group_size`. Received: sync_group_size={group_size}"
        )
    return group_size


def all_reduce(ctx, value):
    """The layer's only collective: an all-reduce SUM (benchmarks wrap it)."""
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _first_along(x, axes):
    """The first element along each of `axes` (keepdims); zeros if empty."""
    begin = [0] * x.shape.rank
    size = [1 if a in axes else -1 for a in range(x.shape.rank)]
    empty = tf.equal(tf.size(x), 0)
    # A zero-example replica has nothing to slice; its shift is irrelevant
    # because its count is 0, but it must still be finite.
    safe = tf.cond(
        empty,
        lambda: tf.zeros_like(tf.reduce_sum(x, axis=axes, keepdims=True)),
        lambda: tf.slice(x, begin, size),
    )
    return tf.stop_gradient(safe)


def _stat_shape(x, axes):
    """The `keepdims=True` shape of a reduction over `axes` (static if known)."""
    rank = x.shape.rank
    static = [1 if a in axes else x.shape[a] for a in range(rank)]
    if all(d is not None for d in static):
        return static
    keep = tf.constant([a in axes for a in range(rank)])
    return tf.where(keep, tf.ones([rank], tf.int32), tf.shape(x))


def _count(x, axes, mask):
    """Values per channel (keepdims); `mask` is None or a broadcast 0/1 mask."""
    if mask is None:
        n = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        return tf.fill(_stat_shape(x, axes), n)
    return tf.reduce_sum(mask, axes, keepdims=True)


def local_moments(x, axes, mask=None):
    """Shifted two-pass moments of `x` over `axes` on this replica.

    Args:
        x: float tensor.
        axes: list of reduction axes (non-negative).
        mask: optional float tensor broadcastable to `x`, 1 for values that
            count and 0 for those that do not.

    Returns:
        `(count, shift, mean_offset, m2)`, each with `keepdims=True` shape:
        the number of values, the shift, the mean of `x - shift` and the sum
        of squared deviations from the mean.
    """
    shift = _first_along(x, axes)
    d = x - shift
    if mask is not None:
        mask = tf.broadcast_to(mask, tf.shape(x))
    count = _count(x, axes, mask)
    w = (lambda t: t) if mask is None else (lambda t: t * mask)
    mean = tf.math.divide_no_nan(tf.reduce_sum(w(d), axes, keepdims=True), count)
    m2 = tf.reduce_sum(
        w(tf.math.squared_difference(d, tf.stop_gradient(mean))), axes, keepdims=True
    )
    return count, shift, mean, m2


def _place(row, index, rows):
    """`row` as row `index` of an otherwise-zero `[rows, len(row)]` buffer."""
    return tf.pad(row[tf.newaxis], [[index, rows - 1 - index], [0, 0]])


def _channels(stat_shape):
    if isinstance(stat_shape, list):
        n = 1
        for d in stat_shape:
            n *= d
        return n
    return tf.reduce_prod(stat_shape)


def global_moments(x, axes, ctx, mask=None, group_size=None, reference=None,
                   epsilon=1e-3, method=None, memory=None):
    """Count-weighted moments of the global (or group) batch.

    Args:
        x: float tensor (this replica's slice of the batch).
        axes: list of reduction axes (non-negative); the others are channels.
        ctx: a `tf.distribute.ReplicaContext` with more than one replica.
        mask: optional 0/1 tensor broadcastable to `x`.
        group_size: replicas per group; `None` or 0 for all of them.
        reference: `[groups, C]` (or `[C]`, shared) tensor that every
            replica holds identically: where each group's centered sums are
            taken. `None` means 0.
        epsilon: the layer's epsilon (the precision the output needs).
        method: `"table"`, `"centered"` or `None` (by replica count).
        memory: optional `MeanMemory`; the centered sums read their
            reference from it (`reference` where it holds none) and write
            every group's new mean to it.

    Returns:
        A `GlobalMoments` whose fields have `keepdims=True` shape, for this
        replica's group. Normalize with `x - mean == (x - shift) +
        correction`; `count` counts the group's values; `groups` holds every
        group's mean, variance and count, `[groups, C]`.
    """
    replicas = ctx.num_replicas_in_sync
    k = group_size_for(replicas, group_size)
    if mask is not None:
        mask = tf.broadcast_to(tf.cast(mask, x.dtype), tf.shape(x))
    if method is None:
        method = "table" if replicas <= TABLE_MAX_REPLICAS else "centered"
    if method == "table":
        return _table_moments(x, axes, ctx, mask, k)
    groups = replicas // k
    if memory is not None and reference is not None:
        reference = memory.reference(reference, groups)
    moments = _centered_moments(x, axes, ctx, mask, k, reference, epsilon)
    if memory is not None:
        memory.remember(moments.groups)
    if groups == 1:
        # One group: its statistics are the batch statistics.
        moments = moments._replace(groups=None)
    return moments


def _table_moments(x, axes, ctx, mask, k):
    count, shift, mu, m2 = local_moments(x, axes, mask)
    stat_shape = tf.shape(shift)
    row = tf.concat([tf.reshape(t, [-1]) for t in (count, shift, mu, m2)], axis=0)
    replicas = ctx.num_replicas_in_sync
    rid = ctx.replica_id_in_sync_group
    table = all_reduce(ctx, _place(row, rid, replicas))
    # [groups, k, C] each: group g holds rows [g * k, (g + 1) * k).
    counts, shifts, mus, m2s = tf.split(
        tf.reshape(table, [replicas // k, k, -1]), 4, axis=2
    )
    # Every replica sees the same rows, so every one picks the same
    # reference per group: the shift of the replica holding most values.
    pick = tf.one_hot(tf.argmax(counts, axis=1), k, axis=1, dtype=x.dtype)
    reference = tf.reduce_sum(shifts * pick, axis=1, keepdims=True)
    offsets = (shifts - reference) + mus
    total = tf.reduce_sum(counts, axis=1)
    delta = tf.math.divide_no_nan(tf.reduce_sum(counts * offsets, axis=1), total)
    m2 = tf.reduce_sum(m2s, axis=1) + tf.reduce_sum(
        counts * tf.square(offsets - delta[:, tf.newaxis]), axis=1
    )
    variances = tf.math.divide_no_nan(m2, total)
    reference = reference[:, 0]
    group = rid // k
    shape = lambda t: tf.reshape(t, stat_shape)
    groups = None
    if k < replicas:
        groups = GroupMoments(reference + delta, variances, total)
    return GlobalMoments(
        shift=shift,
        correction=(shift - shape(reference[group])) - shape(delta[group]),
        mean=shape(reference[group] + delta[group]),
        variance=shape(variances[group]),
        count=shape(total[group]),
        groups=groups,
    )


def _sums(x, axes, around, mask):
    d = x - around
    if mask is not None:
        d = d * mask
    return tf.reduce_sum(d, axes, keepdims=True), tf.reduce_sum(
        tf.square(d), axes, keepdims=True
    )


def _centered_moments(x, axes, ctx, mask, k, reference, epsilon):
    stat_shape = _stat_shape(x, axes)
    channels = _channels(stat_shape)
    groups = ctx.num_replicas_in_sync // k
    group = ctx.replica_id_in_sync_group // k
    if reference is None:
        reference = tf.zeros([channels], x.dtype)
    r_all = tf.cast(tf.reshape(reference, [-1, channels]), x.dtype)
    r_all = tf.stop_gradient(tf.broadcast_to(r_all, [groups, channels]))
    r = r_all[group]

    s1, s2 = _sums(x, axes, tf.reshape(r, stat_shape), mask)
    flat = lambda t: tf.reshape(t, [-1])
    if mask is None:
        # One count for all channels: the payload is 2C + 1.
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        payload = tf.concat([[count], flat(s1), flat(s2)], 0)
        width = 1
    else:
        payload = tf.concat([flat(tf.reduce_sum(mask, axes)), flat(s1), flat(s2)], 0)
        width = channels
    reduced = all_reduce(ctx, _place(payload, group, groups))
    counts = tf.broadcast_to(reduced[:, :width], [groups, channels])
    all_s1 = reduced[:, width:width + channels]
    all_s2 = reduced[:, width + channels:]
    # [groups, C] each; every replica holds every group's values.
    offsets = tf.math.divide_no_nan(all_s1, counts)
    variances = tf.math.divide_no_nan(all_s2, counts) - tf.square(offsets)
    eps = tf.cast(epsilon, x.dtype)
    # Identical on every replica: all of them decide the same.
    cancelled = tf.reduce_any(
        tf.square(offsets) > CANCELLATION_RATIO * (variances + eps)
    )
    m_all = tf.stop_gradient(r_all + offsets)

    def second_sums():
        t1, t2 = _sums(x, axes, tf.reshape(m_all[group], stat_shape), mask)
        return tf.concat([flat(t1), flat(t2)], 0)

    # tf.distribute routes a collective through `merge_call`, which may not
    # sit inside control flow: the second all-reduce always exists, and the
    # reduced values decide its size, 2C floats per group when needed and 0
    # otherwise.
    row = tf.cond(cancelled, second_sums, lambda: tf.zeros([0], x.dtype))
    again = all_reduce(ctx, _place(row, group, groups))

    def recentred():
        o = tf.math.divide_no_nan(again[:, :channels], counts)
        v = tf.math.divide_no_nan(again[:, channels:], counts) - tf.square(o)
        return m_all, o, v

    shifts, offsets, variances = tf.cond(
        cancelled, recentred, lambda: (r_all, offsets, variances)
    )
    # Rounding can take a single-pass variance a hair below zero.
    variances = tf.nn.relu(variances)
    shape = lambda t: tf.reshape(t, stat_shape)
    return GlobalMoments(
        shift=shape(shifts[group]),
        correction=-shape(offsets[group]),
        mean=shape(shifts[group] + offsets[group]),
        variance=shape(variances[group]),
        count=shape(counts[group]),
        groups=GroupMoments(shifts + offsets, variances, counts),
    )
