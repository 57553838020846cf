"""Layers that rearrange other tensors or layers: TimeDistributed, RepeatVector, Dot.

TimeDistributed merges the batch and time axes, runs its inner layer on
the merged batch (traced like any layer, so every table serves it), and
splits the axes again from the input's run-time shape.
"""

import inspect

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import keras_axes


def _refuse(call, why):
    raise Uncovered([(call.base, type(call.layer).__name__, why)])


def time_distributed(g, call):
    """TimeDistributed: the inner layer on `[batch * time, ...]`."""
    x = g.keras(call.inputs[0])
    rest, out_rest = x.shape[2:], call.shapes[0][2:]
    if None in rest or None in out_rest:
        _refuse(call, "inner dimensions of unknown size")
    # Keras hands the mask to the inner layer only if its call takes one.
    takes_mask = "mask" in inspect.signature(call.layer.layer.call).parameters
    if takes_mask and (call.kwargs.get("mask") is not None or
                       call.implicit_mask(call.inputs[0]) is not None):
        _refuse(call, "a mask for an inner layer that takes one")
    merged = g.node("Reshape", [x.name, g.ints([-1] + list(rest))], call.base)
    inner = g.trace(call.layer.layer, Value(merged, (None,) + tuple(rest),
                                            tuple(range(len(rest) + 1))), call.base)
    inner = g.keras(inner)
    leading = g.node("Slice", [g.node("Shape", [x.name], call.base), g.ints([0]), g.ints([2])],
                     call.base)
    shape = g.node("Concat", [leading, g.ints(list(out_rest))], call.base, axis=0)
    return [call.out(g.node("Reshape", [inner.name, shape], call.base))]


def repeat_vector(g, call):
    """RepeatVector: `[B, D] -> [B, n, D]`."""
    x = g.keras(call.inputs[0])
    expanded = g.node("Unsqueeze", [x.name, g.ints([1])], call.base)
    name = g.node("Expand", [expanded, g.ints([1, int(call.layer.n), 1])], call.base)
    return [call.out(name)]


def _l2_normalize(g, name, axis, base):
    square = g.reduce("ReduceSum", g.node("Mul", [name, name], base), [axis], True, base)
    inverse = g.node("Reciprocal", [g.node("Sqrt", [square], base)], base)
    return g.node("Mul", [name, g.node("Min", [inverse, g.scalar(1e12)], base)], base)


def dot(g, call):
    """Dot of two rank-2 or rank-3 inputs over one axis each, normalized or not."""
    layer = call.layer
    x, y = (g.keras(v) for v in call.inputs)
    axes = layer.axes if isinstance(layer.axes, (list, tuple)) else (layer.axes, layer.axes)
    if x.rank != y.rank or x.rank not in (2, 3):
        _refuse(call, "inputs other than two rank-2 or two rank-3 tensors")
    ax, ay = (keras_axes(a, v.rank)[0] for a, v in zip(axes, (x, y)))
    a, b = x.name, y.name
    if layer.normalize:
        a, b = _l2_normalize(g, a, ax, call.base), _l2_normalize(g, b, ay, call.base)
    if x.rank == 2:
        product = g.node("Mul", [a, b], call.base)
        return [call.out(g.reduce("ReduceSum", product, [1], True, call.base))]
    a = a if ax == 2 else g.node("Transpose", [a], call.base, perm=[0, 2, 1])
    b = b if ay == 1 else g.node("Transpose", [b], call.base, perm=[0, 2, 1])
    return [call.out(g.node("MatMul", [a, b], call.base))]


EMITTERS = {
    "TimeDistributed": time_distributed,
    "RepeatVector": repeat_vector,
    "Dot": dot,
}
