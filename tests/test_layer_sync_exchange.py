"""The two exchanges (row table, centered sums) and replica groups, both flavours.

Reference: NumPy float64 batch normalization on the concatenated batch of the
whole strategy or of each replica group (`tests/bn_reference.py`). The
exchange is chosen by patching `sync_stats.TABLE_MAX_REPLICAS`; what the
collective carries (calls, values, bytes) is counted at run time by
`layer_harness.ExchangeCounter`. Every path makes exactly one collective per
layer call.
"""

import zlib

import numpy as np
import pytest
import tensorflow as tf

import bnconvert
from bnconvert import sync_stats
from bn_reference import batch_moments
from bn_reference import bn_backward
from bn_reference import bn_forward
from conftest import mirrored_strategy
from layer_harness import ExchangeCounter
from layer_harness import run_replicated
from layer_harness import split

FLAVOURS = {
    "keras3": bnconvert.SyncBatchNormalization,
    "tf_keras": bnconvert.compat.SyncBatchNormalization,
}
# The table at TABLE_MAX_REPLICAS >= R (16 logical devices at most), the
# centered sums below.
METHODS = {"table": 64, "centered": 1}
SHAPE, AXIS = (3, 3, 4), -1
CHANNELS = 4
EPSILON = 1e-3


@pytest.fixture
def counter(monkeypatch):
    c = ExchangeCounter(sync_stats)
    monkeypatch.setattr(sync_stats, "all_reduce", c)
    return c


def use_method(monkeypatch, method):
    monkeypatch.setattr(sync_stats, "TABLE_MAX_REPLICAS", METHODS[method])


def build(cls, strategy, **kwargs):
    with strategy.scope():
        layer = cls(axis=AXIS, epsilon=EPSILON, momentum=0.9, **kwargs)
        layer.build((None,) + SHAPE)
    return layer


def set_weights(layer, rng, moving_mean):
    values = {
        "gamma": 1.0 + 0.3 * rng.normal(size=CHANNELS),
        "beta": 0.3 * rng.normal(size=CHANNELS),
        "moving_mean": moving_mean,
        "moving_variance": rng.uniform(0.5, 2.0, size=CHANNELS),
    }
    for name, value in values.items():
        getattr(layer, name).assign(np.asarray(value, "float32"))
    return {k: np.asarray(v, "float32").astype(np.float64) for k, v in values.items()}


def assert_close(actual, expected, rtol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    err = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def make_data(rng, sizes, offset):
    """Per-replica blocks whose means differ, around `offset`."""
    x = rng.normal(size=(sum(sizes),) + SHAPE) * rng.uniform(0.5, 2.0, size=SHAPE)
    start = 0
    for i, size in enumerate(sizes):
        x[start:start + size] += 2.0 * i
        start += size
    return (x + offset).astype("float32")


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("sizes", [[5, 1, 4, 2], [6, 0, 4, 2]], ids=["uneven", "empty"])
@pytest.mark.parametrize("start", ["near", "far"])
def test_both_exchanges_match_float64(monkeypatch, counter, flavour, method, sizes, start):
    # "near": the moving mean (the first reference) is the batch mean; "far":
    # the data sit at 50 while the moving mean is 0. One collective either way.
    use_method(monkeypatch, method)
    rng = np.random.default_rng(zlib.crc32(repr((flavour, method, sizes, start)).encode()))
    x = make_data(rng, sizes, 50.0)
    dy = rng.normal(size=x.shape).astype("float32")
    mean, var = batch_moments(x, AXIS)
    strategy = mirrored_strategy(4)
    layer = build(FLAVOURS[flavour], strategy)
    moving_mean = mean.reshape(-1) if start == "near" else np.zeros(CHANNELS)
    w = set_weights(layer, rng, moving_mean)

    out = run_replicated(strategy, layer, split(x, sizes), split(dy, sizes))

    assert_close(out["y"], bn_forward(x, AXIS, w["gamma"], w["beta"], EPSILON), 1e-5, "y")
    dx, dgamma, dbeta = bn_backward(x, dy, AXIS, w["gamma"], EPSILON)
    assert_close(out["dx"], dx, 1e-5, "dx")
    assert_close(out["dweights"][0], dgamma, 1e-5, "dgamma")
    assert_close(out["dweights"][1], dbeta, 1e-5, "dbeta")
    assert_close(layer.moving_mean.numpy(),
                 0.9 * w["moving_mean"] + 0.1 * mean.reshape(-1), 1e-6, "moving_mean")
    # The tf-keras flavour folds the unbiased variance in for this (fused)
    # layout, like tf-keras BN.
    n = x.size / CHANNELS
    batch_var = var.reshape(-1) * (n / (n - 1) if flavour == "tf_keras" else 1.0)
    assert_close(layer.moving_variance.numpy(),
                 0.9 * w["moving_variance"] + 0.1 * batch_var, 1e-5, "moving_variance")

    # One collective forward, one backward: the upstream gradients of the
    # correction and the variance, 2C float32 values, on both exchanges.
    calls, values, sent = counter.per_replica(4)
    back = (1, 2 * CHANNELS, 4 * 2 * CHANNELS)
    if method == "table":
        forward = (1, 4 * 4 * CHANNELS, 4 * 4 * 4 * CHANNELS)
    else:
        forward = (1, 2 * CHANNELS + 1, 8 * (2 * CHANNELS + 1))
    assert (calls, values, sent) == tuple(f + b for f, b in zip(forward, back))


def offset_step(strategy, layer, x, sizes):
    @tf.function
    def run(v):
        return strategy.run(lambda t: layer(t, training=True), args=(v,))

    shards = split(x, sizes)
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group])
    )
    out = strategy.experimental_local_results(run(values))
    return np.concatenate([np.asarray(t, np.float64) for t in out])


