"""Global batch moments across replicas in one all-reduce, exact for any R.

Synchronized batch normalization needs the mean and (biased) variance of the
*global* batch (or of a replica group's batch): every example of every
replica, each replica weighted by the number of values it holds. Two
exchanges implement this, both exact for uneven and empty replicas and both
**one all-reduce SUM per layer call**; `method_for` picks one from the
replica count (`TABLE_MAX_REPLICAS`, set from the measured crossover, see
the README's P5) and the strategy (no float64 on TPUs).

Local moments (both exchanges)
------------------------------
Replica `i` computes, in the input's float type, its count `n_i`, a shift
`s_i` (its first value per channel), `mu_i = mean(x - s_i)` and the two-pass
`M2_i = sum((x - s_i - mu_i)^2)`. For clustered data `x - s_i` is exact
(Sterbenz: within a factor of 2), so all three are as accurate as float32
allows, however large the channel mean.

Centered sums (above `TABLE_MAX_REPLICAS` replicas): 2C + 1 float64 values
----------------------------------------------------------------------------
Every replica of a group holds the same per-channel reference `r`: the
group's mean at the previous synchronized step (`MeanMemory`, one copy per
replica, written by every replica from the same reduced values), or the
moving mean before the first one. In float64, on `O(C)` values only:

    d_i  = (s_i - r) + mu_i          this replica's mean, relative to r
    S1_i = n_i * d_i
    S2_i = M2_i + n_i * d_i^2        = sum((x - r)^2), Chan's per-replica term

and one all-reduce SUM of `[n, S1, S2]` (`2C + 1` float64 values, `3C` with a
mask, whose counts differ by channel) gives every replica `N`, `S1`, `S2`:

    o   = S1 / N          mean = r + o
    var = S2 / N - o^2    (biased, as Keras BN; clipped at 0)

The output is normalized as `(x - s_i) + ((s_i - r) - o)`, the correction
formed in float64 and then cast, so a large channel mean is never rounded.

Error. `s_i - r` is exact in float64 (both are float32 values), so `d_i`
carries the float32 error of `mu_i` only (~`u32 * sigma`, `u32` = 6e-8).
The one cancellation left is `S2 / N - o^2`, in float64 (`u64` = 1.1e-16):
its absolute error is about `c * u64 * (var + o^2)` with `c` a few units
plus the sum's own (`log2(R)` for a tree, up to `R` for a ring), i.e.
relative to the variance

    c * u64 * (1 + (|m - r| / sigma)^2).

In training `r` is the previous step's mean, `|m - r|` is a fraction of
`sigma` and this is ~1e-15: float32's own two-pass error (~`u32 * log2(n)`,
1e-7 to 1e-6) is all that is left, as with the table. The worst case is the
first step from scratch, `r` = 0 (the moving mean's initializer): on the
issue's offset test (mean 1000, std 0.01, `|m - r| / sigma` = 1e5) the
bound is `c * 1.1e-6` on the variance, a few 1e-6, i.e. a few 1e-7 relative
to `var + epsilon` (epsilon 1e-3) and ~1e-7 on the output. Measured (float64
NumPy on the global batch, max |error| of the output, 64 values over R
replicas): step 1 centered 8.6e-8 / 1.0e-7 / 1.0e-7 at R = 4 / 8 / 16,
table 8.0e-8 / 8.7e-8 / 8.7e-8, single-device Keras BN 3.2e-3; from step 2
on, centered and table give identical figures (6.9e-8 to 9.0e-8). The sum
of `R` terms grows the float64 part linearly at worst: at R = 1024 the
step-1 bound is still ~1e-4 relative to `var + epsilon` on that data, below
single-device BN's own float32 error (2e-3), and it vanishes from step 2.

Why float64, and only there: it is used for `O(C)` values and the collective
itself (`2C + 1` values, 8 bytes each: twice float32's bytes, one call
instead of two, independent of R). It is what lets the sums be taken around
a stale reference with no cancellation test, hence no second exchange
(`tf.distribute` routes collectives through `merge_call`, which cannot sit
inside a `tf.cond`, so a conditional second exchange was always issued).
Compensated (two-float) float32 sums would still round inside the
all-reduce. TPUs have no float64: under a TPU strategy, or with replicas
on TPU devices, `method_for` selects the table (float32 only) at every
replica count.

Row table (R <= `TABLE_MAX_REPLICAS`, or no float64)
----------------------------------------------------
Replica `i` fills row `i` of an otherwise-zero `[R, 4C]` table with
`[n_i, s_i, mu_i, M2_i]`; one all-reduce SUM gives every row to every
replica, and Chan's parallel formula combines the rows around the
count-weighted mean of the shifts (it lies among them, so `s_i - ref` stays
exact for clustered data; empty rows weigh nothing), in the input's type.
No state, no float64; its payload grows with R.

Graph size: tracing and the first call cost in proportion to the ops each
layer adds, per replica. Hence a static replica index, no `tf.cond`, one
scatter to place a row, one stack/unstack per set of statistics, and no
gradient through counts, shifts or references (they do not depend on `x`);
`tests/test_layer_graph_size.py` pins the ops per layer call.

Replica groups
--------------
`group_size=k` synchronizes groups of `k` consecutive replicas. The exchange
is still one all-reduce over all replicas: each replica writes into its
group's row of a `[R / k, P]` buffer (centered sums) or its own row of the
table, and every replica sees every group's statistics. A replica normalizes
with its own group's; the moving statistics blend in the average over groups
(`moving_targets`), the same on every replica, so that mirrored variables
stay identical. The centered payload is `R / k` rows, which grows with R for
a fixed `k`: `tf.distribute` exposes no collective over a replica subset.

Gradients flow through the float64 casts (a cast's gradient is a cast) and
the all-reduce (whose gradient is again an all-reduce SUM), so they equal
those of single-device BN on the concatenated batch of the group.
"""

