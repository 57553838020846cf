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
"""

import contextlib
import functools

import numpy as np

from bnconvert.onnx import spectral
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

    replacements = {name: transform(name) for name in _TRANSFORMS}
    replacements["repeat"] = repeat
    for name, function in replacements.items():
        setattr(ops, name, function)
    try:
        yield
    finally:
        for name, function in original.items():
            setattr(ops, name, function)


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

    return type("Kinds", (), {"fft": transform("FFT", "fft"), "fft2": transform("FFT2", "fft2"),
                              "ifft2": transform("IFFT2", "ifft2"), "repeat": SizedRepeat})


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


EMITTERS = {"sized_repeat": _sized_repeat, **{k: spectral.EMITTERS[k] for k in _TRANSFORMS}}