# Global batch 64: even, and uneven with one empty replica.
OFFSET_SIZES = {
    (4, "even"): [16] * 4,
    (4, "uneven"): [30, 0, 20, 14],
    (8, "even"): [8] * 8,
    (8, "uneven"): [13, 3, 9, 0, 11, 7, 16, 5],
}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("replicas,split_name", [
    # 8 replicas cost about 3 s each: they run with the slow tests (CI included).
    pytest.param(r, s, marks=pytest.mark.slow) if r == 8 else (r, s)
    for r, s in sorted(OFFSET_SIZES)])
def test_offset_data_from_scratch_every_step(monkeypatch, counter, flavour, method,
                                             replicas, split_name):
    # Mean 1000, std 0.01, moving statistics at their initializers (mean 0,
    # so the centered sums' first reference is 1e5 standard deviations
    # away): at every step, the first included, the error against float64
    # on the global batch is no worse than single-device BN's on the same
    # batch, in one collective per call.
    use_method(monkeypatch, method)
    import keras
    import tf_keras

    plain = {"keras3": keras.layers.BatchNormalization,
             "tf_keras": tf_keras.layers.BatchNormalization}[flavour]
    sizes = OFFSET_SIZES[replicas, split_name]
    strategy = mirrored_strategy(replicas)
    with strategy.scope():
        layer = FLAVOURS[flavour](epsilon=EPSILON)
        layer.build((None, 8))
    single = plain(epsilon=EPSILON)
    rng = np.random.default_rng(zlib.crc32(repr((flavour, method, sizes)).encode()))
    # Fixed channel means: each step draws a new batch of the same data.
    means = 1000.0 + 0.1 * rng.random(8)
    for step in range(5):
        x = means + 0.01 * rng.normal(size=(64, 8))
        x = x.astype("float32")
        x64 = x.astype(np.float64)
        reference = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + EPSILON)
        counter.reset()
        ours = np.abs(offset_step(strategy, layer, x, sizes) - reference).max()
        theirs = np.abs(np.asarray(single(x, training=True), np.float64) - reference).max()
        assert ours <= theirs, f"step {step + 1}: {ours:.3g} > single {theirs:.3g}"
        assert ours < 1e-5, f"step {step + 1}: {ours:.3g}"
        assert counter.per_replica(replicas)[0] == 1, f"step {step + 1}"


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("replicas", [2, 4, 8, 16])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("group_size", [None, 2], ids=["all", "pairs"])
def test_one_collective_per_call_and_its_size(monkeypatch, counter, method, replicas,
                                              masked, group_size):
    # Exactly one all-reduce per layer call on every path; the centered sums
    # send 8 * (2C + 1) bytes (3C float64 values with a mask) per group
    # whatever the replica count, the table 4R * 4C bytes of float32.
    use_method(monkeypatch, method)
    strategy = mirrored_strategy(replicas)
    layer = build(bnconvert.SyncBatchNormalization, strategy, sync_group_size=group_size)
    rng = np.random.default_rng(replicas)
    x = (rng.normal(size=(2 * replicas,) + SHAPE) + 1000.0).astype("float32")
    mask = rng.random((2 * replicas,) + SHAPE[:-1]) > 0.3

    @tf.function
    def run(v, m):
        return strategy.run(
            lambda t, k: layer(t, training=True, mask=k if masked else None), args=(v, m))

    dist = lambda a: strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(split(a, [2] * replicas)[ctx.replica_id_in_sync_group]))
    for _ in range(2):
        counter.reset()
        run(dist(x), dist(mask))
        calls, values, sent = counter.per_replica(replicas)
        groups = replicas // (group_size or replicas)
        if method == "table":
            assert (calls, values, sent) == (1, replicas * 4 * CHANNELS,
                                             4 * replicas * 4 * CHANNELS)
        else:
            width = 3 * CHANNELS if masked else 2 * CHANNELS + 1
            assert (calls, values, sent) == (1, groups * width, 8 * groups * width)


