"""Keras 3 tests of bnconvert.convert: model kinds, carried state, report, verification.

The cases both flavours share (Sequential, nested, shared, several
inputs/outputs, frozen, renorm, synchronized BN, round trip, idempotence,
BN subclasses, rule files, paths, a NumPy reference) are in the table of
`tests/test_flavours.py`; this file keeps what is Keras 3's own or goes
deeper: subclassed models and custom layers, deeper nesting, dict inputs,
regularizers and constraints, mixed precision, the report's JSON, weights
created from the originals' values. The reference for outputs is always
the original model; weights are compared bit for bit with the originals.
"""

import json

import keras
import numpy as np
import pytest

import bnconvert
from bnconvert import convert
from bnconvert import errors
from bnconvert import flavour as flavour_lib
from bnconvert import keras_internals
from bnconvert import walk


def _flatten(layer):
    """`layer` and every layer below it, each once (InputLayers aside)."""
    found = walk.iter_layers(layer, flavour_lib.flavour_of(layer))
    return [layer] + [sub for _, sub in found]

BN = keras.layers.BatchNormalization
SYNC = bnconvert.SyncBatchNormalization

# -- helpers -------------------------------------------------------------


def norm_layers(model):
    """Every BN-family layer below `model` (each once), in walk order."""
    return [l for l in _flatten(model) if isinstance(l, BN)]


def randomize(model, seed=0):
    """Random gamma, beta and moving statistics, so a wrong carry shows."""
    rng = np.random.default_rng(seed)
    for layer in norm_layers(model):
        for v in layer.weights:
            name = v.name
            shape = tuple(v.shape)
            if name in ("moving_variance",):
                value = rng.uniform(0.3, 3.0, shape)
            elif name in ("moving_stddev", "renorm_stddev"):
                value = rng.uniform(0.5, 2.0, shape)
            else:
                value = rng.normal(0.0, 2.0, shape)
            v.assign(value.astype(v.dtype))
    return model


def snapshot(model):
    return [(v.path, np.array(v.numpy(), copy=True)) for v in model.weights]


def assert_snapshot_equal(before, model):
    after = snapshot(model)
    assert [p for p, _ in before] == [p for p, _ in after]
    for (p, a), (_, b) in zip(before, after):
        np.testing.assert_array_equal(a, b, err_msg=p)


def outputs(model, x):
    return [np.asarray(o, dtype=np.float64)
            for o in keras.tree.flatten(model(x, training=False))]


def assert_same_outputs(a, b, x, atol=1e-6):
    oa, ob = outputs(a, x), outputs(b, x)
    assert len(oa) == len(ob)
    for u, v in zip(oa, ob):
        assert u.shape == v.shape
        np.testing.assert_allclose(v, u, rtol=0, atol=atol)


def bn_weights_by_name(model):
    return {
        l.name: [np.array(v.numpy()) for v in l.weights] for l in norm_layers(model)
    }


