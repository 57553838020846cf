"""`keras.ops` indexing as ONNX: `x[key]`, slice, take, flips, rolls, sorts.

Emitters are `emit(g, call, p)` as in `math`. `x[key]` with only slices
(steps and negative bounds allowed) and an ellipsis keeps the value's
layout and slices its physical axes; integer indices and `None` (new axes)
work in the Keras layout. Bounds follow Python: ONNX `Slice` clamps them
the same way, with `INT64_MIN`/`INT64_MAX` standing for an omitted bound.
"""

import numpy as np
from onnx import numpy_helper

from bnconvert.onnx.bounds import shape_tensor
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import keras_axes
from bnconvert.onnx.math import as_value
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype
from bnconvert.onnx.math import select

_MAX = np.iinfo(np.int64).max
_MIN = np.iinfo(np.int64).min


def _index(value, what, call):
    # A slice bound may be a size known only at run time (`x[:ops.shape(y)[1]]`).
    if isinstance(value, Value) and what == "bound" and value.shape in ((), (1,)):
        return value
    if isinstance(value, Value) or hasattr(value, "shape") and np.ndim(constant(value)):
        raise Uncovered([(call.base, "GetItem", f"a tensor {what}")])
    return None if value is None else int(constant(value))


def _key(call, key, rank):
    """`key` as a list of per-axis entries: slices, ints and `None` (new axis)."""
    key = list(key) if isinstance(key, (tuple, list)) else [key]
    # tf-keras's SlicingOpLambda records each slice as a dict.
    key = [slice(k["start"], k["stop"], k["step"]) if isinstance(k, dict) and set(k) == {
        "start", "stop", "step"} else k for k in key]
    used = sum(1 for k in key if k is not None and k is not Ellipsis)
    if key.count(Ellipsis) > 1 or used > rank:
        raise Uncovered([(call.base, "GetItem", "an invalid key")])
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key[i:i + 1] = [slice(None)] * (rank - used)
    key += [slice(None)] * (rank - sum(1 for k in key if k is not None))
    out = []
    for k in key:
        if isinstance(k, slice):
            out.append(slice(_index(k.start, "bound", call), _index(k.stop, "bound", call),
                             _index(k.step, "step", call)))
        elif k is None:
            out.append(None)
        else:
            out.append(_index(k, "index", call))
    return out


def _slice(g, x, starts, ends, axes, steps, base, call=None):
    if not axes:
        return x.name
    bounds = [shape_tensor(g, call, b) if any(isinstance(v, Value) for v in b)
              else g.ints(b, name) for b, name in ((starts, "starts"), (ends, "ends"))]
    return g.node("Slice", [x.name, *bounds, g.ints(axes, "axes"), g.ints(steps, "steps")],
                  base)


def get_item(g, call, p):
    """`x[key]`: slices with steps, negative indices, ints, `None`, `...`."""
    # A layer's variable sliced by a run-time size (`sizes.run_time_sizes`) is concrete.
    x = p["x"] if isinstance(p["x"], Value) else as_value(g, p["x"], call.base)
    key = _key(call, p["key"], x.rank)
    plain = all(isinstance(k, slice) for k in key)
    if not plain:
        x = g.keras(x)
    starts, ends, axes, steps, drop, new = [], [], [], [], [], []
    axis = position = 0  # the input axis, the output axis
    for k in key:
        if k is None:
            new.append(position)
            position += 1
            continue
        if isinstance(k, slice):
            step = 1 if k.step is None else k.step
            if step == 0:
                raise Uncovered([(call.base, "GetItem", "a zero step")])
            if (k.start, k.stop, step) != (None, None, 1):
                start = k.start if k.start is not None else (0 if step > 0 else _MAX)
                stop = k.stop if k.stop is not None else (_MAX if step > 0 else _MIN)
                starts, ends, steps = starts + [start], ends + [stop], steps + [step]
                axes.append(x.physical(axis))
            position += 1
        else:
            starts, ends, steps = starts + [k], ends + [k + 1 if k != -1 else _MAX], steps + [1]
            axes.append(axis)
            drop.append(axis)
        axis += 1
    name = _slice(g, x, starts, ends, axes, steps, call.base, call)
    if drop:
        name = g.node("Squeeze", [name, g.ints(drop, "axes")], call.base)
    if new:
        name = g.node("Unsqueeze", [name, g.ints(new, "axes")], call.base)
    return [call.out(name, x.perm if plain else None)]


def slice_(g, call, p):
    """`ops.slice(x, start_indices, shape)`: static starts and sizes."""
    x = p["inputs"]
    starts = [int(v) for v in constant(p["start_indices"]).reshape(-1)]
    sizes = [int(v) for v in p["shape"]]
    ends = [s + n if n >= 0 else _MAX for s, n in zip(starts, sizes)]
    axes = [x.physical(a) for a in range(x.rank)]
    return [call.out(_slice(g, x, starts, ends, axes, [1] * x.rank, call.base), x.perm)]


