"""Issue 16's findings 3, 4, 5 (check batch), 8-12 and 14: checks that cannot be fooled.

3: a model whose outputs are NaN or Inf fails the one comparison (or passes
only on request, with a warning); so does a non-finite checked output and a
non-finite check input. 4: string-input models convert. 5: a declared input
too large for a check batch is refused before allocating it. 8: names from
a model are printed with their control characters escaped. 9: the replica
group size is bounded. 10: the Python API refuses what the CLI refuses. 11:
empty output paths are refused. 12: Ctrl-C once every output is in place
does not turn a success into a failure. 14: messages say what happened.

References are independent of the code under test: NumPy's own counts of
NaN/Inf, the original model's outputs, the bytes of the files.
"""

import errno
import os
import pathlib
import signal
import subprocess
import threading
import time
import warnings

import keras
import numpy as np
import pytest

import bnconvert
from bnconvert import _keras3
from bnconvert import check_batch
from bnconvert import check_inputs
from bnconvert import layer_args
from bnconvert import verify
from bnconvert.errors import BnconvertError
from bnconvert.errors import ConversionError
from bnconvert.errors import VerificationError
from bnconvert.printable import printable
from file_checks import run_cli
from file_checks import tree_digest
from test_safety import RUN_S
from test_safety import _env
from test_safety import _one_error
from test_safety import _ours
from test_safety import _script

EVIL_INPUT = "x\x1b]0;pwned\x07"
EVIL_BN = "bn\n0 layers converted\r"
VOCABULARY = ["red", "green", "blue"]


def _dense_bn(name, input_name="x", bn_name="bn"):
    inputs = keras.Input((4,), name=input_name)
    y = keras.layers.BatchNormalization(name=bn_name)(keras.layers.Dense(3, name="d")(inputs))
    return keras.Model(inputs, y, name=name)


def _string_model():
    inputs = keras.Input((1,), dtype="string", name="colour")
    x = keras.layers.StringLookup(vocabulary=VOCABULARY, name="lookup")(inputs)
    x = keras.layers.Embedding(len(VOCABULARY) + 1, 4, name="embed")(x)
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Flatten(name="flat")(x))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="strings")
    model.get_layer("bn").moving_mean.assign([0.1, -0.2, 0.3, 0.0])
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("checks")
    _dense_bn("k3").save(d / "k3.keras")
    nan = _dense_bn("nan")
    nan.get_layer("bn").moving_variance.assign(-np.ones(3))  # sqrt(-1 + eps): NaN
    nan.save(d / "nan.keras")
    _string_model().save(d / "strings.keras")
    _dense_bn("evil", EVIL_INPUT, EVIL_BN).save(d / "evil.keras")
    return d


# ---------------------------------------------------------------- 3: non-finite outputs

def _compare(expected, actual, **kwargs):
    return verify.compare([np.asarray(expected)], [np.asarray(actual)], tolerance=1e-4,
                          relative=True, **kwargs)


def test_3_nonfinite_reference_fails_and_says_how_many():
    reference = np.array([[np.nan, 1.0, np.inf], [np.nan, -np.inf, 2.0]])
    with pytest.raises(VerificationError) as info:
        _compare(reference, reference.copy())
    message = str(info.value)
    assert "\n" not in message
    nan, inf = int(np.isnan(reference).sum()), int(np.isinf(reference).sum())
    assert f"{nan} NaN and {inf} Inf among {reference.size} values" in message
    assert "--allow-nonfinite" in message and "differ by up to" not in message


def test_3_inf_on_both_sides_says_what_happened():
    overflow = np.full((2, 3), np.inf)
    with pytest.raises(VerificationError) as info:
        _compare(overflow, overflow.copy())
    assert "0 NaN and 6 Inf among 6 values" in str(info.value)
    assert "differ by up to inf" not in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_3_nonfinite_checked_output_never_passes(bad):
    reference = np.array([[1.0, 2.0, 3.0]])
    actual = reference.copy()
    actual[0, 1] = bad
    for allow in (False, True):
        with pytest.raises(VerificationError, match="1 NaN/Inf value"):
            _compare(reference, actual, allow_nonfinite=allow)


