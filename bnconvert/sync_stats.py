"""Global batch moments across replicas: one collective, numerically stable.

Synchronized batch normalization needs the mean and (biased) variance of the
*global* batch: every example of every replica, each replica weighted by the
number of examples it holds. This module computes them with a single
all-reduce per call and without the catastrophic cancellation of
`E[x^2] - E[x]^2`.

Algorithm
---------
Let replica `i` hold `n_i` values of one channel, `x_i1 ... x_in`.

1. **Local shifted moments.** Each replica picks a shift `s_i` (its first
   value of the channel, or 0 when it holds none) and works on `d = x - s_i`.
   When the data sit far from zero (mean 1000, spread 0.01) the subtraction is
   exact in floating point (Sterbenz), so the small quantities below keep
   their full precision instead of being rounded at the magnitude of 1000:

       mu_i = sum(d) / n_i            (0 when n_i == 0)
       M2_i = sum((d - mu_i)^2)       (two-pass: no cancellation)

2. **One exchange.** Replica `i` writes the row `[n_i, s_i, mu_i, M2_i]`
   (4C values) into row `i` of an otherwise-zero `[replicas, 4C]` buffer, and one
   all-reduce SUM gives every replica every row. An all-gather would do the
   same, but its gradient costs two collectives; the gradient of an all-reduce
   SUM is a single all-reduce SUM.

3. **Combine (Chan et al.'s parallel formula) around a common reference.**
   Every replica picks the same reference `r` (the shift of the replica with
   most examples) and expresses each local mean as an offset from it,
   `o_i = (s_i - r) + mu_i`. Then, with `N = sum(n_i)`:

       delta = sum(n_i * o_i) / N                    global mean = r + delta
       M2    = sum(M2_i) + sum(n_i * (o_i - delta)^2)
       var   = M2 / N                                biased, as Keras BN

   The global mean is returned as the pair `(r, delta)`; normalizing with
   `(x - s_i) + ((s_i - r) - delta)` never forms `x - mean` with a rounded
   mean, which is where a float32 mean of 1000 would lose 3e-5 absolute
   (0.003 standard deviations at spread 0.01).

Everything stays in float32, so it runs where float64 does not (TPUs), and
gradients flow through the all-reduce to every replica's inputs: the result
is the gradient of single-device BN on the concatenated global batch.
"""

import collections

import tensorflow as tf

GlobalMoments = collections.namedtuple(
    "GlobalMoments", ["shift", "correction", "mean", "variance", "count"]
)


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


def local_moments(x, axes, mask=None):
    """Shifted two-pass moments of `x` over `axes` on this replica.

    Args:
        x: float32 tensor.
        axes: list of reduction axes (non-negative).
        mask: optional float32 tensor broadcastable to `x` with 1 for values
            that count and 0 for those that do not.

    Returns:
        `(count, shift, mean_offset, m2)`, each with `keepdims=True` shape:
        the number of values, the shift, the mean of `x - shift` and the sum
        of squared deviations from the mean.
    """
    shift = _first_along(x, axes)
    d = x - shift
    if mask is None:
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        count = tf.fill(tf.shape(shift), count)
        mean = tf.math.divide_no_nan(tf.reduce_sum(d, axes, keepdims=True), count)
        m2 = tf.reduce_sum(
            tf.math.squared_difference(d, tf.stop_gradient(mean)), axes, keepdims=True
        )
    else:
        mask = tf.broadcast_to(mask, tf.shape(x))
        count = tf.reduce_sum(mask, axes, keepdims=True)
        mean = tf.math.divide_no_nan(
            tf.reduce_sum(d * mask, axes, keepdims=True), count
        )
        m2 = tf.reduce_sum(
            tf.math.squared_difference(d, tf.stop_gradient(mean)) * mask,
            axes,
            keepdims=True,
        )
    return count, shift, mean, m2


def global_moments(x, axes, ctx, mask=None):
    """Count-weighted moments of the global batch, with one all-reduce.

    Args:
        x: float32 tensor (this replica's slice of the batch).
        axes: list of reduction axes (non-negative); the others are channels.
        ctx: a `tf.distribute.ReplicaContext` with more than one replica.
        mask: optional 0/1 float32 tensor broadcastable to `x`.

    Returns:
        A `GlobalMoments` whose fields have `keepdims=True` shape. Normalize
        with `x - mean == (x - shift) + correction`, which never subtracts a
        rounded large mean; use `mean` and `variance` for moving statistics.
        `count` is the number of values of the global batch per channel
        (what an unbiased variance or an empty-batch check needs).
    """
    count, shift, mu, m2 = local_moments(x, axes, mask)
    stat_shape = tf.shape(shift)
    row = tf.concat(
        [
            tf.reshape(count, [-1]),
            tf.reshape(shift, [-1]),
            tf.reshape(mu, [-1]),
            tf.reshape(m2, [-1]),
        ],
        axis=0,
    )
    replicas = ctx.num_replicas_in_sync
    rid = ctx.replica_id_in_sync_group
    padded = tf.pad(row[tf.newaxis], [[rid, replicas - 1 - rid], [0, 0]])
    table = ctx.all_reduce(tf.distribute.ReduceOp.SUM, padded)

    counts, shifts, mus, m2s = tf.split(table, 4, axis=1)

    # Every replica sees the same table, so every replica picks the same
    # reference: the shift of the replica holding most values of the channel.
    pick = tf.one_hot(tf.argmax(counts, axis=0), replicas, axis=0, dtype=x.dtype)
    reference = tf.reduce_sum(shifts * pick, axis=0)
    offsets = (shifts - reference) + mus
    total = tf.reduce_sum(counts, axis=0)
    delta = tf.math.divide_no_nan(tf.reduce_sum(counts * offsets, axis=0), total)
    m2 = tf.reduce_sum(m2s, axis=0) + tf.reduce_sum(
        counts * tf.square(offsets - delta), axis=0
    )
    variance = tf.math.divide_no_nan(m2, total)

    delta = tf.reshape(delta, stat_shape)
    reference = tf.reshape(reference, stat_shape)
    return GlobalMoments(
        shift=shift,
        correction=(shift - reference) - delta,
        mean=reference + delta,
        variance=tf.reshape(variance, stat_shape),
        count=tf.reshape(total, stat_shape),
    )
