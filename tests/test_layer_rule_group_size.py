"""`sync_group_size` set at conversion time through a rule file."""

import keras
import numpy as np

import bnconvert

RULE = """
version = 1

[[rule]]
name = "bn-to-sync"
direction = "sync"
match = ["keras.layers.BatchNormalization"]
target = "bnconvert>SyncBatchNormalization"

[rule.config]
drop = ["synchronized"]
set = { sync_group_size = 4 }
"""


def small_model():
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.8, name="bn")(h)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    model.get_layer("bn").set_weights(
        [rng.uniform(0.5, 1.5, 4).astype("float32"), rng.normal(size=4).astype("float32"),
         rng.normal(size=4).astype("float32"), rng.uniform(0.5, 2.0, 4).astype("float32")]
    )
    return model


def test_rule_file_sets_the_group_size(tmp_path):
    rule_file = tmp_path / "groups.toml"
    rule_file.write_text(RULE)
    model = small_model()
    converted = bnconvert.convert_model(model, to="sync", rules=[str(rule_file)])
    layer = converted.get_layer("bn")
    assert isinstance(layer, bnconvert.SyncBatchNormalization)
    assert layer.sync_group_size == 4
    assert layer.get_config()["sync_group_size"] == 4
    # Everything else carried over.
    assert layer.momentum == 0.8
    for ours, theirs in zip(layer.get_weights(), model.get_layer("bn").get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    # And it survives a save/load round trip.
    path = tmp_path / "m.keras"
    converted.save(path)
    reloaded = keras.models.load_model(path)
    assert reloaded.get_layer("bn").sync_group_size == 4


def test_without_the_rule_the_group_is_all_replicas():
    converted = bnconvert.convert_model(small_model(), to="sync")
    assert converted.get_layer("bn").sync_group_size is None


def test_cli_sets_the_group_size_and_inference_drops_it(tmp_path):
    from click.testing import CliRunner

    import bnconvert_cli

    model = small_model()
    model.save(tmp_path / "m.keras")
    result = CliRunner().invoke(bnconvert_cli.main, [
        "to-sync", str(tmp_path / "m.keras"), "--sync-group-size", "2"])
    assert result.exit_code == 0, result.output
    synced = keras.saving.load_model(tmp_path / "m.sync.keras")
    assert synced.get_layer("bn").get_config()["sync_group_size"] == 2
    # Back to inference: a plain BN has no replica groups.
    result = CliRunner().invoke(bnconvert_cli.main, [
        "to-inference", str(tmp_path / "m.sync.keras"), "--no-fold",
        "--keras-out", str(tmp_path / "plain.keras")])
    assert result.exit_code == 0, result.output
    plain = keras.saving.load_model(tmp_path / "plain.keras")
    assert type(plain.get_layer("bn")) is keras.layers.BatchNormalization
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 3)).astype("float32")
    np.testing.assert_array_equal(plain(x), model(x))


def test_group_size_is_validated_in_one_line(tmp_path):
    from click.testing import CliRunner

    import bnconvert_cli

    small_model().save(tmp_path / "m.keras")
    result = CliRunner().invoke(bnconvert_cli.main, [
        "to-sync", str(tmp_path / "m.keras"), "--sync-group-size", "0"])
    assert result.exit_code == 2 and "--sync-group-size" in result.stderr
    import pytest

    with pytest.raises(bnconvert.errors.ConversionError, match="sync_group_size"):
        bnconvert.convert_model(small_model(), sync_group_size=-1)
