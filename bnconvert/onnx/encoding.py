"""Categorical preprocessing layers as ONNX nodes: CategoryEncoding, Discretization.

Indices arrive as numbers (float inputs are truncated, as Keras casts
them) and become one-hot rows (`OneHot`), multi-hot rows (their maximum)
or counts (their sum) over the `[batch, n]` input. Discretization's bucket
of `x` is the number of boundaries `<= x` (TensorFlow's `Bucketize`), an
int32 in its "int" mode as in Keras.
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered

INT32, INT64 = 6, 7


def _refuse(call, why):
    raise Uncovered([(call.base, type(call.layer).__name__, why)])


def _encode(g, call, indices, rank, width, mode, depth):
    """`[batch, n]` int64 `indices` as one-hot (n = 1), multi-hot or count rows."""
    if rank != 2 or (mode == "one_hot" and width != 1) or \
            mode not in ("one_hot", "multi_hot", "count") or getattr(call.layer, "sparse", False):
        _refuse(call, f"output_mode={mode!r} on this input (or sparse output)")
    hot = g.node("OneHot", [indices, g.ints([int(depth)]),
                            g.constant(np.array([0.0, 1.0], np.float32), "values")],
                 call.base, axis=-1)
    op_type = "ReduceSum" if mode == "count" else "ReduceMax"
    return g.reduce(op_type, hot, [1], False, call.base)


def category_encoding(g, call):
    """CategoryEncoding: one_hot, multi_hot or count (no `count_weights`)."""
    if call.kwargs.get("count_weights") is not None:
        _refuse(call, "count_weights")
    x = g.keras(call.inputs[0])
    indices = g.node("Cast", [x.name], call.base, to=INT64)
    layer = call.layer
    return [call.out(_encode(g, call, indices, x.rank, x.shape[-1], layer.output_mode,
                             layer.num_tokens))]


def discretization(g, call):
    """Discretization by fixed `bin_boundaries`, in every output mode."""
    layer = call.layer
    if layer.bin_boundaries is None:
        _refuse(call, "no bin_boundaries")
    x = g.keras(call.inputs[0])
    bins = g.constant(np.asarray(layer.bin_boundaries, np.float32), f"{call.base}/bins")
    expanded = g.node("Unsqueeze", [x.name, g.ints([x.rank])], call.base)
    above = g.node("Cast", [g.node("GreaterOrEqual", [expanded, bins], call.base)], call.base,
                   to=INT64)
    indices = g.reduce("ReduceSum", above, [x.rank], False, call.base)
    if layer.output_mode == "int":
        return [call.out(g.node("Cast", [indices], call.base, to=INT32))]
    return [call.out(_encode(g, call, indices, x.rank, x.shape[-1], layer.output_mode,
                             len(layer.bin_boundaries) + 1))]


EMITTERS = {
    "CategoryEncoding": category_encoding,
    "Discretization": discretization,
}
