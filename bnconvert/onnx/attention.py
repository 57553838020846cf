"""Attention and embedding layers as ONNX nodes.

All of these work on `(batch, steps, features)` tensors in the Keras
layout. MultiHeadAttention is written as four projections (`Einsum`, the
layer's own equations, with their biases), then per head
`softmax(q k^T / sqrt(key_dim))` masked where the mask is False (in the
way the Keras version and code path at hand does, see `masked_softmax`),
and the weighted values projected back. Masks are booleans in ONNX: a float mask counts as
True where it is non-zero, as Keras's casts do.
"""

import inspect

import numpy as np

from bnconvert.onnx import activations
from bnconvert.onnx import quantized
from bnconvert.onnx.graph import BOOL
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.layers import weights
from bnconvert.onnx.math import as_value

_LARGE_NEGATIVE = -1e9


def arguments(call):
    """The call's arguments by name (`Value`s for tensors), defaults left out."""
    try:
        bound = inspect.signature(call.layer.call).bind_partial(*call.args, **call.kwargs)
    except TypeError as e:  # a call recorded with arguments its signature does not take
        _refuse(call, f"its recorded arguments ({e})")
    return dict(bound.arguments)


def _refuse(call, why):
    raise Uncovered([(call.base, type(call.layer).__name__, why)])


def einsum_dense(g, layer, x, base):
    """An EinsumDense's output for the name of `x` (Keras layout): einsum, bias, activation."""
    quantized.refuse(layer, base)
    kernel = g.constant(weights(layer.kernel), f"{base}/kernel")
    name = g.node("Einsum", [x, kernel], base, equation=layer.equation.replace(" ", ""))
    bias = getattr(layer, "bias", None)
    if bias is not None:
        name = g.node("Add", [name, g.constant(weights(bias), f"{base}/bias")], base)
    return name


def einsum_dense_layer(g, call):
    """EinsumDense."""
    x = g.keras(call.inputs[0])
    name = einsum_dense(g, call.layer, x.name, call.base)
    return [activations.apply(g, call.out(name), call.layer.activation, call.base)]


def as_bool(g, mask, base):
    """A mask `Value` as an ONNX bool tensor in the Keras layout."""
    return g.node("Cast", [g.keras(mask).name], base, to=BOOL)


def _causal(g, query, key, base):
    """`[1, T, S]` bool: row index >= column index (Keras's causal mask)."""
    zero, one = g.scalar(0, np.int64), g.scalar(1, np.int64)

    def steps(value):
        size = g.node("Gather", [g.node("Shape", [value], base), g.scalar(1, np.int64)], base,
                      axis=0)
        return g.node("Range", [zero, size, one], base)

    rows = g.node("Unsqueeze", [steps(query), g.ints([0, 2])], base)
    cols = g.node("Unsqueeze", [steps(key), g.ints([0, 1])], base)
    return g.node("GreaterOrEqual", [rows, cols], base)


def _and(g, a, b, base):
    if a is None or b is None:
        return a or b
    return g.node("And", [a, b], base)


def masked_softmax(g, scores, mask, base, style):
    """The masked softmax over the last axis, in one of Keras's three styles.

    - "layer" (Keras 3's Softmax layer): -1e9 where masked, then weights 0 there;
    - "fused" (Keras 3's `dot_product_attention`): -0.7 * float32 max where
      masked, nothing after (a fully masked row is uniform);
    - "additive" (tf-keras's Softmax layer): -1e9 added where masked.
    """
    if mask is None:
        return g.node("Softmax", [scores], base, axis=-1)
    if style == "additive":
        shifted = g.node("Add", [scores, g.scalar(_LARGE_NEGATIVE)], base)
        return g.node("Softmax", [g.node("Where", [mask, scores, shifted], base)], base, axis=-1)
    low = _LARGE_NEGATIVE if style == "layer" else -0.7 * 3.38953e38
    weights_ = g.node("Softmax", [g.node("Where", [mask, scores, g.scalar(low)], base)], base,
                      axis=-1)
    if style == "fused":
        return weights_
    return g.node("Where", [mask, weights_, g.scalar(0.0)], base)


def _operands(g, call, args, names):
    """`args` with the tensors `names` as Values: a concrete one (computed from a layer's
    variables alone, as SigLIP's pooling probe repeated to the batch of a per-sample trace)
    becomes an initializer."""
    def value(x, name):
        return x if x is None or isinstance(x, Value) else as_value(g, x, f"{call.base}/{name}")

    if "inputs" in names:
        return {**args, "inputs": [value(x, f"inputs_{i}") for i, x in enumerate(args["inputs"])]}
    return {**args, **{n: value(args[n], n) for n in names if n in args}}


def _softmax_style(layer, args):
    """Which masked softmax `layer` runs (see `masked_softmax`)."""
    if not type(layer).__module__.startswith("keras."):
        return "additive"
    dropout = getattr(layer, "_dropout", getattr(layer, "dropout", 0.0)) or 0.0
    return "layer" if args.get("return_attention_scores") or dropout > 0 else "fused"


