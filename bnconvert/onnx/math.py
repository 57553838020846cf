"""`keras.ops` arithmetic, comparisons, reductions and elementwise math as ONNX.

Every emitter is `emit(g, call, p)`: `p` holds the op's arguments under the
names of its `keras.ops` function (`x`, `x1`, `axis`, `keepdims`, ...),
whether they came from a Keras 3 op node or a tf-keras `TFOpLambda`
(`ops.params` normalizes both), with `Value`s in place of graph tensors.

Elementwise ops keep their inputs' layout; reductions map Keras axes to
physical ones. Values carry Keras's dtypes: an op's operands are cast to
the dtype Keras computes in (its output dtype, or for comparisons the
operands' common dtype), constants are made in that dtype, and ops whose
ONNX result type differs from Keras's (ArgMax's int64 against int32) end
in a `Cast`.
"""

import math

import numpy as np
from onnx import helper

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value

_FLOATS = ("float16", "float32", "float64", "bfloat16")


def onnx_dtype(dtype):
    """The ONNX tensor type of a Keras dtype name."""
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(str(dtype)))
    except TypeError:
        raise Uncovered([(None, "Cast", f"dtype {dtype}")]) from None


def graph_dtype(dtype):
    """The dtype a Keras tensor of `dtype` has in the native graph.

    The graph computes floats in float32, also for a mixed-precision model's
    float16 / bfloat16 tensors (whose variables are float32) and for float64
    ones (float64 inputs are cast to float32 on entry, and constants are
    written in float32: a float64 op between them did not load); other
    dtypes are kept.
    """
    return "float32" if str(dtype) in _FLOATS else str(dtype)


def out_dtype(call, index=0):
    return graph_dtype(call.dtypes[index]) if call.dtypes else "float32"


def dtype_of(call, value):
    """The graph dtype of one of `call`'s input `Value`s."""
    for v, dtype in zip(call.inputs, call.input_dtypes or []):
        if v.name == value.name:
            return graph_dtype(dtype)
    return "float32"


def cast(g, value, source, target, base):
    """`value` as `target` (a no-op when it is already)."""
    if str(source) == str(target):
        return value
    return Value(g.node("Cast", [value.name], base, to=onnx_dtype(target)), value.shape,
                 value.perm)


# onnxruntime has no `Where` kernel for these types (the graph would not load):
# their operands are selected as a type that holds each of their values
# exactly (uint64's bit patterns as int64), and cast back. `kernel_gaps`
# applies the same table to the `Where`s emitted without `select`.
WHERE_THROUGH = {"bool": "uint8", "int16": "int32", "uint16": "int32", "uint64": "int64"}


def select(g, condition, a, b, dtype, base):
    """`Where(condition, a, b)` of tensors named `a`, `b` of Keras `dtype`; returns a name."""
    through = WHERE_THROUGH.get(str(dtype))
    if through is None:
        return g.node("Where", [condition, a, b], base)
    a, b = (g.node("Cast", [v], base, to=onnx_dtype(through)) for v in (a, b))
    return g.node("Cast", [g.node("Where", [condition, a, b], base)], base, to=onnx_dtype(dtype))


