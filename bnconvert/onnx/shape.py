"""Keras layers without weights as ONNX nodes: pooling, padding, merging, shaping.

Window and padding layers run channels first, like convolutions. Merging
and activation layers keep their inputs' layout (all inputs are brought to
the first one's). Layers that depend on the memory order of the Keras
layout (Flatten, Reshape, Permute) get their input in the Keras layout.
"""

import numpy as np

from bnconvert.onnx import activations
from bnconvert.onnx import bicubic
from bnconvert.onnx.graph import BOOL
from bnconvert.onnx.graph import FLOAT
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import as_tuple
from bnconvert.onnx.graph import channels_first
from bnconvert.onnx.layers import conv_pads
from bnconvert.onnx.layers import layout_for

# Layers that are the identity in inference.
IDENTITY = (
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization",
    "Identity",
)


def pooling(op_type):
    """Max/AveragePooling1D/2D/3D."""

    def emit(g, call):
        layer = call.layer
        x = layout_for(g, call.inputs[0], layer.data_format)
        n = x.rank - 2
        window = as_tuple(layer.pool_size, n)
        strides = as_tuple(layer.strides or layer.pool_size, n)
        pads, auto = conv_pads(x, window, strides, (1,) * n, layer.padding)
        if auto and any(s > k for s, k in zip(strides, window)):
            return [call.out(_same_at_run_time(g, op_type, x, window, strides, call.base),
                             x.perm)]
        # TensorFlow's "same" average leaves the padding out of the count.
        extra = {"count_include_pad": 0} if op_type == "AveragePool" else {}
        name = g.node(op_type, [x.name], call.base, kernel_shape=list(window),
                      strides=list(strides), pads=pads, auto_pad=auto, **extra)
        return [call.out(name, x.perm)]

    return emit


def _same_at_run_time(g, op_type, x, window, strides, base):
    """A "same" pooling of windows shorter than their strides, on sizes known at run time.

    TensorFlow pads an axis of size `n` by `max((ceil(n / s) - 1) s + k - n,
    0)`, half of it before; onnxruntime's `SAME_UPPER` pooling leaves out
    the `max` and fails on the negative padding a stride longer than the
    window gives (n = 9, k = 2, s = 3). So the padding is computed here: a
    maximum pools the edge-padded input, an average divides the padded sum
    by the padded count of ones (the padding is left out of the count).
    """
    n = len(window)
    sizes = g.node("Slice", [g.node("Shape", [x.name], base), g.ints([2]), g.ints([2 + n])],
                   base)
    step = g.ints(strides, "strides")
    count = g.node("Div", [g.node("Add", [sizes, g.ints([s - 1 for s in strides])], base),
                           step], base)
    reach = g.node("Add", [g.node("Mul", [g.node("Sub", [count, g.ints([1] * n)], base), step],
                                  base), g.ints(window, "window")], base)
    total = g.node("Max", [g.node("Sub", [reach, sizes], base), g.ints([0] * n)], base)
    begin = g.node("Div", [total, g.ints([2] * n)], base)
    pads = g.node("Concat", [g.ints([0, 0]), begin, g.ints([0, 0]),
                             g.node("Sub", [total, begin], base)], base, axis=0)
    attrs = dict(kernel_shape=list(window), strides=list(strides))
    if op_type == "MaxPool":
        return g.node("MaxPool", [g.node("Pad", [x.name, pads], base, mode="edge")], base,
                      **attrs)
    ones = g.node("Expand", [g.scalar(1.0), g.node("Concat", [g.ints([1, 1]), sizes], base,
                                                   axis=0)], base)
    total_sum, counted = (g.node("AveragePool", [g.node("Pad", [v, pads], base)], base, **attrs)
                          for v in (x.name, ones))
    return g.node("Div", [total_sum, counted], base)


