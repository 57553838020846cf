"""Converting tf-keras (Keras 2) models: what only tf-keras has.

Detection, the legacy `experimental.SyncBatchNormalization`, fused BN and
its rounding, SavedModel atomicity, tf-keras rule names and synchronized
training of converted files. The conversion and CLI cases both flavours
share run in the table of `tests/test_flavours.py`.

References: the original tf-keras model's outputs (conversion must not change
them), and the original model trained on one device over the same global
batches (synchronized training must reproduce it).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import tf_keras

import bnconvert
from bnconvert import model_io
from bnconvert import formats
from bnconvert_cli import main
from bnconvert.errors import ModelLoadError
from bnconvert.errors import OutputError
from conftest import mirrored_strategy

SYNC_CLASS = "bnconvert.compat.tf_keras_layers.SyncBatchNormalization"


def functional_model():
    """Every BN flavour tf-keras has, nested one level."""
    inner = tf_keras.Sequential(
        [tf_keras.layers.Dense(6, input_shape=(5,)),
         tf_keras.layers.BatchNormalization(name="inner_bn")],
        name="inner",
    )
    inputs = tf_keras.Input((6, 6, 3))
    x = tf_keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    # momentum 0.5: a wrong moving-variance convention would show in training.
    x = tf_keras.layers.BatchNormalization(momentum=0.5, name="bn_fused")(x)
    x = tf_keras.layers.experimental.SyncBatchNormalization(name="legacy_sync")(x)
    x = tf_keras.layers.BatchNormalization(synchronized=True, axis=1, name="sync_axis1")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    x = tf_keras.layers.Dense(5)(x)
    model = tf_keras.Model(inputs, inner(x), name="functional")
    randomize(model)
    return model


def sequential_model():
    model = tf_keras.Sequential([
        tf_keras.Input((7,)),
        tf_keras.layers.Dense(4),
        tf_keras.layers.BatchNormalization(momentum=0.8, name="bn_2d"),
        tf_keras.layers.Dense(3),
    ], name="sequential")
    randomize(model)
    return model


def randomize(model):
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.uniform(0.5, 1.5, size=tuple(w.shape)).astype("float32"))


def batch_for(model, n=8, seed=1):
    shape = (n,) + tuple(model.input_shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def save(model, directory, fmt):
    path = directory / (model.name if fmt == "savedmodel" else f"{model.name}.h5")
    model.save(path)
    return path


# -- detection ---------------------------------------------------------------


def test_formats_are_detected(tmp_path):
    model = sequential_model()
    sm = save(model, tmp_path, "savedmodel")
    h5 = save(model, tmp_path, "h5")
    assert formats.resolve(sm).flavour == "tf_keras" and formats.resolve(sm).format == "savedmodel"
    assert formats.resolve(h5).flavour == "tf_keras" and formats.resolve(h5).format == "h5"
    with h5py.File(h5, "r") as f:
        assert str(f.attrs["keras_version"]).startswith("2.")

    import keras

    k3 = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    k3.save(tmp_path / "k3.h5")
    k3.save(tmp_path / "k3.keras")
    assert formats.flavour_name(tmp_path / "k3.h5") == "keras3"
    assert formats.flavour_name(tmp_path / "k3.keras") == "keras3"
    assert isinstance(model_io.load_model(tmp_path / "k3.h5"), keras.Model)
    assert isinstance(model_io.load_model(sm), tf_keras.Model)


def test_savedmodel_without_keras_metadata_is_one_clear_error(tmp_path):
    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3])])
        def __call__(self, x):
            return 2 * x

    tf.saved_model.save(Doubler(), str(tmp_path / "plain"))
    assert formats.flavour_name(tmp_path / "plain") == "keras3"
    with pytest.raises(ModelLoadError) as info:
        model_io.load_model(tmp_path / "plain")
    message = str(info.value)
    assert "\n" not in message and "not Keras layers" in message
    result = CliRunner().invoke(main, ["to-sync", str(tmp_path / "plain")])
    assert result.exit_code != 0
    assert "not Keras layers" in result.output and "Traceback" not in result.output


# -- Python API ----------------------------------------------------------------


def test_legacy_fused_and_synchronized_bn_convert_both_ways():
    """Every tf-keras BN kind: fused, legacy experimental SyncBN, synchronized axis 1.

    Plain shapes run in both flavours in tests/test_flavours.py.
    """
    model = functional_model()
    x = batch_for(model)
    converted, report = bnconvert.convert_model(model, to="sync", return_report=True)
    assert isinstance(converted, tf_keras.Model)
    bns = [l for l in _all_layers(model) if "bn" in l.name or "sync" in l.name]
    new = {l.name: l for l in _all_layers(converted)}
    for layer in bns:
        assert isinstance(new[layer.name], bnconvert.compat.SyncBatchNormalization)
        assert isinstance(new[layer.name], tf_keras.layers.BatchNormalization)
        for a, b in zip(layer.weights, new[layer.name].weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert report.converted == len(bns) and report.verified and report.max_abs_diff == 0
    np.testing.assert_array_equal(converted(x, training=False), model(x, training=False))
    # And back: plain tf-keras BN, still the same outputs.
    back = bnconvert.convert_model(converted, to="inference", fold=False)
    assert all(
        type(l) is tf_keras.layers.BatchNormalization
        for l in _all_layers(back) if l.name in new and l.name in {b.name for b in bns}
    )
    np.testing.assert_array_equal(back(x, training=False), model(x, training=False))


def _all_layers(model):
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, tf_keras.Model):
            out.extend(_all_layers(layer))
    return out


# -- atomic SavedModel output --------------------------------------------------


def test_savedmodel_output_is_atomic(tmp_path, monkeypatch):
    model = sequential_model()
    out = tmp_path / "out"
    model_io.save_model(model, out)
    assert (out / "keras_metadata.pb").is_file()
    with pytest.raises(OutputError, match="already exists"):
        model_io.save_model(model, out)

    before = sorted(p.name for p in out.rglob("*"))
    stamp = (out / "saved_model.pb").stat().st_mtime_ns

    def broken_save(self, path, *args, **kwargs):
        pathlib.Path(path, "partial.bin").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf_keras.Model, "save", broken_save)
    with pytest.raises(OutputError, match="No space left"):
        model_io.save_model(model, out, force=True)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert (out / "saved_model.pb").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- end to end: CLI, fresh-process reload, synchronized training ----------------

RELOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import bnconvert
    import tf_keras
    x = np.load(sys.argv[2])
    # The reference: the original, as tf-keras loads it from its file here.
    original = tf_keras.models.load_model(sys.argv[4], compile=False)
    model = tf_keras.models.load_model(sys.argv[1], compile=False)
    np.save(sys.argv[3], np.stack([
        model(x, training=False).numpy(), original(x, training=False).numpy()
    ]))
    classes = {}
    def walk(m):
        for layer in m.layers:
            classes[layer.name] = type(layer).__module__ + "." + type(layer).__name__
            if isinstance(layer, tf_keras.Model):
                walk(layer)
    walk(model)
    print(json.dumps(classes))
    """
)


