"""Image preprocessing layers as ONNX nodes: resizing, cropping, and augmentation.

Random augmentation layers change their input only in training; at
inference they are the identity, and so is their export. Resizing follows
TensorFlow's `tf.image.resize` (half-pixel centres): nearest with ties up,
bilinear, bicubic as TensorFlow computes it (`bicubic`: two products
with constant matrices, so for images whose size is known when exporting),
and "area" where it is an average over whole pixels (a downscale by an
integer factor). Lanczos kernels and antialiasing have no ONNX `Resize`
equivalent and are refused, as is cropping or padding to the aspect ratio
of an image whose size is unknown when exporting.
"""

import numpy as np
import onnx

from bnconvert.onnx import bicubic
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.layers import layout_for

# Identity at inference (checked against Keras in the conformance tests).
AUGMENTATION = (
    "AugMix", "CutMix", "MixUp", "RandAugment", "RandomBrightness", "RandomColorDegeneration",
    "RandomColorJitter", "RandomContrast", "RandomElasticTransform", "RandomErasing",
    "RandomFlip", "RandomGaussianBlur", "RandomGrayscale", "RandomHue", "RandomInvert",
    "RandomPerspective", "RandomPosterization", "RandomRotation", "RandomSaturation",
    "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom", "Solarization",
    "MaxNumBoundingBoxes",
)


def _refuse(call, why):
    raise Uncovered([(call.base, type(call.layer).__name__, why)])


def identity(g, call):
    """An augmentation layer: its input, unchanged, at inference."""
    return [call.inputs[0]]


def _spatial(x):
    """`(height, width)` of a channels-second `x` (None where unknown)."""
    return x.shape[x.perm[2]], x.shape[x.perm[3]]


def _slice(g, x, starts, sizes, base):
    """`x[:, :, h0:h0+h, w0:w0+w]` of a channels-second `x`."""
    ends = [s + n for s, n in zip(starts, sizes)]
    return g.node("Slice", [x.name, g.ints(starts, "starts"), g.ints(ends, "ends"),
                            g.ints([2, 3], "axes")], base)


def _truncated(a, b):
    """`int(float32(a) / b)`, as TensorFlow computes the aspect-ratio box."""
    return int(np.float32(a) / np.float32(b))


def _aspect(g, call, x, height, width):
    """The crop or pad of `x` to the target aspect ratio: `(name to resize, its (h, w))`."""
    layer = call.layer
    crop = getattr(layer, "crop_to_aspect_ratio", False)
    pad = getattr(layer, "pad_to_aspect_ratio", False)
    h, w = _spatial(x)
    if not crop and not pad:
        return x.name, (h, w)
    if h is None or w is None:
        _refuse(call, "cropping or padding to an aspect ratio on an image of unknown size")
    if crop:
        ch = max(min(h, _truncated(w * height, width)), 1)
        cw = max(min(w, _truncated(h * width, height)), 1)
        return _slice(g, x, [int((h - ch) / 2), int((w - cw) / 2)], [ch, cw], call.base), (ch, cw)
    if getattr(layer, "fill_mode", "constant") != "constant":
        _refuse(call, f"fill_mode={layer.fill_mode!r}")
    top = int((max(h, _truncated(w * height, width)) - h) / 2)
    left = int((max(w, _truncated(h * width, height)) - w) / 2)
    pads = g.ints([0, 0, top, left, 0, 0, top, left], "pads")
    return g.node("Pad", [x.name, pads, g.scalar(float(getattr(layer, "fill_value", 0.0)))],
                  call.base, mode="constant"), (h + 2 * top, w + 2 * left)