def global_pooling(op_type):
    """GlobalAverage/MaxPooling1D/2D/3D, with or without `keepdims`."""

    def emit(g, call):
        layer = call.layer
        mask = call.given_mask()
        if mask is not None and op_type == "GlobalAveragePool":
            return [_masked_average(g, call, mask)]
        x = layout_for(g, call.inputs[0], layer.data_format)
        name = g.node(op_type, [x.name], call.base)
        kept = g.value(name, [1 if a in x.perm[2:] else d for a, d in enumerate(x.shape)],
                       x.perm)
        if getattr(layer, "keepdims", False):
            return [call.out(name, x.perm)]
        flat = call.out(g.node("Flatten", [name], call.base, axis=1))
        g.unflattened[flat.name] = kept
        return [flat]

    return emit


def adaptive_pooling(op_type):
    """AdaptiveAverage/MaxPooling1D/2D/3D: bin `i` of an axis of size `L` into `n` is
    `[floor(i L / n), ceil((i + 1) L / n))`; both reductions are separable by axis."""

    def emit(g, call):
        layer = call.layer
        x = layout_for(g, call.inputs[0], layer.data_format)
        n = x.rank - 2
        name = x.name
        for axis, size, out in zip(range(2, x.rank), [x.shape[a] for a in x.perm[2:]],
                                   as_tuple(layer.output_size, n)):
            if size is None:
                raise Uncovered([(call.base, type(layer).__name__, "an unknown spatial size")])
            bins = []
            for i in range(out):
                start, end = (i * size) // out, -(-((i + 1) * size) // out)
                part = g.node("Slice", [name, g.ints([start]), g.ints([end]), g.ints([axis])],
                              call.base)
                bins.append(g.reduce(op_type, part, [axis], True, call.base))
            name = g.node("Concat", bins, call.base, axis=axis) if len(bins) > 1 else bins[0]
        return [call.out(name, x.perm)]

    return emit


def _masked_average(g, call, mask):
    """GlobalAveragePooling1D with `mask=`: the mean over the unmasked steps only.

    Keras 3 counts a step where the mask is non-zero; tf-keras weighs each
    step by the mask's value.
    """
    x, mask = g.keras(call.inputs[0]), g.keras(mask)
    channels_last = call.layer.data_format == "channels_last"
    weight = mask.name if _tf_keras(call.layer) else g.node("Cast", [mask.name], call.base,
                                                             to=BOOL)
    weight = g.node("Cast", [weight], call.base, to=FLOAT)
    weight = g.node("Unsqueeze", [weight, g.ints([2 if channels_last else 1])], call.base)
    steps = 1 if channels_last else 2
    keep = bool(getattr(call.layer, "keepdims", False))
    total = g.reduce("ReduceSum", g.node("Mul", [x.name, weight], call.base), [steps], keep,
                     call.base)
    count = g.reduce("ReduceSum", weight, [steps], keep, call.base)
    return call.out(g.node("Div", [total, count], call.base))


def _window_pairs(layer, attr, n):
    value = getattr(layer, attr)
    if isinstance(value, int):
        return [(value, value)] * n
    if n == 1 and all(isinstance(v, int) for v in value):
        return [tuple(value)]  # the 1D layers keep one `(begin, end)` pair
    return [as_tuple(v, 2) for v in value]


def zero_padding(g, call):
    """ZeroPadding1D/2D/3D."""
    layer = call.layer
    x = layout_for(g, call.inputs[0], getattr(layer, "data_format", "channels_last"))
    pairs = _window_pairs(layer, "padding", x.rank - 2)
    pads = [0, 0] + [p[0] for p in pairs] + [0, 0] + [p[1] for p in pairs]
    name = g.node("Pad", [x.name, g.ints(pads, "pads")], call.base, mode="constant")
    return [call.out(name, x.perm)]


def cropping(g, call):
    """Cropping1D/2D/3D."""
    layer = call.layer
    x = layout_for(g, call.inputs[0], getattr(layer, "data_format", "channels_last"))
    pairs = _window_pairs(layer, "cropping", x.rank - 2)
    starts = [p[0] for p in pairs]
    ends = [-p[1] if p[1] else np.iinfo(np.int64).max for p in pairs]
    axes = list(range(2, x.rank))
    name = g.node("Slice", [x.name, g.ints(starts, "starts"), g.ints(ends, "ends"),
                            g.ints(axes, "axes")], call.base)
    return [call.out(name, x.perm)]


