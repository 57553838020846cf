"""Keras layers with weights as ONNX nodes: convolutions, Dense, normalizations.

Every emitter takes the `Graph` and a `Call` and returns the output `Value`s.
Convolutions run channels first: a channels-last input is asked for in the
`NC...` layout (one cached `Transpose` per tensor, see `graph`) and the
output stays in it. Keras kernels are `(*window, in, out)`; ONNX wants
`(out, in, *window)`, and the transposition happens once, on the weights.

"same" padding is TensorFlow's: the total padding of an axis is split with
the odd element at the end. With a known spatial size it becomes explicit
pads; otherwise `auto_pad="SAME_UPPER"`, which is the same rule.
"""

import numpy as np

from bnconvert.onnx import activations
from bnconvert.onnx import quantized
from bnconvert.onnx.graph import FLOAT
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import as_tuple
from bnconvert.onnx.graph import channels_first
from bnconvert.onnx.graph import keras_axes


def weights(variable):
    """A Keras weight as a NumPy array (float64 for the algebra)."""
    return np.asarray(stored(variable), np.float64)


def stored(variable):
    """A Keras weight as a NumPy array of its own dtype, for weights only moved.

    A kernel goes into the graph as it is, transposed: widening it to
    float64 first would copy ResNet50's 100 MB twice more for nothing.
    """
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)


def layout_for(g, value, data_format):
    """`value` with its channels second, and the layout the result keeps."""
    if data_format == "channels_first":
        return g.keras(value)
    return g.channels_first(value)


def _spatial(value):
    """The spatial Keras sizes of a channels-second `value` (None if unknown)."""
    return [value.shape[a] for a in value.perm[2:]]


