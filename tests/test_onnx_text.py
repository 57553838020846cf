"""Text models exported natively with a dynamic sequence length (`bnconvert.onnx.sizes`).

Their layers compute with the sequence length (`ops.shape(x)[1]` slicing
a position table, `ops.arange` for a causal mask). Each export is run in
onnxruntime at two lengths other than the check batch's (32) and compared
with the Keras model on the same int token ids with padding masks: a
graph with the check batch's length baked in fails at both.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from bnconvert import export_onnx  # noqa: E402
from bnconvert.errors import ConversionError  # noqa: E402

ops = keras.ops
LENGTHS = (7, 13)


class PositionsAndCausalAttention(keras.layers.Layer):
    """A position table sliced to the input's length, then causal self-attention."""

    def build(self, shape):
        self.table = self.add_weight(shape=(40, shape[-1]), initializer="random_normal")

    def call(self, x):
        batch, length, features = ops.shape(x)
        positions = ops.slice(self.table, (0, 0), (length, features))
        y = x + ops.broadcast_to(positions, ops.shape(x))
        i = ops.expand_dims(ops.arange(length, dtype="float32"), 1)
        j = ops.arange(0, length, 1, dtype="float32")
        causal = ops.broadcast_to(ops.expand_dims(i >= j, 0), (batch, length, length))
        scores = ops.where(causal, ops.matmul(y, ops.transpose(y, (0, 2, 1))), -1e9)
        out = ops.matmul(ops.softmax(scores), y) + ops.ones((batch, length, 1))
        return ops.reshape(out, (batch, length, 2, -1)) * ops.full((batch, 1, 1, 1), 0.5)


class TiledToLength(keras.layers.Layer):
    """`ops.tile` by the sequence length: no op takes that as a graph value."""

    def call(self, x):
        ramp = ops.reshape(ops.arange(4, dtype="float32"), (1, 1, 4))
        return x * ops.tile(ramp, (ops.shape(x)[0], ops.shape(x)[1], 1))


class MaskedScores(keras.layers.Layer):
    """keras-hub's attention: a Softmax sublayer given its mask positionally, rank from `ndim`."""

    def __init__(self):
        super().__init__()
        self.softmax = keras.layers.Softmax(axis=-1)

    def call(self, x):
        length = ops.shape(x)[1]
        keep = ops.arange(length)[None] <= ops.arange(length)[:, None]
        scores = ops.matmul(x, ops.transpose(x, (0, 2, 1)))
        weights = self.softmax(scores, ops.broadcast_to(keep[None], ops.shape(scores)))
        return ops.matmul(weights, x) if ops.ndim(x) == 3 else x


class ScaledLookup(keras.layers.Layer):
    """T5's norm and embedding: a variable on the left of `*`, `ops.take` of a variable."""

    def build(self, shape):
        self.table = self.add_weight(shape=(100, 4), initializer="random_normal")
        self.scale = self.add_weight(shape=(4,), initializer="random_normal")

    def call(self, ids):
        return self.scale * ops.take(self.table, ids, axis=0)


class MaskedPool(keras.layers.Layer):
    """A text classifier's head: average pooling given its mask positionally."""

    def __init__(self):
        super().__init__()
        self.pool = keras.layers.GlobalAveragePooling1D()

    def call(self, x):
        keep = ops.arange(ops.shape(x)[1])[None] < ops.cast(ops.sum(x[..., :1] > 0, 1), "int32")
        return self.pool(x, keep)


