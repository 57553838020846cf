"""P5 of `benchmarks/sync_bn.py`: what the exchange costs as the replica count grows.

Run through `python benchmarks/sync_bn.py --only p5 [--firing]`; this module
borrows the strategies, the conv net and the timing loop of that script
(passed in as `bench`), so that all figures come from one process.

- Values all-reduced per layer call: `tf.distribute.ReplicaContext.all_reduce`
  is wrapped so that every call adds the size of what it sends to counters,
  at run time (the second exchange of the centered sums is sized at run
  time, 0 values unless it fires). Forward alone, then forward + backward
  (the gradient of an all-reduce SUM is an all-reduce of the same size).
- Training-step time at 2, 4, 8, 16 replicas: ours (the exchange the replica
  count selects), each of our exchanges forced, and keras-sync, measured
  alternately in the same run; ratios against keras-sync.
- ResNet50: the payload per training step (forward + backward, every BN
  layer) from the per-call counts, at R = 64, 256, 1024.
- `firing()`: how often the centered sums need their second exchange, over a
  few hundred steps of `examples/train_mirrored.py`-style training and from
  scratch on data with mean 1000 and standard deviation 0.01.
"""

import contextlib
import os
import statistics
import sys

import keras
import numpy as np
import tensorflow as tf

import bnconvert
from bnconvert import sync_stats

REPLICAS = (2, 4, 8, 16)
FLOAT_BYTES = 4


@contextlib.contextmanager
def threshold(value):
    """Sets `sync_stats.TABLE_MAX_REPLICAS` while steps are traced."""
    saved = sync_stats.TABLE_MAX_REPLICAS
    sync_stats.TABLE_MAX_REPLICAS = saved if value is None else value
    try:
        yield
    finally:
        sync_stats.TABLE_MAX_REPLICAS = saved


# name -> (layer factory key, threshold forced while tracing)
VARIANTS = {
    "ours": ("ours", None),
    "table": ("ours", 1 << 30),
    "centered": ("ours", 1),
    "keras-sync": ("keras_sync", None),
}


class Counter:
    """Run-time counts of `ReplicaContext.all_reduce` calls and values."""

    def __init__(self):
        with tf.init_scope():
            self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.values = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._original = tf.distribute.ReplicaContext.all_reduce

    @contextlib.contextmanager
    def installed(self):
        original = self._original
        counter = self

        def counting(ctx, reduce_op, value, options=None):
            for t in tf.nest.flatten(value):
                counter.calls.assign_add(1)
                counter.values.assign_add(tf.cast(tf.size(t), tf.int64))
            return original(ctx, reduce_op, value, options)

        tf.distribute.ReplicaContext.all_reduce = counting
        try:
            yield self
        finally:
            tf.distribute.ReplicaContext.all_reduce = original

    def read(self, replicas):
        out = int(self.calls.numpy()) // replicas, int(self.values.numpy()) // replicas
        self.calls.assign(0)
        self.values.assign(0)
        return out


def per_call_values(bench, variant, replicas, channels, counter):
    """`(calls, values)` per replica for one forward and one forward+backward."""
    make, forced = VARIANTS[variant]
    strat = bench.strategy(replicas)
    x = np.random.default_rng(0).normal(size=(2 * replicas, 4, 4, channels))
    x = x.astype(np.float32)
    with strat.scope():
        layer = getattr(bench, make)()
        layer.build(x.shape)
    shards = bench.per_replica(strat, np.split(x, replicas))

    def forward(t):
        return layer(t, training=True)

    def both(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            loss = tf.reduce_sum(layer(t, training=True) * tf.cos(t))
        return tape.gradient(loss, t)

    out = []
    with threshold(forced), counter.installed():
        for fn in (forward, both):
            tf.function(lambda v, fn=fn: strat.run(fn, args=(v,)))(shards)
            out.append(counter.read(replicas))
    return out


DEPTH = 10


def step_times(bench, replicas, quick):
    # 10 BN layers (P2 has 20): tracing 4 variants at 16 replicas is the
    # slow part. Short alternating blocks, so that load from other jobs on
    # the machine falls on every variant alike.
    depth = 4 if quick else DEPTH
    rounds, steps = (2, 2) if quick else (9, 3)
    rs = np.random.RandomState(0)
    batch = max(32, 2 * replicas)
    x = rs.randn(batch, 8, 8, 16).astype(np.float32)
    y = rs.randn(batch, 10).astype(np.float32)
    fns = {}
    for name, (make, forced) in VARIANTS.items():
        with threshold(forced):
            fn = bench.make_step(getattr(bench, make), replicas, x, y, depth)
            bench.timed(fn, 1)  # traced under the forced threshold
        fns[name] = fn
    # The first runs after other functions were traced carry a one-off
    # cost of several hundred ms: warm every step up once they all exist.
    for fn in fns.values():
        bench.timed(fn, 3)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench.timed(fn, steps))
    return {name: statistics.median(t) for name, t in times.items()}


