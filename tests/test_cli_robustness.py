"""Every command, every bad input: one clean error line, nothing written.

For each command (`to-sync`, `inspect`, `to-inference`) and each bad input
or option, the CLI must exit non-zero with exactly one line starting with
"Error:" on stderr (click's own usage-error format for bad option values),
print nothing on stdout and no traceback, leave the input's bytes as they
were and leave no output or temporary file behind. A few cases run the
installed console script in a fresh process, with the environment of a
user's shell, to check that nothing leaks from TensorFlow's native logs.

The small models are built once per module; every test works on its own
copy.
"""

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
import tf_keras
from file_checks import run_cli
from file_checks import tree_digest


COMMANDS = ("to-sync", "inspect", "to-inference")


class KHalver(keras.layers.Layer):
    """A Keras 3 custom layer that is not registered: unknown when loading."""

    def call(self, x):
        return 0.5 * x


class Halver(tf_keras.layers.Layer):
    """A tf-keras custom layer that is not registered: unknown when loading."""

    def call(self, x):
        return 0.5 * x


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The small models every case starts from, in one directory."""
    d = tmp_path_factory.mktemp("built")
    inputs = keras.Input((4,), name="x")
    y = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(3)(inputs))
    k3 = keras.Model(inputs, y, name="k3")
    k3.save(d / "k3.keras")
    k3.save_weights(d / "w.weights.h5")
    k3.export(str(d / "served"), verbose=False)
    keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(), KHalver()]
    ).save(d / "custom.keras")

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3])])
        def __call__(self, x):
            return 2 * x

    tf.saved_model.save(Doubler(), str(d / "module"))
    tk = tf_keras.Sequential(
        [tf_keras.Input((4,)), tf_keras.layers.Dense(3),
         tf_keras.layers.BatchNormalization(name="bn")],
        name="tk",
    )
    tk.save(d / "tk")
    tf_keras.Sequential(
        [tf_keras.Input((4,)), tf_keras.layers.BatchNormalization(), Halver()],
        name="tkc",
    ).save(d / "tk_custom")

    data = (d / "k3.keras").read_bytes()
    (d / "cut.keras").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(d / "noconfig.keras", "w") as z:
        z.writestr("model.weights.h5", b"not a model")
    noise = np.random.default_rng(0).bytes(4096)
    (d / "noise.keras").write_bytes(noise)
    (d / "noise.h5").write_bytes(noise)
    (d / "empty.keras").write_bytes(b"")
    (d / "notes.txt").write_text("not a model\n")
    (d / "nothing").mkdir()
    (d / "nothing" / "readme.md").write_text("no model here\n")
    return d


_tree_digest = tree_digest


_run = run_cli


def _assert_one_error_line(result, *fragments):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception)
    )
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _assert_usage_error(result, option):
    """click's format: usage, a hint, a blank line, then one Error line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Usage: ")
    errors = [line for line in lines if line.startswith("Error:")]
    assert errors == [lines[-1]], result.stderr
    assert f"Invalid value for '{option}'" in lines[-1], lines[-1]


# ------------------------------------------------------------------ bad inputs

