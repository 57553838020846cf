"""Models nobody here wrote, exported natively (issue 17, red-team pass).

Each test is a model that failed on an attacker's pass over keras-hub,
keras.applications, keras-cv, kecam (tf-keras) and hand-written `keras.ops`
models, reduced to what broke (the model it was found on is named), plus
(slow) keras-hub DeiT built from its constructor with a tiny config. Every export is run in onnxruntime and
compared with the Keras model's own outputs on a batch of 3 with values of
either sign up to 3 (the exporter's check uses a batch of 2).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from bnconvert import export_onnx  # noqa: E402

L = keras.layers
ATOL, RTOL = 1e-5, 1e-4


def _feeds(model, seed=3, batch=3, high=None):
    rng = np.random.default_rng(seed)
    feeds = []
    for t in model.inputs:
        shape = (batch,) + tuple(8 if d is None else d for d in t.shape[1:])
        dtype = str(getattr(t.dtype, "name", t.dtype))
        if "int" in dtype:
            feeds.append(rng.integers(0, (high or {}).get(t.name, 2), shape).astype(dtype))
        else:
            feeds.append(rng.uniform(-3, 3, shape).astype(dtype))
    return feeds


def _keras(model, feeds):
    if isinstance(getattr(model, "_inputs_struct", None), dict):
        feed = {t.name: f for t, f in zip(model.inputs, feeds)}
    else:
        feed = feeds[0] if len(feeds) == 1 else feeds
    return [np.asarray(o, np.float64) for o in keras.tree.flatten(model(feed, training=False))]


def _exported_matches(model, tmp_path, feeds=None, **kwargs):
    """Exports `model` natively; asserts onnxruntime matches Keras on `feeds`."""
    feeds = feeds if feeds is not None else _feeds(model)
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, exporter="native", **kwargs)
    assert result.exporter == "native"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))
    want = _keras(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        rms = float(np.sqrt(np.mean(np.square(w)))) if w.size else 0.0
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=RTOL,
                                   atol=ATOL * max(1.0, rms))
    return result


# --- a sublayer returning None among its outputs (keras-hub DeiT) ----------

class _ScoredBlock(L.Layer):
    """Returns `(outputs, None)` unless asked for scores, as keras-hub's DeiT blocks do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(4)

    def build(self, shape):
        self.dense.build(shape)

    def call(self, x, return_scores=False):
        y = self.dense(x)
        return y, (keras.ops.sum(y, -1) if return_scores else None)


class _Encoder(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [_ScoredBlock(), _ScoredBlock()]

    def build(self, shape):
        for block in self.blocks:
            block.build(shape[:-1] + (4,) if block is not self.blocks[0] else shape)

    def call(self, x):
        for block in self.blocks:
            x, _ = block(x)
        return keras.ops.gelu(x)

    def compute_output_shape(self, shape):
        return shape[:-1] + (4,)


def test_sublayer_returning_none_is_traced(tmp_path):
    x = keras.Input((5, 4), name="x")
    model = keras.Model(x, _Encoder(name="encoder")(x))
    _exported_matches(model, tmp_path)


@pytest.mark.slow
def test_keras_hub_deit(tmp_path):
    import keras_hub

    keras.utils.set_random_seed(17)
    model = keras_hub.models.DeiTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32)
    _exported_matches(model, tmp_path)


# --- a model that refuses the generated check batch (keras-hub BERT, GPT-2) --

class _Positions(L.Layer):
    """Adds a learned position embedding of `rows` rows, sliced to the sequence length."""

    def __init__(self, rows, **kwargs):
        super().__init__(**kwargs)
        self.rows = rows

    def build(self, shape):
        self.table = self.add_weight(shape=(self.rows, shape[-1]), initializer="random_normal")

    def call(self, x):
        return x + self.table[: keras.ops.shape(x)[1]]


def _short_text_model(rows):
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    y = _Positions(rows, name="positions")(L.Embedding(20, 4, name="embed")(tokens))
    return keras.Model(tokens, L.Dense(3, name="logits")(y), name="short_text")


