"""Training-mode batch-normalization arithmetic shared by both layer flavours.

The Keras 3 layer (`bnconvert.layers`) and the tf-keras one
(`bnconvert.compat.tf_keras_layers`) differ in how they build weights,
serialize and update moving statistics (`bnconvert.moving_stats`); what a
training step computes is the same, and lives here, in plain TensorFlow:

    x_hat = (x - mean) / sqrt(var + epsilon)
    y     = ((x_hat * r + d) * adj_scale + adj_bias) * gamma + beta

with `(r, d)` the batch-renorm correction and `(adj_scale, adj_bias)` the
optional adjustment. Both are folded into one scale and offset per channel,
and `x - mean` is formed as `(x - shift) + correction` (see
`bnconvert.sync_stats`), so that a large channel mean is never rounded.
"""

import tensorflow as tf

from bnconvert import sync_exchange
from bnconvert import sync_stats


def batch_moments(x, reduction_axes, weights=None, *, group_size=None,
                  memory=None, fallback_reference=None):
    """Moments of the global (or group) batch, or of the local one without replicas.

    Args:
        x: float32/float64 tensor.
        reduction_axes: the non-channel axes (non-negative ints).
        weights: optional 0/1 mask broadcastable to `x`.
        group_size: replicas per synchronized group (`None`: all).
        memory: optional `bn_math.MeanMemory` holding the last global
            mean; read as the reference of the centered sums and updated.
        fallback_reference: the reference where `memory` holds none (the
            moving mean, identical on every replica).

    Returns:
        A `sync_stats.GlobalMoments` with `keepdims=True` fields.
    """
    ctx = sync_stats.replica_context()
    if ctx is not None:
        return sync_exchange.global_moments(
            x, reduction_axes, ctx, weights, group_size=group_size,
            reference=fallback_reference, memory=memory,
        )
    count, shift, mu, m2 = sync_stats.local_moments(x, reduction_axes, weights)
    return sync_stats.GlobalMoments(
        shift=shift,
        correction=-mu,
        mean=shift + mu,
        variance=tf.math.divide_no_nan(m2, count),
        count=count,
    )


def mask_weights(mask, x):
    """The 0/1 weights of `mask` in the dtype and rank of `x` (`None` without a mask)."""
    if mask is None:
        return None
    weights = tf.cast(mask, x.dtype)
    while weights.shape.rank < x.shape.rank:
        weights = weights[..., tf.newaxis]
    return weights


def compose(scale, bias, gamma, beta):
    """`(gamma', beta')` with `(v * scale + bias) * gamma + beta == v * gamma' + beta'`.

    `gamma` or `beta` may be `None` (the layer has no scale or center).
    """
    if gamma is not None:
        scale, bias = scale * gamma, bias * gamma
    if beta is not None:
        bias = bias + beta
    return scale, bias


def renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, clipping):
    """The batch-renorm correction `(r, d)`, clipped, without gradient.

    Args:
        mean, variance: batch moments.
        renorm_mean, renorm_stddev: the renorm moving statistics, in the
            broadcast shape of `mean`.
        epsilon: the layer's epsilon.
        clipping: dict with optional `rmin`, `rmax`, `dmax`.
    """
    stddev = tf.sqrt(variance + epsilon)
    # Guards the division early in training, when renorm_stddev may be ~0.
    renorm_stddev = tf.maximum(renorm_stddev, tf.sqrt(tf.cast(epsilon, mean.dtype)))
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    clipping = clipping or {}
    if clipping.get("rmin") is not None:
        r = tf.maximum(r, clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = tf.minimum(r, clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = tf.clip_by_value(d, -clipping["dmax"], clipping["dmax"])
    return tf.stop_gradient(r), tf.stop_gradient(d)


def training_scale_offset(layer, param, input_shape, mean, variance, gamma, beta):
    """Folds a layer's adjustment and renorm corrections into gamma and beta.

    Composes `((x_hat * r + d) * adj_scale + adj_bias) * gamma + beta`
    into `x_hat * gamma' + beta'`, the order tf-keras uses.

    Args:
        layer: either flavour's `SyncBatchNormalization` (its `adjustment`,
            `renorm`, `renorm_mean`, `renorm_stddev`, `epsilon` and
            `renorm_clipping` are read).
        param: `(weight, dtype) -> tensor`: a weight in the broadcast shape
            of `mean`.
        input_shape: the dynamic shape of the layer's input, which
            `adjustment` is called with.
        mean, variance: batch moments.
        gamma, beta: the layer's, in the broadcast shape of `mean`, or `None`.

    Returns:
        `(gamma', beta')`.
    """
    if layer.adjustment is not None:
        adj_scale, adj_bias = layer.adjustment(input_shape)
        gamma, beta = compose(
            tf.cast(adj_scale, mean.dtype), tf.cast(adj_bias, mean.dtype), gamma, beta
        )
    if layer.renorm:
        r, d = renorm_correction(
            mean, variance,
            param(layer.renorm_mean, mean.dtype),
            param(layer.renorm_stddev, mean.dtype),
            layer.epsilon, layer.renorm_clipping,
        )
        gamma, beta = compose(r, d, gamma, beta)
    return gamma, beta


def normalize(x, moments, gamma, beta, epsilon):
    """`gamma * (x - mean) / sqrt(var + epsilon) + beta` from `moments`.

    `moments.shift` may be `None` (then `correction` is `-mean`);
    `moments.centered`, where set, is `x - moments.shift`.
    """
    multiplier = tf.math.rsqrt(moments.variance + epsilon)
    if gamma is not None:
        multiplier = multiplier * gamma
    offset = moments.correction * multiplier
    if beta is not None:
        offset = offset + beta
    shifted = moments.centered
    if shifted is None:
        shifted = x if moments.shift is None else x - moments.shift
    return shifted * multiplier + offset


def moving_targets(moments, unbiased=False):
    """What the moving statistics blend in: `(mean, variance, populated)`.

    With one group these are the batch statistics. With several, every
    replica blends in the same values, the average over the groups that
    hold values of each group's statistics, so that mirrored moving
    statistics stay identical on every replica (what a sync-on-read `MEAN`
    variable would report). `unbiased` applies `N / (N - 1)` per group.
    `populated` is False for channels whose (every) group batch was empty.
    """
    g = moments.groups
    if g is None:
        count = moments.count
        variance = moments.variance
        if unbiased:
            variance = variance * (count / tf.maximum(count - 1.0, 1.0))
        return moments.mean, variance, count > 0
    variances = g.variance
    if unbiased:
        variances = variances * (g.count / tf.maximum(g.count - 1.0, 1.0))
    has = tf.cast(g.count > 0, g.mean.dtype)
    groups = tf.reduce_sum(has, axis=0)
    average = lambda t: tf.math.divide_no_nan(tf.reduce_sum(t * has, axis=0), groups)
    shape = lambda t: tf.reshape(t, tf.shape(moments.mean))
    return shape(average(g.mean)), shape(average(variances)), shape(groups > 0)


class MeanMemory:
    """Per-replica memory of every group's last mean: the references `r`.

    A sync-on-read float64 variable of `[groups, C]` values (the centered
    sums' own type and layout: no cast or reshape to build), so that each
    replica reads and writes its own copy without any traffic (every replica
    writes the same values, having seen every group's statistics). It is
    deliberately not a layer weight: it is not saved, and a reloaded layer
    starts again from its moving mean. Created only under a strategy with
    several replicas, in cross-replica context; otherwise `reference()`
    returns the fallback.
    """

    def __init__(self, channels, group_size=None):
        self.variable = None
        strategy = tf.distribute.get_strategy()
        replicas = strategy.num_replicas_in_sync
        k = group_size or replicas
        if replicas > 1 and replicas % k == 0 and tf.distribute.in_cross_replica_context():
            with tf.init_scope():
                self.variable = tf.Variable(
                    tf.fill([replicas // k, channels], tf.constant(float("nan"), tf.float64)),
                    trainable=False,
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                    name="sync_bn_reference",
                )

    def _usable(self, shape):
        return self.variable is not None and self.variable.shape == shape

    def reference(self, fallback, groups):
        """`[groups, C]` float64: the remembered means; `fallback` (any float
        type) where there is none."""
        fallback = tf.reshape(fallback, [1, -1])
        if not self._usable([groups, fallback.shape[1]]):
            return fallback
        value = tf.convert_to_tensor(self.variable)
        return tf.where(tf.math.is_nan(value), tf.cast(fallback, value.dtype), value)

    def remember(self, g):
        """Keeps each group's mean (`GroupMoments`, float64) where it held values."""
        if g is None or not self._usable(g.mean.shape):
            return
        old = tf.convert_to_tensor(self.variable)
        self.variable.assign(tf.where(g.count > 0, tf.cast(g.mean, old.dtype), old))