import collections
import math

import tensorflow as tf

# `centered` is `x - shift` when already computed (normalizing reuses it).
GlobalMoments = collections.namedtuple(
    "GlobalMoments",
    ["shift", "correction", "mean", "variance", "count", "groups", "centered"],
    defaults=[None, None],
)
# Every group's statistics, `[groups, C]` each (every replica sees them all).
GroupMoments = collections.namedtuple("GroupMoments", ["mean", "variance", "count"])

# Up to this many replicas the [R, 4C] table is used; above it, the centered
# sums (both one all-reduce). Measured (README, P5; 2-core CPU, 16 logical
# devices, conv net with 10 BN layers, alternating, medians of 3 runs),
# step time centered / table: 1.026 at R = 2, 1.001 at 4, 0.969 at 8,
# 0.906 at 16 (centered faster in each run at 8 and 16; at 2 and 4 the two
# are within run-to-run noise, 0.98-1.21). At a tie the table wins: no
# state and no float64.
TABLE_MAX_REPLICAS = 4


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


def _tpu_strategy_classes():
    names = [(tf.distribute, "TPUStrategy"), (tf.distribute.experimental, "TPUStrategy")]
    return tuple(getattr(m, n) for m, n in names if hasattr(m, n))


def float64_collectives(strategy):
    """Whether `strategy`'s replicas can compute and all-reduce float64.

    False for TPU strategies and for any strategy placing a replica on a TPU
    (TPUs have no float64); True otherwise, including `None`.
    """
    if strategy is None:
        return True
    if isinstance(strategy, _tpu_strategy_classes()):
        return False
    try:
        devices = strategy.extended.worker_devices
    except (AttributeError, RuntimeError, ValueError):
        return True
    return not any(tf.DeviceSpec.from_string(d).device_type == "TPU" for d in devices)


def method_for(replicas, strategy=None):
    """`"table"` or `"centered"`: the exchange for `replicas` under `strategy`."""
    if replicas <= TABLE_MAX_REPLICAS or not float64_collectives(strategy):
        return "table"
    return "centered"


def all_reduce(ctx, value):
    """The layer's only collective: an all-reduce SUM (benchmarks wrap it)."""
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def replica_index(ctx):
    """This replica's index: a Python int where the strategy fixes it at
    trace time (mirrored strategies), else (TPUs) a tensor."""
    rid = ctx.replica_id_in_sync_group
    static = tf.get_static_value(rid)
    return rid if static is None else int(static)


