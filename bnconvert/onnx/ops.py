"""Raw tensor ops of a Keras graph as ONNX nodes, for both flavours.

Keras 3 records `keras.ops` calls on symbolic tensors as graph nodes of
their own (an `Add` op, a `Mean` op, ...); tf-keras records TensorFlow
functions as `TFOpLambda` layers. Both are mapped onto the same emitters
(`math`, `reductions`, `indexing`, `reshaping`, `nn`, `numpy_extra`, `arrays`,
`losses`, `integers`, `linalg`, `linalg_svd`), keyed by the name of the
`keras.ops` function, with one argument dict `p` under that function's
parameter names:

- a Keras 3 op: its constructor attributes (`axis`, `keepdims`, ...) and
  its call arguments, bound to the op's `call` signature;
- a `TFOpLambda`: the call's positional and keyword arguments bound to the
  TensorFlow function's own signature (so `tf.reduce_mean(y, 1)` and
  `tf.reduce_mean(y, axis=1)` read the same), renamed by `TF_FUNCTIONS`
  and adjusted where TensorFlow's defaults differ (`tf.argmax`'s axis 0).

Operands that are not tensors of the graph (numbers, arrays, variables a
custom layer multiplies by) become constants laid out like the tensor
they meet.
"""

import dataclasses
import inspect
import re

import numpy as np

from bnconvert.onnx import activations
from bnconvert.onnx import adaptive
from bnconvert.onnx import arrays
from bnconvert.onnx import colour, einops, filters, image_warp
from bnconvert.onnx import ctc
from bnconvert.onnx import images
from bnconvert.onnx import indexing
from bnconvert.onnx import integers
from bnconvert.onnx import linalg
from bnconvert.onnx import linalg_svd
from bnconvert.onnx import loops
from bnconvert.onnx import losses
from bnconvert.onnx import math
from bnconvert.onnx import nn
from bnconvert.onnx import numpy_extra
from bnconvert.onnx import ordering
from bnconvert.onnx import reductions
from bnconvert.onnx import reshaping
from bnconvert.onnx import spectral
from bnconvert.onnx import preprocessing
from bnconvert.onnx import sized_ops
from bnconvert.onnx import sizes
from bnconvert.onnx import special
from bnconvert.onnx.graph import Uncovered
from bnconvert.onnx.graph import Value

_ACTIVATIONS = {
    "relu": "relu", "relu6": "relu6", "sigmoid": "sigmoid", "tanh": "tanh", "silu": "silu",
    "swish": "silu", "hard_silu": "hard_silu", "hard_swish": "hard_silu",
    "hard_sigmoid": "hard_sigmoid", "gelu": "gelu", "softmax": "softmax",
    "log_softmax": "log_softmax", "leaky_relu": "leaky_relu", "elu": "elu", "selu": "selu",
    "softplus": "softplus", "softsign": "softsign",
}


def _activation(name):
    def emit(g, call, p):
        params = {k: p[k] for k in ("axis", "negative_slope", "alpha", "approximate",
                                    "max_value", "threshold") if p.get(k) is not None}
        if p.get("beta", 1.0) != 1.0:
            raise Uncovered([(call.base, name, "beta != 1")])
        return [activations.apply(g, p["x"], name, call.base, **params)]
    return emit


def _glu(g, call, p):
    x = p["x"]
    axis = int(p.get("axis", -1)) % x.rank
    if x.shape[axis] is None:
        raise Uncovered([(call.base, "Glu", "an axis of unknown size")])
    half = x.shape[axis] // 2
    a, b = g.node("Split", [x.name, g.ints([half, half], "split")], call.base, outputs=2,
                  axis=x.physical(axis))
    return [call.out(g.node("Mul", [a, g.node("Sigmoid", [b], call.base)], call.base), x.perm)]


def _add_n(g, call, p):
    names, ref = math.aligned(g, call, list(p["inputs"]), math.out_dtype(call))
    return [call.out(g.node("Sum", names, call.base), ref.perm)]