def _indices(g, call, indices):
    if isinstance(indices, Value):
        name, rank = g.keras(indices).name, indices.rank
    else:
        array = constant(indices).astype(np.int64)
        name, rank = g.constant(array, f"{call.base}/indices", np.int64), array.ndim
    if rank == 0:
        # A scalar index drops the axis; the graph holds numbers and sizes as [1].
        name = g.node("Reshape", [name, g.ints(np.zeros(0, np.int64))], call.base)
    return name, rank


def take(g, call, p):
    """`take(x, indices, axis)`: a `Gather` (negative indices count from the end)."""
    x = as_value(g, p["x"], call.base)  # a table may be a layer's variable
    axis = p.get("axis")
    if axis is None:
        x, axis = Value(g.node("Reshape", [x.name, g.ints([-1])], call.base), (None,), (0,)), 0
    indices, _ = _indices(g, call, p["indices"])
    axis = int(axis) % x.rank
    if _made_by(g, indices, "Range"):
        # onnxruntime rewrites a Gather of a Range into a Slice, which reads negative
        # indices as bounds (a stop of -1 as the last element): they are wrapped first.
        size = g.node("Gather", [g.node("Shape", [x.name], call.base), g.ints(axis)], call.base)
        dtype = dtype_of(call, p["indices"])
        size = cast(g, Value(size, (), ()), "int64", dtype, call.base).name
        indices = g.node("Mod", [indices, size], call.base)
    return [call.out(g.node("Gather", [x.name, indices], call.base, axis=axis))]


def _made_by(g, name, op_type):
    return any(name in node.output and node.op_type == op_type for node in reversed(g.nodes))


def take_along_axis(g, call, p):
    x, indices = g.keras(p["x"]), p["indices"]
    axis = p.get("axis")
    names, rank = _indices(g, call, indices)
    if axis is None or rank != x.rank:
        raise Uncovered([(call.base, "TakeAlongAxis", "axis=None or indices of another rank")])
    # GatherElements wants equal shapes but for `axis`: broadcast the rest.
    return [call.out(g.node("GatherElements", [x.name, names], call.base,
                            axis=int(axis) % x.rank))]


def flip(g, call, p):
    x = p["x"]
    axes = keras_axes(p.get("axis"), x.rank)
    n = len(axes)
    name = _slice(g, x, [-1] * n, [_MIN] * n, [x.physical(a) for a in axes], [-1] * n, call.base)
    return [call.out(name, x.perm)]


def roll(g, call, p):
    x = p["x"]
    shifts, axes = p["shift"], p.get("axis")
    if axes is None:
        raise Uncovered([(call.base, "Roll", "axis=None")])
    shifts = list(shifts) if isinstance(shifts, (list, tuple)) else [shifts]
    axes = list(axes) if isinstance(axes, (list, tuple)) else [axes]
    name = x.name
    for shift, axis in zip(shifts * len(axes) if len(shifts) == 1 else shifts, axes):
        size, current, a = x.shape[int(axis)], Value(name, x.shape, x.perm), x.physical(int(axis))
        if size is None:
            # The split point `n - shift mod n`, for the axis's run-time size n.
            n = g.node("Gather", [g.node("Shape", [name], call.base), g.ints([a])], call.base,
                       axis=0)
            # (An empty axis divides by 1, not 0.)
            positive = g.node("Max", [n, g.ints([1])], call.base)
            cut = g.node("Sub", [n, g.node("Mod", [g.ints([int(shift)]), positive], call.base,
                                           fmod=0)], call.base)
            tail = g.node("Slice", [name, cut, g.ints([_MAX]), g.ints([a])], call.base)
            head = g.node("Slice", [name, g.ints([0]), cut, g.ints([a])], call.base)
            name = g.node("Concat", [tail, head], call.base, axis=a)
        elif int(shift) % size:
            k = int(shift) % size
            tail = _slice(g, current, [size - k], [_MAX], [a], [1], call.base)
            head = _slice(g, current, [0], [size - k], [a], [1], call.base)
            name = g.node("Concat", [tail, head], call.base, axis=a)
    return [call.out(name, x.perm)]


def _triangle(lower):
    """tril / triu over the last two Keras axes, as a `Where` with a mask.

    Selected through `select`: onnxruntime has no bool or int16 `Where`
    (a boolean causal mask `tril(ones(..., "bool"))` did not load).
    """
    def emit(g, call, p):
        x = g.keras(p["x"])
        rows, cols = x.shape[-2:]
        k = int(p.get("k", 0))
        if rows is None or cols is None:
            mask = _run_time_triangle(g, x, k, lower, call.base)
        else:
            mask = np.tri(rows, cols, k, dtype=bool) if lower \
                else ~np.tri(rows, cols, k - 1, dtype=bool)
            mask = g.constant(mask, f"{call.base}/mask", bool)
        dtype = dtype_of(call, x)
        zero = g.scalar(0, np.dtype(dtype))
        return [call.out(select(g, mask, x.name, zero, dtype, call.base))]
    return emit


