"""End-to-end tests of the `bnconvert` command line (to-sync, inspect): Keras 3 specifics.

The shipped example, directory inputs, bad inputs, custom objects, `--unsafe`,
output-path checks and the console script. The to-sync / inspect cases both
flavours share (default names, `-o`, `--force`, `--dry-run`, `--report`,
`--rules`, inspect's table and JSON) run in `tests/test_flavours.py`.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

import bnconvert  # noqa: F401  (registers SyncBatchNormalization for reloading)
import bnconvert_cli as cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL_RESNET = REPO / "examples" / "small_resnet.keras"
N_BN = 6  # BatchNormalization layers in examples/small_resnet.keras


def _sha(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _listing(directory):
    return sorted(p.name for p in pathlib.Path(directory).iterdir())


def _run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _assert_clean_error(result, *fragments):
    """Exit code != 0, one "Error: ..." line on stderr, nothing on stdout."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception)
    )
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture
def small(tmp_path):
    """A copy of the shipped example model in a fresh directory."""
    path = tmp_path / "small_resnet.keras"
    shutil.copy(SMALL_RESNET, path)
    return path


def test_shipped_example_is_small_with_trained_looking_bn():
    assert SMALL_RESNET.stat().st_size < 300 * 1024
    model = keras.saving.load_model(SMALL_RESNET)
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == N_BN
    # Moving statistics away from their initial values (0 and 1).
    assert all(np.abs(l.moving_mean.numpy()).max() > 0.1 for l in bns)


# ---------------------------------------------------------------- to-sync


def test_report_same_as_output(small, tmp_path):
    out = tmp_path / "o.keras"
    _assert_clean_error(
        _run("to-sync", small, "-o", out, "--report", out, "--force"), "--report"
    )
    assert _listing(tmp_path) == ["small_resnet.keras"]


def test_model_without_bn(tmp_path):
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(4, activation="relu")(inputs))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "dense.keras"
    model.save(path)
    result = _run("to-sync", path)
    assert result.exit_code == 0, result.output
    assert "0 layer(s) converted" in result.stdout
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    reloaded = keras.saving.load_model(tmp_path / "dense.sync.keras")
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=1e-6
    )


def test_directory_input(small, tmp_path):
    holder = tmp_path / "holder"
    holder.mkdir()
    small.rename(holder / "model.keras")
    result = _run("to-sync", holder)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "holder.sync.keras").exists()


def test_bad_rules_file(small, tmp_path):
    rules = tmp_path / "bad.toml"
    rules.write_text("this is = = not toml")
    _assert_clean_error(_run("to-sync", small, "--rules", rules), "bad.toml")
    assert _listing(small.parent) == ["bad.toml", "small_resnet.keras"]


# ---------------------------------------------------------------- bad inputs


