"""Whole-graph rewrites the native walk applies once every layer is emitted.

Each works on a `Graph` in place: lowering a float32 graph to float16
(`--precision float16`), turning divisions by constants into products,
and keeping onnxruntime from folding a zero `Pad` into a pooling.
"""

import numpy as np
import onnx
import onnx.numpy_helper

from bnconvert.onnx.graph import FLOAT
from bnconvert.onnx.graph import FLOAT16
from bnconvert.onnx.graph import FLOAT32_INPUTS
from bnconvert.onnx.node_index import Index
from bnconvert.onnx.node_index import attribute
from bnconvert.onnx.node_index import placed_at
from bnconvert.onnx.node_index import position


def to_float16(graph):
    """Lowers the nodes emitted so far from float32 to float16.

    Float initializers and constants become float16 and every
    `Cast` to float32 a `Cast` to float16, except the inputs ONNX wants
    in float32 whatever the data (`Resize` scales and roi). Ops
    onnxruntime has no float16 kernel for stay float32 (`_NO_FLOAT16`).
    """
    ranges = _float_ranges(graph)
    keep = {}
    for node in graph.all_nodes():
        for i in FLOAT32_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                keep[node.input[i]] = None
    lowered = []
    for name, array in graph.initializers:
        if array.dtype == np.float32:
            if name in keep:
                keep[name] = graph.unique(f"{name}/float32")
                lowered.append((keep[name], array))
            array = _half(array)
        lowered.append((name, array))
    graph.initializers = lowered
    for body in graph.subgraphs():
        for info in list(body.input) + list(body.output):
            if info.type.tensor_type.elem_type == FLOAT:
                info.type.tensor_type.elem_type = FLOAT16
    for node in graph.all_nodes():
        for i in FLOAT32_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and keep.get(node.input[i]):
                node.input[i] = keep[node.input[i]]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(onnx.numpy_helper.from_array(
                    _half(onnx.numpy_helper.to_array(attr.t)), attr.t.name))
    for node in ranges:
        _in_float32(graph, node, range(len(node.input)), True)
    for node in [n for n in graph.nodes if n.output and n.output[0] in graph.float32_nodes]:
        inputs, float_out, lacking = _NO_FLOAT16.get(node.op_type, ((), False, None))
        if lacking is not None and lacking(node, graph.opset):
            _in_float32(graph, node, inputs, float_out)


# Ops onnxruntime (1.31) has no float16 kernel for, run in float32 in a float16
# graph where their emitters mark them (`Graph.float32_data`): op type ->
# (its float inputs, whether its output is float, whether a node lacks a kernel).
# (`Range`, which has none either, is found from its bounds: `_float_ranges`.)
_NO_FLOAT16 = {
    "IsInf": ((0,), False, lambda node, opset: opset < 20),
    "Celu": ((0,), True, lambda node, opset: True),
    "CumSum": ((0,), True, lambda node, opset: opset < 14),
    "ScatterND": ((0, 2), True,
                  lambda node, opset: attribute(node, "reduction", b"none") != b"none"),
}

# Ops whose output has the type of their first input.
_SAME_TYPE = ("Reshape", "Squeeze", "Unsqueeze", "Identity", "Neg", "Abs")


def _float_ranges(graph):
    """The `Range` nodes of `graph` counting in float32.

    onnxruntime has no float16 `Range` (a rotary embedding's positions);
    such a node is found from its bounds: float32 initializers, constants
    or casts, seen through views.
    """
    producer = {out: n for n in graph.nodes for out in n.output}
    floats = {name for name, array in graph.initializers if array.dtype == np.float32}

    def is_float(name, depth=0):
        node = producer.get(name)
        if name in floats or node is None or depth > 8:
            return name in floats
        if node.op_type == "Cast":
            return attribute(node, "to", None) == FLOAT
        if node.op_type == "Constant":
            return any(a.t.data_type == FLOAT for a in node.attribute if a.name == "value")
        return node.op_type in _SAME_TYPE and is_float(node.input[0], depth + 1)

    return [n for n in graph.nodes if n.op_type == "Range" and any(map(is_float, n.input))]


