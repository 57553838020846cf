"""`keras.ops` array constructions as ONNX: diag, kron, cross, isin, updates, quantiles.

Emitters are `emit(g, call, p)` as in `math`. They work in the Keras layout
and need the sizes they build from to be known (a `diag` of unknown length
is refused, not guessed). Quantiles sort the axis with `TopK` and
interpolate linearly between the two neighbours of `q * (n - 1)`, as
NumPy's default method does.
"""

import numpy as np
from onnx import helper

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.math import aligned
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype
from bnconvert.onnx.math import select
from bnconvert.onnx.reductions import quantile_axis


def _static(call, value, what):
    if any(d is None for d in value.shape):
        raise Uncovered([(call.base, what, "a size unknown when exporting")])


def _diag_1d(g, call, x, k):
    """A 1-D `x` on the `k`-th diagonal of a square matrix."""
    _static(call, x, "Diag")
    n = x.shape[0] + abs(k)
    # matrix[i, j] = x[min(i, j)] on the diagonal: gather rows, mask the rest.
    index = np.clip(np.arange(n) - abs(k), 0, x.shape[0] - 1)
    rows = g.node("Gather", [x.name, g.ints(index, "index")], call.base, axis=0)
    wide = g.node("Unsqueeze", [rows, g.ints([1 if k < 0 else 0], "axes")], call.base)
    mask = g.constant(np.eye(n, n, k, dtype=bool), f"{call.base}/eye", bool)
    zero = g.scalar(0, np.dtype(out_dtype(call)))
    return [call.out(select(g, mask, wide, zero, out_dtype(call), call.base))]


def diag(g, call, p):
    x, k = g.keras(p["x"]), int(p.get("k", 0))
    if x.rank == 1:
        return _diag_1d(g, call, x, k)
    from bnconvert.onnx import numpy_extra

    return numpy_extra.EMITTERS["diagonal"](g, call, {"x": x, "offset": k, "axis1": 0,
                                                      "axis2": 1})


def diagflat(g, call, p):
    x = g.keras(p["x"])
    _static(call, x, "Diagflat")
    flat = g.node("Reshape", [x.name, g.ints([-1])], call.base)
    return _diag_1d(g, call, Value(flat, (int(np.prod(x.shape)),), (0,)), int(p.get("k", 0)))


def kron(g, call, p):
    a, b = (g.keras(p[k]) for k in ("x1", "x2"))
    if a.rank != b.rank:
        raise Uncovered([(call.base, "Kron", "operands of different ranks")])
    _static(call, a, "Kron")
    _static(call, b, "Kron")
    left = "".join(chr(97 + i) for i in range(a.rank))
    right = "".join(chr(110 + i) for i in range(b.rank))
    out = "".join(x + y for x, y in zip(left, right))
    names, _ = aligned(g, call, [a, b], out_dtype(call))
    name = g.node("Einsum", names, call.base, equation=f"{left},{right}->{out}")
    shape = [x * y for x, y in zip(a.shape, b.shape)]
    return [call.out(g.node("Reshape", [name, g.ints(shape)], call.base))]


def cross(g, call, p):
    """The cross product of 3-vectors along the last axis."""
    if p.get("axis") not in (None, -1) or any(p.get(k, -1) != -1 for k in ("axisa", "axisb",
                                                                           "axisc")):
        raise Uncovered([(call.base, "Cross", "axes other than the last")])
    a, b = (g.keras(p[k]) for k in ("x1", "x2"))
    if a.shape[-1] != 3 or b.shape[-1] != 3:
        raise Uncovered([(call.base, "Cross", "vectors of length other than 3")])
    (a, b), ref = aligned(g, call, [a, b], out_dtype(call))

    def part(name, i):
        return g.node("Gather", [name, g.ints([i], "index")], call.base, axis=ref.rank - 1)

    terms = []
    for i, j in ((1, 2), (2, 0), (0, 1)):
        terms.append(g.node("Sub", [g.node("Mul", [part(a, i), part(b, j)], call.base),
                                    g.node("Mul", [part(a, j), part(b, i)], call.base)],
                            call.base))
    return [call.out(g.node("Concat", terms, call.base, axis=ref.rank - 1))]