def _exported_savedmodel(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(2.0)
    module.f = tf.function(lambda x: x * module.v, input_signature=[tf.TensorSpec([None])])
    path = tmp_path / "exported"
    tf.saved_model.save(module, str(path))
    return path


def _broken_tf_keras_savedmodel(tmp_path):
    # Names a tf-keras SavedModel, holds nothing readable.
    path = tmp_path / "tfk"
    path.mkdir()
    (path / "saved_model.pb").write_bytes(b"")
    (path / "keras_metadata.pb").write_bytes(b"")
    return path


def _weights_only(tmp_path):
    keras.saving.load_model(SMALL_RESNET).save_weights(tmp_path / "w.weights.h5")
    return tmp_path / "w.weights.h5"


def _write(name, data):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(data)
        return path
    return make


def _corrupt_keras(tmp_path):
    data = bytearray(SMALL_RESNET.read_bytes())
    with zipfile.ZipFile(SMALL_RESNET) as z:
        info = z.getinfo("config.json")
    start = info.header_offset + 30 + len(info.filename) + 40
    data[start:start + 16] = b"\xee" * 16
    path = tmp_path / "corrupt.keras"
    path.write_bytes(bytes(data))
    return path


BAD_INPUTS = {
    "missing": (lambda tmp: tmp / "nope.keras", ["does not exist", "nope.keras"]),
    "text file": (_write("notes.txt", b"hello"), ["notes.txt", ".keras"]),
    "random bytes": (
        _write("random.keras", bytes(range(256)) * 8), ["random.keras", "not a valid"]
    ),
    "truncated": (
        lambda tmp: _write("cut.keras", SMALL_RESNET.read_bytes()[:5000])(tmp),
        ["cut.keras"],
    ),
    "corrupt member": (_corrupt_keras, ["corrupt.keras", "corrupt"]),
    "weights-only h5": (_weights_only, ["w.weights.h5", "weights only"]),
    "exported savedmodel": (_exported_savedmodel, ["exported", "SavedModel"]),
    "broken tf-keras savedmodel": (_broken_tf_keras_savedmodel, ["tfk", "tf-keras"]),
    "empty directory": (lambda tmp: tmp, ["no model file"]),
}


@pytest.mark.parametrize("command", ["to-sync", "inspect"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(tmp_path, case, command):
    make, fragments = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    path = make(work)
    before = _listing(work)
    _assert_clean_error(_run(command, path), *fragments)
    assert _listing(work) == before


CUSTOM_MODULE = textwrap.dedent("""
    import keras

    class Halver(keras.layers.Layer):
        def call(self, x):
            return 0.5 * x
    """)


@pytest.fixture
def custom_model(tmp_path, monkeypatch):
    """A model using an unregistered custom layer defined in my_custom.py."""
    module = tmp_path / "my_custom.py"
    module.write_text(CUSTOM_MODULE)
    namespace = {}
    exec(compile(CUSTOM_MODULE, str(module), "exec"), namespace)
    halver = namespace["Halver"]
    halver.__module__ = "my_custom"
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3)(inputs)
    outputs = halver()(keras.layers.BatchNormalization()(x))
    model = keras.Model(inputs, outputs)
    path = tmp_path / "custom.keras"
    model.save(path)
    monkeypatch.chdir(tmp_path)
    yield path, model
    sys.modules.pop("my_custom", None)


def test_unknown_custom_layer(custom_model):
    path, _ = custom_model
    _assert_clean_error(_run("to-sync", path), "'Halver'", "--custom-objects MODULE")


def test_custom_objects_option(custom_model):
    path, model = custom_model
    result = _run("to-sync", path, "--custom-objects", "my_custom")
    assert result.exit_code == 0, result.output
    assert "1 layer(s) converted" in result.stdout
    objects = {"Halver": sys.modules["my_custom"].Halver}
    reloaded = keras.saving.load_model(
        path.with_name("custom.sync.keras"), custom_objects=objects
    )
    x = np.random.default_rng(2).normal(size=(2, 4)).astype("float32")
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=1e-6
    )


def test_custom_objects_module_missing(small):
    _assert_clean_error(
        _run("to-sync", small, "--custom-objects", "no_such_mod_123"),
        "'no_such_mod_123'",
    )


def test_lambda_needs_unsafe(tmp_path):
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: t * 3.0)(keras.layers.BatchNormalization()(inputs))
    path = tmp_path / "lam.keras"
    keras.Model(inputs, outputs).save(path)
    _assert_clean_error(_run("to-sync", path), "--unsafe")
    result = _run("to-sync", path, "--unsafe", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "1 layer(s) converted" in result.stdout


def test_output_directory_missing(small, tmp_path):
    result = _run("to-sync", small, "-o", tmp_path / "nowhere" / "o.keras")
    _assert_clean_error(result, "nowhere", "does not exist")


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_output_equal_to_input(small, force):
    before = _sha(small)
    result = _run("to-sync", small, "-o", small, *force)
    _assert_clean_error(result, "is the input model")
    assert _sha(small) == before


def test_failed_save_leaves_nothing(small, monkeypatch):
    def boom(self, *args, **kwargs):
        pathlib.Path(args[0]).write_bytes(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", boom)
    result = _run("to-sync", small)
    _assert_clean_error(result, "No space left on device")
    assert _listing(small.parent) == ["small_resnet.keras"]


# ---------------------------------------------------------------- inspect


def test_progress_goes_to_stderr(capsys):
    progress = cli.Progress(enabled=True)
    with progress.step("loading x"):
        pass
    with pytest.raises(KeyError):
        with progress.step("saving y"):
            raise KeyError("k")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0].startswith("loading x ... done (") and lines[0].endswith(" s)")
    assert lines[1] == "saving y ... failed"


# ---------------------------------------------------------------- console script


def _console_script():
    script = pathlib.Path(sys.executable).with_name("bnconvert")
    if not script.exists():
        script = shutil.which("bnconvert")
    if script is None:
        pytest.skip("the bnconvert console script is not installed")
    return str(script)


def _clean_env():
    env = dict(os.environ)
    # What a user's shell would have: no TensorFlow settings of ours.
    for key in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND", "PYTHONWARNINGS"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_console_script_bad_input_is_one_clean_line(tmp_path):
    bad = tmp_path / "random.keras"
    bad.write_bytes(bytes(range(256)) * 4)
    proc = subprocess.run(
        [_console_script(), "to-sync", str(bad)], capture_output=True, text=True,
        env=_clean_env(), timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("Error: ") and "random.keras" in proc.stderr


@pytest.mark.slow
def test_console_script_quick_start_command(tmp_path):
    out = tmp_path / "small_resnet.sync.keras"
    # The README's first command, with the output moved to a private directory.
    proc = subprocess.run(
        [_console_script(), "to-sync", "examples/small_resnet.keras", "-o", str(out),
         "--force"],
        capture_output=True, text=True, cwd=REPO, env=_clean_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert f"{N_BN} layer(s) converted" in proc.stdout
    assert out.exists()


def test_readme_quick_start_names_this_command():
    readme = (REPO / "README.md").read_text()
    assert (
        "bnconvert to-sync examples/small_resnet.keras -o /tmp/small_resnet.sync.keras "
        "--force" in readme
    )


@pytest.mark.slow
def test_train_mirrored_example():
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_mirrored.py")],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "replicas: 2" in proc.stdout
    assert "variables mirrored across replicas: True" in proc.stdout
    assert proc.stdout.rstrip().endswith("ok")
