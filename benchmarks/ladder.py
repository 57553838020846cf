"""Issue 18's ladder: whole `bnconvert` processes against Keras doing the least, side by side.

Each rung is a model file: EfficientNetV2 B0, S, M and L from
keras.applications (`weights=None`, each BN's moving statistics then set
to those of its input on a calibration batch, as a trained model's are;
L is a 480 MB file) and a chain of 2,000 Dense/BatchNormalization layers. For each rung, in one run and in
fresh processes (TensorFlow starts on both sides), the sides alternate
(which goes first flips every round) and their medians are compared:

- `to-sync`: `bnconvert to-sync` against `python -c` Keras load + save;
- `inspect`: `bnconvert inspect` against Keras load alone;
- `to-inference`: `bnconvert to-inference` against Keras load +
  `model.export(format="onnx")` (given `--export-timeout` seconds).

Time is wall-clock; peak RSS is each child's own (`os.wait4`). The files
live in a temporary directory under /tmp, removed at the end. Used by
`benchmarks/convert.py --ladder` (to-sync, inspect) and
`benchmarks/export.py --ladder` (to-inference):

    python benchmarks/convert.py --ladder B0,S,M,L,chain [--repeats 3]
"""

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "bnconvert_cli.py")]
CHAIN_LAYERS = 2000

_PRELUDE = (
    "import os, sys; os.environ.setdefault('KERAS_BACKEND', 'tensorflow'); "
    "sys.setrecursionlimit(20000); import keras; "
)
_MAKE = _PRELUDE + (
    "rung, path = sys.argv[1:]\n"
    "if rung == 'chain':\n"
    f"    x = inputs = keras.Input((16,))\n"
    f"    for i in range({CHAIN_LAYERS} // 2):\n"
    "        x = keras.layers.BatchNormalization(name=f'bn_{i}')(keras.layers.Dense(16, name=f'd_{i}')(x))\n"
    "    model = keras.Model(inputs, x, name='chain')\n"
    "else:\n"
    "    model = getattr(keras.applications, 'EfficientNetV2' + rung)(weights=None)\n"
    "    calibrate(model)\n"
    "model.save(path); print('LAYERS', len(model.layers))"
)
# A trained model's moving statistics match its activations; random weights
# with moving statistics 0 and 1 make EfficientNetV2L chaotic (see
# bnconvert/stability.py). One training-mode pass with momentum 0 sets each
# BN's moving mean and variance to those of its input on a calibration
# batch (standard normal like the check batch, another seed), dropout off;
# in graph mode, which does not hold every tensor of the pass.
_CALIBRATE = (
    "def calibrate(model, batch=4):\n"
    "    import numpy as np, tensorflow as tf\n"
    "    layers = [l for l in model._flatten_layers() if l is not model]\n"
    "    bns = [l for l in layers if isinstance(l, keras.layers.BatchNormalization)]\n"
    "    drops = [l for l in layers if isinstance(l, keras.layers.Dropout)]\n"
    "    saved = [(l, l.momentum) for l in bns] + [(l, l.rate) for l in drops]\n"
    "    for l in bns: l.momentum = 0.0\n"
    "    for l in drops: l.rate = 0.0\n"
    "    shape = (batch,) + tuple(model.inputs[0].shape[1:])\n"
    "    x = np.random.default_rng(99).standard_normal(shape).astype('float32')\n"
    "    tf.function(lambda v: model(v, training=True), autograph=False)(x)\n"
    "    for l, value in saved:\n"
    "        setattr(l, 'momentum' if l in bns else 'rate', value)\n"
)
_MAKE = _MAKE.replace("rung, path = sys.argv[1:]\n", "\n" + _CALIBRATE + "rung, path = sys.argv[1:]\n")
_LOAD_SAVE = _PRELUDE + "keras.saving.load_model(sys.argv[1]).save(sys.argv[2])"
_LOAD = _PRELUDE + "keras.saving.load_model(sys.argv[1])"
# Keras's export refuses a model that was never called ("The model provided
# has never called"): a loaded model is called once, on one zero sample.
_LOAD_EXPORT = _PRELUDE + (
    "import numpy as np; model = keras.saving.load_model(sys.argv[1]); "
    "model(np.zeros((1,) + tuple(model.inputs[0].shape[1:]), 'float32')); "
    "model.export(sys.argv[2], format='onnx', verbose=False)"
)


def measure(argv, timeout=3600):
    """Runs `argv`; returns `(seconds, peak RSS in MB, exit code, stdout)` of that process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2",
               KERAS_BACKEND="tensorflow")
    out = tempfile.TemporaryFile()
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, env=env)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            child.kill()
            pid, status, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode(errors="replace")
    out.close()
    # ru_maxrss is in kilobytes on Linux.
    return seconds, usage.ru_maxrss / 1024, child.returncode, text


def make(rung, path):
    """Writes the rung's model to `path`; returns its layer count."""
    _, _, code, text = measure([sys.executable, "-c", _MAKE, rung, str(path)])
    if code != 0:
        raise SystemExit(f"could not build {rung}: exit {code}")
    return int(text.split("LAYERS")[-1].split()[0])


