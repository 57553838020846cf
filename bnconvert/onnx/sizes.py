"""Sizes known only at run time, carried through a traced call as graph values.

A traced layer's `call` runs on symbolic tensors whose unknown dimensions
(batch, sequence length) are None. Text models compute with those sizes:
`ops.shape(x)[1]` as the bound of a slice of a position table, the stop
of an `ops.arange` for a causal mask, the target of `broadcast_to` or
`reshape`. With None there, the call fails, or would bake one length into
the graph.

Within `run_time_sizes()`, `keras.ops.shape` of a symbolic tensor gives a
scalar int32 tensor (a `RunTimeSize` op: ONNX `Shape` + `Gather`) for each
unknown dimension, so Python arithmetic on it is recorded like any op; and
the `keras.ops` functions that take sizes as Python numbers (`slice`,
`broadcast_to`, `reshape`, `arange`, `ones`, `zeros`, `full`, `pad`, `one_hot`,
`eye`) record an op of this module when a size among their arguments is such
a tensor. Their
emitters build the ONNX shape or bounds from the graph's values, so the
exported graph accepts any length. Code that branches on a size in Python
(`if length > n`) still fails, and its layer stays uncovered.

The walk traces a layer this way only after a plain trace has failed, so
that layers which already export keep their graphs.
"""

import contextlib
import functools

import numpy as np
from onnx import numpy_helper

from bnconvert.onnx.bounds import shape_tensor
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.indexing import get_item
from bnconvert.onnx.math import as_value
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype
from bnconvert.onnx.reshaping import pad

_REST = 2 ** 62
_PATCHED = ("shape", "slice", "broadcast_to", "reshape", "arange", "ones", "zeros", "full", "pad",
            "one_hot", "eye")


@contextlib.contextmanager
def run_time_sizes(keras):
    """Within: `keras.ops` gives and takes unknown sizes as symbolic scalars (Keras 3 only)."""
    ops = getattr(keras, "ops", None)
    if ops is None or not hasattr(keras, "Operation"):
        yield False
        return
    kinds = _kinds(keras)
    original = {name: getattr(ops, name) for name in _PATCHED}
    replacements = _replacements(keras, kinds, original)
    for name, function in replacements.items():
        setattr(ops, name, function)
    # A variable indexed by numbers first (`table[::-1][:n]`) is a backend tensor.
    import tensorflow as tf

    indexed = {c: c.__getitem__ for c in (keras.KerasTensor, keras.Variable, tf.Tensor)}
    for cls, own in indexed.items():
        cls.__getitem__ = _sized_indexing(keras, kinds, own)
    try:
        yield True
    finally:
        for name, function in original.items():
            setattr(ops, name, function)
        for cls, own in indexed.items():
            cls.__getitem__ = own


def _sized_indexing(keras, kinds, own):
    """`x[key]` recording `SizedGetItem` where a slice bound is a run-time size.

    Keras records such a key as it is; a size hidden in a `slice` is then
    no input of the op, and a variable's own indexing refuses it outright.
    The key is recorded with its slices as dicts (tf-keras's form, which
    `indexing` reads), so its sizes are inputs like any other.
    """
    def getitem(self, key):
        entries = key if isinstance(key, tuple) else (key,)
        bounds = [v for k in entries if isinstance(k, slice) for v in (k.start, k.stop, k.step)]
        if not _sized(keras, bounds):
            return own(self, key)
        encoded = tuple({"start": k.start, "stop": k.stop, "step": k.step}
                        if isinstance(k, slice) else k for k in entries)
        return kinds.SizedGetItem()(self.value if isinstance(self, keras.Variable) else self,
                                    encoded)
    return getitem


def _sized(keras, *values):
    """Whether a run-time size (a symbolic tensor) is among `values` (nested)."""
    return any(keras.backend.is_keras_tensor(v) for v in keras.tree.flatten(values))