def conv_pads(value, kernel, strides, dilations, padding):
    """`(pads, auto_pad)` for a window op over `value` (channels second)."""
    n = len(kernel)
    if padding == "valid":
        return [0] * (2 * n), None
    if padding == "causal":
        return [d * (k - 1) for k, d in zip(kernel, dilations)] + [0] * n, None
    if padding != "same":
        raise Uncovered([("", "", f"padding={padding!r}")])
    begin, end = [], []
    for k, s, d, size in zip(kernel, strides, dilations, _spatial(value)):
        effective = d * (k - 1) + 1
        if size is None:
            if s != 1:
                return None, "SAME_UPPER"
            total = effective - 1
        else:
            out = -(-size // s)
            total = max((out - 1) * s + effective - size, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return begin + end, None


def _finish(g, call, name, perm, activation=None):
    out = call.out(name, perm)
    return [activations.apply(g, out, activation, call.base)]


def _bias(g, layer, base):
    bias = getattr(layer, "bias", None)
    if not getattr(layer, "use_bias", bias is not None) or bias is None:
        return []
    return [g.constant(weights(bias), f"{base}/bias")]


def _window(layer):
    """`(window, strides, dilations, kernel)` of a convolution, the kernel as ONNX wants it.

    Keras kernels are `(*window, a, b)`; ONNX wants `(b, a, *window)`, for
    Conv (`a` in, `b` out) as for ConvTranspose (`a` out, `b` in).
    """
    kernel = stored(layer.kernel)
    n = kernel.ndim - 2
    strides, dilations = as_tuple(layer.strides, n), as_tuple(layer.dilation_rate, n)
    return kernel.shape[:n], strides, dilations, onnx_layout(kernel)


def onnx_layout(kernel, block=64):
    """A `(*window, a, b)` kernel as `(b, a, *window)`, copied block by block.

    One strided copy of a large kernel reads memory far apart at every
    step; square blocks stay in cache, which makes ResNet50's kernels
    (94 MB) three times faster to lay out.
    """
    *window, a, b = kernel.shape
    src = kernel.reshape(-1, a, b)
    out = np.empty((b, a, src.shape[0]), kernel.dtype)
    for j in range(0, b, block):
        for i in range(0, a, block):
            out[j:j + block, i:i + block] = src[:, i:i + block, j:j + block].transpose(2, 1, 0)
    return out.reshape(b, a, *window)


def conv(g, call):
    """Conv1D/2D/3D, grouped or not."""
    layer = call.layer
    x = layout_for(g, call.inputs[0], layer.data_format)
    window, strides, dilations, w = _window(layer)
    pads, auto = conv_pads(x, window, strides, dilations, layer.padding)
    name = g.node(
        "Conv", [x.name, g.constant(w, f"{call.base}/kernel")] + _bias(g, layer, call.base),
        call.base, kernel_shape=list(window), strides=list(strides),
        dilations=list(dilations), group=int(getattr(layer, "groups", 1) or 1),
        pads=pads, auto_pad=auto,
    )
    return _finish(g, call, name, x.perm, layer.activation)


def _depthwise(g, x, layer, kernel, strides, dilations, base, bias):
    """A depthwise convolution: one group per input channel."""
    n = kernel.ndim - 2
    window, channels, multiplier = kernel.shape[:n], kernel.shape[n], kernel.shape[n + 1]
    w = np.transpose(kernel, (n, n + 1) + tuple(range(n)))
    w = w.reshape((channels * multiplier, 1) + tuple(window))
    pads, auto = conv_pads(x, window, strides, dilations, layer.padding)
    return g.node(
        "Conv", [x.name, g.constant(w, f"{base}/depthwise_kernel")] + bias, base,
        kernel_shape=list(window), strides=list(strides), dilations=list(dilations),
        group=int(channels), pads=pads, auto_pad=auto,
    )


def depthwise_conv(g, call):
    """DepthwiseConv1D/2D."""
    layer = call.layer
    x = layout_for(g, call.inputs[0], layer.data_format)
    kernel = stored(layer.kernel if hasattr(layer, "kernel") else layer.depthwise_kernel)
    n = kernel.ndim - 2
    name = _depthwise(
        g, x, layer, kernel, as_tuple(layer.strides, n), as_tuple(layer.dilation_rate, n),
        call.base, _bias(g, layer, call.base),
    )
    return _finish(g, call, name, x.perm, layer.activation)


def separable_conv(g, call):
    """SeparableConv1D/2D: depthwise, then a pointwise convolution with the bias."""
    layer = call.layer
    x = layout_for(g, call.inputs[0], layer.data_format)
    kernel = stored(layer.depthwise_kernel)
    n = kernel.ndim - 2
    depth = _depthwise(
        g, x, layer, kernel, as_tuple(layer.strides, n), as_tuple(layer.dilation_rate, n),
        f"{call.base}/depthwise", [],
    )
    w = onnx_layout(stored(layer.pointwise_kernel))
    name = g.node(
        "Conv", [depth, g.constant(w, f"{call.base}/pointwise_kernel")]
        + _bias(g, layer, call.base), call.base, kernel_shape=[1] * n,
    )
    return _finish(g, call, name, x.perm, layer.activation)


def _transpose_pads(x, out_sizes, window, strides, dilations, padding):
    """`(pads, output_padding)` of a ConvTranspose that yields Keras's output size.

    TensorFlow runs a transposed convolution as the gradient of the forward
    convolution from the output size `L` (which Keras computes, with its
    `output_padding`) to the input size: "valid" pads nothing before,
    "same" pads `max(full - L, 0) // 2` before, where
    `full = (in - 1) * stride + effective kernel`. ONNX then needs the rest
    trimmed at the end (`pads`) or added there (`output_padding`).
    """
    begin, end, extra = [], [], []
    for k, s, d, size, length in zip(window, strides, dilations, _spatial(x), out_sizes):
        full = (size - 1) * s + d * (k - 1) + 1
        before = max(full - length, 0) // 2 if padding == "same" else 0
        rest = full - before - length
        begin.append(before)
        end.append(max(rest, 0))
        extra.append(max(-rest, 0))
    return begin + end, extra


def _transpose_pads_unknown(layer, window, strides, dilations):
    """`_transpose_pads` for an unknown spatial size: Keras's sizes without `output_padding`."""
    given = getattr(layer, "output_padding", None)
    if given is not None and layer.padding == "same":
        raise Uncovered([(layer.name, type(layer).__name__,
                          "output_padding with 'same' padding on an unknown spatial size")])
    begin, end, extra = [], [], []
    for i, (k, s, d) in enumerate(zip(window, strides, dilations)):
        effective = d * (k - 1) + 1
        total = max(effective - s, 0) if layer.padding == "same" else 0
        begin.append(total // 2)
        end.append(total - total // 2)
        extra.append(int(as_tuple(given, len(window))[i]) if given is not None
                     else max(s - effective, 0))
    return begin + end, extra


def conv_transpose(g, call):
    """Conv1D/2D/3DTranspose."""
    layer = call.layer
    x = layout_for(g, call.inputs[0], layer.data_format)
    window, strides, dilations, w = _window(layer)
    out_sizes = [call.shapes[0][a] for a in x.perm[2:]]
    if layer.padding not in ("valid", "same"):
        raise Uncovered([(layer.name, type(layer).__name__, f"padding={layer.padding!r}")])
    if None in out_sizes or None in _spatial(x):
        pads, extra = _transpose_pads_unknown(layer, window, strides, dilations)
    else:
        pads, extra = _transpose_pads(x, out_sizes, window, strides, dilations, layer.padding)
    name = g.node(
        "ConvTranspose", [x.name, g.constant(w, f"{call.base}/kernel")]
        + _bias(g, layer, call.base), call.base, kernel_shape=list(window),
        strides=list(strides), dilations=list(dilations), pads=pads,
        output_padding=extra if any(extra) else None,
    )
    return _finish(g, call, name, x.perm, layer.activation)


def dense(g, call):
    """Dense: `Gemm` on a matrix, `MatMul` + `Add` on higher ranks."""
    layer = call.layer
    x = call.inputs[0]
    if quantized.mode_of(layer) is not None:
        x = g.keras(x)
        name = quantized.dense_int8(g, x, layer, call.base)
        bias = _bias(g, layer, call.base)
        name = g.node("Add", [name, bias[0]], call.base) if bias else name
        return _finish(g, call, name, x.perm, layer.activation)
    if x.rank > 2 and x.perm == channels_first(x.rank):
        # On channels-first data a Dense is a 1x1 convolution: no layout change.
        w = stored(layer.kernel).T.reshape(-1, x.shape[-1], *[1] * (x.rank - 2))
        name = g.node("Conv", [x.name, g.constant(w, f"{call.base}/kernel")]
                      + _bias(g, layer, call.base), call.base, kernel_shape=[1] * (x.rank - 2))
        return _finish(g, call, name, x.perm, layer.activation)
    x = g.keras(x)
    kernel = g.constant(stored(layer.kernel), f"{call.base}/kernel")
    bias = _bias(g, layer, call.base)
    if x.rank == 2:
        name = g.node("Gemm", [x.name, kernel] + bias, call.base)
    else:
        name = g.node("MatMul", [x.name, kernel], call.base)
        if bias:
            name = g.node("Add", [name, bias[0]], call.base)
    return _finish(g, call, name, x.perm, layer.activation)


def _gamma_beta(layer, size):
    gamma = getattr(layer, "gamma", None)
    beta = getattr(layer, "beta", None)
    gamma = weights(gamma) if gamma is not None else np.ones(size)
    beta = weights(beta) if beta is not None else np.zeros(size)
    return gamma, beta


def batch_norm(g, call):
    """BatchNormalization in inference (moving statistics), the synchronized one too."""
    layer = call.layer
    x = call.inputs[0]
    axes = keras_axes(layer.axis, x.rank)
    if getattr(layer, "adjustment", None) is not None:
        raise Uncovered([(layer.name, type(layer).__name__, "an adjustment")])
    if len(axes) != 1:  # statistics per element of several axes: a scale and shift
        mean, variance = weights(layer.moving_mean), weights(layer.moving_variance)
        gamma, beta = _gamma_beta(layer, mean.shape)
        scale = gamma / np.sqrt(variance + layer.epsilon)
        shape = [x.shape[a] if a in axes else 1 for a in range(x.rank)]
        return [_scale_shift(g, call, x, shape, scale, beta - mean * scale)]
    (axis,) = axes
    if x.physical(axis) != 1 and x.rank > 2:
        x = g.channels_first(x) if axis == x.rank - 1 else g.keras(x)
    mean, variance = weights(layer.moving_mean), weights(layer.moving_variance)
    gamma, beta = _gamma_beta(layer, mean.shape)
    if x.physical(axis) == 1:
        params = [g.constant(a, f"{call.base}/{n}") for a, n in
                  ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (variance, "variance"))]
        name = g.node("BatchNormalization", [x.name] + params, call.base,
                      epsilon=float(layer.epsilon))
        return [call.out(name, x.perm)]
    scale = gamma / np.sqrt(variance + layer.epsilon)
    shift = beta - mean * scale
    shape = [1] * x.rank
    shape[axis] = -1
    return [_scale_shift(g, call, x, shape, scale, shift)]


def _scale_shift(g, call, x, shape, scale, shift):
    """`x * scale + shift` with constants of the Keras broadcast `shape`."""
    scale = g.broadcast_constant(np.reshape(scale, shape), x, f"{call.base}/scale")
    shift = g.broadcast_constant(np.reshape(shift, shape), x, f"{call.base}/shift")
    name = g.node("Add", [g.node("Mul", [x.name, scale], call.base), shift], call.base)
    return call.out(name, x.perm)


def _normalize(g, x, axes, epsilon, base, rms=False):
    """`(x - mean) / sqrt(var + eps)` (or `x / sqrt(var + eps)`) over physical `axes`.

    Keras's `rms_scaling` divides the *uncentred* input by the standard
    deviation (the centred variance), not by the root mean square; its
    deprecation warning says so, and the export must match what it computes.
    """
    mean = g.reduce("ReduceMean", x.name, axes, True, base)
    centred = g.node("Sub", [x.name, mean], base)
    square = g.node("Mul", [centred, centred], base)
    variance = g.reduce("ReduceMean", square, axes, True, base)
    std = g.node("Sqrt", [g.node("Add", [variance, g.scalar(epsilon)], base)], base)
    return g.node("Div", [x.name if rms else centred, std], base)


def layer_norm(g, call):
    """LayerNormalization (with `rms_scaling` too)."""
    layer = call.layer
    x = call.inputs[0]
    axes = keras_axes(layer.axis, x.rank)
    rms = bool(getattr(layer, "rms_scaling", False))
    name = _normalize(g, x, [x.physical(a) for a in axes], float(layer.epsilon), call.base, rms)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.rank)]
    gamma, beta = _gamma_beta(layer, [x.shape[a] for a in axes])
    if getattr(layer, "scale", True) and getattr(layer, "gamma", None) is not None:
        name = g.node("Mul", [name, g.broadcast_constant(gamma.reshape(shape), x,
                                                         f"{call.base}/gamma")], call.base)
    if getattr(layer, "center", True) and getattr(layer, "beta", None) is not None and not rms:
        name = g.node("Add", [name, g.broadcast_constant(beta.reshape(shape), x,
                                                         f"{call.base}/beta")], call.base)
    return [call.out(name, x.perm)]


def group_norm(g, call):
    """GroupNormalization: channels second, then `[N, groups, -1]` moments."""
    layer = call.layer
    x = call.inputs[0]
    (axis,) = keras_axes(layer.axis, x.rank)
    if axis != x.rank - 1 and axis != 1:
        raise Uncovered([(layer.name, type(layer).__name__, f"axis={layer.axis}")])
    x = g.channels_first(x) if axis == x.rank - 1 else g.keras(x)
    grouped = g.node("Reshape", [x.name, g.ints([0, int(layer.groups), -1])], call.base)
    name = _normalize_grouped(g, grouped, x, float(layer.epsilon), call.base)
    channels = x.shape[axis]
    gamma, beta = _gamma_beta(layer, (channels,))
    shape = [1, channels] + [1] * (x.rank - 2)
    name = g.node("Mul", [name, g.constant(gamma.reshape(shape), f"{call.base}/gamma")], call.base)
    name = g.node("Add", [name, g.constant(beta.reshape(shape), f"{call.base}/beta")], call.base)
    return [call.out(name, x.perm)]


def _normalize_grouped(g, grouped, x, epsilon, base):
    name = _normalize(g, _Named(grouped), [2], epsilon, base)
    return g.node("Reshape", [name, g.node("Shape", [x.name], base)], base)


class _Named:
    def __init__(self, name):
        self.name = name


# Layers whose integer inputs are indices or codes, not numbers to compute with.
_INDEXED = {"Embedding", "CategoryEncoding", "IntegerLookup", "StringLookup", "Hashing",
            "HashedCrossing", "TextVectorization", "Discretization"}
_IN_INPUT_DTYPE = {"LayerNormalization", "GroupNormalization", "RMSNormalization"}


def as_floats(g, layer, values, dtypes, out_dtypes, base):
    """`values` (a call's data inputs) cast to float32 where they are integers or bools.

    A Keras layer computing in float takes integer data (a uint8 image into
    `Rescaling`, `Conv2D`) as numbers; its ONNX ops take floats only. Returns
    `{index: Value}` for the inputs cast. Normalizations compute in the integer
    dtype, and resizing rounds back to it: these are refused.
    """
    kind = type(layer).__name__
    if kind in _INDEXED or not any(str(d).startswith(("float", "bfloat")) for d in out_dtypes):
        return {}
    integers = {i: d for i, d in enumerate(dtypes) if not str(d).startswith(("float", "bfloat"))}
    if integers and (kind in _IN_INPUT_DTYPE or getattr(layer, "interpolation", "nearest")
                     != "nearest"):
        raise Uncovered([(base, kind, f"an integer input ({next(iter(integers.values()))}: "
                                      "Keras computes or rounds in that dtype)")])
    return {i: Value(g.node("Cast", [values[i].name], f"{base}/cast", to=FLOAT),
                     values[i].shape, values[i].perm) for i in integers}


EMITTERS = {
    "Conv1D": conv, "Conv2D": conv, "Conv3D": conv,
    "DepthwiseConv1D": depthwise_conv, "DepthwiseConv2D": depthwise_conv,
    "SeparableConv1D": separable_conv, "SeparableConv2D": separable_conv,
    "Conv1DTranspose": conv_transpose, "Conv2DTranspose": conv_transpose,
    "Conv3DTranspose": conv_transpose,
    "Dense": dense,
    "BatchNormalization": batch_norm, "SyncBatchNormalization": batch_norm,
    "LayerNormalization": layer_norm, "GroupNormalization": group_norm,
}
