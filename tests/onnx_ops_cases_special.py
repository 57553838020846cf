"""Conformance cases of the special-function, ordering and CTC emitters.

Merged into `onnx_ops_cases` (import that module, not this one); same
conventions: `KERAS` maps a case id to `fn(y)` for a `(batch, H, W, 6)`
tensor `y` of large values of both signs, `STATIC` lists the cases that
need a known spatial size, `tf_cases()` the tf-keras `TFOpLambda` forms.

`adaptive_*_pool` and `conv_transpose` are called inside a layer: Keras
3.15's symbolic form of these ops is wrong (rank 5 for a 2-D adaptive
pool; `ConvTranspose.call` passes its arguments to the backend in the
wrong order), so a Functional graph cannot hold the bare op, but a layer
calling it builds (Keras traces the layer's call on real tensors) and the
exporter traces the layer into the op.
"""

import keras
import numpy as np

from onnx_ops_cases import F
from onnx_ops_cases import _f
from onnx_ops_cases import _i
from onnx_ops_cases import _small
from onnx_ops_cases import _w

ops = keras.ops


class _Call(keras.layers.Layer):
    """`function(x)` inside a layer's call, with the output shape given."""

    def __init__(self, function, shape, **kwargs):
        super().__init__(**kwargs)
        self.function, self.shape = function, shape

    def call(self, x):
        return self.function(x)

    def compute_output_shape(self, input_shape):
        return self.shape(input_shape)


def _adaptive(op, size, data_format="channels_last"):
    def fn(y):
        x = y if data_format == "channels_last" else ops.transpose(y, (0, 3, 1, 2))
        if data_format == "channels_last":
            shape = lambda s: (s[0],) + size + (s[-1],)  # noqa: E731
        else:
            shape = lambda s: (s[0], s[1]) + size  # noqa: E731
        return _Call(lambda t: op(t, size, data_format=data_format), shape)(x)
    return fn


def _conv_transpose(kernel, strides, padding, output_padding=None):
    def fn(y):
        def shape(s):
            return keras.ops.conv_transpose(
                keras.KerasTensor(s), kernel, strides, padding, output_padding).shape
        return _Call(lambda t: ops.conv_transpose(t, kernel, strides, padding, output_padding,
                                                  "channels_last"), shape)(y)
    return fn


def _ctc(y):
    """Labels 1..5 (0 is the blank) of lengths 2-3 over 5-7 of the 7 time steps."""
    logits = y[:, :, 0, :] / 20.0
    target = _i(ops.argmax(y[:, :3, 1, :], axis=-1) % 5 + 1)
    target_length = _i(2.0 + _f(y[:, 0, 2, 0] > 0))
    output_length = _i(5.0 + _f(y[:, 1, 2, 0] > 0) + _f(y[:, 2, 2, 0] > 0))
    return ops.ctc_loss(target, logits, target_length, output_length)


KERAS = {
    "erfinv": lambda y: ops.erfinv(ops.round(y) / 256.0),
    "i0": lambda y: ops.i0(y / 40.0),
    "nextafter": lambda y: ops.nextafter(ops.round(_small(y)), ops.flip(y, 3)),
    "gcd": lambda y: _f(ops.gcd(_i(y), _i(ops.flip(y, 3)))),
    "lcm": lambda y: _f(ops.lcm(_i(y / 4.0), _i(ops.flip(y, 1) / 4.0))),
    "searchsorted": lambda y: _f(ops.searchsorted(np.array([-50.0, 0.0, 3.0, 80.0], F),
                                                  ops.reshape(y, (-1,)))),
    "searchsorted:right_in_graph": lambda y: _f(ops.searchsorted(
        ops.sort(ops.round(ops.mean(y, axis=[0, 1, 2]) / 10.0)),
        ops.round(ops.reshape(y, (-1,)) / 10.0), side="right")),
    "argpartition": lambda y: _f(ops.argpartition(y[:, 0, 0, :], 2)),
    "argpartition:1d": lambda y: _f(ops.argpartition(y[1, 1, 1, :], 4)),
    "ctc_loss": _ctc,
    "adaptive_average_pool": _adaptive(ops.adaptive_average_pool, (3, 2)),
    "adaptive_average_pool:channels_first": _adaptive(ops.adaptive_average_pool, (4, 3),
                                                      "channels_first"),
    "adaptive_max_pool": _adaptive(ops.adaptive_max_pool, (4, 2)),
    "conv_transpose": _conv_transpose(_w((3, 3, 4, 6)), 2, "same"),
    "conv_transpose:valid": _conv_transpose(_w((3, 2, 5, 6)), (2, 1), "valid", (1, 0)),
}
STATIC = {"ctc_loss", "adaptive_average_pool", "adaptive_average_pool:channels_first",
          "adaptive_max_pool", "conv_transpose:valid"}
MIN_OPSET = {}


def tf_cases():
    import tensorflow as tf

    return {
        "erfinv": lambda y: tf.math.erfinv(tf.round(y) / 256.0),
        "i0": lambda y: tf.math.bessel_i0(y / 40.0),
        "nextafter": lambda y: tf.math.nextafter(tf.round(y / 40.0), y),
        "searchsorted": lambda y: tf.cast(tf.searchsorted(
            tf.constant([-50.0, 0.0, 3.0, 80.0]), tf.reshape(y, [-1]), side="right"), tf.float32),
    }
