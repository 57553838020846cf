"""Measures the output differences that folding and the ONNX export really cause.

The defaults of bnconvert's output comparisons come from these figures: a
per-element check `|a - b| <= atol + rtol * |b|` (b the reference) must accept
the float32 reordering of a correct fold or export in a deep network and
reject a wrong fold. For each keras.applications model below (random
weights, BN statistics randomized as after training), it prints, for the
correct fold and for the ONNX export of the folded model: the largest
absolute difference, the largest difference relative to the output's
largest magnitude, and the smallest `atol` that passes at the default
`rtol`; then the same for two wrong folds (epsilon left out; one BN's
gamma 1% off), which must fail.

    python benchmarks/tolerances.py [--models ResNet50,ResNet50V2,MobileNetV2]
"""

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import bnconvert_cli_startup  # noqa: E402

bnconvert_cli_startup.start_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bnconvert  # noqa: E402
from bnconvert import check_batch  # noqa: E402


def randomized(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.5, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(0, 0.2, c))
    return model


def figures(expected, actual, rtol):
    a = np.concatenate([np.ravel(x).astype(np.float64) for x in expected])
    b = np.concatenate([np.ravel(x).astype(np.float64) for x in actual])
    diff = np.abs(a - b)
    scale = np.abs(a).max()
    needed = float(np.max(diff - rtol * np.abs(a)))
    return diff.max(), diff.max() / scale, max(needed, 0.0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="ResNet50,ResNet50V2,MobileNetV2")
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args()
    print(f"rtol = {args.rtol:g}; columns: max |diff|, relative to max |output|, atol needed")
    for name in args.models.split(","):
        model = randomized(getattr(keras.applications, name)(weights=None, input_shape=(96, 96, 3)))
        sample, _ = check_batch.sample_inputs(model)
        expected = check_batch.run(model, sample)
        folded = bnconvert.convert_model(model, to="inference", verify=False)
        folded_out = check_batch.run(folded, sample)
        print(f"{name:12s} fold       %.2e  %.2e  %.2e" % figures(expected, folded_out, args.rtol))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.onnx")
            bnconvert.export_onnx(folded, path, check=False)
            import onnxruntime as ort

            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: sample[0]})
        print(f"{name:12s} onnx       %.2e  %.2e  %.2e" % figures(expected, got, args.rtol))
        # Wrong folds: one BN folded without its epsilon, one BN's gamma 1% off.
        for label, change in (("no-eps", "eps"), ("gamma+1%", "gamma")):
            wrong = randomized(getattr(keras.applications, name)(weights=None, input_shape=(96, 96, 3)))
            wrong.set_weights(model.get_weights())
            bns = [l for l in wrong.layers if isinstance(l, keras.layers.BatchNormalization)]
            target = bns[len(bns) // 2]
            if change == "eps":
                # gamma / sqrt(var) where gamma / sqrt(var + eps) was due.
                target.moving_variance.assign(target.moving_variance.numpy() - target.epsilon)
            else:
                target.gamma.assign(target.gamma.numpy() * 1.01)
            wrong_out = check_batch.run(wrong, sample)
            row = "  ".join(f"{v:.2e}" for v in figures(expected, wrong_out, args.rtol))
            print(f"{name:12s} {label:10s} {row}")


if __name__ == "__main__":
    main()