def _replacements(keras, kinds, original):
    is_symbolic = keras.backend.is_keras_tensor

    def shape(x):
        dims = original["shape"](x)
        if not is_symbolic(x) or None not in dims:
            return dims
        return tuple(kinds.RunTimeSize(axis=i)(x) if d is None else d
                     for i, d in enumerate(dims))

    def slice_(inputs, start_indices, shape):
        # A tensor of starts is Keras's own case; sizes are numbers in a sequence.
        if is_symbolic(start_indices) or not _sized(keras, start_indices, shape):
            return original["slice"](inputs, start_indices, shape)
        return kinds.SizedSlice()(inputs, tuple(start_indices), tuple(shape))

    def broadcast_to(x, shape):
        if is_symbolic(shape) or not _sized(keras, shape):
            return original["broadcast_to"](x, shape)
        return kinds.SizedBroadcastTo()(x, tuple(shape))

    def reshape(x, newshape):
        if is_symbolic(newshape) or not _sized(keras, newshape):
            return original["reshape"](x, newshape)
        return kinds.SizedReshape()(x, tuple(newshape))

    def arange(start, stop=None, step=None, dtype=None):
        if not _sized(keras, start, stop, step):
            return original["arange"](start, stop, step, dtype=dtype)
        if stop is None:
            start, stop = 0, start
        return kinds.SizedArange(dtype=dtype)(start, stop, 1 if step is None else step)

    def filled(name, fill):
        def function(shape, dtype=None):
            if is_symbolic(shape) or not _sized(keras, shape):
                return original[name](shape, dtype=dtype)
            return kinds.SizedFull(dtype=dtype or keras.backend.floatx(), fill=fill)(tuple(shape))
        return function

    def full(shape, fill_value, dtype=None):
        if is_symbolic(shape) or not _sized(keras, shape) or _sized(keras, fill_value):
            return original["full"](shape, fill_value, dtype=dtype)
        fill = float(np.asarray(fill_value))
        return kinds.SizedFull(dtype=dtype or keras.backend.floatx(), fill=fill)(tuple(shape))

    def pad(x, pad_width, mode="constant", constant_values=None):
        if is_symbolic(pad_width) or not _sized(keras, pad_width):
            return original["pad"](x, pad_width, mode=mode, constant_values=constant_values)
        widths = tuple(tuple(w) if isinstance(w, (list, tuple)) else w for w in pad_width)
        return kinds.SizedPad(mode, constant_values)(x, widths)

    def one_hot(x, num_classes, axis=-1, dtype=None, sparse=False):
        if sparse or not _sized(keras, num_classes):
            return original["one_hot"](x, num_classes, axis=axis, dtype=dtype, sparse=sparse)
        return kinds.SizedOneHot(axis, dtype or keras.backend.floatx())(x, num_classes)

    def eye(N, M=None, k=0, dtype=None):  # noqa: N803 - Keras's argument names
        if not _sized(keras, N, M, k):
            return original["eye"](N, M, k, dtype=dtype)
        return kinds.SizedEye(dtype or keras.backend.floatx())(N, N if M is None else M, k)

    return {"shape": shape, "slice": slice_, "broadcast_to": broadcast_to, "reshape": reshape,
            "arange": arange, "ones": filled("ones", 1.0), "zeros": filled("zeros", 0.0),
            "full": full, "pad": pad, "one_hot": one_hot, "eye": eye}


