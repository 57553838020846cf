"""Categorical preprocessing layers as ONNX nodes: CategoryEncoding, Discretization, IntegerLookup.

Indices arrive as numbers (float inputs are truncated, as Keras casts
them) and become one-hot rows (`OneHot`), multi-hot rows (their maximum)
or counts (their sum) over the `[batch, n]` input. Discretization's bucket
of `x` is the number of boundaries `<= x` (TensorFlow's `Bucketize`), an
int32 in its "int" mode as in Keras. IntegerLookup compares each value with
its (static) vocabulary: the first equal token gives the index, as the
layer's hash table does.
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


def _special_indices(layer):
    """(first OOV index, first vocabulary index), as Keras's lookup layers number them."""
    oov_start = 1 if layer.mask_token is not None and layer.output_mode == "int" else 0
    return oov_start, oov_start + layer.num_oov_indices


def _lookup(g, call, x, tokens, layer):
    """int64 indices of `x` (int64) in `tokens`; out-of-vocabulary values to the OOV indices."""
    oov_start, token_start = _special_indices(layer)
    if layer.num_oov_indices == 0:
        _refuse(call, "num_oov_indices=0 (Keras raises on an out-of-vocabulary value at run "
                      "time; an ONNX graph cannot)")
    if layer.num_oov_indices > 1 and getattr(layer, "oov_method", None) == "farmhash":
        _refuse(call, "oov_method='farmhash' (a string hash: no ONNX op)")
    if not len(tokens):
        _refuse(call, "an empty vocabulary")
    table = g.ints(tokens, f"{call.base}/vocabulary")
    equal = g.node("Equal", [g.node("Unsqueeze", [x, g.ints([-1])], call.base), table],
                   call.base)
    hits = g.node("Cast", [equal], call.base, to=INT64)
    found = g.node("Cast", [g.reduce("ReduceMax", hits, [-1], False, call.base)], call.base,
                   to=9)
    index = g.node("Add", [g.node("ArgMax", [hits], call.base, axis=-1, keepdims=0),
                           g.ints([token_start])], call.base)
    if layer.num_oov_indices == 1:
        oov = g.ints([oov_start])
    else:  # integer keys: TensorFlow's floor modulo, which ONNX Mod (fmod=0) also is
        oov = g.node("Add", [g.node("Mod", [x, g.ints([layer.num_oov_indices])], call.base),
                             g.ints([oov_start])], call.base)
    index = g.node("Where", [found, index, oov], call.base)
    if layer.mask_token is not None:
        masked = g.node("Equal", [x, g.ints([int(layer.mask_token)])], call.base)
        value = 0 if layer.output_mode == "int" else np.iinfo(np.int64).max  # dropped by OneHot
        index = g.node("Where", [masked, g.ints([value]), index], call.base)
    return index


def _invert(g, call, x, tokens, layer):
    """Tokens of int64 indices `x`; indices outside the vocabulary give `oov_token`."""
    _, token_start = _special_indices(layer)
    table = g.ints(tokens, f"{call.base}/vocabulary")
    position = g.node("Sub", [x, g.ints([token_start])], call.base)
    inside = g.node("And", [g.node("GreaterOrEqual", [position, g.ints([0])], call.base),
                            g.node("Less", [position, g.ints([len(tokens)])], call.base)],
                    call.base)
    safe = g.node("Where", [inside, position, g.ints([0])], call.base)
    picked = g.node("Gather", [table, safe], call.base, axis=0)
    out = g.node("Where", [inside, picked, g.ints([int(layer.oov_token)])], call.base)
    if layer.mask_token is not None:
        masked = g.node("Equal", [x, g.ints([0])], call.base)
        out = g.node("Where", [masked, g.ints([int(layer.mask_token)]), out], call.base)
    return out


def integer_lookup(g, call):
    """IntegerLookup with a fixed vocabulary: every output mode, `invert`, OOV buckets."""
    layer = call.layer
    if getattr(layer, "sparse", False):
        _refuse(call, "sparse output")
    tokens = [int(t) for t in layer.get_vocabulary(include_special_tokens=False)]
    x = g.keras(call.inputs[0])
    indices = g.node("Cast", [x.name], call.base, to=INT64)
    if layer.invert:
        return [call.out(_invert(g, call, indices, tokens, layer))]
    looked_up = _lookup(g, call, indices, tokens, layer)
    if layer.output_mode == "int":
        return [call.out(looked_up)]
    mode = "count" if layer.output_mode == "tf_idf" else layer.output_mode
    depth = layer.max_tokens if layer.pad_to_max_tokens else layer.vocabulary_size()
    encoded = _encode(g, call, looked_up, x.rank, x.shape[-1], mode, depth)
    if layer.output_mode == "tf_idf":
        weights = np.asarray(layer.idf_weights_const, np.float32)
        encoded = g.node("Mul", [encoded, g.constant(weights, f"{call.base}/idf")], call.base)
    return [call.out(encoded)]


# Layers whose compute dtype is an integer one: their emitters cast the input.
INTEGER_LAYERS = {"IntegerLookup"}

EMITTERS = {
    "CategoryEncoding": category_encoding,
    "Discretization": discretization,
    "IntegerLookup": integer_lookup,
}