def resnet50_bn_channels():
    model = keras.applications.ResNet50(weights=None)
    sizes = [layer.moving_mean.shape[0] for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    return len(sizes), sum(sizes)


def p5(bench, quick):
    channels = 64
    counter = Counter()
    # --quick is a smoke run (the test suite runs it): two replica counts.
    replica_counts = REPLICAS[:2] if quick else REPLICAS
    print(f"P5  scale: values all-reduced per replica per layer call (C={channels}, "
          "counted at run time) and training-step time")
    print(f"    {'R':>3}  {'variant':<11}{'fwd calls':>10}{'fwd values':>11}"
          f"{'fwd+bwd values':>15}{'per C (fwd)':>12}")
    measured = {}
    for replicas in replica_counts:
        for variant in VARIANTS:
            (fc, fv), (_, bv) = per_call_values(bench, variant, replicas, channels, counter)
            measured[replicas, variant] = (fc, fv, bv)
            print(f"    {replicas:>3}  {variant:<11}{fc:>10}{fv:>11}{bv:>15}"
                  f"{fv / channels:>12.2f}")
    centered_fwd = measured[replica_counts[-1], "centered"][1]
    print(f"    centered payload {centered_fwd} values = {centered_fwd / channels:.3f} C "
          f"(target <= 4C + 1 = {4 * channels + 1}): "
          f"{'met' if centered_fwd <= 4 * channels + 1 else 'NOT met'}")

    print(f"    step time (conv net, {4 if quick else DEPTH} BN layers, global batch 32), "
          "median ms; ratio to keras-sync")
    print(f"    {'R':>3}" + "".join(f"{n:>12}" for n in VARIANTS)
          + "   ours/keras  table/keras  centered/keras")
    rows = {}
    for replicas in replica_counts:
        t = step_times(bench, replicas, quick)
        rows[replicas] = t
        k = t["keras-sync"]
        print(f"    {replicas:>3}" + "".join(f"{t[n] * 1e3:>12.2f}" for n in VARIANTS)
              + f"   {t['ours'] / k:>10.3f}  {t['table'] / k:>11.3f}"
              f"  {t['centered'] / k:>14.3f}")
    cross = [r for r in replica_counts if rows[r]["centered"] < rows[r]["table"]]
    print(f"    centered faster than table at R = {cross or 'none measured'}; "
          f"TABLE_MAX_REPLICAS = {sync_stats.TABLE_MAX_REPLICAS}")

    layers, total_c = resnet50_bn_channels()
    print(f"    ResNet50: {layers} BN layers, {total_c} channels; payload per training "
          "step (forward + backward, all BN layers)")
    print(f"    {'R':>6}{'table MB':>11}{'centered MB':>13}{'+ if every 2nd fires':>22}"
          f"{'keras-sync MB':>15}")
    # Per layer: table 2 * R * 4C; centered 2 * (2C + 1) (+ 2 * 2C if the
    # second exchange fires); keras-sync as measured per call, scaled in C.
    ks_fv, ks_bv = measured[replica_counts[-1], "keras-sync"][1:]
    for replicas in (64, 256, 1024):
        table = 2 * replicas * 4 * total_c
        centered = 2 * (2 * total_c + layers)
        fired = centered + 2 * 2 * total_c
        keras_sync = ks_bv / channels * total_c
        mb = lambda v: v * FLOAT_BYTES / 1e6
        print(f"    {replicas:>6}{mb(table):>11.1f}{mb(centered):>13.3f}{mb(fired):>22.3f}"
              f"{mb(keras_sync):>15.3f}")
    return measured, rows


class FireCounter:
    """Counts the centered sums' second exchanges that carried values."""

    def __init__(self):
        with tf.init_scope():
            self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.nonempty = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.original = sync_stats.all_reduce

    def __call__(self, ctx, value):
        self.calls.assign_add(1)
        self.nonempty.assign_add(tf.cast(tf.size(value) > 0, tf.int64))
        return self.original(ctx, value)

    def rate(self, replicas):
        calls = int(self.calls.numpy()) // replicas // 2
        fired = int(self.nonempty.numpy()) // replicas - calls
        return fired, calls


def _fit_counting(model_fn, strat, data, steps, memory=True):
    counter = FireCounter()
    sync_stats.all_reduce = counter
    try:
        with threshold(1), strat.scope():
            model = model_fn()
            if not memory:
                for layer in model.layers:
                    if isinstance(layer, bnconvert.SyncBatchNormalization):
                        layer._memory.variable = None
            model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    finally:
        sync_stats.all_reduce = counter.original
    return counter.rate(strat.num_replicas_in_sync)


def firing(bench, quick):
    steps = 20 if quick else 300
    replicas = 4
    strat = bench.strategy(replicas)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "examples"))
    from make_small_model import build_small_resnet, randomize_batchnorm

    print(f"P5  second exchange of the centered sums: fired / layer calls, {steps} "
          f"steps, {replicas} replicas (centered forced), CANCELLATION_RATIO = "
          f"{sync_stats.CANCELLATION_RATIO}")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=256)
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16)

    def resnet():
        original = build_small_resnet()
        randomize_batchnorm(original)
        model = bnconvert.convert_model(original, verify=False)
        model.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    offset_x = (1000.0 + 0.1 * rng.random(8) + 0.01 * rng.normal(size=(1024, 8)))
    offset_y = rng.normal(size=(1024, 1))
    offset_data = tf.data.Dataset.from_tensor_slices(
        (offset_x.astype("float32"), offset_y.astype("float32"))).repeat().batch(32)

    def from_scratch():
        inputs = keras.Input((8,))
        h = bnconvert.SyncBatchNormalization(name="bn0")(inputs)
        h = keras.layers.Dense(8, activation="relu")(h)
        h = bnconvert.SyncBatchNormalization(name="bn1")(h)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        return model

    cases = [
        ("small ResNet (train_mirrored.py), random BN statistics", resnet, data, True),
        ("mean 1000, std 0.01 from scratch", from_scratch, offset_data, True),
        ("  same, reference = moving mean only", from_scratch, offset_data, False),
    ]
    for label, fn, ds, memory in cases:
        fired, calls = _fit_counting(fn, strat, ds, steps, memory)
        print(f"    {label:<56}{fired:>6} / {calls:<6} = {fired / max(calls, 1):.4f}")