def _session_matches(model, path, feeds_at):
    """onnxruntime matches Keras at each length of LENGTHS; the graph's length is dynamic.

    `feeds_at(length)` gives one array per model input, in order (the ONNX inputs' order).
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert all(not isinstance(i.shape[1], int) for i in session.get_inputs())
    reference = keras.Model(model.inputs, model.outputs)
    for length in LENGTHS:
        feeds = feeds_at(length)
        want = keras.tree.flatten(reference(feeds))
        got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            w = np.asarray(w, np.float64)
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("opset", [13, 21])
def test_sizes_of_a_traced_layer_stay_dynamic(opset, tmp_path):
    x = keras.Input((None, 4))
    model = keras.Model(x, PositionsAndCausalAttention()(x))
    result = export_onnx(model, tmp_path / "m.onnx", exporter="native", opset=opset)
    assert result.exporter == "native"
    rng = np.random.default_rng(5)
    _session_matches(model, tmp_path / "m.onnx",
                     lambda n: [rng.uniform(-3, 3, (3, n, 4)).astype("float32")])


@pytest.mark.parametrize("layer", [MaskedScores, MaskedPool])
def test_masks_passed_positionally_are_honoured(layer, tmp_path):
    x = keras.Input((None, 4))
    model = keras.Model(x, layer()(x))
    assert export_onnx(model, tmp_path / "m.onnx", exporter="native").exporter == "native"
    rng = np.random.default_rng(6)
    _session_matches(model, tmp_path / "m.onnx",
                     lambda n: [rng.uniform(-3, 3, (2, n, 4)).astype("float32")])


def test_variables_as_operands_and_tables(tmp_path):
    ids = keras.Input((None,), dtype="int32")
    model = keras.Model(ids, ScaledLookup()(ids))
    assert export_onnx(model, tmp_path / "m.onnx", exporter="native").exporter == "native"
    rng = np.random.default_rng(7)
    _session_matches(model, tmp_path / "m.onnx",
                     lambda n: [rng.integers(0, 100, (2, n)).astype("int32")])


def test_a_size_no_op_takes_is_refused_by_name(tmp_path):
    x = keras.Input((None, 4))
    model = keras.Model(x, TiledToLength(name="tiled")(x))
    with pytest.raises(ConversionError, match=r"'tiled' \(TiledToLength: its call does not run"):
        export_onnx(model, tmp_path / "m.onnx", exporter="native")
    assert not (tmp_path / "m.onnx").exists()


def _backbone(name):
    import keras_hub

    models = keras_hub.models
    sizes = dict(vocabulary_size=100, num_layers=2, hidden_dim=16, intermediate_dim=32)
    heads = dict(sizes, num_heads=2)
    return {
        "bert": lambda: models.BertBackbone(**heads, max_sequence_length=64),
        "gpt2": lambda: models.GPT2Backbone(**heads, max_sequence_length=64),
        # A window shorter than the lengths run: tf.linalg.band_part masks.
        "qwen3": lambda: models.Qwen3Backbone(**sizes, num_query_heads=4, num_key_value_heads=2,
                                              head_dim=8, sliding_window_size=4),
        # tf.gather(batch_dims=3) of relative positions; ops.repeat by the length.
        "deberta_v3": lambda: models.DebertaV3Backbone(**heads, max_sequence_length=64,
                                                       bucket_size=8),
        "f_net": lambda: models.FNetBackbone(**sizes, max_sequence_length=64),  # fft2
        # A rotary layer declaring one output for the two its call returns.
        "esm": lambda: models.ESMBackbone(**heads, max_sequence_length=64),
    }[name]()


@pytest.mark.parametrize("name", [
    "bert", "gpt2", *(pytest.param(n, marks=pytest.mark.slow)
                      for n in ("qwen3", "deberta_v3", "f_net", "esm"))])
def test_text_backbone_exports_natively_at_any_length(name, tmp_path):
    keras.utils.set_random_seed(11)
    model = _backbone(name)
    result = export_onnx(model, tmp_path / "m.onnx", exporter="native")
    assert result.exporter == "native"
    rng = np.random.default_rng(11)

    def feeds_at(length):
        # Row b keeps its first `length - 2 * b` tokens, the rest is padding.
        mask = (np.arange(length)[None] < length - 2 * np.arange(3)[:, None]).astype("int32")
        feeds = {"token_ids": rng.integers(0, 100, (3, length)).astype("int32") * mask,
                 "segment_ids": (np.arange(length)[None] >= length // 2).repeat(3, 0)
                 .astype("int32"), "padding_mask": mask}
        return [feeds[name] for name in result.input_names]

    _session_matches(model, tmp_path / "m.onnx", feeds_at)


class DirectTensorFlow(keras.layers.Layer):
    """keras-hub's TensorFlow-only paths: tf.linalg.band_part, tf.gather with batch_dims."""

    def call(self, x):
        import tensorflow as tf

        length = ops.shape(x)[1]
        scores = ops.matmul(x, ops.transpose(x, (0, 2, 1)))  # [batch, length, length]
        window = ops.cast(ops.minimum(length, 3), "int32")
        banded = tf.linalg.band_part(scores, window, 0) + tf.linalg.band_part(scores, -1, 1)
        kept = tf.linalg.band_part(ops.ones((length, length), "bool"), 1, 2)
        # Each row's columns in reverse: indices of the rank of the scores.
        rows = ops.broadcast_to(length - 1 - ops.arange(length), ops.shape(scores))
        flipped = tf.gather(scores, rows, batch_dims=2)
        return ops.where(kept, banded, 0.0) + flipped + tf.gather(x, [2, 0], axis=2)[:, :, :1]


