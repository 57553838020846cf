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

from bnconvert import check_batch
from bnconvert import flavour as flavour_lib
from bnconvert.onnx import walk

ops = keras.ops
OPSETS = (13, 17, 21)
BOTH = ("keras", "tf_keras")
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
        if None in shape:  # tf-keras's idf weights: sized by the vocabulary when called
            continue
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
        if kind in ("mask", "sparse_mask"):  # sparse: many rows wholly masked
            cut = 0.3 if kind == "mask" else 0.8
            arrays.append((rng.uniform(size=shape) > cut).astype("float32"))
        elif kind == "fraction":  # a float mask in [0, 1], some steps 0
            arrays.append(np.where(rng.uniform(size=shape) > 0.3, rng.uniform(size=shape),
                                   0.0).astype("float32"))
        elif kind == "zeros":  # constant images: AutoContrast's 0 / 0
            arrays.append(np.zeros(shape, "float32"))
        elif kind == "right_padded":  # zeros after a random length per row
            x = rng.normal(-2.0, 8.0, size=shape).astype("float32")
            for row, length in enumerate(rng.integers(1, shape[1] + 1, size=shape[0])):
                x[row, length:] = 0.0
            arrays.append(x)
        elif kind == "any_mask":  # random steps of each row True (holes, left padding)
            arrays.append(rng.integers(0, 2, size=shape).astype("float32"))
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


for fn in (_gelu_lambda, hard_sigmoid_torch, custom_swish, gelu, ops.gelu):
    prefix = "keras_ops_" if fn is ops.gelu else ""  # ops.gelu defaults to the tanh form
    case(f"activation_function_{prefix}{fn.__name__}",
         seq(S2, lambda K: K.layers.Conv2D(4, 3, padding="same"),
             lambda K, fn=fn: K.layers.Activation(fn)), shapes=SP)
case("activation_function_both_flavours",
     seq(S2, lambda K: K.layers.Conv2D(4, 3, padding="same"),
         lambda K: K.layers.Activation(lambda t: K.activations.sigmoid(t) * t)),
     shapes=SP, flavours=BOTH)
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
     kinds=("normal", "sparse_mask"), flavours=BOTH)
case("softmax_mask_broadcast", _masked(lambda K: K.layers.Softmax(), (6, 1)),
     kinds=("normal", "mask"), flavours=BOTH)
case("gap1d_mask", _masked(lambda K: K.layers.GlobalAveragePooling1D()),
     kinds=("normal", "mask"), flavours=BOTH)
case("gap1d_mask_keepdims", _masked(lambda K: K.layers.GlobalAveragePooling1D(keepdims=True)),
     kinds=("normal", "mask"), flavours=BOTH)
case("gap1d_mask_channels_first", _masked(lambda K: K.layers.GlobalAveragePooling1D(
    data_format="channels_first"), (4,)), kinds=("normal", "mask"), flavours=BOTH)
case("gap1d_fractional_mask", _masked(lambda K: K.layers.GlobalAveragePooling1D()),
     kinds=("normal", "fraction"), flavours=BOTH)


# --------------------------------------------------------------------------
# Attention and embeddings


def _mha(query_len=None, value_len=None, key=False, **call_kw):
    def build(K):
        q, v = K.Input((query_len, 6)), K.Input((value_len, 5))
        inputs = [q, v]
        kw = dict(call_kw)
        if key:
            k = K.Input((value_len, 5))
            inputs.append(k)
            kw["key"] = k
        if kw.pop("attention_mask", False):
            m = K.Input((query_len, value_len))
            inputs.append(m)
            kw["attention_mask"] = m
        if kw.pop("value_mask", False):
            m = K.Input((value_len,))
            inputs.append(m)
            kw["value_mask"] = m
        layer = K.layers.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=4,
                                            **kw.pop("layer", {}))
        out = layer(q, v, **kw)
        return K.Model(inputs, out)
    return build


case("mha", _mha(), shapes=((4, 6), (7, 5)), flavours=("keras", "tf_keras"))
case("mha_key_no_bias", _mha(key=True, layer={"use_bias": False, "output_shape": 3}),
     shapes=((4, 6), (7, 5), (7, 5)))
case("mha_causal", _mha(use_causal_mask=True), shapes=((4, 6), (4, 5)))
case("mha_attention_mask", _mha(4, 7, attention_mask=True), kinds=("normal", "normal", "mask"),
     flavours=("keras", "tf_keras"))