def _resize(g, call, p):
    """`image.resize` through the Resizing layer's emitter."""
    if p.get("antialias") or p.get("preserve_aspect_ratio"):
        raise Uncovered([(call.base, "Resize", "antialias or preserve_aspect_ratio")])
    size, computed = p["size"], None
    if isinstance(size, Value):  # computed in the graph (`tf.shape(y)[1:3]`): the known result
        channels_first = p.get("data_format") == "channels_first"
        size = call.shapes[0][-2:] if channels_first else call.shapes[0][-3:-1]
        if None in size:  # or the graph's own
            computed, size = g.keras(p["size"]).name, (None, None)
    height, width = (None if s is None else int(s) for s in size)
    interpolation = p.get("interpolation", "bilinear")
    images = p["images"]
    dtype = math.dtype_of(call, images) if isinstance(images, Value) else "float32"
    if interpolation != "nearest" and not dtype.startswith("float"):
        # TensorFlow computes them in float32; Keras's symbolic result keeps the dtype.
        raise Uncovered([(call.base, "Resize", f"{interpolation} of {dtype} images")])
    layer = nn.named_arguments(
        call, name=call.base, interpolation=interpolation, height=height,
        width=width, data_format=p.get("data_format") or "channels_last",
        crop_to_aspect_ratio=p.get("crop_to_aspect_ratio", False),
        pad_to_aspect_ratio=p.get("pad_to_aspect_ratio", False),
        fill_mode=p.get("fill_mode", "constant"), fill_value=p.get("fill_value", 0.0),
        run_time_size=computed)
    return preprocessing.resizing(g, dataclasses.replace(call, layer=layer, inputs=[p["images"]]))


EMITTERS = {
    **math.EMITTERS, **reductions.EMITTERS, **indexing.EMITTERS, **reshaping.EMITTERS,
    **nn.EMITTERS, **numpy_extra.EMITTERS, **losses.EMITTERS, **arrays.EMITTERS,
    **integers.EMITTERS, **images.EMITTERS, **spectral.EMITTERS, **special.EMITTERS,
    **ordering.EMITTERS, **ctc.EMITTERS, **adaptive.EMITTERS, **loops.EMITTERS,
    **{k: _activation(v) for k, v in _ACTIVATIONS.items()},
    "glu": _glu, "add_n": _add_n, "resize": _resize,
    "stop_gradient": lambda g, call, p: [p.get("x", p.get("variable"))],
    "convert_to_tensor": math.EMITTERS["cast"],
    **colour.EMITTERS, **einops.EMITTERS, **filters.EMITTERS, **image_warp.EMITTERS,
}
EMITTERS.update({**linalg.EMITTERS, **linalg_svd.EMITTERS})

# Keras 3 op classes whose names are not their function's in snake case.
_CLASS_NAMES = {"Absolute": "absolute", "Resize": "resize", "BatchNorm": "batch_normalization",
                "LayerNorm": "layer_normalization", "RMSNorm": "rms_normalization",
                "RGBToHSV": "rgb_to_hsv", "HSVToRGB": "hsv_to_rgb", "SSIM": "ssim",
                "RGBToGrayscale": "rgb_to_grayscale", "AllClose": "allclose",
                "PSNR": "psnr", "CDist": "cdist", "IsIn": "isin", "SVD": "svd",
                "ExtractPatches3D": "extract_patches_3d", "FFT": "fft", "FFT2": "fft2",
                "IFFT2": "ifft2", "RFFT": "rfft", "IRFFT": "irfft", "STFT": "stft",
                "ISTFT": "istft",
                "SearchSorted": "searchsorted", "CTCLoss": "ctc_loss",
                # keras.activations.relu with arguments records a ReLU op.
                "ReLU": "relu"}


_TRACER_OPS = {sizes.__name__: sizes.EMITTERS, sized_ops.__name__: sized_ops.EMITTERS}