def isin(g, call, p):
    x, values = p["x1"], p["x2"]
    if isinstance(values, Value):
        raise Uncovered([(call.base, "IsIn", "tested values computed in the graph")])
    dtype = dtype_of(call, x)
    table = np.unique(constant(values).reshape(-1)).astype(dtype)
    wide = g.node("Unsqueeze", [x.name, g.ints([-1], "axes")], call.base)
    hit = g.node("Equal", [wide, g.constant(table, f"{call.base}/values", table.dtype)],
                 call.base)
    hit = g.node("Cast", [hit], call.base, to=onnx_dtype("int32"))  # ReduceMax has no bool
    name = g.reduce("ReduceMax", hit, [x.rank], False, call.base)
    name = g.node("Cast", [name], call.base, to=onnx_dtype("bool"))
    if p.get("invert"):
        name = g.node("Not", [name], call.base)
    return [call.out(name, x.perm)]


_SCATTER_OPSET = {None: 13, "add": 16, "mul": 16, "max": 18, "min": 18}


def scatter_update(g, call, p):
    reduction = p.get("reduction")
    if reduction not in _SCATTER_OPSET:
        raise Uncovered([(call.base, "ScatterUpdate", f"reduction={reduction!r}")])
    if g.opset < _SCATTER_OPSET[reduction]:
        raise Uncovered([(call.base, "ScatterUpdate", f"reduction={reduction!r} needs opset "
                                                      f"{_SCATTER_OPSET[reduction]}")])
    x = g.keras(p["inputs"]) if isinstance(p["inputs"], Value) else p["inputs"]
    indices = p["indices"]
    indices = cast(g, g.keras(indices), dtype_of(call, indices), "int64", call.base).name \
        if isinstance(indices, Value) else g.ints(constant(indices), "indices")
    (updates,), _ = aligned(g, call, [p["updates"]], out_dtype(call)) if isinstance(
        p["updates"], Value) else ([g.constant(constant(p["updates"]), f"{call.base}/updates",
                                               np.dtype(out_dtype(call)))], None)
    name = g.node("ScatterND", [x.name, indices, updates], call.base, reduction=reduction)
    if out_dtype(call) == "float32":  # (no float16 ScatterND with a reduction)
        g.float32_data(name)
    return [call.out(name)]


def scatter(g, call, p):
    """Values summed into zeros at `indices` (duplicates add up, as in tf.scatter_nd)."""
    if g.opset < 16:
        raise Uncovered([(call.base, "Scatter", f"needs opset 16 (exporting {g.opset})")])
    dtype = np.dtype(out_dtype(call))
    fill = helper.make_tensor("zero", onnx_dtype(dtype), [1], [0])
    zeros = g.node("ConstantOfShape", [g.ints([int(d) for d in p["shape"]])], call.base,
                   value=fill)
    zeros = Value(zeros, tuple(p["shape"]), tuple(range(len(p["shape"]))))
    return scatter_update(g, call, {"inputs": zeros, "indices": p["indices"],
                                    "updates": p["values"], "reduction": "add"})


# The largest float16 and bfloat16 ((2 - 2**-7) * 2**127; NumPy has no bfloat16).
_NARROW_FLOAT_MAX = {"float16": float(np.finfo(np.float16).max),
                     "bfloat16": (2 - 2 ** -7) * 2 ** 127}


def _limits(keras_dtype, dtype):
    """`(lowest, highest)` of Keras's `keras_dtype`, held in the graph as `dtype`."""
    if keras_dtype in _NARROW_FLOAT_MAX:
        return -_NARROW_FLOAT_MAX[keras_dtype], _NARROW_FLOAT_MAX[keras_dtype]
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    return info.min, info.max


def _segment(op_type, empty):
    """segment_max / min / prod with constant ids: a masked reduction per segment.

    An empty segment holds `empty(lowest, highest)` of the data's Keras dtype
    (TensorFlow's lowest value for a max: -65504 for float16 data, which the
    graph holds as float32). onnxruntime reduces no integers narrower than
    32 bits: those are reduced as int32, exactly (a product wraps the same).
    Not uint32: onnxruntime 1.31's int64 `ReduceMin` returns 2**32 - 1
    whenever a row holds it.
    """
    def emit(g, call, p):
        ids, count = p["segment_ids"], p.get("num_segments")
        if isinstance(ids, Value) or count is None or p.get("sorted"):
            raise Uncovered([(call.base, op_type, "segment ids computed in the graph, sorted, "
                                                  "or no num_segments")])
        dtype = dtype_of(call, p["data"])
        if dtype in ("bool", "uint32", "uint64"):
            raise Uncovered([(call.base, op_type, f"dtype {dtype}")])
        fill = empty(*_limits(str(call.dtypes[0]) if call.dtypes else dtype, dtype))
        wide = dtype if dtype in ("float32", "float64", "int64") else "int32"
        ids = constant(ids).astype(np.int64).reshape(-1)
        data = cast(g, g.keras(p["data"]), dtype, wide, call.base)
        mask = np.arange(int(count))[:, None] == ids[None, :]
        mask = mask.reshape(mask.shape + (1,) * (data.rank - 1))
        stacked = g.node("Unsqueeze", [data.name, g.ints([0], "axes")], call.base)
        filled = g.node("Where", [g.constant(mask, f"{call.base}/segments", bool), stacked,
                                  g.scalar(fill, np.dtype(wide))], call.base)
        reduced = Value(g.reduce(op_type, filled, [1], False, call.base), (), ())
        return [call.out(cast(g, reduced, wide, dtype, call.base).name)]
    return emit


