"""Raw tensor ops of a Keras graph as ONNX nodes.

Keras 3 records `keras.ops` calls on symbolic tensors as graph nodes of
their own (an `Add` op, a `Mean` op, ...); tf-keras records TensorFlow
functions as `TFOpLambda` layers. Both map here, by the op's name. Operands
that are not tensors of the graph (numbers, arrays, variables a custom
layer multiplies by) become constants laid out like the tensor they meet.
"""

import numpy as np

from bnconvert.onnx import activations
from bnconvert.onnx import shape as structure
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import keras_axes
from bnconvert.onnx.graph import Value

_BINARY = {
    "Add": "Add", "Subtract": "Sub", "Multiply": "Mul", "Divide": "Div",
    "TrueDivide": "Div", "Maximum": "Max", "Minimum": "Min", "Power": "Pow",
}
_UNARY = {
    # `keras.ops.abs` records an `Absolute` op (`Abs` is its subclass).
    "Sqrt": "Sqrt", "Abs": "Abs", "Absolute": "Abs", "Negative": "Neg", "Exp": "Exp",
    "Log": "Log", "Erf": "Erf", "Floor": "Floor", "Ceil": "Ceil", "Reciprocal": "Reciprocal",
}
_ACTIVATIONS = {
    "Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "Silu": "silu", "HardSilu": "hard_silu", "HardSigmoid": "hard_sigmoid",
    "Gelu": "gelu", "Softmax": "softmax", "LogSoftmax": "log_softmax",
    "LeakyRelu": "leaky_relu", "Elu": "elu", "Selu": "selu", "Softplus": "softplus",
    "Softsign": "softsign", "Mish": "mish",
}
_REDUCE = {"Mean": "ReduceMean", "Sum": "ReduceSum", "Max": "ReduceMax", "Min": "ReduceMin"}
# tf-keras TFOpLambda functions -> the Keras 3 op of the same meaning.
TF_FUNCTIONS = {
    "__operators__.add": "Add", "math.add": "Add", "math.add_n": "AddN",
    "math.subtract": "Subtract", "math.multiply": "Multiply",
    "math.truediv": "TrueDivide", "math.divide": "TrueDivide",
    "math.maximum": "Maximum", "math.minimum": "Minimum",
    "nn.relu": "Relu", "nn.relu6": "Relu6", "math.sigmoid": "Sigmoid",
    "nn.silu": "Silu", "nn.swish": "Silu", "math.tanh": "Tanh", "nn.gelu": "Gelu",
    "nn.softmax": "Softmax", "math.reduce_mean": "Mean", "math.reduce_sum": "Sum",
    "math.reduce_max": "Max", "concat": "Concatenate", "reshape": "Reshape",
}


def _constant(value):
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value, np.float32)


def binary(g, call, op_type, operands):
    """An elementwise op with NumPy broadcasting, in the tensors' layout."""
    values = [v for v in operands if isinstance(v, Value)]
    if not values:
        raise Uncovered([(call.base, type(call.layer).__name__, "no tensor operand")])
    if len({v.rank for v in values}) > 1 or any(
        not isinstance(v, Value) and np.ndim(_constant(v)) > values[0].rank for v in operands
    ):
        values = [g.keras(v) for v in values]
    reference = max(values, key=lambda v: v.rank)
    names = []
    for v in operands:
        if isinstance(v, Value):
            names.append(g.layout(v, reference.perm).name)
        else:
            names.append(g.broadcast_constant(_constant(v), reference, f"{call.base}/operand"))
    name = g.node(op_type, names, call.base)
    return [call.out(name, reference.perm)]


def reduce(g, call, op_type, axis, keepdims):
    """A reduction over Keras axes; the kept axes keep their order in memory."""
    x = call.inputs[0]
    axes = keras_axes(axis, x.rank)
    name = g.reduce(op_type, x.name, [x.physical(a) for a in axes], keepdims, call.base)
    if keepdims:
        return [call.out(name, x.perm)]
    kept = [a for a in x.perm if a not in axes]
    return [call.out(name, [sorted(kept).index(a) for a in kept])]


def concatenate(g, call, xs, axis):
    values = [g.layout(v, xs[0].perm) if v.rank == xs[0].rank else v for v in xs]
    if len({v.perm for v in values}) > 1:
        values = [g.keras(v) for v in values]
    name = g.node("Concat", [v.name for v in values], call.base,
                  axis=values[0].physical(int(axis)))
    return [call.out(name, values[0].perm)]