def function_name(op):
    """The `keras.ops` function a Keras 3 op node records (`TopK` -> `top_k`)."""
    name = type(op).__name__
    return _CLASS_NAMES.get(name) or re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _bind(function, args, kwargs, what):
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise Uncovered([(None, what, f"arguments not understood ({e})")]) from None
    bound.apply_defaults()
    out = dict(bound.arguments)
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, {}))
    return out


def keras_params(op, call):
    """A Keras 3 op's arguments: its attributes and its bound call arguments."""
    p = {k: v for k, v in vars(op).items() if not k.startswith("_")}
    p.update(_bind(type(op).call, (op,) + tuple(call.args), call.kwargs, type(op).__name__))
    return p


def _run(g, call, name, p, what, table=None):
    """Runs one emitter; arguments it cannot handle make the op uncovered, not a crash."""
    try:
        return (table or EMITTERS)[name](g, call, p)
    except Uncovered:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise Uncovered([(call.base, what, f"arguments not handled ({type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:80] if str(e) else ''})")])


def emit_op(g, call):
    """A Keras 3 op node."""
    name = function_name(call.layer)
    # The tracer's own ops (sizes as graph values) are not `keras.ops` functions.
    table = _TRACER_OPS.get(type(call.layer).__module__, EMITTERS)
    if name not in table:
        raise Uncovered([(call.base, type(call.layer).__name__, "op")])
    return _run(g, call, name, keras_params(call.layer, call), type(call.layer).__name__, table)


def _tf(name, adjust=None, **renames):
    return name, renames, adjust


def _axis_zero(p):
    """TensorFlow's arg-reductions and gather read `axis=None` as axis 0."""
    return dict(p, axis=0 if p.get("axis") is None else p["axis"])


def _axis_last(p):
    return dict(p, axis=-1 if p.get("axis") is None else p["axis"])


def _sizes_to_points(p):
    """tf.split's sizes -> NumPy split points."""
    sections = p["indices_or_sections"]
    if isinstance(sections, int) or np.ndim(math.constant(sections)) == 0:
        return dict(p, indices_or_sections=int(math.constant(sections)))
    sizes = [int(s) for s in math.constant(sections).reshape(-1)]
    if -1 in sizes[:-1]:
        # The -1 part is what the others leave of the axis.
        x = p["x"]
        total = x.shape[int(p.get("axis") or 0) % x.rank] if hasattr(x, "shape") else None
        if total is None or sizes.count(-1) > 1:
            raise Uncovered([(None, "split", "a size of -1 on an axis of unknown size")])
        sizes[sizes.index(-1)] = total - sum(sizes) - 1
    return dict(p, indices_or_sections=list(np.cumsum(sizes)[:-1]))


def _gather(p):
    if p.get("batch_dims"):
        raise Uncovered([(None, "gather", "batch_dims")])
    return _axis_zero(p)


def _checked(**expected):
    """Refuses TensorFlow arguments this mapping does not translate."""
    def adjust(p):
        for key, value in expected.items():
            if p.get(key, value) != value:
                raise Uncovered([(None, "TFOpLambda", f"{key}={p[key]!r}")])
        return p
    return adjust


def _nhwc(p):
    if p.get("data_format") not in (None, "NHWC"):
        raise Uncovered([(None, "TFOpLambda", f"data_format={p['data_format']!r}")])
    return dict(p, data_format="channels_last")