def constant(value):
    """A non-tensor operand (number, array, variable) as an array."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


def as_value(g, operand, base):
    """`operand` in the Keras layout; a concrete one (a layer's variable) as an initializer."""
    if isinstance(operand, Value):
        return g.keras(operand)
    array = constant(operand)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return Value(g.constant(array, f"{base}/constant", array.dtype), array.shape,
                 tuple(range(array.ndim)))


def common_dtype(call, operands):
    """The dtype comparisons and `where` compute in."""
    dtypes = [dtype_of(call, v) for v in operands if isinstance(v, Value)]
    floats = [d for d in dtypes if d in _FLOATS]
    if floats:
        return floats[0]
    if not dtypes and any(np.asarray(constant(v)).dtype.kind == "f" for v in operands):
        return "float32"
    return dtypes[0] if dtypes else "float32"


def aligned(g, call, operands, dtype):
    """Names of `operands` (Values or constants) in one layout and dtype.

    `dtype` is one dtype name for all operands or a list, one per operand.
    Returns `(names, reference)`: `reference` is the `Value` whose layout
    (and rank) the result has; operands of lower rank broadcast as in NumPy.
    """
    dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * len(operands)
    values = [v for v in operands if isinstance(v, Value)]
    if not values:
        raise Uncovered([(call.base, "op", "no tensor operand")])
    rank = max(v.rank for v in values)
    if any(not isinstance(v, Value) and np.ndim(constant(v)) > rank for v in operands):
        raise Uncovered([(call.base, "op", "a constant of higher rank than the tensor")])
    if len({v.rank for v in values}) > 1:
        values = [g.keras(v) for v in values]
    reference = max(values, key=lambda v: v.rank)
    names = []
    for v, target in zip(operands, dtypes):
        if isinstance(v, Value):
            source = dtype_of(call, v)
            v = g.keras(v) if v.rank != reference.rank else g.layout(v, reference.perm)
            names.append(cast(g, v, source, target, f"{call.base}/cast").name)
        else:
            names.append(g.broadcast_constant(constant(v), reference, f"{call.base}/operand",
                                              np.dtype(target)))
    return names, reference


def nodes(g, call, op_type, operands, dtype, **attrs):
    """One elementwise node over aligned operands; returns `(name, perm)`."""
    names, reference = aligned(g, call, operands, dtype)
    return g.node(op_type, names, call.base, **attrs), reference.perm


def _binary(op_type, **attrs):
    def emit(g, call, p):
        name, perm = nodes(g, call, op_type, [p["x1"], p["x2"]], out_dtype(call), **attrs)
        return [call.out(name, perm)]
    return emit


def _compare(op_type, negate=False):
    def emit(g, call, p):
        operands = [p["x1"], p["x2"]]
        name, perm = nodes(g, call, op_type, operands, common_dtype(call, operands))
        if negate:
            name = g.node("Not", [name], call.base)
        return [call.out(name, perm)]
    return emit


def _logical(op_type):
    def emit(g, call, p):
        name, perm = nodes(g, call, op_type, [p["x1"], p["x2"]], "bool")
        return [call.out(name, perm)]
    return emit


def _composed(build, compute=None):
    """An elementwise op written as ONNX nodes: `build(g, x, base, p)` -> name.

    It computes in `compute`, else in its Keras output dtype, except that
    predicates (bool results: `isnan`, `signbit`) look at their input as is.
    """
    def emit(g, call, p):
        x = p["x"]
        source = dtype_of(call, x)
        dtype = compute or (source if out_dtype(call) == "bool" else out_dtype(call))
        x = cast(g, x, source, dtype, f"{call.base}/cast")
        first = len(g.nodes)
        name = build(g, x, call.base, p)
        if dtype == "float32":  # (an `IsInf` or `Celu` has no float16 kernel)
            g.float32_data(*(n.output[0] for n in g.nodes[first:]))
        return [call.out(name, x.perm)]
    return emit


def _unary(op_type, compute=None):
    return _composed(lambda g, x, base, p: g.node(op_type, [x.name], base), compute)


def _times(factor):
    return _composed(lambda g, x, b, p: g.node("Mul", [x.name, g.scalar(factor)], b))


def _mod(g, call, p):
    """NumPy's `mod` (the divisor's sign), for floats as TensorFlow's `floormod`.

    `x - floor(x / y) * y` lost x's low digits once `x / y` was large (1e9
    mod 7 gave 64): the remainder is `fmod`'s, exact, moved by `y` where it
    is nonzero and of the other sign than `y`.
    """
    dtype, base = out_dtype(call), call.base
    (a, c), ref = aligned(g, call, [p["x1"], p["x2"]], dtype)
    if dtype not in _FLOATS:
        return [call.out(g.node("Mod", [a, c], base, fmod=0), ref.perm)]
    r, zero = g.node("Mod", [a, c], base, fmod=1), g.scalar(0, np.dtype(dtype))
    signs = g.node("Xor", [g.node("Less", [r, zero], base), g.node("Less", [c, zero], base)], base)
    moved = g.node("And", [signs, g.node("Not", [g.node("Equal", [r, zero], base)], base)], base)
    return [call.out(g.node("Add", [r, g.node("Where", [moved, c, zero], base)], base), ref.perm)]


def _floor_divide(g, call, p):
    dtype = out_dtype(call)
    (a, c), ref = aligned(g, call, [p["x1"], p["x2"]], dtype)
    if dtype in _FLOATS:
        return [call.out(g.node("Floor", [g.node("Div", [a, c], call.base)], call.base),
                         ref.perm)]
    # ONNX divides integers toward zero: one less where the remainder is nonzero
    # and of the other sign than the divisor. (Subtracting the remainder first
    # overflowed near the dtype's range ends.)
    q = g.node("Div", [a, c], call.base)
    r = g.node("Sub", [a, g.node("Mul", [q, c], call.base)], call.base)
    zero = g.scalar(0, np.dtype(dtype))
    signs = g.node("Xor", [g.node("Less", [r, zero], call.base),
                           g.node("Less", [c, zero], call.base)], call.base)
    inexact = g.node("And", [signs, g.node("Not", [g.node("Equal", [r, zero], call.base)],
                                           call.base)], call.base)
    adjust = g.node("Cast", [inexact], call.base, to=onnx_dtype(dtype))
    return [call.out(g.node("Sub", [q, adjust], call.base), ref.perm)]


def _divide_no_nan(g, call, p):
    (a, c), ref = aligned(g, call, [p["x1"], p["x2"]], out_dtype(call))
    zero = g.scalar(0.0)
    safe = g.node("Where", [g.node("Equal", [c, zero], call.base), g.scalar(1.0), c], call.base)
    div = g.node("Div", [a, safe], call.base)
    name = g.node("Where", [g.node("Equal", [c, zero], call.base), zero, div], call.base)
    return [call.out(name, ref.perm)]


def _where(g, call, p):
    if p.get("x1") is None or p.get("x2") is None:
        raise Uncovered([(call.base, "Where", "where() with a condition only (nonzero)")])
    dtype = out_dtype(call)
    names, ref = aligned(g, call, [p["condition"], p["x1"], p["x2"]], ["bool", dtype, dtype])
    return [call.out(select(g, *names, dtype, call.base), ref.perm)]


def _clip(g, call, p):
    dtype = out_dtype(call)
    x = cast(g, p["x"], dtype_of(call, p["x"]), dtype, f"{call.base}/cast")
    bounds = [p["x_min"], p["x_max"]]
    if any(isinstance(b, Value) for b in bounds) or any(np.ndim(constant(b)) for b in bounds
                                                        if b is not None):
        name = x.name
        for op_type, b in zip(("Max", "Min"), bounds):
            if b is not None:
                (name, c), ref = aligned(g, call, [Value(name, x.shape, x.perm), b], dtype)
                name = g.node(op_type, [name, c], call.base)
        return [call.out(name, x.perm)]
    lo, hi = [g.scalar(float(constant(b)), np.dtype(dtype)) if b is not None else ""
              for b in bounds]
    return [call.out(g.node("Clip", [x.name, lo, hi], call.base), x.perm)]


def _cast(g, call, p):
    x = p["x"]
    return [call.out(cast(g, x, dtype_of(call, x), out_dtype(call), call.base).name, x.perm)]


def _round(g, x, base, p):
    decimals = int(p.get("decimals") or 0)
    if not decimals:
        return g.node("Round", [x.name], base)
    factor = g.scalar(10.0 ** decimals)
    return g.node("Div", [g.node("Round", [g.node("Mul", [x.name, factor], base)], base),
                          factor], base)


def _cbrt(g, x, base, p):
    root = g.node("Pow", [g.node("Abs", [x.name], base), g.scalar(1.0 / 3.0)], base)
    return g.node("Mul", [g.node("Sign", [x.name], base), root], base)


def _trunc(g, x, base, p):
    whole = g.node("Floor", [g.node("Abs", [x.name], base)], base)
    return g.node("Mul", [g.node("Sign", [x.name], base), whole], base)


def _sinc(g, x, base, p):
    pix = g.node("Mul", [x.name, g.scalar(math.pi)], base)
    zero = g.node("Equal", [x.name, g.scalar(0.0)], base)
    safe = g.node("Where", [zero, g.scalar(1.0), pix], base)
    ratio = g.node("Div", [g.node("Sin", [safe], base), safe], base)
    return g.node("Where", [zero, g.scalar(1.0), ratio], base)


def _isfinite(g, x, base, p):
    bad = g.node("Or", [g.node("IsNaN", [x.name], base), g.node("IsInf", [x.name], base)], base)
    return g.node("Not", [bad], base)


def _shrink(g, x, base, p, soft):
    t = float(p.get("threshold", 0.5))
    keep = g.node("Greater", [g.node("Abs", [x.name], base), g.scalar(t)], base)
    value = x.name
    if soft:
        value = g.node("Sub", [x.name, g.node("Mul", [g.node("Sign", [x.name], base),
                                                      g.scalar(t)], base)], base)
    return g.node("Where", [keep, value, g.scalar(0.0)], base)


def _threshold(g, x, base, p):
    above = g.node("Greater", [x.name, g.scalar(float(p["threshold"]))], base)
    return g.node("Where", [above, x.name, g.scalar(float(p["default_value"]))], base)


def _squareplus(g, x, base, p):
    square = g.node("Add", [g.node("Mul", [x.name, x.name], base), g.scalar(float(p.get("b", 4)))],
                    base)
    total = g.node("Add", [x.name, g.node("Sqrt", [square], base)], base)
    return g.node("Mul", [total, g.scalar(0.5)], base)


def _chain(*steps):
    """Unary ONNX ops applied in turn, each step an op type or `(op type, constant)`."""
    def build(g, x, base, p):
        name = x.name
        for step in steps:
            op_type, *k = step if isinstance(step, tuple) else (step,)
            name = g.node(op_type, [name] + [g.scalar(v) for v in k], base)
        return name
    return build


def _nan_to_num(g, x, base, p):
    info = np.finfo(np.float32)
    name = g.node("Where", [g.node("IsNaN", [x.name], base), g.scalar(float(p.get("nan") or 0.0)),
                            x.name], base)
    for detect, default, key in ((1, info.max, "posinf"), (-1, info.min, "neginf")):
        value = p.get(key)
        inf = g.node("IsInf", [name], base, detect_positive=int(detect > 0),
                     detect_negative=int(detect < 0))
        name = g.node("Where", [inf, g.scalar(default if value is None else float(value)), name],
                      base)
    return name


_UNARY = {
    "abs": "Abs", "absolute": "Abs", "fabs": "Abs", "negative": "Neg", "exp": "Exp", "log": "Log",
    "sqrt": "Sqrt", "erf": "Erf", "floor": "Floor", "ceil": "Ceil", "reciprocal": "Reciprocal",
    "sign": "Sign", "sin": "Sin", "cos": "Cos", "tan": "Tan", "arcsin": "Asin", "arccos": "Acos",
    "arctan": "Atan", "sinh": "Sinh", "cosh": "Cosh", "arcsinh": "Asinh", "arccosh": "Acosh",
    "arctanh": "Atanh", "isnan": "IsNaN", "isinf": "IsInf",
    "copy": "Identity",
    # On real tensors (the only ones an ONNX graph here holds), as TensorFlow computes them.
    "real": "Identity", "conj": "Identity", "conjugate": "Identity",
}
_COMPOSED = {
    "square": lambda g, x, b, p: g.node("Mul", [x.name, x.name], b),
    "rsqrt": _chain("Sqrt", "Reciprocal"),
    "expm1": _chain("Exp", ("Sub", 1.0)),
    "log1p": _chain(("Add", 1.0), "Log"),
    "log2": _chain("Log", ("Mul", 1.0 / math.log(2.0))),
    "log10": _chain("Log", ("Mul", 1.0 / math.log(10.0))),
    "exp2": _chain(("Mul", math.log(2.0)), "Exp"),
    "erfc": _chain("Erf", ("Sub", 1.0), "Neg"),
    "log_sigmoid": _chain("Neg", "Softplus", "Neg"),
    "hard_tanh": _chain(("Clip", -1.0, 1.0)),
    "tanh_shrink": lambda g, x, b, p: g.node("Sub", [x.name, g.node("Tanh", [x.name], b)], b),
    "round": _round, "cbrt": _cbrt, "trunc": _trunc, "sinc": _sinc, "isfinite": _isfinite,
    "isposinf": lambda g, x, b, p: g.node("IsInf", [x.name], b, detect_negative=0),
    "isneginf": lambda g, x, b, p: g.node("IsInf", [x.name], b, detect_positive=0),
    "signbit": lambda g, x, b, p: g.node("Less", [x.name, g.scalar(0.0)], b),
    "hard_shrink": lambda g, x, b, p: _shrink(g, x, b, p, soft=False),
    "soft_shrink": lambda g, x, b, p: _shrink(g, x, b, p, soft=True),
    "threshold": _threshold, "squareplus": _squareplus, "nan_to_num": _nan_to_num,
    "celu": lambda g, x, b, p: g.node("Celu", [x.name], b, alpha=float(p.get("alpha", 1.0))),
    "sparse_plus": lambda g, x, b, p: g.node("Where", [
        g.node("LessOrEqual", [x.name, g.scalar(-1.0)], b), g.scalar(0.0),
        g.node("Where", [g.node("GreaterOrEqual", [x.name, g.scalar(1.0)], b), x.name,
                         _chain(("Add", 1.0), ("Pow", 2.0), ("Mul", 0.25))(g, x, b, p)], b)], b),
    "sparse_sigmoid": _chain(("Add", 1.0), ("Mul", 0.5), ("Clip", 0.0, 1.0)),
    # tf.math.imag / angle of real values: 0, and pi below zero (NaN and -0 give 0).
    "imag": lambda g, x, b, p: g.node("Where", [g.node("IsNaN", [x.name], b), g.scalar(0.0),
                                                g.scalar(0.0)], b),
    "angle": lambda g, x, b, p: g.node("Where", [g.node("Less", [x.name, g.scalar(0.0)], b),
                                                 g.scalar(math.pi), g.scalar(0.0)], b),
    "isreal": lambda g, x, b, p: g.node("Or", [g.node("IsNaN", [x.name], b), g.node(
        "Not", [g.node("IsNaN", [x.name], b)], b)], b),
}

EMITTERS = {
    **{k: _unary(v) for k, v in _UNARY.items()},
    **{k: _composed(v) for k, v in _COMPOSED.items()},
    "logical_not": _unary("Not", compute="bool"),
    "deg2rad": _times(math.pi / 180.0), "rad2deg": _times(180.0 / math.pi),
    "add": _binary("Add"), "subtract": _binary("Sub"), "multiply": _binary("Mul"),
    "divide": _binary("Div"), "true_divide": _binary("Div"), "maximum": _binary("Max"),
    "minimum": _binary("Min"), "power": _binary("Pow"), "fmod": _binary("Mod", fmod=1),
    "mod": _mod, "floor_divide": _floor_divide, "divide_no_nan": _divide_no_nan,
    "equal": _compare("Equal"), "not_equal": _compare("Equal", negate=True),
    "greater": _compare("Greater"), "greater_equal": _compare("GreaterOrEqual"),
    "less": _compare("Less"), "less_equal": _compare("LessOrEqual"),
    "logical_and": _logical("And"), "logical_or": _logical("Or"), "logical_xor": _logical("Xor"),
    "where": _where, "clip": _clip, "cast": _cast,
}