def _run_time_triangle(g, x, k, lower, base):
    """The mask `j - i <= k` (lower) or `>= k` of `x`'s last two axes, sized at run time."""
    shape = g.node("Shape", [x.name], base)
    ranges = []
    for axis in (-2, -1):
        size = g.node("Reshape", [g.node("Gather", [shape, g.ints([axis])], base, axis=0),
                                  g.ints(np.zeros(0, np.int64))], base)
        ranges.append(g.node("Range", [g.scalar(0, np.int64), size, g.scalar(1, np.int64)], base))
    rows = g.node("Unsqueeze", [ranges[0], g.ints([1], "axes")], base)
    offset = g.node("Sub", [ranges[1], rows], base)  # [rows, cols]: j - i
    if lower:
        return g.node("LessOrEqual", [offset, g.scalar(k, np.int64)], base)
    return g.node("GreaterOrEqual", [offset, g.scalar(k, np.int64)], base)


def one_hot(g, call, p):
    """`one_hot`: `indices[..., None] == range(n)`, so out-of-range indices give zeros."""
    x = g.keras(p["x"])
    if p.get("sparse"):
        raise Uncovered([(call.base, "OneHot", "sparse=True")])
    n = int(p["num_classes"])
    axis = int(p.get("axis", -1)) % (x.rank + 1)
    index = cast(g, x, dtype_of(call, x), "int64", f"{call.base}/cast")
    shape = [1] * (x.rank + 1)
    shape[axis] = n
    classes = g.constant(np.arange(n).reshape(shape), f"{call.base}/classes", np.int64)
    expanded = g.node("Unsqueeze", [index.name, g.ints([axis], "axes")], call.base)
    hit = g.node("Equal", [expanded, classes], call.base)
    return [call.out(g.node("Cast", [hit], call.base, to=onnx_dtype(out_dtype(call))))]


def _top(g, call, x, k, axis, largest, base):
    """TopK of `k` along Keras `axis`; `k` None: the whole axis, sized at run time."""
    a = x.physical(axis)
    k = g.ints([k], "k") if k is not None else \
        g.node("Gather", [g.node("Shape", [x.name], base), g.ints([a])], base, axis=0)
    values, indices = g.node("TopK", [x.name, k], base, outputs=2, axis=a,
                             largest=int(largest), sorted=1)
    return values, indices


def top_k(g, call, p):
    x = p["x"]
    if not p.get("sorted", True):
        raise Uncovered([(call.base, "TopK", "sorted=False")])
    values, indices = _top(g, call, x, int(p["k"]), x.rank - 1, True, call.base)
    indices = cast(g, Value(indices, (), ()), "int64", out_dtype(call, 1), call.base).name
    return [call.out(values, x.perm), call.out(indices, x.perm, index=1)]


def _sort(indices):
    """sort / argsort (ascending) along one axis."""
    def emit(g, call, p):
        x = p["x"]
        axis = p.get("axis", -1)
        if axis is None:
            raise Uncovered([(call.base, "Sort", "axis=None")])
        axis = int(axis) % x.rank
        values, order = _top(g, call, x, x.shape[axis], axis, False, call.base)
        if not indices:
            return [call.out(values, x.perm)]
        order = cast(g, Value(order, (), ()), "int64", out_dtype(call), call.base).name
        return [call.out(order, x.perm)]
    return emit


def _filled(preset):
    """zeros_like / ones_like / full_like: `ConstantOfShape` of the input's shape."""
    def emit(g, call, p):
        x = p["x"]
        value = preset if preset is not None else p["fill_value"]
        if isinstance(value, Value) or np.ndim(constant(value)):
            raise Uncovered([(call.base, "FullLike", "a tensor fill value")])
        fill = numpy_helper.from_array(np.array([constant(value)], np.dtype(out_dtype(call))))
        shape = g.node("Shape", [x.name], call.base)
        name = g.node("ConstantOfShape", [shape], call.base, value=fill)
        return [call.out(name, x.perm)]
    return emit


def tf_shape(g, call, p):
    """tf-keras `tf.shape(x)`: x's run-time shape in Keras's axis order, as `out_type`."""
    x = g.keras(p["x"])
    shape = g.node("Shape", [x.name], call.base)
    return [call.out(cast(g, Value(shape, (x.rank,), (0,)), "int64", out_dtype(call),
                          call.base).name)]


EMITTERS = {
    "tf_shape": tf_shape,
    "get_item": get_item, "slice": slice_, "take": take, "take_along_axis": take_along_axis,
    "flip": flip, "roll": roll, "tril": _triangle(True), "triu": _triangle(False),
    "one_hot": one_hot, "top_k": top_k, "sort": _sort(False), "argsort": _sort(True),
    "zeros_like": _filled(0), "ones_like": _filled(1), "full_like": _filled(None),
    "fliplr": lambda g, call, p: flip(g, call, dict(p, axis=1)),
    "flipud": lambda g, call, p: flip(g, call, dict(p, axis=0)),
}
