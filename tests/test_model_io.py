"""Tests for bnconvert.model_io: format detection, loading errors, atomic saving."""

import hashlib
import os
import stat
import textwrap
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import bnconvert  # noqa: F401  (registers the layer, quiets TensorFlow)
from bnconvert import custom_objects
from bnconvert import formats
from bnconvert import model_io
from bnconvert import paths
from bnconvert.errors import ModelLoadError
from bnconvert.errors import OutputError


def _small_model(seed=0):
    rng = np.random.default_rng(seed)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.ReLU()(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    # Non-trivial moving statistics, so that a lost weight shows.
    bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=4).astype("float32"))
    return model


def _x(seed=1):
    return np.random.default_rng(seed).normal(size=(2, 6, 6, 3)).astype("float32")


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The small model saved as .keras and .h5, and its expected outputs."""
    d = tmp_path_factory.mktemp("saved")
    model = _small_model()
    model.save(d / "m.keras")
    model.save(d / "m.h5")
    return {"dir": d, "expected": model.predict(_x(), verbose=0)}


def _one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["m.keras", "m.h5"])
def test_load_gives_the_saved_model(saved, name):
    path = saved["dir"] / name
    before = _sha(path)
    model = model_io.load_model(path)
    np.testing.assert_allclose(
        model.predict(_x(), verbose=0), saved["expected"], rtol=0, atol=1e-6
    )
    assert _sha(path) == before


def test_load_directory_holding_one_model(saved, tmp_path):
    (tmp_path / "model.keras").write_bytes((saved["dir"] / "m.keras").read_bytes())
    # A weights file beside it is not a second model.
    _small_model().save_weights(tmp_path / "model.weights.h5")
    model = model_io.load_model(tmp_path)
    np.testing.assert_allclose(
        model.predict(_x(), verbose=0), saved["expected"], rtol=0, atol=1e-6
    )


def test_directory_with_two_models(saved, tmp_path):
    for name in ("a.keras", "b.h5"):
        (tmp_path / name).write_bytes((saved["dir"] / "m.keras").read_bytes())
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(tmp_path)
    _one_line_error(e, "2 model files", "a.keras", "b.h5")


def test_directory_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(tmp_path)
    _one_line_error(e, str(tmp_path), "no model file")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(tmp_path / "nope.keras")
    _one_line_error(e, "does not exist", "nope.keras")


def test_text_file(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("not a model")
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, "model.txt", ".keras", "'.txt'")


def test_random_bytes_named_keras(tmp_path):
    path = tmp_path / "random.keras"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, "random.keras", "not a valid .keras archive")


def test_truncated_keras(saved, tmp_path):
    data = (saved["dir"] / "m.keras").read_bytes()
    path = tmp_path / "cut.keras"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, "cut.keras", "truncated")


def test_corrupt_keras_member(saved, tmp_path):
    data = bytearray((saved["dir"] / "m.keras").read_bytes())
    with zipfile.ZipFile(saved["dir"] / "m.keras") as z:
        info = z.getinfo("config.json")
    # Past the local header (30 bytes + name + extra) lies the member's data.
    start = info.header_offset + 30 + len(info.filename) + 40
    data[start:start + 20] = b"\xff" * 20
    path = tmp_path / "bad.keras"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, "bad.keras", "corrupt")


def test_zip_without_config(tmp_path):
    path = tmp_path / "other.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, "other.keras", "without config.json")


@pytest.mark.parametrize("name", ["weights.h5", "model.weights.h5"])
def test_weights_only_h5(tmp_path, name):
    path = tmp_path / name
    _small_model().save_weights(tmp_path / "w.weights.h5")
    os.replace(tmp_path / "w.weights.h5", path)
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, name, "weights only")


def test_h5_that_is_not_hdf5(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, "model.h5", "not a readable HDF5 file")


def test_exported_savedmodel(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    module.f = tf.function(lambda x: x * module.v, input_signature=[tf.TensorSpec([None])])
    tf.saved_model.save(module, str(tmp_path / "exported"))
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(tmp_path / "exported")
    _one_line_error(e, "TensorFlow SavedModel", "no", "Keras layers", ".keras model")


def test_tf_keras_savedmodel_goes_to_the_tf_keras_flavour(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([
        tf_keras.layers.Dense(3, input_shape=(4,)),
        tf_keras.layers.BatchNormalization(),
    ])
    model.layers[1].moving_mean.assign([0.5, -1.0, 2.0])
    model.save(str(tmp_path / "k2"), save_format="tf")
    assert (tmp_path / "k2" / "keras_metadata.pb").exists()
    loaded = model_io.load_model(tmp_path / "k2")
    assert isinstance(loaded, tf_keras.Model)
    x = np.random.default_rng(3).normal(size=(2, 4)).astype("float32")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=1e-6
    )


_CUSTOM_MODULE = textwrap.dedent("""
    import keras

    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x
    """)


@pytest.fixture
def custom_model_file(tmp_path, monkeypatch):
    """A model with an unregistered custom layer, and the module defining it."""
    module_path = tmp_path / "my_layers.py"
    module_path.write_text(_CUSTOM_MODULE)
    namespace = {}
    exec(compile(_CUSTOM_MODULE, str(module_path), "exec"), namespace)
    doubler = namespace["Doubler"]
    doubler.__module__ = "my_layers"
    inputs = keras.Input((3,))
    outputs = doubler()(keras.layers.BatchNormalization()(inputs))
    path = tmp_path / "custom.keras"
    keras.Model(inputs, outputs).save(path)
    monkeypatch.delitem(os.sys.modules, "my_layers", raising=False)
    return path, module_path


def test_unknown_custom_layer_names_class(custom_model_file):
    path, _ = custom_model_file
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, "custom.keras", "'Doubler'", "--custom-objects MODULE")


def test_custom_objects_from_file(custom_model_file):
    path, module_path = custom_model_file
    objects = custom_objects.import_custom_objects([str(module_path)])
    assert "Doubler" in objects
    model = model_io.load_model(path, custom_objects=objects)
    x = np.array([[1.0, -2.0, 3.0]], "float32")
    # Fresh BN in inference: x / sqrt(1 + 1e-3), then doubled.
    np.testing.assert_allclose(
        model.predict(x, verbose=0), 2.0 * x / np.sqrt(1.001), rtol=1e-6
    )


def test_custom_objects_by_module_name_from_cwd(custom_model_file, monkeypatch):
    path, module_path = custom_model_file
    monkeypatch.chdir(module_path.parent)
    monkeypatch.setattr(os.sys, "path", [p for p in os.sys.path if p not in ("", ".")])
    objects = custom_objects.import_custom_objects(["my_layers"])
    assert objects["Doubler"].__module__ == "my_layers"
    model_io.load_model(path, custom_objects=objects)
    monkeypatch.delitem(os.sys.modules, "my_layers", raising=False)


def test_custom_objects_module_missing():
    with pytest.raises(ModelLoadError) as e:
        custom_objects.import_custom_objects(["no_such_module_xyz"])
    _one_line_error(e, "'no_such_module_xyz'", "PYTHONPATH")


def test_custom_objects_module_that_fails(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ModelLoadError) as e:
        custom_objects.import_custom_objects([str(path)])
    _one_line_error(e, "broken.py", "RuntimeError: boom")


def test_lambda_layer_needs_unsafe(tmp_path):
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: t + 1.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    _one_line_error(e, "lambda.keras", "--unsafe")
    model = model_io.load_model(path, safe_mode=False)
    np.testing.assert_array_equal(model.predict(np.zeros((1, 3), "float32"), verbose=0), 1.0)


# ---------------------------------------------------------------- output paths


def test_default_output_path(tmp_path):
    assert paths.beside(tmp_path / "a.keras", ".sync.keras") == (
        tmp_path / "a.sync.keras"
    )
    assert paths.beside(tmp_path / "b.h5", ".sync.keras") == (
        tmp_path / "b.sync.keras"
    )
    d = tmp_path / "resnet"
    d.mkdir()
    assert paths.beside(d, ".sync.keras") == tmp_path / "resnet.sync.keras"


def test_output_exists_needs_force(tmp_path):
    out = tmp_path / "o.keras"
    out.write_text("old")
    with pytest.raises(OutputError) as e:
        paths.check_output(out)
    _one_line_error(e, "o.keras", "already exists", "--force")
    assert paths.check_output(out, force=True) == out


def test_output_directory_missing(tmp_path):
    with pytest.raises(OutputError) as e:
        paths.check_output(tmp_path / "nope" / "o.keras")
    _one_line_error(e, "does not exist", "nope")


def test_output_is_a_directory(tmp_path):
    (tmp_path / "d.keras").mkdir()
    with pytest.raises(OutputError) as e:
        paths.check_output(tmp_path / "d.keras", force=True)
    _one_line_error(e, "is a directory")


def test_output_suffix(tmp_path):
    with pytest.raises(OutputError) as e:
        paths.check_output(tmp_path / "o.txt", suffixes=(".keras",))
    _one_line_error(e, "must end in .keras")


def test_output_equal_to_input_even_with_force(saved, tmp_path):
    src = saved["dir"] / "m.keras"
    spelled_otherwise = saved["dir"] / "sub" / ".." / "m.keras"
    (saved["dir"] / "sub").mkdir(exist_ok=True)
    for out in (src, spelled_otherwise):
        with pytest.raises(OutputError) as e:
            paths.check_output(out, force=True, inputs=(src,))
        _one_line_error(e, "is the input model")
    # The input given as the directory that holds it.
    d = tmp_path / "holder"
    d.mkdir()
    (d / "only.keras").write_bytes(src.read_bytes())
    with pytest.raises(OutputError):
        paths.check_output(d / "only.keras", force=True, inputs=(d,))


# ---------------------------------------------------------------- saving


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name)


def test_save_then_load(saved, tmp_path):
    model = model_io.load_model(saved["dir"] / "m.keras")
    out = tmp_path / "copy.keras"
    old_umask = os.umask(0o022)
    try:
        model_io.save_model(model, out)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert _leftovers(tmp_path) == []
    reloaded = keras.saving.load_model(out)
    np.testing.assert_allclose(
        reloaded.predict(_x(), verbose=0), saved["expected"], rtol=0, atol=1e-6
    )


def test_save_refuses_existing_without_force(saved, tmp_path):
    model = model_io.load_model(saved["dir"] / "m.keras")
    out = tmp_path / "o.keras"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError):
        model_io.save_model(model, out)
    assert out.read_bytes() == b"keep me"
    model_io.save_model(model, out, force=True)
    assert zipfile.is_zipfile(out)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch, existing):
    model = model_io.load_model(saved["dir"] / "m.keras")
    out = tmp_path / "o.keras"
    if existing:
        out.write_bytes(b"previous")

    def save_halfway(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise _Interrupted("disk went away")

    monkeypatch.setattr(model, "save", save_halfway)
    with pytest.raises(_Interrupted):
        model_io.save_model(model, out, force=True)
    assert _leftovers(tmp_path) == []
    if existing:
        assert out.read_bytes() == b"previous"
    else:
        assert not out.exists()


def test_failed_save_oserror_is_output_error(saved, tmp_path, monkeypatch):
    model = model_io.load_model(saved["dir"] / "m.keras")

    def no_space(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save", no_space)
    with pytest.raises(OutputError) as e:
        model_io.save_model(model, tmp_path / "o.keras")
    _one_line_error(e, "o.keras", "No space left")
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    paths.write_text(out, '{"a": 1}')
    assert out.read_text() == '{"a": 1}'
    with pytest.raises(OutputError):
        paths.write_text(out, "{}")
    monkeypatch.setattr(
        type(out), "write_text",
        lambda self, *a, **k: (_ for _ in ()).throw(_Interrupted("stop")),
    )
    with pytest.raises(_Interrupted):
        paths.write_text(out, "{}", force=True)
    monkeypatch.undo()
    assert out.read_text() == '{"a": 1}'
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------ compile config


def test_compile_config_survives_load_convert_save(tmp_path):
    model = _small_model()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.0123), loss="mse",
        metrics=["mae"],
    )
    model.save(tmp_path / "compiled.keras")
    expected = model.get_compile_config()

    loaded = model_io.load_model(tmp_path / "compiled.keras")
    assert loaded.compiled and loaded.get_compile_config() == expected
    converted = bnconvert.convert_model(loaded, "sync")
    assert converted.get_compile_config() == expected
    model_io.save_model(converted, tmp_path / "out.keras")
    reloaded = keras.saving.load_model(tmp_path / "out.keras")
    assert reloaded.optimizer.learning_rate.numpy() == pytest.approx(0.0123)
    assert reloaded.get_compile_config()["loss"] == "mse"
    assert isinstance(reloaded.get_layer("bn"), bnconvert.SyncBatchNormalization)
    np.testing.assert_allclose(
        reloaded.predict(_x(), verbose=0), model.predict(_x(), verbose=0),
        rtol=0, atol=1e-6,
    )


def test_uncompiled_model_loads_uncompiled(saved):
    assert not model_io.load_model(saved["dir"] / "m.keras").compiled


def test_unresolvable_loss_is_left_out(tmp_path):
    def private_loss(y_true, y_pred):  # not registered: Keras cannot find it
        return keras.ops.mean(keras.ops.abs(y_true - y_pred))

    model = _small_model()
    model.compile(optimizer="sgd", loss=private_loss)
    model.save(tmp_path / "custom_loss.keras")
    loaded = model_io.load_model(tmp_path / "custom_loss.keras")
    assert not loaded.compiled
    np.testing.assert_allclose(
        loaded.predict(_x(), verbose=0), model.predict(_x(), verbose=0),
        rtol=0, atol=1e-6,
    )


def test_a_model_too_deep_for_keras_loader_is_one_clear_error(tmp_path, monkeypatch):
    # 2,000 chained layers exceed Python's recursion limit in Keras's loader
    # (measured here); reported as such, not as a corrupt file.
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(4)(inputs)).save(tmp_path / "m.keras")
    from bnconvert import flavour as flavour_lib

    flavour = flavour_lib.get(formats.resolve(tmp_path / "m.keras").flavour)

    def deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(type(flavour), "load", staticmethod(deep))
    with pytest.raises(ModelLoadError, match="too deep for Keras's loader") as info:
        model_io.load_model(tmp_path / "m.keras")
    assert "corrupt" not in str(info.value)
