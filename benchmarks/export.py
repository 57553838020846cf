"""P4: ResNet50 to ONNX — our to-inference against Keras's own export.

Prints, side by side and measured in this one run:

- P4 time: what `bnconvert to-inference` does once the model is loaded
  (the original outputs, unsync + fold in place, then `export_onnx` with
  the default exporter `auto`, which takes the native one here, its
  onnxruntime check holding the graph to the original outputs), against the anchor `model.export(format="onnx")` of the
  original model. Each side runs cold, in a fresh process (a second
  `model.export` of the same model reuses its traced functions and takes a
  third of the time; a user exports once), the two alternating, medians
  compared. The Python API path (`convert_model`, which first copies the
  model, then `export_onnx`) is timed the same way;
- the native and the tf2onnx exporter on the same folded model: time to
  write the graph, and the whole `export_onnx` call (check included);
- latency: onnxruntime median latency of the native export, and of our
  tf2onnx export, against the file Keras's export (tf2onnx) wrote for the
  original model, the three sessions taking turns run by run;
- time per layer of the native exporter on Dense/BatchNormalization chains
  of 100, 500 and 2,000 layers (graph written and serialized, no check),
  which should not grow with the depth;
- latency per model (issue 17): onnxruntime median latency of the native
  export against our tf2onnx export of the same folded model, for
  MobileNetV3Large (also minimalistic), EfficientNetV2B0, NASNetMobile and
  ResNet50, the two sessions taking turns (which goes first alternating);
  `--rounds` rounds (rounded up to an even number), each with fresh
  sessions, the native session created first in every other round. In
  this process (TensorFlow loaded), the session created first runs 1 to
  2 % slower, even two sessions of one file; so each pair of rounds, one
  of each order, gives one ratio, the geometric mean of its two rounds'
  ratios, and the table shows the median and the range of these pair
  ratios, of wall time and of the running thread's CPU time (on a shared
  machine, the time the run waited for a core is left out); with the node
  count of each graph after onnxruntime's own optimizations (what runs).
  `--control` measures the native file against a copy of itself the same
  way (what the estimator gives for identical graphs).

With `--ladder B0,S,M,L,chain`, issue 18's ladder instead: whole
`to-inference` processes against Keras load + `model.export(format="onnx")`
(`benchmarks/ladder.py`), time and peak RSS.

Usage: python benchmarks/export.py [--size 224] [--runs 30] [--repeats 3] [--rounds 4]
       [--latency-only] [--models NAME,...] [--control]
       python benchmarks/export.py --ladder L [--repeats 1] [--export-timeout 1200]
"""

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import bnconvert  # noqa: E402
from bnconvert import convert  # noqa: E402
from bnconvert.convert import convert_model  # noqa: E402
from convert import synthetic_chain  # noqa: E402  (benchmarks/convert.py)

# A 2,000-layer chain nests Keras's graph walks deeper than 1,000 frames.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


A = keras.applications
LATENCY_MODELS = {
    "MobileNetV3Large": lambda s: A.MobileNetV3Large(weights=None, input_shape=(s, s, 3)),
    "MobileNetV3Large minimalistic": lambda s: A.MobileNetV3Large(
        weights=None, input_shape=(s, s, 3), minimalistic=True),
    "EfficientNetV2B0": lambda s: A.EfficientNetV2B0(weights=None, input_shape=(s, s, 3)),
    "NASNetMobile": lambda s: A.NASNetMobile(weights=None, input_shape=(s, s, 3)),
    "ResNet50": lambda s: A.ResNet50(weights=None, input_shape=(s, s, 3)),
}


def resnet50(size):
    return randomized_bn(LATENCY_MODELS["ResNet50"](size))


def randomized_bn(model):
    """`model` with BN statistics, gamma and beta drawn at random (seed 0)."""
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([
                rng.uniform(0.9, 1.1, n), rng.normal(0, 0.1, n),
                rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n),
            ])
    return model


