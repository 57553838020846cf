"""`keras.ops.nn` functions as ONNX: convolutions, pooling, normalizations, attention.

Emitters are `emit(g, call, p)` as in `math`. Convolutions and pooling
with constant kernels go through the emitters of the matching layers
(`layers.conv`, `shape.pooling`), given the op's arguments as a layer would
hold them. The normalizations are written as Keras computes them (its
`epsilon` defaults and its `x * rsqrt(...)` order), and
`dot_product_attention` as Keras's TensorFlow backend does: two einsums
around a softmax, masked positions set to -0.7 times the dtype's maximum.
"""

import dataclasses
import math as pymath
import types

import numpy as np

from bnconvert.onnx import layers
from bnconvert.onnx import shape as structure
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import keras_axes
from bnconvert.onnx.math import aligned
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import out_dtype

EPSILON = 1e-7  # keras.backend.epsilon(), Keras's default for these ops


def _as_layer(call, p, **extra):
    """The op's arguments as the attributes a layer emitter reads."""
    fields = dict(name=call.base, strides=p.get("strides") or 1,
                  padding=str(p.get("padding", "valid")).lower(),
                  data_format=p.get("data_format") or "channels_last",
                  dilation_rate=p.get("dilation_rate", 1), activation=None, use_bias=False,
                  bias=None)
    fields.update(extra)
    return named_arguments(call, **fields)


def named_arguments(call, **fields):
    """`fields` as attributes, in a type named after the op (refusals name it so)."""
    return type(type(call.layer).__name__, (types.SimpleNamespace,), {})(**fields)


def _kernel(call, p):
    kernel = p["kernel"]
    if isinstance(kernel, Value):
        raise Uncovered([(call.base, "Conv", "a kernel computed in the graph")])
    return constant(kernel)


def conv(g, call, p):
    x, kernel = p["inputs"], _kernel(call, p)
    channels_first = (p.get("data_format") or "channels_last") == "channels_first"
    channels = x.shape[1] if channels_first else x.shape[-1]
    groups = channels // kernel.shape[-2] if channels else 1
    layer = _as_layer(call, p, kernel=kernel, groups=groups)
    return layers.conv(g, dataclasses.replace(call, layer=layer, inputs=[x]))


def tf_convolution(g, call, p):
    """`tf.nn.convolution`, channels last, as Keras 3's `conv`."""
    padding = p.get("padding", "VALID")
    if p.get("data_format") not in (None, "NWC", "NHWC", "NDHWC") or not isinstance(padding, str):
        raise Uncovered([(call.base, "Conv", "channels first or explicit padding")])
    return conv(g, call, dict(inputs=p["input"], kernel=p["filters"], strides=p.get("strides"),
                              padding=padding.lower(), dilation_rate=p.get("dilations") or 1))


def depthwise_conv(g, call, p):
    layer = _as_layer(call, p, depthwise_kernel=_kernel(call, p))
    return layers.depthwise_conv(g, dataclasses.replace(call, layer=layer, inputs=[p["inputs"]]))


def separable_conv(g, call, p):
    kernels = {k: constant(p[k]) for k in ("depthwise_kernel", "pointwise_kernel")
               if not isinstance(p[k], Value)}
    if len(kernels) < 2:
        raise Uncovered([(call.base, "SeparableConv", "a kernel computed in the graph")])
    layer = _as_layer(call, p, **kernels)
    return layers.separable_conv(g, dataclasses.replace(call, layer=layer, inputs=[p["inputs"]]))


def _pool(op_type):
    def emit(g, call, p):
        layer = _as_layer(call, p, pool_size=p["pool_size"], strides=p.get("strides"))
        x, dtype = p["inputs"], dtype_of(call, p["inputs"])
        # onnxruntime's MaxPool takes floats and 8-bit integers; wider ones pool
        # exactly in float64 (int64 beyond 2**53 would not).
        wide = dtype in ("int16", "int32", "uint16", "uint32")
        if dtype in ("int64", "uint64", "bool"):
            raise Uncovered([(call.base, op_type, f"{dtype} input")])
        if wide:
            x = cast(g, x, dtype, "float64", call.base)
        call = dataclasses.replace(call, layer=layer, inputs=[x])
        out = structure.pooling(op_type)(g, call)
        return [cast(g, v, "float64", dtype, call.base) for v in out] if wide else out
    return emit


