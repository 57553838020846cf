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
