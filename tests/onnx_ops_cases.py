"""The `keras.ops` conformance cases of the native ONNX exporter.

`KERAS` maps a case id (`<keras.ops function>` or `<function>:<variant>`)
to `fn(y) -> output`, where `y` is a 4-D tensor `(batch, H, W, 6)` of
large values of both signs. Outputs that Keras computes as int or bool are
cast to float32 here, since a model's ONNX outputs are float. Cases whose
op needs a static size list it in `STATIC` (they get a fixed spatial size).
`TF` holds the tf-keras `TFOpLambda` forms, positional and keyword.
Used by tests/test_onnx_ops_conformance.py and tools/onnx_coverage_ops.py.
"""

import keras
import numpy as np
import onnx_ops_cases_image as _image
import onnx_ops_cases_linalg as linalg_cases

ops = keras.ops
F = "float32"


def _pos(y):
    """Positive values for ops with a restricted domain."""
    return ops.abs(y) + 0.5


def _unit(y):
    """Values in (-1, 1)."""
    return ops.tanh(y / 100.0)


def _small(y):
    return y / 40.0


def _f(y):
    return ops.cast(y, F)


def _i(y):
    return ops.cast(y, "int32")


def _prob(y):
    """Probabilities away from 0 and 1 (Keras reads a Softmax/Sigmoid output's logits)."""
    return ops.sigmoid(y / 40.0) * 0.98 + 0.01


def _w(shape, seed=3):
    """A constant weight of both signs."""
    return np.random.default_rng(seed).normal(size=shape).astype(F)


class _BatchReshape(keras.layers.Layer):
    """reshape to `(ops.shape(x)[0], -1, 3)` inside a call: traced, the batch is None."""

    def call(self, x):
        return ops.reshape(x, (ops.shape(x)[0], -1, 3))


