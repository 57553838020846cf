"""The native exporter's graph rewrites for speed (`bnconvert.onnx.peephole`).

Each model is exported natively, run in onnxruntime on a batch and a
spatial size other than the export check's, and compared with the Keras
model (or NumPy float64); the ONNX graph is checked for the shape the
rewrite gives it (what onnxruntime then runs faster).
"""

import keras
import pytest
import numpy as np
import onnx
import onnxruntime as ort

from bnconvert import export_onnx
from bnconvert.onnx import peephole
from bnconvert.onnx.graph import Graph

L = keras.layers


def _export(model, tmp_path):
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, exporter="native")
    return path, onnx.load(path)


def _run(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _randomized(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights and not isinstance(layer, L.Normalization):
            layer.set_weights([rng.normal(0, 0.3, w.shape) for w in layer.get_weights()])
    return model


def test_input_preprocessing_runs_channels_first_as_one_add(tmp_path):
    mean, variance = np.array([0.4, 0.5, 0.6]), np.array([0.05, 0.07, 0.09])
    x = L.Input((None, None, 3))
    y = L.Rescaling(1 / 255)(x)
    y = L.Normalization(mean=mean, variance=variance)(y)
    y = L.Conv2D(4, 3, strides=2, padding="same")(y)
    model = _randomized(keras.Model(x, y))
    path, proto = _export(model, tmp_path)
    # The per-channel shift runs over NCHW planes, after the layout change; the
    # scale went into the convolution's weights.
    assert _ops(proto)[:3] == ["Transpose", "Add", "Conv"] and "Mul" not in _ops(proto)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    assert shapes[proto.graph.node[1].input[1]] == (1, 3, 1, 1)
    data = np.random.default_rng(1).uniform(-50, 300, (2, 10, 14, 3)).astype("float32")
    expected = np.asarray(model(data))
    np.testing.assert_allclose(_run(path, data)[0], expected, rtol=1e-4, atol=1e-4)


def test_merged_shift_keeps_the_digits_of_data_far_from_zero(tmp_path):
    # mean 1000, std 0.01: x * (1/std) - mean/std would cancel five digits.
    mean, variance = np.array([1000.0, -2000.0]), np.array([1e-4, 4e-4])
    x = L.Input((5, 5, 2))
    y = L.Rescaling(1.0, offset=0.0)(x)
    y = L.Normalization(mean=mean, variance=variance)(y)
    y = L.MaxPooling2D(2)(y)
    model = keras.Model(x, y)
    path, proto = _export(model, tmp_path)
    assert "Sub" not in _ops(proto) and "Div" not in _ops(proto)
    rng = np.random.default_rng(2)
    data = (mean + np.sqrt(variance) * rng.normal(size=(3, 5, 5, 2))).astype("float32")
    normalized = (data.astype(np.float64) - mean) / np.sqrt(variance)
    expected = normalized[:, :4, :4].reshape(3, 2, 2, 2, 2, 2).max(axis=(2, 4))
    np.testing.assert_allclose(_run(path, data)[0], expected, rtol=0, atol=1e-3)


def test_squeeze_excite_keeps_the_pooled_tensor(tmp_path):
    x = L.Input((None, None, 6))
    y = L.Conv2D(6, 3, padding="same", activation="swish")(x)
    s = L.GlobalAveragePooling2D()(y)
    s = L.Reshape((1, 1, 6))(s)
    s = L.Conv2D(2, 1, activation="swish")(s)
    s = L.Conv2D(6, 1, activation="sigmoid")(s)
    model = _randomized(keras.Model(x, L.Multiply()([y, s])))
    path, proto = _export(model, tmp_path)
    assert "Flatten" not in _ops(proto) and "Reshape" not in _ops(proto)
    data = np.random.default_rng(3).normal(0, 3, (2, 7, 9, 6)).astype("float32")
    np.testing.assert_allclose(_run(path, data)[0], np.asarray(model(data)),
                               rtol=1e-4, atol=1e-5)


def test_rewrites_leave_shared_tensors_alone(tmp_path):
    # The rescaled input is an output too, and the pooled vector feeds a Dense:
    # neither the transpose nor the flatten may move away from them.
    x = L.Input((6, 6, 3))
    r = L.Rescaling(0.5, offset=-1.0)(x)
    y = L.Conv2D(4, 3)(L.Rescaling(2.0)(r))
    p = L.GlobalAveragePooling2D()(y)
    head = L.Dense(3)(p)
    back = L.Conv2D(4, 1)(L.Reshape((1, 1, 4))(p))
    model = _randomized(keras.Model(x, [r, head, back]))
    path, proto = _export(model, tmp_path)
    assert "Flatten" in _ops(proto)
    data = np.random.default_rng(4).normal(0, 5, (3, 6, 6, 3)).astype("float32")
    for got, want in zip(_run(path, data), model(data)):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)


def test_tensors_read_only_inside_a_subgraph_are_kept():
    g = Graph(17)
    scaled = g.node("Mul", ["x", g.constant(np.full(3, 3.0), "three")], "scaled")
    shifted = g.node("Add", [scaled, g.scalar(1.0)], "shifted")
    branches = {}
    for name, op in (("then_branch", "Mul"), ("else_branch", "Sub")):
        body = onnx.helper.make_node(op, [shifted, scaled], [f"{name}_out"])
        branches[name] = onnx.helper.make_graph(
            [body], name, [], [onnx.helper.make_tensor_value_info(f"{name}_out", 1, [3])])
    g.node("If", ["flag"], "y", output_names=["y"], **branches)
    peephole.optimize(g, {"x": (3,), "flag": ()}, ["y"], {})
    model = g.model("m", [("x", (3,)), ("flag", (), onnx.TensorProto.BOOL)], [("y", (3,))],
                    "test")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([1.5, -2.0, 4.0], np.float32)
    for flag, want in ((True, (3 * x + 1) * (3 * x)), (False, 1.0)):
        got = session.run(None, {"x": x, "flag": np.array(flag)})[0]
        np.testing.assert_allclose(got, np.broadcast_to(want, (3,)), rtol=1e-6)


def test_a_scale_before_a_convolution_goes_into_its_weights(tmp_path):
    # Scalar, per-channel, and into a depthwise (grouped) convolution, "same"-padded;
    # both branches read one transpose of the input.
    x = L.Input((None, None, 3))
    a = L.Conv2D(4, 3, padding="same")(L.Rescaling(1 / 127.5, offset=-1.0)(x))
    b = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(
        L.Rescaling([0.5, 2.0, -3.0])(x))
    model = _randomized(keras.Model(x, [a, b]))
    path, proto = _export(model, tmp_path)
    assert sorted(_ops(proto)) == ["Add", "Conv", "Conv", "Transpose", "Transpose",
                                   "Transpose"]  # the input's, and one per output
    data = np.random.default_rng(5).uniform(0, 255, (2, 9, 6, 3)).astype("float32")
    for got, want in zip(_run(path, data), model(data)):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_a_scale_that_adds_channels_stays_out_of_the_weights(tmp_path):
    # One channel broadcast to three by the product: the Conv reads three.
    x = L.Input((7, 7, 1))
    scale = np.array([0.5, 2.0, -3.0], "float32").reshape(1, 1, 1, 3)
    y = L.Conv2D(2, 3, padding="same")(keras.ops.multiply(x, scale))
    model = _randomized(keras.Model(x, y))
    path, proto = _export(model, tmp_path)
    assert "Mul" in _ops(proto)
    data = np.random.default_rng(6).normal(0, 4, (2, 7, 7, 1)).astype("float32")
    np.testing.assert_allclose(_run(path, data)[0], np.asarray(model(data)), rtol=1e-4,
                               atol=1e-5)


def _pad_crop_model(case):
    """`(model, Slice expected)`: padding, then cropping and 1x1 pools that subsample."""
    if case == "shift_then_stride":  # NASNet's reduction cells, on odd and even sizes
        x = L.Input((11, 12, 5))
        y = L.ZeroPadding2D(((0, 1), (0, 1)))(x)
        y = L.Cropping2D(((1, 0), (1, 0)))(y)
        y = L.Conv2D(4, 1)(L.AveragePooling2D(1, strides=2)(y))
        return keras.Model(x, y), True
    if case == "pad_and_crop":  # one Pad: +1 and -1 rows, -2 and +3 columns
        x = L.Input((7, 9, 3))
        y = L.ZeroPadding2D(((2, 1), (0, 3)))(x)
        y = L.Cropping2D(((1, 2), (2, 0)))(y)
        return keras.Model(x, L.Conv2D(2, 3)(y)), False
    x = L.Input((10, 8, 4))  # a max over one pixel, every third row and column
    y = L.MaxPooling2D(1, strides=3)(L.ZeroPadding2D(((2, 1), (1, 1)))(x))
    return keras.Model(x, L.Conv2D(3, 1)(y)), True


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("case", ["shift_then_stride", "pad_and_crop", "pad_then_stride"])
def test_cropping_after_padding_pads_only_what_is_left(tmp_path, case, opset):
    model, sliced = _pad_crop_model(case)
    model = _randomized(model)
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, exporter="native", opset=opset)
    proto = onnx.load(path)
    ops = _ops(proto)
    # The Pad reads the input's layout change and feeds no Slice or pool any more.
    producer = {out: n.op_type for n in proto.graph.node for out in n.output}
    pad = [n for n in proto.graph.node if n.op_type == "Pad"]
    assert len(pad) == 1 and "AveragePool" not in ops and "MaxPool" not in ops
    assert producer[pad[0].input[0]] == ("Slice" if sliced else "Transpose")
    assert ops.count("Slice") == int(sliced)
    data = np.random.default_rng(7).normal(-20, 40, (3,) + model.input_shape[1:])
    data = data.astype("float32")
    np.testing.assert_allclose(_run(path, data)[0], np.asarray(model(data)), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@pytest.mark.parametrize("size, pool", [(None, 3), (9, 3), (None, 1)])
def test_zero_padding_before_max_pooling_stays_zero_padding(tmp_path, opset, size, pool):
    # onnxruntime folds a zero Pad into a MaxPool's pads, which it treats as
    # -inf: on all-negative windows it returned their maximum, not the 0 of
    # Keras's padding (3.7 off), and for a 1-entry window it refused the
    # graph (pads not smaller than the window).
    x = L.Input((size, size, 3))
    y = L.MaxPooling2D(pool, strides=1 if pool == 3 else 3)(L.ZeroPadding2D(1)(x))
    model = keras.Model(x, y)
    path = str(tmp_path / "m.onnx")
    result = export_onnx(model, path, exporter="native", opset=opset, check=False)
    assert result.exporter == "native"
    data = np.random.default_rng(2).normal(-3, 1, (2, 9, 9, 3)).astype("float32")
    np.testing.assert_array_equal(_run(path, data)[0], np.asarray(model(data)))


def test_zero_padding_after_relu_is_left_to_onnxruntime_to_fold(tmp_path):
    # After a ReLU the padding is never above a window's maximum: the fusion
    # is exact there (ResNet50's stem), and saves a copy of the tensor.
    x = L.Input((None, None, 3))
    y = L.Conv2D(4, 3, activation="relu")(x)
    y = L.MaxPooling2D(3, strides=2)(L.ZeroPadding2D(1)(y))
    model = _randomized(keras.Model(x, y))
    path, proto = _export(model, tmp_path)
    assert "Reshape" not in _ops(proto)
    pads = [n for n in proto.graph.node if n.op_type == "Pad"]
    assert len(pads) == 1 and len(pads[0].input) <= 3
    data = np.random.default_rng(3).normal(0, 2, (3, 11, 13, 3)).astype("float32")
    np.testing.assert_allclose(_run(path, data)[0], np.asarray(model(data)), rtol=1e-5,
                               atol=1e-5)


def _stem_model(case):
    """`(model, rewritten)`: a convolution of the input image, after what it may pass."""
    if case == "rescale_pad":  # MobileNet's rescaling, ResNet's padding, uneven everything
        x = L.Input((11, 13, 3))
        y = L.ZeroPadding2D(((1, 2), (3, 0)))(L.Rescaling(1 / 127.5, offset=-1.0)(x))
        return keras.Model(x, L.Conv2D(5, (3, 4), strides=(2, 3), activation="relu")(y)), True
    if case == "same_four_channels":
        x = L.Input((9, 8, 4))
        return keras.Model(x, L.Conv2D(6, 3, strides=2, padding="same")(x)), True
    x = L.Input((9, 8, 3))  # dilated: left as it was
    return keras.Model(x, L.Conv2D(2, 3, dilation_rate=2)(x)), False


@pytest.mark.parametrize("case", ["rescale_pad", "same_four_channels", "dilated"])
def test_the_stem_convolution_reads_the_channels_last_image(tmp_path, case):
    model, rewritten = _stem_model(case)
    model = _randomized(model)
    path, proto = _export(model, tmp_path)
    first = [n for n in proto.graph.node if n.op_type == "Conv"][0]
    producer = {out: n.op_type for n in proto.graph.node for out in n.output}
    assert producer[first.input[0]] == ("Reshape" if rewritten else "Transpose")
    assert "Pad" not in _ops(proto)  # ZeroPadding2D went into the convolution's pads
    data = np.random.default_rng(8).uniform(0, 255, (3,) + model.input_shape[1:])
    data = data.astype("float32")
    np.testing.assert_allclose(_run(path, data)[0], np.asarray(model(data)), rtol=1e-4,
                               atol=1e-3)
    # An empty batch keeps its shape through the reshape.
    assert _run(path, data[:0])[0].shape == (0,) + model.output_shape[1:]


@pytest.mark.parametrize("pool, bias", [("average", True), ("max", False)])
def test_a_dense_after_global_pooling_runs_as_a_1x1_convolution(tmp_path, pool, bias):
    x = L.Input((None, None, 5))
    y = L.Conv2D(6, 3)(x)
    pooled = (L.GlobalAveragePooling2D() if pool == "average" else L.GlobalMaxPooling2D())(y)
    head = L.Dense(4, activation="relu", use_bias=bias)(pooled)
    # The pooled vector is an output too: the rewrite reads the pool, not the Flatten.
    model = _randomized(keras.Model(x, [L.Dense(3)(head), pooled]))
    path, proto = _export(model, tmp_path)
    assert _ops(proto).count("Gemm") == 1 and _ops(proto).count("Conv") == 2  # Dense(3) stays
    data = np.random.default_rng(9).normal(-3, 10, (2, 8, 11, 5)).astype("float32")
    for got, want in zip(_run(path, data), model(data)):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


def _strided_block(case):
    """A ResNet stage's first block on the previous block's output, as Keras builds it."""
    x = L.Input((None, None, 8))
    shortcut = L.Conv2D(16, 1)(x)  # a 1x1 convolution the subsampling moves above
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(x)))
    h = L.BatchNormalization()(L.Conv2D(16, 1)(h))
    y = L.ReLU()(L.Add()([shortcut, h]))
    first = L.ReLU()(L.Conv2D(8 if case != "few_outputs" else 4, 1, strides=2)(y))
    projection = L.Conv2D(32 if case != "few_outputs" else 4, 1, strides=2, padding="same")(y)
    outputs = [L.Add()([L.Conv2D(projection.shape[-1], 1)(first), projection])]
    if case == "full_resolution_read":
        outputs.append(L.Conv2D(3, 3)(y))
    if case == "strided_twice":  # a strided 1x1 convolution reading another one
        z = L.ReLU()(L.Conv2D(8, 3)(x))
        outputs.append(L.Conv2D(64, 1, strides=2)(L.Conv2D(32, 1, strides=(1, 2))(z)))
    model = _randomized(keras.Model(x, outputs))
    rng = np.random.default_rng(10)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 1, n),
                               rng.normal(0, 1, n), rng.uniform(0.5, 2, n)])
    return model