_UNARY_TF = {
    "math.abs": "abs", "math.negative": "negative", "math.exp": "exp", "math.log": "log",
    "math.sqrt": "sqrt", "math.rsqrt": "rsqrt", "math.square": "square", "math.erf": "erf",
    "math.erfc": "erfc", "math.floor": "floor", "math.ceil": "ceil", "math.round": "round",
    "math.sign": "sign", "math.reciprocal": "reciprocal", "math.sin": "sin", "math.cos": "cos",
    "math.log1p": "log1p", "math.expm1": "expm1", "math.logical_not": "logical_not",
    "math.is_nan": "isnan", "math.is_inf": "isinf", "math.is_finite": "isfinite",
    "identity": "copy", "stop_gradient": "copy", "math.sigmoid": "sigmoid",
    "math.tanh": "tanh", "nn.sigmoid": "sigmoid", "nn.tanh": "tanh", "math.rint": "round",
}
_ACTIVATIONS_TF = {
    "nn.relu": "relu", "nn.relu6": "relu6", "nn.silu": "silu", "nn.swish": "silu",
    "nn.gelu": "gelu", "nn.elu": "elu", "nn.selu": "selu", "math.softplus": "softplus",
    "nn.softplus": "softplus", "nn.softsign": "softsign", "math.softsign": "softsign",
}
_BINARY_TF = {
    "__operators__.add": "add", "math.add": "add", "math.subtract": "subtract",
    "math.multiply": "multiply", "math.truediv": "true_divide", "math.divide": "true_divide",
    "math.maximum": "maximum", "math.minimum": "minimum", "math.pow": "power",
    "math.floormod": "mod", "math.floordiv": "floor_divide", "math.equal": "equal",
    "compat.v1.floor_div": "floor_divide",
    "math.not_equal": "not_equal", "math.greater": "greater",
    "math.greater_equal": "greater_equal", "math.less": "less", "math.less_equal": "less_equal",
    "math.logical_and": "logical_and", "math.logical_or": "logical_or",
    "math.logical_xor": "logical_xor", "math.divide_no_nan": "divide_no_nan",
}
_REDUCE_TF = {
    "math.reduce_mean": "mean", "math.reduce_sum": "sum", "math.reduce_max": "max",
    "math.reduce_min": "min", "math.reduce_prod": "prod", "math.reduce_any": "any",
    "math.reduce_all": "all", "math.reduce_variance": "var", "math.reduce_std": "std",
    "math.reduce_logsumexp": "logsumexp",
}
# tf-keras TFOpLambda symbols -> (keras.ops function, adjust, renames).
TF_FUNCTIONS = {
    **{k: _tf(v, input="x") for k, v in _UNARY_TF.items()},
    **{k: _tf(v, features="x") for k, v in _ACTIVATIONS_TF.items()},
    **{k: _tf(v, x="x1", y="x2") for k, v in _BINARY_TF.items()},
    **{k: _tf(v, input_tensor="x") for k, v in _REDUCE_TF.items()},
    "__operators__.ne": _tf("not_equal", self="x1", other="x2"),
    "__operators__.eq": _tf("equal", self="x1", other="x2"),
    "__operators__.getitem": _tf("get_item", tensor="x", slice_spec="key"),
    "math.add_n": _tf("add_n"),
    "nn.bias_add": _tf("add", _nhwc, value="x1", bias="x2"),
    "nn.convolution": _tf("tf_convolution"),
    "nn.leaky_relu": _tf("leaky_relu", features="x", alpha="negative_slope"),
    "nn.softmax": _tf("softmax", _axis_last, logits="x"),
    "nn.log_softmax": _tf("log_softmax", _axis_last, logits="x"),
    "math.argmax": _tf("argmax", _axis_zero, input="x"),
    "math.argmin": _tf("argmin", _axis_zero, input="x"),
    "math.cumsum": _tf("cumsum"),
    "math.erfinv": _tf("erfinv"), "math.bessel_i0": _tf("i0"), "math.nextafter": _tf("nextafter"),
    "searchsorted": _tf("searchsorted"),
    "math.count_nonzero": _tf("count_nonzero", input="x"),
    "norm": _tf("norm", lambda p: dict(p, ord=None if p["ord"] == "euclidean" else p["ord"]),
                tensor="x"),
    "clip_by_value": _tf("clip", t="x", clip_value_min="x_min", clip_value_max="x_max"),
    "where": _tf("where", x="x1", y="x2"),
    "cast": _tf("cast"),
    "concat": _tf("concatenate", values="xs"),
    "stack": _tf("stack", values="x"),
    "unstack": _tf("unstack", value="x"),
    "split": _tf("split", _sizes_to_points, value="x", num_or_size_splits="indices_or_sections"),
    "reshape": _tf("reshape", tensor="x", shape="newshape"),
    "transpose": _tf("transpose", _checked(conjugate=False), a="x", perm="axes"),
    "compat.v1.transpose": _tf("transpose", _checked(conjugate=False), a="x", perm="axes"),
    "expand_dims": _tf("expand_dims", input="x"),
    "squeeze": _tf("squeeze", input="x"),
    "compat.v1.squeeze": _tf("squeeze", _checked(squeeze_dims=None), input="x"),
    "tile": _tf("tile", input="x", multiples="repeats"),
    "repeat": _tf("repeat", input="x"),
    "broadcast_to": _tf("broadcast_to", input="x"),
    "reverse": _tf("flip", tensor="x"),
    "roll": _tf("roll", input="x"),
    **dict.fromkeys(("pad", "compat.v1.pad"), _tf(
        "pad", lambda p: dict(p, mode=str(p["mode"]).lower()), tensor="x",
        paddings="pad_width", constant_values="constant_values")),
    **{f"nn.{k}": _tf(k, _nhwc, input="x") for k in ("depth_to_space", "space_to_depth")},
    "gather": _tf("take", _gather, params="x"),
    "compat.v1.gather": _tf("take", _gather, params="x"),
    "linalg.matmul": _tf("matmul", _checked(adjoint_a=False, adjoint_b=False), a="x1", b="x2"),
    "einsum": _tf("einsum", equation="subscripts", inputs="operands"),
    "linalg.tensordot": _tf("tensordot", a="x1", b="x2"),
    "one_hot": _tf("one_hot", _checked(on_value=None, off_value=None), indices="x",
                   depth="num_classes"),
    "math.top_k": _tf("top_k", input="x"),
    "sort": _tf("sort", _checked(direction="ASCENDING"), values="x"),
    "argsort": _tf("argsort", _checked(direction="ASCENDING"), values="x"),
    "shape": _tf("tf_shape", input="x"), "compat.v1.shape": _tf("tf_shape", input="x"),
    "range": _tf("sized_arange", lambda p: dict(
        start=0 if p.get("limit") is None else p["start"], step=p.get("delta", 1),
        stop=p["start"] if p.get("limit") is None else p["limit"])),
    "sequence_mask": _tf("sequence_mask"),
    "zeros_like": _tf("zeros_like", input="x"),
    "ones_like": _tf("ones_like", input="x"),
    "image.resize": _tf("resize", method="interpolation"),
    "image.extract_patches": _tf("tf_extract_patches"),
    **dict.fromkeys(("compat.v1.image.resize_images", "compat.v1.image.resize"), _tf("tf1_resize")),
    "image.rgb_to_hsv": _tf("rgb_to_hsv"), "image.hsv_to_rgb": _tf("hsv_to_rgb"),
    "image.ssim": _tf("ssim", _checked(return_index_map=False), img1="image1", img2="image2"),
}