def test_3_allow_nonfinite_accepts_only_the_same_values_and_warns():
    reference = np.array([[np.nan, np.inf, 1.0]])
    with pytest.warns(RuntimeWarning, match="1 NaN and 1 Inf"):
        assert _compare(reference, reference.copy(), allow_nonfinite=True) == (0.0, 0.0)
    for other in ([[np.inf, np.inf, 1.0]], [[np.nan, -np.inf, 1.0]], [[np.nan, 5.0, 1.0]]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(VerificationError):
                _compare(reference, other, allow_nonfinite=True)


def test_3_all_nan_model_fails_to_sync_and_to_inference(work):
    before = tree_digest(work)
    for command, out in (("to-sync", "out.keras"), ("to-inference", "out.onnx")):
        line = _one_error(run_cli(command, work / "nan.keras", "-o", work / out),
                          "6 NaN and 0 Inf among 6 values", "--allow-nonfinite")
        assert "max |diff| = 0" not in line
    assert tree_digest(work) == before


def test_3_allow_nonfinite_warns_and_onnx_reproduces_the_nans(work):
    import onnxruntime as ort

    result = run_cli("to-inference", work / "nan.keras", "-o", work / "n.onnx",
                     "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert "warning: non-finite outputs accepted" in result.stdout
    x = np.ones((2, 4), np.float32)
    keras_out = np.asarray(keras.saving.load_model(work / "nan.keras")(x))
    onnx_out = ort.InferenceSession(str(work / "n.onnx")).run(None, {"x": x})[0]
    assert np.isnan(keras_out).all() and np.isnan(onnx_out).all()


def test_3_api_refuses_nan_check_inputs(tmp_path):
    model = _dense_bn("m")
    with pytest.raises(VerificationError, match="8 NaN/Inf"):
        bnconvert.export_onnx(model, tmp_path / "m.onnx", inputs=np.full((2, 4), np.nan))
    with pytest.raises(VerificationError, match="1 NaN/Inf"):
        bnconvert.convert_model(model, check_inputs=np.array([[1.0, 2.0, np.inf, 0.0]]))
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- 4: string inputs

def test_4_string_model_converts_and_says_how_to_check(work):
    result = run_cli("to-sync", work / "strings.keras", "-o", work / "s.keras")
    assert result.exit_code == 0, result.output
    assert "not verified: no check batch can be generated for input 0 of dtype string" \
        in result.stdout
    assert "check_inputs=" in result.stdout
    reloaded = keras.saving.load_model(work / "s.keras")
    assert type(reloaded.get_layer("bn")) is bnconvert.SyncBatchNormalization
    words = np.array([["blue"], ["red"], ["unknown"]])
    original = keras.saving.load_model(work / "strings.keras")
    np.testing.assert_array_equal(reloaded(words, training=False), original(words, training=False))


def test_4_string_model_checked_on_given_inputs():
    model = _string_model()
    words = np.array([["green"], ["red"]])
    converted, report = bnconvert.convert_model(model, check_inputs=words, return_report=True)
    assert report.verified and report.max_abs_diff == 0.0
    assert report.verification_note.startswith("the given check inputs")
    np.testing.assert_array_equal(converted(words, training=False), model(words, training=False))
    with pytest.raises(VerificationError, match="must hold strings"):
        bnconvert.convert_model(model, check_inputs=np.ones((2, 1)))


def test_4_string_model_checked_on_a_cli_check_input(work, tmp_path):
    words = np.array([["green"], ["red"], ["unknown"]])
    np.save(tmp_path / "words.npy", words)
    result = run_cli("to-sync", work / "strings.keras", "-o", work / "s2.keras",
                     "--check-input", tmp_path / "words.npy")
    assert result.exit_code == 0, result.output
    assert "not verified" not in result.stdout and "verified on the written file: max |diff| = 0" in result.stdout
    reloaded = keras.saving.load_model(work / "s2.keras")
    original = keras.saving.load_model(work / "strings.keras")
    np.testing.assert_array_equal(reloaded(words, training=False), original(words, training=False))
    # The check input is an input: no output may replace it.
    clash = run_cli("to-sync", work / "strings.keras", "-o", tmp_path / "words.npy", "--force",
                    "--check-input", tmp_path / "words.npy")
    assert clash.exit_code != 0 and np.load(tmp_path / "words.npy").shape == (3, 1)


def test_4_cli_check_input_feeds_the_onnx_check_too(tmp_path):
    model = _dense_bn("m")
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(4).normal(size=(5, 4)).astype("float32") * 50
    np.save(tmp_path / "x.npy", x)
    result = run_cli("to-inference", tmp_path / "m.keras", "-o", tmp_path / "m.onnx",
                     "--check-input", tmp_path / "x.npy")
    assert result.exit_code == 0, result.output
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-4)
    bad = run_cli("to-sync", tmp_path / "m.keras", "-o", tmp_path / "s.keras",
                  "--check-input", tmp_path / "missing.npy")
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert not (tmp_path / "s.keras").exists()


def test_4_onnx_check_without_any_batch_refuses():
    from bnconvert.onnx import check as ort_check

    model = _dense_bn("m")
    with pytest.raises(VerificationError, match="No check batch can be generated"):
        ort_check.compare(model, b"", ["x"], ["bn"], [None], 1e-4, 1e-5)


# ---------------------------------------------------------------- 5: check batch size

def test_5_huge_declared_input_is_refused_before_allocating():
    inputs = keras.Input((60000, 60000), name="big")
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs), name="big")
    with pytest.raises(VerificationError) as info:
        check_batch.sample_inputs(model)
    expected_gib = 2 * 60000 * 60000 * 8 / 2**30  # float64 draws before the cast
    assert f"{expected_gib:.1f} GiB" in str(info.value)
    assert "BNCONVERT_MAX_CHECK_MB" in str(info.value)


