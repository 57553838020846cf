"""Linear filters of `keras.ops` as ONNX: correlate, ssim, scale_and_translate.

Emitters are `emit(g, call, p)` as in `math`. Each is what Keras's
TensorFlow backend computes, written as convolutions or matrix products:

- `correlate`: a 1-D convolution of `x1` by `x2` (zero-padded for "full",
  the centred slice of "full" for "same", as TensorFlow takes it);
- `image.ssim`: Keras's SSIM, Gaussian-weighted local means, variances and
  covariance from grouped "valid" convolutions, averaged over space and then
  channels;
- `image.scale_and_translate`: one resampling matrix per spatial axis,
  computed at export from the constant scale and translation with Keras's
  kernels (triangle, Keys cubic, Lanczos) and normalization, applied by
  `MatMul` along that axis.
"""

import numpy as np

from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value
from bnconvert.onnx.layers import layout_for
from bnconvert.onnx.math import cast
from bnconvert.onnx.math import constant
from bnconvert.onnx.math import dtype_of
from bnconvert.onnx.math import out_dtype


def _vector(g, call, v, dtype):
    """A 1-D operand (Value or constant) as `(name, length)` in `dtype`."""
    if isinstance(v, Value):
        if v.rank != 1 or v.shape[0] is None:
            raise Uncovered([(call.base, "Correlate", "an operand not 1-D of known length")])
        return cast(g, v, dtype_of(call, v), dtype, call.base).name, v.shape[0]
    array = constant(v).reshape(-1)
    return g.constant(array, f"{call.base}/operand", np.dtype(dtype)), len(array)


def correlate(g, call, p):
    dtype = out_dtype(call)
    a, n = _vector(g, call, p["x1"], dtype)
    b, m = _vector(g, call, p["x2"], dtype)
    mode = p.get("mode", "valid")
    if mode not in ("valid", "same", "full") or (mode == "valid" and m > n):
        raise Uncovered([(call.base, "Correlate", f"mode={mode!r} with lengths {n}, {m}")])
    signal = g.node("Reshape", [a, g.ints([1, 1, n])], call.base)
    kernel = g.node("Reshape", [b, g.ints([1, 1, m])], call.base)
    pad = 0 if mode == "valid" else m - 1
    name = g.node("Conv", [signal, kernel], call.base, kernel_shape=[m], pads=[pad, pad])
    name = g.node("Reshape", [name, g.ints([-1])], call.base)
    if mode == "same":
        start = (n + m - 1 - max(n, m)) // 2
        name = g.node("Slice", [name, g.ints([start], "starts"),
                                g.ints([start + max(n, m)], "ends"), g.ints([0], "axes")],
                      call.base)
    return [call.out(name)]


def gaussian_kernel(size, sigma):
    """Keras's SSIM window: the outer product of a normalized 1-D Gaussian, in float32."""
    x = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2.0)
    line = np.exp(-(x ** 2) / np.float32(2.0 * sigma ** 2))
    line = line / line.sum()
    return np.outer(line, line).astype(np.float32)


def ssim(g, call, p):
    data_format = p.get("data_format") or "channels_last"
    images = [p["image1"], p["image2"]]
    if not all(isinstance(v, Value) and v.rank in (3, 4) for v in images) or \
            len({v.rank for v in images}) > 1:
        raise Uncovered([(call.base, "SSIM", "images not both tensors of the graph of rank 3 "
                                             "or 4")])
    unbatched = images[0].rank == 3
    if unbatched:
        images = [Value(g.node("Unsqueeze", [g.keras(v).name, g.ints([0], "axes")], call.base),
                        (1,) + v.shape, tuple(range(4))) for v in images]
    images = [layout_for(g, v, data_format) for v in images]
    channels = images[0].shape[images[0].perm[1]]
    size = int(p.get("filter_size", 11))
    if channels is None:
        raise Uncovered([(call.base, "SSIM", "a channel count unknown when exporting")])
    weight = np.tile(gaussian_kernel(size, float(p.get("filter_sigma", 1.5)))[None, None],
                     (channels, 1, 1, 1))
    window = g.constant(weight, f"{call.base}/window")

    def op(op_type, *inputs):
        return g.node(op_type, list(inputs), call.base)

    def blur(name):
        return g.node("Conv", [name, window], call.base, kernel_shape=[size, size],
                      group=channels)

    max_val = float(p.get("max_val", 1.0))
    c1 = g.scalar((float(p.get("k1", 0.01)) * max_val) ** 2)
    c2 = g.scalar((float(p.get("k2", 0.03)) * max_val) ** 2)
    two = g.scalar(2.0)
    a, b = images[0].name, images[1].name
    mu1, mu2 = blur(a), blur(b)
    mu1_sq, mu2_sq, mu1_mu2 = op("Mul", mu1, mu1), op("Mul", mu2, mu2), op("Mul", mu1, mu2)
    var1 = op("Sub", blur(op("Mul", a, a)), mu1_sq)
    var2 = op("Sub", blur(op("Mul", b, b)), mu2_sq)
    cov = op("Sub", blur(op("Mul", a, b)), mu1_mu2)
    numerator = op("Mul", op("Add", op("Mul", two, mu1_mu2), c1),
                   op("Add", op("Mul", two, cov), c2))
    denominator = op("Mul", op("Add", op("Add", mu1_sq, mu2_sq), c1),
                     op("Add", op("Add", var1, var2), c2))
    per_channel = g.reduce("ReduceMean", op("Div", numerator, denominator), [2, 3], False,
                           call.base)
    # Unbatched: the batch of one added above goes too (its mean is itself).
    axes = [0, 1] if unbatched else [1]
    return [call.out(g.reduce("ReduceMean", per_channel, axes, False, call.base))]