case("mha_scores", _mha(4, 7, return_attention_scores=True))
case("mha_rows_masked", _mha(4, 7, attention_mask=True), flavours=BOTH,
     kinds=("normal", "normal", "sparse_mask"))
case("mha_rows_masked_scores", _mha(4, 7, attention_mask=True, return_attention_scores=True),
     kinds=("normal", "normal", "sparse_mask"))


def _gqa(**call_kw):
    def build(K):
        q, v = K.Input((None, 6)), K.Input((None, 6))
        inputs = [q, v]
        kw = dict(call_kw)
        for name in ("attention_mask", "value_mask"):
            if kw.pop(name, False):
                m = K.Input((4, 7) if name == "attention_mask" else (7,))
                inputs.append(m)
                kw[name] = m
        layer = K.layers.GroupQueryAttention(head_dim=3, num_query_heads=4,
                                             num_key_value_heads=2)
        return K.Model(inputs, layer(q, v, **kw))
    return build


case("gqa", _gqa(), shapes=((4, 6), (7, 6)))
case("gqa_causal_masks", _gqa(use_causal_mask=True, attention_mask=True, value_mask=True),
     shapes=((4, 6), (7, 6), (4, 7), (7,)), kinds=("normal", "normal", "mask", "mask"))
case("mha_value_mask", _mha(4, 7, value_mask=True), kinds=("normal", "normal", "mask"))


def _self_attention(K):
    x = K.Input((None, 8))
    return K.Model(x, K.layers.MultiHeadAttention(2, 4)(x, x))


case("mha_self", _self_attention, shapes=((9, 8),), flavours=("keras", "tf_keras"))


def _attention(kind, n=2, masks=False, **kw):
    def build(K):
        q, v = K.Input((4, 5)), K.Input((6, 5))
        inputs = [q, v] + ([K.Input((6, 5))] if n == 3 else [])
        layer = getattr(K.layers, kind)(**kw.pop("layer", {}))
        call_kw = dict(kw)
        if masks:
            qm, vm = K.Input((4,)), K.Input((6,))
            call_kw["mask"] = [qm, vm]
            out = layer(inputs, **call_kw)
            inputs = inputs + [qm, vm]
        else:
            out = layer(inputs, **call_kw)
        return K.Model(inputs, out)
    return build


case("attention_dot", _attention("Attention"), flavours=BOTH)
case("attention_scaled_key", _attention("Attention", 3, layer={"use_scale": True}),
     flavours=BOTH)
case("attention_concat", _attention("Attention", layer={"score_mode": "concat",
                                                       "use_scale": True}), flavours=BOTH)
case("attention_masks", _attention("Attention", masks=True),
     kinds=("normal", "normal", "mask", "mask"))
case("attention_causal_scores", _attention("Attention", use_causal_mask=True,
                                           return_attention_scores=True))
case("additive_attention", _attention("AdditiveAttention"), flavours=BOTH)
case("additive_attention_unscaled_masks",
     _attention("AdditiveAttention", masks=True, layer={"use_scale": False}),
     kinds=("normal", "normal", "mask", "mask"))

case("einsum_dense", seq((None, 6), lambda K: K.layers.EinsumDense(
    "abc,cde->abde", output_shape=(None, 2, 3), bias_axes="de", activation="relu")),
    shapes=((5, 6),))
case("embedding", seq((7,), lambda K: K.layers.Embedding(10, 4)), kinds=("index",),
     flavours=BOTH)


def _quantized(layer_kind, mode="int8"):
    def build(K):
        x = K.Input((7,) if layer_kind == "Embedding" else (6,))
        layer = (K.layers.Embedding(10, 4) if layer_kind == "Embedding"
                 else K.layers.Dense(5, activation="relu"))
        model = K.Model(x, layer(x))
        randomize(model)
        layer.quantize(mode)
        return model
    return build




def _reversible(**kw):
    def build(K):
        tokens, hidden = K.Input((7,)), K.Input((7, 4))
        layer = K.layers.ReversibleEmbedding(10, 4, **kw)
        return K.Model([tokens, hidden], [layer(tokens), layer(hidden, reverse=True)])
    return build


case("reversible_embedding", _reversible(), kinds=("index", "normal"))
case("reversible_embedding_untied_capped", _reversible(tie_weights=False, logit_soft_cap=5.0),
     kinds=("index", "normal"))