def assert_bn_carried(original, converted, cls):
    """Every BN became `cls`, with bit-identical weights, and nothing else."""
    old = bn_weights_by_name(original)
    new_layers = norm_layers(converted)
    assert sorted(l.name for l in new_layers) == sorted(old)
    for layer in new_layers:
        assert type(layer) is cls, layer.name
        got = [np.array(v.numpy()) for v in layer.weights]
        assert len(got) == len(old[layer.name])
        for a, b in zip(old[layer.name], got):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def check_conversion(model, x, *, expected_converted):
    """Converts to sync and back, checking everything the brief promises."""
    randomize(model)
    before = snapshot(model)
    reference = outputs(model, x)
    synced, report = bnconvert.convert_model(model, "sync", return_report=True)
    assert synced is not model
    assert report.converted == expected_converted
    assert report.verified and report.max_abs_diff <= 1e-6
    assert_bn_carried(model, synced, SYNC)
    assert_same_outputs(model, synced, x)
    # The original is untouched and still usable.
    assert_snapshot_equal(before, model)
    assert all(type(l) is BN for l in norm_layers(model))
    for a, b in zip(reference, outputs(model, x)):
        np.testing.assert_array_equal(a, b)
    # Every weight of every layer carries over, not only BN's.
    assert len(synced.weights) == len(model.weights)
    # In model order: the copy is made by Keras's own save and load, which
    # may scope variable paths differently but keeps the layer structure.
    for a, b in zip(model.weights, synced.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    back = bnconvert.convert_model(synced, "inference", fold=False)
    assert_bn_carried(model, back, BN)
    assert_same_outputs(model, back, x)
    return synced, report


def dense_bn(units, name=None):
    return [keras.layers.Dense(units), BN(name=name)]


X8 = np.random.default_rng(42).normal(size=(5, 8)).astype("float32")

# -- model kinds ---------------------------------------------------------


def test_functional_inside_sequential():
    inp = keras.Input((8,))
    inner = keras.Model(inp, BN()(keras.layers.Dense(5)(inp)), name="inner")
    model = keras.Sequential([keras.Input((8,)), inner, *dense_bn(3)], name="outer")
    check_conversion(model, X8, expected_converted=2)


def test_three_levels_of_nesting():
    deepest = keras.Sequential([keras.Input((4,)), *dense_bn(4, "bn3")], name="level3")
    inp = keras.Input((4,))
    middle = keras.Model(inp, BN(name="bn2")(deepest(inp)), name="level2")
    top_in = keras.Input((8,))
    x = keras.layers.Dense(4)(top_in)
    model = keras.Model(top_in, BN(name="bn1")(middle(x)), name="level1")
    synced, report = check_conversion(model, X8, expected_converted=3)
    assert sorted(e.path for e in report.events) == [
        "level1/bn1", "level1/level2/bn2", "level1/level2/level3/bn3",
    ]
    assert isinstance(synced.get_layer("level2").get_layer("level3").get_layer("bn3"), SYNC)


def test_shared_nested_model_stays_shared():
    inner = keras.Sequential([keras.Input((8,)), *dense_bn(8, "inner_bn")], name="inner")
    inp = keras.Input((8,))
    model = keras.Model(inp, inner(inner(inp)))
    synced, _ = check_conversion(model, X8, expected_converted=1)
    assert len([l for l in synced.layers if l.name == "inner"]) == 1


def test_dict_inputs():
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    out = BN()(keras.layers.Add()([a, b]))
    model = keras.Model({"a": a, "b": b}, out)
    check_conversion(model, {"a": X8, "b": X8 * 2}, expected_converted=1)


# -- subclassed models ---------------------------------------------------


@keras.saving.register_keras_serializable(package="bnconvert_tests")
class Block(keras.layers.Layer):
    """A custom layer holding BN in an attribute."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units)
        self.bn = BN()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class Net(keras.Model):
    """BN in an attribute, a list, a dict, a tuple, a custom layer, a Sequential."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Dense(8)
        self.stem_bn = BN(momentum=0.9)
        self.blocks = [Block(8), Block(8)]
        self.heads = {"main": BN(epsilon=1e-2), "aux": keras.layers.Dense(8)}
        self.pair = (keras.layers.Dense(8), BN())
        self.tail = keras.Sequential([keras.layers.Dense(8), BN()])

    def call(self, x, training=None):
        x = self.stem_bn(self.stem(x), training=training)
        for block in self.blocks:
            x = block(x, training=training)
        x = self.heads["main"](self.heads["aux"](x), training=training)
        x = self.pair[1](self.pair[0](x), training=training)
        return self.tail(x, training=training)


def test_subclassed_model_swaps_attributes_lists_dicts():
    model = Net(name="net")
    model(X8)
    synced, report = check_conversion(model, X8, expected_converted=6)
    assert type(synced) is Net and synced is not model
    assert isinstance(synced.stem_bn, SYNC)
    assert all(isinstance(b.bn, SYNC) for b in synced.blocks)
    assert isinstance(synced.heads["main"], SYNC)
    assert isinstance(synced.pair[1], SYNC)
    assert isinstance(synced.tail.layers[1], SYNC)
    assert synced.stem_bn.momentum == pytest.approx(0.9)
    assert synced.heads["main"].epsilon == pytest.approx(1e-2)
    # Keras's own sublayer list follows the swap (weights, saving use it).
    assert synced.stem_bn in synced._layers
    assert not any(type(l) is BN for l in _flatten(synced))
    # Names are the original ones, not fresh automatic names.
    assert [l.name for l in _flatten(synced)] == [
        l.name for l in _flatten(model)
    ]
    assert synced.name == "net"
    # The converted model still trains.
    synced.compile(optimizer="sgd", loss="mse")
    synced.fit(X8, np.zeros((5, 8), "float32"), epochs=1, verbose=0)


def test_subclassed_shared_bn_stays_shared():
    class Twice(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.bn = BN()
            self.same = [self.bn]
            self.dense = keras.layers.Dense(8)

        def call(self, x, training=None):
            return self.same[0](self.dense(self.bn(x, training=training)))

    model = Twice()
    model(X8)
    synced, _ = check_conversion(model, X8, expected_converted=1)
    assert synced.bn is synced.same[0] and isinstance(synced.bn, SYNC)


def test_custom_layer_with_bn_inside_functional():
    inp = keras.Input((8,))
    model = keras.Model(inp, Block(8, name="block")(inp))
    synced, report = check_conversion(model, X8, expected_converted=1)
    assert isinstance(synced.get_layer("block").bn, SYNC)
    assert report.events[0].path.endswith("block/" + model.get_layer("block").bn.name)


def test_keras_internal_sublayer_list_is_available():
    # convert.py relies on Layer._layers and Layer._tracker (private Keras).
    block = Block(4)
    assert block.dense in block._layers and block.bn in block._layers
    assert hasattr(block._tracker, "replace_tracked_value")
    inp = keras.Input((4,))
    assert isinstance(keras.Model(inp, inp), keras_internals.keras3_functional_class())


# -- what carries over ---------------------------------------------------


def test_config_trainable_regularizer_constraint_name():
    inp = keras.Input((8,))
    frozen = BN(name="frozen", trainable=False)
    special = BN(
        name="special", momentum=0.7, epsilon=0.02, center=False,
        gamma_regularizer=keras.regularizers.L2(0.3),
        beta_regularizer=keras.regularizers.L1(0.1),
        gamma_constraint=keras.constraints.NonNeg(),
        beta_initializer="ones",
    )
    x = frozen(keras.layers.Dense(8)(inp))
    model = keras.Model(inp, special(x))
    synced, _ = check_conversion(model, X8, expected_converted=2)
    f, s = synced.get_layer("frozen"), synced.get_layer("special")
    assert not f.trainable and not f.gamma.trainable
    assert s.trainable
    assert s.momentum == pytest.approx(0.7) and s.epsilon == pytest.approx(0.02)
    assert not s.center and s.beta is None
    assert isinstance(s.gamma_regularizer, keras.regularizers.L2)
    assert s.gamma_regularizer.l2 == pytest.approx(0.3)
    assert isinstance(s.beta_regularizer, keras.regularizers.L1)
    assert isinstance(s.gamma_constraint, keras.constraints.NonNeg)
    # Regularization losses are the same numbers.
    np.testing.assert_allclose(
        sorted(float(l) for l in synced.losses), sorted(float(l) for l in model.losses)
    )


def test_frozen_nested_model_stays_frozen():
    inner = keras.Sequential([keras.Input((8,)), *dense_bn(8)], name="inner")
    inner.trainable = False
    inp = keras.Input((8,))
    model = keras.Model(inp, inner(inp))
    model.get_layer("inner").layers[0].trainable = True  # a child unfrozen again
    synced, _ = check_conversion(model, X8, expected_converted=1)
    new_inner = synced.get_layer("inner")
    assert not new_inner.trainable
    assert new_inner.layers[0].trainable and not new_inner.layers[1].trainable


def test_mixed_precision_policy(monkeypatch):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inp = keras.Input((8,))
        model = keras.Model(inp, BN(name="bn")(keras.layers.Dense(8)(inp)))
    finally:
        keras.config.set_dtype_policy(previous)
    synced, _ = check_conversion(model, X8, expected_converted=1)
    bn = synced.get_layer("bn")
    assert bn.dtype_policy.name == "mixed_float16"
    assert bn.gamma.dtype == "float32"
    assert synced(X8).dtype == "float16"


# -- report and special cases -------------------------------------------


def test_model_without_bn():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.ReLU()])
    out, report = bnconvert.convert_model(model, "sync", return_report=True)
    assert report.converted == 0 and report.events == []
    assert report.verified and report.max_abs_diff == 0.0
    assert "0 layer(s) converted" in report.summary_table()
    for a, b in zip(model.weights, out.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_report_formats():
    inp = keras.Input((8,))
    model = keras.Model(inp, BN(name="bn")(inp), name="m")
    _, report = bnconvert.convert_model(model, "sync", return_report=True)
    data = json.loads(report.to_json())
    assert data["direction"] == "sync" and data["counts"]["applied"] == 1
    assert data["events"][0] == {
        "path": "m/bn", "class_before": "BatchNormalization",
        "class_after": "SyncBatchNormalization", "rule": "bn-to-sync",
        "action": "applied",
        "reason": "weights carried: gamma, beta, moving_mean, moving_variance",
    }
    assert data["verification"]["verified"] is True
    table = report.summary_table()
    assert "m/bn" in table and "bn-to-sync" in table and "1 layer(s) converted" in table


def test_inspect_model_reports_without_converting():
    inner = keras.Sequential([keras.Input((8,)), *dense_bn(8, "inner_bn")], name="inner")
    inp = keras.Input((8,))
    model = keras.Model(inp, SYNC(name="already")(inner(inp)), name="m")
    report = bnconvert.inspect_model(model, "sync")
    assert {(e.path, e.action) for e in report.events} == {
        ("m/inner/inner_bn", "applied"), ("m/already", "unchanged"),
    }
    assert type(inner.get_layer("inner_bn")) is BN


def test_wrong_weight_mapping_fails_verification(tmp_path):
    rule = tmp_path / "swap.toml"
    rule.write_text(
        '[[rule]]\nname = "bn-to-sync"\ndirection = "sync"\n'
        'match = ["keras.layers.BatchNormalization"]\n'
        'target = "bnconvert>SyncBatchNormalization"\n'
        '[rule.weights]\ngamma = "beta"\nbeta = "gamma"\n'
    )
    inp = keras.Input((8,))
    model = randomize(keras.Model(inp, BN()(inp)))
    with pytest.raises(errors.VerificationError, match="differ"):
        bnconvert.convert_model(model, "sync", rules=[rule])
    # Without verification the (wrong) model comes back.
    out = bnconvert.convert_model(model, "sync", rules=[rule], verify=False)
    np.testing.assert_array_equal(
        norm_layers(out)[0].gamma.numpy(), norm_layers(model)[0].beta.numpy()
    )


def test_target_rejecting_config_is_a_conversion_error():
    inp = keras.Input((4, 8))
    model = keras.Model(inp, SYNC(axis=[1, 2], name="multi")(inp))
    with pytest.raises(errors.ConversionError, match="sync-to-bn.*multi"):
        bnconvert.convert_model(model, "inference", fold=False)


def test_bad_arguments():
    model = keras.Sequential([keras.Input((2,)), BN()])
    with pytest.raises(errors.ConversionError, match="to='sideways'"):
        bnconvert.convert_model(model, "sideways")
    with pytest.raises(errors.ConversionError, match="keras.Model"):
        bnconvert.convert_model(BN(), "sync")


def test_integer_inputs_are_generated():
    inp = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(3, 4)(inp)
    model = keras.Model(inp, BN()(x))
    _, report = bnconvert.convert_model(randomize(model), "sync", return_report=True)
    assert report.verified and report.max_abs_diff == 0.0


def test_inference_calls_fold_when_available(monkeypatch):
    calls = []

    def fake_fold(model, fold_rules, report, **kwargs):
        calls.append([r.name for r in fold_rules])
        return model

    import bnconvert.fold as fold_module

    monkeypatch.setattr(fold_module, "fold_model", fake_fold)
    inp = keras.Input((8,))
    model = keras.Model(inp, SYNC()(keras.layers.Dense(8)(inp)))
    bnconvert.convert_model(model, "inference")
    assert calls and "bn-into-dense" in calls[0]
    calls.clear()
    bnconvert.convert_model(model, "inference", fold=False)
    assert not calls


def test_input_layer_names_are_kept():
    """clone_model alone would rename inputs after their tensors."""
    image = keras.Input((6, 6, 3), name="image")
    unnamed = keras.Input((4,))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 3)(image))
    y = keras.layers.BatchNormalization()(keras.layers.Dense(2)(unnamed))
    model = keras.Model(
        [image, unnamed], [keras.layers.GlobalAveragePooling2D()(x), y]
    )
    before = [l.name for l in model.layers if isinstance(l, keras.layers.InputLayer)]
    for to in ("sync", "inference"):
        new = bnconvert.convert_model(model, to=to)
        after = [l.name for l in new.layers if isinstance(l, keras.layers.InputLayer)]
        assert sorted(after) == sorted(before)
        assert "image" in after


