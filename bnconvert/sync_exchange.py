"""The two exchanges of `bnconvert.sync_stats` and their gradient.

`global_moments` runs the row table or the centered sums (the algorithms, the
error analysis and the choice between them are in `bnconvert.sync_stats`)
inside a `tf.custom_gradient`, whose gradient `_exchange_gradient` writes out:
one all-reduce of `2C` upstream sums instead of autodiff through the casts,
stacks, slices and collective of the exchange. Each call is one all-reduce
forward and one backward.
"""

import tensorflow as tf

from bnconvert import sync_stats


def _place(row, index, rows):
    """`row` (`[1, P]`) as row `index` of an otherwise-zero `[rows, P]` buffer."""
    # A scatter: its gradient is one gather (a pad's takes nine ops).
    indices = [[index]] if isinstance(index, int) else tf.reshape(index, [1, 1])
    width = row.shape[1] if row.shape[1] is not None else tf.shape(row)[1]
    return tf.scatter_nd(indices, row, [rows, width])


def _group_stats(stats, group, stat_shape, dtype=None):
    """Row `group` of each of `stats` (`[groups, ...]`), in `stat_shape`:
    one stack, slice (none for one group), reshape and unstack for all."""
    stacked = tf.stack(stats, axis=1)
    if stacked.shape[0] != 1:
        stacked = stacked[group]
    stacked = tf.cast(stacked, dtype or stacked.dtype)
    shape = [len(stats)] + stat_shape if isinstance(stat_shape, list) else (
        tf.concat([[len(stats)], stat_shape], 0))
    return tf.unstack(tf.reshape(stacked, shape))


