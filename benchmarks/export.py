"""P4: ResNet50 to ONNX — our to-inference against Keras's own export.

Prints, side by side and measured in this one run:

- P4 time: `convert_model(to="inference")` (unsync + fold + verify) plus
  `export_onnx` (default exporter `auto`, which takes the native one here;
  onnxruntime check included), against the anchor
  `model.export(format="onnx")` of the original model;
- the native and the tf2onnx exporter on the same folded model: time to
  write the graph, and the whole `export_onnx` call (check included);
- latency: onnxruntime median latency of the native export, and of our
  tf2onnx export, against the file Keras's export (tf2onnx) wrote for the
  original model;
- time per layer of the native exporter on Dense/BatchNormalization chains
  of 100, 500 and 2,000 layers (graph written and serialized, no check),
  which should not grow with the depth.

Usage: python benchmarks/export.py [--size 224] [--runs 30] [--repeats 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import bnconvert  # noqa: E402
from bnconvert.convert import convert_model  # noqa: E402

# A 2,000-layer chain nests Keras's graph walks deeper than 1,000 frames.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


def resnet50(size):
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([
                rng.uniform(0.9, 1.1, n), rng.normal(0, 0.1, n),
                rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n),
            ])
    return model


def latency_ms(path, x, runs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared; one core each
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def chain(n_layers, width=16):
    """Dense, BN, Dense, BN, ... (`n_layers` layers)."""
    inputs = keras.Input((width,))
    x = inputs
    for i in range(n_layers // 2):
        x = keras.layers.Dense(width, name=f"dense_{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
    return keras.Model(inputs, x, name=f"chain_{n_layers}")


def chains(sizes, repeats, tmp):
    rows = []
    for n in sizes:
        model = chain(n)
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
    args = parser.parse_args()

    model = resnet50(args.size)
    x = np.random.default_rng(1).normal(size=(1, args.size, args.size, 3)).astype("float32")
    model.predict(x, verbose=0)  # Keras's export needs a model that was called
    tmp = tempfile.mkdtemp(prefix="bnconvert-bench-")
    anchor_path = os.path.join(tmp, "keras_export.onnx")
    native_path = os.path.join(tmp, "native.onnx")
    tf2onnx_path = os.path.join(tmp, "tf2onnx.onnx")

    # Alternate ours and the anchor so that load on the machine hits both.
    ours, anchor = [], []
    for _ in range(args.repeats):
        anchor.append(timed(lambda: model.export(anchor_path, format="onnx", verbose=False))[0])
        convert_s, folded = timed(lambda: convert_model(model, to="inference"))
        export_s, result = timed(lambda: bnconvert.export_onnx(folded, native_path))
        ours.append((convert_s + export_s, convert_s, export_s, result))
    total, convert_s, export_s, result = min(ours, key=lambda r: r[0])
    anchor_s = min(anchor)
    tf2onnx_s, tf2onnx_result = timed(
        lambda: bnconvert.export_onnx(folded, tf2onnx_path, exporter="tf2onnx"))

    anchor_ms = latency_ms(anchor_path, x, args.runs)
    native_ms = latency_ms(native_path, x, args.runs)
    tf2onnx_ms = latency_ms(tf2onnx_path, x, args.runs)

    print(f"ResNet50 {args.size}x{args.size}, best of {args.repeats}; latency batch 1, "
          "onnxruntime 1 thread")
    print(f"{'':40}{'ours':>10}{'anchor':>10}{'ratio':>8}  target")
    print(f"{'P4 to-inference time (s)':40}{total:10.2f}{anchor_s:10.2f}"
          f"{total / anchor_s:8.2f}  <= 0.1x (anchor: Keras model.export onnx)")
    print(f"{'  convert+fold+verify (s)':40}{convert_s:10.2f}")
    print(f"{'  export+onnxruntime check (s)':40}{export_s:10.2f}   exporter: {result.exporter}")
    print(f"{'native / tf2onnx: write graph (s)':40}{result.seconds:10.2f}"
          f"{tf2onnx_result.seconds:10.2f}{result.seconds / tf2onnx_result.seconds:8.2f}")
    print(f"{'native / tf2onnx: export_onnx call (s)':40}{export_s:10.2f}"
          f"{tf2onnx_s:10.2f}{export_s / tf2onnx_s:8.2f}")
    print(f"{'latency native (ms)':40}{native_ms:10.2f}{anchor_ms:10.2f}"
          f"{native_ms / anchor_ms:8.2f}  <= 1.0x (anchor: tf2onnx export of original)")
    print(f"{'latency our tf2onnx export (ms)':40}{tf2onnx_ms:10.2f}{anchor_ms:10.2f}"
          f"{tf2onnx_ms / anchor_ms:8.2f}")
    print(f"check: max |diff| {result.max_abs_diff:.3g}, relative {result.max_rel_diff:.3g}")

    rows = chains((100, 500, 2000), args.repeats, tmp)
    first = rows[0][1]
    print("Native exporter on Dense/BN chains (graph written + serialized, best of "
          f"{args.repeats}); target: ms/layer flat")
    for n, per_layer in rows:
        print(f"  {n:5d} layers: {per_layer:7.3f} ms/layer  ratio {per_layer / first:5.2f}")


if __name__ == "__main__":
    main()