def test_folding_is_held_to_a_relative_tolerance():
    """Folding reorders float operations: its error scales with the outputs."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    bn = model.layers[-1]
    bn.gamma.assign(rng.uniform(1e3, 2e3, 16))
    bn.moving_variance.assign(rng.uniform(1e-4, 1e-3, 16))
    new, report = bnconvert.convert_model(model, to="inference", return_report=True)
    assert report.folded == 1 and report.tolerance_kind == "relative"
    assert report.max_rel_diff <= 1e-5 < report.max_abs_diff
    sync, report = bnconvert.convert_model(model, to="sync", return_report=True)
    assert report.tolerance_kind == "absolute" and report.tolerance == 1e-6


# -- weights are created from the originals' values ----------------------


@keras.saving.register_keras_serializable(package="bnconvert_tests")
class CountingInitializer(keras.initializers.Initializer):
    """Ones, counting its calls: the converter should never need it."""

    calls = 0

    def __call__(self, shape, dtype=None):
        CountingInitializer.calls += 1
        return keras.ops.ones(shape, dtype=dtype)

    def get_config(self):
        return {}


def randomize_all(model, seed=0):
    """Random values in every weight (BN variances positive)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        value = rng.uniform(0.5, 2.0, tuple(v.shape))
        v.assign(value.astype(v.dtype))
    return model