def reload_in_fresh_process(path, original_path, x, tmp_path):
    """Outputs of the converted and the original file, and the converted classes.

    tf-keras does not save `synchronized`: a `synchronized=True` layer comes
    back from a file as a fused BN, which rounds differently from the
    in-memory original; so the reference is the original reloaded from its
    file, in the same process.
    """
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(path), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy"), str(original_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    converted, original = np.load(tmp_path / "y.npy")
    return converted, original, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["savedmodel", "h5"])
@pytest.mark.parametrize("make", [functional_model, sequential_model])
def test_converted_file_trains_under_mirrored_strategy(tmp_path, fmt, make):
    """A file written by `to-sync` trains under 2 replicas as the original on one device.

    The CLI's output names, formats and reload are checked in both flavours
    in tests/test_flavours.py.
    """
    model = make()
    path = save(model, tmp_path, fmt)
    result = CliRunner().invoke(main, ["to-sync", str(path)])
    assert result.exit_code == 0, result.output
    out = formats.default_output(path, formats.resolve(path), ".sync")

    # Training with 2 replicas = the original (as loaded) trained on one device.
    model = tf_keras.models.load_model(path, compile=False)
    strategy = mirrored_strategy(2)
    with strategy.scope():
        synced = tf_keras.models.load_model(out, compile=False)
        synced.compile(optimizer=tf_keras.optimizers.SGD(0.1), loss="mse")
    # Every BN kind (legacy SyncBN and synchronized=True included) came back as ours.
    classes = _all_classes(synced)
    bn_names = [l.name for l in _all_layers(model) if "bn" in l.name or "sync" in l.name]
    assert bn_names and all(
        classes[n] is bnconvert.compat.SyncBatchNormalization for n in bn_names
    )
    x = batch_for(model)
    np.testing.assert_array_equal(synced(x, training=False), model(x, training=False))
    model.compile(optimizer=tf_keras.optimizers.SGD(0.1), loss="mse")
    xs = batch_for(model, n=24, seed=2) * 2 + 0.5
    ys = np.random.default_rng(3).normal(size=(24,) + model.output_shape[1:]).astype("float32")
    synced.fit(xs, ys, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.fit(xs, ys, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(synced.weights, model.weights):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, err_msg=b.name)


@pytest.mark.slow
def test_cli_to_inference_exports_onnx_from_a_tf_keras_savedmodel(tmp_path):
    model = functional_model()
    path = save(model, tmp_path, "savedmodel")
    result = CliRunner().invoke(main, ["to-sync", str(path), "-o", str(tmp_path / "s.h5")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        main, ["to-inference", str(tmp_path / "s.h5"), "-o", str(tmp_path / "m.onnx"),
               "--keras-out", str(tmp_path / "plain")],
    )
    assert result.exit_code == 0, result.output
    assert "onnxruntime check" in result.output and (tmp_path / "m.onnx").is_file()
    x = batch_for(model)
    y, y_original, classes = reload_in_fresh_process(tmp_path / "plain", path, x, tmp_path)
    # Not bit-for-bit: BN is folded into the layer before it where exact
    # (float64 arithmetic, rounded once), and the legacy SyncBatchNormalization
    # never fuses while the plain BN it becomes reloads with the fused kernel.
    assert np.abs(y - y_original).max() <= 1e-5 * np.abs(y_original).max()
    # bn_fused follows a linear Conv2D: folded, its place kept by a linear Activation.
    assert classes["bn_fused"].endswith(".Activation") and SYNC_CLASS not in classes.values()
    assert classes["inner_bn"].endswith(".Activation")  # folded into inner's Dense
    assert classes["legacy_sync"].endswith("BatchNormalization")  # follows a BN: kept

    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    expected = model(x, training=False).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


# -- inspect, outputs onto SavedModel directories, tf_keras rule names -----------


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def settings_model():
    """One layer per setting `inspect` shows, each away from its default."""
    inputs = tf_keras.Input((7, 7, 3))
    x = tf_keras.layers.Conv2D(4, 3)(inputs)  # (None, 5, 5, 4)
    x = tf_keras.layers.BatchNormalization(
        momentum=0.5, epsilon=1e-4, center=False, name="bn_a"
    )(x)
    x = tf_keras.layers.experimental.SyncBatchNormalization(scale=False, name="legacy")(x)
    x = tf_keras.layers.BatchNormalization(axis=1, renorm=True, name="bn_renorm")(x)
    x = tf_keras.layers.LayerNormalization(name="ln")(x)
    model = tf_keras.Model(inputs, x, name="settings")
    model.get_layer("bn_renorm").trainable = False
    return model


@pytest.mark.parametrize("fmt", ["savedmodel", "h5"])
def test_inspect_legacy_sync_bn(tmp_path, fmt):
    """The legacy experimental SyncBN is a normalization layer, synchronized, shown once.

    The settings of plain BN layers are checked in both flavours in
    tests/test_flavours.py.
    """
    path = save(settings_model(), tmp_path, fmt)
    result = _cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in json.loads(result.stdout)["layers"]}
    assert set(rows) == {"settings/bn_a", "settings/legacy", "settings/bn_renorm"}
    legacy = rows["settings/legacy"]
    assert legacy["class"] == "SyncBatchNormalization" and legacy["shape"] == [4]
    assert legacy["settings"] == {
        "center": True, "scale": False, "renorm": False, "synchronized": True,
        "trainable": True, "momentum": 0.99, "epsilon": 1e-3, "axis": [3]}
    assert [(e["path"], e["rule"]) for e in legacy["events"]] == [
        ("settings/legacy", "bn-to-sync")]
    table = _cli("inspect", path)
    line = next(l for l in table.stdout.splitlines() if l.startswith("settings/legacy "))
    assert "synchronized" in line and "bn-to-sync: -> SyncBatchNormalization" in line


def _all_classes(model):
    return {l.name: type(l) for l in _all_layers(model)}


LEGACY_ONLY_RULES = textwrap.dedent("""
    version = 1

    [[rule]]
    name = "bn-to-sync"
    enabled = false

    [[rule]]
    name = "legacy-sync-only"
    direction = "sync"
    match = ["tf_keras.layers.experimental.SyncBatchNormalization"]
    target = "bnconvert>SyncBatchNormalization"

    [rule.config]
    drop = ["synchronized"]

    [[rule]]
    name = "tf-keras-bn-to-bn"
    direction = "inference"
    match = ["tf_keras.layers.BatchNormalization"]
    target = "tf_keras.layers.BatchNormalization"
    """)


def _plain_and_legacy():
    inputs = tf_keras.Input((5,))
    x = tf_keras.layers.Dense(4)(inputs)
    x = tf_keras.layers.BatchNormalization(name="plain")(x)
    x = tf_keras.layers.experimental.SyncBatchNormalization(name="legacy")(x)
    model = tf_keras.Model(inputs, x, name="two")
    randomize(model)
    return model


def test_rule_file_naming_tf_keras_classes(tmp_path):
    rules = tmp_path / "legacy.toml"
    rules.write_text(LEGACY_ONLY_RULES)
    ruleset = bnconvert.load_rules([rules])
    mine = {r.name: r for r in ruleset.rules}
    assert mine["legacy-sync-only"].match_classes == (
        tf_keras.layers.experimental.SyncBatchNormalization,)
    assert mine["tf-keras-bn-to-bn"].target_class is tf_keras.layers.BatchNormalization

    # Python API: only the layer the rule names is rewritten.
    model = _plain_and_legacy()
    x = batch_for(model)
    converted, report = bnconvert.convert_model(model, rules=[rules], return_report=True)
    classes = _all_classes(converted)
    assert classes["plain"] is tf_keras.layers.BatchNormalization
    assert classes["legacy"] is bnconvert.compat.SyncBatchNormalization
    assert report.converted == 1
    np.testing.assert_array_equal(converted(x, training=False), model(x, training=False))

    # The CLI, on the saved model.
    path = save(model, tmp_path, "savedmodel")
    result = _cli("to-sync", path, "--rules", rules, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "1 layer(s) converted (1 applied, 1 skipped)" in result.stdout
    rows = {r["path"]: r for r in json.loads(
        _cli("inspect", path, "--rules", rules, "--json").stdout)["layers"]}
    assert [e["rule"] for e in rows["two/legacy"]["events"]] == ["legacy-sync-only"]
    assert [e["action"] for e in rows["two/plain"]["events"]] == ["skipped"]

    # The same file leaves Keras 3 models alone (no Keras 3 class is named).
    import keras

    k3 = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn")],
                          name="k3")
    k3.save(tmp_path / "k3.keras")
    result = _cli("inspect", tmp_path / "k3.keras", "--rules", rules)
    assert result.exit_code == 0, result.output
    assert "0 layers would be converted" in result.stdout


def test_unknown_tf_keras_class_in_a_rule_file(tmp_path):
    rules = tmp_path / "typo.toml"
    rules.write_text(LEGACY_ONLY_RULES.replace("experimental.SyncBatchNormalization",
                                               "experimental.SyncBatchNormalisation"))
    with pytest.raises(bnconvert.errors.RuleError, match="unknown layer class") as info:
        bnconvert.load_rules([rules])
    assert "\n" not in str(info.value) and "SyncBatchNormalisation" in str(info.value)


@pytest.mark.slow
def test_tf_keras_is_imported_only_for_rules_that_name_it(tmp_path):
    rules = tmp_path / "legacy.toml"
    rules.write_text(LEGACY_ONLY_RULES)
    code = textwrap.dedent(f"""
        import sys
        import bnconvert
        bnconvert.load_rules()
        print("tf_keras" in sys.modules)
        bnconvert.load_rules([{str(rules)!r}])
        print("tf_keras" in sys.modules)
        """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "True"]
