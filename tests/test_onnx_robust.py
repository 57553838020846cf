"""The ONNX export never crashes and never hides a reason (issue 17, items 3 and 4).

- `auto` falls back to tf2onnx on any failure of the native exporter: an
  emitter's exception, an invalid graph, onnxruntime failing to load or to
  run the graph, or the check. When both fail, one line gives both reasons.
- Inputs and outputs carry their Keras dtypes (float16, int32, bool);
  strings are refused in one line.
- Mixed-precision models export a float32 graph by default and a float16
  one on request, checked with the rounding of their compute dtype.

Every export is compared in onnxruntime with the Keras model on a batch of
3 drawn here (the gate uses 2), never with the exporter's own figures.
"""

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import bnconvert_cli as cli
from bnconvert import export_onnx
from bnconvert.convert import convert_model
from bnconvert.errors import ConversionError
from bnconvert.onnx import ops as onnx_ops
from bnconvert.onnx import tf2onnx as onnx_tf2onnx
from bnconvert.onnx import walk as onnx_walk

L = keras.layers


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds)))


def _keras(model, feeds):
    out = model(feeds[0] if len(feeds) == 1 else feeds, training=False)
    return [np.asarray(o, np.float64) for o in (out if isinstance(out, list) else [out])]


def _assert_close(got, want, rtol=1e-4, atol=1e-5):
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol)


def _flatten_dense():
    inputs = keras.Input((4, 4, 3), name="image")
    y = L.Flatten(name="flat")(inputs)
    return keras.Model(inputs, L.Dense(2, name="logits")(y), name="flat_dense")


def _batch(model, seed=7, n=3):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n,) + tuple(t.shape[1:])) * 4).astype(str(getattr(t.dtype, "name", t.dtype)))
            for t in model.inputs]


def _raise(*args, **kwargs):
    raise ValueError("constant of higher rank than the tensor")


def _bad_reshape(g, call):
    """An emitter bug that only shows when onnxruntime runs: 48 values into rows of 7."""
    name = g.node("Reshape", [call.inputs[0].name, g.ints([-1, 7])], call.base)
    return [call.out(g.node("Reshape", [name, g.ints([-1, 48])], call.base))]


def test_identity_model_exports_with_distinct_names(tmp_path):
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, inputs, name="identity")
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.exporter == "native"
    assert result.input_names == ("x",) and result.output_names == ("x_1",)
    x = _batch(model)
    _assert_close(_run(tmp_path / "m.onnx", x), [x[0].astype(np.float64)], rtol=0, atol=0)