def test_initializers_are_not_run_and_configs_are_kept():
    init = CountingInitializer()
    inp = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(
        4, 3, kernel_initializer=init, bias_initializer=init, name="conv"
    )(inp)
    x = BN(
        name="bn", gamma_initializer=init, beta_initializer=init,
        moving_mean_initializer=init, moving_variance_initializer=init,
    )(x)
    out = keras.layers.Dense(2, kernel_initializer=init, name="dense")(
        keras.layers.Flatten()(x)
    )
    model = randomize_all(keras.Model(inp, out))
    # The rewrite itself creates the new layer's weights from the original
    # values: only Keras's own load of the working copy runs initializers.
    synced = flavour_lib.get("keras3").fresh_copy(model)
    CountingInitializer.calls = 0
    job = convert.prepare(synced, "sync")
    convert.run_conversion(job, in_place=True)
    assert CountingInitializer.calls == 0
    for name in ("conv", "dense"):
        assert synced.get_layer(name).get_config() == model.get_layer(name).get_config()
        assert "add_weight" not in vars(synced.get_layer(name))
    new_bn, old_bn = synced.get_layer("bn").get_config(), model.get_layer("bn").get_config()
    for key in old_bn:
        if key.endswith("_initializer"):
            assert new_bn[key] == old_bn[key], key
    assert [v.path for v in synced.weights] == [v.path for v in model.weights]
    for a, b in zip(model.weights, synced.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    x6 = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    assert_same_outputs(model, synced, x6)
    # The copy still initializes fresh weights as the original would.
    fresh = synced.get_layer("conv").__class__.from_config(
        synced.get_layer("conv").get_config()
    )
    fresh.build((None, 6, 6, 3))
    assert CountingInitializer.calls == 2


@keras.saving.register_keras_serializable(package="bnconvert_tests")
class AwkwardWeights(keras.layers.Layer):
    """Two weights with one name, and one created with positional arguments."""

    def build(self, input_shape):
        n = input_shape[-1]
        self.a = self.add_weight(shape=(n,), initializer="ones", name="w")
        self.b = self.add_weight(shape=(n,), initializer="zeros", name="w")
        self.c = self.add_weight((n,), "zeros")

    def call(self, x):
        return x * self.a + self.b - self.c


def test_weights_the_build_cannot_pair_are_still_carried():
    inp = keras.Input((8,))
    model = keras.Model(inp, BN(name="bn")(AwkwardWeights(name="awkward")(inp)))
    randomize_all(model)
    synced, _ = check_conversion(model, X8, expected_converted=1)
    for a, b in zip(model.get_layer("awkward").weights, synced.get_layer("awkward").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_converted_weights_are_independent_of_the_originals():
    inp = keras.Input((8,))
    model = keras.Model(inp, BN(name="bn")(keras.layers.Dense(8, name="dense")(inp)))
    randomize_all(model)
    original = snapshot(model)
    synced = bnconvert.convert_model(model, "sync")
    converted = snapshot(synced)
    # Training updates the copy's variables in place (kernel, moving stats).
    synced.compile(optimizer="sgd", loss="mse")
    synced.fit(X8, np.ones((5, 8), "float32"), epochs=1, verbose=0)
    assert any(
        not np.array_equal(a, b) for (_, a), (_, b) in zip(converted, snapshot(synced))
    )
    assert_snapshot_equal(original, model)
    # And updating the original leaves the copy alone.
    trained = snapshot(synced)
    for v in model.weights:
        v.assign_add(np.ones(tuple(v.shape), v.dtype))
    assert_snapshot_equal(trained, synced)


def test_in_memory_copy_keeps_op_nodes_named_like_layers():
    # MobileNetV3 has both `Add` layers and `x + 3.0` op nodes (class `Add`
    # too); the copy must not resolve the op node to the layer.
    inputs = keras.Input((6,))
    x = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))
    y = keras.layers.Add()([x, x]) + 3.0
    model = keras.Model(inputs, y)
    data = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    converted = bnconvert.convert_model(model)
    np.testing.assert_allclose(converted(data, training=False), model(data, training=False),
                               rtol=1e-6, atol=1e-6)
