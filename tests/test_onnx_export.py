"""ONNX export: folded graphs, names, dynamic batch, parity, safe writes.

onnxruntime outputs are compared with the *original* (unfolded) Keras
model, never with the exporter's own figures.
"""

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bnconvert import export_onnx
from bnconvert.convert import convert_model
from bnconvert.errors import ConversionError
from bnconvert.errors import OutputError
from bnconvert.errors import VerificationError

L = keras.layers


def randomize_bn(model, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            values = {
                "gamma": rng.uniform(1 - 0.5 * spread, 1 + 0.5 * spread, n),
                "beta": rng.normal(0.0, 0.5 * spread, n),
                "moving_mean": rng.normal(0.0, 0.5 * spread, n),
                "moving_variance": rng.uniform(0.5, 1.5, n),
            }
            for var in layer.weights:
                var.assign(values[var.name].astype("float32"))


def small_cnn():
    inputs = keras.Input((12, 12, 3), name="image")
    y = L.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    y = L.BatchNormalization(name="bn1")(y)
    y = L.ReLU()(y)
    y = L.DepthwiseConv2D(3, name="dw")(y)
    y = L.BatchNormalization(name="bn2")(y)
    y = L.SeparableConv2D(6, 3, name="sep")(y)
    y = L.BatchNormalization(name="bn3")(y)
    y = L.GlobalAveragePooling2D()(y)
    y = L.Dense(4, name="logits")(y)
    y = L.BatchNormalization(name="bn4")(y)
    model = keras.Model(inputs, y, name="small_cnn")
    randomize_bn(model)
    return model


def onnx_run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_diff(got, want):
    want = np.asarray(want, dtype=np.float64)
    return np.max(np.abs(np.asarray(got, dtype=np.float64) - want)) / np.max(np.abs(want))


def test_folded_model_exports_without_batchnorm_and_matches_original(tmp_path):
    original = small_cnn()
    folded = convert_model(original, to="inference")
    path = tmp_path / "cnn.onnx"

    result = export_onnx(folded, path)

    graph = onnx.load(str(path)).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert result.checked and result.max_rel_diff <= 1e-4
    x = np.random.default_rng(1).normal(size=(5, 12, 12, 3)).astype("float32")
    (got,) = onnx_run(path, {"image": x})
    assert rel_diff(got, original.predict(x, verbose=0)) <= 1e-5


def test_names_order_and_dynamic_batch(tmp_path):
    a = keras.Input((6,), name="features")
    b = keras.Input((4, 4, 2), name="patch")
    pa = L.Dense(3, name="zeta")(a)
    pb = L.Flatten()(L.Conv2D(2, 2, name="conv")(b))
    model = keras.Model([a, b], [pa, L.Dense(2, name="alpha")(pb)])
    path = tmp_path / "two.onnx"

    result = export_onnx(model, path)

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["features", "patch"]
    # Keras order, not tf2onnx's alphabetical one.
    assert [o.name for o in proto.graph.output] == ["zeta", "alpha"]
    assert result.output_names == ("zeta", "alpha")
    for value in proto.graph.input:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    rng = np.random.default_rng(2)
    for batch in (1, 7):
        xa = rng.normal(size=(batch, 6)).astype("float32")
        xb = rng.normal(size=(batch, 4, 4, 2)).astype("float32")
        got = onnx_run(path, {"features": xa, "patch": xb})
        want = model.predict([xa, xb], verbose=0)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert rel_diff(g, w) <= 1e-5


def test_user_check_inputs_from_npy(tmp_path):
    model = small_cnn()
    npy = tmp_path / "batch.npy"
    np.save(npy, np.random.default_rng(3).normal(size=(3, 12, 12, 3)).astype("float32"))

    result = export_onnx(model, tmp_path / "m.onnx", inputs=npy)

    assert result.batches == 2  # the generated batch and the user's


def test_check_inputs_of_wrong_shape_are_rejected(tmp_path):
    with pytest.raises(VerificationError, match="shape"):
        export_onnx(small_cnn(), tmp_path / "m.onnx", inputs=np.zeros((2, 5, 5, 3)))
    assert not list(tmp_path.iterdir())


def test_missing_output_directory(tmp_path):
    path = tmp_path / "missing" / "m.onnx"
    with pytest.raises(OutputError, match="does not exist"):
        export_onnx(small_cnn(), path)
    assert not path.parent.exists()


@pytest.mark.parametrize("opset, exporter", [
    (0, "auto"), (99, "auto"), (19, "tf2onnx"), (22, "native"), (12, "native"),
])
def test_unsupported_opset_is_one_clear_error(tmp_path, opset, exporter):
    with pytest.raises(ConversionError) as info:
        export_onnx(small_cnn(), tmp_path / "m.onnx", opset=opset, exporter=exporter)
    assert "opset" in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_auto_takes_tf2onnx_for_an_opset_native_cannot_write(tmp_path):
    result = export_onnx(small_cnn(), tmp_path / "m.onnx", opset=11)
    assert (result.exporter, result.opset) == ("tf2onnx", 11)
    assert "opset 11 is outside the native exporter's range" in result.exporter_note


def test_explicit_opset_is_written(tmp_path):
    result = export_onnx(small_cnn(), tmp_path / "m.onnx", opset=13)
    assert result.opset == 13
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 13


def test_check_beyond_tolerance_leaves_existing_file_untouched(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    # onnxruntime and TensorFlow sum convolutions in different orders, so
    # the difference is a few float32 ulps: never exactly zero here.
    with pytest.raises(VerificationError, match="tolerance"):
        export_onnx(small_cnn(), path, tolerance=0.0, atol=0.0)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


ZOO = ["ResNet50", "MobileNetV2", "EfficientNetB0", "DenseNet121"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_model_zoo_parity_after_folding(name, tmp_path):
    original = getattr(keras.applications, name)(
        weights=None, input_shape=(96, 96, 3), classifier_activation=None
    )
    # Small spread: 50+ BN layers in a row must not blow activations up.
    randomize_bn(original, seed=4, spread=0.2)
    folded = convert_model(original, to="inference")
    path = tmp_path / f"{name}.onnx"

    export_onnx(folded, path)

    graph = onnx.load(str(path)).graph
    bn_nodes = [n for n in graph.node if n.op_type == "BatchNormalization"]
    kept = sum(isinstance(l, L.BatchNormalization) for l in folded._flatten_layers())
    # Only the BN layers that could not be folded may survive as BN nodes.
    assert len(bn_nodes) <= kept
    if name == "ResNet50":  # its strided 1x1 convolutions read subsampled tensors
        strided = [n for n in graph.node if n.op_type == "Conv" and any(
            a.name == "strides" and a.ints[:] != [1, 1] for a in n.attribute)]
        assert [n.output[0] for n in strided] == ["conv1_conv"] + [
            f"conv{i}_block{j}_2_conv/subsampled" for i, j in ((2, 3), (3, 4), (4, 6))]
    x = np.random.default_rng(5).uniform(0, 255, size=(2, 96, 96, 3)).astype("float32")
    (got,) = onnx_run(path, {graph.input[0].name: x})
    assert rel_diff(got, original.predict(x, verbose=0)) <= 1e-4


# -- graphs tf2onnx needs its error recovery for, and ops it cannot convert ----


def test_graph_needing_tf2onnx_recovery_exports(tmp_path, capfd):
    # tf2onnx's fast path (no per-pass rollback copies) fails on this graph
    # with "max() arg is an empty sequence"; plain tf2onnx exports it.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Rescaling(1 / 6, offset=0.5)(x)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3)(x))
    result = export_onnx(model, tmp_path / "m.onnx", exporter="tf2onnx")
    assert result.checked and result.max_abs_diff <= 1e-5
    assert "error recovery" in result.exporter_note
    err = capfd.readouterr().err
    assert "tf2onnx" not in err and "Traceback" not in err


def test_ops_tf2onnx_cannot_convert_are_named_in_one_line(tmp_path, capfd):
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="gelu")(inputs))
    with pytest.raises(ConversionError) as e:
        export_onnx(model, tmp_path / "m.onnx", exporter="tf2onnx")
    message = str(e.value)
    # Exact GELU uses erfc, which tf2onnx has no conversion for.
    assert "\n" not in message and "cannot convert" in message and "Erfc" in message
    assert list(tmp_path.iterdir()) == []
    assert "tf2onnx" not in capfd.readouterr().err
    # The native exporter writes it (Erf), and auto takes that path.
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.exporter == "native" and result.max_abs_diff <= 1e-5


@pytest.mark.parametrize("layer", [
    lambda: keras.layers.Conv2D(6, 3, groups=3, name="grouped"),
    lambda: keras.layers.DepthwiseConv2D(3, name="depthwise"),
], ids=["grouped", "depthwise"])
@pytest.mark.parametrize("exporter", ["tf2onnx", "native"])
def test_xla_wrapped_convolutions_are_inlined_and_export(tmp_path, layer, exporter):
    # Keras runs a grouped convolution on CPU as an XLA-compiled function,
    # which a frozen graph keeps as a call tf2onnx cannot convert.
    inputs = keras.Input((8, 8, 6))
    x = layer()(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, x)
    for variable in model.weights:
        variable.assign(np.random.default_rng(0).uniform(0.5, 1.5, variable.shape).astype("float32"))
    folded = convert_model(model, to="inference")
    result = export_onnx(folded, tmp_path / "m.onnx", exporter=exporter)
    assert result.checked and result.max_abs_diff <= 1e-5 and result.exporter == exporter
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 6)).astype("float32")
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, model(x, training=False), rtol=1e-4, atol=1e-5)


