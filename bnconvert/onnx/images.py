"""`keras.ops.image` and `ops.unfold` as ONNX: cropping, padding, patches.

Emitters are `emit(g, call, p)` as in `math`. Cropping and padding slice or
pad the two spatial axes in the value's own layout, their sizes inferred
as Keras infers them (`top = target - bottom - height`, ...). Patches are
what Keras computes them as: a convolution with an identity kernel, which
copies each input value to its place and is exact in floating point.
`unfold` (PyTorch's order: channel, then kernel row and column) is the
same convolution grouped per channel.
"""

import dataclasses

import numpy as np

from bnconvert.onnx import nn
from bnconvert.onnx import preprocessing
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.graph import as_tuple

_BIG = np.iinfo(np.int64).max


def _spatial(call, p, key):
    x = p[key]
    data_format = p.get("data_format") or "channels_last"
    if x.rank != 4:
        raise Uncovered([(call.base, "image op", "images not of rank 4")])
    axes = (1, 2) if data_format == "channels_last" else (2, 3)
    return x, axes, [x.shape[a] for a in axes]


def _infer(size, first, second, target, what, call):
    """`(first, second)` amounts with the missing one inferred from `target`."""
    if first is None or second is None:
        if size is None or target is None:
            raise Uncovered([(call.base, what, "a size unknown when exporting")])
        first = target - second - size if first is None else first
        second = target - first - size if second is None else second
    return int(first), int(second)


def crop_images(g, call, p):
    x, axes, (height, width) = _spatial(call, p, "images")
    starts, ends = [], []
    for size, (first, last), target in ((height, ("top", "bottom"), p.get("target_height")),
                                        (width, ("left", "right"), p.get("target_width"))):
        begin, end = p.get(f"{first}_cropping"), p.get(f"{last}_cropping")
        if begin is None:
            if size is None or target is None:
                raise Uncovered([(call.base, "CropImages", "a size unknown when exporting")])
            begin = size - target - (end or 0)
        stop = begin + target if target is not None else (-end if end else _BIG)
        starts.append(int(begin))
        ends.append(int(stop))
    name = g.node("Slice", [x.name, g.ints(starts, "starts"), g.ints(ends, "ends"),
                            g.ints([x.physical(a) for a in axes], "axes")], call.base)
    return [call.out(name, x.perm)]


def pad_images(g, call, p):
    x, axes, (height, width) = _spatial(call, p, "images")
    top, bottom = _infer(height, p.get("top_padding"), p.get("bottom_padding"),
                         p.get("target_height"), "PadImages", call)
    left, right = _infer(width, p.get("left_padding"), p.get("right_padding"),
                         p.get("target_width"), "PadImages", call)
    begin, end = [0] * 4, [0] * 4
    for a, (b, e) in zip(axes, ((top, bottom), (left, right))):
        begin[x.physical(a)], end[x.physical(a)] = b, e
    name = g.node("Pad", [x.name, g.ints(begin + end, "pads")], call.base, mode="constant")
    return [call.out(name, x.perm)]


_LARGEST_KERNEL = 2 ** 24  # elements of the identity kernel (64 MB)


def extract_patches(g, call, p):
    """Patches as Keras computes them: conv with an identity kernel."""
    x = p["images"]
    n = x.rank - 2
    if n not in (2, 3):
        raise Uncovered([(call.base, "ExtractPatches", "unbatched images")])
    size = tuple(as_tuple(p["size"], n))
    channels_last = (p.get("data_format") or "channels_last") == "channels_last"
    channels, cells = x.shape[-1] if channels_last else x.shape[1], int(np.prod(size))
    if channels is None or channels * cells * cells > _LARGEST_KERNEL:
        raise Uncovered([(call.base, "ExtractPatches", "unknown channels or patches too large")])
    # One group per channel: filter c * cells + i picks cell i of channel c (a kernel of
    # channels * cells^2 elements, not (channels * cells)^2); Keras orders them i * channels + c.
    kernel = np.tile(np.eye(cells, dtype=np.float32).reshape(size + (1, cells)),
                     (1,) * n + (1, channels))
    grouped = g.keras(nn.conv(g, call, dict(p, inputs=x, kernel=kernel,
                                            strides=p.get("strides") or size))[0])
    order = np.arange(channels * cells).reshape(channels, cells).T.reshape(-1)
    return [call.out(g.node("Gather", [grouped.name, g.ints(order, "order")], call.base,
                            axis=x.rank - 1 if channels_last else 1))]


