"""BatchNormalization folding: exact where it should be, refused where not.

The reference is always the original, unfolded model run on the same
input; BN statistics, gamma and beta are randomized so that a fold on
the wrong kernel axis cannot pass.
"""

import keras
import numpy as np
import pytest

import bnconvert
from bnconvert import flavour as flavour_lib
from bnconvert.fold import fold_model
from bnconvert.report import ConversionReport
from bnconvert.rules import load_rules

L = keras.layers
RTOL = 1e-5


@pytest.fixture(scope="module")
def fold_rules():
    return load_rules().fold_rules


def randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            values = {
                "gamma": rng.uniform(0.5, 2.0, n),
                "beta": rng.normal(0.0, 1.0, n),
                "moving_mean": rng.normal(0.0, 2.0, n),
                "moving_variance": rng.uniform(0.2, 3.0, n),
            }
            for var in layer.weights:
                var.assign(values[var.name].astype("float32"))
        for var in getattr(layer, "weights", []):
            if var.name == "bias" and not isinstance(layer, L.BatchNormalization):
                var.assign(rng.normal(0.0, 1.0, var.shape).astype("float32"))


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def bn_count(model):
    return sum(isinstance(layer, L.BatchNormalization) for layer in _all_layers(model))


def assert_same_outputs(original, folded, x):
    # predict() runs the traced graph, as the ONNX export does.
    want = original.predict(x, verbose=0).astype(np.float64)
    got = folded.predict(x, verbose=0).astype(np.float64)
    assert got.shape == want.shape
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel <= RTOL, rel


def run_fold(model, fold_rules):
    """Folds a copy of `model` (folding rewrites the model it is given)."""
    report = ConversionReport(direction="inference")
    copy = flavour_lib.get("keras3").fresh_copy(model)
    folded = fold_model(copy, fold_rules, report)
    assert folded is copy
    return folded, report


# kind -> (constructor, channels_last input shape, rule that should fire)
PRODUCERS = {
    "Conv1D": (lambda **kw: L.Conv1D(4, 3, **kw), (7, 3), "bn-into-conv"),
    "Conv2D": (lambda **kw: L.Conv2D(5, 3, **kw), (6, 6, 3), "bn-into-conv"),
    "Conv2D-groups": (lambda **kw: L.Conv2D(6, 3, groups=3, **kw), (6, 6, 3), "bn-into-conv"),
    "Conv3D": (lambda **kw: L.Conv3D(4, 2, **kw), (4, 4, 4, 2), "bn-into-conv"),
    "DepthwiseConv1D": (
        lambda **kw: L.DepthwiseConv1D(3, depth_multiplier=2, **kw), (7, 3),
        "bn-into-depthwise-conv"),
    "DepthwiseConv2D": (
        lambda **kw: L.DepthwiseConv2D(3, depth_multiplier=3, **kw), (6, 6, 2),
        "bn-into-depthwise-conv"),
    "Conv1DTranspose": (
        lambda **kw: L.Conv1DTranspose(5, 3, **kw), (6, 3), "bn-into-conv-transpose"),
    "Conv2DTranspose": (
        lambda **kw: L.Conv2DTranspose(5, 3, strides=2, **kw), (4, 4, 3),
        "bn-into-conv-transpose"),
    "Conv3DTranspose": (
        lambda **kw: L.Conv3DTranspose(5, 2, **kw), (3, 3, 3, 2), "bn-into-conv-transpose"),
    "SeparableConv1D": (
        lambda **kw: L.SeparableConv1D(4, 3, depth_multiplier=2, **kw), (7, 3),
        "bn-into-separable-conv"),
    "SeparableConv2D": (
        lambda **kw: L.SeparableConv2D(5, 3, depth_multiplier=2, **kw), (6, 6, 3),
        "bn-into-separable-conv"),
}


def _case(kind, use_bias, data_format):
    make, shape, rule = PRODUCERS[kind]
    if data_format == "channels_first":
        shape = (shape[-1],) + shape[:-1]
    axis = 1 if data_format == "channels_first" else -1
    inputs = keras.Input(shape)
    y = make(use_bias=use_bias, data_format=data_format, name="producer")(inputs)
    y = L.BatchNormalization(axis=axis, epsilon=1e-3, name="bn")(y)
    model = keras.Model(inputs, y)
    randomize_bn(model)
    return model, shape, rule


# Every one of these runs on CPU with TensorFlow in Keras 3.15 (Keras
# transposes channels_first convolutions itself). Output spatial sizes are
# kept different from the channel count: with channels_first and a spatial
# size equal to `filters`, Keras 3.15 on the TF CPU backend adds the bias
# along the wrong axis in the *original* model (seen for Conv1D eagerly,
# SeparableConv1D and Conv3DTranspose under predict), so no fold can match it.
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("kind", sorted(PRODUCERS))
def test_conv_kinds_fold_exactly(kind, use_bias, data_format, fold_rules):
    model, shape, rule = _case(kind, use_bias, data_format)
    folded, report = run_fold(model, fold_rules)

    assert bn_count(folded) == 0
    producer = folded.get_layer("producer")
    assert type(producer) is type(model.get_layer("producer"))
    assert producer.use_bias
    (event,) = report.events
    assert (event.path, event.action, event.rule) == (f"{model.name}/bn", "folded", rule)
    x = np.random.default_rng(1).normal(size=(3,) + shape).astype("float32")
    assert_same_outputs(model, folded, x)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("rank", [2, 3])