def upsampling(g, call):
    """UpSampling1D/2D/3D (nearest; bilinear, and bicubic of a known size, in 2D)."""
    layer = call.layer
    x = layout_for(g, call.inputs[0], getattr(layer, "data_format", "channels_last"))
    n = x.rank - 2
    size = as_tuple(getattr(layer, "size", getattr(layer, "length", 2)), n)
    mode = getattr(layer, "interpolation", "nearest")
    spatial = [x.shape[x.perm[i]] for i in range(2, x.rank)]
    if mode == "bicubic" and n == 2 and None not in spatial:
        # TensorFlow's resize: its tabulated kernel, as `Resizing` exports it.
        target = tuple(d * s for d, s in zip(spatial, size))
        return [call.out(bicubic.resize(g, x.name, spatial, target, call.base), x.perm)]
    if mode not in ("nearest", "bilinear"):
        why = "bicubic on an image of unknown size" if mode == "bicubic" and n == 2 \
            else f"interpolation={mode!r}"
        raise Uncovered([(layer.name, type(layer).__name__, why)])
    scales = g.constant(np.array([1.0, 1.0] + [float(s) for s in size], np.float32), "scales")
    if mode == "nearest":
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                     nearest_mode="floor")
    else:
        attrs = dict(mode="linear", coordinate_transformation_mode="half_pixel")
    name = g.node("Resize", [x.name, "", scales], call.base, **attrs)
    return [call.out(name, x.perm)]


def _same_layout(g, values):
    """The values in one layout: the first one's (all must have one rank)."""
    if len({v.rank for v in values}) > 1:
        return [g.keras(v) for v in values]
    return [g.layout(v, values[0].perm) for v in values]


def merge(op_type, scale=None):
    """Add, Subtract, Multiply, Maximum, Minimum, Average."""

    def emit(g, call):
        values = _same_layout(g, list(call.inputs))
        names = [v.name for v in values]
        # Binary ops, not the variadic Sum/Mul/Max/Min: onnxruntime fuses a
        # Conv with the Add (and Relu) after it, never with a Sum.
        name = names[0]
        for other in names[1:]:
            name = g.node(op_type, [name, other], call.base)
        if scale == "mean":
            name = g.node("Mul", [name, g.scalar(1.0 / len(names))], call.base)
        return [call.out(name, values[0].perm)]

    return emit


def concatenate(g, call):
    """Concatenate along the Keras axis, in the first input's layout."""
    values = _same_layout(g, list(call.inputs))
    axis = values[0].physical(call.layer.axis)
    name = g.node("Concat", [v.name for v in values], call.base, axis=axis)
    return [call.out(name, values[0].perm)]


def identity(g, call):
    """A layer that changes nothing in inference."""
    return [call.inputs[0]]


def flatten(g, call):
    """Flatten, in the Keras layout (channels-last memory order).

    With `data_format="channels_first"` Keras first moves axis 1 last (to
    channels-last order), so the data are flattened in that layout.
    """
    x = call.inputs[0]
    if getattr(call.layer, "data_format", "channels_last") == "channels_first" and x.rank > 2:
        x = g.layout(x, (0,) + tuple(range(2, x.rank)) + (1,))
    else:
        x = g.keras(x)
    return [call.out(g.node("Flatten", [x.name], call.base, axis=1))]


def moves_only_ones(perm, shape):
    """Whether layout `perm` of `shape` only moves axes of size 1 (same memory order)."""
    kept = [a for a in perm if shape[a] != 1]
    return kept == [a for a in range(len(shape)) if shape[a] != 1]