class _FakeExtended:
    def __init__(self, devices):
        self.worker_devices = devices


class _FakeStrategy:
    def __init__(self, devices):
        self.extended = _FakeExtended(devices)


def test_no_centered_sums_where_float64_is_missing(monkeypatch):
    # TPUs have no float64: a TPU strategy, or replicas on TPU devices, take
    # the table (float32 only) whatever the replica count.
    monkeypatch.setattr(sync_stats, "TABLE_MAX_REPLICAS", 4)
    tpu = tf.distribute.TPUStrategy.__new__(tf.distribute.TPUStrategy)
    on_tpu = _FakeStrategy([f"/job:worker/replica:0/task:0/device:TPU:{i}" for i in range(8)])
    on_cpu = _FakeStrategy([f"/job:worker/replica:0/task:0/device:CPU:{i}" for i in range(8)])
    assert sync_stats.method_for(8, tpu) == "table"
    assert sync_stats.method_for(8, on_tpu) == "table"
    assert sync_stats.method_for(8, on_cpu) == "centered"
    assert sync_stats.method_for(8, mirrored_strategy(8)) == "centered"
    assert sync_stats.method_for(4, on_cpu) == "table"
    assert sync_stats.method_for(8, None) == "centered"


def group_reference(x, dy, sizes, group_size, w):
    """Float64 BN on each group's concatenated batch; moving-stat targets."""
    ys, dxs, dgamma, dbeta, means, variances = [], [], 0.0, 0.0, [], []
    bounds = np.cumsum([0] + sizes)
    for g in range(0, len(sizes), group_size):
        lo, hi = bounds[g], bounds[g + group_size]
        xg, dyg = x[lo:hi], dy[lo:hi]
        if len(xg) == 0:
            continue
        ys.append(bn_forward(xg, AXIS, w["gamma"], w["beta"], EPSILON))
        dx, dga, dbe = bn_backward(xg, dyg, AXIS, w["gamma"], EPSILON)
        dxs.append(dx)
        dgamma, dbeta = dgamma + dga, dbeta + dbe
        mean, var = batch_moments(xg, AXIS)
        means.append(mean.reshape(-1))
        variances.append(var.reshape(-1))
    # Every replica blends in the average over the groups with values.
    return (np.concatenate(ys), np.concatenate(dxs), dgamma, dbeta,
            np.mean(means, axis=0), np.mean(variances, axis=0))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_replica_groups_match_float64_per_group(monkeypatch, counter, flavour, method,
                                                group_size):
    use_method(monkeypatch, method)
    sizes = [5, 1, 4, 2]
    rng = np.random.default_rng(zlib.crc32(repr((flavour, method, group_size)).encode()))
    x = make_data(rng, sizes, 3.0)
    dy = rng.normal(size=x.shape).astype("float32")
    strategy = mirrored_strategy(4)
    layer = build(FLAVOURS[flavour], strategy, sync_group_size=group_size)
    w = set_weights(layer, rng, np.zeros(CHANNELS))
    # Moving variance in the biased convention for both flavours here.
    if flavour == "tf_keras":
        layer.fused = False

    out = run_replicated(strategy, layer, split(x, sizes), split(dy, sizes))

    y, dx, dgamma, dbeta, mean, var = group_reference(x, dy, sizes, group_size, w)
    assert_close(out["y"], y, 1e-5, "y")
    assert_close(out["dx"], dx, 1e-5, "dx")
    assert_close(out["dweights"][0], dgamma, 1e-5, "dgamma")
    assert_close(out["dweights"][1], dbeta, 1e-5, "dbeta")
    assert_close(layer.moving_mean.numpy(), 0.1 * mean, 1e-6, "moving_mean")
    assert_close(layer.moving_variance.numpy(),
                 0.9 * w["moving_variance"] + 0.1 * var, 1e-5, "moving_variance")
    # Mirrored moving statistics stay identical on every replica.
    for name in ("moving_mean", "moving_variance"):
        var_ = getattr(layer, name)
        var_ = getattr(var_, "value", var_)
        copies = [np.asarray(v) for v in getattr(var_, "values", [var_])]
        for c in copies[1:]:
            np.testing.assert_array_equal(c, copies[0], err_msg=name)
    # Forward, then backward: each group's upstream gradient sums, 2C values.
    calls, values, _ = counter.per_replica(4)
    groups = 4 // group_size
    back = groups * 2 * CHANNELS
    if method == "table":
        assert (calls, values) == (2, 4 * 4 * CHANNELS + back)
    else:
        assert (calls, values) == (2, groups * (2 * CHANNELS + 1) + back)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_group_size_must_divide_the_replica_count(flavour):
    strategy = mirrored_strategy(4)
    layer = build(FLAVOURS[flavour], strategy, sync_group_size=3)
    x = np.ones((8,) + SHAPE, "float32")
    with pytest.raises(ValueError, match=r"multiple of `sync_group_size`.*sync_group_size=3"):
        run_replicated(strategy, layer, split(x, [2] * 4), split(x, [2] * 4))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_invalid_group_size_is_rejected_in_init(flavour, value):
    with pytest.raises(ValueError, match=r"Received: sync_group_size="):
        FLAVOURS[flavour](sync_group_size=value)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("value,stored", [(None, None), (0, None), (2, 2)])
