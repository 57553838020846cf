"""The native exporter opens layers that only run as written on concrete tensors.

Each case is a small hand-written Keras 3 layer exercising one mechanism of
`bnconvert.onnx.tracing`, `bnconvert.onnx.loops` and the walk's tracing:
`ops.map` / `vectorized_map` / `scan` / `fori_loop` as ONNX `Loop`s, a
layer returning tensors computed from shapes (initializers), a sublayer whose
`compute_output_spec` refuses `training`, a Keras bounding-box utility, and a
layer doing Python arithmetic on its batch size (traced at batch 1, looped).
Each model is exported with `exporter="native"` and run in onnxruntime on a
batch of 5 (the gate's batch differs), against the Keras model's own outputs.
"""

import os
import re

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from bnconvert import export_onnx  # noqa: E402
from bnconvert.errors import ConversionError  # noqa: E402

ops = keras.ops
RTOL, ATOL = 1e-4, 1e-5


class TopQueries(keras.layers.Layer):
    """D-FINE's query selection: top-k by score, gathered per batch element with `ops.map`."""

    def call(self, scores, boxes):
        top = ops.top_k(ops.max(scores, axis=-1), k=3)[1]

        def gather(elements):
            data, indices = elements
            return ops.take(data, indices, axis=0)

        return ops.map(gather, (boxes, top)), ops.map(gather, (scores, top))


class RowNorms(keras.layers.Layer):
    def call(self, x):
        return ops.vectorized_map(lambda row: ops.sqrt(ops.sum(row * row, axis=-1)), x)


class CumulativeMax(keras.layers.Layer):
    """`ops.scan` over the time axis, forwards or backwards."""

    def __init__(self, reverse=False, **kwargs):
        super().__init__(**kwargs)
        self.reverse = reverse

    def call(self, x):
        steps = ops.transpose(x, (1, 0, 2))  # [T, B, C]

        def step(carry, item):
            carry = ops.maximum(carry, item)
            return carry, carry * 2.0

        last, ys = ops.scan(step, ops.zeros_like(steps[0]), steps, reverse=self.reverse)
        return last, ops.transpose(ys, (1, 0, 2))


class Powers(keras.layers.Layer):
    def call(self, x):
        return ops.fori_loop(1, 4, lambda i, v: ops.sin(v) * 1.5 + ops.cast(i, "float32"), x)


class Anchors(keras.layers.Layer):
    """Anchors and a validity mask computed from the feature map's static size only."""

    def call(self, features):
        height, width = ops.shape(features)[1], ops.shape(features)[2]
        y, x = ops.meshgrid(ops.arange(height, dtype="float32"),
                            ops.arange(width, dtype="float32"), indexing="ij")
        centres = (ops.stack([x, y], axis=-1) + 0.5) / np.array([width, height], "float32")
        anchors = ops.reshape(centres, (1, height * width, 2))
        return ops.log(anchors / (1.0 - anchors)), anchors > 0.2


class StrictSpec(keras.layers.Layer):
    """A sublayer whose own `compute_output_spec` does not take `training`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)

    def call(self, x, training=None):
        return ops.tanh(self.dense(x))

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape[:-1] + (4,), x.dtype)


class CallsStrictSpec(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = StrictSpec()

    def call(self, x, training=None):
        return self.inner(x, training=training) * 2.0


class BoxFormat(keras.layers.Layer):
    """Keras's bounding-box conversion, which calls backend functions directly."""

    def call(self, boxes):
        return keras.utils.bounding_boxes.convert_format(boxes, source="xyxy",
                                                          target="center_xywh")


class BatchArithmetic(keras.layers.Layer):
    """Reshapes with `batch * heads` computed in Python, as attention code often does."""

    def call(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        heads = ops.reshape(x, (batch * 2, length, -1))
        scores = ops.softmax(ops.matmul(heads, ops.transpose(heads, (0, 2, 1))), axis=-1)
        return ops.reshape(ops.matmul(scores, heads), (batch, length, -1))


class BatchTiled(keras.layers.Layer):
    """Tiles a constant to the batch size (`ops.tile` takes no run-time size): run per element."""

    def call(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        ramp = ops.reshape(ops.arange(4, dtype="float32"), (1, 1, 4))
        return x * ops.tile(ramp, (batch, length, 1))


def _model(layer, *shapes):
    inputs = [keras.Input(s) for s in shapes]
    out = layer(*inputs)
    out = list(out) if isinstance(out, (list, tuple)) else out
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], out)