def _blocks(op_type):
    """depth_to_space / space_to_depth (TensorFlow's order is ONNX's DCR)."""
    def emit(g, call, p):
        x = layers.layout_for(g, p["x"], p.get("data_format", "channels_last"))
        extra = {"mode": "DCR"} if op_type == "DepthToSpace" else {}
        name = g.node(op_type, [x.name], call.base, blocksize=int(p["block_size"]), **extra)
        return [call.out(name, x.perm)]
    return emit


def _along(g, call, vector, x, axes, base):
    """A per-channel constant or tensor broadcast against `x` along Keras `axes`."""
    if vector is None:
        return None
    if isinstance(vector, Value):
        if vector.rank != x.rank:
            raise Uncovered([(call.base, "op", "a per-channel tensor of another rank")])
        return g.layout(vector, x.perm).name
    array = constant(vector).astype(np.float32)
    shape = [1] * x.rank
    for a in axes:
        shape[a] = x.shape[a] if x.shape[a] is not None else -1
    if array.ndim != x.rank:
        array = array.reshape(shape)
    return g.broadcast_constant(array, x, base, np.dtype(out_dtype(call)))


def batch_normalization(g, call, p):
    x = p["x"]
    axes = keras_axes(p["axis"], x.rank)
    mean, variance = (_along(g, call, p[k], x, axes, f"{call.base}/{k}")
                      for k in ("mean", "variance"))
    eps = g.scalar(float(p.get("epsilon", 1e-3)))
    inv = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [variance, eps], call.base)],
                                       call.base)], call.base)
    scale = _along(g, call, p.get("scale"), x, axes, f"{call.base}/scale")
    if scale is not None:
        inv = g.node("Mul", [inv, scale], call.base)
    name = g.node("Mul", [g.node("Sub", [x.name, mean], call.base), inv], call.base)
    offset = _along(g, call, p.get("offset"), x, axes, f"{call.base}/offset")
    if offset is not None:
        name = g.node("Add", [name, offset], call.base)
    return [call.out(name, x.perm)]


def _mean(g, x, name, axes, base):
    return g.reduce("ReduceMean", name, [x.physical(a) for a in axes], True, base)


def layer_normalization(g, call, p):
    x = p["x"]
    axes = keras_axes(p.get("axis", -1), x.rank)
    eps = g.scalar(float(p.get("epsilon") or EPSILON))
    mean = _mean(g, x, x.name, axes, call.base)
    d = g.node("Sub", [x.name, mean], call.base)
    variance = _mean(g, x, g.node("Mul", [d, d], call.base), axes, call.base)
    inv = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [variance, eps], call.base)],
                                       call.base)], call.base)
    gamma = _along(g, call, p.get("gamma"), x, axes, f"{call.base}/gamma")
    beta = _along(g, call, p.get("beta"), x, axes, f"{call.base}/beta")
    if p.get("rms_scaling"):
        name = g.node("Mul", [x.name, inv], call.base)
        if gamma is not None:
            name = g.node("Mul", [name, gamma], call.base)
        return [call.out(name, x.perm)]
    if gamma is not None:
        inv = g.node("Mul", [inv, gamma], call.base)
    shift = g.node("Neg", [g.node("Mul", [mean, inv], call.base)], call.base)
    if beta is not None:
        shift = g.node("Add", [shift, beta], call.base)
    name = g.node("Add", [g.node("Mul", [x.name, inv], call.base), shift], call.base)
    return [call.out(name, x.perm)]


