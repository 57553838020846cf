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
scatter to place a row, one stack/unstack per set of statistics, a constant
count where the shape is static, and a gradient written out rather than
derived (below); `tests/test_layer_graph_size.py` pins the ops per layer call.

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

Gradient
--------
Both exchanges carry the same written-out gradient (`bnconvert.sync_exchange`):
each value of the group's batch enters the mean with weight `1 / N` and the
variance with `2 (x - mean) / N`, so one more all-reduce SUM, of the `2C`
upstream gradients of the correction and the variance (float32), gives every
replica what single-device BN on the group's concatenated batch computes.
Autodiff through the exchange built about a quarter more ops per layer call
(casts, stacks, slices and their gradients, and a gradient all-reduce as
large as the forward one); the forward pass needs no `stop_gradient` in it.
"""

import collections
import math

import numpy as np
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


def _first_along(x, axes, prune):
    """The first element along each of `axes` (keepdims); zeros if empty."""
    # `x[:1]` clamps: on a zero-example replica the slice is empty and its
    # sum is 0 (finite; irrelevant, its count is 0). Otherwise the sum of
    # one value is that value, exactly. No `tf.cond` to build.
    first = x[tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.shape.rank))]
    return prune(tf.reduce_sum(first, axes, keepdims=True))


def stat_shape(x, axes):
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
    shape = stat_shape(x, axes)
    if x.shape.is_fully_defined():
        # A static batch (a fixed input, or `drop_remainder`): one constant.
        return tf.constant(x.shape.num_elements() // channel_count(shape), x.dtype, shape)
    channels = channel_count(shape) if isinstance(shape, list) else 0
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
    return shifted_moments(x, axes, mask)[1:]


def shifted_moments(x, axes, mask, prune=True):
    """`(x - shift,) + local_moments(x, axes, mask)`.

    `prune=True` stops the gradient where none is needed (fewer ops for
    autodiff to build); the exchanges, whose gradient is written out
    (`bnconvert.sync_exchange`), pass False.
    """
    prune = tf.stop_gradient if prune else _keep
    shift = _first_along(x, axes, prune)
    d = x - shift
    if mask is not None:
        mask = tf.broadcast_to(mask, tf.shape(x))
    count = _count(x, axes, mask)
    w = (lambda t: t) if mask is None else (lambda t: t * mask)
    mean = tf.reduce_sum(w(d), axes, keepdims=True) * reciprocal(count, prune)
    m2 = tf.reduce_sum(w(tf.math.squared_difference(d, prune(mean))), axes, keepdims=True)
    return d, count, shift, mean, m2


def _keep(t):
    return t


def reciprocal(count, prune=_keep):
    """`1 / count` (0 for 0); with `prune=tf.stop_gradient`, without gradient
    (a product's gradient is 2 ops, a `divide_no_nan`'s 9). A constant for
    a constant count."""
    static = tf.get_static_value(count)
    if static is not None:
        inverse = np.divide(1.0, static, out=np.zeros_like(static), where=static != 0)
        return tf.constant(inverse, count.dtype)
    return prune(tf.math.divide_no_nan(tf.ones_like(count), count))


def channel_count(shape):
    return math.prod(shape) if isinstance(shape, list) else tf.reduce_prod(shape)
