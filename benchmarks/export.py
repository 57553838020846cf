"""P4: ResNet50 to ONNX — our to-inference against Keras's own export.

Prints, side by side and measured in this one run:

- time: `convert_model(to="inference")` (unsync + fold + verify) plus
  `export_onnx` (tf2onnx + onnxruntime check), against the anchor
  `model.export(format="onnx")` of the original model;
- latency: onnxruntime median latency of our ONNX file against the file
  Keras's export (tf2onnx) wrote for the original model.

Usage: python benchmarks/export.py [--size 224] [--runs 30]
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import bnconvert  # noqa: E402
from bnconvert.convert import convert_model  # noqa: E402


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    model = resnet50(args.size)
    x = np.random.default_rng(1).normal(size=(1, args.size, args.size, 3)).astype("float32")
    model.predict(x, verbose=0)  # Keras's export needs a model that was called
    tmp = tempfile.mkdtemp(prefix="bnconvert-bench-")
    anchor_path = os.path.join(tmp, "keras_export.onnx")
    ours_path = os.path.join(tmp, "ours.onnx")

    start = time.perf_counter()
    model.export(anchor_path, format="onnx", verbose=False)
    anchor_s = time.perf_counter() - start

    start = time.perf_counter()
    folded = convert_model(model, to="inference")
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    result = bnconvert.export_onnx(folded, ours_path)
    export_s = time.perf_counter() - start
    ours_s = convert_s + export_s

    anchor_ms = latency_ms(anchor_path, x, args.runs)
    ours_ms = latency_ms(ours_path, x, args.runs)

    print(f"ResNet50 {args.size}x{args.size}, batch 1, onnxruntime 1 thread")
    print(f"{'':34}{'ours':>10}{'anchor':>10}{'ratio':>8}  target")
    print(f"{'to-inference time (s)':34}{ours_s:10.2f}{anchor_s:10.2f}"
          f"{ours_s / anchor_s:8.2f}  0.1x (anchor: Keras model.export onnx)")
    print(f"{'  convert+fold+verify (s)':34}{convert_s:10.2f}")
    print(f"{'  export+onnxruntime check (s)':34}{export_s:10.2f}")
    print(f"{'onnxruntime latency (ms)':34}{ours_ms:10.2f}{anchor_ms:10.2f}"
          f"{ours_ms / anchor_ms:8.2f}  <= 1.0x (anchor: tf2onnx export of original)")
    print(f"check: max |diff| {result.max_abs_diff:.3g}, relative {result.max_rel_diff:.3g}")


if __name__ == "__main__":
    main()
