"""Whole-graph rewrites the native walk applies once every layer is emitted.

Both work on a `Graph` in place: lowering a float32 graph to float16
(`--precision float16`), and turning divisions by constants into products.
"""

import numpy as np
import onnx
import onnx.numpy_helper

from bnconvert.onnx.graph import FLOAT
from bnconvert.onnx.graph import FLOAT16
from bnconvert.onnx.graph import FLOAT32_INPUTS


def to_float16(graph):
    """Lowers the nodes emitted so far from float32 to float16.

    Float initializers and constants become float16 and every
    `Cast` to float32 a `Cast` to float16, except the inputs ONNX wants
    in float32 whatever the data (`Resize` scales and roi).
    """
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


# Finite float32 values beyond float16's range (the -1e9 of a masked softmax)
# become 0.7 of its largest value, as Keras's own float16 masks do: as inf,
# a fully masked row of a softmax would be NaN.
_HALF_LARGE = 0.7 * float(np.finfo(np.float16).max)


def _half(array):
    """A float32 array as float16, overflowing finite values kept finite."""
    array = np.asarray(array)
    big = np.isfinite(array) & (np.abs(array) > float(np.finfo(np.float16).max))
    return np.where(big, np.sign(array) * _HALF_LARGE, array).astype(np.float16)