@pytest.mark.parametrize("case", ["resnet", "few_outputs", "full_resolution_read",
                                  "strided_twice"])
def test_strided_1x1_convolutions_read_a_subsampled_tensor(tmp_path, case):
    model = _strided_block(case)
    path, proto = _export(model, tmp_path)
    strides = [a.ints[:] for n in proto.graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "strides"]
    pools = [n for n in proto.graph.node if n.op_type == "AveragePool"]
    if case == "strided_twice":  # the first one pooled after, the 3x3 one before it strided
        assert len(pools) == 2 and sorted(strides) == [[1, 1]] * 7 + [[1, 2], [2, 2]]
    elif case == "resnet":
        # Pooled: the input, read by two convolutions; the 3x3 convolution computes
        # only the pixels the 1x1 one, and the add, now read subsampled.
        assert len(pools) == 1 and sorted(strides) == [[1, 1]] * 5 + [[2, 2]]
        assert all(onnx.helper.get_attribute_value(a) in ([1, 1], [2, 2])
                   for n in pools for a in n.attribute if a.name in ("kernel_shape", "strides"))
    else:  # too few outputs to pay for the pooling; the full tensor read by another layer
        assert not pools and strides.count([2, 2]) == 2
    # Odd sizes: the last row and column are read (and not a row past them).
    data = np.random.default_rng(11).normal(-5, 20, (3, 13, 11, 8)).astype("float32")
    wanted = model(data)
    for got, want in zip(_run(path, data), wanted if isinstance(wanted, list) else [wanted]):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-3)


def test_subsampling_keeps_infinities_and_nans(tmp_path):
    x = L.Input((None, None, 16))
    convs = [L.Conv2D(16, 1, strides=2), L.Conv2D(24, 1, strides=2, use_bias=False)]
    model = _randomized(keras.Model(x, [conv(x) for conv in convs]))
    path, proto = _export(model, tmp_path)
    assert _ops(proto) == ["Transpose", "AveragePool", "Conv", "Conv", "Transpose", "Transpose"]
    data = np.random.default_rng(12).normal(0, 3, (2, 7, 9, 16))
    data[0, 0, 0, 3], data[0, 2, 4, 5], data[1, 6, 8, 0] = -np.inf, np.inf, np.nan
    data = data.astype("float32")
    for got, conv in zip(_run(path, data), convs):
        kernel, *bias = conv.get_weights()
        want = np.einsum("bhwc,co->bhwo", data[:, ::2, ::2].astype(np.float64), kernel[0, 0])
        want = want + (bias[0] if bias else 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert np.isneginf(got[0, 0, 0]).any() and np.isnan(got[1, 3, 4]).all()