def split(g, call, sections, axis):
    x = call.inputs[0]
    size = x.shape[int(axis)]
    if isinstance(sections, int):
        if size is None:
            raise Uncovered([(call.base, "Split", "an axis of unknown size")])
        sizes = [size // sections] * sections
    else:
        bounds = [0] + list(sections) + [size]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    names = g.node("Split", [x.name, g.ints(sizes, "split")], call.base,
                   outputs=len(sizes), axis=x.physical(int(axis)))
    names = names if isinstance(names, list) else [names]
    return [call.out(n, x.perm, i) for i, n in enumerate(names)]


def pad(g, call, widths, mode, constant):
    x = call.inputs[0]
    if mode not in ("constant", "reflect"):  # ONNX's "reflect" is NumPy's
        raise Uncovered([(call.base, "Pad", f"mode={mode!r}")])
    widths = [tuple(w) for w in widths]
    pads = [widths[a][0] for a in x.perm] + [widths[a][1] for a in x.perm]
    inputs = [x.name, g.ints(pads, "pads")]
    if constant and mode == "constant":
        inputs.append(g.scalar(float(constant)))
    return [call.out(g.node("Pad", inputs, call.base, mode=mode), x.perm)]


def reshape(g, call, shape):
    if shape[0] not in (None, -1) or list(shape[1:]).count(-1) > 0:
        x = g.keras(call.inputs[0])
        shape = [-1 if d is None else int(d) for d in shape]
        return [call.out(g.node("Reshape", [x.name, g.ints(shape)], call.base))]
    name, perm = structure.reshape_to(g, call.inputs[0], call.shapes[0], call.base)
    return [call.out(name, perm)]


def emit_op(g, call):
    """A Keras 3 op node."""
    op = call.layer
    return _emit(g, call, type(op).__name__, list(call.args), op)


def emit_tf_function(g, call):
    """A tf-keras `TFOpLambda` layer."""
    function = call.layer.get_config().get("function")
    kind = TF_FUNCTIONS.get(function)
    if kind is None:
        raise Uncovered([(call.layer.name, "TFOpLambda", f"tf.{function}")])
    args = list(call.args)
    kwargs = {k: v for k, v in call.kwargs.items() if k != "name"}

    class Params:
        axis = kwargs.get("axis", args[1] if kind == "Concatenate" and len(args) > 1 else -1)
        keepdims = kwargs.get("keepdims", False)
        newshape = kwargs.get("shape", args[1] if len(args) > 1 else None)
        approximate = kwargs.get("approximate", False)

    if kind in _BINARY and len(args) < 2:
        args += [kwargs.get("y")]
    if kind == "AddN":
        return binary(g, call, "Sum", list(args[0]))
    return _emit(g, call, kind, args, Params)


def _emit(g, call, kind, args, op):
    if kind in _BINARY:
        return binary(g, call, _BINARY[kind], args[:2])
    if kind in _UNARY:
        return [call.out(g.node(_UNARY[kind], [call.inputs[0].name], call.base),
                         call.inputs[0].perm)]
    if kind == "Square":
        x = call.inputs[0]
        return [call.out(g.node("Mul", [x.name, x.name], call.base), x.perm)]
    if kind in _ACTIVATIONS:
        params = {k: getattr(op, k) for k in ("axis", "negative_slope", "alpha", "approximate")
                  if hasattr(op, k)}
        return [activations.apply(g, call.inputs[0], _ACTIVATIONS[kind], call.base, **params)]
    if kind in _REDUCE:
        return reduce(g, call, _REDUCE[kind], op.axis, bool(op.keepdims))
    if kind == "Concatenate":
        return concatenate(g, call, [v for v in args[0]], op.axis)
    if kind == "Split":
        return split(g, call, op.indices_or_sections, op.axis)
    if kind == "Pad":
        constant = args[1] if len(args) > 1 else call.kwargs.get("constant_values")
        return pad(g, call, op.pad_width, op.mode, constant)
    if kind == "Reshape":
        return reshape(g, call, op.newshape)
    if kind == "Transpose":
        x = call.inputs[0]
        axes = op.axes if op.axes is not None else tuple(reversed(range(x.rank)))
        return [call.out(x.name, [list(axes).index(a) for a in x.perm])]
    if kind == "Cast" and str(getattr(op.dtype, "name", op.dtype)) == "float32":
        return [call.inputs[0]]
    raise Uncovered([(call.base, kind, "op")])
