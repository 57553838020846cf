"""`keras.ops` that Keras records only for static sizes, recorded for sizes known at run time.

Keras's symbolic ops need some sizes as numbers where its TensorFlow
backend computes with any: `fft`, `fft2` and `ifft2` refuse an axis of
unknown size (FNet mixes its tokens with `fft2` over the sequence), and
`repeat` takes its count's `len()` (DeBERTa-v3 repeats a row of positions
by the sequence length, a run-time size under `sizes.run_time_sizes`).
Within `ops_of_any_size(keras)` such a call records an op of this module
instead. The transforms keep the class names, arguments and results of
Keras's own, so `spectral`'s emitters translate them; those build the DFT
matrix of an axis of unknown size in the graph from its length. A repeat
by a run-time count is a `Tile` on a new axis, merged into the repeated one.
A `Resizing` layer made inside a call from `ops.shape` of an image of unknown
size (keras-hub DeepLabV3's pyramid pooling, resized back to its input) records
a `SizedResize` of that size, which the Resizing emitter takes from the graph.
"""

import contextlib
import dataclasses
import functools

import numpy as np

from bnconvert.onnx import nn
from bnconvert.onnx import preprocessing
from bnconvert.onnx import spectral
from bnconvert.onnx.graph import Value
from bnconvert.onnx.math import as_value
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import dtype_of

# function name -> the trailing axes it transforms
_TRANSFORMS = {"fft": 1, "fft2": 2, "ifft2": 2}


@contextlib.contextmanager
def ops_of_any_size(keras):
    """Within: fft, fft2, ifft2 of axes of unknown size, and repeat by a symbolic count, record."""
    ops = getattr(keras, "ops", None)
    if ops is None or not hasattr(keras, "Operation"):
        yield
        return
    kinds, is_symbolic = _kinds(keras), keras.backend.is_keras_tensor
    original = {name: getattr(ops, name) for name in (*_TRANSFORMS, "repeat")}

    def transform(name):
        def function(x):
            real = x[0] if isinstance(x, (tuple, list)) and len(x) == 2 else None
            if real is None or not is_symbolic(real) or len(real.shape) < _TRANSFORMS[name] \
                    or None not in tuple(real.shape)[-_TRANSFORMS[name]:]:
                return original[name](x)
            return getattr(kinds, name)()(tuple(x))
        return function

    def repeat(x, repeats, axis=None):
        if not is_symbolic(repeats) or len(repeats.shape) or not is_symbolic(x):
            return original["repeat"](x, repeats, axis=axis)
        return kinds.repeat(axis=axis)(x, repeats)

    resizing = keras.layers.Resizing
    resizing_call = resizing.__call__

    def resized(self, inputs, *args, **kwargs):
        sizes = (self.height, self.width)
        if not is_symbolic(inputs) or not any(is_symbolic(s) for s in sizes) \
                or self.crop_to_aspect_ratio or self.pad_to_aspect_ratio \
                or getattr(self, "antialias", False):
            return resizing_call(self, inputs, *args, **kwargs)
        return kinds.resize(self.interpolation, self.data_format)(inputs, *sizes)

    replacements = {name: transform(name) for name in _TRANSFORMS}
    replacements["repeat"] = repeat
    for name, function in replacements.items():
        setattr(ops, name, function)
    resizing.__call__ = resized
    try:
        yield
    finally:
        for name, function in original.items():
            setattr(ops, name, function)
        resizing.__call__ = resizing_call


@functools.lru_cache(maxsize=None)
def _kinds(keras):
    """The op classes, defined once per Keras module (they subclass its Operation)."""
    def transform(class_name, function):
        def call(self, x):
            return getattr(keras.ops, function)(x)

        def compute_output_spec(self, x):
            real, imag = x
            if tuple(real.shape) != tuple(imag.shape):
                raise ValueError(f"{function}: real and imaginary parts of different shapes")
            return tuple(keras.KerasTensor(t.shape, dtype=t.dtype) for t in (real, imag))

        return type(class_name, (keras.Operation,), {
            "call": call, "compute_output_spec": compute_output_spec, "__module__": __name__})

    class SizedRepeat(keras.Operation):
        def __init__(self, axis=None, name=None):
            super().__init__(name=name)
            self.axis = axis

        def call(self, x, repeats):
            return keras.ops.repeat(x, repeats, axis=self.axis)

        def compute_output_spec(self, x, repeats):
            shape = [None] if self.axis is None else list(x.shape)
            if self.axis is not None:
                shape[self.axis] = None
            return keras.KerasTensor(tuple(shape), dtype=x.dtype)

    class SizedResize(keras.Operation):
        def __init__(self, interpolation, data_format, name=None):
            super().__init__(name=name)
            self.interpolation, self.data_format = interpolation, data_format

        def call(self, x, height, width):
            return keras.ops.image.resize(x, (height, width), interpolation=self.interpolation,
                                          data_format=self.data_format)

        def compute_output_spec(self, x, height, width):
            shape = list(x.shape)
            for axis in (-3, -2) if self.data_format == "channels_last" else (-2, -1):
                shape[axis] = None
            return keras.KerasTensor(tuple(shape), dtype=keras.backend.floatx())

    return type("Kinds", (), {"fft": transform("FFT", "fft"), "fft2": transform("FFT2", "fft2"),
                              "ifft2": transform("IFFT2", "ifft2"), "repeat": SizedRepeat,
                              "resize": SizedResize})


def _sized_repeat(g, call, p):
    """Each element of `x` `repeats` times along `axis` (all of `x` flattened if None).

    A gather of positions `i // repeats` for `i` below `size * repeats`. (A
    `Tile` reshaped to the merged size broke on a count of 0, computed from
    a shape: `Reshape` reads a 0 in its shape as "keep this dimension".)
    """
    x, base = as_value(g, p["x"], call.base), call.base
    name, axis = x.name, p.get("axis")
    if axis is None:
        name, axis = g.node("Reshape", [name, g.ints([-1])], base), 0
    else:
        axis = int(axis) % x.rank
    count = cast(g, p["repeats"], dtype_of(call, p["repeats"]), "int64", base)
    count = g.node("Reshape", [count.name, g.ints(np.zeros(0, np.int64))], base)
    size = g.node("Gather", [g.node("Shape", [name], base), g.ints(axis, "axis")], base, axis=0)
    stop = g.node("Mul", [size, count], base)
    steps = g.node("Range", [g.ints(0, "start"), stop, g.ints(1, "step")], base)
    # A count of 0 leaves no step to divide, but onnxruntime refuses a zero divisor anyway.
    index = g.node("Div", [steps, g.node("Max", [count, g.ints(1, "one")], base)], base)
    return [call.out(g.node("Gather", [name, index], base, axis=axis))]


def _sized_resize(g, call, p):
    """A Resizing to a (height, width) of run-time sizes (graph values) or numbers."""
    base, sizes = call.base, []
    for size in (p["height"], p["width"]):
        size = cast(g, size, dtype_of(call, size), "int64", base) if isinstance(size, Value) \
            else as_value(g, np.asarray(size, np.int64), base)
        sizes.append(g.node("Reshape", [size.name, g.ints([1])], base))
    layer = nn.named_arguments(
        call, name=base, interpolation=p["interpolation"], data_format=p["data_format"],
        height=None, width=None, run_time_size=g.node("Concat", sizes, base, axis=0))
    return preprocessing.resizing(g, dataclasses.replace(call, layer=layer, inputs=[p["x"]]))


EMITTERS = {"sized_repeat": _sized_repeat, "sized_resize": _sized_resize,
            **{k: spectral.EMITTERS[k] for k in _TRANSFORMS}}
