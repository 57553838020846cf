"""The tf-keras SyncBatchNormalization against NumPy float64 BN and tf-keras BN.

References: NumPy float64 batch normalization on the global batch (outputs,
gradients) and `tf_keras.layers.BatchNormalization` run on one device over
the global batch (moving statistics, whose variance convention is the one
tf-keras picks per layout; see `bnconvert/compat/tf_keras_layers.py`).
"""

import zlib

import numpy as np
import pytest
import tensorflow as tf

import tf_keras

import bnconvert
from bn_reference import batch_moments
from bn_reference import bn_backward
from bn_reference import bn_forward
from bn_reference import bn_inference
from conftest import mirrored_strategy
from layer_harness import full_config as harness_full_config
from layer_harness import run_replicated
from layer_harness import split
from test_layers import INVALID_ARGUMENTS

SyncBN = bnconvert.compat.SyncBatchNormalization

# (input shape without batch, axis, does tf-keras BN take its fused path?)
LAYOUTS = [
    ((5,), -1, False),
    ((3, 3, 4), -1, True),
    ((4, 3, 3), 1, True),
    ((2, 3, 2, 3), -1, True),
    ((3, 2, 4), [1, 3], False),
    ((4, 3, 5), -2, False),
]
SPLITS = {
    2: {"even": [6, 6], "uneven": [9, 3], "empty": [0, 12]},
    4: {"even": [3, 3, 3, 3], "uneven": [5, 1, 4, 2], "empty": [6, 0, 4, 2]},
}


def layout_id(layout):
    return f"{len(layout[0]) + 1}d-axis{layout[1]}"


def make_batch(rng, n, shape, replica_sizes=None):
    """Random data whose channel means differ between replicas."""
    x = rng.normal(size=(n,) + shape) * rng.uniform(0.5, 3.0, size=shape)
    if replica_sizes:
        start = 0
        for i, size in enumerate(replica_sizes):
            x[start : start + size] += 5.0 * i
            start += size
    return x.astype("float32")


def weight_name(w):
    return w.name.split("/")[-1].split(":")[0]


def random_weights(layer, rng):
    values = {}
    for w in layer.weights:
        name = weight_name(w)
        if "variance" in name or "stddev" in name:
            value = rng.uniform(0.5, 2.0, size=tuple(w.shape))
        else:
            value = rng.normal(size=tuple(w.shape))
        w.assign(value.astype("float32"))
        values[name] = w.numpy().astype(np.float64)
    return values