def resizing(g, call):
    """Resizing, every mode ONNX can reproduce, with aspect-ratio crop or pad."""
    layer = call.layer
    mode = layer.interpolation
    if getattr(layer, "antialias", False):
        _refuse(call, "antialias=True")
    if mode not in ("nearest", "bilinear", "bicubic", "area"):
        _refuse(call, f"interpolation={mode!r} (no ONNX Resize kernel)")
    x = layout_for(g, call.inputs[0], getattr(layer, "data_format", "channels_last"))
    # `run_time_size`: the target (height, width) as computed in the graph (`tf.image.resize(x,
    # tf.shape(y)[1:3])` of images of unknown size), else the layer's numbers.
    target = getattr(layer, "run_time_size", None)
    if target is not None:
        if mode not in ("nearest", "bilinear") or getattr(layer, "crop_to_aspect_ratio", False) \
                or getattr(layer, "pad_to_aspect_ratio", False):
            _refuse(call, f"interpolation={mode!r} or an aspect ratio to a size computed at "
                          "run time")
        target = g.node("Cast", [target], call.base, to=onnx.TensorProto.INT64)
        height = width = None
    elif layer.height is None or layer.width is None:
        # A Resizing made inside a traced call from `ops.shape` of an image of unknown size.
        _refuse(call, "a target size unknown when traced")
    else:
        height, width = int(layer.height), int(layer.width)
    source, size = _aspect(g, call, x, height, width)
    if mode == "area":
        return [call.out(_area(g, call, x, height, width, source), x.perm)]
    if mode == "bicubic":
        # TensorFlow's kernel is tabulated: onnxruntime's cubic Resize differs.
        if None in size:
            _refuse(call, "bicubic on an image of unknown size")
        return [call.out(bicubic.resize(g, source, size, (height, width), call.base), x.perm)]
    leading = g.node("Slice", [g.node("Shape", [source], call.base), g.ints([0]),
                               g.ints([2])], call.base)
    sizes = g.node("Concat", [leading, g.ints([height, width]) if target is None else target],
                   call.base, axis=0)
    # TensorFlow's resize uses half-pixel centres; its nearest neighbour is
    # floor((i + 0.5) / scale), which is ONNX's rounding with ties up. TensorFlow 1's
    # (`coordinates`, `tf.compat.v1.image.resize`) samples at i / scale ("asymmetric"),
    # its nearest neighbour rounded down, or with the corners aligned.
    coordinates = getattr(layer, "coordinates", "half_pixel")
    attrs = {
        "nearest": dict(mode="nearest", nearest_mode="round_prefer_ceil"
                        if coordinates == "half_pixel" else "floor"),
        "bilinear": dict(mode="linear"),
    }[mode]
    name = g.node("Resize", [source, "", "", sizes], call.base,
                  coordinate_transformation_mode=coordinates, **attrs)
    return [call.out(name, x.perm)]


def _area(g, call, x, height, width, source):
    """"area" resizing where it is an average over whole pixels: an `AveragePool`."""
    h, w = _spatial(x)
    layer = call.layer
    if getattr(layer, "crop_to_aspect_ratio", False) or getattr(layer, "pad_to_aspect_ratio",
                                                                  False):
        _refuse(call, "area resizing with an aspect-ratio crop or pad")
    if h is None or w is None or h % height or w % width:
        _refuse(call, "area resizing other than by a whole factor down")
    window = [h // height, w // width]
    if window == [1, 1]:
        return source
    return g.node("AveragePool", [source], call.base, kernel_shape=window, strides=window)


def center_crop(g, call):
    """CenterCrop of an image at least as large as the target (otherwise Keras resizes)."""
    layer = call.layer
    x = layout_for(g, call.inputs[0], getattr(layer, "data_format", "channels_last"))
    h, w = _spatial(x)
    height, width = int(layer.height), int(layer.width)
    if h is None or w is None or h < height or w < width:
        _refuse(call, "an input smaller than the crop, or of unknown size")
    name = _slice(g, x, [(h - height) // 2, (w - width) // 2], [height, width], call.base)
    return [call.out(name, x.perm)]


def random_crop(g, call):
    """RandomCrop: the identity at inference, where the crop is the whole image.

    Keras 3 returns the image uncropped at inference, while declaring the
    cropped shape; any other size is refused rather than guessed.
    """
    x = call.inputs[0]
    if tuple(x.shape) != tuple(call.shapes[0]):
        _refuse(call, "an image larger than the crop (Keras returns it uncropped at inference)")
    return [x]


def _rescale(g, name, source, target, base):
    """Keras's `_transform_value_range`: `(x - a) / (b - a) * (d - c) + c`."""
    if tuple(source) == tuple(target):
        return name
    (a, b), (c, d) = (tuple(float(v) for v in r) for r in (source, target))
    unit = g.node("Div", [g.node("Sub", [name, g.scalar(a)], base), g.scalar(b - a)], base)
    return g.node("Add", [g.node("Mul", [unit, g.scalar(d - c)], base), g.scalar(c)], base)


def auto_contrast(g, call):
    """AutoContrast: each image's channels stretched to the value range (NaN kept as input)."""
    x = call.inputs[0]
    value_range = tuple(call.layer.value_range)
    base = call.base
    v = _rescale(g, x.name, value_range, (0, 255), base)
    axes = [x.physical(1), x.physical(2)]  # Keras reduces axes 1 and 2 in any data format
    low = g.reduce("ReduceMin", v, axes, True, base)
    high = g.reduce("ReduceMax", v, axes, True, base)
    scale = g.node("Div", [g.scalar(255.0), g.node("Sub", [high, low], base)], base)
    offset = g.node("Mul", [g.node("Neg", [low], base), scale], base)
    stretched = g.node("Add", [g.node("Mul", [v, scale], base), offset], base)
    clipped = g.node("Clip", [stretched, g.scalar(0.0), g.scalar(255.0)], base)
    result = _rescale(g, clipped, (0, 255), value_range, base)
    name = g.node("Where", [g.node("IsNaN", [result], base), x.name, result], base)
    return [call.out(name, x.perm)]


EMITTERS = {
    **{name: identity for name in AUGMENTATION},
    "AutoContrast": auto_contrast,
    "RandomCrop": random_crop,
    "Resizing": resizing,
    "CenterCrop": center_crop,
}