for mode, n in (("one_hot", 1), ("multi_hot", 5), ("count", 5)):
    case(f"category_encoding_{mode}", seq((n,), lambda K, m=mode: K.layers.CategoryEncoding(
        10, output_mode=m)), kinds=("index",))
BINS = [-10.0, -2.0, 0.0, 0.5, 7.0]
case("discretization_int_into_embedding", seq((5,), lambda K: K.layers.Discretization(BINS),
                                              lambda K: K.layers.Embedding(6, 3)))
for mode, n in (("one_hot", 1), ("multi_hot", 5), ("count", 5)):
    case(f"discretization_{mode}", seq((n,), lambda K, m=mode: K.layers.Discretization(
        BINS, output_mode=m)))
VOCAB = [7, 3, 9, 0, 5]  # inputs are 0..9: half in the vocabulary, 4 is the mask token
for id, kw in (("int", {}), ("mask", {"mask_token": 4}), ("oov3", {"num_oov_indices": 3}),
               ("multi_hot", {"output_mode": "multi_hot"}),
               ("count_mask", {"output_mode": "count", "mask_token": 4}),
               ("one_hot_padded", {"output_mode": "one_hot", "pad_to_max_tokens": True,
                                   "max_tokens": 12}),
               ("tf_idf", {"output_mode": "tf_idf", "idf_weights": [0.5, 1.0, 2.0, 3.0, 4.0]}),
               ("invert", {"invert": True, "mask_token": 4})):
    n = 1 if id.startswith("one_hot") else 5
    case(f"integer_lookup_{id}", seq((n,), lambda K, kw=kw: K.layers.IntegerLookup(
        vocabulary=VOCAB, **kw)), kinds=("index",), flavours=BOTH)
for id, kw in (("db", {}), ("power", {"power_to_db": False, "mag_exp": 1.0}),
               ("hamming_short", {"window": "hamming", "sequence_length": 24, "top_db": 20.0,
                                  "ref_power": 2.0})):
    case(f"mel_spectrogram_{id}", seq((200,), lambda K, kw=kw: K.layers.MelSpectrogram(
        fft_length=32, sequence_stride=8, num_mel_bins=10, sampling_rate=8000, **kw)))
for id, kw in (("log", {"mode": "log"}), ("magnitude", {"mode": "magnitude", "expand_dims": True}),
               ("real_hamming", {"mode": "real", "window": "hamming", "frame_step": 5}),
               ("psd", {"mode": "psd", "scaling": None, "padding": "same"})):
    case(f"stft_spectrogram_{id}", seq((120, 1), lambda K, kw=kw: K.layers.STFTSpectrogram(
        frame_length=16, fft_length=32, **{"frame_step": 8, **kw})))
for id, shape, make in (
        ("1d", (4, 9, 3), lambda K: K.layers.ConvLSTM1D(4, 3, padding="same")),
        ("2d_sequences", (3, 6, 5, 2), lambda K: K.layers.ConvLSTM2D(
            3, (3, 2), return_sequences=True, strides=(2, 1))),
        ("2d_backwards_states", (3, 5, 5, 2), lambda K: K.layers.ConvLSTM2D(
            3, 3, padding="same", go_backwards=True, return_state=True,
            return_sequences=True, recurrent_activation="hard_sigmoid")),
        ("2d_channels_first_dilated", (3, 2, 7, 6), lambda K: K.layers.ConvLSTM2D(
            2, 3, data_format="channels_first", dilation_rate=2, return_sequences=True)),
        ("3d", (2, 4, 4, 3, 1), lambda K: K.layers.ConvLSTM3D(2, 2, padding="same"))):
    case(f"conv_lstm_{id}", seq(shape, make), flavours=BOTH)
case("dense_int8", _quantized("Dense"))
case("embedding_int8", _quantized("Embedding"), kinds=("index",))


# --------------------------------------------------------------------------
# Recurrent layers

SEQ = (None, 4)  # open time: tested on 6 steps
SEQ_SHAPES = ((6, 4),)
for kind in ("LSTM", "GRU", "SimpleRNN"):
    for kw in ({}, {"return_sequences": True}, {"go_backwards": True},
               {"go_backwards": True, "return_sequences": True},
               {"return_state": True, "return_sequences": True}):
        case(f"{kind.lower()}_" + "_".join(kw) if kw else kind.lower(),
             seq(SEQ, lambda K, kind=kind, kw=kw: getattr(K.layers, kind)(5, **kw)),
             shapes=SEQ_SHAPES, flavours=BOTH, rtol=1e-3)