def assert_close(actual, expected, rtol):
    """Max error relative to the reference's largest magnitude."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.abs(expected).max(), 1e-12)
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def strategy_for(replicas):
    if replicas == 1:
        return tf.distribute.get_strategy()
    return mirrored_strategy(replicas)


def build(strategy, cls, input_shape, **kwargs):
    with strategy.scope():
        layer = cls(**kwargs)
        layer.build((None,) + input_shape)
    return layer


def tf_keras_reference(x, weights, **kwargs):
    """tf-keras BatchNormalization on the global batch, one device, one step."""
    layer = tf_keras.layers.BatchNormalization(**kwargs)
    layer.build(x.shape)
    layer.set_weights(weights)
    layer(x, training=True)
    return {weight_name(w): w.numpy() for w in layer.weights}, layer.fused


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize(
    "replicas,split_name", [(1, "whole"), (2, "empty"), (4, "uneven"), (4, "empty")]
)
def test_global_batch_statistics_gradients_and_moving_statistics(
    layout, replicas, split_name
):
    shape, axis, fused = layout
    # crc32, not hash(): string hashes change with every process.
    rng = np.random.default_rng(zlib.crc32(repr((shape, axis, replicas, split_name)).encode()))
    sizes = [12] if replicas == 1 else SPLITS[replicas][split_name]
    x = make_batch(rng, 12, shape, sizes)
    dy = rng.normal(size=x.shape).astype("float32")
    strategy = strategy_for(replicas)
    layer = build(strategy, SyncBN, shape, axis=axis, momentum=0.9, epsilon=1e-3)
    w = random_weights(layer, rng)
    initial = layer.get_weights()

    out = run_replicated(strategy, layer, split(x, sizes), split(dy, sizes))

    assert_close(out["y"], bn_forward(x, axis, w["gamma"], w["beta"], 1e-3), 1e-5)
    dx, dgamma, dbeta = bn_backward(x, dy, axis, w["gamma"], 1e-3)
    assert_close(out["dx"], dx, 1e-5)
    assert_close(out["dweights"][0], dgamma.reshape(w["gamma"].shape), 1e-5)
    assert_close(out["dweights"][1], dbeta.reshape(w["beta"].shape), 1e-5)

    expected, reference_fused = tf_keras_reference(
        x, initial, axis=axis, momentum=0.9, epsilon=1e-3
    )
    assert reference_fused == fused == layer.fused
    # tf-keras's own float32 sums over the global batch carry ~1e-6 relative
    # rounding themselves; the float64 check below holds ours to 1e-6.
    for name in ("moving_mean", "moving_variance"):
        assert_close(getattr(layer, name).numpy(), expected[name], 1e-5)
    # The same numbers from first principles: tf-keras's fused kernel folds
    # the unbiased variance into the moving variance, its other path the
    # biased one.
    mean, var = batch_moments(x, axis)
    n = x.size / w["moving_mean"].size
    batch_var = var * n / (n - 1) if fused else var
    flat = lambda a: a.reshape(w["moving_mean"].shape)
    assert_close(layer.moving_mean.numpy(), 0.9 * w["moving_mean"] + 0.1 * flat(mean), 1e-6)
    assert_close(
        layer.moving_variance.numpy(), 0.9 * w["moving_variance"] + 0.1 * flat(batch_var), 1e-6
    )


def renorm_reference(x, axis, w, epsilon, clipping):
    mean, var = batch_moments(x, axis)
    shape = mean.shape
    sigma = np.sqrt(var + epsilon)
    renorm_std = np.maximum(w["renorm_stddev"].reshape(shape), np.sqrt(epsilon))
    r = sigma / renorm_std
    d = (mean - w["renorm_mean"].reshape(shape)) / renorm_std
    r = np.clip(r, clipping["rmin"], clipping["rmax"])
    d = np.clip(d, -clipping["dmax"], clipping["dmax"])
    return r, d, mean, sigma


@pytest.mark.parametrize("layout", [LAYOUTS[1], LAYOUTS[4]], ids=layout_id)
@pytest.mark.parametrize("replicas,split_name", [(1, "whole"), (2, "uneven"), (4, "empty")])
def test_renorm_is_synchronized(layout, replicas, split_name):
    shape, axis, _ = layout
    rng = np.random.default_rng(7 + replicas)
    sizes = [12] if replicas == 1 else SPLITS[replicas][split_name]
    x = make_batch(rng, 12, shape, sizes)
    dy = rng.normal(size=x.shape).astype("float32")
    clipping = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}
    kwargs = dict(
        axis=axis, renorm=True, renorm_clipping=clipping, renorm_momentum=0.8, momentum=0.9
    )
    strategy = strategy_for(replicas)
    layer = build(strategy, SyncBN, shape, **kwargs)
    w = random_weights(layer, rng)
    initial = layer.get_weights()
    out = run_replicated(strategy, layer, split(x, sizes), split(dy, sizes))

    r, d, mean, sigma = renorm_reference(x, axis, w, 1e-3, clipping)
    # The clipping must be exercised for this test to mean anything.
    assert (np.abs(d) >= 0.5).any() and ((r <= 0.8) | (r >= 1.25)).any()
    assert_close(out["y"], bn_forward(x, axis, w["gamma"], w["beta"], 1e-3, r, d), 1e-5)
    dx, dgamma, dbeta = bn_backward(x, dy, axis, w["gamma"], 1e-3, r, d)
    assert_close(out["dx"], dx, 1e-5)
    assert_close(out["dweights"][0], dgamma.reshape(w["gamma"].shape), 1e-5)
    assert_close(out["dweights"][1], dbeta.reshape(w["beta"].shape), 1e-5)

    flat = lambda a: a.reshape(w["moving_mean"].shape)
    assert_close(layer.renorm_mean.numpy(), 0.8 * w["renorm_mean"] + 0.2 * flat(mean), 1e-6)
    assert_close(layer.renorm_stddev.numpy(), 0.8 * w["renorm_stddev"] + 0.2 * flat(sigma), 1e-6)
    moving_std = 0.9 * w["moving_stddev"] + 0.1 * flat(sigma)
    assert_close(layer.moving_stddev.numpy(), moving_std, 1e-6)
    assert_close(layer.moving_variance.numpy(), np.maximum(moving_std**2 - 1e-3, 0), 1e-5)
    expected, _ = tf_keras_reference(x, initial, **kwargs)
    for v in layer.weights:
        assert_close(v.numpy(), expected[weight_name(v)], 1e-5)


def offset_outputs(x, replicas, make_layer):
    strategy = strategy_for(replicas)
    with strategy.scope():
        layer = make_layer()
        layer.build(x.shape)
    sizes = [len(x) // replicas] * replicas
    zeros = np.zeros_like(x)
    return run_replicated(strategy, layer, split(x, sizes), split(zeros, sizes))["y"]


@pytest.mark.parametrize("case", ["same-mean", "means-differ-between-replicas"])
def test_large_mean_small_spread_is_accurate(case):
    """4 replicas, batch 64, channel mean 1000, std 0.01: no worse than one device."""
    rng = np.random.default_rng(3)
    x = 1000.0 + 0.01 * rng.normal(size=(64, 6))
    if case != "same-mean":
        x += np.repeat(np.arange(4), 16)[:, None] * 0.05
    x = x.astype("float32")
    reference = bn_forward(x, -1, np.ones(6), np.zeros(6), 1e-6)

    ours = offset_outputs(x, 4, lambda: SyncBN(epsilon=1e-6))
    single = tf_keras.layers.BatchNormalization(epsilon=1e-6)(x, training=True).numpy()
    ours_err = np.abs(ours - reference).max()
    single_err = np.abs(single - reference).max()
    assert ours_err <= single_err, (ours_err, single_err)
    assert ours_err < 1e-4


def test_one_collective_per_forward_pass(monkeypatch):
    calls = []
    original = tf.distribute.ReplicaContext.all_reduce

    def counting(self, *args, **kwargs):
        calls.append("all_reduce")
        return original(self, *args, **kwargs)

    def no_gather(self, *args, **kwargs):
        raise AssertionError("all_gather used")

    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_reduce", counting)
    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_gather", no_gather)
    strategy = strategy_for(2)
    layer = build(strategy, SyncBN, (3, 3, 4))
    x = np.ones((4, 3, 3, 4), "float32")

    @tf.function
    def forward():
        return strategy.run(lambda: layer(tf.constant(x[:2]), training=True))

    forward()
    assert calls.count("all_reduce") == strategy.num_replicas_in_sync


@pytest.mark.parametrize(
    "shape,axis",
    [((6, 5), -1), ((6, 4, 4, 3), -1), ((6, 3, 4, 4), 1), ((6, 2, 3, 2, 3), 4),
     ((6, 4, 3, 2), 2), ((6, 3, 2, 4), [1, 3])],
)
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("replicas", [0, 1])
def test_matches_tf_keras_batchnorm_without_synchronization(shape, axis, renorm, replicas):
    """No strategy (0) or one replica: tf-keras BN, bit-for-bit in inference."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=shape).astype("float32") * 2 + 1
    strategy = tf.distribute.get_strategy() if replicas == 0 else mirrored_strategy(1)
    kwargs = dict(axis=axis, momentum=0.8, epsilon=1e-2, renorm=renorm)
    if renorm:
        kwargs["renorm_clipping"] = {"rmax": 1.1, "dmax": 0.2}
    with strategy.scope():
        ours = SyncBN(**kwargs)
        theirs = tf_keras.layers.BatchNormalization(**kwargs)
        ours.build(shape)
        theirs.build(shape)
    assert isinstance(ours, tf_keras.layers.BatchNormalization)
    assert ours.fused == theirs.fused
    assert [weight_name(w) for w in ours.weights] == [weight_name(w) for w in theirs.weights]
    w = random_weights(theirs, rng)
    ours.set_weights(theirs.get_weights())
    np.testing.assert_array_equal(ours(x, training=False), theirs(x, training=False))
    np.testing.assert_allclose(
        ours(x, training=False),
        bn_inference(x, axis, w["gamma"], w["beta"], w["moving_mean"], w["moving_variance"], 1e-2),
        rtol=1e-5, atol=1e-5,
    )
    y_ours = strategy.run(lambda: ours(tf.constant(x), training=True))
    y_theirs = strategy.run(lambda: theirs(tf.constant(x), training=True))
    np.testing.assert_allclose(y_ours, y_theirs, atol=2e-6, rtol=0)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=1e-6, err_msg=a.name)