def rms_normalization(g, call, p):
    x = p["x"]
    axes = keras_axes(p.get("axis", -1), x.rank)
    eps = g.scalar(float(p.get("epsilon") or EPSILON))
    square = _mean(g, x, g.node("Mul", [x.name, x.name], call.base), axes, call.base)
    rrms = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [square, eps], call.base)],
                                        call.base)], call.base)
    name = g.node("Mul", [x.name, rrms], call.base)
    scale = _along(g, call, p.get("scale"), x, axes, f"{call.base}/scale")
    if scale is not None:
        name = g.node("Mul", [name, scale], call.base)
    return [call.out(name, x.perm)]


def normalize(g, call, p):
    x = p["x"]
    if p.get("order", 2) != 2:
        raise Uncovered([(call.base, "Normalize", f"order={p['order']!r}")])
    axes = keras_axes(p.get("axis", -1), x.rank)
    eps = float(p.get("epsilon") or EPSILON)
    total = g.reduce("ReduceSum", g.node("Mul", [x.name, x.name], call.base),
                     [x.physical(a) for a in axes], True, call.base)
    inv = g.node("Reciprocal", [g.node("Sqrt", [total], call.base)], call.base)
    inv = g.node("Min", [inv, g.scalar(1.0 / eps)], call.base)
    return [call.out(g.node("Mul", [x.name, inv], call.base), x.perm)]


def dot_product_attention(g, call, p):
    """Attention over `(batch, time, heads, depth)` query, key and value."""
    q, k, v = (p[n] for n in ("query", "key", "value"))
    if not all(isinstance(t, Value) and t.rank == 4 for t in (q, k, v)) \
            or p.get("attn_logits_soft_cap") is not None:
        raise Uncovered([(call.base, "DotProductAttention",
                          "operands other than 4-D tensors, or a logits soft cap")])
    names, _ = aligned(g, call, [g.keras(q), g.keras(k), g.keras(v)], out_dtype(call))
    scale = p.get("scale")
    scale = 1.0 / pymath.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = g.node("Einsum", names[:2], call.base, equation="btnh,bsnh->bnts")
    logits = g.node("Mul", [logits, g.scalar(scale)], call.base)
    rank4 = Value(logits, (None,) * 4, (0, 1, 2, 3))
    bias = p.get("bias")
    if bias is not None:
        bias = g.keras(bias).name if isinstance(bias, Value) else g.broadcast_constant(
            constant(bias), rank4, f"{call.base}/bias")
        logits = g.node("Add", [logits, bias], call.base)
    keep = None
    if p.get("mask") is not None:
        mask = p["mask"]
        keep = g.keras(mask).name if isinstance(mask, Value) else g.broadcast_constant(
            constant(mask), rank4, f"{call.base}/mask", bool)
    if p.get("is_causal"):
        t, s = q.shape[1], k.shape[1]
        if t is None or s is None:
            raise Uncovered([(call.base, "DotProductAttention", "causal with unknown lengths")])
        causal = g.constant(np.tril(np.ones((t, s), bool)), f"{call.base}/causal", bool)
        keep = causal if keep is None else g.node("And", [keep, causal], call.base)
    if keep is not None:
        low = g.scalar(-0.7 * 3.38953e38)  # Keras's "large negative" for float32
        logits = g.node("Where", [keep, logits, low], call.base)
    probs = g.node("Softmax", [logits], call.base, axis=-1)
    name = g.node("Einsum", [probs, names[2]], call.base, equation="bnts,bsnh->btnh")
    return [call.out(name)]


EMITTERS = {
    "conv": conv, "depthwise_conv": depthwise_conv, "max_pool": _pool("MaxPool"),
    "average_pool": _pool("AveragePool"), "depth_to_space": _blocks("DepthToSpace"),
    "space_to_depth": _blocks("SpaceToDepth"), "batch_normalization": batch_normalization,
    "layer_normalization": layer_normalization, "rms_normalization": rms_normalization,
    "normalize": normalize, "dot_product_attention": dot_product_attention,
    "separable_conv": separable_conv, "tf_convolution": tf_convolution,
}
