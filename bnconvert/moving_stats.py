"""How each SyncBatchNormalization flavour blends batch statistics into its moving ones.

Each follows the layer it replaces, to its rounding: Keras 3 computes
`old * momentum + value * (1 - momentum)` (`keras3_update`), tf-keras
`old - (old - value) * (1 - momentum)` (`tf_keras_updates`). With batch
renorm, the renorm statistics blend with `renorm_momentum`, and the moving
variance is derived from the blended moving standard deviation. A channel
whose global batch held no value keeps its moving statistics: an empty step
has no statistics to blend in.
"""

import tensorflow as tf


def keras3_update(layer, mean, variance, populated=None):
    """Blends the batch statistics into the Keras 3 layer's moving ones.

    `old * momentum + value * (1 - momentum)`, as Keras 3 does. `populated`
    (per channel, or `None` for all) is False where the global batch held no
    value: a step in which every replica is empty has no statistics, and must
    not pull the moving ones towards 0.
    """
    mean = tf.reshape(mean, layer.moving_mean.shape)
    variance = tf.reshape(variance, layer.moving_variance.shape)
    if populated is not None:
        populated = tf.reshape(populated, layer.moving_mean.shape)

    def blend(var, value, momentum):
        old = tf.cast(var, value.dtype)
        new = old * momentum + value * (1.0 - momentum)
        if populated is not None:
            new = tf.where(populated, new, old)
        var.assign(tf.cast(new, var.dtype))
        return new

    if not layer.renorm:
        blend(layer.moving_mean, mean, layer.momentum)
        blend(layer.moving_variance, variance, layer.momentum)
        return
    stddev = tf.sqrt(variance + layer.epsilon)
    blend(layer.renorm_mean, mean, layer.renorm_momentum)
    blend(layer.renorm_stddev, stddev, layer.renorm_momentum)
    blend(layer.moving_mean, mean, layer.momentum)
    moving_stddev = blend(layer.moving_stddev, stddev, layer.momentum)
    # Clamped at zero: rounding can push stddev^2 - epsilon below it.
    moving_variance = tf.nn.relu(moving_stddev * moving_stddev - layer.epsilon)
    if populated is not None:
        moving_variance = tf.where(
            populated, moving_variance,
            tf.cast(layer.moving_variance, moving_variance.dtype),
        )
    layer.moving_variance.assign(
        tf.cast(moving_variance, layer.moving_variance.dtype)
    )


def tf_keras_updates(layer, mean, variance, populated):
    """Blends the batch statistics into the tf-keras layer's moving ones.

    `old - (old - value) * (1 - momentum)`, as tf-keras does; `populated`
    (per channel) is False where the global batch held no value, and there
    the moving statistics keep their values.

    Returns:
        The assignments in two groups (the moving mean's and the moving
        variance's, with renorm the statistics each derives from), which
        the layer registers with `add_update` in TF1-style graphs.
    """
    shape = layer.moving_mean.shape
    # An empty global batch has no statistics: keep the old values.
    has_data = tf.reshape(populated, shape)

    def update(var, value, momentum):
        old = tf.convert_to_tensor(var)
        value = tf.cast(tf.reshape(value, shape), old.dtype)
        # tf-keras's form, `old - (old - value) * (1 - momentum)`.
        new = old - (old - value) * tf.cast(1.0 - momentum, old.dtype)
        new = tf.where(has_data, new, old)
        return var.assign(new), new

    if layer.renorm:
        stddev = tf.sqrt(variance + layer.epsilon)
        mean_ops = [
            update(layer.renorm_mean, mean, layer.renorm_momentum)[0],
            update(layer.renorm_stddev, stddev, layer.renorm_momentum)[0],
            update(layer.moving_mean, mean, layer.momentum)[0],
        ]
        stddev_op, moving_stddev = update(layer.moving_stddev, stddev, layer.momentum)
        # Clamped at zero: rounding can push stddev^2 - epsilon below it.
        new_variance = tf.where(
            has_data, tf.nn.relu(moving_stddev * moving_stddev - layer.epsilon),
            tf.convert_to_tensor(layer.moving_variance),
        )
        updates = [mean_ops, [stddev_op, layer.moving_variance.assign(new_variance)]]
    else:
        updates = [
            [update(layer.moving_mean, mean, layer.momentum)[0]],
            [update(layer.moving_variance, variance, layer.momentum)[0]],
        ]
    return updates
