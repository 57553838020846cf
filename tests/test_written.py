"""Models we did not write: what is written is loaded back and checked.

Custom layers creating BN in `__init__`, subclassed models, Functional
subclasses with their own config (as keras-hub's backbones), raw `keras.ops`
nodes; each file `to-sync` writes is loaded in a fresh process, as a user
would, and compared with the original model's outputs.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import bnconvert
import bnconvert_cli
from bnconvert import persist

HERE = pathlib.Path(__file__).resolve().parent

LAYERS = textwrap.dedent('''
    import keras

    @keras.saving.register_keras_serializable(package="wild")
    class ConvBN(keras.layers.Layer):
        """Creates its BN in __init__, and builds its sublayers unguarded."""

        def __init__(self, filters, **kwargs):
            super().__init__(**kwargs)
            self.filters = filters
            self.conv = keras.layers.Conv2D(filters, 3, padding="same")
            self.bn = keras.layers.BatchNormalization()

        def build(self, shape):
            self.conv.build(shape)
            self.bn.build(tuple(shape[:-1]) + (self.filters,))

        def call(self, x, training=None):
            return self.bn(self.conv(x), training=training)

        def get_config(self):
            return {**super().get_config(), "filters": self.filters}


    @keras.saving.register_keras_serializable(package="wild")
    class Net(keras.Model):
        """A subclassed model: BN in an attribute and in a list."""

        def __init__(self, units=6, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.dense = keras.layers.Dense(units)
            self.bns = [keras.layers.BatchNormalization(), keras.layers.BatchNormalization()]

        def call(self, x, training=None):
            x = self.bns[0](self.dense(x), training=training)
            return self.bns[1](x, training=training)

        def get_config(self):
            return {**super().get_config(), "units": self.units}


    @keras.saving.register_keras_serializable(package="wild")
    class Backbone(keras.Model):
        """A Functional subclass whose config is its constructor's arguments."""

        def __init__(self, filters=4, **kwargs):
            inputs = keras.Input((8, 8, 3), name="pixels")
            x = keras.layers.Conv2D(filters, 3, name="conv")(inputs)
            x = keras.layers.BatchNormalization(name="bn")(x)
            x = keras.ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])  # a raw op node
            x = x + 3.0  # another
            super().__init__(inputs, {"pool": keras.layers.GlobalAveragePooling2D()(x)}, **kwargs)
            self.filters = filters
            self.pyramid_outputs = {"P1": x}

        def get_config(self):
            return {"filters": self.filters, "name": self.name}

        @classmethod
        def from_config(cls, config):
            return cls(**config)