CASES = {
    "map": (lambda: _model(TopQueries(), (10, 4), (10, 5)), "Loop"),
    "vectorized_map": (lambda: _model(RowNorms(), (6, 4)), "Loop"),
    "scan": (lambda: _model(CumulativeMax(), (7, 3)), "Loop"),
    "scan_reverse": (lambda: _model(CumulativeMax(reverse=True), (7, 3)), "Loop"),
    "fori_loop": (lambda: _model(Powers(), (4,)), "Loop"),
    "constants": (lambda: _model(Anchors(), (4, 6, 3)), None),
    "refusing_spec": (lambda: _model(CallsStrictSpec(), (3, 5)), None),
    "bounding_boxes": (lambda: _model(BoxFormat(), (6, 4)), None),
    # Sizes carried as graph values (`onnx.sizes`): no per-element Loop.
    "batch_arithmetic": (lambda: _model(BatchArithmetic(), (5, 4)), "Shape"),
    "batch_tiled": (lambda: _model(BatchTiled(), (5, 4)), "Loop"),
}


def _run(path, batch):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip([i.name for i in session.get_inputs()], batch)))


@pytest.mark.parametrize("name", list(CASES))
def test_traced_layer_matches_keras(name, tmp_path):
    build, op = CASES[name]
    keras.utils.set_random_seed(7)
    model = build()
    rng = np.random.default_rng(7)
    batch = [rng.uniform(-3, 3, (5,) + tuple(t.shape[1:])).astype("float32")
             for t in model.inputs]
    expected = keras.tree.flatten(model(batch if len(batch) > 1 else batch[0]))
    result = export_onnx(model, tmp_path / "m.onnx", exporter="native")
    assert result.exporter == "native"
    got = _run(tmp_path / "m.onnx", batch)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        e = np.asarray(e)
        assert g.shape == e.shape and g.dtype == e.dtype, name
        if e.dtype == bool:
            assert np.array_equal(g, e), name
        else:
            np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL, err_msg=name)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    if op:
        assert op in {n.op_type for n in graph.node}, name


class Unmappable(keras.layers.Layer):
    """Maps a function using an op the exporter refuses (a bitcast: no ONNX op)."""

    def call(self, x):
        return ops.map(lambda row: ops.cast(ops.view(row, "int32"), "float32"), x)


def test_loop_body_that_cannot_be_exported_is_named(tmp_path):
    model = _model(Unmappable(), (4, 4))
    why = r"'unmappable/map[^']*' \(View: op\)"
    with pytest.raises(ConversionError, match=why):
        export_onnx(model, tmp_path / "m.onnx", exporter="native")
    assert not (tmp_path / "m.onnx").exists()
    # auto falls back, keeping native's reason in its note, or in its error
    # next to tf2onnx's.
    try:
        result = export_onnx(model, tmp_path / "m.onnx", exporter="auto")
    except ConversionError as e:
        assert re.search("native.*" + why + ".*tf2onnx", str(e)), str(e)
    else:
        assert result.exporter == "tf2onnx" and re.search(why, result.exporter_note)


@pytest.mark.parametrize("name", ["scan", "batch_tiled"])
def test_loop_bodies_are_lowered_to_float16(name, tmp_path):
    keras.utils.set_random_seed(7)
    model = CASES[name][0]()
    x = np.random.default_rng(8).uniform(-3, 3, (4,) + tuple(model.inputs[0].shape[1:]))
    x = x.astype("float32")
    expected = keras.tree.flatten(model(x))
    export_onnx(model, tmp_path / "m.onnx", exporter="native", precision="float16")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    bodies = [a.g for n in graph.node if n.op_type == "Loop" for a in n.attribute]
    assert bodies and all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
                          for b in bodies for o in b.output[1:])
    for g, e in zip(_run(tmp_path / "m.onnx", [x]), expected):
        np.testing.assert_allclose(g, np.asarray(e), rtol=8 * 2.0**-10, atol=8 * 2.0**-10)
