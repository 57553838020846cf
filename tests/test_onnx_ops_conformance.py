"""Conformance of the native exporter's `keras.ops` emitters with Keras.

Each case of `onnx_ops_cases` becomes a tiny Functional model, once with
the op applied to the model input (Keras layout) and once after a 1x1
Conv2D (whose output the exporter keeps channels-first, so the op must map
its axes through the layout). The model is emitted natively at opsets 13,
17 and 21 and run in onnxruntime on a batch of 3 (the export gate uses 2)
and, where the op allows a dynamic size, a 9x5 image (the gate uses 32x32),
with values of both signs up to a few hundred; the reference is the Keras
model itself. The tf-keras `TFOpLambda` forms run the same way.
"""

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf

import onnx_ops_cases as cases
from bnconvert import export_onnx
from bnconvert import flavour as flavour_lib
from bnconvert.onnx import ops as onnx_ops
from bnconvert.onnx import walk
from bnconvert.onnx.graph import Uncovered

OPSETS = (13, 17, 21)
BATCH = 3
# The channels-first head doubles the matrix: it runs with the slow tests (in CI too), the
# Keras-layout head in the quick tier.
HEADS = ("keras", pytest.param("nchw", marks=pytest.mark.slow))


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 100.0 - 10.0).astype("float32")


def _model(K, fn, head, static):
    x = K.Input((7, 5, 6) if static else (None, None, 6))
    y = x
    if head == "nchw":
        init = K.initializers.RandomNormal(stddev=0.5, seed=1)
        y = K.layers.Conv2D(6, 1, kernel_initializer=init, bias_initializer="ones")(x)
    return K.Model(x, fn(y))


def _outputs(result):
    return [np.asarray(r) for r in tf.nest.flatten(result)]


def check(model, x, min_opset=13):
    """The model emitted at each opset agrees with Keras on `x` in onnxruntime.

    Below `min_opset` (an op ONNX gained later) the export must refuse.
    """
    want = _outputs(model(x, training=False))
    names = [f"out{i}" for i in range(len(want))]
    flavour = flavour_lib.flavour_of(model)
    for opset in OPSETS:
        if opset < min_opset:
            with pytest.raises(Uncovered, match=f"needs opset {min_opset}"):
                walk.emit(model, flavour, ["input"], names, opset)
            continue
        proto = walk.emit(model, flavour, ["input"], names, opset)
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x})
        for g, w in zip(got, want):
            assert g.shape == w.shape, (opset, g.shape, w.shape)
            # The scale leaves out float32's extremes (segment_min's fill for an empty
            # segment): their squares overflowed to an infinite tolerance.
            finite = w[np.isfinite(w) & (np.abs(w) < 1e30)].astype(np.float64)
            scale = max(1.0, float(np.sqrt(np.mean(finite ** 2)))) if finite.size else 1.0
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * scale,
                                       err_msg=f"opset {opset}")


def _shape(case):
    return (BATCH, 7, 5, 6) if case in cases.STATIC else (BATCH, 9, 5, 6)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("case", sorted(cases.KERAS))
def test_keras_op_matches(case, head):
    model = _model(keras, cases.KERAS[case], head, case in cases.STATIC)
    check(model, _data(_shape(case)), cases.MIN_OPSET.get(case, 13))


@pytest.mark.parametrize("case", sorted(cases.tf_cases()))
def test_tf_function_matches(case):
    import tf_keras

    model = _model(tf_keras, cases.tf_cases()[case], "nchw", False)
    assert any(type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda") for layer in model.layers)
    check(model, _data((BATCH, 9, 5, 6), seed=1))


def test_every_emitter_has_a_case():
    # tf-keras only (the tf_* ones in test_onnx_redteam5.py):
    tested = {c.split(":")[0] for c in cases.KERAS} | {"add_n", "tf_shape", "sized_arange",
                                                        "sequence_mask", "tf_extract_patches",
                                                        "tf_convolution", "tf1_resize"}
    assert set(onnx_ops.EMITTERS) <= tested, sorted(set(onnx_ops.EMITTERS) - tested)


def test_every_tf_function_maps_onto_an_emitter():
    for symbol, (name, _, _) in onnx_ops.TF_FUNCTIONS.items():
        assert name in onnx_ops.EMITTERS, symbol


@pytest.mark.parametrize("case", ["softmax:positional", "mean:positional", "mean:all",
                                  "max:positional_keepdims"])
def test_issue17_tf_graphs_without_the_gate(case, tmp_path):
    """tf-keras calls that exported a wrong graph (or crashed): right with check=False."""
    import tf_keras

    model = _model(tf_keras, cases.tf_cases()[case], "nchw", False)
    result = export_onnx(model, tmp_path / "m.onnx", exporter="native", check=False)
    assert result.exporter == "native"
    x = _data((BATCH, 9, 5, 6), seed=2)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-4, atol=1e-3)


def test_float16_ops_compute_in_float32():
    """A model's float16 op tensors are float32 in the graph (the mixed-precision default)."""
    x = keras.Input((None, None, 6))
    half = keras.ops.cast(x, "float16")
    y = keras.ops.mean(half * 2.0 + 1.0, axis=[1, 2], keepdims=True) - keras.ops.abs(half)
    model = keras.Model(x, keras.ops.cast(keras.ops.argmax(y, axis=-1), "float32") + y[..., 0])
    data = _data((BATCH, 9, 5, 6), seed=4) / 10.0
    proto = walk.emit(model, flavour_lib.flavour_of(model), ["input"], ["out"], 17)
    casts = [a.i for n in proto.graph.node if n.op_type == "Cast" for a in n.attribute]
    assert onnx.TensorProto.FLOAT16 not in casts
    (got,) = ort.InferenceSession(proto.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {"input": data})
    want = np.asarray(model(data))
    # float16 rounding of values up to ~40: a few 1e-2, and argmax ties may flip.
    close = np.isclose(got, want, rtol=2e-3, atol=3e-2)
    assert close.mean() > 0.98, float(close.mean())


def test_arguments_an_emitter_cannot_handle_leave_the_op_uncovered(monkeypatch):
    """An op whose arguments an emitter does not handle is named, never a crash."""
    x = keras.Input((4, 6))
    model = keras.Model(x, keras.ops.top_k(x, 2, sorted=False)[0])
    with pytest.raises(Uncovered, match="sorted=False"):
        walk.emit(model, flavour_lib.flavour_of(model), ["input"], ["out"], 17)

    def broken(g, call, p):
        raise ValueError("an argument this emitter never saw")

    monkeypatch.setitem(onnx_ops.EMITTERS, "absolute", broken)
    model = keras.Model(x, keras.ops.abs(x), name="m")
    with pytest.raises(Uncovered, match="arguments not handled.*never saw"):
        walk.emit(model, flavour_lib.flavour_of(model), ["input"], ["out"], 17)