@functools.lru_cache(maxsize=None)
def _kinds(keras):
    """The op classes recorded, defined once per Keras module (they subclass its Operation)."""
    is_symbolic = keras.backend.is_keras_tensor

    def dims(shape):
        return [None if is_symbolic(d) or d is None or int(d) < 0 else int(d) for d in shape]

    class RunTimeSize(keras.Operation):
        def __init__(self, axis, name=None):
            super().__init__(name=name)
            self.axis = axis

        def call(self, x):
            return keras.ops.shape(x)[self.axis]

        def compute_output_spec(self, x):
            return keras.KerasTensor((), dtype="int32")

    class SizedSlice(keras.Operation):
        def call(self, inputs, start_indices, shape):
            return keras.ops.slice(inputs, start_indices, shape)

        def compute_output_spec(self, inputs, start_indices, shape):
            return keras.KerasTensor(dims(shape), dtype=inputs.dtype)

    class SizedBroadcastTo(keras.Operation):
        def call(self, x, shape):
            return keras.ops.broadcast_to(x, shape)

        def compute_output_spec(self, x, shape):
            return keras.KerasTensor(dims(shape), dtype=x.dtype)

    class SizedReshape(keras.Operation):
        def call(self, x, newshape):
            return keras.ops.reshape(x, newshape)

        def compute_output_spec(self, x, newshape):
            return keras.KerasTensor(dims(newshape), dtype=x.dtype)

    class SizedArange(keras.Operation):
        def __init__(self, dtype=None, name=None):
            super().__init__(name=name)
            self.dtype = dtype

        def call(self, start, stop, step):
            return keras.ops.arange(start, stop, step, dtype=self.dtype)

        def compute_output_spec(self, start, stop, step):
            dtype = self.dtype or keras.backend.result_type(
                *(getattr(v, "dtype", type(v)) for v in (start, stop, step)))
            return keras.KerasTensor((None,), dtype=dtype)

    class SizedFull(keras.Operation):
        def __init__(self, dtype, fill, name=None):
            super().__init__(name=name)
            self.dtype = dtype
            self.fill = fill

        def call(self, shape):
            return keras.ops.full(shape, self.fill, dtype=self.dtype)

        def compute_output_spec(self, shape):
            return keras.KerasTensor(dims(shape), dtype=self.dtype)

    class SizedGetItem(keras.Operation):
        def call(self, x, key):
            return x[_decoded(key)]

        def compute_output_spec(self, x, key):
            return keras.KerasTensor(_indexed_shape(keras, tuple(x.shape), _decoded(key)),
                                     dtype=x.dtype)

    class SizedPad(keras.Operation):
        def __init__(self, mode, constant_values, name=None):
            super().__init__(name=name)
            self.mode, self.constant_values = mode, constant_values

        def call(self, x, pad_width):
            return keras.ops.pad(x, pad_width, self.mode, self.constant_values)

        def compute_output_spec(self, x, pad_width):
            pairs = list(pad_width) * (len(x.shape) if len(pad_width) == 1 else 1)
            shape = [None if d is None or _sized(keras, w) else d + sum(w)
                     for d, w in zip(x.shape, pairs)]
            return keras.KerasTensor(shape, dtype=x.dtype)

    class SizedOneHot(keras.Operation):
        def __init__(self, axis, dtype, name=None):
            super().__init__(name=name)
            self.axis, self.dtype = axis, dtype

        def call(self, x, num_classes):
            return keras.ops.one_hot(x, num_classes, axis=self.axis, dtype=self.dtype)

        def compute_output_spec(self, x, num_classes):
            shape = list(x.shape)
            shape.insert(self.axis % (len(shape) + 1), None)
            return keras.KerasTensor(shape, dtype=self.dtype)

    class SizedEye(keras.Operation):
        def __init__(self, dtype, name=None):
            super().__init__(name=name)
            self.dtype = dtype

        def call(self, rows, columns, k):
            return keras.ops.eye(rows, columns, k, dtype=self.dtype)

        def compute_output_spec(self, rows, columns, k):
            return keras.KerasTensor(dims((rows, columns)), dtype=self.dtype)

    return type("Kinds", (), {k.__name__: k for k in (
        RunTimeSize, SizedSlice, SizedBroadcastTo, SizedReshape, SizedArange, SizedFull,
        SizedGetItem, SizedPad, SizedOneHot, SizedEye)})


def _indexed_shape(keras, shape, key):
    """The shape of `x[key]` for `x` of `shape`: unknown where a bound is a run-time size."""
    key = list(key)
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key[i:i + 1] = [slice(None)] * (len(shape) - sum(k is not None for k in key) + 1)
    out, axis = [], 0
    for k in key:
        if k is None:
            out.append(1)
            continue
        dim, axis = shape[axis], axis + 1
        if isinstance(k, slice):
            bounds = (k.start, k.stop, k.step)
            out.append(None if dim is None or _sized(keras, bounds)
                       else len(range(*k.indices(dim))))
    return tuple(out) + shape[axis:]


def _decoded(key):
    return tuple(slice(k["start"], k["stop"], k["step"]) if isinstance(k, dict) else k
                 for k in key)


def _scalar(g, call, value, dtype):
    """A 0-d value of `dtype`: a run-time size (cast) or a number (a `Constant`)."""
    if isinstance(value, Value):
        if value.rank:
            raise Uncovered([(call.base, type(call.layer).__name__, "a size that is not a scalar")])
        # Arithmetic on a size may leave it of shape [1] in the graph (numbers are 1-D there).
        value = cast(g, value, dtype_of(call, value), dtype, call.base)
        return g.node("Reshape", [value.name, g.ints(np.zeros(0, np.int64))], call.base)
    array = np.asarray(constant(value), dtype=dtype)
    if array.ndim:
        raise Uncovered([(call.base, type(call.layer).__name__, "a size that is not a scalar")])
    return g.node("Constant", [], call.base, value=numpy_helper.from_array(array))