def test_5_the_limit_comes_from_the_environment_and_fails_closed(monkeypatch):
    model = _dense_bn("m")
    monkeypatch.setenv("BNCONVERT_MAX_CHECK_MB", "1")
    assert check_batch.sample_inputs(model)[0][0].shape == (2, 4)
    inputs = keras.Input((400, 400), name="mid")  # 2*400*400*8 = 2.56 MB
    mid = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    with pytest.raises(VerificationError, match="over the 1 MB limit"):
        check_batch.sample_inputs(mid)
    for bad in ("", "0", "-5", "lots", "nan"):
        monkeypatch.setenv("BNCONVERT_MAX_CHECK_MB", bad)
        with pytest.raises(VerificationError, match="BNCONVERT_MAX_CHECK_MB must be"):
            check_batch.sample_inputs(model)


# ---------------------------------------------------------------- 8: terminal injection

def test_8_printable_escapes_every_control_character():
    controls = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] + ["\u202e", "\u2028"]
    escaped = printable("a" + "".join(controls) + "é✓")
    assert escaped.isprintable() and escaped.endswith("é✓")
    assert printable("one\ntwo\x1b", newlines=True) == "one\ntwo\\x1b"


@pytest.mark.parametrize("command", ["inspect", "to-sync"])
def test_8_names_with_escapes_are_printed_escaped(work, command):
    args = [command, work / "evil.keras"] + (["-o", work / "e.keras"] if command == "to-sync" else [])
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    for text in (result.stdout, result.stderr):
        assert not any(c in text for c in "\x1b\x07\r"), repr(text)
    assert "bn\\n0 layers converted\\r" in result.stdout
    assert not any(line.startswith("0 layers converted") for line in result.stdout.splitlines())


def test_8_error_lines_are_escaped_too(work, monkeypatch):
    from bnconvert import convert

    def refuse(job, **kwargs):
        raise ConversionError(f"Cannot rewrite layer '{EVIL_INPUT}/{EVIL_BN}'.")

    monkeypatch.setattr(convert, "run_conversion", refuse)
    line = _one_error(run_cli("to-sync", work / "evil.keras", "-o", work / "e.keras"))
    assert line.isprintable(), repr(line)
    # Line breaks fold into blanks (one line); the rest is escaped.
    assert "'x\\x1b]0;pwned\\x07/bn 0 layers converted '" in line


def test_8_json_keeps_the_real_names(work):
    import json

    result = run_cli("inspect", work / "evil.keras", "--json")
    assert "\x1b" not in result.stdout
    data = json.loads(result.stdout)
    assert [row["path"] for row in data["layers"]] == [f"evil/{EVIL_BN}"]


# ---------------------------------------------------------------- 9: sync_group_size

@pytest.mark.parametrize("size", [2**16 + 1, 2**63 - 1, 2**63, 10**30])
def test_9_group_size_is_bounded_everywhere(work, size):
    with pytest.raises(ValueError, match="from 0 to 65536"):
        bnconvert.SyncBatchNormalization(sync_group_size=size)
    with pytest.raises(ConversionError, match="from 1 to 65536"):
        bnconvert.convert_model(_dense_bn("m"), sync_group_size=size)
    _one_error(run_cli("to-sync", work / "k3.keras", "-o", work / "g.keras",
                       "--sync-group-size", str(size)), "from 1 to 65536")
    rules = work / "big.toml"
    rules.write_text(
        '[[rule]]\nname = "big"\ndirection = "sync"\nmatch = ["keras.layers.BatchNormalization"]\n'
        'target = "bnconvert>SyncBatchNormalization"\n[rule.config]\ndrop = ["synchronized"]\n'
        f"set = {{ sync_group_size = {min(size, 2**63 - 1)} }}\n"
    )
    _one_error(run_cli("to-sync", work / "k3.keras", "-o", work / "g.keras", "--rules", rules),
               "big.toml", "set.sync_group_size", "65536")
    assert not (work / "g.keras").exists()