def _repeat_heads(g, name, repeats, size, base):
    """`[B, S, KV, size]` -> `[B, S, KV * repeats, size]`, each head repeated in place."""
    expanded = g.node("Unsqueeze", [name, g.ints([3])], base)
    expanded = g.node("Expand", [expanded, g.ints([1, 1, 1, repeats, 1])], base)
    return g.node("Reshape", [expanded, g.ints([0, 0, -1, size])], base)


def multi_head_attention(g, call):
    """MultiHeadAttention over one attention axis (rank-3 inputs); GroupedQueryAttention."""
    layer = call.layer
    args = _operands(g, call, arguments(call), ("query", "key", "value"))
    query, value = args["query"], args["value"]
    key = args.get("key")
    key = value if key is None else key
    if any(v.rank != 3 for v in (query, key, value)) or \
            tuple(getattr(layer, "_attention_axes", None) or (1,)) != (1,):
        _refuse(call, "attention over other than one sequence axis (rank-3 inputs)")
    if getattr(layer, "_sliding_window", getattr(layer, "sliding_window", None)) is not None:
        _refuse(call, "sliding_window")
    base = call.base
    q_in, k_in, v_in = (g.keras(v).name for v in (query, key, value))
    scale = getattr(layer, "_inverse_sqrt_key_dim", getattr(layer, "_inverse_sqrt_head_dim",
                                                            None))
    scale = 1.0 / np.sqrt(float(layer._key_dim)) if scale is None else scale

    def heads_first(name, last):  # [B, T, H, D] -> [B, H, T, D] (or [B, H, D, T])
        return g.node("Transpose", [name], base, perm=[0, 2, 3, 1] if last else [0, 2, 1, 3])

    q = einsum_dense(g, layer._query_dense, q_in, f"{base}/query")
    q = g.node("Mul", [q, g.scalar(float(scale))], base)
    k = einsum_dense(g, layer._key_dense, k_in, f"{base}/key")
    v = einsum_dense(g, layer._value_dense, v_in, f"{base}/value")
    repeats = int(getattr(layer, "num_repeats", 1))
    if repeats > 1:
        k, v = (_repeat_heads(g, t, repeats, int(dense.kernel.shape[-1]), base)
                for t, dense in ((k, layer._key_dense), (v, layer._value_dense)))
    scores = g.node("MatMul", [heads_first(q, False), heads_first(k, True)], base)
    mask = _attention_mask(g, call, args, query, q_in, k_in)
    if mask is not None:
        mask = g.node("Unsqueeze", [mask, g.ints([1])], base)  # over the heads
    probabilities = masked_softmax(g, scores, mask, base, _softmax_style(layer, args))
    out = g.node("MatMul", [probabilities, heads_first(v, False)], base)
    out = g.node("Transpose", [out], base, perm=[0, 2, 1, 3])
    if getattr(layer, "_use_gate", getattr(layer, "use_gate", False)):
        gate = einsum_dense(g, layer._gate_dense, q_in, f"{base}/gate")
        gate = activations.apply(g, Value(gate, (None,) * 4, (0, 1, 2, 3)),
                                 layer._gate_dense.activation, f"{base}/gate")
        out = g.node("Mul", [out, gate.name], base)
    out = einsum_dense(g, layer._output_dense, out, f"{base}/output")
    results = [call.out(out)]
    if args.get("return_attention_scores"):
        results.append(call.out(probabilities, index=1))
    return results


def _attention_mask(g, call, args, query, q_in, k_in):
    """The `[B, T, S]` bool mask of (grouped-query) multi-head attention, or None.

    Keras fills `query_mask`, `value_mask` and `key_mask` (for a key given)
    from the inputs' Keras masks when the call does not pass them (an
    Embedding's `mask_zero`); MultiHeadAttention reads the query's Keras
    mask itself, whatever `query_mask` says.
    """
    base = call.base

    def carried(value):  # the Keras mask an input tensor carries
        return call.masks[call.inputs.index(value)] if call.masks and value in call.inputs \
            else None

    query_mask = args.get("query_mask")
    if type(call.layer).__name__ == "MultiHeadAttention" or query_mask is None:
        query_mask = carried(query)
    # Keras fills these at call time; the graph node does not record them.
    value_mask = args.get("value_mask")
    value_mask = carried(args["value"]) if value_mask is None else value_mask
    key_mask = args.get("key_mask")
    if key_mask is None and args.get("key") is not None:
        key_mask = carried(args["key"])
    given = args.get("attention_mask")
    for m in (query_mask, value_mask, key_mask, given):
        if m is not None and not isinstance(m, Value):
            _refuse(call, "a mask the exporter cannot follow (not computed in the graph)")
    mask = None
    if query_mask is not None:
        mask = g.node("Unsqueeze", [as_bool(g, query_mask, base), g.ints([2])], base)
    for m in (value_mask, key_mask):
        if m is not None:
            mask = _and(g, mask, g.node("Unsqueeze", [as_bool(g, m, base), g.ints([1])], base),
                        base)
    if args.get("use_causal_mask"):
        mask = _and(g, mask, _causal(g, q_in, k_in, base), base)
    if given is not None:
        mask = _and(g, as_bool(g, given, base), mask, base)
    return mask


