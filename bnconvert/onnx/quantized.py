"""Quantized Keras layers: computed exactly as Keras does, or refused by name.

An int8 Dense (`layer.quantize("int8")`) keeps an int8 kernel and a
per-output scale, and quantizes its inputs on the fly: per row,
`scale = 127 / (max|x| + epsilon)` and `q = clip(round(x * scale), -127, 127)`;
its output is `matmul(q, kernel) / (scale * kernel_scale)`. The graph
does the same in float32, where products of int8 values and their sums
(below 2**24) are exact. An int8 Embedding divides the looked-up int8 rows
by their scales; that table is computed once here, in float32 as Keras does.
Other modes (int4, float8, GPTQ, AWQ, LoRA on top) are refused.
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered


def mode_of(layer):
    """The layer's quantization mode, or None."""
    return getattr(layer, "quantization_mode", None) or getattr(
        getattr(layer, "dtype_policy", None), "quantization_mode", None)


def refuse(layer, base, allowed=()):
    """Raises `Uncovered` for a quantized layer whose mode is not in `allowed`."""
    mode = mode_of(layer)
    if mode is not None and mode not in allowed:
        raise Uncovered([(base, type(layer).__name__, f"quantization mode {mode!r}")])
    if mode is not None and getattr(layer, "lora_enabled", False):
        raise Uncovered([(base, type(layer).__name__, "LoRA on a quantized layer")])


def _array(variable, dtype):
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable, dtype)


def embedding_table(layer, base):
    """The float32 embedding table an Embedding looks rows up in."""
    refuse(layer, base, allowed=("int8",))
    if mode_of(layer) == "int8":
        table = _array(layer._embeddings, np.float32)
        scale = _array(layer.embeddings_scale, np.float32)
        return (table / scale[:, None]).astype(np.float32)
    return _array(layer.embeddings, np.float32)


def dense_int8(g, x, layer, base):
    """An int8 Dense's `x @ kernel` (no bias) for a `Value` `x` in the Keras layout."""
    refuse(layer, base, allowed=("int8",))
    kernel = g.constant(_array(layer._kernel, np.float32), f"{base}/kernel_int8")
    scale = _array(layer.kernel_scale, np.float32)
    quantizer = getattr(layer, "inputs_quantizer", None)
    if quantizer is None:
        product = g.node("MatMul", [x.name, kernel], base)
        return g.node("Div", [product, g.constant(scale, f"{base}/kernel_scale")], base)
    low, high = (float(v) for v in quantizer.value_range)
    axis = quantizer.axis if quantizer.axis is not None else -1
    if tuple(np.atleast_1d(axis)) not in ((-1,), (x.rank - 1,)):
        raise Uncovered([(base, type(layer).__name__, f"inputs quantized over axis {axis}")])
    largest = g.reduce("ReduceMax", g.node("Abs", [x.name], base), [x.rank - 1], True, base)
    epsilon = g.scalar(float(quantizer.epsilon))
    row_scale = g.node("Div", [g.scalar(high), g.node("Add", [largest, epsilon], base)], base)
    rounded = g.node("Round", [g.node("Mul", [x.name, row_scale], base)], base)
    q = g.node("Clip", [rounded, g.scalar(low), g.scalar(high)], base)
    product = g.node("MatMul", [q, kernel], base)
    total_scale = g.node("Mul", [g.constant(scale, f"{base}/kernel_scale"), row_scale], base)
    return g.node("Div", [product, total_scale], base)
