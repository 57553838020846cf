"""Second attacker's pass on the native exporter (issue 17): wrong graphs the gate misses.

Each case is a small hand-written Keras 3 model that the native exporter wrote
wrong with `check=False` (the gate, at batch 2 and unknown sizes 32, may catch
it or not), reduced to what broke. Every export is run in onnxruntime at sizes
other than the gate's (batches 1 and 5, unknown sizes 1, 3 and 17, values up
to 1e3 of either sign) and compared with the Keras model's own outputs.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from bnconvert import export_onnx  # noqa: E402
from bnconvert.errors import ConversionError  # noqa: E402
from test_onnx_redteam import _keras  # noqa: E402

L = keras.layers
ops = keras.ops
ATOL, RTOL = 1e-5, 1e-4
SIZES = ((1, 3), (5, 17), (2, 1))  # (batch, unknown size)


def _feeds(model, batch, size, scale, rng):
    feeds = []
    for t in model.inputs:
        shape = (batch,) + tuple(size if d is None else d for d in t.shape[1:])
        feeds.append((rng.uniform(-1, 1, shape) * scale).astype(str(t.dtype)))
    return feeds


def _session(model, tmp_path, **kwargs):
    """Exports `model` natively, unchecked; its onnxruntime session."""
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, exporter="native", check=False, **kwargs).exporter == "native"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _matches_at_other_sizes(model, tmp_path, sizes=SIZES, **kwargs):
    """Exports `model` natively, unchecked; onnxruntime matches Keras at `sizes`."""
    session = _session(model, tmp_path, **kwargs)
    rng = np.random.default_rng(4)
    for batch, size in sizes:
        for scale in (3.0, 1e3):
            feeds = _feeds(model, batch, size, scale, rng)
            got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))
            want = _keras(model, feeds)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.shape == w.shape, (batch, size)
                rms = float(np.sqrt(np.mean(np.square(w)))) if w.size else 0.0
                np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=RTOL,
                                           atol=ATOL * max(1.0, rms))


def _traced(function, shape=(None, 4), dtype="float32"):
    """A model of one custom layer whose `call` is `function`."""
    class Custom(L.Layer):
        def call(self, x):
            return function(x)

    x = keras.Input(shape, dtype=dtype)
    return keras.Model(x, Custom()(x))


# --- ops.take ----------------------------------------------------------------
# A scalar index (a number, or a size computed in the graph, held there as [1])
# kept its axis; a Gather of a Range with negative entries was read by
# onnxruntime's Gather-to-Slice rewrite as slice bounds and came out empty.

TAKES = {
    "negative_number": lambda x: ops.take(x, -1, axis=1),
    "last_by_size": lambda x: ops.take(x, ops.shape(x)[1] - 1, axis=1),
    "reversed_range": lambda x: ops.take(x, ops.arange(ops.shape(x)[1] - 1, -1, -1), axis=1),
    "negative_range": lambda x: ops.take(x, ops.arange(-ops.shape(x)[1], 0), axis=1),
}


@pytest.mark.parametrize("name", list(TAKES))
def test_take_of_scalars_and_ranges(name, tmp_path):
    _matches_at_other_sizes(_traced(TAKES[name]), tmp_path)


# --- integers at their range ends ----------------------------------------------
# Floor division subtracted the remainder first (overflowing near the range
# ends: 6e8 off); onnxruntime saturates an int32 ReduceSum where Keras wraps.

I32 = np.iinfo(np.int32)
INTEGERS = {
    "floor_divide_by_negative": ("int32", lambda x: ops.floor_divide(x, -3)),
    # (never min // -1, which overflows)
    "floor_divide_by_tensor": ("int32", lambda x: ops.floor_divide(
        x, ops.where(ops.flip(x, 1) == -1, 3, ops.flip(x, 1)))),
    "floor_divide_int8": ("int8", lambda x: x // -7),
    "sum_int32": ("int32", lambda x: ops.sum(x, axis=1)),
    "sum_uint8": ("uint8", lambda x: ops.sum(x, axis=1, keepdims=True)),
}


@pytest.mark.parametrize("name", list(INTEGERS))
def test_integer_ops_at_range_ends(name, tmp_path):
    dtype, function = INTEGERS[name]
    info = np.iinfo(dtype)
    values = np.array([info.min, info.min + 1, -7, -1, 1, 2, 5, info.max - 1, info.max])
    values = values[(values >= info.min) & (values <= info.max) & (values != 0)]
    model = _traced(function, (None,), dtype)
    session = _session(model, tmp_path)
    rng = np.random.default_rng(5)
    for batch, size in SIZES:
        feed = rng.choice(values, (batch, size)).astype(dtype)
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        want = np.asarray(model(feed))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# --- `==` in a layer's call -----------------------------------------------------
# A symbolic Keras tensor has no `==` of its own: `x == 0` was Python's identity
# test, False, written into the graph as a constant (a padding mask never set).

EQUALITIES = {
    "number": lambda x: ops.where(x == 0.0, 5.0, x),
    "reflected": lambda x: ops.where(-1.0 == x, 5.0, x),
    "array": lambda x: ops.cast(x == np.array([0, 1, -1, 2], "float32"), "float32"),
    "tensor": lambda x: ops.cast(x == ops.flip(x, 1), "float32") + x,
}


@pytest.mark.parametrize("name", list(EQUALITIES))
def test_equality_in_a_call_is_elementwise(name, tmp_path):
    model = _traced(EQUALITIES[name])
    session = _session(model, tmp_path)
    rng = np.random.default_rng(6)
    for batch, size in SIZES:
        # Small whole numbers: many entries equal 0, -1, each other.
        feed = np.round(rng.uniform(-2, 2, (batch, size, 4))).astype("float32")
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        np.testing.assert_array_equal(got, np.asarray(model(feed)))


# --- a subclassed model built by a call on data ---------------------------------


class _LastStep(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)

    def call(self, x):
        return self.dense(x)[:, -1] * 2.0


def test_subclassed_model_built_by_a_call_takes_any_batch(tmp_path):
    """Its build config records the batch it was called on (1): the graph took only that."""
    model = _LastStep()
    model(np.zeros((1, 5, 4), "float32"))
    session = _session(model, tmp_path)
    for batch in (1, 5):
        feed = np.random.default_rng(batch).uniform(-1e3, 1e3, (batch, 5, 4)).astype("float32")
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        want = np.asarray(model(feed), np.float64)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * max(1.0, np.abs(want).max()))


# --- integer data into a float layer ----------------------------------------------
# A uint8 image into `Rescaling` or `Conv2D` gave a graph onnxruntime refuses
# (integer operands of Mul / Conv); the layer now takes it cast to float. Layers
# that compute in the integer dtype, or round back to it, are refused by name.


@pytest.mark.parametrize("dtype", ["uint8", "int32"])
def test_integer_images_into_float_layers(dtype, tmp_path):
    x = keras.Input((None, None, 3), dtype=dtype)
    y = L.Conv2D(4, 3, strides=2, padding="same")(L.Rescaling(1 / 255.0, offset=-0.5)(x))
    y = L.GlobalMaxPooling2D()(L.BatchNormalization()(y))
    side = L.Dense(2)(L.GlobalAveragePooling2D()(L.ZeroPadding2D()(x)))
    model = keras.Model(x, [L.Dense(3)(y), side])
    session = _session(model, tmp_path)
    rng = np.random.default_rng(7)
    for batch, size in ((1, 7), (5, 4)):
        feed = rng.integers(0, 256, (batch, size, size + 2, 3)).astype(dtype)
        got = session.run(None, {session.get_inputs()[0].name: feed})
        for g, w in zip(got, _keras(model, [feed])):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * max(1.0, np.abs(w).max()))


def test_integer_input_into_a_normalization_is_refused_by_name(tmp_path):
    x = keras.Input((None, 3), dtype="int32")
    model = keras.Model(x, L.LayerNormalization(name="norm")(x))
    with pytest.raises(ConversionError, match=r"'norm' \(LayerNormalization: an integer input"):
        export_onnx(model, tmp_path / "m.onnx", exporter="native", check=False)
    assert not (tmp_path / "m.onnx").exists()


IMAGE_OPS = {
    # Weighted in float and truncated back (an int graph multiplied uint8 by float).
    "rgb_to_grayscale": lambda x: ops.image.rgb_to_grayscale(x),
    # onnxruntime has no int32 MaxPool: pooled in float64, exactly.
    "max_pool": lambda x: ops.max_pool(x, 3, 2, padding="same"),
    "nearest_resize": lambda x: ops.image.resize(x, (4, 5), interpolation="nearest"),
}


@pytest.mark.parametrize("name", list(IMAGE_OPS))
@pytest.mark.parametrize("dtype", ["uint8", "int32"])
def test_integer_images_through_image_ops(name, dtype, tmp_path):
    model = _traced(IMAGE_OPS[name], (None, None, 3), dtype)
    session = _session(model, tmp_path)
    rng = np.random.default_rng(8)
    for batch, size in ((1, 7), (5, 4)):
        feed = rng.integers(0, 256, (batch, size, size + 2, 3)).astype(dtype)
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        np.testing.assert_array_equal(got, np.asarray(model(feed)))


def test_bilinear_resize_of_integer_images_is_refused(tmp_path):
    x = keras.Input((None, None, 3), dtype="uint8")
    model = keras.Model(x, L.Lambda(lambda t: ops.image.resize(t, (4, 5)))(x))
    with pytest.raises(ConversionError, match=r"Resize: bilinear of uint8 images"):
        export_onnx(model, tmp_path / "m.onnx", exporter="native", check=False)


# --- padding by a run-time width ----------------------------------------------------
# Window attention pads a sequence or image to a multiple of its window; the width,
# computed from `ops.shape`, was no input of Keras's Pad op: the layer was refused.


def _windows(x):
    height, width = ops.shape(x)[1], ops.shape(x)[2]
    padded = ops.pad(x, ((0, 0), (0, (3 - height % 3) % 3), (1, (3 - (width + 1) % 3) % 3),
                         (0, 0)), constant_values=-2.0)
    return ops.reshape(padded, (ops.shape(x)[0], -1, 3, 2))


def test_padding_to_a_multiple_of_a_window(tmp_path):
    _matches_at_other_sizes(_traced(_windows, shape=(None, None, 2)), tmp_path,
                            sizes=((1, 7), (5, 9), (2, 1), (2, 2)))


# --- tril / triu / sort over sizes known at run time (a causal mask) -------------------

SIZED_AXES = {
    # sort / argsort along an unknown length: TopK of the axis's run-time size.
    "sorted_scores": lambda x: ops.sort(x, axis=1) + ops.cast(ops.argsort(x, axis=1), "float32"),
    # one_hot / eye of the length (an index of -1 gives a row of zeros, as in Keras).
    "one_hot_eye": lambda x: ops.matmul(ops.one_hot(ops.arange(ops.shape(x)[1]) - 1,
                                                    ops.shape(x)[1]), x)
    + ops.matmul(ops.eye(ops.shape(x)[1], k=1), x),
    # symmetric padding (the edge repeated; a width up to the whole axis).
    "symmetric_pad": lambda x: ops.pad(x, ((0, 0), (1, 1), (2, 4)), mode="symmetric"),
    # roll by a shift beyond the length, either way: split at `n - shift mod n`.
    "rolled": lambda x: ops.roll(x, 4, axis=1) - ops.roll(x, -2, axis=1),
    "causal_mask": lambda x: ops.matmul(ops.tril(ops.ones((ops.shape(x)[1],) * 2), k=-1), x),
    "upper_scores": lambda x: ops.triu(ops.matmul(x, ops.transpose(x, (0, 2, 1))), k=1),
    "non_square": lambda x: ops.tril(x, k=2) + ops.triu(x, k=-1),
}


@pytest.mark.parametrize("name", list(SIZED_AXES))
def test_triangles_and_sorts_of_run_time_sizes(name, tmp_path):
    _matches_at_other_sizes(_traced(SIZED_AXES[name]), tmp_path)


# --- tf-keras TFOpLambda calls that were refused -------------------------------------


def test_tf_keras_pad_floor_div_rint_depth_to_space(tmp_path):
    """`tf.pad` records as `tf.compat.v1.pad`, `tf.math.floordiv` as `compat.v1.floor_div`."""
    import tensorflow as tf
    import tf_keras

    x = tf_keras.Input((None, None, 4))
    padded = tf.pad(x, [[0, 0], [1, 2], [2, 0], [0, 0]], "REFLECT")
    steps = tf.math.floordiv(tf.cast(x * 100.0, tf.int32), -7)
    y = tf.nn.depth_to_space(tf.pad(x, [[0, 0], [0, 1], [1, 0], [0, 0]], constant_values=-3.5), 2)
    model = tf_keras.Model(x, [padded, tf.cast(steps, tf.float32), tf.math.rint(x * 2.0), y])
    session = _session(model, tmp_path)
    rng = np.random.default_rng(9)
    for batch, size in ((1, 3), (5, 6)):
        # Halves (x * 2.0 a whole number plus 0.5) test rint's rounding to even.
        feed = (np.round(rng.uniform(-40, 40, (batch, size, size + 1, 4))) / 4).astype("float32")
        got = session.run(None, {session.get_inputs()[0].name: feed})
        for g, w in zip(got, model(feed)):
            np.testing.assert_allclose(g, np.asarray(w), rtol=RTOL, atol=ATOL)
