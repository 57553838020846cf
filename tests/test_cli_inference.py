"""End-to-end tests of `bnconvert to-inference` through the CLI: option checks.

Converting, folding, exporting and checking (with and without `--no-fold`,
`--force`, default names) run in both flavours in `tests/test_flavours.py`;
this file keeps the Keras 3 checks of the ONNX-specific options.
"""

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import bnconvert
import bnconvert_cli as cli

L = keras.layers


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


def test_output_directory_missing(synced_model_file, tmp_path):
    result = _run("to-inference", synced_model_file, "-o", tmp_path / "nope" / "m.onnx")
    _assert_one_line_error(result, "does not exist")


def test_opset_the_exporter_cannot_do(synced_model_file, tmp_path):
    result = _run("to-inference", synced_model_file, "-o", tmp_path / "m.onnx",
                  "--opset", "42")
    _assert_one_line_error(result, "opset 42")
    assert not list(tmp_path.iterdir())


def test_output_must_be_onnx(synced_model_file, tmp_path):
    result = _run("to-inference", synced_model_file, "-o", tmp_path / "m.keras")
    _assert_one_line_error(result, ".onnx")


# -- choosing the exporter -----------------------------------------------------


def _report(path):
    import json

    return json.loads(path.read_text())["onnx"]


@pytest.mark.parametrize("choice", ["auto", "native", "tf2onnx"])
def test_exporter_choice_is_taken_and_reported(synced_model_file, tmp_path, choice):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = _run("to-inference", synced_model_file, "-o", out, "--exporter", choice,
                  "--report", report)
    assert result.exit_code == 0, result.output
    taken = "tf2onnx" if choice == "tf2onnx" else "native"
    assert f"exporter: {taken}" in result.stdout
    assert _report(report)["exporter"] == taken
    # The file written is the one that passed the check: run it again here.
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["sbn3"]


@keras.saving.register_keras_serializable(package="test_cli_inference")
class Rot90(L.Layer):
    """A layer calling TensorFlow directly: nothing symbolic to open."""

    def call(self, x):
        import tensorflow as tf

        return tf.image.rot90(x)


@pytest.fixture(scope="module")
def uncovered_model_file(tmp_path_factory):
    inputs = keras.Input((6, 6, 3), name="image")
    y = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    y = Rot90(name="rot")(y)
    path = tmp_path_factory.mktemp("uncovered") / "rot.keras"
    keras.Model(inputs, y).save(path)
    return path


def test_native_exporter_names_what_it_does_not_cover(uncovered_model_file, tmp_path):
    result = _run("to-inference", uncovered_model_file, "-o", tmp_path / "m.onnx",
                  "--exporter", "native", "--custom-objects", __name__)
    _assert_one_line_error(result, "native ONNX exporter does not cover", "'rot' (Rot90")
    assert not list(tmp_path.iterdir())


def test_auto_falls_back_to_tf2onnx_and_says_why(uncovered_model_file, tmp_path):
    result = _run("to-inference", uncovered_model_file, "-o", tmp_path / "m.onnx",
                  "--custom-objects", __name__)
    assert result.exit_code == 0, result.output
    line = [l for l in result.stdout.splitlines() if l.startswith("exporter:")]
    assert len(line) == 1 and "tf2onnx" in line[0]
    assert "native exporter does not cover 'rot' (Rot90" in line[0]
    assert (tmp_path / "m.onnx").exists()


# -- the fold checked by the onnxruntime gate -----------------------------------


def _full_report(path):
    import json

    return json.loads(path.read_text())


def test_default_gate_holds_the_graph_to_the_original_outputs(synced_model_file, tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = _run("to-inference", synced_model_file, "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    data = _full_report(report)
    checked = data["verification"]
    # No separate check of the folded model in memory: the gate's figures are the fold's.
    assert checked["note"].endswith("on the ONNX file (onnxruntime)")
    assert checked["verified"] and checked["max_abs_diff"] == data["onnx"]["max_abs_diff"]
    assert "verified on the ONNX file (onnxruntime): max |diff|" in result.stdout
    # Independently: the written graph against the original file reloaded, on a
    # batch of another size and scale than the gate's.
    import onnxruntime as ort

    x = (np.random.default_rng(5).normal(size=(5, 10, 10, 3)) * 4 - 2).astype("float32")
    want = keras.saving.load_model(synced_model_file).predict(x, verbose=0)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("extra", [
    ["--precision", "float16"],  # float16's rounding: too loose for a fold
    ["--tolerance", "1e-2"],  # looser than the fold check's own
    ["--no-check"],  # no gate
])
def test_fold_is_checked_in_memory_where_the_gate_cannot_hold_it(synced_model_file, tmp_path,
                                                                extra):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = _run("to-inference", synced_model_file, "-o", out, "--report", report, *extra)
    assert result.exit_code == 0, result.output
    checked = _full_report(report)["verification"]
    assert checked["verified"] and "ONNX file" not in checked["note"]
    assert checked["max_rel_diff"] <= 1e-4


def test_a_wrong_fold_is_named_when_the_gate_fails(synced_model_file, tmp_path, monkeypatch):
    from bnconvert import fold

    folded = fold._folded_weights

    def off_by_two_percent(one):
        return {name: value * 1.02 for name, value in folded(one).items()}

    monkeypatch.setattr(fold, "_folded_weights", off_by_two_percent)
    result = _run("to-inference", synced_model_file, "-o", tmp_path / "m.onnx")
    # The fold's own refusal, not the exporters' "native: ...; tf2onnx: ...".
    _assert_one_line_error(result, "The converted model")
    assert "tf2onnx" not in result.stderr and "native" not in result.stderr
    assert not list(tmp_path.iterdir())
