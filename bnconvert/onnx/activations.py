"""Keras activations as ONNX nodes.

Each activation works elementwise, so it keeps its input's layout; only
softmax and log-softmax have an axis, which is mapped to the physical one.
GELU is written with `Erf` (exact) or `Tanh` (approximate) before opset 20,
where ONNX gained a `Gelu` op: both are what Keras computes.
"""

import math

from bnconvert.onnx.graph import FLOAT
from bnconvert.onnx.graph import Uncovered

# Functions of these modules are mapped by name; any other function (a
# lambda, a user's own `gelu`, `keras.ops.gelu` whose default is the tanh
# approximation) is traced: its name alone does not say what it computes.
_KNOWN_PACKAGES = ("keras.src.activations", "tf_keras.src.activations", "keras.activations",
                   "tf_keras.activations", "tensorflow.")


def name_of(function):
    """The name of a Keras activation function, or None for any other function."""
    if function is None:
        return "linear"
    if isinstance(function, str):
        name = function
    elif str(getattr(function, "__module__", "")).startswith(_KNOWN_PACKAGES):
        name = getattr(function, "__name__", None)
    else:
        return None
    aliases = {"swish": "silu", "hard_swish": "hard_silu"}
    return aliases.get(name, name)


def apply(g, value, activation, base, **params):
    """`activation(value)` as ONNX nodes; returns the output `Value`.

    Args:
        g: The `Graph`.
        value: The input `Value`.
        activation: An activation function, or its name.
        base: Node name prefix.
        **params: The activation's own parameters (`axis`,
            `negative_slope`, `max_value`, `threshold`, `alpha`,
            `approximate`).

    A function that is not a known Keras activation is traced (`Graph.trace`).

    Raises:
        Uncovered: The activation has no mapping here.
    """
    name = name_of(activation)
    if name == "linear":
        return value
    emit = _EMITTERS.get(name)
    if emit is None and callable(activation) and g.trace is not None:
        return g.trace(activation, value, f"{base}/{getattr(activation, '__name__', 'fn')}")
    if emit is None:
        raise Uncovered([(base, "activation", f"activation {name!r}")])
    out = emit(g, value, f"{base}/{name}", params)
    return value.__class__(out, value.shape, value.perm)


def _unary(op_type):
    return lambda g, v, base, p: g.node(op_type, [v.name], base)


def _relu(g, v, base, p):
    slope = float(p.get("negative_slope") or 0.0)
    top = p.get("max_value")
    threshold = float(p.get("threshold") or 0.0)
    if threshold != 0.0:
        return _relu_threshold(g, v.name, slope, top, threshold, base)
    x = v.name
    if slope:
        x = g.node("LeakyRelu", [x], base, alpha=slope)
        if top is not None:
            return g.node("Min", [x, g.scalar(top)], base)
        return x
    if top is None:
        return g.node("Relu", [x], base)
    return g.node("Clip", [x, g.scalar(0.0), g.scalar(top)], base)


def _relu_threshold(g, x, slope, top, threshold, base):
    """Keras's ReLU with a threshold: `x * (x > t)`, clipped, minus `slope * relu(t - x)`."""
    t = g.scalar(threshold)
    kept = g.node("Cast", [g.node("Greater", [x, t], base)], base, to=FLOAT)
    out = g.node("Mul", [x, kept], base)
    if top is not None:
        out = g.node("Clip", [out, g.scalar(0.0), g.scalar(top)], base)
    if slope:
        below = g.node("Relu", [g.node("Sub", [t, x], base)], base)
        out = g.node("Sub", [out, g.node("Mul", [below, g.scalar(slope)], base)], base)
    return out


def _relu6(g, v, base, p):
    return g.node("Clip", [v.name, g.scalar(0.0), g.scalar(6.0)], base)


def _silu(g, v, base, p):
    return g.node("Mul", [v.name, g.node("Sigmoid", [v.name], base)], base)


def _hard_sigmoid(g, v, base, p):
    alpha, beta = g.hard_sigmoid
    return g.node("HardSigmoid", [v.name], base, alpha=alpha, beta=beta)


def _hard_silu(g, v, base, p):
    return g.node("Mul", [v.name, _hard_sigmoid(g, v, base, p)], base)


def _gelu(g, v, base, p):
    approximate = bool(p.get("approximate", False))
    if g.opset >= 20:
        return g.node("Gelu", [v.name], base, approximate="tanh" if approximate else "none")
    x = v.name
    half = g.node("Mul", [x, g.scalar(0.5)], base)
    if approximate:
        # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = g.node("Mul", [g.node("Mul", [x, x], base), x], base)
        inner = g.node("Add", [x, g.node("Mul", [cube, g.scalar(0.044715)], base)], base)
        t = g.node("Tanh", [g.node("Mul", [inner, g.scalar(math.sqrt(2 / math.pi))], base)], base)
    else:
        # 0.5 x (1 + erf(x / sqrt(2)))
        t = g.node("Erf", [g.node("Mul", [x, g.scalar(1 / math.sqrt(2))], base)], base)
    return g.node("Mul", [half, g.node("Add", [t, g.scalar(1.0)], base)], base)