case("lstm_hard_sigmoid_relu", seq(SEQ, lambda K: K.layers.LSTM(
    5, recurrent_activation="hard_sigmoid", activation="relu", return_sequences=True)),
    shapes=SEQ_SHAPES, flavours=BOTH, rtol=1e-3)
case("gru_reset_before", seq(SEQ, lambda K: K.layers.GRU(5, reset_after=False, use_bias=True)),
     shapes=SEQ_SHAPES, flavours=BOTH, rtol=1e-3)
case("simple_rnn_relu_no_bias", seq(SEQ, lambda K: K.layers.SimpleRNN(
    5, activation="relu", use_bias=False, return_sequences=True)), shapes=SEQ_SHAPES, rtol=1e-3)
case("rnn_of_lstm_cell", seq(SEQ, lambda K: K.layers.RNN(K.layers.LSTMCell(5))),
     shapes=SEQ_SHAPES, rtol=1e-3)


def _stacked(**kw):
    return lambda K: K.layers.RNN(K.layers.StackedRNNCells(
        [K.layers.LSTMCell(5), K.layers.GRUCell(3), K.layers.SimpleRNNCell(4)]), **kw)


case("rnn_stacked_cells", seq(SEQ, _stacked()), shapes=SEQ_SHAPES, rtol=1e-3, flavours=BOTH)
case("rnn_stacked_cells_backwards_states", seq(SEQ, _stacked(
    go_backwards=True, return_sequences=True, return_state=True)), shapes=SEQ_SHAPES,
    rtol=1e-3, flavours=BOTH)
for merge in ("concat", "sum", "mul", "ave", None):
    for sequences in (False, True):
        case(f"bidirectional_{merge}_{'seq' if sequences else 'last'}",
             seq(SEQ, lambda K, m=merge, s=sequences: K.layers.Bidirectional(
                 K.layers.LSTM(5, return_sequences=s), merge_mode=m)),
             shapes=SEQ_SHAPES, flavours=BOTH, rtol=1e-3)
case("bidirectional_gru_state", seq(SEQ, lambda K: K.layers.Bidirectional(
    K.layers.GRU(5, return_sequences=True, return_state=True))), shapes=SEQ_SHAPES,
    flavours=BOTH, rtol=1e-3)


def _masked_rnn(make):
    """A recurrent layer given `mask=` (any steps of each row True)."""
    def build(K):
        x, m = K.Input((6, 4)), K.Input((6,))
        return K.Model([x, m], make(K)(x, mask=m))
    return build


for name, make in (
    ("lstm_seq", lambda K: K.layers.LSTM(5, return_sequences=True)),
    ("gru_last", lambda K: K.layers.GRU(5)),
    ("stacked_cells_seq", _stacked(return_sequences=True)),
    ("simple_rnn_state", lambda K: K.layers.SimpleRNN(5, return_state=True)),
    ("bidirectional_seq", lambda K: K.layers.Bidirectional(
        K.layers.SimpleRNN(5, return_sequences=True))),
    ("bidirectional_last", lambda K: K.layers.Bidirectional(K.layers.GRU(5))),
):
    case(f"masked_{name}", _masked_rnn(make), kinds=("normal", "any_mask"), rtol=1e-3)

case("masking", seq((6, 4), lambda K: K.layers.Masking(0.0)), kinds=("right_padded",))


def _initial_state(K):
    x, h, c = K.Input((None, 4)), K.Input((5,)), K.Input((5,))
    return K.Model([x, h, c], K.layers.LSTM(5)(x, initial_state=[h, c]))


case("lstm_initial_state", _initial_state, shapes=((6, 4), (5,), (5,)), flavours=BOTH,
     rtol=1e-3)


# --------------------------------------------------------------------------
# Images: augmentation at inference, resizing, cropping

IMG = (None, None, 3)
IMG_SHAPES = ((12, 10, 3),)
_AUGMENT_ARGS = {"RandomBrightness": {"factor": 0.5}, "RandomContrast": {"factor": 0.5},
                 "RandomRotation": {"factor": 0.5}, "RandomZoom": {"height_factor": 0.5},
                 "RandomTranslation": {"height_factor": 0.5, "width_factor": 0.5},
                 "RandomHue": {"factor": 0.5}, "RandomSaturation": {"factor": 0.5},
                 "RandomSharpness": {"factor": 0.5}, "RandomColorDegeneration": {"factor": 0.5},
                 "RandomPosterization": {"factor": (1, 8)},
                 "MaxNumBoundingBoxes": {"max_number": 3}}