@pytest.mark.parametrize("axis", [1, 3])
def test_fused_false_mirrors_tf_keras_synchronized_bn(axis):
    """What the converter builds for a tf-keras synchronized BN (never fused)."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 4, 4, 4)).astype("float32") * 2 + 1
    theirs = tf_keras.layers.BatchNormalization(axis=axis, momentum=0.5, synchronized=True)
    ours = SyncBN(axis=axis, momentum=0.5, fused=False)
    theirs.build(x.shape)
    ours.build(x.shape)
    assert theirs.fused is False and ours.fused is False
    w = random_weights(theirs, rng)
    ours.set_weights(theirs.get_weights())
    np.testing.assert_array_equal(ours(x, training=False), theirs(x, training=False))
    ours(x, training=True)
    _, var = batch_moments(x, axis)
    # Biased, as tf-keras's non-fused path.
    assert_close(
        ours.moving_variance.numpy(), 0.5 * w["moving_variance"] + 0.5 * var.ravel(), 1e-6
    )
    config = ours.get_config()
    assert config["fused"] is False
    assert SyncBN.from_config(config).get_config()["fused"] is False


@pytest.mark.parametrize("shape,axis", [((4, 5), -1), ((4, 3, 3, 6), -1), ((4, 6, 2, 2), 1)])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_inference_bit_for_bit_and_stable_training(shape, axis, policy):
    """Values of 300 square to 9e4, past float16's 65504: stats must be float32."""
    rng = np.random.default_rng(2)
    x16 = tf.cast(300 + 20 * rng.normal(size=shape), policy.split("_")[1]).numpy()
    ours = SyncBN(axis=axis, momentum=0.5, dtype=policy)
    theirs = tf_keras.layers.BatchNormalization(axis=axis, momentum=0.5, dtype=policy)
    ours.build(shape)
    theirs.build(shape)
    random_weights(theirs, rng)
    ours.set_weights(theirs.get_weights())
    y = ours(x16, training=False)
    assert y.dtype == policy.split("_")[1]
    np.testing.assert_array_equal(y, theirs(x16, training=False))

    strategy = strategy_for(2)
    with strategy.scope():
        layer = SyncBN(axis=axis, momentum=0.5, dtype=policy)
        layer.build(shape)
    assert layer.moving_mean.dtype == tf.float32
    x = np.asarray(x16, np.float64)
    out = run_replicated(strategy, layer, split(x16, [3, 1]), split(np.ones_like(x16), [3, 1]))
    assert np.isfinite(out["y"]).all() and np.isfinite(out["dx"]).all()
    tol = 1e-2 if policy == "mixed_float16" else 5e-2
    channels = layer.moving_mean.shape[0]
    assert_close(out["y"], bn_forward(x, axis, np.ones(channels), np.zeros(channels), 1e-3), tol)
    mean, _ = batch_moments(x, axis)
    assert_close(layer.moving_mean.numpy(), 0.5 * mean.ravel(), 1e-6)