def test_dense_folds_exactly(rank, use_bias, fold_rules):
    shape = (6,) if rank == 2 else (4, 6)
    inputs = keras.Input(shape)
    y = L.Dense(5, use_bias=use_bias, name="producer")(inputs)
    y = L.BatchNormalization(name="bn")(y)
    model = keras.Model(inputs, y)
    randomize_bn(model)

    folded, report = run_fold(model, fold_rules)

    assert bn_count(folded) == 0
    assert report.events[0].action == "folded"
    x = np.random.default_rng(2).normal(size=(3,) + shape).astype("float32")
    assert_same_outputs(model, folded, x)


def test_folded_weights_match_float64_algebra(fold_rules):
    """One case against the formula, computed here in NumPy float64."""
    model, _, _ = _case("Conv2D", True, "channels_last")
    folded, _ = run_fold(model, fold_rules)
    conv, bn = model.get_layer("producer"), model.get_layer("bn")
    w, b = (v.numpy().astype(np.float64) for v in (conv.kernel, conv.bias))
    gamma, beta, mean, var = (
        v.numpy().astype(np.float64)
        for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    )
    s = gamma / np.sqrt(var + 1e-3)
    new = folded.get_layer("producer")
    np.testing.assert_allclose(new.kernel.numpy(), w * s, rtol=1e-6)
    np.testing.assert_allclose(new.bias.numpy(), (b - mean) * s + beta, rtol=1e-6, atol=1e-6)


def test_original_model_is_not_modified(fold_rules):
    model, shape, _ = _case("Conv2D", False, "channels_last")
    before = [w.copy() for w in model.get_weights()]
    folded, report = bnconvert.convert_model(model, to="inference", return_report=True)
    assert report.folded == 1 and bn_count(folded) == 0
    assert bn_count(model) == 1
    assert not model.get_layer("producer").use_bias
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def _kept_reason(model, fold_rules, bn_name="bn"):
    folded, report = run_fold(model, fold_rules)
    (event,) = [e for e in report.events if e.path.endswith(bn_name)]
    assert event.action == "kept"
    assert event.class_after == "BatchNormalization"
    assert bn_count(folded) == bn_count(model)
    return folded, event.reason


def test_relu_producer_is_not_folded(fold_rules):
    inputs = keras.Input((6, 6, 3))
    y = L.Conv2D(4, 3, activation="relu", name="producer")(inputs)
    y = L.BatchNormalization(name="bn")(y)
    model = keras.Model(inputs, y)
    randomize_bn(model)
    folded, reason = _kept_reason(model, fold_rules)
    assert "nonlinear activation 'relu'" in reason
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 3)).astype("float32")
    assert_same_outputs(model, folded, x)


def test_output_used_twice_is_not_folded(fold_rules):
    inputs = keras.Input((6, 6, 3))
    c = L.Conv2D(4, 3, name="producer")(inputs)
    y = L.Add()([L.BatchNormalization(name="bn")(c), L.ReLU()(c)])
    model = keras.Model(inputs, y)
    randomize_bn(model)
    folded, reason = _kept_reason(model, fold_rules)
    assert "used 2 times" in reason
    x = np.random.default_rng(4).normal(size=(2, 6, 6, 3)).astype("float32")
    assert_same_outputs(model, folded, x)


def test_producer_that_is_also_a_model_output_is_not_folded(fold_rules):
    inputs = keras.Input((5,))
    d = L.Dense(4, name="producer")(inputs)
    model = keras.Model(inputs, [d, L.BatchNormalization(name="bn")(d)])
    _, reason = _kept_reason(model, fold_rules)
    assert "used 2 times" in reason


@pytest.mark.parametrize("data_format,axis", [("channels_last", 1), ("channels_first", -1)])
def test_bn_on_another_axis_is_not_folded(data_format, axis, fold_rules):
    inputs = keras.Input((4, 6, 6) if data_format == "channels_first" else (6, 6, 4))
    y = L.Conv2D(4, 3, data_format=data_format, name="producer")(inputs)
    y = L.BatchNormalization(axis=axis, name="bn")(y)
    model = keras.Model(inputs, y)
    randomize_bn(model)
    folded, reason = _kept_reason(model, fold_rules)
    assert "normalizes axis" in reason
    x = np.random.default_rng(5).normal(size=(2,) + tuple(inputs.shape[1:])).astype("float32")
    assert_same_outputs(model, folded, x)