def test_model_refusing_the_generated_batch_is_checked_on_a_shorter_one(tmp_path):
    from bnconvert import convert_model

    # The generated batch has 32 steps; the table has 12 rows: 8 steps fit.
    model = _short_text_model(12)
    folded, report = convert_model(model, to="inference", return_report=True)
    assert report.verified and "unknown sizes 8" in report.verification_note
    tokens = np.random.default_rng(0).integers(0, 20, (3, 11)).astype("int32")
    np.testing.assert_allclose(np.asarray(folded(tokens)), np.asarray(model(tokens)), atol=1e-6)
    # The check runs at 8 steps; native slices the table by the run-time length.
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.checked and result.max_abs_diff < 1e-5 and result.exporter == "native"
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"tokens": tokens})[0],
                               np.asarray(model(tokens)), rtol=1e-5, atol=1e-6)


class _SizedSlices(L.Layer):
    """Slices a variable and its input by the run-time sequence length (`key` picks how)."""

    def __init__(self, key, **kwargs):
        super().__init__(**kwargs)
        self.key = key

    def build(self, shape):
        self.table = self.add_weight(shape=(12, shape[-1]), initializer="random_normal")

    def call(self, x):
        n = keras.ops.shape(x)[1]
        if self.key == "table_tail":  # the last n rows, a negative run-time start
            return x + self.table[-n:]
        if self.key == "table_stepped":  # every row from the end, n of them
            return x + self.table[::-1][:n]
        if self.key == "input_half":  # the second half of the steps, then the table's first
            half = x[:, n // 2:, ...]
            return half * self.table[None, : n - n // 2, :]
        return x[:, : n - 1] + self.table[1:n, None][:, 0]  # "shifted": one step fewer


@pytest.mark.parametrize("key", ["table_tail", "table_stepped", "input_half", "shifted"])
def test_slices_bounded_by_run_time_sizes_stay_dynamic(key, tmp_path):
    # Traced with the length as None, `table[:n]` is the whole table, baked in.
    # Unchecked, the graph must still run at every length up to the table's.
    keras.utils.set_random_seed(2)
    x = keras.Input((None, 4), name="x")
    model = keras.Model(x, _SizedSlices(key, name="sliced")(x))
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, exporter="native", check=False)
    assert result.exporter == "native"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for steps in (3, 7, 12):
        feed = np.random.default_rng(steps).uniform(-3, 3, (2, steps, 4)).astype("float32")
        np.testing.assert_allclose(session.run(None, {"x": feed})[0], np.asarray(model(feed)),
                                   rtol=RTOL, atol=ATOL)


def test_model_refusing_both_generated_batches_is_a_verification_error(tmp_path):
    from bnconvert import convert_model
    from bnconvert.errors import VerificationError

    model = _short_text_model(6)  # neither 32 nor 8 steps fit
    with pytest.raises(VerificationError, match=r"fails on the check batch of input shapes "
                                                r"\(2, 32\).*pass inputs it accepts"):
        convert_model(model, to="inference")
    with pytest.raises(VerificationError, match="fails on the check batch"):
        export_onnx(model, tmp_path / "m.onnx", exporter="tf2onnx")
    assert not (tmp_path / "m.onnx").exists()
    tokens = np.random.default_rng(0).integers(0, 20, (2, 5)).astype("int32")
    folded = convert_model(model, to="inference", check_inputs=[tokens])
    np.testing.assert_allclose(np.asarray(folded(tokens)), np.asarray(model(tokens)), atol=1e-6)


# --- masks made by a layer's compute_mask (Embedding(mask_zero=True)) ------

def _masked_attention(kind, causal):
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    e = L.Embedding(5, 8, mask_zero=True, name="embed")(tokens)
    if kind == "mha":
        y = L.MultiHeadAttention(2, 4, name="mha")(e, e, use_causal_mask=causal)
    else:
        y = L.Attention(name="attention")([e, e], use_causal_mask=causal)
    return keras.Model(tokens, L.LayerNormalization(name="norm")(y + e), name=f"masked_{kind}")


@pytest.mark.parametrize("kind", ["mha", "attention"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_embedding_mask_reaches_attention(kind, causal, tmp_path):
    keras.utils.set_random_seed(5)
    model = _masked_attention(kind, causal)
    tokens = np.random.default_rng(1).integers(0, 5, (3, 6)).astype("int32")
    tokens[0, 2] = tokens[1, 0] = tokens[2, 5] = 0  # masked steps at the start, middle, end
    _exported_matches(model, tmp_path, [tokens], inputs=[tokens])


# --- recurrent layers under any mask (Embedding(mask_zero=True) + LSTM) ----

def _masked_recurrent(kind):
    tokens = keras.Input((7,), dtype="int32", name="tokens")
    y = L.Embedding(6, 5, mask_zero=True, name="embed")(tokens)
    if kind == "lstm_gru":
        y = L.LSTM(6, return_sequences=True, name="lstm")(y)
        outputs = [L.GRU(4, name="gru")(y), y]
    elif kind == "bidirectional":
        y = L.Bidirectional(L.LSTM(4, return_sequences=True), name="bi_seq")(y)
        outputs = [L.Bidirectional(L.GRU(3, reset_after=False), merge_mode="sum",
                                   name="bi_last")(y), y]
    elif kind == "states":
        outputs = list(L.LSTM(4, return_sequences=True, return_state=True, name="lstm")(y))
        outputs.append(L.SimpleRNN(3, zero_output_for_mask=True, return_sequences=True,
                                   name="rnn")(y))
    elif kind == "backwards":
        y = L.GRU(4, go_backwards=True, return_sequences=True, name="gru")(y)
        outputs = [L.LSTM(3, go_backwards=True, return_sequences=True, return_state=True,
                          name="lstm")(y)]
    else:  # stacked cells
        cells = [L.LSTMCell(4), L.GRUCell(3)]
        outputs = [L.RNN(cells, return_sequences=True, name="stacked")(y)]
    return keras.Model(tokens, outputs, name=f"masked_{kind}")


@pytest.mark.parametrize("kind", ["lstm_gru", "bidirectional", "states", "backwards",
                                  "stacked"])
def test_recurrent_layers_follow_any_mask(kind, tmp_path):
    keras.utils.set_random_seed(11)
    model = _masked_recurrent(kind)
    tokens = np.random.default_rng(2).integers(1, 6, (4, 7)).astype("int32")
    tokens[0, :2] = 0  # left padding
    tokens[1, 3] = tokens[1, 5] = 0  # holes
    tokens[2, 4:] = 0  # right padding
    tokens[3, :] = 0  # nothing kept
    _exported_matches(model, tmp_path, [tokens], inputs=[tokens])


# --- a Reshape((-1, n)) after a layer whose inferred shape is wrong (keras-cv RetinaNet)

class _Halving(L.Layer):
    """A stride-2 convolution whose `compute_output_shape` forgets the stride."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(8, 3, strides=2, padding="same")

    def build(self, shape):
        self.conv.build(shape)

    def call(self, x):
        return self.conv(x)

    def compute_output_shape(self, shape):
        return shape[:-1] + (8,)


def test_reshape_with_unknown_size_is_resolved_at_run_time(tmp_path):
    x = keras.Input((2, 2, 3), name="x")
    y = L.Reshape((-1, 4), name="boxes")(_Halving(name="head")(x))
    model = keras.Model(x, y)
    assert tuple(model.output.shape) == (None, 8, 4)  # Keras infers 2x2; the call gives 1x1
    feeds = _feeds(model)
    assert _keras(model, feeds)[0].shape == (3, 2, 4)
    _exported_matches(model, tmp_path, feeds)


def test_masked_sequence_through_pooling_softmax_and_time_distributed(tmp_path):
    """A TimeDistributed layer whose inner layer takes no mask ignores it, as in Keras."""
    keras.utils.set_random_seed(4)
    tokens = keras.Input((7,), dtype="int32", name="tokens")
    e = L.Embedding(4, 6, mask_zero=True, name="embed")(tokens)
    pooled = L.GlobalAveragePooling1D(name="pool")(e)
    weights = L.Softmax(name="softmax")(L.Dense(1, name="score")(e)[..., 0],
                                         mask=keras.ops.not_equal(tokens, 0))
    steps = L.TimeDistributed(L.Dense(2), name="per_step")(e)
    model = keras.Model(tokens, [pooled, weights, steps])
    x = np.random.default_rng(3).integers(0, 4, (3, 7)).astype("int32")
    x[:, 0] = 0
    _exported_matches(model, tmp_path, [x], inputs=[x])


# --- tf-keras tf.shape (kecam ConvNeXtV2's global response normalization) --

def test_tf_keras_tf_shape(tmp_path):
    import tensorflow as tf
    import tf_keras

    x = tf_keras.Input((4, 5, 3), name="x")
    scale = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], x.dtype) ** 0.5
    norm = tf.sqrt(tf.reduce_mean(tf.square(x), axis=[1, 2], keepdims=True)) * scale
    y = x * norm + tf.cast(tf.compat.v1.shape(x)[-1], "float32")
    model = tf_keras.Model(x, [y, tf.shape(x)])
    feeds = _feeds(model)
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, exporter="native").exporter == "native"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: feeds[0]})
    want = [np.asarray(o) for o in model(feeds[0], training=False)]
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL * 10)
    assert got[1].dtype == np.int32 and got[1].tolist() == [3, 4, 5, 3]


def test_tf_keras_resize_to_a_shape_read_from_the_graph(tmp_path):
    """kecam GhostNetV2: `tf.image.resize(x, tf.shape(skip)[1:-1])`."""
    import tensorflow as tf
    import tf_keras

    x = tf_keras.Input((8, 8, 3), name="x")
    small = tf_keras.layers.AveragePooling2D(2)(x)
    up = tf.image.resize(small, tf.shape(x)[1:-1], method="bilinear")
    model = tf_keras.Model(x, x * tf.nn.sigmoid(up))
    feeds = _feeds(model)
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, exporter="native").exporter == "native"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: feeds[0]})
    np.testing.assert_allclose(got, np.asarray(model(feeds[0])), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("source", ["embedding", "masking"])
def test_tf_keras_masks_reach_recurrent_layers_and_pooling(source, tmp_path):
    """tf-keras keeps a mask's value only: it is recomputed from the layer that made it."""
    import tf_keras

    tl = tf_keras.layers
    tf_keras.utils.set_random_seed(6)
    if source == "embedding":
        inputs = tf_keras.Input((6,), dtype="int32", name="tokens")
        y = tl.Embedding(5, 4, mask_zero=True)(inputs)
        x = np.random.default_rng(4).integers(0, 5, (3, 6)).astype("int32")
        x[0, :2] = x[1, 3] = 0
    else:
        inputs = tf_keras.Input((6, 3), name="seq")
        y = tl.Masking(0.0)(inputs)
        x = np.random.default_rng(4).normal(size=(3, 6, 3)).astype("float32")
        x[0, :2] = x[1, 3] = 0.0
    y = tl.Dense(4)(y)  # passes the mask on
    y = tl.LSTM(4, return_sequences=True)(y)
    outputs = [tl.GRU(3)(y), tl.GlobalAveragePooling1D()(y)]
    model = tf_keras.Model(inputs, outputs)
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, exporter="native", inputs=[x]).exporter == "native"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})
    for g, w in zip(got, model(x)):
        np.testing.assert_allclose(g, np.asarray(w), rtol=RTOL, atol=ATOL)


def test_float16_graph_keeps_fully_masked_attention_rows_finite(tmp_path):
    """A masked query's row is all masked: -1e9 in float16 was -inf, and the row NaN."""
    keras.utils.set_random_seed(5)
    model = _masked_attention("mha", False)
    tokens = np.random.default_rng(1).integers(1, 5, (3, 6)).astype("int32")
    tokens[0, :2] = tokens[2, 5] = 0
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, exporter="native", precision="float16", inputs=[tokens])
    assert result.exporter == "native" and result.precision == "float16"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: tokens})
    want = _keras(model, [tokens])[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=8 * 2.0**-10, atol=8 * 2.0**-10)
