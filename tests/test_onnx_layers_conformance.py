"""Conformance of the native exporter's layer emitters, against Keras.

Every case is a tiny model built once, with seeded weights; it is emitted
natively at opsets 13, 17 and 21 and run in onnxruntime in-process, on a
batch of 3 (the export's own check uses 2) with large and negative values,
and on a spatial or time size other than the check's (32) where the model
leaves it open. The reference is the Keras model's own
`model(x, training=False)`. Layers with a `data_format` run in both.
"""

import dataclasses

import keras
import numpy as np
import onnxruntime as ort
import pytest

from bnconvert import flavour as flavour_lib
from bnconvert import verify
from bnconvert.onnx import walk

ops = keras.ops
OPSETS = (13, 17, 21)
BATCH = 3


@dataclasses.dataclass
class Case:
    id: str
    build: object  # K -> model (K is `keras` or `tf_keras`)
    shapes: tuple = None  # test input shapes without the batch, for open dimensions
    flavours: tuple = ("keras",)
    kinds: tuple = ()  # a kind of input per input: "normal", "mask", "index"
    rtol: float = 2e-4


CASES = []


def case(id, build, **kw):
    CASES.append(Case(id, build, **kw))


def seq(shape, *layers):
    """`Input(shape)` -> the layers made by each `make(K)`, in order."""
    def build(K):
        x = K.Input(shape)
        y = x
        for make in layers:
            y = make(K)(y)
        return K.Model(x, y)
    return build


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "float" not in str(v.dtype) or "seed" in v.name:
            continue
        shape = tuple(v.shape)
        scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) >= 2 else 0.3
        if v.name.split("/")[-1].startswith("moving_variance"):
            v.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
        else:
            v.assign(rng.normal(0.0, scale, shape).astype("float32"))


def inputs_for(model, c, seed=1):
    rng = np.random.default_rng(seed)
    arrays = []
    for i, tensor in enumerate(model.inputs):
        shape = (c.shapes[i] if c.shapes else None) or tuple(tensor.shape[1:])
        shape = (BATCH,) + tuple(shape)
        kind = c.kinds[i] if i < len(c.kinds) else "normal"
        if kind == "mask":
            arrays.append((rng.uniform(size=shape) > 0.3).astype("float32"))
        elif kind == "index":
            arrays.append(rng.integers(0, 10, size=shape).astype("float32"))
        else:  # large and negative: centred at -2 with a spread of 8
            arrays.append(rng.normal(-2.0, 8.0, size=shape).astype("float32"))
    return arrays


def emit_and_run(model, arrays, opset):
    names = [f"in{i}" for i in range(len(model.inputs))]
    outs = [f"out{i}" for i in range(len(model.outputs))]
    proto = walk.emit(model, flavour_lib.flavour_of(model), names, outs, opset)
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, arrays))), proto


def assert_matches(got, want, rtol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = np.asarray(w, np.float64)
        assert g.shape == w.shape
        scale = max(1.0, float(np.abs(w).max(initial=0.0)))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


def keras_module(flavour):
    if flavour == "tf_keras":
        return pytest.importorskip("tf_keras")
    return keras


# --------------------------------------------------------------------------
# Activations: every argument of ReLU, every Keras activation by name, and
# functions that are not Keras's (traced).

S2 = (None, None, 3)  # open spatial size: tested on 5 x 7
SP = ((5, 7, 3),)

for kw in ({"threshold": 1.5}, {"threshold": 2.0, "negative_slope": 0.1},
           {"threshold": 0.5, "max_value": 4.0, "negative_slope": 0.2},
           {"max_value": 3.0, "negative_slope": 0.3}, {"max_value": 6.0}):
    case("relu_" + "_".join(f"{k}{v}" for k, v in kw.items()),
         seq(S2, lambda K, kw=kw: K.layers.ReLU(**kw)), shapes=SP,
         flavours=("keras", "tf_keras"))

for name in ("hard_tanh", "hard_shrink", "soft_shrink", "tanh_shrink", "celu", "glu",
             "log_sigmoid", "sparse_plus", "squareplus", "gelu", "mish", "selu", "elu",
             "softplus", "softsign", "hard_silu", "hard_sigmoid", "leaky_relu"):
    case(f"activation_{name}", seq((5, 4), lambda K, name=name: K.layers.Activation(name)))


def _gelu_lambda(t):
    return 0.5 * t * (1.0 + ops.erf(t / np.sqrt(2.0)))


def hard_sigmoid_torch(t):
    return ops.relu6(t + 3.0) / 6.0


def custom_swish(t):
    return t * ops.sigmoid(t)


def gelu(t):  # a user's own `gelu`, the tanh approximation: not Keras's exact one
    return 0.5 * t * (1.0 + ops.tanh(0.7978845608 * (t + 0.044715 * t * t * t)))


for fn in (_gelu_lambda, hard_sigmoid_torch, custom_swish, gelu):
    case(f"activation_function_{fn.__name__}",
         seq(S2, lambda K: K.layers.Conv2D(4, 3, padding="same"),
             lambda K, fn=fn: K.layers.Activation(fn)), shapes=SP)
case("conv_activation_function",
     seq(S2, lambda K: K.layers.Conv2D(4, 3, padding="same", activation=custom_swish)),
     shapes=SP)


class ReluBlock(keras.layers.Layer):
    """A custom layer calling a ReLU sublayer inside its `call`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(3, 1)
        self.relu = keras.layers.ReLU(max_value=2.0)

    def call(self, x):
        return self.relu(self.conv(x)) + x


case("nested_relu_call", seq(S2, lambda K: ReluBlock()), shapes=SP)

# --------------------------------------------------------------------------
# Wrong graphs of issue 17, now regression tests.

case("flatten_channels_first",
     seq((3, 4, 5), lambda K: K.layers.Flatten(data_format="channels_first")),
     flavours=("keras", "tf_keras"))
case("flatten_channels_first_after_conv",
     seq((4, 5, 3), lambda K: K.layers.Conv2D(6, 3),
         lambda K: K.layers.Flatten(data_format="channels_first")))


def _masked(layer, mask_shape=(6,)):
    def build(K):
        x, m = K.Input((6, 4)), K.Input(mask_shape)
        return K.Model([x, m], layer(K)(x, mask=m))
    return build


case("softmax_mask", _masked(lambda K: K.layers.Softmax(axis=1), (6, 4)),
     kinds=("normal", "mask"))
case("softmax_mask_broadcast", _masked(lambda K: K.layers.Softmax(), (6, 1)),
     kinds=("normal", "mask"))
case("gap1d_mask", _masked(lambda K: K.layers.GlobalAveragePooling1D()),
     kinds=("normal", "mask"))
case("gap1d_mask_keepdims", _masked(lambda K: K.layers.GlobalAveragePooling1D(keepdims=True)),
     kinds=("normal", "mask"))


# --------------------------------------------------------------------------
# The test (after the table: the parameters are read when it is defined)


def _params():
    for c in CASES:
        for flavour in c.flavours:
            yield pytest.param(c, flavour, id=f"{c.id}-{flavour}")


@pytest.mark.parametrize("c, flavour", list(_params()))
def test_layer_conforms(c, flavour):
    K = keras_module(flavour)
    model = c.build(K)
    randomize(model)
    arrays = inputs_for(model, c)
    want = verify.run(model, arrays)
    for opset in OPSETS:
        got, _ = emit_and_run(model, arrays, opset)
        assert_matches(got, want, c.rtol)