def test_9_the_largest_group_is_accepted():
    assert layer_args.check_sync_group_size(layer_args.MAX_SYNC_GROUP_SIZE) == 2**16
    layer = bnconvert.SyncBatchNormalization(sync_group_size=2**16)
    assert layer.get_config()["sync_group_size"] == 2**16


# ---------------------------------------------------------------- 10: Python API

@pytest.fixture
def fifo(tmp_path):
    """A FIFO named .npy; a writer opens it after 10 s so that a blocked reader ends."""
    path = tmp_path / "fifo.npy"
    os.mkfifo(path)
    done = threading.Event()

    def unblock():
        if not done.wait(10):
            with open(path, "wb"):
                pass

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()


def _sparse_npy(path, rows):
    with open(path, "wb") as f:  # a header declaring rows x 4 float32, no data
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (rows, 4)})
    return path


def test_10_check_input_files_are_refused_before_reading(tmp_path, fifo):
    model = _dense_bn("m")
    out = tmp_path / "m.onnx"
    np.save(tmp_path / "strings.npy", np.array([["a", "b", "c", "d"]]))
    cases = {
        fifo: "not a regular file",
        _sparse_npy(tmp_path / "sparse.npy", 2**29): "8.0 GiB",
        tmp_path / "strings.npy": "must be a numeric array",
        tmp_path / "missing.npy": "No such file",
    }
    for path, fragment in cases.items():
        start = time.monotonic()
        with pytest.raises(VerificationError, match=fragment):
            bnconvert.export_onnx(model, out, inputs=path)
        assert time.monotonic() - start < 8, path  # the FIFO was not waited on
    assert not out.exists()