def _sequence_mask(g, call, p):
    """tf.sequence_mask: `range(maxlen) < lengths[..., None]`, in `maxlen`'s dtype.

    TensorFlow casts the lengths to `maxlen`'s dtype (int32 for a number)
    before comparing: float lengths are truncated toward zero (2.5 masks 2
    steps, not 3), which ONNX's float-to-integer `Cast` does too.
    """
    lengths, maxlen = p["lengths"], p.get("maxlen")
    if maxlen is None or not isinstance(lengths, Value):
        raise Uncovered([(call.base, "SequenceMask", "maxlen=None or constant lengths")])
    if isinstance(maxlen, Value):
        dtype = math.dtype_of(call, maxlen)
        stop = maxlen.name
    else:
        dtype = "float32" if math.constant(maxlen).dtype.kind == "f" else "int32"
        stop = g.scalar(math.constant(maxlen), np.dtype(dtype))
    lengths = math.cast(g, lengths, math.dtype_of(call, lengths), dtype, call.base)
    # Range takes 0-d bounds; the graph holds numbers and sizes as [1].
    bounds = [g.node("Reshape", [b, g.ints(np.zeros(0, np.int64))], call.base)
              for b in (g.scalar(0, np.dtype(dtype)), stop, g.scalar(1, np.dtype(dtype)))]
    steps = g.node("Range", bounds, call.base)
    ends = g.node("Unsqueeze", [g.keras(lengths).name, g.ints([-1], "axes")], call.base)
    mask = g.node("Less", [steps, ends], call.base)
    return [call.out(mask if math.out_dtype(call) == "bool" else g.node(
        "Cast", [mask], call.base, to=math.onnx_dtype(math.out_dtype(call))))]