def _exported(layer, shape, tmp_path):
    """`run(array)`: onnxruntime's outputs for the native export of `layer` on inputs of `shape`."""
    x = keras.Input(shape)
    model = keras.Model(x, layer(x))
    assert export_onnx(model, tmp_path / "m.onnx", exporter="native").exporter == "native"
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    return lambda a: session.run(None, {session.get_inputs()[0].name: a.astype("float32")})


def _band(a, lower, upper):
    i, j = np.indices(a.shape[-2:])
    return a * (((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper)))


def test_direct_tensorflow_calls_are_recorded_as_ops(tmp_path):
    run = _exported(DirectTensorFlow(), (None, 4), tmp_path)
    rng = np.random.default_rng(8)
    for batch, length in ((1, 5), (3, 11)):
        a = rng.uniform(-3, 3, (batch, length, 4))
        s = a @ a.transpose(0, 2, 1)
        want = (_band(np.ones((length, length)), 1, 2) * (
            _band(s, min(length, 3), 0) + _band(s, -1, 1)) + s[..., ::-1] + a[..., 2:3])
        np.testing.assert_allclose(run(a)[0], want, rtol=1e-5, atol=1e-4)


class Transforms(keras.layers.Layer):
    """fft2 and ifft2 over (length, features), fft over the length: run-time DFT matrices."""

    def call(self, x):
        re, im = ops.fft2((x, ops.flip(x, axis=2)))
        back, _ = ops.ifft2((re, im))
        over_length = ops.transpose(x, (0, 2, 1))
        t_re, t_im = ops.fft((over_length, ops.zeros_like(over_length)))
        return re, im, back, t_re, t_im


def test_transforms_over_a_run_time_length_match_numpy(tmp_path):
    run = _exported(Transforms(), (None, 6), tmp_path)
    rng = np.random.default_rng(9)
    for batch, length in ((1, 5), (3, 11), (2, 32)):
        a = rng.uniform(-50, 50, (batch, length, 6))
        spectrum = np.fft.fft2(a + 1j * a[..., ::-1])
        over_length = np.fft.fft(a.transpose(0, 2, 1))
        want = [spectrum.real, spectrum.imag, a, over_length.real, over_length.imag]
        for g, w in zip(run(a), want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


class RepeatedByLength(keras.layers.Layer):
    """`ops.repeat` by the sequence length (DeBERTa-v3's positions), along an axis and flat."""

    def call(self, x):
        length = ops.shape(x)[1]
        return ops.repeat(x, length, axis=1), ops.repeat(x[:, :2], length)


def test_repeat_by_a_run_time_length_matches_numpy(tmp_path):
    run = _exported(RepeatedByLength(), (None, 3), tmp_path)
    rng = np.random.default_rng(10)
    for batch, length in ((1, 5), (3, 11)):
        a = rng.uniform(-9, 9, (batch, length, 3)).astype("float32")
        got = run(a)
        np.testing.assert_array_equal(got[0], np.repeat(a, length, axis=1))
        np.testing.assert_array_equal(got[1], np.repeat(a[:, :2], length))


@pytest.mark.parametrize("name", [None, pytest.param("qwen3", marks=pytest.mark.slow)])
def test_float16_graph_counts_positions_in_float32(name, tmp_path):
    """onnxruntime has no float16 `Range`: float positions by a run-time length run in float32."""
    keras.utils.set_random_seed(12)
    if name is None:
        x = keras.Input((None, 4))
        model = keras.Model(x, PositionsAndCausalAttention()(x))
    else:
        model = _backbone(name)
    result = export_onnx(model, tmp_path / "m.onnx", exporter="native", precision="float16")
    assert (result.exporter, result.precision) == ("native", "float16")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    reference = keras.Model(model.inputs, model.outputs)
    rng = np.random.default_rng(12)
    for length in LENGTHS:
        if name is None:
            feeds = [rng.uniform(-2, 2, (2, length, 4)).astype("float32")]
        else:
            ids = rng.integers(1, 100, (2, length)).astype("int32")
            feeds = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
            feeds = [feeds[n] for n in result.input_names]
        want = np.asarray(keras.tree.flatten(reference(feeds))[0], np.float64)
        typed = [f.astype(np.float16) if i.type == "tensor(float16)" else f
                 for f, i in zip(feeds, session.get_inputs())]
        got = session.run(None, dict(zip(result.input_names, typed)))[0].astype(np.float64)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * max(1.0, np.abs(want).max()))