@pytest.mark.parametrize("inputs, fragment", [
    (np.zeros((0, 4), np.float32), "no rows"),
    (np.array([[object()] * 4]), "object array"),
    (np.array([["1", "2", "3", "4"]]), "numeric array"),
    (np.float32(1.0), "has shape ()"),
])
def test_10_bad_check_arrays(tmp_path, inputs, fragment):
    with pytest.raises(VerificationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        bnconvert.export_onnx(_dense_bn("m"), tmp_path / "m.onnx", inputs=inputs)
    with pytest.raises(VerificationError):
        bnconvert.convert_model(_dense_bn("m"), check_inputs=inputs)


@pytest.mark.parametrize("name", ["tolerance", "atol"])
@pytest.mark.parametrize("value", [float("nan"), -1e-3, float("inf"), "1e-4", True])
def test_10_tolerances_must_be_finite_and_non_negative(tmp_path, name, value):
    with pytest.raises(ConversionError, match=f"`{name}` must be a finite number"):
        bnconvert.export_onnx(_dense_bn("m"), tmp_path / "m.onnx", **{name: value})
    if name == "tolerance":
        with pytest.raises(ConversionError, match="`tolerance` must be a finite number"):
            bnconvert.convert_model(_dense_bn("m"), tolerance=value)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("opset", ["17", True, 17.0])
def test_10_opset_type_is_named(tmp_path, opset):
    with pytest.raises(ConversionError, match="must be a whole number") as info:
        bnconvert.export_onnx(_dense_bn("m"), tmp_path / "m.onnx", opset=opset)
    assert "cannot write opset" not in str(info.value)


def test_10_good_check_inputs_still_run(tmp_path):
    model = _dense_bn("m")
    np.save(tmp_path / "ok.npy", np.ones((3, 4), np.float64))
    assert check_inputs.user_inputs(model, tmp_path / "ok.npy")[0].dtype == np.float32
    result = bnconvert.export_onnx(model, tmp_path / "m.onnx", inputs={"x": np.ones((5, 4))})
    assert result.batches == 2


# ---------------------------------------------------------------- 11: empty paths

@pytest.mark.parametrize("option", ["-o", "--report", "--keras-out"])
def test_11_empty_output_paths_are_refused(work, option):
    command = "to-sync" if option != "--keras-out" else "to-inference"
    before = tree_digest(work)
    _one_error(run_cli(command, work / "k3.keras", option, ""), "is empty")
    assert tree_digest(work) == before


# ---------------------------------------------------------------- 14: messages

def test_14_dangling_symlink_output_says_so(work):
    (work / "link.keras").symlink_to(work / "nowhere.keras")
    for extra in ([], ["--force"]):
        _one_error(run_cli("to-sync", work / "k3.keras", "-o", work / "link.keras", *extra),
                   "dangling symbolic link", "nowhere.keras")
    assert not (work / "nowhere.keras").exists()
    assert os.readlink(work / "link.keras") == str(work / "nowhere.keras")


def _full_disk(self, model, path, fmt):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("what", ["model", "report", "onnx"])
def test_14_full_disk_names_the_real_output(work, monkeypatch, what):
    before = tree_digest(work)
    if what == "model":
        monkeypatch.setattr(_keras3.Keras3Flavour, "save", _full_disk)
        args, named = ["to-sync", work / "k3.keras", "-o", work / "o.keras"], "o.keras"
    else:
        method = "write_text" if what == "report" else "write_bytes"

        def refuse(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

        monkeypatch.setattr(pathlib.Path, method, refuse)
        args = ["to-inference", work / "k3.keras", "-o", work / "o.onnx", "--report",
                work / "r.json"]
        named = "r.json" if what == "report" else "o.onnx"
    line = _one_error(run_cli(*args), f"Cannot write {work / named}", "No space left on device")
    assert ".partial" not in line and ".bnc" not in line
    assert tree_digest(work) == before


@pytest.mark.parametrize("model", ["missing.keras", "k3.keras"])
def test_14_options_are_checked_before_the_model(work, model):
    rules = work / "broken.toml"
    rules.write_text("this is not toml = = =")
    _one_error(run_cli("to-inference", work / model, "--opset", "99", "--rules", rules),
               "cannot write opset 99")
    _one_error(run_cli("to-sync", work / model, "--sync-group-size", str(2**20), "--rules", rules),
               "sync_group_size")


# ---------------------------------------------------------------- 12: Ctrl-C after success

@pytest.mark.slow
def test_12_ctrl_c_after_the_outputs_are_placed_exits_0(work):
    """A SIGINT once "Wrote" is printed, while the process is still exiting."""
    # The custom-objects module keeps the interpreter in its exit for a
    # while, so that the signal surely lands after the outputs are placed.
    (work / "linger.py").write_text("import atexit, time\natexit.register(time.sleep, 5)\n")
    out = work / "out.keras"
    proc = subprocess.Popen(
        [_script(), "to-sync", str(work / "k3.keras"), "-o", str(out), "--custom-objects",
         str(work / "linger.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(work), cwd=work,
    )
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("Wrote"):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=RUN_S)
    assert printed and printed[-1] == f"Wrote {out}\n", printed + [rest, err]
    assert proc.returncode == 0, (proc.returncode, err)
    assert err == ""
    assert keras.saving.load_model(out).get_layer("bn").__class__.__name__ == \
        "SyncBatchNormalization"
    assert _ours(work) == []


def test_12_placed_is_reported_after_the_commit_only(work):
    from bnconvert import pipeline

    seen = []
    out = work / "p.keras"
    options = pipeline.Options(command="to-sync", model=str(work / "k3.keras"), output=str(out))
    pipeline.run(options, placed=lambda: seen.append(out.exists()))
    assert seen == [True]
    with pytest.raises(BnconvertError):
        pipeline.run(options, placed=lambda: seen.append("again"))  # exists, no --force
    assert seen == [True]


def test_10_check_input_size_counts_zero_width_strings(tmp_path, monkeypatch):
    # A 128-byte file declaring 3e7 zero-width strings: 3e7 Python objects once cast.
    path = tmp_path / "u0.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<U0", "fortran_order": False, "shape": (30_000_000, 1)})
    monkeypatch.setenv("BNCONVERT_MAX_CHECK_MB", "1")
    with pytest.raises(VerificationError, match="over the 1 MB limit"):
        check_inputs._load_array(str(path))


def test_10_check_input_finite_after_the_cast():
    model = _dense_bn("m")
    with pytest.raises(VerificationError, match="NaN/Inf value\\(s\\) as float32"):
        check_inputs.user_inputs(model, np.array([[1e300, 1.0, 0.0, 2.0]]))
    (ok,) = check_inputs.user_inputs(model, np.array([[1e30, 1.0, 0.0, 2.0]]))
    assert ok.dtype == np.float32 and np.isfinite(ok).all()
