"""Integer ops onnxruntime has no kernel for, run on a wider integer type.

ONNX allows an int16 `Max`, a uint32 `CumSum` or a uint16 `ArgMax`, but
onnxruntime (1.31) registers no CPU kernel for them: a graph holding one
does not load. Emitters write each op once for every dtype, so this pass
finds such nodes once the graph is emitted, from ONNX's own type inference,
and runs each on casts of its data to a type that holds every value
exactly, its data output cast back. Sums and products wrap in the wider type
and keep their low bits, so the cast back gives the wrapped result Keras
gives. onnxruntime's integer `ReduceSum` adds in float64, so an int64 sum
(also of the uint32/uint64 data widened to it) would lose its low bits past
2**53 and saturate where Keras wraps: each int64 sum is split into the sums of
the data's high and low 32 bits (`_exact_sum`), which float64 holds
exactly. A gap with no exact widening (a uint64 `ArgMax`, whose order int64
does not keep) is left to the check, which refuses the graph in one line.

The pass costs nothing on float graphs: it runs type inference (on the
graph without its initializers' data) only where the graph holds both an op
of `_GAPS` and a type that op lacks (int64 for a `ReduceSum`; int64
initializers, which every graph holds as axes and shapes, do not count).
"""

import onnx

from bnconvert.onnx.math import WHERE_THROUGH
from bnconvert.onnx.math import onnx_dtype
from bnconvert.onnx.node_index import placed_at
from bnconvert.onnx.node_index import position

T = onnx.TensorProto
_SHORT = {T.INT16: T.INT32, T.UINT16: T.INT32}
_BYTES = {T.INT8: T.INT32, T.UINT8: T.INT32, **_SHORT}
_WRAPPING = {T.UINT32: T.INT64, T.UINT64: T.INT64}  # two's complement keeps the low bits
_ORDERED = {**_SHORT, T.UINT32: T.INT64}
# `math.select`'s table: emitters that know their dtype select through it
# without type inference (which `_holds` would not run for the bools of a
# comparison); this pass applies it to the other `Where`s.
_SELECTED = {onnx_dtype(k): onnx_dtype(v) for k, v in WHERE_THROUGH.items()}

# op type -> (the inputs holding data, whether output 0 is data, type -> wider type).
# Some of these types ONNX itself does not allow for the op (an int16 `CumSum`):
# emitters write an op in the dtype Keras computes in, and this pass makes it
# one ONNX allows. (`ReduceMax`/`ReduceMin` of uint32 are left out:
# onnxruntime's int64 `ReduceMin` returns 2**32 - 1 for a row holding it.)
_GAPS = {
    "Max": (None, True, _SHORT),
    "Min": (None, True, _SHORT),
    "Relu": ((0,), True, _SHORT),
    "Clip": (None, True, _SHORT),
    "Pad": ((0, 2), True, _SHORT),
    "Where": ((1, 2), True, _SELECTED),
    "CumSum": ((0,), True, {**_BYTES, **_WRAPPING}),
    "ReduceSum": ((0,), True, _WRAPPING),
    "ReduceMax": ((0,), True, _SHORT),
    "ReduceMin": ((0,), True, _SHORT),
    "ArgMax": ((0,), False, _ORDERED),
    "ArgMin": ((0,), False, _ORDERED),
    "TopK": ((0,), True, {**_ORDERED, T.BOOL: T.UINT8}),
    "Resize": ((0,), True, _SHORT),
    "Einsum": (None, True, {**_BYTES, **_WRAPPING}),
}


def widen_integer_kernels(g, inputs, outputs):
    """Runs the nodes of `g` onnxruntime has no kernel for on wider integer casts.

    Args:
        g: The `Graph`, fully emitted and rewritten.
        inputs: Its `(name, shape, element type)` inputs.
        outputs: Its `(name, shape, element type)` outputs.
    """
    lacking = {t for n in g.all_nodes() if n.op_type in _GAPS and not n.domain
               for t in [*_GAPS[n.op_type][2], *([T.INT64] if n.op_type == "ReduceSum" else [])]}
    if not lacking or not _holds(g, inputs, lacking):
        return
    # Initializers enter as typed inputs: their data is not needed to type the graph.
    declared = [(n, a.shape, onnx.helper.np_dtype_to_tensor_dtype(a.dtype))
                for n, a in g.initializers]
    try:
        model = onnx.shape_inference.infer_shapes(
            g.model("types", [*inputs, *declared], outputs, "bnconvert", initializers=False))
    except Exception:  # noqa: BLE001 - a graph ONNX cannot type is the check's to report
        return
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    for node in [n for n in g.nodes if n.op_type in _GAPS and not n.domain]:
        data, data_out, wider = _GAPS[node.op_type]
        slots = range(len(node.input)) if data is None else data
        slots = [i for i in slots if i < len(node.input) and node.input[i]]
        source = types.get(node.input[slots[0]]) if slots else None
        if source in wider:
            _on_casts(g, node, slots, data_out, source, wider[source])
            source = wider[source]
        if node.op_type == "ReduceSum" and source == T.INT64:
            _exact_sum(g, node)


def _holds(g, inputs, types):
    """Whether a tensor of `g` can have one of `types` (a quick scan)."""
    if any(i[2] in types for i in inputs if len(i) > 2):
        return True
    # (Not int64 initializers: every graph holds some, as axes and shapes.)
    if any(onnx.helper.np_dtype_to_tensor_dtype(a.dtype) in types - {T.INT64}
           for _, a in g.initializers):
        return True
    for node in g.all_nodes():
        for attr in node.attribute:
            if attr.name == "to" and attr.i in types:
                return True
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in types:
                return True
    return False


def _on_casts(g, node, slots, data_out, source, wider):
    base = node.output[0]
    if data_out:
        out = node.output[0]
        node.output[0] = g.unique(f"{base}/wide")
        with placed_at(g, position(g, node) + 1):
            g.node("Cast", [node.output[0]], base, output_names=[out], to=source)
    with placed_at(g, position(g, node)):
        for i in slots:
            node.input[i] = g.node("Cast", [node.input[i]], f"{base}/widen", to=wider)


def _exact_sum(g, node):
    """Makes an int64 `ReduceSum` exact: high and low 32 bits summed apart.

    Each half's sum stays below 2**53 for fewer than 2**21 terms, so
    onnxruntime's float64 adding keeps it; `high * 2**32 + low` wraps in
    int64 as Keras's sum does.
    """
    base, half = node.output[0], g.ints(2 ** 32, "half")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    with placed_at(g, position(g, node)):
        low = g.node("Mod", [node.input[0], half], f"{base}/low", fmod=0)
        high = g.node("Div", [g.node("Sub", [node.input[0], low], base), half], f"{base}/high")
        high_sum = g.node("ReduceSum", [high, *node.input[1:]], f"{base}/high", **attrs)
    out = node.output[0]
    node.input[0], node.output[0] = low, g.unique(f"{base}/low")
    with placed_at(g, position(g, node) + 1):
        g.node("Add", [g.node("Mul", [high_sum, half], base), node.output[0]], base,
               output_names=[out])