def tf_extract_patches(g, call, p):
    """`tf.image.extract_patches`: `sizes`, `strides` and `rates` given as `[1, h, w, 1]`."""
    def pair(key):
        return [int(v) for v in np.asarray(p[key]).reshape(-1)[1:3]]

    return extract_patches(g, call, dict(
        images=p["images"], size=pair("sizes"), strides=pair("strides"),
        dilation_rate=pair("rates"), padding=str(p["padding"]).lower()))


def tf1_resize(g, call, p):
    """`tf.compat.v1.image.resize`: bilinear (corners aligned or not) or nearest (not)."""
    method = {"0": "bilinear", "1": "nearest"}.get(str(p.get("method", 0)),
                                                   str(p.get("method")).lower())
    align = bool(p.get("align_corners"))
    if method not in ("bilinear", "nearest") or (method == "nearest" and align) \
            or p.get("preserve_aspect_ratio"):
        raise Uncovered([(call.base, "Resize", f"TensorFlow 1's {method} resize (align_corners="
                                               f"{align}) or an aspect ratio")])
    size, computed = p["size"], None
    if isinstance(size, Value):
        computed, size = g.keras(size).name, (None, None)
    height, width = (int(s) for s in size) if computed is None else size
    layer = nn.named_arguments(
        call, name=call.base, interpolation=method, height=height, width=width,
        data_format="channels_last", run_time_size=computed,
        coordinates="align_corners" if align else "asymmetric")
    return preprocessing.resizing(g, dataclasses.replace(call, layer=layer,
                                                         inputs=[p["images"]]))


def unfold(g, call, p):
    """`(N, C, H, W)` -> `(N, C*kH*kW, L)`, each channel's patches together."""
    x = g.keras(p["x"])
    if x.rank != 4 or x.shape[1] is None:
        raise Uncovered([(call.base, "Unfold", "not (N, C, H, W) with known C")])
    k, d, s = (as_tuple(p.get(key, 1), 2) for key in ("kernel_size", "dilation", "stride"))
    pads = as_tuple(p.get("padding", 0), 2)
    channels = x.shape[1]
    eye = np.eye(k[0] * k[1], dtype=np.float32).reshape(k[0] * k[1], 1, k[0], k[1])
    weight = np.tile(eye, (channels, 1, 1, 1))
    name = g.node("Conv", [x.name, g.constant(weight, f"{call.base}/identity")], call.base,
                  kernel_shape=list(k), strides=list(s), dilations=list(d), group=channels,
                  pads=[pads[0], pads[1], pads[0], pads[1]])
    flat = g.node("Reshape", [name, g.ints([0, channels * k[0] * k[1], -1])], call.base)
    return [call.out(flat)]