def latencies_ms(paths, x, runs, cpu=False):
    """Median onnxruntime latency of each file, the sessions taking turns.

    Which session goes first rotates run by run, so that none always runs
    right after another (its caches warm or cold from it). With `cpu`, the
    medians of the calling thread's CPU time too (onnxruntime runs a
    one-thread session on it): on a shared machine, time spent waiting for
    a core is left out. Returns `[wall ms, ...]`, or `([wall], [cpu])`.
    """
    sessions = []
    for path in paths:
        session = _session(path)
        feed = {session.get_inputs()[0].name: x}
        for _ in range(3):
            session.run(None, feed)
        sessions.append((session, feed))
    times = [[] for _ in paths]
    cpu_times = [[] for _ in paths]
    for run in range(runs):
        turn = run % len(paths)
        for i in list(range(turn, len(paths))) + list(range(turn)):
            session, feed = sessions[i]
            start, start_cpu = time.perf_counter(), time.thread_time()
            session.run(None, feed)
            cpu_times[i].append(time.thread_time() - start_cpu)
            times[i].append(time.perf_counter() - start)
    wall = [1000 * statistics.median(t) for t in times]
    return (wall, [1000 * statistics.median(t) for t in cpu_times]) if cpu else wall


def _session(path, optimized=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared; one core each
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _nodes_after_optimization(path):
    """Nodes of the graph onnxruntime runs (after its fusions), as saved by it."""
    import onnx

    _session(path, path + ".ort.onnx")
    return len(onnx.load(path + ".ort.onnx", load_external_data=False).graph.node)


def latency_table(size, runs, rounds, tmp, models=None, control=False):
    """Native / tf2onnx latency per model.

    Rows `(name, native ms, tf2onnx ms, wall ratios, CPU ratios, nodes,
    control)`: medians over rounds of each side's median, one ratio per
    pair of rounds (`_pair_ratios`), and with `control` the wall and CPU
    pair ratios of the native file against a copy of itself.
    """
    rows = []
    for name, build in LATENCY_MODELS.items():
        if models and name not in models:
            continue
        keras.utils.set_random_seed(0)
        model = randomized_bn(build(size))
        folded = convert_model(model, to="inference")
        paths = [os.path.join(tmp, f"{name.replace(' ', '_')}_{e}.onnx") for e in ("n", "t")]
        for path, exporter in zip(paths, ("native", "tf2onnx")):
            bnconvert.export_onnx(folded, path, exporter=exporter)
        x = np.random.default_rng(1).normal(size=(1, size, size, 3)).astype("float32")
        figures = [_round(paths, x, runs, r) for r in range(rounds + rounds % 2)]
        same = None
        if control:
            copy = paths[0][:-len(".onnx")] + "_copy.onnx"
            shutil.copyfile(paths[0], copy)
            same = _pair_ratios([_round([paths[0], copy], x, runs, r)
                                 for r in range(rounds + rounds % 2)])
        rows.append((name, statistics.median(f[0][0] for f in figures),
                     statistics.median(f[0][1] for f in figures), *_pair_ratios(figures),
                     [_nodes_after_optimization(p) for p in paths], same))
        del model, folded
        keras.backend.clear_session()
        gc.collect()  # five models' graphs at once would take 5 GB
    return rows


def _pair_ratios(figures):
    """`(wall, cpu)`: per pair of rounds, the geometric mean of its two rounds' ratios.

    Rounds alternate which session is created first; a slowdown of the one
    created first multiplies one round's ratio and divides the other's.
    """
    pairs = []
    for kind in (0, 1):
        ratios = [f[kind][0] / f[kind][1] for f in figures]
        pairs.append([math.sqrt(a * b) for a, b in zip(ratios[::2], ratios[1::2])])
    return pairs


def _round(paths, x, runs, number):
    """`latencies_ms` of two files, the session created first alternating round by round.

    In this process, the session created first ran 1 to 2 % slower in six
    rounds of six, two sessions of one file (NASNetMobile 1.011 to 1.025,
    minimalistic 0.99 to 1.02); in a fresh process without TensorFlow, no
    such bias. `_pair_ratios` cancels it.
    """
    if number % 2 == 0:
        return latencies_ms(paths, x, runs, cpu=True)
    wall, cpu = latencies_ms(paths[::-1], x, runs, cpu=True)
    return wall[::-1], cpu[::-1]


def print_latency_table(rows, size, runs, rounds):
    rounds += rounds % 2
    print(f"Latency {size}x{size}, batch 1, onnxruntime 1 thread: native / our tf2onnx export "
          f"of the same folded model, medians of {runs} runs taking turns, {rounds} rounds "
          f"(which session is created first alternating; one ratio per pair of rounds: the "
          "geometric mean of the two); target <= 1.0")
    print(f"{'':32}{'native':>9}{'tf2onnx':>9}{'ratio':>7}{'cpu':>7}  pairs' range (wall; cpu)"
          "  nodes run (n/t)")
    for name, native_ms, tf2onnx_ms, ratios, cpu_ratios, nodes, same in rows:
        print(f"{name:32}{native_ms:9.2f}{tf2onnx_ms:9.2f}{statistics.median(ratios):7.3f}"
              f"{statistics.median(cpu_ratios):7.3f}  {_spread(ratios, cpu_ratios):24} "
              f"{nodes[0]}/{nodes[1]}")
        if same:
            print(f"{'  control: native / its copy':50}{statistics.median(same[0]):7.3f}"
                  f"{statistics.median(same[1]):7.3f}  {_spread(*same)}")


def _spread(wall, cpu):
    return f"{min(wall):.3f}-{max(wall):.3f}; {min(cpu):.3f}-{max(cpu):.3f}"


def child(kind, size, path):
    """One cold measurement in this fresh process; prints a JSON line."""
    model = resnet50(size)
    x = np.random.default_rng(1).normal(size=(1, size, size, 3)).astype("float32")
    model.predict(x, verbose=0)  # Keras's export needs a model that was called
    figures = {}
    start = time.perf_counter()
    if kind == "anchor":
        model.export(path, format="onnx", verbose=False)
    elif kind == "cli":
        # bnconvert to-inference after loading: the loaded model is its own,
        # and with default options the onnxruntime gate holds the graph to
        # the original outputs, checking the fold too (`pipeline`).
        job = convert.prepare(model, "inference")
        done = convert.run_conversion(job, fold=True, in_place=True, check=False)
        figures["convert"] = time.perf_counter() - start
        result = bnconvert.export_onnx(done.model, path, reference=(done.sample, done.expected))
        figures.update(exporter=result.exporter, diff=result.max_abs_diff)
    else:
        folded = convert_model(model, to="inference")
        figures["convert"] = time.perf_counter() - start
        bnconvert.export_onnx(folded, path)
    figures["total"] = time.perf_counter() - start
    print("RESULT " + json.dumps(figures))


def cold(kind, size, path):
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--size", str(size), "--path", path],
        capture_output=True, text=True, check=True, timeout=900,
    ).stdout
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def chains(sizes, repeats, tmp):
    rows = []
    for n in sizes:
        model = synthetic_chain(n)
        path = os.path.join(tmp, f"chain_{n}.onnx")
        export = lambda: bnconvert.export_onnx(model, path, exporter="native", check=False)
        export()  # warm-up at this size
        best = min(export().seconds for _ in range(repeats))
        rows.append((n, 1000 * best / n))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency-only", action="store_true")
    parser.add_argument("--models", help="comma-separated names of the latency table's models")
    parser.add_argument("--control", action="store_true",
                        help="also measure each native file against a copy of itself")
    parser.add_argument("--child", choices=["anchor", "cli", "api"])
    parser.add_argument("--path")
    parser.add_argument("--ladder", metavar="RUNGS",
                        help="to-inference in whole processes on B0,S,M,L,chain (benchmarks/ladder.py)")
    parser.add_argument("--export-timeout", type=float, default=1200,
                        help="seconds Keras's own export may take per run on the ladder")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.size, args.path)
    if args.ladder:
        import ladder

        rows = ladder.run_ladder(args.ladder.split(","), ["to-inference"], args.repeats,
                                 anchor_timeout=args.export_timeout)
        ladder.print_rows(rows, "to-inference of EfficientNetV2L completes (time, RSS)")
        return 0

    tmp = tempfile.mkdtemp(prefix="bnconvert-bench-")
    if args.latency_only:
        models = args.models.split(",") if args.models else None
        rows = latency_table(args.size, args.runs, args.rounds, tmp, models, args.control)
        return print_latency_table(rows, args.size, args.runs, args.rounds)
    anchor_path = os.path.join(tmp, "keras_export.onnx")
    native_path = os.path.join(tmp, "native.onnx")
    tf2onnx_path = os.path.join(tmp, "tf2onnx.onnx")
    runs = {"anchor": [], "cli": [], "api": []}
    for _ in range(args.repeats):
        for kind in runs:
            path = {"anchor": anchor_path, "cli": native_path}.get(kind, native_path + ".api")
            runs[kind].append(cold(kind, args.size, path))
    median = {k: statistics.median(r["total"] for r in v) for k, v in runs.items()}
    convert_cli = statistics.median(r["convert"] for r in runs["cli"])
    convert_api = statistics.median(r["convert"] for r in runs["api"])

    model = resnet50(args.size)
    x = np.random.default_rng(1).normal(size=(1, args.size, args.size, 3)).astype("float32")
    folded = convert_model(model, to="inference")
    native = bnconvert.export_onnx(folded, native_path, exporter="native")
    tf2onnx_s, tf2onnx = timed(
        lambda: bnconvert.export_onnx(folded, tf2onnx_path, exporter="tf2onnx"))
    native_s, _ = timed(lambda: bnconvert.export_onnx(folded, native_path, exporter="native"))
    anchor_ms, native_ms, tf2onnx_ms = latencies_ms(
        [anchor_path, native_path, tf2onnx_path], x, args.runs)

    print(f"ResNet50 {args.size}x{args.size}; cold runs in fresh processes, medians of "
          f"{args.repeats}; latency batch 1, onnxruntime 1 thread")
    print(f"{'':44}{'ours':>9}{'anchor':>9}{'ratio':>8}  target")
    print(f"{'P4 to-inference after load (s)':44}{median['cli']:9.2f}{median['anchor']:9.2f}"
          f"{median['cli'] / median['anchor']:8.2f}  <= 0.1x (anchor: Keras model.export onnx)")
    for kind in ("cli", "anchor"):
        shown = ", ".join(f"{r['total']:.2f}" for r in runs[kind])
        print(f"{'  each run, ' + kind + ' (s)':44}{shown}")
    print(f"{'  original outputs + unsync + fold (s)':44}{convert_cli:9.2f}")
    print(f"{'  export_onnx, check included (s)':44}{median['cli'] - convert_cli:9.2f}"
          f"   exporter: {runs['cli'][0]['exporter']}")
    print(f"{'API: convert_model + export_onnx (s)':44}{median['api']:9.2f}{median['anchor']:9.2f}"
          f"{median['api'] / median['anchor']:8.2f}  (convert_model copies the model first)")
    print(f"{'  convert_model (s)':44}{convert_api:9.2f}")
    print(f"{'native / tf2onnx: write the graph (s)':44}{native.seconds:9.2f}"
          f"{tf2onnx.seconds:9.2f}{native.seconds / tf2onnx.seconds:8.2f}")
    print(f"{'native / tf2onnx: export_onnx, checked (s)':44}{native_s:9.2f}"
          f"{tf2onnx_s:9.2f}{native_s / tf2onnx_s:8.2f}")
    print(f"{'latency native (ms)':44}{native_ms:9.2f}{anchor_ms:9.2f}"
          f"{native_ms / anchor_ms:8.2f}  <= 1.0x (anchor: tf2onnx export of original)")
    print(f"{'latency our tf2onnx export (ms)':44}{tf2onnx_ms:9.2f}{anchor_ms:9.2f}"
          f"{tf2onnx_ms / anchor_ms:8.2f}")
    print(f"check: max |diff| {native.max_abs_diff:.3g}, relative {native.max_rel_diff:.3g}")

    rows = chains((100, 500, 2000), args.repeats, tmp)
    first = rows[0][1]
    print("Native exporter on Dense/BN chains (graph written + serialized, best of "
          f"{args.repeats}); target: ms/layer flat")
    for n, per_layer in rows:
        print(f"  {n:5d} layers: {per_layer:7.3f} ms/layer  ratio {per_layer / first:5.2f}")
    rows = latency_table(args.size, args.runs, args.rounds, tmp, control=args.control)
    print_latency_table(rows, args.size, args.runs, args.rounds)


if __name__ == "__main__":
    main()
