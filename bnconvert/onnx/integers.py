"""`keras.ops` bitwise operations on integers as ONNX.

Emitters are `emit(g, call, p)` as in `math`. ONNX has `BitwiseAnd`,
`BitwiseOr`, `BitwiseXor` and `BitwiseNot` from opset 18 only: below it
they are refused (the export falls back). Shifts work at every opset:
a left shift is ONNX's `BitShift` on the same bits read as unsigned; an
arithmetic right shift is `floor(x / 2**y)`, computed exactly in int64.
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.math import aligned
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.math import out_dtype

_UNSIGNED = {"int8": "uint8", "int16": "uint16", "int32": "uint32", "int64": "uint64"}


def _needs_opset_18(g, call, op_type):
    if g.opset < 18:
        raise Uncovered([(call.base, op_type, f"needs opset 18 (exporting {g.opset})")])


def _bitwise(op_type):
    def emit(g, call, p):
        _needs_opset_18(g, call, op_type)
        if "x" in p and "y" not in p:
            names, ref = aligned(g, call, [p["x"]], out_dtype(call))
        else:
            names, ref = aligned(g, call, [p["x"], p["y"]], out_dtype(call))
        return [call.out(g.node(op_type, names, call.base), ref.perm)]
    return emit


def _as(g, name, dtype, base):
    return g.node("Cast", [name], base, to=onnx_dtype(dtype))


def left_shift(g, call, p):
    dtype = out_dtype(call)
    (x, y), ref = aligned(g, call, [p["x"], p["y"]], dtype)
    unsigned = _UNSIGNED.get(dtype, dtype)
    name = g.node("BitShift", [_as(g, x, unsigned, call.base), _as(g, y, unsigned, call.base)],
                  call.base, direction="LEFT")
    return [call.out(_as(g, name, dtype, call.base), ref.perm)]


def right_shift(g, call, p):
    """floor(x / 2**y): truncating division of `x - (2**y - 1)` for negative `x`."""
    dtype = out_dtype(call)
    if dtype not in _UNSIGNED and not dtype.startswith("uint"):
        raise Uncovered([(call.base, "RightShift", f"dtype {dtype}")])
    (x, y), ref = aligned(g, call, [p["x"], p["y"]], dtype)
    wide_x = _as(g, x, "int64", call.base)
    power = g.node("BitShift", [g.constant(np.array(1, np.uint64), f"{call.base}/one", np.uint64),
                                _as(g, y, "uint64", call.base)], call.base, direction="LEFT")
    power = _as(g, power, "int64", call.base)
    negative = g.node("Less", [wide_x, g.scalar(0, np.int64)], call.base)
    adjust = g.node("Where", [negative, g.node("Sub", [power, g.scalar(1, np.int64)], call.base),
                              g.scalar(0, np.int64)], call.base)
    name = g.node("Div", [g.node("Sub", [wide_x, adjust], call.base), power], call.base)
    return [call.out(_as(g, name, dtype, call.base), ref.perm)]


EMITTERS = {
    "bitwise_and": _bitwise("BitwiseAnd"), "bitwise_or": _bitwise("BitwiseOr"),
    "bitwise_xor": _bitwise("BitwiseXor"), "bitwise_not": _bitwise("BitwiseNot"),
    "bitwise_invert": _bitwise("BitwiseNot"), "bitwise_left_shift": left_shift,
    "left_shift": left_shift, "bitwise_right_shift": right_shift, "right_shift": right_shift,
}