def test_identity_model_goes_through_to_inference(tmp_path):
    """issue 16, finding 7: 'ONNX tensor name ... used twice'."""
    inputs = keras.Input((3,), name="x")
    keras.Model(inputs, inputs, name="identity").save(tmp_path / "id.keras")
    out = CliRunner().invoke(cli.main, ["to-inference", str(tmp_path / "id.keras"),
                                        "-o", str(tmp_path / "id.onnx")])
    assert out.exit_code == 0, out.output
    assert "exporter: native" in out.output
    x = np.arange(6, dtype="float32").reshape(2, 3) - 3
    _assert_close(_run(tmp_path / "id.onnx", [x]), [x], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float16", "int32", "bool"])
def test_inputs_carry_their_dtype(tmp_path, dtype):
    inputs = keras.Input((4,), dtype=dtype, name="x")
    y = inputs if dtype == "float16" else keras.ops.cast(inputs, "float32")
    model = keras.Model(inputs, L.Dense(3, name="logits")(y), name=f"in_{dtype}")
    result = export_onnx(model, tmp_path / "m.onnx")
    declared = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.elem_type
    assert declared == onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = [np.random.default_rng(3).integers(-2, 3, (3, 4)).astype(dtype)]
    _assert_close(_run(tmp_path / "m.onnx", x), _keras(model, x))
    assert result.max_abs_diff is not None


def test_string_input_is_refused_in_one_line(tmp_path):
    inputs = keras.Input((1,), dtype="string", name="words")
    y = L.StringLookup(vocabulary=["a", "b"], output_mode="one_hot")(inputs)
    model = keras.Model(inputs, y, name="words")
    with pytest.raises(ConversionError, match=r"Input 'words' .* holds strings") as e:
        export_onnx(model, tmp_path / "m.onnx")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_emitter_exception_falls_back_and_native_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(onnx_walk.LAYERS, "Flatten", _raise)
    model = _flatten_dense()
    with pytest.raises(ConversionError, match="failed while writing the graph "
                       r"\(ValueError: constant of higher rank") as e:
        export_onnx(model, tmp_path / "m.onnx", exporter="native")
    assert "\n" not in str(e.value)
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.exporter == "tf2onnx" and "ValueError" in result.exporter_note
    x = _batch(model)
    _assert_close(_run(tmp_path / "m.onnx", x), _keras(model, x))


def test_graph_failing_in_onnxruntime_run_falls_back(tmp_path, monkeypatch):
    monkeypatch.setitem(onnx_walk.LAYERS, "Flatten", _bad_reshape)
    model = _flatten_dense()
    with pytest.raises(ConversionError, match="onnxruntime fails running the graph native "
                       "wrote"):
        export_onnx(model, tmp_path / "m.onnx", exporter="native")
    assert not list(tmp_path.iterdir())
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.exporter == "tf2onnx" and "onnxruntime" in result.exporter_note
    x = _batch(model)
    _assert_close(_run(tmp_path / "m.onnx", x), _keras(model, x))


def test_invalid_graph_falls_back(tmp_path, monkeypatch):
    def undefined_input(g, call):
        return [call.out(g.node("Relu", ["no_such_tensor"], call.base))]

    monkeypatch.setitem(onnx_walk.LAYERS, "Flatten", undefined_input)
    model = _flatten_dense()
    with pytest.raises(ConversionError, match="onnxruntime cannot load the graph native wrote"):
        export_onnx(model, tmp_path / "m.onnx", exporter="native")
    # Unchecked, the ONNX checker stands in for onnxruntime.
    with pytest.raises(ConversionError, match="wrote an invalid graph"):
        export_onnx(model, tmp_path / "m.onnx", exporter="native", check=False)
    assert not list(tmp_path.iterdir())
    result = export_onnx(model, tmp_path / "m.onnx", check=False)
    assert result.exporter == "tf2onnx" and "invalid graph" in result.exporter_note
    assert export_onnx(model, tmp_path / "m.onnx").exporter == "tf2onnx"


def test_both_failing_give_both_reasons_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(onnx_walk.LAYERS, "Flatten", _raise)

    def tf2onnx_graph_crashing_in_onnxruntime(model, input_names, output_names, opset):
        node = onnx.helper.make_node("Reshape", ["image", "shape"], [output_names[0]])
        graph = onnx.helper.make_graph(
            [node], "bad",
            [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                                ["batch", 4, 4, 3])],
            [onnx.helper.make_tensor_value_info(output_names[0], onnx.TensorProto.FLOAT,
                                                ["batch", 2])],
            [onnx.numpy_helper.from_array(np.array([-1, 7], np.int64), "shape")],
        )
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                      ir_version=8), "stub"

    monkeypatch.setattr(onnx_tf2onnx, "convert", tf2onnx_graph_crashing_in_onnxruntime)
    with pytest.raises(ConversionError) as e:
        export_onnx(_flatten_dense(), tmp_path / "m.onnx")
    message = str(e.value)
    assert "\n" not in message
    assert "native: the native exporter failed while writing the graph (ValueError" in message
    assert "; tf2onnx: onnxruntime fails running the graph tf2onnx wrote" in message
    assert not list(tmp_path.iterdir())


def test_tf_keras_op_emitter_failure_falls_back(tmp_path, monkeypatch):
    """tf-keras `tf.reduce_mean(y)` / `tf.reduce_max(y, [1, 2], True)`: no crash."""
    import tensorflow as tf
    import tf_keras

    inputs = tf_keras.Input((5, 5, 2), name="image")
    y = tf_keras.layers.Conv2D(3, 3, name="conv")(inputs)
    y = tf.reduce_max(y, [1, 2], True) + tf.reduce_mean(y)
    model = tf_keras.Model(inputs, tf_keras.layers.Flatten()(y), name="tfk_reduce")
    monkeypatch.setattr(onnx_ops, "emit_tf_function", _raise)
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.exporter == "tf2onnx" and "ValueError" in result.exporter_note
    x = _batch(model)
    _assert_close(_run(tmp_path / "m.onnx", x), [np.asarray(model(x[0]), np.float64)])


def test_cli_native_failure_is_one_line(tmp_path, monkeypatch):
    _flatten_dense().save(tmp_path / "m.keras")
    monkeypatch.setitem(onnx_walk.LAYERS, "Flatten", _bad_reshape)
    out = CliRunner().invoke(cli.main, ["to-inference", str(tmp_path / "m.keras"),
                                        "-o", str(tmp_path / "m.onnx"), "--exporter", "native"])
    assert out.exit_code == 1
    errors = [line for line in out.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "onnxruntime fails running" in errors[0], out.output
    assert "Traceback" not in out.output and not (tmp_path / "m.onnx").exists()


# --- mixed precision ---------------------------------------------------------

def _mixed_cnn(policy):
    """Conv-BN-ReLU twice and logits under `policy`, BN statistics randomized."""
    keras.utils.set_random_seed(5)
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        inputs = keras.Input((16, 16, 3), name="image")
        y = inputs
        for i in range(2):
            y = L.Conv2D(16, 3, use_bias=False, name=f"conv{i}")(y)
            y = L.BatchNormalization(name=f"bn{i}")(y)
            y = L.ReLU()(y)
        y = L.GlobalAveragePooling2D()(y)
        model = keras.Model(inputs, L.Dense(8, name="logits")(y), name=f"cnn_{policy}")
    finally:
        keras.config.set_dtype_policy(old)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.5, 16).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 2, 16).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 3, 16).astype("float32"))
    return model


