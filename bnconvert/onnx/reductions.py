"""`keras.ops` reductions, arg-reductions and scans as ONNX nodes.

Emitters are `emit(g, call, p)` as in `math`. A reduction works on the
tensor's physical layout: its Keras axes are mapped through the value's
`perm`, and the axes it keeps keep their order in memory, so a channels-first
value reduced over its spatial axes needs no transpose. `axis=None` reduces
every axis, as in Keras (and in `tf.reduce_*`).
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import keras_axes
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype


def _kept_perm(x, axes, keepdims):
    """The layout of `x` reduced over Keras `axes`."""
    if keepdims:
        return x.perm
    kept = [a for a in x.perm if a not in axes]
    return tuple(sorted(kept).index(a) for a in kept)


_NARROW_INTS = ("int8", "int16", "int32", "uint8", "uint16", "uint32")


def _input(g, call, p, dtype=None):
    x = p["x"]
    return cast(g, x, dtype_of(call, x), dtype or out_dtype(call), f"{call.base}/cast")


def _axes(p, x):
    axis = p.get("axis")
    return keras_axes(axis, x.rank)


def quantile_axis(call, p, x, op_type, several_q=False):
    """The one axis (non-negative) and its static size a linear quantile sorts along.

    Quantiles of several `q`, over several axes or the flattened tensor, or
    by a method other than linear, are refused by name.
    """
    axis = p.get("axis")
    if axis is None or several_q or isinstance(axis, (list, tuple)) and len(axis) > 1 \
            or p.get("method", "linear") != "linear":
        raise Uncovered([(call.base, op_type, "several q or axes, axis=None, or a method "
                                              "other than linear")])
    axis = int(axis[0] if isinstance(axis, (list, tuple)) else axis) % x.rank
    if x.shape[axis] is None:
        raise Uncovered([(call.base, op_type, "an axis of unknown size")])
    return axis, x.shape[axis]


def _reduce_to(g, x, op_type, axes, keepdims, base):
    """`op_type` over Keras `axes` of `x`: the output name."""
    return g.reduce(op_type, x.name, [x.physical(a) for a in axes], keepdims, base)


def reduction(op_type, compute=None):
    """Sum, mean, max, min, prod (`compute`: the dtype to reduce in)."""
    def emit(g, call, p):
        wide = compute
        if op_type == "ReduceSum" and out_dtype(call) in _NARROW_INTS:
            # onnxruntime saturates a narrow integer sum; Keras wraps around, as
            # the int64 sum cast back does.
            wide = "int64"
        x = _input(g, call, p, wide)
        axes, keepdims = _axes(p, x), bool(p.get("keepdims", False))
        name = _reduce_to(g, x, op_type, axes, keepdims, call.base)
        if wide is not None:
            name = cast(g, Value(name, (), ()), wide, out_dtype(call), call.base).name
        return [call.out(name, _kept_perm(x, axes, keepdims))]
    return emit


def _variance(g, call, p, root):
    x = _input(g, call, p)
    axes, keepdims = _axes(p, x), bool(p.get("keepdims", False))
    mean = _reduce_to(g, x, "ReduceMean", axes, True, call.base)
    d = g.node("Sub", [x.name, mean], call.base)
    name = _reduce_to(g, Value(g.node("Mul", [d, d], call.base), x.shape, x.perm),
                      "ReduceMean", axes, keepdims, call.base)
    if root:
        name = g.node("Sqrt", [name], call.base)
    return name, _kept_perm(x, axes, keepdims), mean, axes


def _var(g, call, p):
    name, perm, _, _ = _variance(g, call, p, root=False)
    return [call.out(name, perm)]


def _std(g, call, p):
    name, perm, _, _ = _variance(g, call, p, root=True)
    return [call.out(name, perm)]


def _moments(g, call, p):
    p = dict(p, axis=p.get("axes"))
    var, perm, mean, axes = _variance(g, call, p, root=False)
    if not p.get("keepdims"):
        x = p["x"]
        mean = g.node("Squeeze", [mean, g.ints([x.physical(a) for a in axes], "axes")], call.base)
    return [call.out(mean, perm), call.out(var, perm, index=1)]


def _logsumexp(g, call, p):
    """max + log(sum(exp(x - max))): finite for inputs far beyond exp's range."""
    x = _input(g, call, p)
    axes, keepdims = _axes(p, x), bool(p.get("keepdims", False))
    top = _reduce_to(g, x, "ReduceMax", axes, True, call.base)
    shifted = Value(g.node("Exp", [g.node("Sub", [x.name, top], call.base)], call.base),
                    x.shape, x.perm)
    total = g.node("Log", [_reduce_to(g, shifted, "ReduceSum", axes, keepdims, call.base)],
                   call.base)
    if not keepdims:
        top = g.node("Squeeze", [top, g.ints([x.physical(a) for a in axes], "axes")], call.base)
    return [call.out(g.node("Add", [total, top], call.base), _kept_perm(x, axes, keepdims))]


def _truth(op_type):
    """any / all: a max / min over the operand as 0/1."""
    def emit(g, call, p):
        x = p["x"]
        source = dtype_of(call, x)
        as_bool = cast(g, x, source, "bool", f"{call.base}/cast")
        ones = cast(g, as_bool, "bool", "float32", f"{call.base}/cast")
        axes, keepdims = _axes(p, x), bool(p.get("keepdims", False))
        name = _reduce_to(g, ones, op_type, axes, keepdims, call.base)
        name = g.node("Cast", [name], call.base, to=onnx_dtype("bool"))
        return [call.out(name, _kept_perm(x, axes, keepdims))]
    return emit