def test_producer_without_rule_and_model_input_are_kept(fold_rules):
    inputs = keras.Input((6,))
    y = L.BatchNormalization(name="bn_in")(inputs)
    y = L.LayerNormalization(name="ln")(y)
    y = L.BatchNormalization(name="bn")(y)
    model = keras.Model(inputs, y)
    _, reason = _kept_reason(model, fold_rules, "bn_in")
    assert "model input" in reason
    _, reason = _kept_reason(model, fold_rules, "bn")
    assert "no fold rule" in reason


def test_shared_producer_is_not_folded(fold_rules):
    a, b = keras.Input((5,), name="a"), keras.Input((5,), name="b")
    dense = L.Dense(4, name="producer")
    y = L.Add()([L.BatchNormalization(name="bn")(dense(a)), dense(b)])
    model = keras.Model([a, b], y)
    _, reason = _kept_reason(model, fold_rules)
    assert "called more than once" in reason


def test_bn_called_in_training_mode_is_not_folded(fold_rules):
    inputs = keras.Input((5,))
    y = L.Dense(4, name="producer")(inputs)
    y = L.BatchNormalization(name="bn")(y, training=True)
    _, reason = _kept_reason(keras.Model(inputs, y), fold_rules)
    assert "training=True" in reason


def test_user_subclass_with_a_keras_name_is_not_folded(fold_rules):
    class Conv2D(L.Conv2D):  # behaves differently from keras.layers.Conv2D
        def call(self, x):
            return super().call(x) * 2.0

    inputs = keras.Input((6, 6, 3))
    y = L.BatchNormalization(name="bn")(Conv2D(4, 3, name="producer")(inputs))
    _, reason = _kept_reason(keras.Model(inputs, y), fold_rules)
    assert "no fold rule" in reason


def test_sequential(fold_rules):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3), name="image"),
            L.Conv2D(4, 3, use_bias=False, name="conv"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.DepthwiseConv2D(3, name="dw", activation="relu"),
            L.BatchNormalization(name="bn2"),
            L.Flatten(),
            L.Dense(3, name="dense"),
            L.BatchNormalization(name="bn3"),
        ],
        name="seq",
    )
    randomize_bn(model)
    folded, report = run_fold(model, fold_rules)

    assert isinstance(folded, keras.Sequential)
    assert folded.name == "seq"
    assert [e.action for e in report.events] == ["folded", "kept", "folded"]
    kept = [layer.name for layer in folded.layers if isinstance(layer, L.BatchNormalization)]
    assert kept == ["bn2"]
    x = np.random.default_rng(6).normal(size=(2, 8, 8, 3)).astype("float32")
    assert_same_outputs(model, folded, x)


def test_nested_models(fold_rules):
    inner_seq = keras.Sequential(
        [keras.Input((6, 6, 4)), L.Conv2D(4, 1, name="c"), L.BatchNormalization(name="bn")],
        name="block_seq",
    )
    i = keras.Input((6, 6, 4))
    j = L.BatchNormalization(name="bn_on_input")(i)
    j = L.SeparableConv2D(4, 3, padding="same", name="sep")(j)
    j = L.BatchNormalization(name="bn")(j)
    inner_fn = keras.Model(i, L.BatchNormalization(name="bn_after_add")(j + i), name="block_fn")

    inputs = keras.Input((6, 6, 3), name="image")
    y = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    y = L.BatchNormalization(name="stem_bn")(y)
    y = inner_fn(inner_seq(y))
    # Right after a nested model: the producer is not a foldable layer.
    y = L.BatchNormalization(name="after_block")(y)
    y = L.Conv2D(2, 1, name="head")(y)
    y = L.BatchNormalization(name="head_bn")(y)
    model = keras.Model(inputs, y, name="outer")
    randomize_bn(model)

    folded, report = run_fold(model, fold_rules)

    actions = {e.path: e.action for e in report.events}
    assert actions == {
        "outer/stem_bn": "folded",
        "outer/block_seq/bn": "folded",
        "outer/block_fn/bn_on_input": "kept",
        "outer/block_fn/bn": "folded",
        "outer/block_fn/bn_after_add": "kept",
        "outer/after_block": "kept",
        "outer/head_bn": "folded",
    }
    assert bn_count(folded) == 3
    assert folded.input.name == "image"
    x = np.random.default_rng(7).normal(size=(2, 6, 6, 3)).astype("float32")
    assert_same_outputs(model, folded, x)


def test_folded_model_saves_and_reloads(tmp_path, fold_rules):
    model, shape, _ = _case("SeparableConv2D", False, "channels_last")
    folded, _ = run_fold(model, fold_rules)
    path = tmp_path / "folded.keras"
    folded.save(path)
    reloaded = keras.saving.load_model(path)
    x = np.random.default_rng(8).normal(size=(2,) + shape).astype("float32")
    assert_same_outputs(model, reloaded, x)


def test_unknown_layout_is_rejected():
    from bnconvert.errors import ConversionError
    from bnconvert.rules import FoldRule

    model, _, _ = _case("Conv1D", True, "channels_last")
    with pytest.raises(ConversionError, match="unknown layout"):
        fold_model(model, (FoldRule("odd", ("Conv1D",), "diagonal"),), None)