def sides(command, source, work):
    """`(ours, anchor, anchor's name)`: the two argvs compared for `command`."""
    if command == "to-sync":
        return ([*CLI, "to-sync", str(source), "-o", str(work / "out.keras"), "--force",
                 "--report", str(work / "report.json")],
                [sys.executable, "-c", _LOAD_SAVE, str(source), str(work / "anchor.keras")],
                "load + save")
    if command == "inspect":
        return [*CLI, "inspect", str(source)], [sys.executable, "-c", _LOAD, str(source)], "load"
    return ([*CLI, "to-inference", str(source), "-o", str(work / "out.onnx"), "--force",
             "--report", str(work / "report.json")],
            [sys.executable, "-c", _LOAD_EXPORT, str(source), str(work / "anchor.onnx")],
            "load + Keras export")


def run_ladder(rungs, commands, repeats, anchor_timeout=3600, log=print):
    """Measures every rung and command; returns one dict per (rung, command)."""
    rows = []
    top = pathlib.Path(tempfile.mkdtemp(prefix="bnconvert-ladder-", dir="/tmp"))
    try:
        for rung in rungs:
            work = top / rung
            work.mkdir()
            source = work / f"{rung}.keras"
            layers = make(rung, source)
            size_mb = source.stat().st_size / 2**20
            for command in commands:
                ours, anchor, anchor_name = sides(command, source, work)
                got = {"ours": [], "anchor": []}
                timings = []
                for round_ in range(repeats):
                    order = [("ours", ours), ("anchor", anchor)]
                    for side, argv in order if round_ % 2 == 0 else order[::-1]:
                        limit = anchor_timeout if side == "anchor" else 3600
                        seconds, rss, code, _ = measure(argv, timeout=limit)
                        got[side].append((seconds, rss, code))
                        log(f"  {rung} {command} {side}: {seconds:.1f} s, {rss:.0f} MB, exit {code}")
                    report = work / "report.json"
                    if report.exists():
                        timings.append(json.loads(report.read_text()).get("timings", {}))
                        report.unlink()
                rows.append(_row(rung, command, layers, size_mb, anchor_name, got, timings))
            shutil.rmtree(work)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return rows


def _row(rung, command, layers, size_mb, anchor_name, got, timings):
    def median(side, i, ok_only=True):
        values = [r[i] for r in got[side] if r[2] == 0 or not ok_only]
        return statistics.median(values) if values else None

    steps = {}
    for key in {k for t in timings for k in t}:
        steps[key] = statistics.median(t.get(key, 0.0) for t in timings)
    return {
        "rung": rung, "command": command, "layers": layers, "size_mb": size_mb,
        "anchor": anchor_name, "ours_s": median("ours", 0), "ours_mb": median("ours", 1),
        "anchor_s": median("anchor", 0), "anchor_mb": median("anchor", 1),
        "anchor_failed": sum(1 for r in got["anchor"] if r[2] != 0),
        "ours_failed": sum(1 for r in got["ours"] if r[2] != 0),
        "steps": steps,
    }


def print_rows(rows, targets):
    """The ladder table: medians, ratios, and the work per layer against the first rung's."""
    print(f"{'rung':<7}{'command':<14}{'layers':>7}{'MB':>6}{'ours s':>9}{'anchor s':>9}"
          f"{'x time':>8}{'ours MB':>9}{'anchor MB':>10}{'x RSS':>7}{'ms/layer':>10}{'ratio':>7}")
    first = {}
    for r in rows:
        ratio_s = ratio_mb = None
        if r["ours_s"] and r["anchor_s"]:
            ratio_s, ratio_mb = r["ours_s"] / r["anchor_s"], r["ours_mb"] / r["anchor_mb"]
        # Work per layer: the report's timed steps, without process start-up.
        work = sum(r["steps"].values()) if r["steps"] else r["ours_s"] or 0.0
        per_layer = 1000 * work / r["layers"]
        base = first.setdefault(r["command"], per_layer) or float("nan")
        anchor_s = f"{r['anchor_s']:9.1f}" if r["anchor_s"] else f"{'failed':>9}"
        anchor_mb = f"{r['anchor_mb']:10.0f}" if r["anchor_mb"] else f"{'-':>10}"
        print(f"{r['rung']:<7}{r['command']:<14}{r['layers']:>7}{r['size_mb']:>6.0f}"
              f"{r['ours_s'] or float('nan'):>9.1f}{anchor_s}"
              f"{ratio_s if ratio_s else float('nan'):>8.2f}{r['ours_mb'] or float('nan'):>9.0f}"
              f"{anchor_mb}{ratio_mb if ratio_mb else float('nan'):>7.2f}"
              f"{per_layer:>10.1f}{per_layer / base:>7.2f}")
        if r["ours_failed"] or r["anchor_failed"]:
            print(f"{'':21}failed runs: ours {r['ours_failed']}, anchor {r['anchor_failed']}")
        if r["steps"]:
            print(f"{'':21}steps (median s): " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(r["steps"].items(), key=lambda kv: -kv[1])))
    print("targets: " + targets)