def dot_attention(g, call):
    """Attention (dot or concat scores) and AdditiveAttention."""
    layer = call.layer
    args = _operands(g, call, arguments(call), ("inputs",))
    inputs = list(args["inputs"])
    query, value = inputs[0], inputs[1]
    key = inputs[2] if len(inputs) > 2 else value
    base = call.base
    q, k, v = (g.keras(x).name for x in (query, key, value))
    scale = getattr(layer, "scale", None)
    use_scale = getattr(layer, "use_scale", False)
    scale = _number(scale) if use_scale and scale is not None else None
    mode = "additive" if type(layer).__name__ == "AdditiveAttention" else layer.score_mode
    if mode == "dot":
        scores = g.node("MatMul", [q, g.node("Transpose", [k], base, perm=[0, 2, 1])], base)
        if scale is not None:
            scores = g.node("Mul", [scores, g.scalar(scale)], base)
    else:
        expanded_q = g.node("Unsqueeze", [q, g.ints([2])], base)
        expanded_k = g.node("Unsqueeze", [k, g.ints([1])], base)
        total = g.node("Add", [expanded_q, expanded_k], base)
        if mode == "additive":
            tanh = g.node("Tanh", [total], base)
            if use_scale:  # a per-feature weight
                scaled = g.constant(weights(layer.scale), f"{base}/scale")
                tanh = g.node("Mul", [tanh, scaled], base)
            scores = g.reduce("ReduceSum", tanh, [3], False, base)
        else:  # concat
            if scale is not None:
                total = g.node("Mul", [total, g.scalar(scale)], base)
            scores = g.reduce("ReduceSum", g.node("Tanh", [total], base), [3], False, base)
            weight = _number(layer.concat_score_weight)
            scores = g.node("Mul", [scores, g.scalar(weight)], base)
    masks = args.get("mask") or [call.implicit_mask(query), call.implicit_mask(value)]
    mask = None
    if len(masks) > 1 and masks[1] is not None:
        mask = g.node("Unsqueeze", [as_bool(g, masks[1], base), g.ints([1])], base)
    if args.get("use_causal_mask"):
        mask = _and(g, mask, _causal(g, q, k, base), base)
    if mask is not None:
        # Keras subtracts 1e9 from masked scores (it does not replace them).
        shifted = g.node("Sub", [scores, g.scalar(1e9)], base)
        scores = g.node("Where", [mask, scores, shifted], base)
    probabilities = g.node("Softmax", [scores], base, axis=-1)
    out = g.node("MatMul", [probabilities, v], base)
    if masks[0] is not None:
        keep = g.node("Unsqueeze", [as_bool(g, masks[0], base), g.ints([2])], base)
        out = g.node("Where", [keep, out, g.scalar(0.0)], base)
    results = [call.out(out)]
    if args.get("return_attention_scores"):
        results.append(call.out(probabilities, index=1))
    return results


def _number(variable):
    """A scalar weight (stored with shape `()` or `(1,)`) as a float."""
    return float(weights(variable).reshape(-1)[0])


def embedding(g, call):
    """Embedding: float indices are truncated to integers first, as Keras casts them."""
    layer = call.layer
    table = quantized.embedding_table(layer, call.base)
    x = g.keras(call.inputs[0])
    indices = g.node("Cast", [x.name], call.base, to=7)  # INT64
    name = g.node("Gather", [g.constant(table, f"{call.base}/embeddings"), indices], call.base,
                  axis=0)
    return [call.out(name)]


def reversible_embedding(g, call):
    """ReversibleEmbedding: an Embedding, or with `reverse=True` the logits over the vocabulary."""
    layer = call.layer
    if not arguments(call).get("reverse"):
        return embedding(g, call)
    quantized.refuse(layer, call.base)
    if getattr(layer, "reverse_dtype", None) not in (None, "float32"):
        _refuse(call, f"reverse_dtype={layer.reverse_dtype!r}")
    kernel = weights(layer.embeddings).T if layer.tie_weights else weights(
        layer.reverse_embeddings)
    x = g.keras(call.inputs[0])
    logits = g.node("MatMul", [x.name, g.constant(kernel, f"{call.base}/reverse")], call.base)
    cap = getattr(layer, "logit_soft_cap", None)
    if cap is not None:
        capped = g.node("Tanh", [g.node("Div", [logits, g.scalar(float(cap))], call.base)],
                        call.base)
        logits = g.node("Mul", [capped, g.scalar(float(cap))], call.base)
    return [call.out(logits)]


EMITTERS = {
    "MultiHeadAttention": multi_head_attention,
    "GroupedQueryAttention": multi_head_attention,
    "Attention": dot_attention,
    "AdditiveAttention": dot_attention,
    "EinsumDense": einsum_dense_layer,
    "Embedding": embedding,
    "ReversibleEmbedding": reversible_embedding,
}
