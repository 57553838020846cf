"""P5 of `benchmarks/sync_bn.py`: what the exchange costs as the replica count grows.

Run through `python benchmarks/sync_bn.py --only p5 [--repeat 3]`; this module
borrows the strategies, the conv net and the timing loop of that script
(passed in as `bench`), so that all figures come from one process.

- Collectives, values and bytes all-reduced per layer call:
  `tf.distribute.ReplicaContext.all_reduce` (which `sync_stats.all_reduce`
  calls, and keras-sync too) is wrapped so that every call adds what it
  sends to counters, at run time. Forward alone, then forward + backward
  (ours: one all-reduce of the 2C upstream sums; keras-sync: autodiff, the
  gradient of an all-reduce SUM being an all-reduce of the same size).
- Training-step time at 2, 4, 8, 16 replicas: each of our exchanges forced
  (`table`, `centered`) and keras-sync, measured alternately in the same
  run; ratios against keras-sync and centered / table. `--repeat N` runs
  the whole comparison N times (fresh models each time) and reports the
  medians of the ratios.
- ResNet50: the payload per training step (forward + backward, every BN
  layer) from the per-call byte counts, at R = 64, 256, 1024.
"""

import contextlib
import statistics

import keras
import numpy as np
import tensorflow as tf

from bnconvert import sync_stats

REPLICAS = (2, 4, 8, 16)


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
# Timed: "ours" is one of table / centered, whichever the replica count picks.
TIMED = ("table", "centered", "keras-sync")


class Counter:
    """Run-time counts of `ReplicaContext.all_reduce` calls, values and bytes."""

    def __init__(self):
        with tf.init_scope():
            self.calls = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.values = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.bytes = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._original = tf.distribute.ReplicaContext.all_reduce

    @contextlib.contextmanager
    def installed(self):
        original = self._original
        counter = self

        def counting(ctx, reduce_op, value, options=None):
            for t in tf.nest.flatten(value):
                counter.calls.assign_add(1)
                size = tf.cast(tf.size(t), tf.int64)
                counter.values.assign_add(size)
                counter.bytes.assign_add(size * t.dtype.size)
            return original(ctx, reduce_op, value, options)

        tf.distribute.ReplicaContext.all_reduce = counting
        try:
            yield self
        finally:
            tf.distribute.ReplicaContext.all_reduce = original

    def read(self, replicas):
        """`(calls, values, bytes)` per replica since the last read."""
        out = tuple(int(v.numpy()) // replicas for v in (self.calls, self.values, self.bytes))
        for v in (self.calls, self.values, self.bytes):
            v.assign(0)
        return out


def per_call_values(bench, variant, replicas, channels, counter):
    """`(calls, values, bytes)` per replica: forward, then forward+backward."""
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
    for name in TIMED:
        make, forced = VARIANTS[name]
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


def p5(bench, quick, repeat=1):
    channels = 64
    counter = Counter()
    # --quick is a smoke run (the test suite runs it): two replica counts.
    replica_counts = REPLICAS[:2] if quick else REPLICAS
    print(f"P5  scale: all-reduces, values and bytes per replica per layer call "
          f"(C={channels}, counted at run time) and training-step time; "
          f"TABLE_MAX_REPLICAS = {sync_stats.TABLE_MAX_REPLICAS}")
    print(f"    {'R':>3}  {'variant':<11}{'fwd calls':>10}{'fwd values':>11}"
          f"{'fwd bytes':>10}{'fwd+bwd bytes':>14}{'bytes/C':>9}")
    measured = {}
    for replicas in replica_counts:
        for variant in VARIANTS:
            (fc, fv, fb), (_, _, bb) = per_call_values(
                bench, variant, replicas, channels, counter)
            measured[replicas, variant] = (fc, fv, fb, bb)
            print(f"    {replicas:>3}  {variant:<11}{fc:>10}{fv:>11}{fb:>10}{bb:>14}"
                  f"{fb / channels:>9.2f}")
    centered = {measured[r, "centered"][2] for r in replica_counts}
    print(f"    centered bytes per call at every R: {sorted(centered)} "
          f"(8 * (2C + 1) = {8 * (2 * channels + 1)})")

    depth = 4 if quick else DEPTH
    print(f"    step time (conv net, {depth} BN layers, global batch max(32, 2R)), "
          f"median ms of alternating rounds; ratios; {repeat} run(s)")
    print(f"    {'R':>3}{'run':>4}" + "".join(f"{n:>12}" for n in TIMED)
          + "  table/keras  centered/keras  centered/table")
    ratios = {}
    for replicas in replica_counts:
        for run in range(repeat):
            t = step_times(bench, replicas, quick)
            k = t["keras-sync"]
            row = (t["table"] / k, t["centered"] / k, t["centered"] / t["table"])
            ratios.setdefault(replicas, []).append(row)
            print(f"    {replicas:>3}{run + 1:>4}" + "".join(f"{t[n] * 1e3:>12.2f}" for n in TIMED)
                  + f"  {row[0]:>11.3f}  {row[1]:>14.3f}  {row[2]:>14.3f}", flush=True)
    print("    medians over runs:  table/keras  centered/keras  centered/table")
    for replicas in replica_counts:
        med = [statistics.median(col) for col in zip(*ratios[replicas])]
        print(f"    R = {replicas:>2}{'':>12}{med[0]:>11.3f}  {med[1]:>14.3f}  {med[2]:>14.3f}")

    layers, total_c = resnet50_bn_channels()
    print(f"    ResNet50: {layers} BN layers, {total_c} channels; payload per training "
          "step (forward + backward, all BN layers), from the measured bytes per call")
    print(f"    {'R':>6}{'table MB':>11}{'centered MB':>13}{'keras-sync MB':>15}")
    last = replica_counts[-1]
    # Per layer and channel, as measured at C = 64: table R * 4 * 4 bytes
    # forward, centered 8 * 2 (+ 8 per layer for the count); backward, both
    # 2 * 4 (the upstream sums of the correction and the variance).
    fb, bb = measured[last, "table"][2:]
    table_per_rc = fb / (last * channels)
    backward_per_c = (bb - fb) / channels
    centered_fixed = 8  # the count, forward only
    centered_per_c = (measured[last, "centered"][3] - centered_fixed) / channels
    keras_per_c = measured[last, "keras-sync"][3] / channels
    for replicas in (64, 256, 1024):
        mb = lambda b: b / 1e6
        table = (table_per_rc * replicas + backward_per_c) * total_c
        centered = centered_per_c * total_c + centered_fixed * layers
        print(f"    {replicas:>6}{mb(table):>11.1f}{mb(centered):>13.3f}"
              f"{mb(keras_per_c * total_c):>15.3f}")
    return measured, ratios