def slice_update(g, call, p):
    """`inputs` with a static-shaped block at static `start_indices` replaced.

    TensorFlow's `dynamic_update_slice` clamps each start to `[0, size -
    block]`, so the block always lies inside (a start of -1 is 0, not the
    last row); along an axis of unknown size the clamp is computed at run time.
    """
    x, updates = g.keras(p["inputs"]), p["updates"]
    shape = updates.shape if isinstance(updates, Value) else constant(updates).shape
    if any(d is None for d in shape) or isinstance(p["start_indices"], Value):
        raise Uncovered([(call.base, "SliceUpdate", "a block of unknown size or start")])
    starts = np.maximum(constant(p["start_indices"]).reshape(-1).astype(np.int64), 0)
    offsets = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    if None not in x.shape:
        starts = np.minimum(starts, np.array(x.shape) - np.array(shape))
        return scatter_update(g, call, {"inputs": x, "indices": offsets + starts,
                                        "updates": updates})
    last = g.node("Sub", [g.node("Shape", [x.name], call.base), g.ints(shape, "block")],
                  call.base)
    starts = g.node("Min", [g.ints(starts, "starts"), last], call.base)
    indices = g.node("Add", [g.ints(offsets, "offsets"), starts], call.base)
    return scatter_update(g, call, {"inputs": x, "indices": Value(
        indices, offsets.shape, tuple(range(offsets.ndim))), "updates": updates})


def extract_sequences(g, call, p):
    x = g.keras(p["x"])
    n, length, stride = x.shape[-1], int(p["sequence_length"]), int(p["sequence_stride"])
    if n is None:
        raise Uncovered([(call.base, "ExtractSequences", "an unknown length")])
    count = 1 + (n - length) // stride
    index = np.arange(count)[:, None] * stride + np.arange(length)[None, :]
    return [call.out(g.node("Gather", [x.name, g.ints(index, "index")], call.base,
                            axis=x.rank - 1))]


def _quantile(scale):
    def emit(g, call, p):
        x = g.keras(p["x"])
        q = constant(p.get("q", 0.5)) / scale
        axis, n = quantile_axis(call, p, x, "Quantile", several_q=bool(np.ndim(q)))
        ordered, _ = g.node("TopK", [x.name, g.ints([n], "k")], call.base, outputs=2, axis=axis,
                            largest=0, sorted=1)
        position = float(q) * (n - 1)
        low, high = int(np.floor(position)), int(np.ceil(position))
        pick = [g.node("Squeeze", [g.node("Gather", [ordered, g.ints([i], "index")], call.base,
                                          axis=axis), g.ints([axis], "axes")], call.base)
                for i in (low, high)]
        gap = g.node("Sub", [pick[1], pick[0]], call.base)
        name = g.node("Add", [pick[0], g.node("Mul", [gap, g.scalar(position - low)], call.base)],
                      call.base)
        if p.get("keepdims"):
            name = g.node("Unsqueeze", [name, g.ints([axis], "axes")], call.base)
        return [call.out(name)]
    return emit


def cdist(g, call, p):
    """Euclidean distances between the rows of `x` and `y` (last axis: features)."""
    x, y = g.keras(p["x"]), g.keras(p["y"])
    (a, b), _ = aligned(g, call, [x, y], out_dtype(call))
    a = g.node("Unsqueeze", [a, g.ints([x.rank - 1], "axes")], call.base)
    b = g.node("Unsqueeze", [b, g.ints([y.rank - 2], "axes")], call.base)
    d = g.node("Sub", [a, b], call.base)
    total = g.reduce("ReduceSum", g.node("Mul", [d, d], call.base), [x.rank], False, call.base)
    return [call.out(g.node("Sqrt", [total], call.base))]