def _softmax(op_type):
    def emit(g, v, base, p):
        axes = p.get("axis", -1)
        if isinstance(axes, (list, tuple)):
            if len(axes) != 1:
                raise Uncovered([(base, op_type, "a softmax over several axes")])
            axes = axes[0]
        return g.node(op_type, [v.name], base, axis=v.physical(int(axes)))

    return emit


def _elu(g, v, base, p):
    return g.node("Elu", [v.name], base, alpha=float(p.get("alpha", 1.0)))


def _leaky(g, v, base, p):
    slope = p.get("negative_slope", p.get("alpha", 0.2))
    return g.node("LeakyRelu", [v.name], base, alpha=float(slope))


def _mish(g, v, base, p):
    soft = g.node("Softplus", [v.name], base)
    return g.node("Mul", [v.name, g.node("Tanh", [soft], base)], base)


def _hard_tanh(g, v, base, p):
    return g.node("Clip", [v.name, g.scalar(-1.0), g.scalar(1.0)], base)


def _where(g, condition, a, b, base):
    return g.node("Where", [condition, a, b], base)


def _hard_shrink(g, v, base, p):
    t = g.scalar(float(p.get("threshold", 0.5)))
    above = g.node("Greater", [g.node("Abs", [v.name], base), t], base)
    return _where(g, above, v.name, g.scalar(0.0), base)


def _soft_shrink(g, v, base, p):
    t = float(p.get("threshold", 0.5))
    clipped = g.node("Clip", [v.name, g.scalar(-t), g.scalar(t)], base)
    return g.node("Sub", [v.name, clipped], base)


def _tanh_shrink(g, v, base, p):
    return g.node("Sub", [v.name, g.node("Tanh", [v.name], base)], base)


def _celu(g, v, base, p):
    # Activations compute in the graph's float32 (float16 has no Celu kernel).
    return g.float32_data(g.node("Celu", [v.name], base, alpha=float(p.get("alpha", 1.0))))


def _glu(g, v, base, p):
    axis = v.physical(int(p.get("axis", -1)))
    first, second = g.node("Split", [v.name], base, outputs=2, axis=axis,
                           **({"num_outputs": 2} if g.opset >= 18 else {}))
    return g.node("Mul", [first, g.node("Sigmoid", [second], base)], base)


def _log_sigmoid(g, v, base, p):
    # log(sigmoid(x)) = -softplus(-x), as TensorFlow computes it.
    return g.node("Neg", [g.node("Softplus", [g.node("Neg", [v.name], base)], base)], base)


def _sparse_plus(g, v, base, p):
    x = v.name
    shifted = g.node("Add", [x, g.scalar(1.0)], base)
    square = g.node("Mul", [g.node("Mul", [shifted, shifted], base), g.scalar(0.25)], base)
    middle = _where(g, g.node("Less", [x, g.scalar(1.0)], base), square, x, base)
    low = g.node("LessOrEqual", [x, g.scalar(-1.0)], base)
    return _where(g, low, g.scalar(0.0), middle, base)


def _squareplus(g, v, base, p):
    x = v.name
    b = g.scalar(float(p.get("b", 4.0)))
    root = g.node("Sqrt", [g.node("Add", [g.node("Mul", [x, x], base), b], base)], base)
    return g.node("Mul", [g.node("Add", [x, root], base), g.scalar(0.5)], base)


_EMITTERS = {
    "relu": _relu,
    "relu6": _relu6,
    "sigmoid": _unary("Sigmoid"),
    "tanh": _unary("Tanh"),
    "softmax": _softmax("Softmax"),
    "log_softmax": _softmax("LogSoftmax"),
    "silu": _silu,
    "hard_sigmoid": _hard_sigmoid,
    "hard_silu": _hard_silu,
    "gelu": _gelu,
    "elu": _elu,
    "selu": _unary("Selu"),
    "softplus": _unary("Softplus"),
    "softsign": _unary("Softsign"),
    "exponential": _unary("Exp"),
    "leaky_relu": _leaky,
    "mish": _mish,
    "hard_tanh": _hard_tanh,
    "hard_shrink": _hard_shrink,
    "soft_shrink": _soft_shrink,
    "tanh_shrink": _tanh_shrink,
    "celu": _celu,
    "glu": _glu,
    "log_sigmoid": _log_sigmoid,
    "sparse_plus": _sparse_plus,
    "squareplus": _squareplus,
}

