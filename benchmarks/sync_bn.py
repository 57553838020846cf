"""Synchronized batch normalization: accuracy (P1) and training-step time (P2).

Compares, side by side in one run:

- ours: `bnconvert.SyncBatchNormalization` under a `MirroredStrategy`;
- keras-sync: `keras.layers.BatchNormalization(synchronized=True)` under the
  same strategy;
- single: plain `keras.layers.BatchNormalization` on one device, no strategy.

P1 (offset test): a global batch of 64 split over 4 replicas, channels with
mean 1000 and standard deviation 0.01; the maximum absolute error of the
training-mode output against a NumPy float64 reference. Target: ours <= single.

P2 (speed): the time of one compiled training step (forward, backward, SGD)
of a conv net with many BN layers. Runs are interleaved (A B A B ...) over
several rounds and the medians compared, so machine noise hits both sides.
Targets: ours / keras-sync <= 0.95 at 2 and 4 replicas, ours / single <= 1.05
without a strategy.

P2t (time to the first step, `--only p2t`, not run by default: hours on 2
cores at the defaults; `--depth 12 --rounds 2` took 25 minutes): tracing and first call of that step for a deeper net, ours against
Keras's synchronized BN and plain BN, in Keras 3 and tf-keras, at 2, 4 and 8
replicas (`benchmarks/sync_bn_trace.py`). Target: ours / sync <= 1.2.

P5 (scale): all-reduces, values and bytes per layer call, counted at run
time by wrapping `tf.distribute.ReplicaContext.all_reduce`, and training-step
time at 2, 4, 8 and 16 replicas for each of our two exchanges forced
(`table`, `centered`) and keras-sync, alternating in one run (`--repeat N`:
N runs, medians of the ratios); and the payload per training step of
ResNet50's BN layers at R = 64, 256, 1024.

Usage:
    python benchmarks/sync_bn.py [--quick] [--only p1,p2,p2t,p5] [--repeat N]
                                 [--depth N] [--rounds N] [--replicas 2,4,8]
                                 [--kerases keras,tf_keras]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

# Sixteen logical CPU devices (P1/P2 use the first 2 or 4), before
# TensorFlow initialises its runtime.
LOGICAL_DEVICES = 16
_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * LOGICAL_DEVICES
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bnconvert  # noqa: E402
from bnconvert import sync_stats  # noqa: E402

EPSILON = 1e-3
_STRATEGIES = {}


def strategy(replicas):
    """One `MirroredStrategy` per replica count for the whole run.

    Every MirroredStrategy numbers its collective groups from the same base,
    so a second one in the process (other devices, or the same devices with
    other shapes) aborts with "is joining a group with size 2, but that group
    has size 4" or "Shape mismatch in the collective instance". TensorFlow's
    own tests move the base for each new strategy
    (tensorflow/python/distribute/strategy_combinations.py); so do we.
    """
    if replicas not in _STRATEGIES:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]
        cls = tf.distribute.MirroredStrategy
        if hasattr(cls, "_collective_key_base"):
            cls._collective_key_base += 100000
        _STRATEGIES[replicas] = cls(devices)
    return _STRATEGIES[replicas]


def ours(**kwargs):
    return bnconvert.SyncBatchNormalization(epsilon=EPSILON, **kwargs)


def keras_sync(**kwargs):
    return keras.layers.BatchNormalization(synchronized=True, epsilon=EPSILON, **kwargs)


def keras_plain(**kwargs):
    return keras.layers.BatchNormalization(epsilon=EPSILON, **kwargs)


def per_replica(strat, shards):
    """Distributed value holding `shards[i]` on replica `i`."""
    return strat.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group])
    )


# ---------------------------------------------------------------- P1 ------


def offset_batch(case, replicas=4, batch=64, channels=8, seed=0):
    """A global batch with mean ~1000 and spread 0.01 per channel.

    `case="same"`: every replica draws from the same distribution.
    `case="shifted"`: replica `r`'s channel means are moved by `0.02 * r`, so
    the between-replica part of the variance matters.
    """
    rs = np.random.RandomState(seed)
    x = 1000.0 + 0.01 * rs.randn(batch, channels) + 0.1 * rs.rand(channels)
    if case == "shifted":
        x += 0.02 * np.repeat(np.arange(replicas), batch // replicas)[:, None]
    return x.astype(np.float32)


def reference_output(x):
    x64 = x.astype(np.float64)
    return (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + EPSILON)


def replicated_output(make_layer, x, replicas):
    strat = strategy(replicas)
    with strat.scope():
        layer = make_layer()
        layer.build(x.shape)

    @tf.function
    def run(v):
        return strat.run(lambda t: layer(t, training=True), args=(v,))

    out = run(per_replica(strat, np.split(x, replicas)))
    return np.concatenate([t.numpy() for t in strat.experimental_local_results(out)])


def p1(replicas=4):
    print(f"P1  offset test: global batch 64 over {replicas} replicas, "
          "mean 1000, std 0.01, epsilon 1e-3")
    print("    max |output - float64 reference|      target: ours <= single")
    print("    (ours: the exchange R selects; table, centered: each forced; fresh layers,")
    print("    so the centered sums take their reference from the moving mean, 0)")
    print(f"    {'case':<9}{'ours':>11}{'table':>11}{'centered':>11}{'keras-sync':>12}"
          f"{'single':>11}   ours<=single")
    saved = sync_stats.TABLE_MAX_REPLICAS
    for case in ("same", "shifted"):
        x = offset_batch(case, replicas)
        ref = reference_output(x)
        errors = {"ours": replicated_output(ours, x, replicas)}
        for name, value in (("table", 1 << 30), ("centered", 1)):
            sync_stats.TABLE_MAX_REPLICAS = value
            try:
                errors[name] = replicated_output(ours, x, replicas)
            finally:
                sync_stats.TABLE_MAX_REPLICAS = saved
        errors["keras-sync"] = replicated_output(keras_sync, x, replicas)
        errors["single"] = keras_plain()(x, training=True).numpy()
        err = {k: float(np.abs(v.astype(np.float64) - ref).max())
               for k, v in errors.items()}
        ok = "yes" if max(err["ours"], err["table"], err["centered"]) <= err["single"] else "NO"
        print(f"    {case:<9}" + "".join(f"{err[k]:>11.2e}" for k in ("ours", "table", "centered"))
              + f"{err['keras-sync']:>12.2e}{err['single']:>11.2e}   {ok}")
    return err


# ---------------------------------------------------------------- P2 ------


def conv_net(make_bn, depth, channels, size, k=keras):
    """`depth` Conv-BN-ReLU blocks, pooling and a Dense head (`k`: keras or tf_keras)."""
    inputs = k.Input((size, size, channels))
    h = inputs
    for i in range(depth):
        h = k.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                            name=f"conv{i}")(h)
        h = make_bn(name=f"bn{i}")(h)
        h = k.layers.ReLU()(h)
    h = k.layers.GlobalAveragePooling2D()(h)
    outputs = k.layers.Dense(10)(h)
    return k.Model(inputs, outputs)


def _apply(optimizer, grads, variables):
    if hasattr(optimizer, "apply"):  # Keras 3
        return optimizer.apply(grads, variables)
    return optimizer.apply_gradients(zip(grads, variables))


def make_step(make_bn, replicas, x, y, depth, k=keras):
    """Returns a zero-argument `tf.function` running one training step.

    `k` is the Keras of the model: `keras` or `tf_keras`.
    """
    keras.utils.set_random_seed(0)
    channels, size = x.shape[-1], x.shape[1]
    if replicas is None:
        model = conv_net(make_bn, depth, channels, size, k)
        optimizer = k.optimizers.SGD(0.01)
        xs, ys = tf.constant(x), tf.constant(y)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xs, training=True) - ys))
            grads = tape.gradient(loss, model.trainable_variables)
            _apply(optimizer, grads, model.trainable_variables)
            return loss

        return step

    strat = strategy(replicas)
    with strat.scope():
        model = conv_net(make_bn, depth, channels, size, k)
        optimizer = k.optimizers.SGD(0.01)
    xs = per_replica(strat, np.split(x, replicas))
    ys = per_replica(strat, np.split(y, replicas))

    def replica_step(xr, yr):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xr, training=True) - yr)) / replicas
        grads = tape.gradient(loss, model.trainable_variables)
        _apply(optimizer, grads, model.trainable_variables)
        return loss

    @tf.function
    def step():
        return strat.run(replica_step, args=(xs, ys))

    return step


def timed(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    # Steps run asynchronously; reading a result waits for the last one.
    for value in getattr(out, "values", (out,)):
        value.numpy()
    return (time.perf_counter() - start) / steps


def compare(a, b, rounds, steps):
    """Median seconds per step of `a` and `b`, measured alternately."""
    for fn in (a, b):
        timed(fn, 3)  # trace + warm-up
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(a, steps))
        tb.append(timed(b, steps))
    return statistics.median(ta), statistics.median(tb)


def p2(quick):
    depth = 4 if quick else 20
    rounds, steps = (2, 2) if quick else (9, 10)
    batch, size, channels = 32, 8, 16
    rs = np.random.RandomState(0)
    x = rs.randn(batch, size, size, channels).astype(np.float32)
    y = rs.randn(batch, 10).astype(np.float32)
    print(f"P2  training step: conv net with {depth} BN layers, global batch {batch}, "
          f"{size}x{size}x{channels}; median of {rounds} alternating rounds "
          f"x {steps} steps")
    print(f"    {'comparison':<34}{'ours ms':>9}{'anchor ms':>11}{'ratio':>8}"
          f"{'target':>9}   met")
    rows = [
        ("ours / keras-sync, 2 replicas", keras_sync, 2, 0.95),
        ("ours / keras-sync, 4 replicas", keras_sync, 4, 0.95),
        ("ours / single (no strategy)", keras_plain, None, 1.05),
    ]
    ratios = {}
    for label, anchor, replicas, target in rows:
        a = make_step(ours, replicas, x, y, depth)
        b = make_step(anchor, replicas, x, y, depth)
        ta, tb = compare(a, b, rounds, steps)
        ratio = ta / tb
        ratios[label] = ratio
        met = "yes" if ratio <= target else "NO"
        print(f"    {label:<34}{ta * 1e3:>9.2f}{tb * 1e3:>11.2f}{ratio:>8.3f}"
              f"{'<= ' + str(target):>9}   {met}")
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: shallow net, few rounds (timings meaningless)")
    parser.add_argument("--only", default="p1,p2,p5",
                        help="comma-separated figures to run (default: p1,p2,p5)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="P5 step times: runs of the whole comparison (medians)")
    parser.add_argument("--depth", type=int, default=None,
                        help="p2t: Conv-BN blocks of the net (default 60)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="p2t: rounds per replica count (default 3; medians)")
    parser.add_argument("--kerases", default="keras,tf_keras",
                        help="p2t: comma-separated flavours (default keras,tf_keras)")
    parser.add_argument("--replicas", default="2,4,8",
                        help="p2t: comma-separated replica counts (default 2,4,8)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"bnconvert {bnconvert.__version__}, TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}, {os.cpu_count()} CPU cores, "
          f"{LOGICAL_DEVICES} logical CPU devices"
          + ("  [--quick: timings are not meaningful]" if args.quick else ""))
    if "p1" in only:
        p1()
    if "p2" in only:
        p2(args.quick)
    if "p2t" in only:
        import sync_bn_trace

        sync_bn_trace.p2_trace(sys.modules[__name__], args.quick, args.depth, args.rounds,
                               [int(r) for r in args.replicas.split(",")],
                               args.kerases.split(","))
    if "p5" in only:
        import sync_bn_scale

        sync_bn_scale.p5(sys.modules[__name__], args.quick, args.repeat)


if __name__ == "__main__":
    main()