def _float32_twin(model):
    """The same architecture and weights computing in float32: the exact reference."""
    twin = _mixed_cnn("float32")
    twin.set_weights(model.get_weights())
    return twin


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_folds_and_exports_float32_by_default(tmp_path, policy):
    model = _mixed_cnn(policy)
    x = _batch(model)
    twin = _keras(_float32_twin(model), x)
    folded, report = convert_model(model, to="inference", return_report=True)
    assert report.folded == 2 and report.compute_dtype == policy.split("_")[1]
    result = export_onnx(folded, tmp_path / "m.onnx")
    assert result.exporter == "native" and result.precision == "float32"
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert {t.data_type for t in graph.initializer} <= {onnx.TensorProto.FLOAT,
                                                        onnx.TensorProto.INT64}
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # A float32 graph of float32 weights: float32's accuracy, not float16's.
    _assert_close(_run(tmp_path / "m.onnx", x), twin, rtol=1e-4, atol=1e-4)


def test_float16_precision_writes_a_float16_graph(tmp_path):
    model = _mixed_cnn("mixed_float16")
    folded = convert_model(model, to="inference")
    result = export_onnx(folded, tmp_path / "m.onnx", precision="float16")
    assert result.exporter == "native" and result.precision == "float16"
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in graph.initializer}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = _batch(model)
    got = _run(tmp_path / "m.onnx", x)
    assert got[0].dtype == np.float16  # the Keras model's own output is float16
    twin = _keras(_float32_twin(model), x)
    scale = np.sqrt(np.mean(np.square(twin[0])))
    _assert_close(got, twin, rtol=8 * 2.0**-10, atol=8 * 2.0**-10 * max(1.0, scale))


def test_float16_precision_is_native_only(tmp_path):
    with pytest.raises(ConversionError, match="precision"):
        export_onnx(_flatten_dense(), tmp_path / "m.onnx", exporter="tf2onnx",
                    precision="float16")


def test_mixed_precision_model_through_the_cli_with_keras_out(tmp_path):
    """Fold check, file check of --keras-out and gate, all at float16's rounding."""
    model = _mixed_cnn("mixed_float16")
    model.save(tmp_path / "m.keras")
    out = CliRunner().invoke(cli.main, [
        "to-inference", str(tmp_path / "m.keras"), "-o", str(tmp_path / "m.onnx"),
        "--keras-out", str(tmp_path / "folded.keras")])
    assert out.exit_code == 0, out.output
    assert "float16 compute" in out.output
    assert "Keras in float16 against a float32 graph" in out.output
    x = _batch(model)
    twin = _keras(_float32_twin(model), x)
    _assert_close(_run(tmp_path / "m.onnx", x), twin, rtol=1e-4, atol=1e-4)


def test_tf_keras_mixed_float16_model_exports_natively(tmp_path):
    import tf_keras

    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = tf_keras.Input((16, 16, 3), name="image")
        y = tf_keras.layers.Conv2D(8, 3, name="conv")(inputs)
        y = tf_keras.layers.BatchNormalization(name="bn")(y)
        y = tf_keras.layers.GlobalAveragePooling2D()(tf_keras.layers.ReLU()(y))
        model = tf_keras.Model(inputs, tf_keras.layers.Dense(4, name="logits")(y))
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    folded, report = convert_model(model, to="inference", return_report=True)
    assert report.folded == 1 and report.compute_dtype == "float16"
    result = export_onnx(folded, tmp_path / "m.onnx")
    assert result.exporter == "native" and result.compute_dtype == "float16"
    x = _batch(model)
    want = [np.asarray(model(x[0], training=False), np.float64)]
    _assert_close(_run(tmp_path / "m.onnx", x), want, rtol=8 * 2.0**-10, atol=8 * 2.0**-10)


@pytest.mark.parametrize("divisor", [np.float32(3.0), np.array([0.5, -4.0, 1e-3], "float32")])
def test_division_by_a_constant(tmp_path, divisor):
    """Written as a product with the reciprocal (onnxruntime multiplies faster)."""
    inputs = keras.Input((5, 3), name="x")
    model = keras.Model(inputs, L.Dense(3, name="d")(inputs) / divisor, name="div")
    result = export_onnx(model, tmp_path / "m.onnx", exporter="native")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "Div" not in ops and "Mul" in ops
    x = _batch(model)
    want = np.asarray(model(x[0]), np.float64)
    _assert_close(_run(tmp_path / "m.onnx", x), [want])
    assert result.max_abs_diff is not None
