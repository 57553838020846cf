"""The tf-keras flavour under TF1-style graph execution (`tf.Graph().as_default()`).

There, assignments run only when something fetches them; tf-keras's `fit`
fetches `layer.updates`. Reference: tf-keras's own BatchNormalization in the
same graph setting, and NumPy for the expected moving statistics.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_keras

import bnconvert


def train_in_graph(bn_factory, x, y, steps):
    """Fits Dense -> BN in a fresh TF1-style graph; returns (updates, before, after)."""
    with tf.Graph().as_default():
        model = tf_keras.Sequential([
            tf_keras.Input((3,)),
            tf_keras.layers.Dense(4, kernel_initializer="ones", name="dense"),
            bn_factory(momentum=0.5, name="bn"),
        ])
        model.compile(tf_keras.optimizers.legacy.SGD(0.0), loss="mse")
        bn = model.get_layer("bn")
        before = [np.array(v) for v in tf_keras.backend.batch_get_value(
            [bn.moving_mean, bn.moving_variance])]
        model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
        after = [np.array(v) for v in tf_keras.backend.batch_get_value(
            [bn.moving_mean, bn.moving_variance])]
        return len(bn.updates), before, after


@pytest.mark.parametrize("renorm", [False, True])
def test_graph_mode_fit_moves_the_statistics_like_tf_keras_bn(renorm):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 3)) + 2.0).astype("float32")
    y = rng.normal(size=(8, 4)).astype("float32")

    def ours(**kwargs):
        return bnconvert.compat.SyncBatchNormalization(renorm=renorm, **kwargs)

    def theirs(**kwargs):
        return tf_keras.layers.BatchNormalization(renorm=renorm, **kwargs)

    n_ours, before, after = train_in_graph(ours, x, y, steps=2)
    n_theirs, _, reference = train_in_graph(theirs, x, y, steps=2)
    assert n_ours == n_theirs == 2
    # A learning rate of 0 keeps the Dense output fixed: two blends of the
    # same batch statistics, by hand.
    h = x.astype(np.float64).sum(axis=1, keepdims=True).repeat(4, axis=1)
    mean = h.mean(0)
    expected_mean = before[0]
    for _ in range(2):
        expected_mean = 0.5 * expected_mean + 0.5 * mean
    np.testing.assert_allclose(after[0], expected_mean, rtol=1e-5)
    assert np.abs(after[1] - before[1]).max() > 1e-3
    for ours_value, their_value in zip(after, reference):
        np.testing.assert_allclose(ours_value, their_value, rtol=1e-4, atol=1e-5)


def updates_in_wrap_function(bn_factory, x):
    """Calls a fresh layer in training inside `tf.compat.v1.wrap_function`,
    then runs only its `updates`; returns (their count, moving mean, moving
    variance)."""
    seen = {}

    def call_in_graph():
        layer = bn_factory(momentum=0.5)
        outputs = layer(tf.constant(x), training=True)
        seen.update(layer=layer, updates=list(layer.updates))
        return outputs

    wrapped = tf.compat.v1.wrap_function(call_in_graph, [])
    wrapped.prune([], seen["updates"])()
    layer = seen["layer"]
    return len(seen["updates"]), layer.moving_mean.numpy(), layer.moving_variance.numpy()


@pytest.mark.parametrize("renorm", [False, True])
def test_updates_are_tracked_inside_wrap_function(renorm):
    # tf-keras's own test_updates_in_wrap_function, restated: a training
    # call inside `wrap_function` leaves two updates in `layer.updates`.
    # Here they are also run, and must move the statistics like tf-keras BN.
    x = (np.random.default_rng(1).normal(size=(10, 2)) * 3.0 + 1.0).astype("float32")

    def ours(**kwargs):
        return bnconvert.compat.SyncBatchNormalization(renorm=renorm, **kwargs)

    def theirs(**kwargs):
        return tf_keras.layers.BatchNormalization(renorm=renorm, **kwargs)

    n_ours, mean, variance = updates_in_wrap_function(ours, x)
    n_theirs, ref_mean, ref_variance = updates_in_wrap_function(theirs, x)
    assert n_ours == n_theirs == 2
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, 0.5 * x64.mean(0), rtol=1e-5)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    np.testing.assert_allclose(variance, ref_variance, rtol=1e-4)
    if not renorm:
        np.testing.assert_allclose(variance, 0.5 + 0.5 * x64.var(0), rtol=1e-5)
