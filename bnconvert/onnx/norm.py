"""Normalization layers without moving statistics, and PReLU, as ONNX nodes.

BatchNormalization, LayerNormalization and GroupNormalization live in
`layers` (with the convolutions they fold into). UnitNormalization is
Keras's `x * min(rsqrt(sum(x^2)), 1 / 1e-12)` over its axes;
RMSNormalization is `x * rsqrt(mean(x^2) + epsilon) * scale`. Both reduce
over physical axes, so they keep their input's layout.
"""

import numpy as np

from bnconvert.onnx.graph import keras_axes
from bnconvert.onnx.layers import weights


def unit_normalization(g, call):
    """UnitNormalization over its axes."""
    x = call.inputs[0]
    axes = [x.physical(a) for a in keras_axes(call.layer.axis, x.rank)]
    square = g.reduce("ReduceSum", g.node("Mul", [x.name, x.name], call.base), axes, True,
                      call.base)
    inverse = g.node("Reciprocal", [g.node("Sqrt", [square], call.base)], call.base)
    inverse = g.node("Min", [inverse, g.scalar(1e12)], call.base)
    return [call.out(g.node("Mul", [x.name, inverse], call.base), x.perm)]


def rms_normalization(g, call):
    """RMSNormalization over its axes, with its learned scale."""
    layer = call.layer
    x = call.inputs[0]
    keras = keras_axes(layer.axis, x.rank)
    mean = g.reduce("ReduceMean", g.node("Mul", [x.name, x.name], call.base),
                    [x.physical(a) for a in keras], True, call.base)
    root = g.node("Sqrt", [g.node("Add", [mean, g.scalar(float(layer.epsilon))], call.base)],
                  call.base)
    name = g.node("Mul", [x.name, g.node("Reciprocal", [root], call.base)], call.base)
    scale = getattr(layer, "scale", None)
    if scale is not None:
        shape = [x.shape[a] if a in keras else 1 for a in range(x.rank)]
        constant = g.broadcast_constant(weights(scale).reshape(shape), x, f"{call.base}/scale")
        name = g.node("Mul", [name, constant], call.base)
    return [call.out(name, x.perm)]


def prelu(g, call):
    """PReLU: `alpha * x` below zero, `alpha` per element of the input (shared axes 1)."""
    x = call.inputs[0]
    alpha = np.asarray(weights(call.layer.alpha), np.float32)
    slope = g.broadcast_constant(alpha, x, f"{call.base}/alpha")
    return [call.out(g.node("PRelu", [x.name, slope], call.base), x.perm)]


EMITTERS = {
    "UnitNormalization": unit_normalization,
    "RMSNormalization": rms_normalization,
    "PReLU": prelu,
}
