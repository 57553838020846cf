"""Fourth attacker's pass on the native exporter (issue 17): wrong graphs and crashes.

Each case is a small hand-written model (Keras 3 or tf-keras) that the native
exporter wrote wrong, or that onnxruntime could not run, with `check=False`,
reduced to what broke. Every export is run in onnxruntime at sizes other than
the gate's (batches 1 and 5, unknown sizes 1, 3 and 17, values up to 1e3 of
either sign) and compared with the Keras model's own outputs.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from test_onnx_redteam import _keras  # noqa: E402
from test_onnx_redteam2 import ATOL  # noqa: E402
from test_onnx_redteam2 import RTOL  # noqa: E402
from test_onnx_redteam2 import SIZES  # noqa: E402
from test_onnx_redteam2 import _matches_at_other_sizes  # noqa: E402
from test_onnx_redteam2 import _session  # noqa: E402
from test_onnx_redteam2 import _traced  # noqa: E402

L = keras.layers
ops = keras.ops


def _matches(model, tmp_path):
    """`_matches_at_other_sizes` for either flavour (tf-keras dtypes are `tf.DType`s)."""
    if "tf_keras" not in type(model).__module__:
        return _matches_at_other_sizes(model, tmp_path)
    session = _session(model, tmp_path)
    rng = np.random.default_rng(12)
    for batch, size in SIZES:
        for scale in (3.0, 1e3):
            feeds = [(rng.uniform(-1, 1, (batch,) + tuple(size if d is None else d for d in
                                                          t.shape[1:])) * scale).astype(
                t.dtype.name) for t in model.inputs]
            got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds)))
            for g, w in zip(got, _keras(model, feeds)):
                assert g.shape == w.shape
                rms = float(np.sqrt(np.mean(np.square(w))))
                np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * max(1.0, rms))


# --- stacked recurrent cells run backwards over a masked sequence ----------------
# With `go_backwards`, the second cell read the first one's outputs in the
# reversed order while the mask stayed in input order: it skipped the wrong steps.


def _masked_steps(rng, batch, size):
    x = rng.uniform(-3, 3, (batch, size, 3)).astype("float32")
    x[rng.random((batch, size)) < 0.4] = 0.0
    x[0, 0] = 0.0
    return x


def _stacked_backwards(flavour):
    if flavour == "keras":
        keras.utils.set_random_seed(1)
        x = keras.Input((None, 3))
        cells = [L.LSTMCell(4), L.GRUCell(3), L.SimpleRNNCell(2)]
        return keras.Model(x, L.RNN(cells, return_sequences=True, go_backwards=True)(
            L.Masking(0.0)(x)))
    import tf_keras

    tl = tf_keras.layers
    tf_keras.utils.set_random_seed(1)
    x = tf_keras.Input((None, 3))
    cells = [tl.LSTMCell(4), tl.GRUCell(3), tl.SimpleRNNCell(2)]
    return tf_keras.Model(x, tl.RNN(cells, return_sequences=True, go_backwards=True)(
        tl.Masking(0.0)(x)))


@pytest.mark.parametrize("flavour", ["keras", "tf_keras"])
def test_stacked_cells_going_backwards_follow_the_mask(flavour, tmp_path):
    model = _stacked_backwards(flavour)
    session = _session(model, tmp_path)
    rng = np.random.default_rng(11)
    for batch, size in ((1, 3), (5, 17), (2, 1)):
        feed = _masked_steps(rng, batch, size)
        (got,) = session.run(None, {session.get_inputs()[0].name: feed})
        (want,) = _keras(model, [feed])
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# --- ops.image.resize padding to an aspect ratio -------------------------------------
# Its `fill_value` was dropped on the way to the Resizing emitter: the border was 0.


@pytest.mark.parametrize("shape,size", [((2, 2, 1), (4, 2)), ((3, 5, 2), (4, 4))])
def test_resize_pads_to_an_aspect_ratio_with_its_fill_value(shape, size, tmp_path):
    model = _traced(lambda x: ops.image.resize(x, size, pad_to_aspect_ratio=True,
                                               fill_value=2.5), shape)
    _matches_at_other_sizes(model, tmp_path)


# --- float64 tensors ----------------------------------------------------------------
# A float64 input is cast to float32 on entry and constants are written in float32,
# but ops on float64 tensors were emitted in float64: `x / 1000` was a `Mul` of a
# float and a double, which onnxruntime refused to load. The graph now computes
# float64 in float32, as it does float16 (its float outputs are float32).

FLOAT64 = {
    # Functional ops (a layer would cast its float64 input to its float32 dtype).
    "input_scaled": ((None, 3), "float64", lambda x: x / 1000.0 + 1.0),
    "input_through_ops": ((None, 3), "float64", lambda x: ops.softmax(ops.exp(x / 500.0)) * 2.0),
    "cast_from_int32": ((None,), "int32", lambda x: ops.cast(x, "float64") / 7.0),
}


@pytest.mark.parametrize("name", list(FLOAT64))
def test_float64_tensors_are_computed_in_float32(name, tmp_path):
    shape, dtype, function = FLOAT64[name]
    x = keras.Input(shape, dtype=dtype)
    model = keras.Model(x, function(x))
    if dtype == "int32":
        session = _session(model, tmp_path)
        feed = np.arange(-40, 45, dtype="int32").reshape(5, 17)
        (got,) = session.run(None, {session.get_inputs()[0].name: feed})
        np.testing.assert_allclose(got, np.asarray(model(feed)), rtol=RTOL, atol=ATOL)
    else:
        _matches_at_other_sizes(model, tmp_path)


# --- bicubic resizing -------------------------------------------------------------------
# TensorFlow reads Keys' kernel from a table of 1025 entries; onnxruntime's cubic
# Resize evaluates it exactly: 2e-3 apart at 3.0 wherever the scale is not a power of
# two (so `auto` failed over to tf2onnx, which fails too). Shrinking was refused.


def _bicubic_models():
    import tensorflow as tf
    import tf_keras

    def keras_model(shape, layer):
        x = keras.Input(shape)
        return keras.Model(x, layer(x))

    x = tf_keras.Input((3, 4, 2))
    yield "tf_image_resize", tf_keras.Model(x, tf.image.resize(x, (7, 9), method="bicubic"))
    y = tf_keras.Input((4, 5, 3))
    up = tf_keras.layers.UpSampling2D((2, 3), interpolation="bicubic")
    yield "tf_keras_upsampling", tf_keras.Model(y, up(y))
    yield "resizing_up", keras_model((3, 4, 2), L.Resizing(7, 9, interpolation="bicubic"))
    yield "resizing_down_cropped", keras_model((9, 7, 2), L.Resizing(
        4, 3, interpolation="bicubic", crop_to_aspect_ratio=True))
    yield "resizing_channels_first", keras_model((2, 5, 3), L.Resizing(
        6, 7, interpolation="bicubic", data_format="channels_first"))
    yield "upsampling", keras_model((4, 5, 3), L.UpSampling2D((3, 2), interpolation="bicubic"))
    yield "ops_resize", _traced(lambda t: ops.image.resize(t, (5, 3), interpolation="bicubic"),
                                (2, 2, 1))


BICUBIC = dict(_bicubic_models())


@pytest.mark.parametrize("name", list(BICUBIC))
def test_bicubic_resizing_follows_tensorflows_kernel_table(name, tmp_path):
    _matches(BICUBIC[name], tmp_path)


# --- scalars ---------------------------------------------------------------------------------
# Every 0-d constant was written of shape [1] (`np.ascontiguousarray` makes 0-d
# arrays 1-d): a run-time size times a number was of shape [1], so `ops.stack` of
# two such did not load in onnxruntime, and `ops.psnr` (a shared scalar minus the
# log of a mean) came out of shape (1,) where Keras gives a scalar.


def _length(x):
    return ops.cast(ops.shape(x)[1], "float32")


SCALARS = {
    "psnr": lambda x: ops.psnr(x, x * 0.5 + 0.25, 3.0),
    "stacked_lengths": lambda x: ops.stack([_length(x), _length(x) * 2.0]),
    "length_times_number": lambda x: _length(x) * 2.0 + 1.0,
}


@pytest.mark.parametrize("name", list(SCALARS))
def test_scalars_stay_scalars(name, tmp_path):
    _matches_at_other_sizes(_traced(SCALARS[name]), tmp_path)


# --- ops.slice_update near the edges ----------------------------------------------------------
# TensorFlow clamps each start so that the block lies inside (-1 is 0, a start past
# the end moves back); the graph scattered at the starts as given: wrong rows for
# -1, and onnxruntime failed on indices past the end (a fixed shape: at any batch).

SLICE_UPDATES = {
    "negative_start": ((None, 4), lambda x: ops.slice_update(x, (0, -1, 0), ops.ones((1, 1, 4)))),
    "past_a_run_time_end": ((None, 4), lambda x: ops.slice_update(
        x, (0, 5, 3), ops.ones((1, 1, 2)) * 7.0)),
    "past_a_fixed_end": ((3, 4), lambda x: ops.slice_update(x, (0, 2, 3), ops.ones((1, 2, 2)))),
}


@pytest.mark.parametrize("name", list(SLICE_UPDATES))
def test_slice_update_clamps_its_start_as_tensorflow_does(name, tmp_path):
    shape, function = SLICE_UPDATES[name]
    _matches_at_other_sizes(_traced(function, shape), tmp_path)


# --- Lambda layers of integer or boolean results -------------------------------------------
# Keras's symbolic call gives a Lambda its policy's dtype (float32) whatever its
# function returns, and the layers after it follow that dtype; the graph declared
# float32 for an int32 or bool value, and onnxruntime refused to load it. The
# traced value is now cast to the dtype Keras's graph gives it.

LAMBDAS = {
    "int_product": ("int32", lambda t: t * 2),
    "uint8_unchanged": ("uint8", lambda t: t),
    "bool_negation": ("bool", lambda t: ops.logical_not(t)),
    "argmax_of_floats": ("float32", lambda t: ops.argmax(ops.stack([t, -t], axis=-1), axis=-1)),
}


@pytest.mark.parametrize("name", list(LAMBDAS))
def test_lambda_of_integers_follows_kerass_graph(name, tmp_path):
    dtype, function = LAMBDAS[name]
    x = keras.Input((None,), dtype=dtype)
    y = L.Lambda(function)(x)
    model = keras.Model(x, [y, L.Dense(2)(ops.expand_dims(y, -1))])
    session = _session(model, tmp_path)
    rng = np.random.default_rng(13)
    for batch, size in SIZES:
        feed = rng.integers(-3 if dtype == "int32" else 0, 2 if dtype == "bool" else 9,
                            (batch, size)).astype(dtype)
        if dtype == "float32":
            feed = rng.uniform(-3, 3, (batch, size)).astype(dtype)
        got = session.run(None, {session.get_inputs()[0].name: feed})
        for g, w in zip(got, keras.tree.flatten(model(feed))):
            np.testing.assert_allclose(g, np.asarray(w, np.float64), rtol=RTOL, atol=ATOL)


# --- "same" pooling with strides longer than the window ---------------------------------------
# On an axis of unknown size the graph used onnxruntime's SAME_UPPER, whose pooling
# padding goes negative for such strides (size 9, window 2, stride 3): onnxruntime
# failed at those sizes. The padding is now computed in the graph, as TensorFlow does.


def _strided_pools():
    import tf_keras

    def model(module, layer, shape):
        x = module.Input(shape)
        return module.Model(x, layer(x))

    yield "average_2d", model(keras, L.AveragePooling2D((2, 4), strides=(3, 1), padding="same"),
                              (None, None, 3))
    yield "max_1d", model(keras, L.MaxPooling1D(2, strides=5, padding="same"), (None, 3))
    yield "average_3d", model(keras, L.AveragePooling3D((2, 1, 2), strides=(3, 2, 4),
                                                        padding="same"), (None, 4, None, 2))
    yield "max_channels_first", model(keras, L.MaxPooling2D(
        2, strides=3, padding="same", data_format="channels_first"), (3, None, None))
    yield "ops_average_pool", _traced(lambda t: ops.average_pool(t, 1, strides=3,
                                                                 padding="same"), (None, 3))
    yield "tf_keras_average", model(tf_keras, tf_keras.layers.AveragePooling2D(
        2, strides=3, padding="same"), (None, None, 3))


STRIDED_POOLS = dict(_strided_pools())


@pytest.mark.parametrize("name", list(STRIDED_POOLS))
def test_same_pooling_with_strides_longer_than_the_window(name, tmp_path):
    _matches(STRIDED_POOLS[name], tmp_path)
