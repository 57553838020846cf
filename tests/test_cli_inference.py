"""End-to-end tests of `bnconvert to-inference` through the CLI.

The reference for the ONNX outputs is the input model itself (synchronized
BN, unfolded), run by Keras.
"""

import hashlib
import json
import pathlib

import keras
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import bnconvert
import bnconvert_cli as cli

L = keras.layers


def _sha(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def synced_model_file(tmp_path_factory):
    """A .keras model with SyncBatchNormalization after Conv, Depthwise and Dense."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((10, 10, 3), name="image")
    y = L.Conv2D(6, 3, name="conv")(inputs)
    y = bnconvert.SyncBatchNormalization(name="sbn1")(y)
    y = L.ReLU()(y)
    y = L.DepthwiseConv2D(3, name="dw", activation="relu")(y)
    y = bnconvert.SyncBatchNormalization(name="sbn2")(y)  # after relu: kept
    y = L.GlobalAveragePooling2D()(y)
    y = L.Dense(4, name="logits")(y)
    y = bnconvert.SyncBatchNormalization(name="sbn3")(y)
    model = keras.Model(inputs, y, name="synced")
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 2, n), rng.normal(size=n),
                rng.normal(size=n), rng.uniform(0.5, 2, n),
            ])
    path = tmp_path_factory.mktemp("model") / "synced.keras"
    model.save(path)
    return path


def test_to_inference_writes_checked_onnx_and_folded_keras(synced_model_file, tmp_path):
    before = _sha(synced_model_file)
    out, keras_out, report = tmp_path / "m.onnx", tmp_path / "f.keras", tmp_path / "r.json"

    result = _run("to-inference", synced_model_file, "-o", out,
                  "--keras-out", keras_out, "--report", report)

    assert result.exit_code == 0, result.output
    assert "onnxruntime check: max |diff|" in result.stdout
    assert "2 folded" in result.stdout and "1 kept" in result.stdout
    assert _sha(synced_model_file) == before

    original = keras.saving.load_model(synced_model_file)
    x = np.random.default_rng(1).normal(size=(3, 10, 10, 3)).astype("float32")
    want = original.predict(x, verbose=0).astype(np.float64)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x})
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-4

    folded = keras.saving.load_model(keras_out)
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert kinds.count("BatchNormalization") == 1
    assert "SyncBatchNormalization" not in kinds

    data = json.loads(report.read_text())
    assert data["counts"]["folded"] == 2 and data["counts"]["kept"] == 1
    assert data["onnx"]["checked"] and data["onnx"]["max_rel_diff"] <= 1e-4


def test_no_fold_keeps_plain_batchnorm(synced_model_file, tmp_path):
    keras_out = tmp_path / "f.keras"
    result = _run("to-inference", synced_model_file, "-o", tmp_path / "m.onnx",
                  "--keras-out", keras_out, "--no-fold", "--no-check")

    assert result.exit_code == 0, result.output
    assert "check skipped" in result.stdout
    kinds = [type(layer).__name__ for layer in keras.saving.load_model(keras_out).layers]
    assert kinds.count("BatchNormalization") == 3


def test_output_directory_missing(synced_model_file, tmp_path):
    result = _run("to-inference", synced_model_file, "-o", tmp_path / "nope" / "m.onnx")
    _assert_one_line_error(result, "does not exist")


def test_opset_the_exporter_cannot_do(synced_model_file, tmp_path):
    result = _run("to-inference", synced_model_file, "-o", tmp_path / "m.onnx",
                  "--opset", "42")
    _assert_one_line_error(result, "opset 42")
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_force(synced_model_file, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")

    result = _run("to-inference", synced_model_file, "-o", out)
    _assert_one_line_error(result, "already exists", "--force")
    assert out.read_bytes() == b"keep me"

    result = _run("to-inference", synced_model_file, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != b"keep me"


def test_output_must_be_onnx(synced_model_file, tmp_path):
    result = _run("to-inference", synced_model_file, "-o", tmp_path / "m.keras")
    _assert_one_line_error(result, ".onnx")