# tf-keras functions with no `keras.ops` twin (`tf.range` is the tracer's sized arange).
EMITTERS.update({"sequence_mask": _sequence_mask, "sized_arange": sizes.EMITTERS["sized_arange"]})


def _l2_normalize(p):
    """tf.math.l2_normalize: `x * rsqrt(max(sum(x^2), eps))`, Keras's normalize at sqrt(eps)."""
    if p.get("axis") is None or p.get("dim") is not None:
        raise Uncovered([(None, "TFOpLambda", "tf.math.l2_normalize over every axis (axis=None)")])
    return dict(p, order=2, epsilon=float(p.get("epsilon", 1e-12)) ** 0.5)


def _diag_part(p):
    if not isinstance(p.get("k", 0), int):
        raise Uncovered([(None, "TFOpLambda", "tf.linalg.diag_part of a band (k a pair)")])
    return dict(p, offset=p.get("k", 0), axis1=-2, axis2=-1)


TF_FUNCTIONS.update({
    "math.l2_normalize": _tf("normalize", _l2_normalize),
    "linalg.qr": _tf("qr", lambda p: dict(p, mode="complete" if p.get("full_matrices")
                                          else "reduced"), input="x"),
    "linalg.det": _tf("det", input="x"),
    "linalg.lu": _tf("lu_factor", lambda p: dict(p, rows=True), input="x"),
    "linalg.svd": _tf("svd", tensor="x"),
    # tf.linalg.logdet records its parts: cholesky, diag_part, real, log, reduce_sum.
    "linalg.diag_part": _tf("diagonal", _diag_part, input="x"),
    "math.real": _tf("copy", input="x"),
    "linalg.inv": _tf("inv", _checked(adjoint=False), input="x"),
    "linalg.cholesky": _tf("cholesky", input="x"),
    "linalg.solve": _tf("solve", _checked(adjoint=False), matrix="a", rhs="b"),
    "linalg.triangular_solve": _tf("solve_triangular", _checked(adjoint=False), matrix="a",
                                   rhs="b"),
})


def tf_params(call):
    """A TFOpLambda call's arguments under their `keras.ops` names."""
    symbol = call.layer.get_config().get("function")
    if symbol not in TF_FUNCTIONS:
        raise Uncovered([(call.layer.name, "TFOpLambda", f"tf.{symbol}")])
    name, renames, adjust = TF_FUNCTIONS[symbol]
    kwargs = {k: v for k, v in call.kwargs.items() if k != "name"}
    bound = _bind(call.layer.function, call.args, kwargs, f"tf.{symbol}")
    p = {renames.get(k, k): v for k, v in bound.items()}
    if hasattr(p.get("dtype"), "name"):
        p["dtype"] = p["dtype"].name
    return name, adjust(p) if adjust else p


def emit_tf_function(g, call):
    """A tf-keras `TFOpLambda` layer."""
    name, p = tf_params(call)
    return _run(g, call, name, p, "TFOpLambda")