def logaddexp2(g, call, p):
    """max + log2(1 + 2^-|a - b|)."""
    (a, b), ref = aligned(g, call, [p["x1"], p["x2"]], out_dtype(call))
    gap = g.node("Neg", [g.node("Abs", [g.node("Sub", [a, b], call.base)], call.base)], call.base)
    power = g.node("Pow", [g.scalar(2.0), gap], call.base)
    soft = g.node("Log", [g.node("Add", [power, g.scalar(1.0)], call.base)], call.base)
    soft = g.node("Mul", [soft, g.scalar(1.0 / np.log(2.0))], call.base)
    return [call.out(g.node("Add", [g.node("Max", [a, b], call.base), soft], call.base),
                     ref.perm)]


def ldexp(g, call, p):
    (a, e), ref = aligned(g, call, [p["x1"], p["x2"]], out_dtype(call))
    power = g.node("Pow", [g.scalar(2.0, np.dtype(out_dtype(call))), e], call.base)
    return [call.out(g.node("Mul", [a, power], call.base), ref.perm)]


def det(g, call, p):
    x = g.keras(p["x"])
    return [call.out(g.node("Det", [x.name], call.base))]


def slogdet(g, call, p):
    """(sign, log|det|) of the last two axes."""
    x = g.keras(p["x"])
    value = g.node("Det", [x.name], call.base)
    return [call.out(g.node("Sign", [value], call.base)),
            call.out(g.node("Log", [g.node("Abs", [value], call.base)], call.base), index=1)]


def meshgrid(g, call, p):
    xs = [g.keras(x) for x in p["x"]]
    lengths = [x.shape[0] for x in xs]
    if any(x.rank != 1 for x in xs) or None in lengths:
        raise Uncovered([(call.base, "Meshgrid", "inputs not 1-D of known length")])
    order = list(range(len(xs)))
    if p.get("indexing", "xy") == "xy" and len(xs) > 1:
        order[0], order[1] = 1, 0  # "xy": the first input varies along axis 1
    full = [lengths[order.index(i)] for i in range(len(xs))]
    outs = []
    for i, x in enumerate(xs):
        shape = [1] * len(xs)
        shape[order[i]] = lengths[i]
        wide = g.node("Reshape", [x.name, g.ints(shape)], call.base)
        outs.append(call.out(g.node("Expand", [wide, g.ints(full)], call.base), index=i))
    return outs


def sparsemax(g, call, p):
    """Keras's sparsemax: its support test and threshold, along a last axis of known size."""
    x = g.keras(p["x"])
    axis = int(p.get("axis", -1)) % x.rank
    n = x.shape[axis]
    if n is None:
        raise Uncovered([(call.base, "Sparsemax", "an axis of unknown size")])
    ordered, _ = g.node("TopK", [x.name, g.ints([n], "k")], call.base, outputs=2, axis=axis)
    total = g.float32_data(g.node("CumSum", [ordered, g.ints(axis, "axis")], call.base))
    shape = [1] * x.rank
    shape[axis] = n
    ranks = g.constant(np.arange(1, n + 1, dtype=np.float32).reshape(shape), f"{call.base}/r")
    support = g.node("Greater", [g.node("Sub", [ordered, g.node("Div", [g.node(
        "Sub", [total, g.scalar(1.0)], call.base), ranks], call.base)], call.base),
        g.scalar(0.0)], call.base)
    k = g.reduce("ReduceSum", g.node("Cast", [support], call.base, to=onnx_dtype("float32")),
                 [axis], True, call.base)
    kept = g.node("Where", [support, total, g.scalar(0.0)], call.base)
    tau = g.node("Div", [g.node("Sub", [g.reduce("ReduceSum", kept, [axis], True, call.base),
                                        g.scalar(1.0)], call.base), k], call.base)
    name = g.node("Max", [g.node("Sub", [x.name, tau], call.base), g.scalar(0.0)], call.base)
    return [call.out(name)]


def segment_sum(g, call, p):
    """A sum per segment with constant ids: one-hot(ids)^T @ data."""
    ids, count = p["segment_ids"], p.get("num_segments")
    if isinstance(ids, Value) or count is None:
        raise Uncovered([(call.base, "SegmentSum", "segment ids computed in the graph or no "
                                                   "num_segments")])
    ids = constant(ids).astype(np.int64).reshape(-1)
    data = g.keras(p["data"])
    hot = (np.arange(int(count))[:, None] == ids[None, :]).astype(np.dtype(out_dtype(call)))
    flat = g.node("Reshape", [data.name, g.ints([len(ids), -1])], call.base)
    summed = g.node("MatMul", [g.constant(hot, f"{call.base}/segments", hot.dtype), flat],
                    call.base)
    shape = [int(count)] + [-1 if d is None else int(d) for d in data.shape[1:]]
    return [call.out(g.node("Reshape", [summed, g.ints(shape)], call.base))]