_TF_KERAS_AUGMENT = ("RandomFlip", "RandomRotation", "RandomZoom", "RandomContrast",
                     "RandomTranslation", "RandomBrightness")


def _augment(name):
    from bnconvert.onnx.preprocessing import AUGMENTATION

    assert name in AUGMENTATION
    return seq((12, 10, 3), lambda K: K.layers.Conv2D(3, 1),
               lambda K: getattr(K.layers, name)(**_AUGMENT_ARGS.get(name, {})))


def _augment_cases():
    from bnconvert.onnx.preprocessing import AUGMENTATION

    for name in AUGMENTATION:
        flavours = BOTH if name in _TF_KERAS_AUGMENT else ("keras",)
        case(f"augment_{name}", _augment(name), flavours=flavours)


_augment_cases()

for mode in ("nearest", "bilinear", "bicubic"):
    for size in ((7, 5), (20, 16)):
        # bicubic needs the image's size when exporting
        case(f"resizing_{mode}_{size[0]}x{size[1]}",
             seq(IMG if mode != "bicubic" else IMG_SHAPES[0],
                 lambda K, m=mode, s=size: K.layers.Resizing(*s, interpolation=m)),
             shapes=IMG_SHAPES, flavours=BOTH, rtol=1e-3)
    case(f"resizing_{mode}_channels_first", seq((3, 12, 10), lambda K, m=mode: K.layers.Resizing(
        14, 15, interpolation=m, data_format="channels_first")), rtol=1e-3)
for flag in ("crop_to_aspect_ratio", "pad_to_aspect_ratio"):
    for size in ((4, 9), (9, 4)):
        case(f"resizing_{flag}_{size[0]}x{size[1]}", seq((12, 10, 3), lambda K, f=flag, s=size:
             K.layers.Resizing(*s, **{f: True})), rtol=1e-3)
case("resizing_pad_fill_value", seq((12, 10, 3), lambda K: K.layers.Resizing(
    4, 9, pad_to_aspect_ratio=True, fill_value=3.5)), rtol=1e-3)
case("resizing_area", seq((12, 10, 3), lambda K: K.layers.Resizing(6, 5, interpolation="area")),
     flavours=BOTH)
case("resizing_area_channels_first", seq((3, 12, 10), lambda K: K.layers.Resizing(
    4, 5, interpolation="area", data_format="channels_first")))
case("auto_contrast", seq((6, 5, 3), lambda K: K.layers.AutoContrast()))
case("auto_contrast_unit_range", seq((6, 5, 3), lambda K: K.layers.AutoContrast((0, 1))))
case("auto_contrast_flat_channel", seq((6, 5, 3), lambda K: K.layers.Conv2D(3, 1),
                                       lambda K: K.layers.AutoContrast((-1, 1))),
     kinds=("zeros",))
case("center_crop", seq((12, 10, 3), lambda K: K.layers.CenterCrop(7, 4)), flavours=BOTH)
case("center_crop_channels_first", seq((3, 12, 10), lambda K: K.layers.CenterCrop(
    7, 4, data_format="channels_first")))

# --------------------------------------------------------------------------
# Normalizations, PReLU, wrappers

case("unit_normalization", seq((5, 6), lambda K: K.layers.UnitNormalization()),
     flavours=BOTH)
case("unit_normalization_axes", seq((5, 6), lambda K: K.layers.UnitNormalization(axis=(1, 2))))
case("rms_normalization", seq((5, 6), lambda K: K.layers.RMSNormalization()))
case("batch_norm_two_axes", seq((6, 7, 3), lambda K: K.layers.Conv2D(4, 3, padding="same"),
                                lambda K: K.layers.BatchNormalization(axis=(2, 3))),
     flavours=("tf_keras",))  # Keras 3's BN takes one axis
case("batch_norm_two_axes_fixed", seq((6, 7, 3), lambda K: K.layers.BatchNormalization(
    axis=(1, 3))), flavours=("tf_keras",))
case("prelu", seq(S2, lambda K: K.layers.Conv2D(4, 3, padding="same"),
                  lambda K: K.layers.PReLU(shared_axes=(1, 2))), shapes=SP, flavours=BOTH)