def _in_float32(graph, node, inputs, float_out):
    """Runs a lowered `node` on float32 casts of its `inputs`.

    Its first output is cast back to float16 if `float_out` (a `Range`,
    a `Celu`), else kept (the bools of an `IsInf`).
    """
    if float_out:
        out, base = node.output[0], node.output[0]
        node.output[0] = graph.unique(f"{base}/float32")
        with placed_at(graph, position(graph, node) + 1):
            graph.node("Cast", [node.output[0]], base, output_names=[out], to=FLOAT16)
    with placed_at(graph, position(graph, node)):
        for i in inputs:
            node.input[i] = graph.node("Cast", [node.input[i]], node.output[0], to=FLOAT)

def divisions_to_products(graph):
    """Turns each `Div` by a float constant into a `Mul` by its reciprocal.

    onnxruntime divides more slowly than it multiplies (an image
    `Normalization` before the stem costs 3% of EfficientNetV2B0's run);
    the product differs from the quotient by at most one rounding.
    """
    arrays = dict(graph.initializers)
    for node in graph.all_nodes():
        if node.op_type != "Div" or node.input[1] not in arrays:
            continue
        divisor = arrays[node.input[1]]
        if divisor.dtype.kind != "f":
            continue
        with np.errstate(divide="ignore", over="ignore"):
            reciprocal = (1.0 / divisor.astype(np.float64)).astype(divisor.dtype)
        if not np.all(np.isfinite(reciprocal)):
            continue
        node.op_type = "Mul"
        node.input[1] = graph.constant(reciprocal, f"{node.input[1]}/reciprocal",
                                      divisor.dtype)


# Ops whose outputs are never negative: a zero `Pad` after one of them pads
# below or at every window's maximum, so a `MaxPool` ignoring it agrees.
_NON_NEGATIVE = ("Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus")


def keep_pads_before_pools(g, output_names):
    """Keeps onnxruntime from folding a constant `Pad` into the pooling after it.

    onnxruntime's `PadFusion` moves a zero `Pad` into the pool's `pads`,
    which a `MaxPool` ignores (as if they were -inf): where a window's own
    values are all negative, the fused graph returns their maximum instead
    of the padding's 0 (Keras's `ZeroPadding2D` before `MaxPooling2D`), by
    3.7 on inputs around -3. The fusion is left where the padded values
    are never negative (after a `Relu`, as in ResNet50). An `AveragePool`
    after explicit zeros counts them (Keras's "valid" pooling of a
    `ZeroPadding2D`), and a `pads` as wide as its window is refused: the
    1x1 pooling that subsamples a zero-padded tensor for a strided 1x1
    convolution (`subsample`) failed to load once fused. The fusion is
    blocked there: onnxruntime does not fuse a `Pad` given `axes` (opset
    18 and later), nor one read through a `Reshape` to its own shape (a view).
    """
    index = Index(g, output_names)
    for pad in [n for n in g.nodes if n.op_type == "Pad" and not n.domain]:
        readers = index.consumers.get(pad.output[0], [])
        if (attribute(pad, "mode", b"constant") != b"constant" or len(pad.input) > 3
                or pad.output[0] in output_names or len(readers) != 1
                or readers[0].op_type not in ("MaxPool", "AveragePool")
                or (readers[0].op_type == "MaxPool" and _non_negative(index, pad.input[0]))):
            continue
        pads = index.arrays.get(pad.input[1])
        if pads is None:  # onnxruntime fuses constant pads only
            continue
        if g.opset >= 18:
            pad.input.extend([""] * (3 - len(pad.input)))
            pad.input.append(g.ints(list(range(pads.size // 2)), "axes"))
            continue
        with placed_at(g, position(g, pad) + 1):
            shape = g.node("Shape", [pad.output[0]], pad.output[0])
            readers[0].input[0] = g.node("Reshape", [pad.output[0], shape], pad.output[0])


def _non_negative(index, name):
    producer = index.producer.get(name)
    if producer is None:
        return False
    if producer.op_type == "Clip" and len(producer.input) > 1:
        low = index.arrays.get(producer.input[1])
        return low is not None and bool(np.all(low >= 0))
    return producer.op_type in _NON_NEGATIVE


# Finite float32 values beyond float16's range (the -1e9 of a masked softmax)
# become 0.7 of its largest value, as Keras's own float16 masks do: as inf,
# a fully masked row of a softmax would be NaN.
_HALF_LARGE = 0.7 * float(np.finfo(np.float16).max)


def _half(array):
    """A float32 array as float16, overflowing finite values kept finite."""
    array = np.asarray(array)
    big = np.isfinite(array) & (np.abs(array) > float(np.finfo(np.float16).max))
    return np.where(big, np.sign(array) * _HALF_LARGE, array).astype(np.float16)