def test_group_size_round_trips_through_the_config(flavour, value, stored):
    layer = FLAVOURS[flavour](sync_group_size=value)
    config = layer.get_config()
    # Written only when set, so that default configs keep Keras's keys.
    assert config.get("sync_group_size") == stored
    assert ("sync_group_size" in config) == (stored is not None)
    assert FLAVOURS[flavour].from_config(config).sync_group_size == stored


def test_masked_payload_carries_a_count_per_channel(monkeypatch, counter):
    use_method(monkeypatch, "centered")
    strategy = mirrored_strategy(4)
    layer = build(bnconvert.SyncBatchNormalization, strategy)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8,) + SHAPE).astype("float32")
    mask = rng.random((8,) + SHAPE[:-1]) > 0.3

    @tf.function
    def run(v, m):
        return strategy.run(lambda t, k: layer(t, training=True, mask=k), args=(v, m))

    dist = lambda a: strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(split(a, [2] * 4)[ctx.replica_id_in_sync_group]))
    y = strategy.experimental_local_results(run(dist(x), dist(mask)))
    y = np.concatenate([np.asarray(t, np.float64) for t in y])
    keep = mask[..., None].repeat(CHANNELS, -1)
    values = x.astype(np.float64)[keep].reshape(-1, CHANNELS)
    mean, var = values.mean(0), values.var(0)
    expected = (x - mean) / np.sqrt(var + EPSILON) * layer.gamma.numpy() + layer.beta.numpy()
    assert_close(y, expected, 1e-5, "masked y")
    assert counter.per_replica(4) == (1, 3 * CHANNELS, 8 * 3 * CHANNELS)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_masked_gradients_match_float64(monkeypatch, counter, flavour, method):
    # The exchange's gradient is written out (`sync_exchange._exchange_gradient`):
    # masked-out values pass the upstream gradient straight through and
    # enter neither the mean's nor the variance's term. Uneven shards, one
    # of them empty; reference: the same derivative in float64 NumPy.
    use_method(monkeypatch, method)
    strategy = mirrored_strategy(4)
    layer = build(FLAVOURS[flavour], strategy)
    rng = np.random.default_rng(zlib.crc32(repr(("masked", flavour, method)).encode()))
    w = set_weights(layer, rng, np.zeros(CHANNELS))
    sizes = [5, 0, 4, 3]
    x = make_data(rng, sizes, 20.0)
    dy = rng.normal(size=x.shape).astype("float32")
    mask = rng.random(x.shape[:-1]) > 0.3

    def step(v, m, g):
        with tf.GradientTape() as tape:
            tape.watch(v)
            y = layer(v, training=True, mask=m)
            loss = tf.reduce_sum(y * g)
        return tape.gradient(loss, v)

    dist = lambda a: strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(split(a, sizes)[ctx.replica_id_in_sync_group]))
    dx = tf.function(lambda *a: strategy.run(step, args=a))(dist(x), dist(mask), dist(dy))
    dx = np.concatenate([np.asarray(t, np.float64) for t in
                         strategy.experimental_local_results(dx)])

    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    m = mask[..., None].astype(np.float64)
    n = m.sum(axis=(0, 1, 2))
    mean = (x64 * m).sum(axis=(0, 1, 2)) / n
    var = (m * (x64 - mean) ** 2).sum(axis=(0, 1, 2)) / n
    inv = 1.0 / np.sqrt(var + EPSILON)
    g = w["gamma"]
    d_mean = -(g * inv * dy64).sum(axis=(0, 1, 2))
    d_var = -0.5 * (dy64 * g * (x64 - mean)).sum(axis=(0, 1, 2)) * inv ** 3
    expected = g * inv * dy64 + m * (d_mean + 2.0 * (x64 - mean) * d_var) / n
    assert_close(dx, expected, 1e-5, "masked dx")
    assert counter.per_replica(4)[0] == 2