case("prelu_full", seq((5, 4), lambda K: K.layers.PReLU()), flavours=BOTH)
case("time_distributed_dense", seq((None, 4), lambda K: K.layers.TimeDistributed(
    K.layers.Dense(3, activation="relu"))), shapes=((6, 4),), flavours=BOTH)
case("time_distributed_conv", seq((None, 8, 8, 3), lambda K: K.layers.TimeDistributed(
    K.layers.Conv2D(4, 3, strides=2))), shapes=((2, 8, 8, 3),), flavours=BOTH)
case("repeat_vector", seq((4,), lambda K: K.layers.RepeatVector(3)), flavours=BOTH)


def _dot(axes, normalize=False, shapes=((4, 5), (6, 5))):
    def build(K):
        a, b = K.Input(shapes[0]), K.Input(shapes[1])
        return K.Model([a, b], K.layers.Dot(axes, normalize=normalize)([a, b]))
    return build


case("dot_rank2", _dot(1, shapes=((5,), (5,))), flavours=BOTH)
case("dot_rank2_normalized", _dot(1, True, shapes=((5,), (5,))), flavours=BOTH)
case("dot_22", _dot(2), flavours=BOTH)
case("dot_11_normalized", _dot(1, True, shapes=((4, 5), (4, 6))), flavours=BOTH)
case("dot_21", _dot((2, 1), shapes=((4, 5), (5, 6))), flavours=BOTH)

case("pad_reflect", seq(S2, lambda K: K.layers.Conv2D(4, 3, padding="same"),
                        lambda K: lambda y: ops.pad(y, [[0, 0], [1, 2], [2, 1], [0, 0]],
                                                    mode="reflect")), shapes=SP)

for kind in ("Average", "Max"):
    case(f"adaptive_{kind.lower()}_1d", seq((11, 3), lambda K, k=kind: getattr(
        K.layers, f"Adaptive{k}Pooling1D")(4)))
    case(f"adaptive_{kind.lower()}_2d", seq((12, 10, 3), lambda K, k=kind: getattr(
        K.layers, f"Adaptive{k}Pooling2D")((5, 3))))
    case(f"adaptive_{kind.lower()}_2d_channels_first", seq((3, 12, 10), lambda K, k=kind: getattr(
        K.layers, f"Adaptive{k}Pooling2D")((5, 3), data_format="channels_first")))
    case(f"adaptive_{kind.lower()}_3d", seq((5, 6, 7, 2), lambda K, k=kind: getattr(
        K.layers, f"Adaptive{k}Pooling3D")((2, 3, 4))))


# --------------------------------------------------------------------------
# Layers opened by tracing, and identities at inference

case("spectral_normalization", seq((5, 4), lambda K: K.layers.SpectralNormalization(
    K.layers.Dense(3))))
case("pipeline", seq((6, 5, 3), lambda K: K.layers.Pipeline(
    [K.layers.Rescaling(0.5, 1.0), K.layers.CenterCrop(4, 3)])))
case("lambda", seq((5, 4), lambda K: K.layers.Lambda(lambda t: t * 2.0 + 1.0)), flavours=BOTH)
case("random_crop", seq((12, 10, 3), lambda K: K.layers.RandomCrop(12, 10)))
_IDENTITY_ARGS = {"GaussianNoise": {"stddev": 0.3}}
for name in ("Identity", "ActivityRegularization", "AlphaDropout", "GaussianDropout",
             "GaussianNoise", "SpatialDropout1D", "SpatialDropout3D"):
    shape = (2, 3, 5, 4) if name.endswith("3D") else (5, 4)
    kw = _IDENTITY_ARGS.get(name, {"rate": 0.3} if "Dropout" in name else {})
    case(f"identity_{name}", seq(shape, lambda K, n=name, kw=kw: getattr(K.layers, n)(**kw)))


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
    want = check_batch.run(model, arrays)
    for opset in OPSETS:
        got, _ = emit_and_run(model, arrays, opset)
        assert_matches(got, want, c.rtol)