def reshape_to(g, x, target, base, written=None):
    """`x` reshaped to the Keras shape `target` (batch first, kept).

    `written`, if given, is the shape after the batch written in the Keras
    layout (a Reshape layer's own target, -1 resolved at run time).

    When neither side's layout changes the memory order (only axes of size 1
    move, as in a squeeze-and-excite `[N, C] -> [N, 1, 1, C]`), the result is
    written channels first directly; otherwise in the Keras layout.
    """
    pooled = g.unflattened.get(x.name)
    if pooled is not None and tuple(pooled.shape[1:]) == tuple(target[1:]):
        # A squeeze-and-excite's pooling reshaped back: its output before the Flatten.
        return pooled.name, pooled.perm
    first = channels_first(len(target))
    if moves_only_ones(x.perm, x.shape) and len(target) > 2 and moves_only_ones(first, target) \
            and all(d is not None for d in target[1:]):
        shape = [0] + [int(target[a]) for a in first[1:]]
        return g.node("Reshape", [x.name, g.ints(shape)], base), first
    x = g.keras(x)
    shape = [0] + (written or [-1 if d is None else int(d) for d in target[1:]])
    return g.node("Reshape", [x.name, g.ints(shape)], base), None


def reshape(g, call):
    """Reshape: the target shape after an unchanged batch dimension.

    A target with an unknown size (-1) is resolved at run time, as Keras
    does: the size Keras inferred for it may be wrong (a custom layer
    before it with a wrong `compute_output_shape`: keras-cv RetinaNet's
    coarsest levels, 2x2 inferred, 1x1 computed).
    """
    target = tuple(getattr(call.layer, "target_shape", ()) or ())
    written = [int(d) for d in target] if -1 in target else None
    name, perm = reshape_to(g, call.inputs[0], call.shapes[0], call.base, written)
    return [call.out(name, perm)]


def permute(g, call):
    """Permute: only a change of layout, resolved when a later layer needs one."""
    x = call.inputs[0]
    dims = (0,) + tuple(call.layer.dims)
    # Output axis i is input axis dims[i]: the data stay where they are.
    return [call.out(x.name, [dims.index(a) for a in x.perm])]


def activation_layer(g, call):
    """Activation, ReLU, LeakyReLU, ELU, Softmax layers."""
    layer = call.layer
    kind = type(layer).__name__
    config = layer.get_config()
    params = {}
    if kind == "Activation":
        function = layer.activation
    elif kind == "ReLU":
        function = "relu"
        params = {k: config.get(k) for k in ("max_value", "negative_slope", "threshold")}
    elif kind == "LeakyReLU":
        function = "leaky_relu"
        params = {"negative_slope": config.get("negative_slope", config.get("alpha", 0.3))}
    elif kind == "ELU":
        function, params = "elu", {"alpha": config.get("alpha", 1.0)}
    else:  # Softmax
        function, params = "softmax", {"axis": config.get("axis", -1)}
        mask = call.given_mask()  # `softmax(x, mask)`: keras-hub's attention
        if mask is not None:
            return [_masked_softmax(g, call, params["axis"], mask)]
    return [activations.apply(g, call.inputs[0], function, call.base, **params)]


def _tf_keras(layer):
    return type(layer).__module__.startswith("tf_keras.")


def _masked_softmax(g, call, axis, mask):
    """Softmax with `mask=`: masked inputs count as -1e9, masked outputs are 0.

    A float mask keeps what is above 0.5, as Keras 3 does; tf-keras adds
    `(1 - mask) * -1e9` to the inputs and leaves the outputs alone.
    """
    x = call.inputs[0]
    mask = g.layout(mask, x.perm) if mask.rank == x.rank else g.keras(mask)
    x = x if mask.perm == x.perm else g.keras(x)
    if isinstance(axis, (list, tuple)) and len(axis) > 1:
        raise Uncovered([(call.base, "Softmax", "a masked softmax over several axes")])
    if _tf_keras(call.layer):
        weight = g.node("Cast", [mask.name], call.base, to=FLOAT)
        adder = g.node("Mul", [g.node("Sub", [g.scalar(1.0), weight], call.base),
                               g.scalar(-1e9)], call.base)
        shifted = g.node("Add", [x.name, adder], call.base)
        return activations.apply(g, call.out(shifted, x.perm), "softmax", call.base, axis=axis)
    keep = g.node("Greater", [g.node("Cast", [mask.name], call.base, to=FLOAT),
                              g.scalar(0.5)], call.base)
    masked = g.node("Where", [keep, x.name, g.scalar(-1e9)], call.base)
    inner = activations.apply(g, call.out(masked, x.perm), "softmax", call.base, axis=axis)
    return call.out(g.node("Where", [keep, inner.name, g.scalar(0.0)], call.base), x.perm)