def _first_along(x, axes):
    """The first element along each of `axes` (keepdims); zeros if empty."""
    # `x[:1]` clamps: on a zero-example replica the slice is empty and its
    # sum is 0 (finite; irrelevant, its count is 0). Otherwise the sum of
    # one value is that value, exactly. No `tf.cond` to build.
    first = x[tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.shape.rank))]
    return tf.stop_gradient(tf.reduce_sum(first, axes, keepdims=True))


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
    if mask is not None:
        return tf.reduce_sum(mask, axes, keepdims=True)
    shape = _stat_shape(x, axes)
    channels = _channels(shape) if isinstance(shape, list) else 0
    if channels:
        # One integer division of the size: exact, and two ops.
        n = tf.size(x, out_type=tf.int64) // channels
    else:
        n = tf.reduce_prod(tf.gather(tf.shape(x, out_type=tf.int64), axes))
    return tf.broadcast_to(tf.cast(n, x.dtype), shape)


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
    return _local_moments(x, axes, mask)[1:]


def _local_moments(x, axes, mask):
    """`(x - shift,) + local_moments(x, axes, mask)`."""
    shift = _first_along(x, axes)
    d = x - shift
    if mask is not None:
        mask = tf.broadcast_to(mask, tf.shape(x))
    count = _count(x, axes, mask)
    w = (lambda t: t) if mask is None else (lambda t: t * mask)
    mean = tf.reduce_sum(w(d), axes, keepdims=True) * _reciprocal(count)
    m2 = tf.reduce_sum(
        w(tf.math.squared_difference(d, tf.stop_gradient(mean))), axes, keepdims=True
    )
    return d, count, shift, mean, m2


def _reciprocal(count):
    """`1 / count` (0 for 0), without gradient: a product's gradient is 2 ops,
    a `divide_no_nan`'s 9."""
    return tf.stop_gradient(tf.math.divide_no_nan(tf.ones_like(count), count))


def _place(row, index, rows):
    """`row` (`[1, P]`) as row `index` of an otherwise-zero `[rows, P]` buffer."""
    # A scatter: its gradient is one gather (a pad's takes nine ops).
    indices = [[index]] if isinstance(index, int) else tf.reshape(index, [1, 1])
    width = row.shape[1] if row.shape[1] is not None else tf.shape(row)[1]
    return tf.scatter_nd(indices, row, [rows, width])


def _channels(shape):
    return math.prod(shape) if isinstance(shape, list) else tf.reduce_prod(shape)


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
    k = group_size_for(replicas, group_size)
    if mask is not None:
        mask = tf.broadcast_to(tf.cast(mask, x.dtype), tf.shape(x))
    if method is None:
        method = method_for(replicas, ctx.strategy)
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
        groups=GroupMoments(*(tf.cast(t, x.dtype) for t in moments.groups))
    )


def _exchange_gradient(ctx, k, m, mask, d_centered, d_correction, d_variance):
    """The gradient of `(centered, correction, variance)` with respect to `x`.

    Every value `x_j` of the group's batch enters the group's mean with
    weight `1 / N` and its variance with `2 (x_j - mean) / N`; `correction`
    is `-mean` plus terms without gradient. So, with `Gc` and `Gv` the sums
    over the group's replicas of the upstream gradients of `correction` and
    `variance` (one all-reduce of `2C` values):

        dx = d_centered + mask * (2 Gv (x - mean) - Gc) / N,

    `x - mean` being `centered + correction`. Autodiff through the exchange
    builds several times more ops (casts, slices, stacks and their
    gradients), which tracing and graph optimization pay for per layer and
    replica.
    """
    zeros = lambda d, like: tf.zeros_like(like) if d is None else d
    d_correction = zeros(d_correction, m.correction)
    d_variance = zeros(d_variance, m.variance)
    stat_shape = _stat_shape(m.correction, [])
    payload = tf.reshape(tf.stack([d_correction, d_variance]), [1, -1])
    groups = ctx.num_replicas_in_sync // k
    if groups == 1:
        summed = all_reduce(ctx, payload)
    else:
        group = replica_index(ctx) // k
        summed = all_reduce(ctx, _place(payload, group, groups))[group]
    shape = [2] + stat_shape if isinstance(stat_shape, list) else (
        tf.concat([[2], stat_shape], 0))
    g_correction, g_variance = tf.unstack(tf.reshape(summed, shape))
    dx = (2.0 * g_variance * (m.centered + m.correction) - g_correction) * _reciprocal(
        m.count)
    if mask is not None:
        dx = dx * mask
    return dx if d_centered is None else dx + d_centered


