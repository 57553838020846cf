"""Runs one layer over per-replica shards and collects outputs and gradients."""

import numpy as np
import tensorflow as tf


def run_replicated(strategy, layer, shards, upstream, training=True):
    """Forward and backward pass of `layer` with shard `i` on replica `i`.

    The loss on each replica is `sum(y_i * upstream_i)`, so the total loss
    is `sum(y * upstream)` over the global batch, and single-device BN on the
    concatenated batch is the reference for every gradient.

    Returns:
        dict with `y` and `dx` (global-batch order, float64) and `dweights`
        (gradients of the trainable weights, summed over replicas).
    """

    def values(arrays):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group])
        )

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy, tf.float32))
        grads = tape.gradient(loss, [x] + list(layer.trainable_weights))
        return y, grads

    @tf.function
    def run(x, dy):
        return strategy.run(step, args=(x, dy))

    y, grads = run(values(shards), values(upstream))
    local = strategy.experimental_local_results

    def cat(t):
        return np.concatenate([np.asarray(v, np.float64) for v in local(t)])

    dweights = [
        np.sum([np.asarray(v, np.float64) for v in local(g)], axis=0) for g in grads[1:]
    ]
    return {"y": cat(y), "dx": cat(grads[0]), "dweights": dweights}


def split(x, sizes):
    """Splits `x` along the batch axis into pieces of the given sizes."""
    assert sum(sizes) == len(x)
    return np.split(x, np.cumsum(sizes)[:-1])


def full_config(k):
    """Every constructor argument set to a non-default value.

    Args:
        k: the Keras module whose initializers, regularizers and constraints
            to use (`keras` or `tf_keras`).
    """
    return dict(
        axis=[1, 3],
        momentum=0.9,
        epsilon=1e-4,
        center=False,
        scale=True,
        beta_initializer="ones",
        gamma_initializer=k.initializers.Constant(0.5),
        moving_mean_initializer="ones",
        moving_variance_initializer=k.initializers.Constant(2.0),
        beta_regularizer=k.regularizers.L2(0.01),
        gamma_regularizer=k.regularizers.L1(0.02),
        beta_constraint=k.constraints.NonNeg(),
        gamma_constraint=k.constraints.MaxNorm(2.0),
        renorm=True,
        renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
        renorm_momentum=0.7,
        trainable=False,
        name="sync_bn_full",
    )


class ExchangeCounter:
    """Counts, at run time, what the layer's collective carries.

    Wraps `bnconvert.sync_stats.all_reduce` (install with `monkeypatch`).
    Every call adds, on every replica, the number of values and of bytes sent
    to plain variables living outside the strategy; dividing by the replica
    count gives per-replica figures.
    """

    def __init__(self, sync_stats):
        self._original = sync_stats.all_reduce
        with tf.init_scope():
            self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.values = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.bytes = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, ctx, value):
        size = tf.cast(tf.size(value), tf.int64)
        self.calls.assign_add(1)
        self.values.assign_add(size)
        self.bytes.assign_add(size * value.dtype.size)
        return self._original(ctx, value)

    def reset(self):
        for v in (self.calls, self.values, self.bytes):
            v.assign(0)

    def per_replica(self, replicas):
        """`(calls, values, bytes)` per replica."""
        return tuple(int(v.numpy()) // replicas for v in (self.calls, self.values, self.bytes))