def _count_nonzero(g, call, p):
    x = p["x"]
    nonzero = g.node("Not", [g.node("Equal", [x.name, g.scalar(0, np.dtype(dtype_of(call, x)))],
                                    call.base)], call.base)
    ones = Value(g.node("Cast", [nonzero], call.base, to=onnx_dtype("int64")), x.shape, x.perm)
    axes, keepdims = _axes(p, x), bool(p.get("keepdims", False))
    name = _reduce_to(g, ones, "ReduceSum", axes, keepdims, call.base)
    name = cast(g, Value(name, (), ()), "int64", out_dtype(call), call.base).name
    return [call.out(name, _kept_perm(x, axes, keepdims))]


def _norm(g, call, p):
    """Vector norms of order 1, 2, inf, -inf and 0; the Frobenius norm."""
    x = _input(g, call, p)
    order = p.get("ord")
    axes, keepdims = _axes(p, x), bool(p.get("keepdims", False))
    if len(axes) > 1 and p.get("axis") is not None and order not in (None, "fro"):
        raise Uncovered([(call.base, "Norm", f"matrix norm ord={order!r}")])
    kinds = {None: ("ReduceL2", False), "fro": ("ReduceL2", False), 2: ("ReduceL2", False),
             1: ("ReduceL1", False), np.inf: ("ReduceMax", True), -np.inf: ("ReduceMin", True)}
    if order == 0:
        return _count_nonzero(g, call, p)
    if order not in kinds:
        raise Uncovered([(call.base, "Norm", f"ord={order!r}")])
    op_type, absolute = kinds[order]
    if absolute:
        x = Value(g.node("Abs", [x.name], call.base), x.shape, x.perm)
    return [call.out(_reduce_to(g, x, op_type, axes, keepdims, call.base),
                     _kept_perm(x, axes, keepdims))]


def _ptp(g, call, p):
    x = _input(g, call, p)
    axes, keepdims = _axes(p, x), bool(p.get("keepdims", False))
    top = _reduce_to(g, x, "ReduceMax", axes, keepdims, call.base)
    bottom = _reduce_to(g, x, "ReduceMin", axes, keepdims, call.base)
    return [call.out(g.node("Sub", [top, bottom], call.base), _kept_perm(x, axes, keepdims))]


def _average(g, call, p):
    if p.get("weights") is not None:
        raise Uncovered([(call.base, "Average", "weights")])
    return reduction("ReduceMean")(g, call, dict(p, keepdims=False))


def _flat(g, call, x):
    """`x` flattened in the Keras (C) order, for `axis=None` scans and arg-reductions."""
    flat = g.node("Reshape", [g.keras(x).name, g.ints([-1])], call.base)
    return Value(flat, (None,), (0,))


def _arg(op_type):
    """argmax / argmin: the first extreme index, as Keras's int32."""
    def emit(g, call, p):
        x = p["x"]
        keepdims = bool(p.get("keepdims", False))
        if p.get("axis") is None:
            if keepdims:
                raise Uncovered([(call.base, op_type, "axis=None with keepdims")])
            x, axis, perm = _flat(g, call, x), 0, ()
        else:
            axis = int(p["axis"]) % x.rank
            perm = _kept_perm(x, [axis], keepdims)
        name = g.node(op_type, [x.name], call.base, axis=x.physical(axis),
                      keepdims=int(keepdims))
        if p.get("axis") is None:
            name = g.node("Squeeze", [name], call.base)
        name = cast(g, Value(name, (), ()), "int64", out_dtype(call), call.base).name
        return [call.out(name, perm)]
    return emit


def _cumsum(g, call, p):
    x = _input(g, call, p)
    if p.get("axis") is None:
        x, axis = _flat(g, call, x), 0
    else:
        axis = int(p["axis"]) % x.rank
    physical = g.ints(x.physical(axis), "axis")
    name = g.node("CumSum", [x.name, physical], call.base,
                  exclusive=int(bool(p.get("exclusive", False))),
                  reverse=int(bool(p.get("reverse", False))))
    if out_dtype(call) == "float32":  # (no float16 CumSum before opset 14)
        g.float32_data(name)
    return [call.out(name, x.perm)]


def _cumprod(g, call, p):
    """A running product along an axis of known size: one Mul per element, in order."""
    x = _input(g, call, p)
    if p.get("axis") is None:
        raise Uncovered([(call.base, "Cumprod", "axis=None")])
    axis = int(p["axis"]) % x.rank
    n, a = x.shape[axis], x.physical(axis)
    if n is None:
        raise Uncovered([(call.base, "Cumprod", "an axis of unknown size")])
    parts = g.node("Split", [x.name, g.ints([1] * n, "split")], call.base, outputs=n, axis=a) \
        if n > 1 else [x.name]
    running = [parts[0]]
    for part in parts[1:]:
        running.append(g.node("Mul", [running[-1], part], call.base))
    name = g.node("Concat", running, call.base, axis=a) if n > 1 else running[0]
    return [call.out(name, x.perm)]


EMITTERS = {
    "sum": reduction("ReduceSum"), "mean": reduction("ReduceMean"),
    "max": reduction("ReduceMax"), "min": reduction("ReduceMin"),
    "amax": reduction("ReduceMax"), "amin": reduction("ReduceMin"),
    "prod": reduction("ReduceProd"), "var": _var, "std": _std, "moments": _moments,
    "logsumexp": _logsumexp, "any": _truth("ReduceMax"), "all": _truth("ReduceMin"),
    "count_nonzero": _count_nonzero, "norm": _norm, "ptp": _ptp, "average": _average,
    "argmax": _arg("ArgMax"), "argmin": _arg("ArgMin"), "cumsum": _cumsum, "cumprod": _cumprod,
}