def _table_moments(x, axes, ctx, mask, k):
    centered, count, shift, mu, m2 = _local_moments(x, axes, mask)
    stat_shape = _stat_shape(x, axes)
    replicas = ctx.num_replicas_in_sync
    rid = replica_index(ctx)
    row = tf.reshape(tf.stack([count, shift, mu, m2]), [1, -1])
    table = all_reduce(ctx, _place(row, rid, replicas))
    # [groups, k, C] each: group g holds rows [g * k, (g + 1) * k).
    counts, shifts, mus, m2s = tf.unstack(
        tf.reshape(table, [replicas // k, k, 4, -1]), axis=2
    )
    # Counts and shifts do not depend on `x`: no gradient to build there.
    counts, shifts = tf.stop_gradient(counts), tf.stop_gradient(shifts)
    # Every replica sees the same rows, so every one takes the same
    # reference per group: the count-weighted mean of the shifts, which lies
    # among them (0 for an empty group).
    total = tf.reduce_sum(counts, axis=1, keepdims=True)
    inverse = _reciprocal(total)
    reference = tf.reduce_sum(counts * shifts, axis=1, keepdims=True) * inverse
    offsets = (shifts - reference) + mus
    delta = tf.reduce_sum(counts * offsets, axis=1, keepdims=True) * inverse
    # No gradient through delta here: d(m2)/d(delta) = -2 sum(n (o - delta)) = 0.
    m2 = tf.reduce_sum(
        m2s + counts * tf.square(offsets - tf.stop_gradient(delta)), axis=1, keepdims=True
    )
    variances = m2 * inverse
    ref, dlt, variance, n = _group_stats(
        [reference, delta, variances, total], rid // k, stat_shape
    )
    groups = None
    if k < replicas:
        groups = GroupMoments(*(t[:, 0] for t in (reference + delta, variances, total)))
    return GlobalMoments(
        shift=shift,
        correction=(shift - ref) - dlt,
        mean=ref + dlt,
        variance=variance,
        count=n,
        groups=groups,
        centered=centered,
    )


def _centered_moments(x, axes, ctx, mask, k, reference):
    centered, count, shift, mu, m2 = _local_moments(x, axes, mask)
    stat_shape = _stat_shape(x, axes)
    channels = _channels(stat_shape)
    groups = ctx.num_replicas_in_sync // k
    group = replica_index(ctx) // k
    if reference is None:
        reference = tf.zeros([channels], tf.float64)
    r_all = tf.cast(tf.reshape(reference, [-1, channels]), tf.float64)
    r_all = tf.stop_gradient(tf.broadcast_to(r_all, [groups, channels]))
    # O(C) float64 from here on: this replica's mean relative to r, and its
    # sums around r (Chan's per-replica term n * d^2 added to its M2).
    n, s, mu, m2 = tf.unstack(
        tf.cast(tf.reshape(tf.stack([count, shift, mu, m2]), [4, 1, -1]), tf.float64)
    )
    # Counts and shifts do not depend on `x`: no gradient to build there.
    n, s = tf.stop_gradient(n), tf.stop_gradient(s)
    # One group: r_all is its row, no slice to build.
    local_shift = s - (r_all if groups == 1 else r_all[group])
    d = local_shift + mu
    s1 = n * d
    s2 = m2 + n * tf.square(d)
    # One count for all channels without a mask: the payload is 2C + 1.
    width = 1 if mask is None else channels
    sums = tf.reshape(tf.stack([s1, s2], axis=1), [1, -1])
    payload = tf.concat([n if mask is not None else n[:, :1], sums], axis=1)
    reduced = all_reduce(ctx, _place(payload, group, groups))
    # [groups, C] each; every replica holds every group's values.
    counts, s1_all, s2_all = tf.split(reduced, [width, channels, channels], axis=1)
    counts = tf.stop_gradient(tf.broadcast_to(counts, [groups, channels]))
    inverse = _reciprocal(counts)
    offsets = s1_all * inverse
    second = s2_all * inverse
    # Rounding can take the difference a hair below zero.
    variances = tf.nn.relu(second - tf.square(offsets))
    means = r_all + offsets
    correction, mean, variance, count = _group_stats(
        [local_shift - offsets, means, variances, counts], group, stat_shape, x.dtype
    )
    return GlobalMoments(
        shift=shift,
        correction=correction,
        mean=mean,
        variance=variance,
        count=count,
        # float64; `global_moments` casts them where they are kept.
        groups=GroupMoments(means, variances, counts),
        centered=centered,
    )