def fold(g, call, p):
    """`(N, C*kH*kW, L)` blocks summed back into `(N, C, oH, oW)`: unfold's transpose."""
    x = g.keras(p["x"])
    k, d, s = (as_tuple(p.get(key, 1), 2) for key in ("kernel_size", "dilation", "stride"))
    pads, out = as_tuple(p.get("padding", 0), 2), as_tuple(p["output_size"], 2)
    if x.rank != 3 or x.shape[1] is None:
        raise Uncovered([(call.base, "Fold", "not (N, C*kH*kW, L) with known C*kH*kW")])
    channels = x.shape[1] // (k[0] * k[1])
    blocks = [(o + 2 * q - e * (n - 1) - 1) // t + 1 for o, q, e, n, t in zip(out, pads, d, k, s)]
    grid = g.node("Reshape", [x.name, g.ints([0, x.shape[1]] + blocks)], call.base)
    eye = np.eye(k[0] * k[1], dtype=np.float32).reshape(k[0] * k[1], 1, k[0], k[1])
    reached = [(b - 1) * t + e * (n - 1) + 1 - 2 * q
               for b, t, e, n, q in zip(blocks, s, d, k, pads)]
    name = g.node("ConvTranspose", [grid, g.constant(np.tile(eye, (channels, 1, 1, 1)),
                                                     f"{call.base}/identity")], call.base,
                  kernel_shape=list(k), strides=list(s), dilations=list(d), group=channels,
                  pads=[pads[0], pads[1], pads[0], pads[1]],
                  output_padding=[o - r for o, r in zip(out, reached)])
    return [call.out(name)]


def gaussian_blur(g, call, p):
    """Keras's kernel (outer product of two normalized 1-D Gaussians), depthwise, "same"."""
    x = p["images"]
    channels_last = (p.get("data_format") or "channels_last") == "channels_last"
    channels = x.shape[-1] if channels_last else x.shape[1]
    size, sigma = as_tuple(p.get("kernel_size", 3), 2), as_tuple(p.get("sigma", 1.0), 2)
    if channels is None or x.rank != 4:
        raise Uncovered([(call.base, "GaussianBlur", "unknown channels or unbatched images")])

    def gaussian(n, sd):
        t = np.arange(n, dtype=np.float32) - (n - 1) / 2
        v = np.exp(-0.5 * (t / np.float32(sd)) ** 2)
        return v / v.sum()

    kernel = np.tensordot(gaussian(size[1], sigma[1]), gaussian(size[0], sigma[0]), axes=0)
    kernel = np.tile(kernel.reshape(size[0], size[1], 1, 1), (1, 1, channels, 1))
    return nn.depthwise_conv(g, call, dict(p, inputs=x, kernel=kernel, padding="same",
                                           strides=1))


def sobel_edges(g, call, p):
    """TensorFlow's Sobel filters (dy, dx) on reflect-padded images: `(..., C, 2)`."""
    channels_last = (p.get("data_format") or "channels_last") == "channels_last"
    x = p["images"]
    channels = x.shape[-1] if channels_last else x.shape[1]
    if channels is None or x.rank != 4:
        raise Uncovered([(call.base, "SobelEdges", "unknown channels or unbatched images")])
    x = g.layout(x, (0, 3, 1, 2) if channels_last else (0, 1, 2, 3))
    padded = g.node("Pad", [x.name, g.ints([0, 0, 1, 1, 0, 0, 1, 1], "pads")], call.base,
                    mode="reflect")
    dy = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32)
    parts = []
    for kernel in (dy, dy.T):
        weight = np.tile(kernel[None, None], (channels, 1, 1, 1))
        edge = g.node("Conv", [padded, g.constant(weight, f"{call.base}/sobel")], call.base,
                      kernel_shape=[3, 3], group=channels)
        parts.append(g.node("Unsqueeze", [edge, g.ints([2], "axes")], call.base))
    # Physical (N, C, 2, H, W): the Keras axes of (N, H, W, C, 2) or (N, C, H, W, 2).
    name = g.node("Concat", parts, call.base, axis=2)
    return [call.out(name, (0, 3, 4, 1, 2) if channels_last else (0, 1, 4, 2, 3))]


EMITTERS = {
    "fold": fold, "gaussian_blur": gaussian_blur, "sobel_edges": sobel_edges,
    "crop_images": crop_images, "pad_images": pad_images, "extract_patches": extract_patches,
    "extract_patches_3d": lambda g, call, p: extract_patches(
        g, call, dict(p, images=p.get("volumes", p.get("images")))),
    "unfold": unfold, "tf_extract_patches": tf_extract_patches, "tf1_resize": tf1_resize,
}