@keras.saving.register_keras_serializable(package="test_onnx_export")
class _Subclassed(keras.Model):
    """A subclassed model: no symbolic inputs, built from a shape."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, padding="same")
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))


@pytest.mark.parametrize("exporter", ["native", "tf2onnx"])
def test_subclassed_model_built_from_a_shape_exports(tmp_path, exporter):
    model = _Subclassed(name="sub")
    model.build((None, 7, 7, 3))
    model(np.zeros((1, 7, 7, 3), "float32"))  # builds the sublayers
    rng = np.random.default_rng(2)
    model.bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
    model.bn.moving_variance.assign(rng.uniform(0.5, 2, size=4).astype("float32"))
    result = export_onnx(model, tmp_path / "m.onnx", exporter=exporter)
    assert (result.exporter, result.input_names, result.output_names) == (exporter, ("input",), ("sub",))
    x = rng.normal(size=(3, 7, 7, 3)).astype("float32")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    np.testing.assert_allclose(got, model(x, training=False), rtol=1e-4, atol=1e-5)


def test_model_without_inputs_is_one_clear_error(tmp_path):
    model = _Subclassed(name="unbuilt")
    with pytest.raises(ConversionError, match="no defined inputs"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_native_graph_failing_the_check_falls_back_or_fails(tmp_path, monkeypatch):
    """The onnxruntime check is the gate for the native exporter too."""
    from bnconvert.onnx import walk as onnx_native

    def wrong_relu(g, call):  # an emitter bug: ReLU written as the identity
        return [call.inputs[0]]

    monkeypatch.setitem(onnx_native.LAYERS, "ReLU", wrong_relu)
    path = tmp_path / "m.onnx"
    with pytest.raises(VerificationError):
        export_onnx(small_cnn(), path, exporter="native")
    assert not list(tmp_path.iterdir())
    result = export_onnx(small_cnn(), path)
    assert result.exporter == "tf2onnx" and result.max_abs_diff <= 1e-5
    assert "native exporter wrote a graph that failed the check" in result.exporter_note
