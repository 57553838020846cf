"""P2, time to the first step: tracing and the first call of a training step.

Run through `python benchmarks/sync_bn.py --only trace [--depth N] [--rounds N]`;
this module borrows the strategies, the conv net and the step builder of that
script (passed in as `bench`).

A compiled training step costs twice before it runs at its own pace: tracing
(Python builds the graph, once per replica under a `MirroredStrategy`) and
the first call (TensorFlow optimizes and places the graph). Both grow with
the number of ops each layer adds. For each Keras (Keras 3, tf-keras) and
replica count, three layers train the same conv net of `--depth` Conv-BN-ReLU
blocks under the same strategy:

- ours: `bnconvert.SyncBatchNormalization` (tf-keras: the
  `bnconvert.compat` class);
- sync: Keras's synchronized BN (`BatchNormalization(synchronized=True)`,
  Keras 3 or tf-keras), the target's anchor;
- plain: unsynchronized `BatchNormalization`, the floor.

Each round builds a fresh model per layer, in turn (ours, sync, plain, then
the order rotates), and times `get_concrete_function` (trace) and the first
call; the medians over rounds are compared. Target: ours / sync <= 1.2 for
trace + first call.
"""

import statistics
import time

REPLICAS = (2, 4, 8)


def layers(k, epsilon):
    """name -> BN factory for the Keras module `k` (keras or tf_keras)."""
    import bnconvert

    if k.__name__ == "tf_keras":
        ours = bnconvert.compat.SyncBatchNormalization
    else:
        ours = bnconvert.SyncBatchNormalization
    return {
        "ours": lambda **kw: ours(epsilon=epsilon, **kw),
        "sync": lambda **kw: k.layers.BatchNormalization(
            synchronized=True, epsilon=epsilon, **kw),
        "plain": lambda **kw: k.layers.BatchNormalization(epsilon=epsilon, **kw),
    }


def _clocks():
    return time.perf_counter(), time.process_time()


def first_step(bench, k, make_bn, replicas, x, y, depth):
    """(wall, CPU) seconds to trace the step, then (wall, CPU) to run it once."""
    step = bench.make_step(make_bn, replicas, x, y, depth, k)
    start = _clocks()
    step.get_concrete_function()
    traced = _clocks()
    out = step()
    for value in getattr(out, "values", (out,)):
        value.numpy()
    done = _clocks()
    return tuple(b - a for a, b in zip(start, traced)), tuple(
        b - a for a, b in zip(traced, done))


def measure(bench, k, replicas, depth, rounds, x, y):
    """Per layer name, medians over rounds (rotating the order) of
    `((trace wall, trace CPU), (first-call wall, first-call CPU))` seconds."""
    factories = layers(k, bench.EPSILON)
    names = list(factories)
    # Untimed: the first model of each kind pays one-time imports and caches.
    for name in names:
        first_step(bench, k, factories[name], replicas, x, y, 1)
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(first_step(bench, k, factories[name], replicas, x, y, depth))
    med = lambda v, i, j: statistics.median(t[i][j] for t in v)
    return {n: tuple(tuple(med(v, i, j) for j in (0, 1)) for i in (0, 1))
            for n, v in times.items()}


def p2_trace(bench, quick=False, depth=None, rounds=None, replicas=REPLICAS,
             kerases=("keras", "tf_keras")):
    import keras
    import numpy as np
    import tf_keras

    depth = depth or (4 if quick else 60)
    rounds = rounds or (1 if quick else 3)
    batch, size, channels = 32, 8, 16
    rs = np.random.RandomState(0)
    x = rs.randn(batch, size, size, channels).astype(np.float32)
    y = rs.randn(batch, 10).astype(np.float32)
    print(f"P2  time to the first step: conv net with {depth} Conv-BN-ReLU blocks, "
          f"global batch {batch}; medians of {rounds} rounds, the layers taking turns;")
    print("    seconds wall / CPU of this process (CPU: steadier on a shared machine)")
    print(f"    {'keras':<9}{'R':>3}{'layer':>7}{'trace':>14}{'first call':>14}"
          f"{'sum':>14}{'/ sync':>12}{'/ plain':>12}   ours/sync <= 1.2")
    pair = lambda t: f"{t[0]:.1f} / {t[1]:.1f}"
    ratio = lambda a, b: f"{a[0] / b[0]:.2f} / {a[1] / b[1]:.2f}"
    ratios = {}
    for k in [{"keras": keras, "tf_keras": tf_keras}[name] for name in kerases]:
        for r in replicas:
            med = measure(bench, k, r, depth, rounds, x, y)
            total = {n: (v[0][0] + v[1][0], v[0][1] + v[1][1]) for n, v in med.items()}
            for name, (trace, first) in med.items():
                met = ""
                if name == "ours":
                    ratios[(k.__name__, r)] = {
                        what: tuple(a / b for a, b in zip(mine, theirs))
                        for what, mine, theirs in (
                            ("trace", trace, med["sync"][0]),
                            ("first", first, med["sync"][1]),
                            ("sum", total["ours"], total["sync"]))}
                    met = "yes" if max(ratios[(k.__name__, r)]["sum"]) <= 1.2 else "NO"
                print(f"    {k.__name__:<9}{r:>3}{name:>7}{pair(trace):>14}{pair(first):>14}"
                      f"{pair(total[name]):>14}{ratio(total[name], total['sync']):>12}"
                      f"{ratio(total[name], total['plain']):>12}   {met}", flush=True)
    return ratios