''')


@pytest.fixture()
def wild(tmp_path, monkeypatch):
    (tmp_path / "wild_layers.py").write_text(LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib

    module = importlib.import_module("wild_layers")
    return tmp_path, module


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        name = variable.path.split("/")[-1]
        value = rng.normal(size=variable.shape)
        if name in ("moving_variance", "gamma"):
            value = rng.uniform(0.5, 2.0, size=variable.shape)
        variable.assign(value.astype("float32"))
    return model


def _models(module):
    inputs = keras.Input((8, 8, 3))
    x = module.ConvBN(4)(inputs)
    convbn = keras.Model(inputs, module.ConvBN(5)(x), name="convbn")
    net = module.Net(name="net")
    net(np.zeros((2, 5), "float32"))
    return {"convbn": convbn, "net": net, "backbone": module.Backbone(name="backbone")}


def _input_for(name):
    shape = (2, 5) if name == "net" else (2, 8, 8, 3)
    return np.random.default_rng(1).normal(size=shape).astype("float32")


def _fresh_reload(path, x_path, tmp_path):
    """Loads `path` in a new process as a user would; returns classes and outputs."""
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, keras
        import bnconvert, wild_layers
        model = keras.saving.load_model({str(path)!r})
        names = []
        def walk(layer):
            for child in getattr(layer, "_layers", []):
                names.append(type(child).__name__)
                walk(child)
        walk(model)
        out = model(np.load({str(x_path)!r}), training=False)
        out = keras.tree.flatten(out)
        np.save({str(tmp_path / 'y.npy')!r}, np.asarray(out[0]))
        print(json.dumps({{"class": type(model).__name__, "layers": names}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info, np.load(tmp_path / "y.npy")


@pytest.mark.parametrize("name", ["convbn", pytest.param("net", marks=pytest.mark.slow),
                                  pytest.param("backbone", marks=pytest.mark.slow)])
def test_to_sync_file_reloads_synchronized_in_a_fresh_process(wild, name):
    tmp_path, module = wild
    model = _randomize(_models(module)[name])
    x = _input_for(name)
    expected = np.asarray(keras.tree.flatten(model(x, training=False))[0])
    model.save(tmp_path / f"{name}.keras")
    np.save(tmp_path / "x.npy", x)

    result = CliRunner().invoke(bnconvert_cli.main, [
        "to-sync", f"{name}.keras", "--custom-objects", "wild_layers",
        "--report", "r.json",
    ])
    assert result.exit_code == 0, result.output
    check = json.loads((tmp_path / "r.json").read_text())["file_checks"][0]
    assert check["max_abs_diff"] <= 1e-6
    # None of these models' configs names the new class: the file records it.
    assert check["recorded"]

    info, got = _fresh_reload(tmp_path / f"{name}.sync.keras", tmp_path / "x.npy", tmp_path)
    assert info["class"] == type(model).__name__
    assert "BatchNormalization" not in info["layers"]
    assert info["layers"].count("SyncBatchNormalization") == 2 if name != "backbone" else 1
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_functional_subclass_keeps_class_config_and_raw_ops(wild):
    _, module = wild
    model = _randomize(module.Backbone(filters=3, name="bb"))
    synced, report = bnconvert.convert_model(model, return_report=True)
    assert type(synced) is module.Backbone and synced.get_config() == model.get_config()
    assert synced.filters == 3 and set(synced.pyramid_outputs) == {"P1"}
    assert isinstance(synced.get_layer("bn"), bnconvert.SyncBatchNormalization)
    assert isinstance(model.get_layer("bn"), keras.layers.BatchNormalization)
    assert type(model.get_layer("bn")) is keras.layers.BatchNormalization  # untouched
    x = _input_for("backbone")
    np.testing.assert_array_equal(synced(x)["pool"], model(x)["pool"])
    folded, report = bnconvert.convert_model(synced, to="inference", return_report=True)
    assert type(folded) is module.Backbone and report.folded == 1
    np.testing.assert_allclose(folded(x)["pool"], model(x)["pool"], rtol=1e-5, atol=1e-5)


def test_a_file_that_would_revert_is_never_written(wild, monkeypatch):
    tmp_path, module = wild
    _models(module)["convbn"].save(tmp_path / "m.keras")
    # Without the record, the file would load back with plain BN.
    monkeypatch.setattr(persist, "record", lambda *args, **kwargs: None)
    result = CliRunner().invoke(bnconvert_cli.main, [
        "to-sync", "m.keras", "--custom-objects", "wild_layers"])
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: m.sync.keras would load back with BatchNormalization")
    assert "Nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir() if "sync" in p.name) == []


def test_a_record_cannot_bring_in_other_classes(wild):
    tmp_path, module = wild
    model = _models(module)["convbn"]
    synced = bnconvert.convert_model(model)
    synced.save(tmp_path / "s.keras")
    persist.record(tmp_path / "s.keras", synced, ["1"])  # a ConvBN: custom code
    with pytest.raises(Exception, match="only normalization layers and Keras's own"):
        keras.saving.load_model(tmp_path / "s.keras")


def test_custom_objects_hint_does_not_repeat_a_given_module(tmp_path, monkeypatch):
    # Saved in another process, so that its class is unknown here.
    (tmp_path / "hidden.py").write_text(textwrap.dedent("""
        import keras

        @keras.saving.register_keras_serializable(package="hidden")
        class Halver(keras.layers.Layer):
            def call(self, x):
                return x / 2
    """))
    code = ("import keras, hidden; i = keras.Input((3,)); "
            "keras.Model(i, hidden.Halver()(i)).save('m.keras')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    (tmp_path / "other.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(bnconvert_cli.main, [
        "inspect", "m.keras", "--custom-objects", "other"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "'Halver'" in line and "none of the custom objects given" in line
    assert "as well" in line
    bare = CliRunner().invoke(bnconvert_cli.main, ["inspect", "m.keras"])
    assert "pass the module that defines it with --custom-objects" in bare.stderr


def test_inspect_to_inference_says_what_would_be_folded(tmp_path):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = bnconvert.SyncBatchNormalization(name="folds")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.BatchNormalization(name="after_relu")(x)
    model = keras.Model(inputs, x, name="m")
    model.save(tmp_path / "m.keras")
    result = CliRunner().invoke(bnconvert_cli.main, [
        "inspect", str(tmp_path / "m.keras"), "--to", "inference", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in json.loads(result.stdout)["layers"]}
    assert [e["action"] for e in rows["m/folds"]["events"]] == ["applied", "folded"]
    kept = rows["m/after_relu"]["events"][-1]
    assert kept["action"] == "kept" and "not foldable" in kept["reason"]
    table = CliRunner().invoke(bnconvert_cli.main, [
        "inspect", str(tmp_path / "m.keras"), "--to", "inference"])
    assert "1 would be folded, 1 kept" in table.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]  # nothing written


def test_tf_keras_keras_archive_is_recognised(tmp_path):
    import tf_keras

    from bnconvert import formats

    inputs = tf_keras.Input((4,))
    model = tf_keras.Model(inputs, tf_keras.layers.BatchNormalization()(inputs))
    model.save(tmp_path / "tk.keras")
    found = formats.resolve(tmp_path / "tk.keras")
    assert (found.flavour, found.format) == ("tf_keras", "keras")
    result = CliRunner().invoke(bnconvert_cli.main, [
        "to-sync", str(tmp_path / "tk.keras"), "-o", str(tmp_path / "out.h5")])
    assert result.exit_code == 0, result.output
    reloaded = tf_keras.models.load_model(tmp_path / "out.h5", compile=False)
    assert isinstance(reloaded.layers[1], bnconvert.TFKerasSyncBatchNormalization)


def test_custom_objects_modules_are_imported_before_tensorflow(tmp_path):
    # A model zoo may configure TensorFlow when imported (TF_USE_LEGACY_KERAS).
    (tmp_path / "early.py").write_text(textwrap.dedent("""
        import os, sys
        with open(os.environ["EARLY_PROBE"], "w") as f:
            f.write("tensorflow" if "tensorflow" in sys.modules else "first")
    """))
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.BatchNormalization()(inputs)).save(tmp_path / "m.keras")
    script = pathlib.Path(sys.executable).with_name("bnconvert")
    env = {**os.environ, "EARLY_PROBE": str(tmp_path / "probe.txt")}
    proc = subprocess.run(
        [str(script), "inspect", "m.keras", "--custom-objects", "early"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "probe.txt").read_text() == "first"
    assert proc.stderr == ""