def masking(g, call):
    """Masking: steps whose features all equal `mask_value` become zeros.

    The mask itself reaches the layers that use it through the graph
    (Keras 3 records its computation as ops).
    """
    x = call.inputs[0]
    value = g.scalar(float(call.layer.mask_value))
    differs = g.node("Not", [g.node("Equal", [x.name, value], call.base)], call.base)
    keep = g.reduce("ReduceMax", g.node("Cast", [differs], call.base, to=FLOAT),
                    [x.physical(-1)], True, call.base)
    return [call.out(g.node("Mul", [x.name, keep], call.base), x.perm)]


def rescaling(g, call):
    """Rescaling: `x * scale + offset`, scalars or per-channel lists."""
    layer = call.layer
    x = call.inputs[0]
    scale = g.broadcast_constant(np.asarray(layer.scale, np.float32), x, f"{call.base}/scale")
    offset = g.broadcast_constant(np.asarray(layer.offset, np.float32), x, f"{call.base}/offset")
    name = g.node("Add", [g.node("Mul", [x.name, scale], call.base), offset], call.base)
    return [call.out(name, x.perm)]


def normalization(g, call):
    """Normalization: `(x - mean) / max(sqrt(variance), epsilon)`, or its inverse."""
    layer = call.layer
    x = call.inputs[0]
    mean = np.asarray(layer.mean, np.float64)
    std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)), 1e-7)
    mean = g.broadcast_constant(mean, x, f"{call.base}/mean")
    std = g.broadcast_constant(std, x, f"{call.base}/std")
    if getattr(layer, "invert", False):
        name = g.node("Add", [g.node("Mul", [x.name, std], call.base), mean], call.base)
    else:
        name = g.node("Div", [g.node("Sub", [x.name, mean], call.base), std], call.base)
    return [call.out(name, x.perm)]


EMITTERS = {
    **{f"MaxPooling{n}D": pooling("MaxPool") for n in (1, 2, 3)},
    **{f"AveragePooling{n}D": pooling("AveragePool") for n in (1, 2, 3)},
    **{f"GlobalAveragePooling{n}D": global_pooling("GlobalAveragePool") for n in (1, 2, 3)},
    **{f"GlobalMaxPooling{n}D": global_pooling("GlobalMaxPool") for n in (1, 2, 3)},
    **{f"AdaptiveAveragePooling{n}D": adaptive_pooling("ReduceMean") for n in (1, 2, 3)},
    **{f"AdaptiveMaxPooling{n}D": adaptive_pooling("ReduceMax") for n in (1, 2, 3)},
    **{f"ZeroPadding{n}D": zero_padding for n in (1, 2, 3)},
    **{f"Cropping{n}D": cropping for n in (1, 2, 3)},
    **{f"UpSampling{n}D": upsampling for n in (1, 2, 3)},
    **{name: identity for name in IDENTITY},
    "Add": merge("Add"), "Subtract": merge("Sub"), "Multiply": merge("Mul"),
    "Maximum": merge("Max"), "Minimum": merge("Min"), "Average": merge("Add", "mean"),
    "Concatenate": concatenate,
    "Flatten": flatten, "Reshape": reshape, "Permute": permute,
    "Activation": activation_layer, "ReLU": activation_layer, "LeakyReLU": activation_layer,
    "ELU": activation_layer, "Softmax": activation_layer,
    "Masking": masking,
    "Rescaling": rescaling, "Normalization": normalization,
}