def global_moments(x, axes, ctx, mask=None, group_size=None, reference=None,
                   method=None, memory=None):
    """Count-weighted moments of the global (or group) batch, in one all-reduce.

    Args:
        x: float tensor (this replica's slice of the batch).
        axes: list of reduction axes (non-negative); the others are channels.
        ctx: a `tf.distribute.ReplicaContext` with more than one replica.
        mask: optional 0/1 tensor broadcastable to `x`.
        group_size: replicas per group; `None` or 0 for all of them.
        reference: `[groups, C]` (or `[C]`, shared) tensor that every
            replica holds identically: where each group's centered sums are
            taken. `None` means 0.
        method: `"table"`, `"centered"` or `None` (`method_for`).
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
    k = sync_stats.group_size_for(replicas, group_size)
    if mask is not None:
        mask = tf.broadcast_to(tf.cast(mask, x.dtype), tf.shape(x))
    if method is None:
        method = sync_stats.method_for(replicas, ctx.strategy)
    groups = replicas // k
    if method == "centered" and memory is not None and reference is not None:
        reference = memory.reference(reference, groups)
    forward = {}

    @tf.custom_gradient
    def exchange(x):
        if method == "table":
            m = _table_moments(x, axes, ctx, mask, k)
        else:
            m = _centered_moments(x, axes, ctx, mask, k, reference)
        forward["moments"] = m

        def grad(d_centered, d_correction, d_variance):
            return _exchange_gradient(
                ctx, k, m, mask, d_centered, d_correction, d_variance)

        return (m.centered, m.correction, m.variance), grad

    centered, correction, variance = exchange(x)
    moments = forward["moments"]._replace(
        centered=centered, correction=correction, variance=variance)
    if method == "table":
        return moments
    if memory is not None:
        memory.remember(moments.groups)
    if groups == 1:
        # One group: its statistics are the batch statistics.
        return moments._replace(groups=None)
    # Every group's float64 statistics, in the input's type.
    return moments._replace(
        groups=sync_stats.GroupMoments(*(tf.cast(t, x.dtype) for t in moments.groups))
    )


def _exchange_gradient(ctx, k, m, mask, d_centered, d_correction, d_variance):
    """The gradient of `(centered, correction, variance)` with respect to `x`.

    Every value `x_j` of the group's batch enters the group's mean with
    weight `1 / N` and its variance with `2 (x_j - mean) / N`; `correction`
    is `-mean` plus terms without gradient. So, with `Gc` and `Gv` the sums
    over the group's replicas of the upstream gradients of `correction` and
    `variance` (one all-reduce of `2C` values):

        dx = d_centered + mask * (2 Gv (x - mean) - Gc) / N,

    `x - mean` being `centered + correction`.
    """
    zeros = lambda d, like: tf.zeros_like(like) if d is None else d
    d_correction = zeros(d_correction, m.correction)
    d_variance = zeros(d_variance, m.variance)
    stat_shape = sync_stats.stat_shape(m.correction, [])
    payload = tf.reshape(tf.stack([d_correction, d_variance]), [1, -1])
    groups = ctx.num_replicas_in_sync // k
    if groups == 1:
        summed = sync_stats.all_reduce(ctx, payload)
    else:
        group = sync_stats.replica_index(ctx) // k
        summed = sync_stats.all_reduce(ctx, _place(payload, group, groups))[group]
    shape = [2] + stat_shape if isinstance(stat_shape, list) else (
        tf.concat([[2], stat_shape], 0))
    g_correction, g_variance = tf.unstack(tf.reshape(summed, shape))
    inverse = sync_stats.reciprocal(m.count)
    dx = (2.0 * g_variance * (m.centered + m.correction) - g_correction) * inverse
    if mask is not None:
        dx = dx * mask
    return dx if d_centered is None else dx + d_centered


def _table_moments(x, axes, ctx, mask, k):
    centered, count, shift, mu, m2 = sync_stats.shifted_moments(x, axes, mask, prune=False)
    stat_shape = sync_stats.stat_shape(x, axes)
    replicas = ctx.num_replicas_in_sync
    rid = sync_stats.replica_index(ctx)
    row = tf.reshape(tf.stack([count, shift, mu, m2]), [1, -1])
    table = sync_stats.all_reduce(ctx, _place(row, rid, replicas))
    # [groups, k, C] each: group g holds rows [g * k, (g + 1) * k).
    counts, shifts, mus, m2s = tf.unstack(
        tf.reshape(table, [replicas // k, k, 4, -1]), axis=2
    )
    # Every replica sees the same rows, so every one takes the same
    # reference per group: the count-weighted mean of the shifts, which lies
    # among them (0 for an empty group).
    total = tf.reduce_sum(counts, axis=1, keepdims=True)
    inverse = sync_stats.reciprocal(total)
    reference = tf.reduce_sum(counts * shifts, axis=1, keepdims=True) * inverse
    offsets = (shifts - reference) + mus
    delta = tf.reduce_sum(counts * offsets, axis=1, keepdims=True) * inverse
    m2 = tf.reduce_sum(m2s + counts * tf.square(offsets - delta), axis=1, keepdims=True)
    variances = m2 * inverse
    ref, dlt, variance, n = _group_stats(
        [reference, delta, variances, total], rid // k, stat_shape
    )
    groups = None
    if k < replicas:
        groups = sync_stats.GroupMoments(
            *(t[:, 0] for t in (reference + delta, variances, total)))
    return sync_stats.GlobalMoments(
        shift=shift,
        correction=(shift - ref) - dlt,
        mean=ref + dlt,
        variance=variance,
        count=n,
        groups=groups,
        centered=centered,
    )


def _centered_moments(x, axes, ctx, mask, k, reference):
    centered, count, shift, mu, m2 = sync_stats.shifted_moments(x, axes, mask, prune=False)
    stat_shape = sync_stats.stat_shape(x, axes)
    channels = sync_stats.channel_count(stat_shape)
    groups = ctx.num_replicas_in_sync // k
    group = sync_stats.replica_index(ctx) // k
    if reference is None:
        reference = tf.zeros([channels], tf.float64)
    r_all = tf.cast(reference, tf.float64)
    if r_all.shape != [groups, channels]:
        r_all = tf.broadcast_to(tf.reshape(r_all, [-1, channels]), [groups, channels])
    # O(C) float64 from here on: this replica's mean relative to r, and its
    # sums around r (Chan's per-replica term n * d^2 added to its M2).
    n, s, mu, m2 = tf.unstack(
        tf.cast(tf.reshape(tf.stack([count, shift, mu, m2]), [4, 1, -1]), tf.float64)
    )
    # One group: r_all is its row, no slice to build.
    local_shift = s - (r_all if groups == 1 else r_all[group])
    d = local_shift + mu
    s1 = n * d
    s2 = m2 + n * tf.square(d)
    # One count for all channels without a mask: the payload is 2C + 1.
    width = 1 if mask is None else channels
    sums = tf.reshape(tf.stack([s1, s2], axis=1), [1, -1])
    payload = tf.concat([n if mask is not None else n[:, :1], sums], axis=1)
    reduced = sync_stats.all_reduce(ctx, _place(payload, group, groups))
    # [groups, C] each; every replica holds every group's values.
    counts, s1_all, s2_all = tf.split(reduced, [width, channels, channels], axis=1)
    counts = tf.broadcast_to(counts, [groups, channels])
    inverse = sync_stats.reciprocal(counts)
    offsets = s1_all * inverse
    second = s2_all * inverse
    # Rounding can take the difference a hair below zero.
    variances = tf.nn.relu(second - tf.square(offsets))
    means = r_all + offsets
    correction, mean, variance, count = _group_stats(
        [local_shift - offsets, means, variances, counts], group, stat_shape, x.dtype
    )
    return sync_stats.GlobalMoments(
        shift=shift,
        correction=correction,
        mean=mean,
        variance=variance,
        count=count,
        # float64; `global_moments` casts them where they are kept.
        groups=sync_stats.GroupMoments(means, variances, counts),
        centered=centered,
    )