def _triangle(x):
    return np.maximum(x.dtype.type(0), 1 - np.abs(x))


def _keys_cubic(x):
    out = ((1.5 * x - 2.5) * x) * x + 1.0
    out = np.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, out)
    return np.where(x >= 2.0, 0.0, out).astype(x.dtype)


def _lanczos(radius):
    def kernel(x):
        with np.errstate(divide="ignore", invalid="ignore"):
            y = radius * np.sin(np.pi * x) * np.sin(np.pi * x / radius)
            out = np.where(x > 1e-3, y / np.where(x != 0, np.pi ** 2 * x ** 2, 1), 1)
        return np.where(x > radius, 0.0, out).astype(x.dtype)
    return kernel


_KERNELS = {
    **dict.fromkeys(("linear", "bilinear", "trilinear"), _triangle),
    **dict.fromkeys(("cubic", "bicubic", "tricubic"), _keys_cubic),
    "lanczos3": _lanczos(3.0), "lanczos5": _lanczos(5.0),
}


def resampling_matrix(size_in, size_out, scale, translation, kernel, antialias):
    """The `(size_in, size_out)` weights Keras's TensorFlow backend resamples an axis with."""
    dtype = np.result_type(scale, translation)
    one = dtype.type(1)
    inv_scale = one / scale
    kernel_scale = max(inv_scale, one) if antialias else one
    sample = ((np.arange(size_out, dtype=dtype) + dtype.type(0.5)) * inv_scale
              - translation * inv_scale - dtype.type(0.5))
    x = np.abs(sample[None, :] - np.arange(size_in, dtype=dtype)[:, None]) / kernel_scale
    weights = kernel(x).astype(dtype)
    total = weights.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(np.abs(total) > 1000.0 * float(np.finfo(np.float32).eps),
                           weights / np.where(total != 0, total, one), 0)
    inside = (sample >= -0.5) & (sample <= dtype.type(size_in) - dtype.type(0.5))
    return np.where(inside[None, :], weights, 0).astype(dtype)


def _constants(call, p, key, count):
    if isinstance(p[key], Value):
        raise Uncovered([(call.base, "ScaleAndTranslate", f"a {key} computed in the graph")])
    value = p[key]
    # Keras reads Python numbers as float32 and keeps NumPy arrays' float64.
    dtype = np.float64 if getattr(value, "dtype", None) == np.float64 else np.float32
    array = np.asarray(constant(value), dtype).reshape(-1)
    if len(array) != count:
        raise Uncovered([(call.base, "ScaleAndTranslate", f"{key} not one per spatial axis")])
    return array


def scale_and_translate(g, call, p):
    x, dims = p["images"], [int(d) for d in p["spatial_dims"]]
    method = str(p.get("method"))
    if method not in _KERNELS or dtype_of(call, x) not in ("float32", "float16", "bfloat16"):
        raise Uncovered([(call.base, "ScaleAndTranslate", f"method={method!r} or non-float "
                                                          "images")])
    scales = _constants(call, p, "scale", len(dims))
    translations = _constants(call, p, "translation", len(dims))
    dtype = np.result_type(scales, translations)
    shape = list(x.shape)
    for i, d in enumerate(dims):
        d %= x.rank
        size_out = int(p["output_shape"][d])
        if shape[d] is None:
            raise Uncovered([(call.base, "ScaleAndTranslate", "a spatial size unknown")])
        matrix = resampling_matrix(shape[d], size_out, dtype.type(scales[i]),
                                   dtype.type(translations[i]), _KERNELS[method],
                                   bool(p.get("antialias", True)))
        # The resampled axis last, where MatMul contracts it.
        x = g.layout(x, [a for a in x.perm if a != d] + [d])
        shape[d] = size_out
        name = g.node("MatMul", [x.name, g.constant(matrix, f"{call.base}/weights")],
                      call.base)
        x = Value(name, tuple(shape), x.perm)
    return [call.out(x.name, x.perm)]


EMITTERS = {"correlate": correlate, "ssim": ssim, "scale_and_translate": scale_and_translate}