# name -> (input path relative to the work directory, fragments of the error)
BAD_INPUTS = {
    "missing path": ("nope.keras", ["nope.keras", "does not exist"]),
    "empty file": ("empty.keras", ["empty.keras", "not a valid .keras archive"]),
    "directory without a model": ("nothing", ["nothing", "no model file"]),
    "text file": ("notes.txt", ["notes.txt", "not a Keras model file"]),
    "random bytes .keras": ("noise.keras", ["noise.keras", "not a valid .keras"]),
    "random bytes .h5": ("noise.h5", ["noise.h5", "not a readable HDF5 file"]),
    "truncated .keras": ("cut.keras", ["cut.keras", "truncated"]),
    "zip without config.json": ("noconfig.keras", ["noconfig.keras", "config.json"]),
    "weights-only .h5": ("w.weights.h5", ["w.weights.h5", "weights only"]),
    "tf.Module SavedModel": ("module", ["module", "not Keras layers"]),
    "Keras 3 export() dir": ("served", ["served", "not Keras layers"]),
    "tf-keras SavedModel, unknown custom layer": (
        "tk_custom", ["tk_custom", "'Halver'", "--custom-objects MODULE"]
    ),
    ".keras, unknown custom layer": (
        "custom.keras", ["custom.keras", "'KHalver'", "--custom-objects MODULE"]
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(work, case, command):
    name, fragments = BAD_INPUTS[case]
    path = work / name
    before = _tree_digest(work)
    _assert_one_error_line(_run(command, path), *fragments)
    # The input is untouched and nothing was written beside it (default
    # outputs, temporary files, partial SavedModel directories).
    assert _tree_digest(work) == before


# ------------------------------------------------------------ bad options

BAD_TOML_KEY = textwrap.dedent("""
    version = 1
    [[rule]]
    name = "mine"
    direction = "sync"
    match = ["BatchNormalization"]
    target = "bnconvert>SyncBatchNormalization"
    colour = "blue"
    """)


def _rules(work, name, data):
    path = work / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# name -> function(work) -> (argv, fragments). `k3.keras` is a Keras 3 model,
# `tk` a tf-keras SavedModel; both are good inputs: the options are the fault.
BAD_OPTIONS = {
    "to-sync: output exists": lambda w: (
        ["to-sync", w / "k3.keras", "-o", w / "empty.keras"],
        ["empty.keras", "already exists", "--force"],
    ),
    "to-sync: tf-keras output SavedModel exists": lambda w: (
        ["to-sync", w / "tk", "-o", w / "module"],
        ["module", "already exists", "--force"],
    ),
    "to-sync: output is a directory (Keras 3)": lambda w: (
        ["to-sync", w / "k3.keras", "-o", w / "nothing", "--force"],
        ["nothing", "is a directory", "--output"],
    ),
    "to-sync: output directory missing": lambda w: (
        ["to-sync", w / "k3.keras", "-o", w / "no" / "x.keras"],
        ["does not exist"],
    ),
    "to-sync: tf-keras output directory missing": lambda w: (
        ["to-sync", w / "tk", "-o", w / "no" / "tk2"],
        ["does not exist"],
    ),
    "to-sync: output equals input": lambda w: (
        ["to-sync", w / "k3.keras", "-o", w / "k3.keras", "--force"],
        ["is the input model"],
    ),
    "to-sync: tf-keras output equals input": lambda w: (
        ["to-sync", w / "tk", "-o", w / "tk", "--force"],
        ["is the input model"],
    ),
    "to-sync: report is the output": lambda w: (
        ["to-sync", w / "k3.keras", "-o", w / "o.keras", "--report", w / "o.keras"],
        ["--output and --report", "o.keras"],
    ),
    "to-sync: rule file not UTF-8": lambda w: (
        ["to-sync", w / "k3.keras", "--rules", _rules(w, "r.toml", b"\xff\xfe[[rule]]")],
        ["r.toml", "UTF-8"],
    ),
    "to-sync: tf-keras, rule file not TOML": lambda w: (
        ["to-sync", w / "tk", "--rules", _rules(w, "r.toml", "this is = = not toml")],
        ["r.toml", "not valid TOML"],
    ),
    "inspect: rule file with a bad key": lambda w: (
        ["inspect", w / "k3.keras", "--rules", _rules(w, "r.toml", BAD_TOML_KEY)],
        ["r.toml", "'colour'", "unknown key"],
    ),
    "inspect: tf-keras, rule file missing": lambda w: (
        ["inspect", w / "tk", "--rules", w / "gone.toml"],
        ["gone.toml"],
    ),
    "inspect: custom-objects module missing": lambda w: (
        ["inspect", w / "k3.keras", "--custom-objects", "no_such_module_4711"],
        ["'no_such_module_4711'"],
    ),
    "to-sync: tf-keras, custom-objects file missing": lambda w: (
        ["to-sync", w / "tk", "--custom-objects", w / "gone.py"],
        ["gone.py", "does not exist"],
    ),
    "to-inference: opset 99": lambda w: (
        ["to-inference", w / "k3.keras", "--opset", "99"],
        ["opset 99"],
    ),
    "to-inference: tf-keras, opset 99": lambda w: (
        ["to-inference", w / "tk", "--opset", "99"],
        ["opset 99"],
    ),
    "to-inference: output exists": lambda w: (
        ["to-inference", w / "k3.keras", "-o", _rules(w, "m.onnx", b"keep")],
        ["m.onnx", "already exists"],
    ),
    "to-inference: keras-out exists": lambda w: (
        ["to-inference", w / "k3.keras", "--keras-out", w / "custom.keras"],
        ["custom.keras", "already exists"],
    ),
    "to-inference: keras-out is a directory (Keras 3)": lambda w: (
        ["to-inference", w / "k3.keras", "--keras-out", w / "nothing", "--force"],
        ["nothing", "is a directory", "--keras-out"],
    ),
    "to-inference: tf-keras keras-out is a non-SavedModel directory": lambda w: (
        ["to-inference", w / "tk", "--keras-out", w / "nothing", "--force"],
        ["nothing", "not a SavedModel"],
    ),
    "to-inference: output is a directory": lambda w: (
        ["to-inference", w / "tk", "-o", w / "nothing", "--force"],
        ["nothing"],
    ),
    "to-inference: report is the output": lambda w: (
        ["to-inference", w / "k3.keras", "-o", w / "m.onnx", "--report", w / "m.onnx"],
        ["--output and --report", "m.onnx"],
    ),
    "to-inference: output directory missing": lambda w: (
        ["to-inference", w / "tk", "-o", w / "no" / "m.onnx"],
        ["does not exist"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option(work, case):
    argv, fragments = BAD_OPTIONS[case](work)
    before = _tree_digest(work)
    _assert_one_error_line(_run(*argv), *fragments)
    assert _tree_digest(work) == before


# name -> (argv builder, option click names in its message)
USAGE_ERRORS = {
    "tolerance -1": (lambda w: ["to-inference", w / "k3.keras", "--tolerance", "-1"],
                     "--tolerance"),
    "tolerance nan": (lambda w: ["to-inference", w / "tk", "--tolerance", "nan"],
                      "--tolerance"),
    "rule file is a directory": (
        lambda w: ["to-sync", w / "k3.keras", "--rules", w / "nothing"], "--rules"
    ),
    "to directory": (lambda w: ["inspect", w / "k3.keras", "--to", "onnx"], "--to"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error(work, case):
    make, option = USAGE_ERRORS[case]
    before = _tree_digest(work)
    _assert_usage_error(_run(*make(work)), option)
    assert _tree_digest(work) == before


def test_custom_objects_advice_works_for_tf_keras_savedmodel(work, monkeypatch):
    """The fix the unknown-layer error names (--custom-objects) loads the model."""
    (work / "tk_halver.py").write_text(textwrap.dedent("""
        import tf_keras

        class Halver(tf_keras.layers.Layer):
            def call(self, x):
                return 0.5 * x
        """))
    monkeypatch.chdir(work)
    try:
        result = _run("inspect", work / "tk_custom", "--custom-objects", "tk_halver")
    finally:
        sys.modules.pop("tk_halver", None)
    assert result.exit_code == 0, result.output
    assert "1 layer would be converted (to sync)" in result.stdout


# ------------------------------------------------------------ console script

def _console_script():
    script = pathlib.Path(sys.executable).with_name("bnconvert")
    if not script.exists():
        script = shutil.which("bnconvert")
    if script is None:
        pytest.skip("the bnconvert console script is not installed")
    return str(script)


# name -> (argv builder, fragments)
CONSOLE_CASES = {
    "to-sync tf-keras SavedModel with unknown custom layer": (
        lambda w: ["to-sync", w / "tk_custom"], ["'Halver'"]
    ),
    "inspect Keras 3 export() dir": (lambda w: ["inspect", w / "served"], ["served"]),
    "to-inference tf-keras opset 99": (
        lambda w: ["to-inference", w / "tk", "--opset", "99"], ["opset 99"]
    ),
    "to-sync rule file not UTF-8": (
        lambda w: ["to-sync", w / "tk", "--rules", _rules(w, "r.toml", b"\xff\xfe")],
        ["r.toml"],
    ),
    "inspect random bytes .h5": (lambda w: ["inspect", w / "noise.h5"], ["noise.h5"]),
}


@pytest.fixture(scope="module")
def console_runs(built, tmp_path_factory):
    """Runs every console case at once (each starts TensorFlow: ~5 s)."""
    script = _console_script()
    w = tmp_path_factory.mktemp("console") / "w"
    shutil.copytree(built, w)
    # Building the command lines writes their rule files: inputs too.
    argvs = {
        name: [script] + [str(a) for a in make(w)]
        for name, (make, _) in CONSOLE_CASES.items()
    }
    before = _tree_digest(w)
    env = dict(os.environ)
    # What a user's shell would have: no TensorFlow settings of ours.
    for key in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND", "PYTHONWARNINGS"):
        env.pop(key, None)
    procs = {
        name: subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, cwd=w,
        )
        for name, argv in argvs.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return results, before, _tree_digest(w)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONSOLE_CASES))
def test_console_script_prints_one_error_line(console_runs, case):
    results, before, after = console_runs
    returncode, out, err = results[case]
    assert returncode == 1, err
    assert out == ""
    # Exactly one line: no TensorFlow start-up or loader chatter around it.
    assert err.count("\n") == 1, err
    assert err.startswith("Error: "), err
    for fragment in CONSOLE_CASES[case][1]:
        assert fragment in err, err
    assert after == before