def _count_against(g, call, x, table, op_type):
    """How many entries `t` of the constant 1-D `table` satisfy `op_type(t, x)`, per element."""
    x_dtype = dtype_of(call, x)
    table = constant(table).astype(x_dtype).reshape(-1)
    wide = g.node("Unsqueeze", [x.name, g.ints([-1], "axes")], call.base)
    hits = g.node(op_type, [g.constant(table, f"{call.base}/table", table.dtype), wide], call.base)
    hits = g.node("Cast", [hits], call.base, to=onnx_dtype("int64"))
    count = g.reduce("ReduceSum", hits, [x.rank], False, call.base)
    return [call.out(cast(g, Value(count, (), ()), "int64", out_dtype(call), call.base).name,
                     x.perm)]


def digitize(g, call, p):
    """The bin of each value: how many (increasing, constant) bin edges are <= it."""
    bins = p["bins"]
    if isinstance(bins, Value) or np.any(np.diff(constant(bins)) < 0):
        raise Uncovered([(call.base, "Digitize", "bins computed in the graph or decreasing")])
    return _count_against(g, call, p["x"], bins, "LessOrEqual")


def unravel_index(g, call, p):
    x = p["indices"]
    shape = [int(d) for d in p["shape"]]
    flat = cast(g, x, dtype_of(call, x), "int64", call.base).name
    outs = []
    for i, size in enumerate(shape):
        stride = int(np.prod(shape[i + 1:]))
        name = g.node("Mod", [g.node("Div", [flat, g.scalar(stride, np.int64)], call.base),
                              g.scalar(size, np.int64)], call.base)
        name = cast(g, Value(name, (), ()), "int64", out_dtype(call, i), call.base).name
        outs.append(call.out(name, x.perm, index=i))
    return outs


def corrcoef(g, call, p):
    """Correlations between the rows of a 2-D `x`, clipped to [-1, 1] as Keras does."""
    x = g.keras(p["x"])
    rows, n = x.shape if x.rank == 2 else (None, None)
    if rows is None or n is None:
        raise Uncovered([(call.base, "Corrcoef", "not a 2-D tensor of known shape")])
    name = cast(g, x, dtype_of(call, p["x"]), out_dtype(call), call.base).name
    mean = g.reduce("ReduceMean", name, [1], True, call.base)
    centred = g.node("Sub", [name, mean], call.base)
    cov = g.node("MatMul", [centred, g.node("Transpose", [centred], call.base, perm=[1, 0])],
                 call.base)
    cov = g.node("Div", [cov, g.scalar(float(n - 1))], call.base)
    eye = g.constant(np.eye(rows, dtype=bool), f"{call.base}/eye", bool)
    diagonal = g.reduce("ReduceSum", g.node("Where", [eye, cov, g.scalar(0.0)], call.base), [1],
                        False, call.base)
    std = g.node("Sqrt", [diagonal], call.base)
    outer = g.node("Mul", [g.node("Unsqueeze", [std, g.ints([1], "axes")], call.base),
                           g.node("Unsqueeze", [std, g.ints([0], "axes")], call.base)], call.base)
    name = g.node("Clip", [g.node("Div", [cov, outer], call.base), g.scalar(-1.0),
                           g.scalar(1.0)], call.base)
    return [call.out(name)]


EMITTERS = {
    "corrcoef": corrcoef,
    "digitize": digitize, "unravel_index": unravel_index,
    "det": det, "slogdet": slogdet, "meshgrid": meshgrid, "sparsemax": sparsemax,
    "segment_sum": segment_sum, "scatter": scatter,
    # tf.math.unsorted_segment_*: an empty segment holds the reduction's identity.
    "segment_max": _segment("ReduceMax", lambda lowest, highest: lowest),
    "segment_min": _segment("ReduceMin", lambda lowest, highest: highest),
    "segment_prod": _segment("ReduceProd", lambda lowest, highest: 1),
    "diag": diag, "diagflat": diagflat, "kron": kron, "cross": cross, "isin": isin,
    "scatter_update": scatter_update, "slice_update": slice_update,
    "extract_sequences": extract_sequences, "quantile": _quantile(1.0),
    "percentile": _quantile(100.0), "median": lambda g, call, p: _quantile(1.0)(
        g, call, dict(p, q=0.5)), "cdist": cdist, "logaddexp2": logaddexp2, "ldexp": ldexp,
}
