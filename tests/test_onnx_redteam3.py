"""Third attacker's pass on the native exporter (issue 17): dtypes and kernels onnxruntime lacks.

Each case is a small Keras model that the native exporter wrote wrong, or
wrote as a graph onnxruntime could not load or run, reduced to what broke.
Exports are unchecked (`check=False`) and run in onnxruntime at batch sizes
and unknown sizes other than the gate's, on values of either sign, against
the Keras model's own outputs (the helpers of `test_onnx_redteam2`).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bnconvert import export_onnx  # noqa: E402
from bnconvert.errors import ConversionError  # noqa: E402
from test_onnx_redteam2 import _matches_at_other_sizes  # noqa: E402
from test_onnx_redteam2 import _session  # noqa: E402
from test_onnx_redteam2 import _traced  # noqa: E402

L = keras.layers
ops = keras.ops


# --- tf.sequence_mask of float lengths ------------------------------------------
# TensorFlow casts the lengths to `maxlen`'s dtype (int32) before comparing,
# truncating 2.5 to 2; the graph compared a float range with the float lengths
# and masked one step more for every fractional length.


def _sequence_masks(tf, tf_keras):
    class Masked(tf_keras.layers.Layer):
        def call(self, x):
            lengths = tf.abs(x[:, :, 0]) * 2.0
            by_number = tf.cast(tf.sequence_mask(lengths, 6), x.dtype)
            by_size = tf.cast(tf.sequence_mask(lengths, tf.shape(x)[1]), x.dtype)
            return tf.concat([by_number, by_size], -1)

    x = tf_keras.Input((None, 4))
    recorded = tf.cast(tf.sequence_mask(tf.abs(x[:, :, 1]) * 3.0, 5), tf.float32)
    return tf_keras.Model(x, [Masked()(x), recorded])


def test_sequence_mask_of_float_lengths_truncates_them(tmp_path):
    import tensorflow as tf
    import tf_keras

    model = _sequence_masks(tf, tf_keras)
    session = _session(model, tmp_path)
    rng = np.random.default_rng(10)
    for batch, size in ((1, 3), (5, 17), (2, 1)):
        # Quarters: whole lengths, halves and fractions, of either sign before `abs`.
        feed = (np.round(rng.uniform(-12, 12, (batch, size, 4))) / 4).astype("float32")
        got = session.run(None, {session.get_inputs()[0].name: feed})
        for g, w in zip(got, model(feed)):
            np.testing.assert_array_equal(g, np.asarray(w))


# --- ops.repeat by a count computed in the graph, 0 at some sizes ------------------
# The repeated axis was a Tile reshaped to `size * count`: a count of 0 made a 0
# in the Reshape's shape, which ONNX reads as "keep this dimension" (a crash).

REPEATS = {
    "along_axis": lambda x: ops.repeat(x, ops.shape(x)[1] // 4, axis=1),
    "last_axis": lambda x: ops.repeat(x, ops.shape(x)[1] // 4, axis=-1) * 2.0,
    "flattened": lambda x: ops.repeat(x[:, :2], ops.shape(x)[1] // 4),
}


@pytest.mark.parametrize("name", list(REPEATS))
def test_repeat_by_a_run_time_count_of_zero(name, tmp_path):
    # Unknown sizes 3 and 1 repeat 0 times, 17 four times.
    _matches_at_other_sizes(_traced(REPEATS[name]), tmp_path)


# --- selections of bool and narrow or unsigned integers ------------------------------
# onnxruntime's `Where` has no bool, int16, uint16 or uint64 kernel: a graph
# selecting them did not load (`where`, `select`, `diag`, `diagonal` and `trace`,
# whose ReduceSum lacks bool and int16 too, and integer segment reductions,
# whose fill was a float32 constant whatever the data's dtype).

SELECTIONS = {
    "where": lambda x: ops.where(ops.flip(x, 1) == x[:, :1], x, ops.flip(x, 2)),
    "select": lambda x: ops.select([x == x[:, :1], ops.flip(x, 2) == x], [ops.flip(x, 1), x],
                                   x[:, :1]),
    "diag": lambda x: ops.diag(x[0, 0]),
    "diagonal": lambda x: ops.diagonal(x, offset=1, axis1=1, axis2=2),
    "trace": lambda x: ops.trace(x, axis1=1, axis2=2),
    "segment_max": lambda x: ops.segment_max(x[0], np.array([0, 0, 2]), num_segments=4),
    "segment_min": lambda x: ops.segment_min(x[0], np.array([1, 1, 1]), num_segments=2),
}
DTYPES = ["bool", "int8", "int16", "uint16", "int32", "uint64"]


def _extreme_values(dtype, shape, rng):
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dtype)
    values = np.array([info.min, info.min + 1, 0, 1, 2, info.max - 1, info.max], dtype)
    return rng.choice(values, shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SELECTIONS))
def test_selections_of_every_integer_dtype(name, dtype, tmp_path):
    if name.startswith("segment") and dtype in ("bool", "uint64"):
        pytest.skip("refused by name: no exact onnxruntime reduction")
    model = _traced(SELECTIONS[name], (3, 3), dtype)
    session = _session(model, tmp_path)
    rng = np.random.default_rng(11)
    for batch in (1, 5):
        feed = _extreme_values(dtype, (batch, 3, 3), rng)
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        want = np.asarray(model(feed))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# --- tril / triu of bool and narrow integers --------------------------------------------
# A boolean causal mask (`tril` of a bool tensor) was a `Where` of bools, which
# onnxruntime has no kernel for: the graph did not load.

TRIANGLES = {
    "causal_mask": ("float32", lambda x: ops.where(
        ops.tril(ops.ones((ops.shape(x)[1], ops.shape(x)[1]), "bool")),
        ops.matmul(x, ops.transpose(x, (0, 2, 1))), -1e4)),
    "bool_scores": ("float32", lambda x: ops.cast(ops.triu(
        ops.matmul(x, ops.transpose(x, (0, 2, 1))) > 0.0, k=1), "float32")),
    "int16_upper": ("int16", lambda x: ops.triu(x, k=-1)),
    "uint16_lower": ("uint16", lambda x: ops.tril(x, k=1)),
}


@pytest.mark.parametrize("name", list(TRIANGLES))
def test_triangles_of_bool_and_narrow_integers(name, tmp_path):
    dtype, function = TRIANGLES[name]
    if dtype == "float32":
        _matches_at_other_sizes(_traced(function), tmp_path)
        return
    model = _traced(function, (None, 4), dtype)
    session = _session(model, tmp_path)
    rng = np.random.default_rng(12)
    for batch, size in ((1, 3), (5, 17), (2, 1)):
        feed = _extreme_values(dtype, (batch, size, 4), rng)
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        np.testing.assert_array_equal(got, np.asarray(model(feed)))


# --- float mod: the divisor's sign, exactly -------------------------------------------
# `x - floor(x / y) * y` lost the low digits of a large `x` (1e9 mod 7 gave 64, not 6);
# the remainder is now fmod's, moved by the divisor where its sign differs.

MODS = {
    "by_positive": lambda x: ops.mod(x, 3.0),
    "by_negative": lambda x: ops.mod(x, -2.5),
    "large": lambda x: ops.mod(x * 1e6, 7.0) + ops.mod(x * -3e5, -0.75),
    "by_tensor": lambda x: ops.mod(x * 1e4, ops.flip(x, 2)),
    "operator": lambda x: (x * 1e5) % ops.flip(-x, 1),
}


@pytest.mark.parametrize("name", list(MODS))
def test_float_mod_takes_the_divisor_sign(name, tmp_path):
    _matches_at_other_sizes(_traced(MODS[name]), tmp_path)


def test_tf_floormod_of_large_values(tmp_path):
    import tensorflow as tf
    import tf_keras

    x = tf_keras.Input((4,))
    model = tf_keras.Model(x, tf.math.floormod(x * 1e6, -7.0) + tf.math.floormod(x, 0.3))
    session = _session(model, tmp_path)
    rng = np.random.default_rng(13)
    for batch in (1, 5):
        feed = (rng.uniform(-1, 1, (batch, 4)) * 1e3).astype("float32")
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        np.testing.assert_allclose(got, np.asarray(model(feed)), rtol=1e-4, atol=1e-5)


# --- a zero Pad before a pooling ------------------------------------------------------
# A strided 1x1 convolution of a zero-padded image reads it through a 1x1
# AveragePool (`subsample`); onnxruntime's PadFusion moved the Pad into that
# pool's `pads`, as wide as its window, and the graph failed to load. An
# AveragePool after explicit zeros counts them: the fusion is blocked for both.


def _padded_pools():
    x = keras.Input((None, None, 3))
    padded = L.ZeroPadding2D(((1, 2), (0, 3)))(x)
    strided = L.Add()([L.Conv2D(8, 1, strides=2)(padded), L.Conv2D(8, 1, strides=2)(padded)])
    pooled = L.AveragePooling2D(3, strides=2)(L.ZeroPadding2D(1)(L.Conv2D(4, 1)(x)))
    return keras.Model(x, [strided, pooled])


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_zero_padding_before_poolings(opset, tmp_path):
    _matches_at_other_sizes(_padded_pools(), tmp_path, sizes=((1, 7), (5, 10), (2, 2)),
                            opset=opset)


# --- float16 graphs: ops onnxruntime has no float16 kernel for ----------------------
# IsInf (before opset 20), Celu, CumSum (before opset 14) and ScatterND with a
# reduction made `precision="float16"` graphs that failed to load or to run;
# they compute in float32 there, between casts.

HALVES = {
    # Infinities and NaN from whole numbers, 0 among them, alike in float32 and float16.
    "isinf": (13, lambda x: ops.where(ops.isinf(1.0 / x), -1.0, x)
              + ops.cast(ops.isposinf(1.0 / x), "float32")),
    "isfinite": (17, lambda x: ops.cast(ops.isfinite(ops.log(x)), "float32") * x),
    "nan_to_num": (17, lambda x: ops.nan_to_num(1.0 / x, posinf=7.0, neginf=-7.0)),
    "celu": (21, lambda x: ops.celu(x * 0.25, alpha=0.5) + L.Activation("celu")(x * 0.25)),
    "cumsum": (13, lambda x: ops.cumsum(x, axis=1) * 0.25),
    # Duplicate indices add up (a ScatterND with reduction "add").
    "scatter": (17, lambda x: x + ops.scatter([[0, 1], [0, 1], [2, 3]], x[0, 0, :3], (4, 4))),
}


@pytest.mark.parametrize("name", list(HALVES))
def test_float16_graphs_of_ops_without_float16_kernels(name, tmp_path):
    opset, function = HALVES[name]
    model = _traced(function, (4, 4))
    session = _session(model, tmp_path, precision="float16", opset=opset)
    rng = np.random.default_rng(14)
    for batch in (1, 5):
        feed = np.round(rng.uniform(-8, 8, (batch, 4, 4))).astype("float32")
        got = session.run(None, {session.get_inputs()[0].name: feed})[0]
        # float16's rounding: 1e-3 of each value.
        np.testing.assert_allclose(got, np.asarray(model(feed)), rtol=2e-3, atol=2e-3)


# --- onnxruntime's own gaps, left: one line under the check ---------------------------
# (int16 pad, maximum and cumsum and bool sort, once here, now run widened:
# tests/test_onnx_kernel_gaps.py. What no wider type holds exactly stays.)

GAPS = {
    "uint32_max": ("uint32", lambda x: ops.max(x, axis=1)),
    "uint32_min": ("uint32", lambda x: ops.min(x, axis=1)),
    "uint64_argmax": ("uint64", lambda x: ops.argmax(x, axis=1)),
}


@pytest.mark.parametrize("name", list(GAPS))
def test_ops_onnxruntime_cannot_load_fail_the_check_in_one_line(name, tmp_path):
    dtype, function = GAPS[name]
    with pytest.raises(ConversionError, match="onnxruntime cannot load") as error:
        export_onnx(_traced(function, (None, 4), dtype), tmp_path / "m.onnx", exporter="native")
    assert len(str(error.value).splitlines()) == 1
