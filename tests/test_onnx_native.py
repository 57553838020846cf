"""The native ONNX exporter, layer by layer, against Keras.

Every layer kind and op of the emitter tables (`onnx.layers`,
`onnx.shape`, `onnx.ops`, `onnx.activations`) gets a tiny model in
which it follows a Conv/Dense + BatchNormalization (so that folding has
something to fold), with every weight drawn from a seeded generator. Each
model is converted for inference with and without folding, exported with
`exporter="native"`, run in onnxruntime on a batch of 3, and compared with
the *original* Keras model's `model(x, training=False)` -- an independent
reference, never the exporter's own figures. The ONNX graph is also
checked for the ops the layer should map to.
"""

import dataclasses

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf

from bnconvert import export_onnx
from bnconvert.convert import convert_model
from bnconvert.errors import ConversionError

ops = keras.ops
# `rms_scaling` is deprecated in Keras 3 but still computed (and exported) as it is.
pytestmark = pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`:UserWarning")
RTOL, ATOL = 1e-4, 1e-5
BATCH = 3


# --------------------------------------------------------------------------
# Model building helpers (each takes the Keras module: `keras` or `tf_keras`)


def _head(K, x, kind):
    """A Conv/Dense (by input rank) followed by a BatchNormalization."""
    L = K.layers
    if kind == "none":
        return x
    rank = len(x.shape) - 1
    if kind == "cf":  # channels-first 2D
        y = L.Conv2D(6, 3, padding="same", data_format="channels_first")(x)
        return L.BatchNormalization(axis=1)(y)
    producer = {1: lambda: L.Dense(6), 2: lambda: L.Conv1D(6, 3, padding="same"),
                3: lambda: L.Conv2D(6, 3, padding="same"),
                4: lambda: L.Conv3D(6, 3, padding="same")}[rank]()
    return L.BatchNormalization()(producer(x))


def _bn(K, y, axis=-1):
    return K.layers.BatchNormalization(axis=axis)(y)


def body(shape, fn, head="conv"):
    """A builder: `Input(shape)` -> Conv/Dense + BN -> `fn(K, y)`."""
    def build(K):
        x = K.Input(shape)
        return K.Model(x, fn(K, _head(K, x, head)))
    return build


def two_branches(shape, merge):
    """Conv+BN, then two Conv+BN branches merged by `merge(K, [a, b])`."""
    def fn(K, y):
        L = K.layers
        conv = {2: L.Conv1D, 3: L.Conv2D}[len(shape)]
        a = _bn(K, conv(6, 3, padding="same")(y))
        b = _bn(K, conv(6, 1)(y))
        return merge(K, [a, b])
    return body(shape, fn)


def randomize(model, seed):
    """Every float weight from a seeded generator (BN statistics as the brief says)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "float" not in str(v.dtype) or "seed" in v.name:
            continue
        name = v.name.split("/")[-1].split(":")[0]
        shape = tuple(v.shape)
        if name == "moving_mean":
            value = rng.normal(0.0, 0.2, shape)
        elif name == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        elif name == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif name == "beta":
            value = rng.normal(0.0, 0.2, shape)
        elif len(shape) >= 2:  # kernels: fan-in scaled, so chains stay O(1)
            value = rng.normal(0.0, 1.5 / np.sqrt(np.prod(shape[:-1])), shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        v.assign(value.astype("float32"))


# --------------------------------------------------------------------------
# The table


@dataclasses.dataclass
class Case:
    id: str
    build: object
    expect: tuple = ()  # ONNX op types the graph must contain
    folds: bool = True  # fold=True leaves no BatchNormalization at all
    flavour: str = "keras"
    opset: int = None
    safe_mode: bool = True
    positive: bool = False  # feed |x| + 0.1 (sqrt, log-like ops)
    rtol: float = RTOL
    atol: float = ATOL
    channels_first: bool = False
    x_shape: tuple = None  # the test batch's shape without the batch (dynamic inputs)


CASES = []


def case(id, build, expect=(), **kw):
    CASES.append(Case(id, build, tuple(expect), **kw))


def L3():
    return keras.layers


S1, S2, S3, S0 = (11, 4), (9, 9, 4), (5, 5, 5, 3), (7,)


# Convolutions: each is followed by its own BN, which folds into it.
def conv_case(id, shape, make, expect=("Conv",), **kw):
    case(id, body(shape, lambda K, y: _bn(K, make(K.layers)(y))), expect, **kw)


conv_case("conv1d_valid", S1, lambda L: L.Conv1D(5, 3))
conv_case("conv1d_same_s2", S1, lambda L: L.Conv1D(5, 3, strides=2, padding="same"))
conv_case("conv1d_causal", S1, lambda L: L.Conv1D(5, 3, padding="causal"))
conv_case("conv1d_causal_dilated", S1,
          lambda L: L.Conv1D(5, 3, padding="causal", dilation_rate=2))
conv_case("conv1d_same_dilated", S1, lambda L: L.Conv1D(5, 3, padding="same", dilation_rate=2))
conv_case("conv2d_same_s2_odd", S2, lambda L: L.Conv2D(5, 3, strides=2, padding="same"))
conv_case("conv2d_same_s2_k4", S2, lambda L: L.Conv2D(5, 4, strides=2, padding="same"))
conv_case("conv2d_valid", S2, lambda L: L.Conv2D(5, (3, 2), strides=(2, 1)))
conv_case("conv2d_dilated", S2, lambda L: L.Conv2D(5, 3, padding="same", dilation_rate=2))
conv_case("conv2d_groups2", S2, lambda L: L.Conv2D(4, 3, padding="same", groups=2))
conv_case("conv2d_relu_activation", S2, lambda L: L.Conv2D(5, 3, activation="relu"),
          ("Conv", "Relu"), folds=False)  # BN after a non-linear activation stays
conv_case("conv3d_same_s2", S3, lambda L: L.Conv3D(4, 3, strides=2, padding="same"))
conv_case("conv3d_valid", S3, lambda L: L.Conv3D(4, (3, 2, 1)))
conv_case("depthwise1d_m2", S1, lambda L: L.DepthwiseConv1D(3, depth_multiplier=2))
conv_case("depthwise2d_m2_same_s2", S2,
          lambda L: L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2))
conv_case("separable1d", S1, lambda L: L.SeparableConv1D(5, 3, padding="same",
                                                          depth_multiplier=2))
conv_case("separable2d_s2", S2, lambda L: L.SeparableConv2D(5, 3, strides=2, padding="same",
                                                             depth_multiplier=2))
for _n, _shape in ((1, S1), (2, S2), (3, S3)):
    _T = f"Conv{_n}DTranspose"
    conv_case(f"conv{_n}d_transpose_valid", _shape,
              lambda L, T=_T: getattr(L, T)(4, 3), ("ConvTranspose",))
    conv_case(f"conv{_n}d_transpose_same_s2", _shape,
              lambda L, T=_T: getattr(L, T)(4, 3, strides=2, padding="same"), ("ConvTranspose",))
    conv_case(f"conv{_n}d_transpose_valid_s2_outpad", _shape,
              lambda L, T=_T: getattr(L, T)(4, 3, strides=2, output_padding=1),
              ("ConvTranspose",))
conv_case("conv2d_transpose_same_s2_k4", S2,
          lambda L: L.Conv2DTranspose(4, 4, strides=2, padding="same"), ("ConvTranspose",))
conv_case("conv2d_transpose_valid_s3_k2", S2,
          lambda L: L.Conv2DTranspose(4, 2, strides=3), ("ConvTranspose",))
conv_case("conv2d_transpose_same_s2_outpad", S2,
          lambda L: L.Conv2DTranspose(4, 3, strides=2, padding="same", output_padding=1),
          ("ConvTranspose",))
conv_case("conv1d_transpose_same_s3_outpad", S1,
          lambda L: L.Conv1DTranspose(4, 4, strides=3, padding="same", output_padding=2),
          ("ConvTranspose",))
conv_case("conv2d_transpose_same_s1_k4", S2,
          lambda L: L.Conv2DTranspose(4, 4, padding="same"), ("ConvTranspose",))
conv_case("conv2d_transpose_same_s3_k2", S2,
          lambda L: L.Conv2DTranspose(4, 2, strides=3, padding="same"), ("ConvTranspose",))
conv_case("dense_rank2", S0, lambda L: L.Dense(5), ("Gemm",))
conv_case("dense_rank4", S2, lambda L: L.Dense(5))
case("dense_softmax_rank2", body(S0, lambda K, y: K.layers.Dense(5, activation="softmax")(y)),
     ("Gemm", "Softmax"))
case("dense_softmax_rank4", body(S2, lambda K, y: K.layers.Dense(5, activation="softmax")(y)),
     ("Softmax",))
conv_case("dense_rank3", S1, lambda L: L.Dense(5))


def _channels_first(K, y):
    L = K.layers
    # 3 filters, not 5: with as many filters as output columns (5x5), Keras 3's
    # own channels_first conv on the TensorFlow CPU backend adds the bias
    # along the last axis (a Keras/TF bug found here; the reference would be wrong).
    y = _bn(K, L.Conv2D(3, 3, strides=2, padding="same", data_format="channels_first")(y), 1)
    y = L.MaxPooling2D(2, data_format="channels_first")(y)
    return L.GlobalAveragePooling2D(data_format="channels_first")(y)


case("conv2d_channels_first", body((4, 9, 9), _channels_first, head="cf"),
     ("Conv", "MaxPool"), channels_first=True)
case("group_norm_channels_first", body((4, 9, 9), lambda K, y: K.layers.GroupNormalization(
    groups=3, axis=1)(y), head="cf"), ("ReduceMean",), channels_first=True)


def _dynamic_spatial(K, y):
    """Unknown height and width: "same" windows use auto_pad, transposes Keras's sizes."""
    L = K.layers
    y = _bn(K, L.Conv2D(5, 3, strides=2, padding="same")(y))
    y = _bn(K, L.Conv2DTranspose(4, 3, strides=2, padding="same")(y))
    y = _bn(K, L.Conv2DTranspose(4, 3, strides=2)(y))
    y = L.AveragePooling2D(3, strides=2, padding="same")(y)
    return L.MaxPooling2D(3, strides=2, padding="same")(y)


case("dynamic_spatial", body((None, None, 4), _dynamic_spatial),
     ("Conv", "ConvTranspose", "AveragePool"), x_shape=S2)

# BatchNormalization that cannot fold (after a pooling layer).
case("bn_unfoldable_axis_last",
     body(S2, lambda K, y: _bn(K, K.layers.MaxPooling2D(2)(y))), ("BatchNormalization",),
     folds=False)
case("bn_unfoldable_axis1",
     body(S2, lambda K, y: _bn(K, K.layers.MaxPooling2D(2)(y), axis=1)), ("BatchNormalization",),
     folds=False)
case("bn_unfoldable_rank2",
     body(S0, lambda K, y: _bn(K, K.layers.ReLU()(y))), ("BatchNormalization",), folds=False)

# Normalizations.
for _id, _kw in (("axis_last", {}), ("axes_123", {"axis": [1, 2, 3]}),
                 ("rms", {"rms_scaling": True}), ("plain", {"center": False, "scale": False})):
    case(f"layer_norm_{_id}",
         body(S2, lambda K, y, kw=_kw: K.layers.LayerNormalization(**kw)(y)), ("ReduceMean",))
case("layer_norm_axis1", body(S2, lambda K, y: K.layers.LayerNormalization(axis=1)(y)),
     ("ReduceMean",))
case("bn_unfoldable_no_center_scale", body(S2, lambda K, y: K.layers.BatchNormalization(
    center=False, scale=False)(K.layers.AveragePooling2D(2)(y))), folds=False)
case("group_norm_2", body(S2, lambda K, y: K.layers.GroupNormalization(groups=2)(y)),
     ("ReduceMean", "Reshape"))
case("group_norm_3_rank3", body(S1, lambda K, y: K.layers.GroupNormalization(groups=3)(y)),
     ("ReduceMean",))

# Every activation of `onnx_activations._EMITTERS`, through an Activation layer.
ACTIVATIONS = {
    "relu": ["Relu"], "relu6": ["Clip"], "sigmoid": ["Sigmoid"], "tanh": ["Tanh"],
    "softmax": ["Softmax"], "log_softmax": ["LogSoftmax"], "silu": ["Sigmoid", "Mul"],
    "hard_sigmoid": ["HardSigmoid"], "hard_silu": ["HardSigmoid"], "gelu": ["Erf"],
    "elu": ["Elu"], "selu": ["Selu"], "softplus": ["Softplus"], "softsign": ["Softsign"],
    "exponential": ["Exp"], "leaky_relu": ["LeakyRelu"], "mish": ["Softplus", "Tanh"],
}
for _name, _ops in ACTIVATIONS.items():
    case(f"activation_{_name}", body(S2, lambda K, y, a=_name: K.layers.Activation(a)(y)), _ops)
case("activation_swish_alias", body(S2, lambda K, y: K.layers.Activation("swish")(y)),
     ["Sigmoid"])
case("gelu_opset20", body(S2, lambda K, y: K.layers.Activation("gelu")(y)), ["Gelu"], opset=20)
case("gelu_approximate_lambda",
     body(S2, lambda K, y: K.layers.Lambda(
         keras.activations.gelu, arguments={"approximate": True})(y)),
     ["Tanh"], safe_mode=False)
case("conv_activation_gelu", body(S2, lambda K, y: K.layers.Conv2D(5, 3, activation="gelu")(y)),
     ["Erf"])
case("relu_max6", body(S2, lambda K, y: K.layers.ReLU(max_value=6.0)(y)), ["Clip"])
case("relu_slope", body(S2, lambda K, y: K.layers.ReLU(negative_slope=0.1)(y)), ["LeakyRelu"])
case("relu_slope_max", body(S2, lambda K, y: K.layers.ReLU(max_value=0.5, negative_slope=0.1)(y)),
     ["LeakyRelu", "Min"])
case("leaky_relu_layer", body(S2, lambda K, y: K.layers.LeakyReLU(negative_slope=0.2)(y)),
     ["LeakyRelu"])
case("leaky_relu_layer_default", body(S2, lambda K, y: K.layers.LeakyReLU()(y)), ["LeakyRelu"])
case("elu_layer", body(S2, lambda K, y: K.layers.ELU(alpha=0.7)(y)), ["Elu"])
case("softmax_layer_last", body(S2, lambda K, y: K.layers.Softmax()(y)), ["Softmax"])
case("softmax_layer_axis1", body(S2, lambda K, y: K.layers.Softmax(axis=1)(y)), ["Softmax"])

# Pooling.
for _n, _shape in ((1, S1), (2, S2), (3, S3)):
    for _kind in ("Max", "Average"):
        _P = f"{_kind}Pooling{_n}D"
        _op = "MaxPool" if _kind == "Max" else "AveragePool"
        case(f"{_P}_same_s2".lower(),
             body(_shape, lambda K, y, P=_P: getattr(K.layers, P)(3, strides=2,
                                                                  padding="same")(y)), [_op])
        case(f"{_P}_valid_s1".lower(),
             body(_shape, lambda K, y, P=_P: getattr(K.layers, P)(2, strides=1)(y)), [_op])
        _G = f"Global{_kind}Pooling{_n}D"
        for _keep in (False, True):
            case(f"{_G}_keepdims_{_keep}".lower(),
                 body(_shape, lambda K, y, G=_G, k=_keep: getattr(K.layers, G)(keepdims=k)(y)),
                 [f"Global{_op}"])
case("maxpool2d_same_pool2_s2_odd",
     body(S2, lambda K, y: K.layers.MaxPooling2D(2, padding="same")(y)), ["MaxPool"])
case("avgpool2d_same_pool2_s2_odd",
     body(S2, lambda K, y: K.layers.AveragePooling2D(2, padding="same")(y)), ["AveragePool"])

# Padding, cropping, resampling.
case("zero_padding1d", body(S1, lambda K, y: K.layers.ZeroPadding1D((1, 2))(y)), ["Pad"])
case("zero_padding2d", body(S2, lambda K, y: K.layers.ZeroPadding2D(((1, 2), (0, 3)))(y)), ["Pad"])
case("zero_padding2d_int", body(S2, lambda K, y: K.layers.ZeroPadding2D(1)(y)), ["Pad"])
case("zero_padding3d",
     body(S3, lambda K, y: K.layers.ZeroPadding3D(((1, 0), (0, 2), (2, 1)))(y)), ["Pad"])
case("cropping1d", body(S1, lambda K, y: K.layers.Cropping1D((1, 2))(y)), ["Slice"])
case("cropping2d", body(S2, lambda K, y: K.layers.Cropping2D(((1, 0), (2, 1)))(y)), ["Slice"])
case("cropping3d", body(S3, lambda K, y: K.layers.Cropping3D(((1, 0), (0, 2), (1, 1)))(y)),
     ["Slice"])
case("upsampling1d", body(S1, lambda K, y: K.layers.UpSampling1D(3)(y)), ["Resize"])
case("upsampling2d_nearest", body(S2, lambda K, y: K.layers.UpSampling2D((2, 3))(y)), ["Resize"])
case("upsampling2d_bilinear",
     body(S2, lambda K, y: K.layers.UpSampling2D((2, 3), interpolation="bilinear")(y)),
     ["Resize"])
case("upsampling3d", body(S3, lambda K, y: K.layers.UpSampling3D((2, 1, 2))(y)), ["Resize"])
for _mode in ("nearest", "bilinear"):
    for _tag, _size in (("up", (14, 19)), ("down", (5, 4)), ("mixed", (13, 6))):
        case(f"resizing_{_mode}_{_tag}",
             body(S2, lambda K, y, m=_mode, s=_size: K.layers.Resizing(*s, interpolation=m)(y)),
             ["Resize"])

# Merging.
for _cls, _op in (("Add", "Add"), ("Subtract", "Sub"), ("Multiply", "Mul"), ("Average", "Add"),
                  ("Maximum", "Max"), ("Minimum", "Min")):
    case(f"merge_{_cls.lower()}",
         two_branches(S2, lambda K, ab, c=_cls: getattr(K.layers, c)()(ab)), [_op])
case("merge_add_three", body(S2, lambda K, y: K.layers.Add()(
    [y, K.layers.Conv2D(6, 1)(y), K.layers.ReLU()(y)])), ["Add"])
case("concatenate_last", two_branches(S2, lambda K, ab: K.layers.Concatenate()(ab)), ["Concat"])
case("concatenate_axis1", two_branches(S2, lambda K, ab: K.layers.Concatenate(axis=1)(ab)),
     ["Concat"])
case("concatenate_rank3", two_branches(S1, lambda K, ab: K.layers.Concatenate(axis=-1)(ab)),
     ["Concat"])

# Shaping.
case("flatten_dense",
     body(S2, lambda K, y: _bn(K, K.layers.Dense(5)(K.layers.Flatten()(y)))), ["Flatten", "Gemm"])
case("reshape_3d", body(S2, lambda K, y: K.layers.Conv1D(5, 3)(K.layers.Reshape((9, 6))(
    K.layers.Conv2D(6, 3, strides=3)(y)))), ["Reshape"])
case("reshape_minus1", body(S2, lambda K, y: K.layers.Reshape((-1, 3))(y)), ["Reshape"])


def _squeeze_excite(K, y):
    L = K.layers
    s = L.GlobalAveragePooling2D()(y)
    s = L.Dense(6, activation="sigmoid")(L.Dense(3, activation="relu")(s))
    s = L.Reshape((1, 1, 6))(s)
    return L.Conv2D(5, 1)(L.Multiply()([y, s]))


case("reshape_squeeze_excite", body(S2, _squeeze_excite), ["Reshape", "Mul"])
case("permute_then_conv", body(S2, lambda K, y: K.layers.Conv2D(4, 3)(
    K.layers.Permute((2, 1, 3))(y))), ["Conv"])
case("permute_channels_first_flatten",
     body(S2, lambda K, y: K.layers.Flatten()(K.layers.Permute((3, 1, 2))(y))), ["Flatten"])
case("permute_add_mixed_layouts", body(S2, lambda K, y: K.layers.Add()(
    [K.layers.Permute((2, 1, 3))(y), y])), ["Add"])
case("permute_rank3", body(S1, lambda K, y: K.layers.Dense(3)(K.layers.Permute((2, 1))(y))))
for _cls in ("Dropout", "SpatialDropout2D", "GaussianNoise"):
    case(f"identity_{_cls.lower()}",
         body(S2, lambda K, y, c=_cls: getattr(K.layers, c)(0.3)(y)))
case("rescaling_scalar",
     body(S2, lambda K, y: K.layers.Rescaling(1 / 255.0, offset=-0.5)(y)), ["Mul", "Add"])
case("rescaling_per_channel",
     body(S2, lambda K, y: K.layers.Rescaling([0.5, 1, 2, -1, 3, 0.25],
                                              offset=[0, 1, 0, 1, 0, -1])(y)), ["Mul", "Add"])
# Its scale goes into the convolution's weights (onnx.peephole), the shift stays.
case("rescaling_at_input",
     body(S2, lambda K, x: _head(K, K.layers.Rescaling(2.0, offset=-1.0)(x), "conv"), head="none"),
     ["Add", "Conv"])
_MEAN, _VAR = [0.1, -0.2, 0.3, 0.0, 0.5, -1.0], [1.0, 2.0, 0.5, 0.25, 4.0, 1.5]
# A division by a constant is written as a product (Graph.divisions_to_products).
case("normalization", body(S2, lambda K, y: K.layers.Normalization(mean=_MEAN, variance=_VAR)(y)),
     ["Sub", "Mul"])
case("normalization_invert",
     body(S2, lambda K, y: K.layers.Normalization(mean=_MEAN, variance=_VAR, invert=True)(y)),
     ["Mul", "Add"])

# Raw keras.ops nodes in a Functional model.
_C = np.linspace(-1.0, 1.0, 6).astype("float32")
def _away_from_zero(f, y):
    """A divisor bounded away from 0 (a quotient near a pole would test float32, not ONNX)."""
    return ops.sigmoid(y) + 0.5 if f == "divide" else y


for _fn, _op in (("add", "Add"), ("subtract", "Sub"), ("multiply", "Mul"), ("divide", "Div")):
    case(f"ops_{_fn}_scalar", body(S2, lambda K, y, f=_fn: getattr(ops, f)(y, 1.5)),
         ["Mul" if _op == "Div" else _op])
    case(f"ops_{_fn}_vector", body(S2, lambda K, y, f=_fn: getattr(ops, f)(
        _C + 2.0, _away_from_zero(f, y))), [_op])
    case(f"ops_{_fn}_tensor_broadcast",
         body(S2, lambda K, y, f=_fn: getattr(ops, f)(
             ops.mean(y, axis=[1, 2], keepdims=True), _away_from_zero(f, y))), [_op])
    case(f"ops_{_fn}_tensor_broadcast_right",
         body(S2, lambda K, y, f=_fn: getattr(ops, f)(
             y, _away_from_zero(f, ops.mean(y, axis=[1, 2], keepdims=True)))), [_op])
case("ops_python_operators", body(S2, lambda K, y: (y * 2.0 - 1.0) / 3.0 + y), ["Mul", "Add"])
case("ops_maximum_minimum", body(S2, lambda K, y: ops.minimum(ops.maximum(y, -0.5), 0.7)),
     ["Max", "Min"])
case("ops_power", body(S2, lambda K, y: ops.power(ops.abs(y) + 0.1, 1.5)), ["Pow"])
for _keep in (False, True):
    case(f"ops_mean_keepdims_{_keep}",
         body(S2, lambda K, y, k=_keep: ops.mean(y, axis=[1, 2], keepdims=k)), ["ReduceMean"])
case("ops_mean_then_dense",
     body(S2, lambda K, y: K.layers.Dense(3)(ops.mean(y, axis=[1, 2]))), ["ReduceMean"])
case("ops_sum", body(S2, lambda K, y: ops.sum(y, axis=-1, keepdims=True)), ["ReduceSum"])
case("ops_sum_axis1", body(S2, lambda K, y: ops.sum(y, axis=1)), ["ReduceSum"])
case("ops_max", body(S2, lambda K, y: ops.max(y, axis=[1, 2])), ["ReduceMax"])
case("ops_min", body(S2, lambda K, y: ops.min(y, axis=2, keepdims=True)), ["ReduceMin"])
case("ops_concatenate", body(S2, lambda K, y: ops.concatenate([y, ops.relu(y)], axis=-1)),
     ["Concat"])
case("ops_concatenate_axis2", body(S2, lambda K, y: ops.concatenate([y, y * 2.0], axis=2)),
     ["Concat"])
case("ops_split", body(S2, lambda K, y: ops.concatenate(
    [t * float(i + 1) for i, t in enumerate(ops.split(y, 3, axis=-1))], axis=1)), ["Split"])
case("ops_split_indices", body(S2, lambda K, y: ops.split(y, [2, 5], axis=1)[1]), ["Split"])
case("ops_pad", body(S2, lambda K, y: ops.pad(y, [[0, 0], [1, 2], [0, 1], [0, 0]])), ["Pad"])
case("ops_pad_constant",
     body(S2, lambda K, y: ops.pad(y, [[0, 0], [1, 0], [2, 1], [1, 1]], constant_values=0.5)),
     ["Pad"])
case("ops_reshape", body(S2, lambda K, y: ops.reshape(y, (-1, 81, 6))), ["Reshape"])
# Reshaped back to the pooled shape: the pooling's own output, no Reshape (`Graph.unflattened`).
case("ops_reshape_batch_kept", body(S2, lambda K, y: K.layers.Dense(4)(
    ops.reshape(K.layers.GlobalAveragePooling2D()(y), (-1, 1, 1, 6)))), ["GlobalAveragePool"])
case("ops_reshape_batch_kept_moved", body(S2, lambda K, y: K.layers.Dense(4)(
    ops.reshape(K.layers.GlobalAveragePooling2D()(y), (-1, 1, 6, 1)))), ["Reshape"])
case("ops_transpose", body(S2, lambda K, y: ops.transpose(y, (0, 3, 1, 2))))
case("ops_transpose_then_conv",
     body(S2, lambda K, y: K.layers.Conv2D(3, 3)(ops.transpose(y, (0, 2, 1, 3)))), ["Conv"])
for _fn, _ops in (("relu", ["Relu"]), ("relu6", ["Clip"]), ("sigmoid", ["Sigmoid"]),
                  ("silu", ["Sigmoid"]), ("hard_silu", ["HardSigmoid"]),
                  ("hard_sigmoid", ["HardSigmoid"]), ("gelu", ["Tanh"]),
                  ("softmax", ["Softmax"]), ("tanh", ["Tanh"]), ("elu", ["Elu"]),
                  ("selu", ["Selu"]), ("softplus", ["Softplus"]), ("softsign", ["Softsign"]),
                  ("log_softmax", ["LogSoftmax"]), ("leaky_relu", ["LeakyRelu"]),
                  ("sqrt", ["Sqrt"]), ("abs", ["Abs"]), ("exp", ["Exp"]), ("square", ["Mul"]),
                  ("negative", ["Neg"]), ("log", ["Log"])):
    if _fn in ("sqrt", "log"):
        fn = (lambda K, y, f=_fn: getattr(ops, f)(ops.abs(y) + 0.1))
    else:
        fn = (lambda K, y, f=_fn: getattr(ops, f)(y))
    case(f"ops_{_fn}", body(S2, fn), _ops)
case("ops_gelu_exact", body(S2, lambda K, y: ops.gelu(y, approximate=False)), ["Erf"])
case("ops_softmax_axis1", body(S2, lambda K, y: ops.softmax(y, axis=1)), ["Softmax"])
case("ops_leaky_relu_slope", body(S2, lambda K, y: ops.leaky_relu(y, negative_slope=0.3)),
     ["LeakyRelu"])


@keras.saving.register_keras_serializable(package="test_onnx_native")
class ScaledBlock(keras.layers.Layer):
    """A custom layer: sublayers, keras.ops and a weight of its own."""

    def __init__(self, filters=5, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same")
        self.norm = keras.layers.LayerNormalization()

    def build(self, shape):
        self.conv.build(shape)
        self.norm.build(shape[:-1] + (self.filters,))
        self.alpha = self.add_weight(name="alpha", shape=(self.filters,), initializer="ones")

    def call(self, x):
        y = self.norm(self.conv(x))
        return ops.relu(y) * self.alpha + ops.mean(y, axis=[1, 2], keepdims=True)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="test_onnx_native")
class Rot90(keras.layers.Layer):
    """A custom layer no ONNX table covers: raw TensorFlow in `call`."""

    def call(self, x):
        return tf.image.rot90(x)


case("custom_layer_traced", body(S2, lambda K, y: ScaledBlock(name="scaled_block")(y)),
     ["Conv", "ReduceMean"])


def _nested(K, y):
    L = K.layers
    inner_in = K.Input(y.shape[1:])
    inner = K.Model(inner_in, L.ReLU()(_bn(K, L.Conv2D(4, 3, padding="same")(inner_in))),
                    name="inner")
    return L.Conv2D(3, 1)(inner(y))


case("nested_functional", body(S2, _nested), ["Conv"])


def _shared(K, y):
    L = K.layers
    shared = L.Conv2D(6, 3, padding="same", name="shared")
    a = shared(y)
    return L.Add()([shared(L.ReLU()(a)), a])


case("shared_layer_twice", body(S2, _shared), ["Conv", "Add"])


def _sequential(K):
    L = K.layers
    return K.Sequential([
        K.Input(S2), L.Conv2D(6, 3, strides=2, padding="same"), L.BatchNormalization(),
        L.ReLU(), L.DepthwiseConv2D(3, padding="same"), L.BatchNormalization(),
        L.GlobalAveragePooling2D(), L.Dense(3),
    ])


# The pooled Dense runs as a 1x1 Conv (`onnx/pooled_dense.py`).
case("sequential", _sequential, ["Conv", "GlobalAveragePool"])


# tf-keras (Keras 2) flavour: a representative subset.
def tfk(id, build, expect=(), **kw):
    case(f"tfk_{id}", build, expect, flavour="tf_keras", **kw)


tfk("conv2d_bn", body(S2, lambda K, y: K.layers.Conv2D(5, 3, strides=2, padding="same")(y)),
    ["Conv"])
tfk("conv2d_groups2", body(S2, lambda K, y: _bn(K, K.layers.Conv2D(4, 3, groups=2)(y))), ["Conv"])
tfk("depthwise2d", body(S2, lambda K, y: _bn(K, K.layers.DepthwiseConv2D(
    3, strides=2, padding="same", depth_multiplier=2)(y))), ["Conv"])
tfk("separable2d", body(S2, lambda K, y: _bn(K, K.layers.SeparableConv2D(5, 3)(y))), ["Conv"])
tfk("dense", body(S0, lambda K, y: _bn(K, K.layers.Dense(5)(y))), ["Gemm"])
tfk("maxpool_same", body(S2, lambda K, y: K.layers.MaxPooling2D(3, 2, padding="same")(y)),
    ["MaxPool"])
tfk("avgpool_same", body(S2, lambda K, y: K.layers.AveragePooling2D(3, 2, padding="same")(y)),
    ["AveragePool"])
tfk("global_avgpool", body(S2, lambda K, y: K.layers.GlobalAveragePooling2D()(y)),
    ["GlobalAveragePool"])
tfk("zero_padding2d", body(S2, lambda K, y: K.layers.ZeroPadding2D(((1, 2), (0, 3)))(y)), ["Pad"])
tfk("concatenate", two_branches(S2, lambda K, ab: K.layers.Concatenate()(ab)), ["Concat"])
tfk("add", two_branches(S2, lambda K, ab: K.layers.Add()(ab)), ["Add"])
tfk("hard_sigmoid", body(S2, lambda K, y: K.layers.Activation("hard_sigmoid")(y)),
    ["HardSigmoid"])
tfk("relu6", body(S2, lambda K, y: K.layers.ReLU(max_value=6.0)(y)), ["Clip"])
tfk("rescaling", body(S2, lambda K, y: K.layers.Rescaling(1 / 127.5, offset=-1.0)(y)),
    ["Mul", "Add"])
tfk("reshape_flatten", body(S2, lambda K, y: K.layers.Dense(3)(K.layers.Flatten()(
    K.layers.Reshape((27, 18))(y)))), ["Reshape", "Flatten"])
tfk("tfoplambda_add", two_branches(S2, lambda K, ab: ab[0] + ab[1]), ["Add"])
tfk("tfoplambda_multiply_scalar", body(S2, lambda K, y: y * 0.5 - 1.0), ["Mul"])
tfk("tfoplambda_relu_mean", body(S2, lambda K, y: tf.nn.relu(y) * tf.reduce_mean(
    y, axis=[1, 2], keepdims=True)), ["Relu", "ReduceMean"])
tfk("tfoplambda_concat_reshape", body(S2, lambda K, y: tf.reshape(
    tf.concat([y, tf.nn.relu6(y)], axis=-1), [-1, 81, 12])), ["Concat", "Reshape"])
tfk("upsampling2d", body(S2, lambda K, y: K.layers.UpSampling2D(2)(y)), ["Resize"])
tfk("upsampling2d_bilinear",
    body(S2, lambda K, y: K.layers.UpSampling2D(2, interpolation="bilinear")(y)), ["Resize"])


# --------------------------------------------------------------------------
# The tests


def keras_module(flavour):
    if flavour == "tf_keras":
        return pytest.importorskip("tf_keras")
    return keras


def build_case(c, seed=0):
    K = keras_module(c.flavour)
    model = c.build(K)
    randomize(model, seed)
    shape = c.x_shape or tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(seed + 1).normal(size=(BATCH,) + shape).astype("float32")
    if c.positive:
        x = np.abs(x) + 0.1
    return model, x


def onnx_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    return session.run(None, {feed.name: x})


def op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def has_bn_layer(model):
    return any(type(layer).__name__ in ("BatchNormalization", "SyncBatchNormalization")
               for layer in model._flatten_layers(include_self=False))


def _params():
    for c in CASES:
        for fold in (False, True):
            yield pytest.param(c, fold, id=f"{c.id}-{'fold' if fold else 'nofold'}")


@pytest.mark.parametrize("c, fold", list(_params()))
def test_layer_matches_keras(c, fold, tmp_path):
    model, x = build_case(c)
    try:
        want = [np.asarray(w) for w in tf.nest.flatten(model(x, training=False))]
    except Exception as e:  # noqa: BLE001
        if c.channels_first:
            pytest.skip(f"this CPU cannot run channels_first convolutions: {e}")
        raise
    converted = convert_model(model, to="inference", fold=fold, safe_mode=c.safe_mode)
    if fold and c.folds:
        assert not has_bn_layer(converted), "every BN here follows a foldable layer"
    path = tmp_path / "m.onnx"
    result = export_onnx(converted, path, exporter="native", check=False, opset=c.opset)
    assert result.exporter == "native"
    got = onnx_run(path, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=c.rtol, atol=c.atol)
    found = op_types(path)
    assert set(c.expect) <= found, f"expected {c.expect} among {sorted(found)}"
    if fold and c.folds:
        assert "BatchNormalization" not in found
    if (c.opset or 17) < 20:
        assert "Gelu" not in found  # below opset 20 GELU is spelt with Erf/Tanh


def test_every_emitter_kind_is_in_the_table():
    """The table names every layer kind, activation and op the emitters map."""
    from bnconvert.onnx import activations as onnx_activations
    from bnconvert.onnx import layers as onnx_layers
    from bnconvert.onnx import ops as ops_module
    from bnconvert.onnx import shape as onnx_structure

    built = set()
    for c in CASES:
        if c.flavour != "keras":
            continue
        model, _ = build_case(c)
        built.update(_kinds(model))
    layers = set(onnx_layers.EMITTERS) | set(onnx_structure.EMITTERS)
    # SyncBatchNormalization only exists before `convert_model(to="inference")`
    # unsyncs it; ActivityRegularization/AlphaDropout/... are Keras 2 or identities.
    # Layers whose emitters live in onnx.shape but are checked in the conformance matrix.
    conformance = {"Masking"} | {f"Adaptive{k}Pooling{n}D" for k in ("Average", "Max")
                                 for n in (1, 2, 3)}
    untested = layers - built - conformance - {"SyncBatchNormalization", "SpatialDropout1D", "SpatialDropout3D",
                                 "GaussianDropout", "AlphaDropout", "ActivityRegularization",
                                 "Identity"}
    assert not untested, sorted(untested)
    from test_onnx_layers_conformance import CASES as CONFORMANCE

    names = {c.id.split("activation_")[-1] for c in CASES + CONFORMANCE
             if c.id.startswith("activation_")}
    assert set(onnx_activations._EMITTERS) <= names
    wanted_ops = {"Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum", "Power",
                  "Sqrt", "Absolute", "Negative", "Exp", "Log", "Square", "Relu", "Relu6",
                  "Sigmoid", "Tanh", "Silu", "HardSilu", "HardSigmoid", "Gelu", "Softmax",
                  "LogSoftmax", "LeakyRelu", "Elu", "Selu", "Softplus", "Softsign", "Mean", "Sum",
                  "Max", "Min"}  # the rest of `onnx.ops` is in test_onnx_ops_conformance.py
    assert {ops_module.function_name(type(k, (), {})()) for k in wanted_ops} <= set(
        ops_module.EMITTERS)
    missing = wanted_ops - built
    assert not missing, sorted(missing)


def _kinds(model):
    """Class names of the layers and raw ops of a model, nested models included."""
    out = set()
    for op in getattr(model, "operations", None) or getattr(model, "layers", []):
        out.add(type(op).__name__)
        if hasattr(op, "operations") or hasattr(op, "layers"):
            out |= _kinds(op)
    return out


def test_dynamic_batch_with_the_exports_own_check(tmp_path):
    """The export checks itself on its own batch (2); the file then runs on 3 and 1."""
    model, x = build_case(CASES[[c.id for c in CASES].index("sequential")])
    converted = convert_model(model, to="inference", fold=True)
    result = export_onnx(converted, tmp_path / "m.onnx", exporter="native")
    assert result.checked and result.exporter == "native" and result.max_abs_diff < 1e-4
    for batch in (x, x[:1]):
        (got,) = onnx_run(tmp_path / "m.onnx", batch)
        np.testing.assert_allclose(got, model(batch, training=False), rtol=RTOL, atol=ATOL)


def _uncoverable(kind):
    x = keras.Input(S2)
    y = keras.layers.Conv2D(4, 3, padding="same")(x)
    if kind == "custom":
        y = Rot90(name="rot_layer")(y)
    else:
        y = keras.layers.Lambda(lambda t: tf.math.cumsum(t, axis=1), name="rot_layer")(y)
    return keras.Model(x, y, name="uncoverable")


@pytest.mark.parametrize("kind", ["custom", "lambda"])
def test_uncovered_layer_is_named_and_auto_falls_back(kind, tmp_path):
    model = _uncoverable(kind)
    with pytest.raises(ConversionError) as e:
        export_onnx(model, tmp_path / "n.onnx", exporter="native", check=False)
    message = str(e.value)
    assert "\n" not in message and "rot_layer" in message
    assert not (tmp_path / "n.onnx").exists()
    result = export_onnx(model, tmp_path / "a.onnx")
    assert result.exporter == "tf2onnx"
    assert "does not cover" in result.exporter_note and "rot_layer" in result.exporter_note
    x = np.random.default_rng(0).normal(size=(BATCH,) + S2).astype("float32")
    (got,) = onnx_run(tmp_path / "a.onnx", x)
    np.testing.assert_allclose(got, model(x, training=False), rtol=RTOL, atol=ATOL)