def _run_time_size(g, call, p):
    x = p["x"]
    shape = g.node("Shape", [x.name], call.base)
    index = g.node("Constant", [], call.base, value=numpy_helper.from_array(
        np.array(x.physical(p["axis"]), np.int64)))
    size = g.node("Gather", [shape, index], call.base, axis=0)
    return [call.out(cast(g, Value(size, (), ()), "int64", out_dtype(call), call.base).name)]


def _sized_slice(g, call, p):
    x = as_value(g, p["inputs"], call.base)
    starts, sizes = list(p["start_indices"]), list(p["shape"])
    if len(starts) != x.rank or len(sizes) != x.rank:
        raise Uncovered([(call.base, "Slice", "bounds of another rank than the tensor")])
    # A size of -1 takes the rest of the axis: a size beyond any axis, which Slice clamps.
    sizes = [n if isinstance(n, Value) or int(constant(n)) >= 0 else _REST for n in sizes]
    begin = shape_tensor(g, call, starts)
    stop = g.node("Add", [begin, shape_tensor(g, call, sizes)], call.base)
    return [call.out(g.node("Slice", [x.name, begin, stop], call.base))]


def _sized_broadcast_to(g, call, p):
    x = as_value(g, p["x"], call.base)
    return [call.out(g.node("Expand", [x.name, shape_tensor(g, call, p["shape"])], call.base))]


def _sized_reshape(g, call, p):
    x = as_value(g, p["x"], call.base)
    # A run-time size of 0 (an empty sequence) means 0, not "copy x's", from opset 14 on.
    zero = {"allowzero": 1} if g.opset >= 14 else {}
    return [call.out(g.node("Reshape", [x.name, shape_tensor(g, call, p["newshape"])],
                            call.base, **zero))]


def _sized_arange(g, call, p):
    dtype = out_dtype(call)
    if dtype not in ("float32", "float64", "int16", "int32", "int64"):
        raise Uncovered([(call.base, "Arange", f"dtype {dtype}")])
    bounds = [_scalar(g, call, p[k], dtype) for k in ("start", "stop", "step")]
    return [call.out(g.node("Range", bounds, call.base))]


def _sized_full(g, call, p):
    fill = numpy_helper.from_array(np.array([p["fill"]], np.dtype(out_dtype(call))))
    return [call.out(g.node("ConstantOfShape", [shape_tensor(g, call, p["shape"])], call.base,
                            value=fill))]


def _sized_pad(g, call, p):
    x = as_value(g, p["x"], call.base)
    return pad(g, call, dict(p, x=x, mode=call.layer.mode,
                             constant_values=call.layer.constant_values))


def _range_to(g, call, stop):
    """`range(stop)` in int64, `stop` a run-time size or a number."""
    bounds = [_scalar(g, call, v, "int64") for v in (0, stop, 1)]
    return g.node("Range", bounds, call.base)


def _sized_one_hot(g, call, p):
    """`indices[..., None] == range(n)` (out-of-range indices give zeros), `n` at run time."""
    x = g.keras(p["x"])
    axis = call.layer.axis % (x.rank + 1)
    classes = g.node("Unsqueeze", [_range_to(g, call, p["num_classes"]), g.ints(
        [a for a in range(x.rank + 1) if a != axis], "axes")], call.base)
    index = cast(g, x, dtype_of(call, x), "int64", call.base)
    expanded = g.node("Unsqueeze", [index.name, g.ints([axis], "axes")], call.base)
    hit = g.node("Equal", [expanded, classes], call.base)
    return [call.out(g.node("Cast", [hit], call.base, to=onnx_dtype(out_dtype(call))))]


def _sized_eye(g, call, p):
    """Ones where `column - row == k`, for sizes known at run time."""
    rows = g.node("Unsqueeze", [_range_to(g, call, p["rows"]), g.ints([1], "axes")], call.base)
    offset = g.node("Sub", [_range_to(g, call, p["columns"]), rows], call.base)
    hit = g.node("Equal", [offset, _scalar(g, call, p["k"], "int64")], call.base)
    return [call.out(g.node("Cast", [hit], call.base, to=onnx_dtype(out_dtype(call))))]


EMITTERS = {
    "sized_one_hot": _sized_one_hot, "sized_eye": _sized_eye, "sized_pad": _sized_pad,
    "run_time_size": _run_time_size, "sized_slice": _sized_slice,
    "sized_broadcast_to": _sized_broadcast_to, "sized_reshape": _sized_reshape,
    "sized_arange": _sized_arange, "sized_full": _sized_full, "sized_get_item": get_item,
}