def test_frozen_layer_normalizes_with_moving_statistics():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 4)).astype("float32") * 3
    layer = SyncBN(trainable=False)
    layer.build(x.shape)
    w = random_weights(layer, rng)
    y = layer(x, training=True).numpy()
    expected = bn_inference(
        x, -1, w["gamma"], w["beta"], w["moving_mean"], w["moving_variance"], 1e-3
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), w["moving_mean"].astype("float32"))
    assert layer.trainable_weights == []


def test_mask_excludes_positions_from_statistics():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, 6, 3)).astype("float32") * 2 + 3
    mask = rng.uniform(size=(4, 6)) > 0.3
    layer = SyncBN(momentum=0.0)
    layer.build(x.shape)
    layer(x, training=True, mask=tf.constant(mask))
    kept = x[mask].astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean.numpy(), kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), kept.var(0), rtol=1e-5)


def test_adjustment_applies_in_training_only():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 3)).astype("float32")
    scale = np.array([1.05, 0.95, 1.0], "float32")
    bias = np.array([0.1, -0.1, 0.05], "float32")
    layer = SyncBN(adjustment=lambda shape: (tf.constant(scale), tf.constant(bias)))
    layer.build(x.shape)
    w = random_weights(layer, rng)
    y = layer(x, training=True).numpy()
    x_hat = bn_forward(x, -1, np.ones(3), np.zeros(3), 1e-3)
    np.testing.assert_allclose(
        y, w["gamma"] * (x_hat * scale + bias) + w["beta"], rtol=1e-5, atol=1e-5
    )
    layer.moving_mean.assign(np.zeros(3))
    layer.moving_variance.assign(np.ones(3))
    np.testing.assert_allclose(
        layer(x, training=False), w["gamma"] * x / np.sqrt(1 + 1e-3) + w["beta"],
        rtol=1e-5, atol=1e-5,
    )
    assert "adjustment" not in layer.get_config()


def full_config():
    return harness_full_config(tf_keras)


def test_config_holds_every_argument():
    layer = SyncBN(**full_config())
    config = layer.get_config()
    for key in full_config():
        assert key in config, key
    assert "synchronized" not in config
    clone = SyncBN.from_config(config)
    assert clone.get_config() == config
    assert list(clone.axis) == [1, 3]
    assert dict(clone.renorm_clipping) == full_config()["renorm_clipping"]
    assert tf_keras.saving.get_registered_name(SyncBN) == "bnconvert>SyncBatchNormalization"


def test_tf_keras_batchnorm_config_builds_the_flavour():
    """What the converter does: a tf-keras BN config, synchronized or not."""
    config = tf_keras.layers.BatchNormalization(
        axis=1, momentum=0.8, synchronized=True, name="bn"
    ).get_config()
    layer = SyncBN.from_config(config)
    assert layer.axis == 1 and layer.momentum == 0.8 and layer.name == "bn"
    with pytest.raises(ValueError, match="virtual_batch_size"):
        SyncBN(virtual_batch_size=4)


@pytest.mark.parametrize("kwargs,message", INVALID_ARGUMENTS)
def test_invalid_arguments_are_rejected_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        SyncBN(**kwargs)
    assert "Received" in str(info.value)