KERAS = {
    # elementwise
    "abs": lambda y: ops.abs(y), "absolute": lambda y: ops.absolute(y),
    "fabs": lambda y: ops.fabs(y), "negative": lambda y: -y, "exp": lambda y: ops.exp(_small(y)),
    "log": lambda y: ops.log(_pos(y)), "sqrt": lambda y: ops.sqrt(_pos(y)),
    "erf": lambda y: ops.erf(_small(y)), "erfc": lambda y: ops.erfc(_small(y)),
    "floor": lambda y: ops.floor(y), "ceil": lambda y: ops.ceil(y),
    "reciprocal": lambda y: ops.reciprocal(_pos(y)), "sign": lambda y: ops.sign(y),
    "sin": lambda y: ops.sin(_small(y)), "cos": lambda y: ops.cos(_small(y)),
    "tan": lambda y: ops.tan(_unit(y)), "arcsin": lambda y: ops.arcsin(_unit(y)),
    "arccos": lambda y: ops.arccos(_unit(y)), "arctan": lambda y: ops.arctan(y),
    "sinh": lambda y: ops.sinh(_small(y)), "cosh": lambda y: ops.cosh(_small(y)),
    "arcsinh": lambda y: ops.arcsinh(y), "arccosh": lambda y: ops.arccosh(_pos(y) + 1.0),
    "arctanh": lambda y: ops.arctanh(_unit(y) * 0.9), "isnan": lambda y: _f(ops.isnan(
        ops.log(y))), "isinf": lambda y: _f(ops.isinf(ops.exp(y))),
    "isfinite": lambda y: _f(ops.isfinite(ops.log(y))),
    "isposinf": lambda y: _f(ops.isposinf(ops.exp(y))),
    "isneginf": lambda y: _f(ops.isneginf(-ops.exp(y))),
    "logical_not": lambda y: _f(ops.logical_not(y > 0)), "copy": lambda y: ops.copy(y),
    "stop_gradient": lambda y: ops.stop_gradient(y), "square": lambda y: ops.square(y),
    "rsqrt": lambda y: ops.rsqrt(_pos(y)), "expm1": lambda y: ops.expm1(_small(y)),
    "log1p": lambda y: ops.log1p(_pos(y)), "log2": lambda y: ops.log2(_pos(y)),
    "log10": lambda y: ops.log10(_pos(y)), "exp2": lambda y: ops.exp2(_small(y)),
    "log_sigmoid": lambda y: ops.log_sigmoid(y), "hard_tanh": lambda y: ops.hard_tanh(_small(y)),
    "tanh_shrink": lambda y: ops.tanh_shrink(_small(y)), "round": lambda y: ops.round(y),
    "round:decimals": lambda y: ops.round(_small(y), 1), "cbrt": lambda y: ops.cbrt(y),
    "trunc": lambda y: ops.trunc(_small(y)), "sinc": lambda y: ops.sinc(ops.round(_small(y))),
    "signbit": lambda y: _f(ops.signbit(y)),
    "hard_shrink": lambda y: ops.hard_shrink(_small(y), 0.7),
    "soft_shrink": lambda y: ops.soft_shrink(_small(y), 0.7),
    "threshold": lambda y: ops.threshold(y, 5.0, -3.0), "squareplus": lambda y: ops.squareplus(y),
    "nan_to_num": lambda y: ops.nan_to_num(ops.log(y), nan=1.5, neginf=-7.0),
    "celu": lambda y: ops.celu(_small(y), alpha=0.7),
    "sparse_plus": lambda y: ops.sparse_plus(_small(y)),
    "sparse_sigmoid": lambda y: ops.sparse_sigmoid(_small(y)),
    "deg2rad": lambda y: ops.deg2rad(y), "rad2deg": lambda y: ops.rad2deg(y),
    "relu": lambda y: ops.relu(y),
    # keras.activations.relu with arguments records a `ReLU` op (keras-cv's hard sigmoid).
    "relu:activation_max": lambda y: keras.activations.relu(y, max_value=60.0),
    "relu:activation_all": lambda y: keras.activations.relu(
        y, negative_slope=0.1, max_value=50.0, threshold=5.0), "relu6": lambda y: ops.relu6(_small(y)),
    "sigmoid": lambda y: ops.sigmoid(_small(y)), "tanh": lambda y: ops.tanh(_small(y)),
    "silu": lambda y: ops.silu(_small(y)), "swish": lambda y: ops.swish(_small(y)),
    "hard_silu": lambda y: ops.hard_silu(_small(y)), "hard_swish": lambda y: ops.hard_swish(
        _small(y)), "hard_sigmoid": lambda y: ops.hard_sigmoid(_small(y)),
    "gelu": lambda y: ops.gelu(_small(y)), "gelu:exact": lambda y: ops.gelu(_small(y), False),
    "softmax": lambda y: ops.softmax(_small(y), axis=1), "log_softmax": lambda y: ops.log_softmax(
        _small(y)), "leaky_relu": lambda y: ops.leaky_relu(y, 0.3),
    "elu": lambda y: ops.elu(_small(y), 0.5), "selu": lambda y: ops.selu(_small(y)),
    "softplus": lambda y: ops.softplus(_small(y)), "softsign": lambda y: ops.softsign(y),
    "glu": lambda y: ops.glu(_small(y)),
    # binary, comparison, logical
    "add": lambda y: ops.add(y, ops.flip(y, 1)), "subtract": lambda y: 3.0 - y,
    "multiply": lambda y: y * ops.mean(y, axis=[1, 2], keepdims=True),
    "divide": lambda y: y / _pos(ops.flip(y, 2)), "true_divide": lambda y: ops.true_divide(y, 7.0),
    "maximum": lambda y: ops.maximum(y, -5.0), "minimum": lambda y: ops.minimum(y, ops.flip(y, 3)),
    "power": lambda y: ops.power(_pos(_small(y)), 1.7), "fmod": lambda y: ops.fmod(y, 7.0),
    "mod": lambda y: ops.mod(y, 7.0), "floor_divide": lambda y: y // 7.0,
    "divide_no_nan": lambda y: ops.divide_no_nan(y, ops.relu(ops.flip(y, 1))),
    "hypot": lambda y: ops.hypot(y, ops.flip(y, 3)),
    "logaddexp": lambda y: ops.logaddexp(y, ops.flip(y, 3)),
    "heaviside": lambda y: ops.heaviside(ops.round(_small(y)), ops.flip(y, 3)),
    "equal": lambda y: _f(ops.equal(ops.round(_small(y)), 0.0)),
    "not_equal": lambda y: _f(ops.not_equal(ops.round(_small(y)), 1.0)),
    "greater": lambda y: _f(y > 0), "greater_equal": lambda y: _f(y >= ops.flip(y, 1)),
    "less": lambda y: _f(y < 10.0), "less_equal": lambda y: _f(y <= -3.0),
    "logical_and": lambda y: _f(ops.logical_and(y > 0, ops.flip(y, 3) < 0)),
    "logical_or": lambda y: _f(ops.logical_or(y > 50, y < -50)),
    "logical_xor": lambda y: _f(ops.logical_xor(y > 0, ops.flip(y, 3) > 0)),
    "where": lambda y: ops.where(y > 0, y, -2.0 * y), "clip": lambda y: ops.clip(y, -30.0, 40.0),
    "cast": lambda y: _f(ops.cast(y, "int32") * 2), "cast:bool": lambda y: _f(ops.cast(
        ops.round(_small(y)), "bool")),
    # reductions
    "sum": lambda y: ops.sum(y, axis=[1, 2]), "mean": lambda y: ops.mean(y, axis=-1, keepdims=True),
    "mean:all": lambda y: ops.mean(y) + 0 * y, "max": lambda y: ops.max(y, axis=1),
    "min": lambda y: ops.min(y, axis=[1, 3], keepdims=True), "amax": lambda y: ops.amax(y, axis=2),
    "amin": lambda y: ops.amin(y, axis=-1), "prod": lambda y: ops.prod(_unit(y) + 1.0, axis=2),
    "var": lambda y: ops.var(y, axis=[1, 2]), "std": lambda y: ops.std(y, axis=-1, keepdims=True),
    "moments": lambda y: ops.moments(y, [1, 2])[1] + ops.moments(y, [1, 2])[0],
    "logsumexp": lambda y: ops.logsumexp(y, axis=-1), "any": lambda y: _f(ops.any(y > 120, axis=1)),
    "all": lambda y: _f(ops.all(y > -120, axis=[1, 2])),
    "count_nonzero": lambda y: _f(ops.count_nonzero(ops.relu(y), axis=-1)),
    "norm": lambda y: ops.norm(y, axis=-1), "norm:1": lambda y: ops.norm(y, ord=1, axis=1),
    "ptp": lambda y: ops.ptp(y, axis=2), "average": lambda y: ops.average(y, axis=1),
    "argmax": lambda y: _f(ops.argmax(y, axis=-1)), "argmin": lambda y: _f(ops.argmin(y, axis=1)),
    "argmax:all": lambda y: _f(ops.argmax(y)) + 0 * y, "cumsum": lambda y: ops.cumsum(y, axis=2),
    # indexing
    "get_item": lambda y: y[:, 1:-1, ::-2, 2:], "get_item:int": lambda y: y[:, 0, ..., None, -1],
    "get_item:newaxis": lambda y: y[None, ..., 1::2],
    "slice": lambda y: ops.slice(y, (0, 1, 1, 2), (2, 2, 3, 3)),
    "take": lambda y: ops.take(y, np.array([0, 4, -1]), axis=3),
    "take_along_axis": lambda y: ops.take_along_axis(y, ops.argmax(y, axis=-1, keepdims=True), -1),
    "flip": lambda y: ops.flip(y, 2), "fliplr": lambda y: ops.fliplr(y),
    "flipud": lambda y: ops.flipud(y) + 0, "roll": lambda y: ops.roll(y, 2, axis=3),
    "tril": lambda y: ops.tril(y, 1), "triu": lambda y: ops.triu(y),
    "one_hot": lambda y: ops.one_hot(ops.argmax(y, axis=-1), 6),
    "top_k": lambda y: ops.top_k(y, 2)[0] + _f(ops.top_k(y, 2)[1]),
    "sort": lambda y: ops.sort(y), "argsort": lambda y: _f(ops.argsort(y, axis=-1)),
    # loops over tensors (onnx/loops.py): each an ONNX Loop, the function traced once
    "map": lambda y: ops.map(lambda e: ops.sum(e * e, axis=-1) / 100.0, y),
    "map:tuple": lambda y: ops.map(lambda e: e[0] * ops.max(e[1]), (y[:, 0], ops.abs(y))),
    "vectorized_map": lambda y: ops.vectorized_map(lambda e: ops.softmax(e / 50.0, axis=-1), y),
    "scan": lambda y: ops.scan(lambda c, x: (c * 0.5 + x, c - x), ops.zeros_like(y[0]), y)[1],
    "scan:reverse": lambda y: ops.scan(lambda c, x: (ops.maximum(c, x), c), ops.zeros_like(y[0]),
                                       y, reverse=True)[1],
    "fori_loop": lambda y: ops.fori_loop(1, 4, lambda i, v: v * 0.5 + _f(i), y),
    "convert_to_tensor": lambda y: ops.convert_to_tensor(y) + 1.0,
    "convert_to_tensor:int": lambda y: _f(ops.convert_to_tensor(y, "int32")),
    "zeros_like": lambda y: ops.zeros_like(y) + y, "ones_like": lambda y: ops.ones_like(y),
    "full_like": lambda y: ops.full_like(y, -3.5),
    # shapes and products
    "concatenate": lambda y: ops.concatenate([y, -y], axis=2),
    "hstack": lambda y: ops.hstack([y, y]), "vstack": lambda y: ops.vstack([y, y]),
    "split": lambda y: ops.split(y, 3, axis=-1)[1], "array_split": lambda y: ops.array_split(
        y, 4, axis=-1)[3], "unstack": lambda y: ops.unstack(y, axis=3)[2],
    "pad": lambda y: ops.pad(y, [[0, 0], [1, 2], [0, 1], [0, 0]], constant_values=-2.0),
    "pad:reflect": lambda y: ops.pad(y, [[0, 0], [1, 2], [2, 1], [0, 0]], mode="reflect"),
    "pad:symmetric": lambda y: ops.pad(y, [[0, 0], [1, 2], [0, 5], [0, 0]], mode="symmetric"),
    "reshape": lambda y: ops.reshape(y, (-1, 6)),
    "reshape:traced_batch": lambda y: _BatchReshape()(y), "transpose": lambda y: ops.transpose(
        y, (0, 3, 1, 2)), "swapaxes": lambda y: ops.swapaxes(y, 1, 3),
    "moveaxis": lambda y: ops.moveaxis(y, 3, 1), "ravel": lambda y: ops.ravel(y),
    "expand_dims": lambda y: ops.expand_dims(y, 2), "squeeze": lambda y: ops.squeeze(
        ops.mean(y, axis=2, keepdims=True), 2), "stack": lambda y: ops.stack([y, -y], axis=1),
    "tile": lambda y: ops.tile(y, (1, 2, 1, 3)), "repeat": lambda y: ops.repeat(y, 2, axis=3),
    "broadcast_to": lambda y: ops.broadcast_to(ops.mean(y, axis=[0, 1, 2], keepdims=True),
                                               (2, 4, 3, 6)),
    "matmul": lambda y: ops.matmul(y, ops.transpose(y, (0, 1, 3, 2))) / 100.0,
    "einsum": lambda y: ops.einsum("bhwc,bhwd->bcd", y, y) / 100.0,
    "tensordot": lambda y: ops.tensordot(y, np.linspace(-1, 1, 12).reshape(6, 2).astype(F), 1),
    "dot": lambda y: ops.dot(y, np.linspace(-1, 1, 18).reshape(6, 3).astype(F)),
    "outer": lambda y: ops.outer(ops.mean(y, axis=[1, 2, 3]), ops.mean(y, axis=[1, 2, 3])),
    "resize": lambda y: ops.image.resize(y, (9, 11)),
    "resize:nearest": lambda y: ops.image.resize(y, (10, 4), interpolation="nearest"),
    "resize:channels_first": lambda y: ops.image.resize(ops.transpose(y, (0, 3, 1, 2)), (6, 8),
                                                        data_format="channels_first"),
    # nn
    "conv": lambda y: ops.conv(y, _w((3, 3, 6, 4)), padding="same"),
    "conv:strided": lambda y: ops.conv(y, _w((3, 2, 6, 4)), strides=2),
    "depthwise_conv": lambda y: ops.depthwise_conv(y, _w((3, 3, 6, 2)), padding="same"),
    "max_pool": lambda y: ops.max_pool(y, 2, padding="same"),
    "average_pool": lambda y: ops.average_pool(y, (3, 2), strides=1),
    "depth_to_space": lambda y: ops.depth_to_space(ops.concatenate([y, -y], -1)[..., :8], 2),
    "space_to_depth": lambda y: ops.space_to_depth(y[:, :6, :4], 2),
    "batch_normalization": lambda y: ops.batch_normalization(
        y, _w((6,)), _w((6,)) ** 2 + 0.5, -1, offset=_w((6,)), scale=_w((6,))),
    "layer_normalization": lambda y: ops.layer_normalization(y, _w((6,)), _w((6,))),
    "rms_normalization": lambda y: ops.rms_normalization(y, _w((6,)), axis=-1),
    "normalize": lambda y: ops.normalize(y, axis=-1),
    "dot_product_attention": lambda y: ops.dot_product_attention(
        *[ops.reshape(y[:, :4] * s, (-1, 4, 3, 10)) for s in (0.01, 0.02, 1.0)]),
    "dot_product_attention:causal": lambda y: ops.dot_product_attention(
        *[ops.reshape(y[:, :4] * s, (-1, 4, 3, 10)) for s in (0.01, 0.02, 1.0)], is_causal=True),
    # more numpy
    "fmax": lambda y: ops.fmax(ops.log(y), -ops.flip(y, 3)),
    "fmin": lambda y: ops.fmin(ops.log(y), ops.flip(y, 3)),
    "arctan2": lambda y: ops.arctan2(y, ops.round(ops.flip(y, 3) / 60.0)),
    "isclose": lambda y: _f(ops.isclose(ops.round(_small(y)), ops.round(_small(ops.flip(y, 1))))),
    "allclose": lambda y: _f(ops.allclose(y, y + 1e-4)) + 0 * y,
    "saturate_cast": lambda y: _f(ops.saturate_cast(y, "uint8")),
    "empty_like": lambda y: 0 * ops.empty_like(y) + y,
    "nansum": lambda y: ops.nansum(ops.log(y), axis=-1), "nanprod": lambda y: ops.nanprod(
        ops.log(y / 100.0 + 1.0), axis=1), "nanmax": lambda y: ops.nanmax(ops.log(y), axis=2),
    "nanmin": lambda y: ops.nanmin(ops.log(y), axis=(1, 2)),
    "nancumsum": lambda y: ops.nancumsum(ops.log(y), axis=-1),
    "nanargmax": lambda y: _f(ops.nanargmax(ops.log(y), axis=-1)),
    "nanargmin": lambda y: _f(ops.nanargmin(ops.log(y), axis=-1)),
    "nanmean": lambda y: ops.nanmean(ops.log(y), axis=-1),
    "nanvar": lambda y: ops.nanvar(ops.log(y), axis=2), "nanstd": lambda y: ops.nanstd(
        ops.log(y), axis=-1),
    "nanquantile": lambda y: ops.nanquantile(ops.log(y), 0.3, axis=-1),
    "nanpercentile": lambda y: ops.nanpercentile(ops.log(y), 80.0, axis=2, keepdims=True),
    "nanmedian": lambda y: ops.nanmedian(ops.log(y), axis=-1),
    "diff": lambda y: ops.diff(y, 2, axis=1), "trapezoid": lambda y: ops.trapezoid(y, axis=2),
    "append": lambda y: ops.append(y, -y, axis=3), "append:flat": lambda y: ops.append(y, y),
    "dstack": lambda y: ops.dstack([y, -y]), "hsplit": lambda y: ops.hsplit(y, [2])[1],
    "vsplit": lambda y: ops.vsplit(y, [1])[1], "dsplit": lambda y: ops.dsplit(y, [1])[1],
    "rot90": lambda y: ops.rot90(y, 1, axes=(1, 2)),
    "rot90:2": lambda y: ops.rot90(y[:, :5], 2, (1, 2)),
    "trace": lambda y: ops.trace(y, 1, axis1=1, axis2=2),
    "diagonal": lambda y: ops.diagonal(y, -1, axis1=2, axis2=1),
    "vander": lambda y: ops.vander(ops.mean(y / 100.0, axis=[1, 2, 3]), 4),
    "select": lambda y: ops.select([y > 20, y < -20], [y, 2 * y], -1.0),
    "inner": lambda y: ops.inner(y, _w((5, 6))), "vdot": lambda y: ops.vdot(y, y) + 0 * y,
    "rgb_to_grayscale": lambda y: ops.image.rgb_to_grayscale(y[..., :3]),
    "multi_hot": lambda y: ops.multi_hot(ops.argmax(y, axis=-1)[:, 0], 6, dtype=F),
    # losses and metrics
    "binary_crossentropy": lambda y: ops.binary_crossentropy(
        _prob(ops.flip(y, 3)), _prob(y)),
    "binary_crossentropy:logits": lambda y: ops.binary_crossentropy(
        _prob(ops.flip(y, 3)), y / 10.0, from_logits=True),
    "categorical_crossentropy": lambda y: ops.categorical_crossentropy(
        _prob(ops.flip(y, 3)), _prob(y), axis=-1),
    "categorical_crossentropy:logits": lambda y: ops.categorical_crossentropy(
        _prob(ops.flip(y, 1)), y / 10.0, from_logits=True, axis=1),
    "sparse_categorical_crossentropy": lambda y: ops.sparse_categorical_crossentropy(
        ops.argmax(ops.flip(y, 3), axis=-1), _prob(y)),
    "sparse_categorical_crossentropy:logits": lambda y: ops.sparse_categorical_crossentropy(
        ops.argmax(ops.flip(y, 3), axis=-1), y / 10.0, from_logits=True),
    "psnr": lambda y: ops.psnr(_prob(y), _prob(ops.flip(y, 3)), 1.0) + 0 * y,
    "in_top_k": lambda y: _f(ops.in_top_k(ops.argmax(ops.flip(y[:, 0, 0], 1), axis=-1),
                                          y[:, 0, 0], 2)),
    "separable_conv": lambda y: ops.separable_conv(y, _w((3, 3, 6, 2)), _w((1, 1, 12, 5)),
                                                   padding="same"),
    # array constructions
    "diag": lambda y: ops.diag(ops.mean(y, axis=[0, 1, 2]), 1) + 0 * ops.sum(y),
    "diag:matrix": lambda y: ops.diag(y[0, :, :, 0], -1),
    "diagflat": lambda y: ops.diagflat(y[0, 0, :2, :2], -1),
    "kron": lambda y: ops.kron(y[0, :2, :3, 0], y[1, 2:4, 1:3, 2]),
    "cross": lambda y: ops.cross(y[..., :3], y[..., 3:]),
    "isin": lambda y: _f(ops.isin(ops.round(_small(y)), np.array([0.0, 2.0, -3.0], F))),
    "scatter_update": lambda y: ops.scatter_update(y[0], np.array([[0, 1], [3, 2]]),
                                                   _w((2, 6))),
    "slice_update": lambda y: ops.slice_update(y, np.array([0, 1, 2, 3]), _w((1, 2, 3, 2))),
    "extract_sequences": lambda y: ops.extract_sequences(y, 3, 2),
    "quantile": lambda y: ops.quantile(y, 0.3, axis=-1),
    "percentile": lambda y: ops.percentile(y, 75.0, axis=2, keepdims=True),
    "median": lambda y: ops.median(y, axis=-1), "cdist": lambda y: ops.cdist(y[:, 0], y[:, 1]),
    "logaddexp2": lambda y: ops.logaddexp2(y, ops.flip(y, 3)),
    "ldexp": lambda y: ops.ldexp(y, ops.cast(ops.round(_small(y)), "int32")),
    "det": lambda y: ops.det(y[:, :3, :3, 0] / 10.0),
    "slogdet": lambda y: ops.slogdet(y[:, :3, :3, 0] / 10.0)[1] + ops.slogdet(
        y[:, :3, :3, 0] / 10.0)[0],
    "meshgrid": lambda y: ops.meshgrid(ops.mean(y, axis=[0, 1, 2]), ops.mean(
        y, axis=[0, 1, 3]))[0] + 0 * ops.sum(y),
    "meshgrid:ij": lambda y: ops.meshgrid(ops.mean(y, axis=[0, 1, 2]), ops.mean(
        y, axis=[0, 1, 3]), indexing="ij")[1] + 0 * ops.sum(y),
    "sparsemax": lambda y: ops.sparsemax(y / 40.0),
    "segment_sum": lambda y: ops.segment_sum(y[0], np.array([0, 2, 2, 1, 0, 2, 1]), 3),
    "segment_max": lambda y: ops.segment_max(y[0], np.array([0, 3, 3, 1, 0, 3, 1]), 4),
    "segment_min": lambda y: ops.segment_min(y[0], np.array([0, 3, 3, 1, 0, 3, 1]), 4),
    "segment_prod": lambda y: ops.segment_prod(_unit(y[0]) + 1.0, np.array([0, 2, 2, 1, 0, 2, 1]),
                                               3),
    "scatter": lambda y: ops.scatter(np.array([[0, 1], [2, 2], [0, 1]]), y[0, 0, 0, :3], (3, 3)),
    "scatter_update:add": lambda y: ops.scatter_update(y[0], np.array([[0, 1], [0, 1]]),
                                                       _w((2, 6)), reduction="add"),
    "digitize": lambda y: _f(ops.digitize(y, np.array([-50.0, 0.0, 3.0, 80.0], F))),
    "unravel_index": lambda y: _f(ops.unravel_index(ops.argmax(ops.reshape(
        y, (-1, 210)), axis=-1), (7, 5, 6))[1]),
    # images
    "crop_images": lambda y: ops.image.crop_images(y, 1, 2, bottom_cropping=2, right_cropping=1),
    "crop_images:target": lambda y: ops.image.crop_images(y, 2, 1, target_height=3,
                                                          target_width=2),
    "pad_images": lambda y: ops.image.pad_images(y, 1, 2, bottom_padding=3, right_padding=0),
    "pad_images:target": lambda y: ops.image.pad_images(y, 1, 2, target_height=10,
                                                        target_width=9),
    "extract_patches": lambda y: ops.image.extract_patches(y, 2),
    "extract_patches:overlapping": lambda y: ops.image.extract_patches(y, (3, 2), strides=1,
                                                                       padding="same"),
    "extract_patches_3d": lambda y: ops.image.extract_patches_3d(ops.expand_dims(y, 1), (1, 2, 2)),
    "unfold": lambda y: ops.unfold(ops.transpose(y, (0, 3, 1, 2)), 2, stride=(1, 2)),
    "fold": lambda y: ops.fold(ops.unfold(ops.transpose(y, (0, 3, 1, 2)), 3, stride=(2, 1),
                                          padding=1), (7, 5), 3, stride=(2, 1), padding=1),
    "gaussian_blur": lambda y: ops.image.gaussian_blur(y, (3, 5), (1.0, 2.0)),
    "sobel_edges": lambda y: ops.image.sobel_edges(y),
    "sobel_edges:channels_first": lambda y: ops.image.sobel_edges(
        ops.transpose(y, (0, 3, 1, 2)), data_format="channels_first"),
    "corrcoef": lambda y: ops.corrcoef(y[0, 0]),
    "cumprod": lambda y: ops.cumprod(_unit(y) + 1.0, axis=3),
    "nancumprod": lambda y: ops.nancumprod(ops.log(y / 100.0 + 1.0), axis=-1),
    # integers (bitwise ops need opset 18: `MIN_OPSET`)
    "bitwise_and": lambda y: _f(ops.bitwise_and(_i(y), _i(ops.flip(y, 3)))),
    "bitwise_or": lambda y: _f(ops.bitwise_or(_i(y), _i(ops.flip(y, 3)))),
    "bitwise_xor": lambda y: _f(ops.bitwise_xor(_i(y), _i(ops.flip(y, 3)))),
    "bitwise_not": lambda y: _f(ops.bitwise_not(_i(y))),
    "bitwise_invert": lambda y: _f(ops.bitwise_invert(_i(y))),
    "bitwise_left_shift": lambda y: _f(ops.bitwise_left_shift(_i(y), _i(ops.abs(y) / 40.0))),
    "left_shift": lambda y: _f(ops.left_shift(_i(y), 3)),
    "bitwise_right_shift": lambda y: _f(ops.bitwise_right_shift(_i(y), _i(ops.abs(y) / 40.0))),
    "right_shift": lambda y: _f(ops.right_shift(_i(y), 2)),
    "floor_divide:int": lambda y: _f(ops.floor_divide(_i(y), _i(ops.where(
        ops.flip(y, 3) > 0, 3.0, -5.0)))),
    "floor_divide:int_scalar": lambda y: _f(_i(y) // -4 + _i(y) // 7),
}
MIN_OPSET = {**dict.fromkeys(["bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not",
                              "bitwise_invert"], 18), "scatter": 16, "scatter_update:add": 16}
# Cases that need a known spatial size (all others run on a dynamic one).
STATIC = {"slice", "unstack", "broadcast_to", "repeat", "get_item:int",
          "outer", "tile", "trace", "diagonal", "dot_product_attention",
          "dot_product_attention:causal", "depth_to_space", "space_to_depth", "rot90:2",
          "adaptive_average_pool", "adaptive_max_pool", "diag", "diag:matrix", "diagflat", "kron",
          "scatter_update", "slice_update", "median", "quantile", "percentile", "det", "slogdet",
          "meshgrid", "meshgrid:ij", "segment_sum", "segment_max", "segment_min", "segment_prod",
          "scatter", "scatter_update:add", "unravel_index", "pad_images:target", "unfold",
          "crop_images", "fold", "corrcoef", "nanpercentile"}
# Cases kept in their own modules, one per family of ops.
import onnx_ops_cases_spectral as _spectral  # noqa: E402

KERAS.update(_spectral.KERAS)
STATIC |= _spectral.STATIC
# Keras's TensorFlow rot90 is wrong for k >= 2 on a non-square plane (it
# reshapes where it should transpose); the emitter follows NumPy, and the
# k=2 case uses a square plane.
# Image-warp, colour, filter and einops cases: onnx_ops_cases_image.py.
KERAS.update(_image.KERAS)
STATIC |= _image.STATIC
MIN_OPSET.update(_image.MIN_OPSET)


def _tf_cases():
    import tensorflow as tf

    return {
        # issue 17: positional axes were dropped, all-axes and positional keepdims crashed.
        "softmax:positional": lambda y: tf.nn.softmax(y / 40.0, 1),
        "mean:positional": lambda y: tf.reduce_mean(y, 1),
        "mean:all": lambda y: tf.reduce_mean(y) + 0 * y,
        "max:positional_keepdims": lambda y: tf.reduce_max(y, [1, 2], True),
        "sum:keyword": lambda y: tf.reduce_sum(input_tensor=y, axis=-1, keepdims=True),
        "var": lambda y: tf.math.reduce_variance(y, 2), "std": lambda y: tf.math.reduce_std(y, -1),
        "split": lambda y: tf.split(y, [2, 4], -1)[1] * 2.0,
        "split:sections": lambda y: tf.split(y, 3, axis=3)[2],
        "split:minus_one": lambda y: tf.split(y, [2, -1, 1], -1)[1] * 2.0,
        "split:minus_one_last": lambda y: tf.split(y, [2, -1], -1)[1] * 2.0,
        "get_item": lambda y: y[:, 1:, ::-1, :3],
        "matmul": lambda y: tf.matmul(y, y, transpose_b=True) / 100.0,
        "einsum": lambda y: tf.einsum("bhwc,bhwd->bcd", y, y) / 100.0,
        "gather": lambda y: tf.gather(y, [1, 0, 5], axis=3),
        "argmax": lambda y: tf.cast(tf.argmax(y, -1), tf.float32),
        "argmax:default_axis": lambda y: tf.cast(tf.argmax(y), tf.float32),
        "clip": lambda y: tf.clip_by_value(y, -20.0, 30.0),
        "where": lambda y: tf.where(y > 0.0, y, y * -0.5),
        "cumsum": lambda y: tf.math.cumsum(y, 2, exclusive=True, reverse=True),
        "expand_squeeze": lambda y: tf.squeeze(tf.expand_dims(y, 1), [1]),
        "stack": lambda y: tf.stack([y, -y], 1), "tile": lambda y: tf.tile(y, [1, 1, 1, 2]),
        "transpose": lambda y: tf.transpose(y, [0, 3, 1, 2]),
        "concat": lambda y: tf.concat([y, y * 2.0], 3), "abs": lambda y: tf.abs(y),
        "sqrt": lambda y: tf.sqrt(tf.abs(y)), "pow": lambda y: (tf.abs(y) / 40.0) ** 1.5,
        "log_softmax": lambda y: tf.nn.log_softmax(y / 40.0, axis=2),
        "leaky_relu": lambda y: tf.nn.leaky_relu(y, 0.1), "gelu": lambda y: tf.nn.gelu(y / 40.0),
        "reverse": lambda y: tf.reverse(y, [1]), "greater": lambda y: tf.cast(y > 3.0, tf.float32),
        "resize": lambda y: tf.image.resize(y, (9, 11)),
        "add_n": lambda y: tf.math.add_n([y, y * 2.0, -y]),
        # kecam EdgeNeXt's attention normalizes with TensorFlow's epsilon (on the squared sum).
        "normalize:tf_l2": lambda y: tf.math.l2_normalize(y * 1e-7, axis=-1, epsilon=1e-6),
        "normalize:tf_l2_axes": lambda y: tf.math.l2_normalize(y, [1, 2]),
        # kecam's global response normalization scales by sqrt(H * W) read from tf.shape.
        "tf_shape": lambda y: y * tf.cast(tf.shape(y)[1] * tf.compat.v1.shape(y)[2],
                                          y.dtype) ** 0.5,
        # Sizes read with tf.shape: a run-time reshape, range and sequence mask.
        "reshape:tf_shape": lambda y: tf.reshape(y, [tf.shape(y)[0], -1, 6]),
        "sized_arange": lambda y: y * tf.cast(tf.range(tf.shape(y)[2]), y.dtype)[:, None],
        "sequence_mask": lambda y: y * tf.cast(tf.sequence_mask(
            tf.cast(tf.abs(y[..., 0]), tf.int32), 6), y.dtype),
    }


def tf_cases():
    """The tf-keras `TFOpLambda` cases (built lazily: importing tf is slow)."""
    return {**_tf_cases(), **_image.TF, **special.tf_cases(), **linalg_cases.tf_cases()}


import onnx_ops_cases_special as special  # noqa: E402 - it reads the helpers above

KERAS.update(special.KERAS)
STATIC |= special.STATIC
MIN_OPSET.update(special.MIN_OPSET)
KERAS.update(linalg_cases.KERAS)
STATIC |= linalg_cases.STATIC