def test_recurrent_mask_that_is_no_prefix_matches_keras():
    """Left padding, holes and a row with nothing kept: Keras skips the masked steps."""
    model = _masked_rnn(lambda K: K.layers.LSTM(5, return_sequences=True))(keras)
    x = np.random.default_rng(0).normal(size=(3, 6, 4)).astype("float32")
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0] * 6], "float32")
    (got,), _ = emit_and_run(model, [x, mask], 17)
    want = check_batch.run(model, [x, mask])[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert np.abs(want[2]).max() == 0  # nothing kept: zeros


def test_every_emitter_of_these_modules_has_a_case():
    """Each layer kind of the tables of this work is built by a case above."""
    from bnconvert.onnx import attention
    from bnconvert.onnx import recurrent

    built = set()
    for c in CASES:
        if c.flavours[0] == "keras":
            model = c.build(keras)
            built |= {type(layer).__name__ for layer in model._flatten_layers(include_self=False)}
    from bnconvert.onnx import encoding
    from bnconvert.onnx import preprocessing
    from bnconvert.onnx import norm
    from bnconvert.onnx import wrappers

    from bnconvert.onnx import conv_recurrent

    wanted = (set(attention.EMITTERS) | set(recurrent.EMITTERS) | set(preprocessing.EMITTERS)
              | set(conv_recurrent.EMITTERS)
              | set(encoding.EMITTERS)
              | set(norm.EMITTERS) | set(wrappers.EMITTERS) | {"Masking"}
              | {f"Adaptive{k}Pooling{n}D" for k in ("Average", "Max") for n in (1, 2, 3)})
    assert not wanted - built, sorted(wanted - built)


@pytest.mark.parametrize("make", [
    lambda K: K.layers.LSTM(5), lambda K: K.layers.GlobalAveragePooling1D(),
    lambda K: lambda t: K.layers.Attention()([t, t]),
    lambda K: K.layers.Bidirectional(K.layers.GRU(3)),
], ids=["lstm", "gap1d", "attention", "bidirectional"])
def test_tf_keras_implicit_mask_is_followed(make):
    """tf-keras keeps a mask's value only: it is recomputed from the Masking layer."""
    K = keras_module("tf_keras")
    x = K.Input((6, 4))
    model = K.Model(x, make(K)(K.layers.Masking(0.0)(x)))
    randomize(model)
    data = np.random.default_rng(8).normal(size=(3, 6, 4)).astype("float32")
    data[0, :2] = data[1, 3] = data[2, 4:] = 0.0
    got, _ = emit_and_run(model, [data], 17)
    assert_matches(got, check_batch.run(model, [data]), 1e-3)


def test_transformer_block_exports_natively_with_the_check(tmp_path):
    """Attention, LayerNorm, a GELU given as a function, an LSTM: native, checked, no fallback."""
    from bnconvert import export_onnx

    x = keras.Input((None, 8))
    y = keras.layers.Dense(16)(x)
    y = keras.layers.LayerNormalization()(y + keras.layers.MultiHeadAttention(2, 8)(y, y))
    y = keras.layers.Dense(16, activation=lambda t: keras.activations.gelu(t))(y)
    y = keras.layers.LSTM(6, return_sequences=True)(y)
    model = keras.Model(x, keras.layers.GlobalAveragePooling1D()(y))
    randomize(model)
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.exporter == "native" and result.checked
    arrays = inputs_for(model, Case("block", None, shapes=((11, 8),)))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: arrays[0]})
    assert_matches(got, check_batch.run(model, arrays), 1e-3)


@pytest.mark.parametrize("kind, mode", [("Dense", "int4"), ("Dense", "float8"),
                                        ("Embedding", "int4")])  # Keras has no float8 Embedding
def test_other_quantization_modes_are_refused_by_name(kind, mode):
    """Only int8 is computed exactly; every other mode is refused, naming the mode."""
    from bnconvert.onnx.graph import Uncovered

    model = _quantized(kind, mode)(keras)
    arrays = inputs_for(model, Case(kind, None, kinds=("index",) if kind == "Embedding" else ()))
    with pytest.raises(Uncovered, match=f"quantization mode '{mode}'"):
        emit_and_run(model, arrays, 17)


def test_conv_lstm_with_a_mask_is_refused_by_name():
    """ONNX's unrolled ConvLSTM has no per-row step select: a masked input is refused."""
    from bnconvert.onnx.graph import Uncovered

    x = keras.Input((3, 4, 4, 2))
    y = keras.layers.ConvLSTM2D(2, 3, padding="same")(keras.layers.Masking()(x))
    with pytest.raises(Uncovered, match="ConvLSTM2D: a mask"):
        emit_and_run(keras.Model(x, y), [np.ones((2, 3, 4, 4, 2), "float32")], 17)
