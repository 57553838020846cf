"""Issue 10's findings, one regression test each: nothing runs, nothing leaks, nothing is lost.

S1/S2: a rule file or a model file must not make bnconvert run code or
read local files. D1-D6: inputs are never touched, outputs appear whole and
together or not at all, and a killed run's leftovers are cleaned up. U1-U12:
one line on stderr for every failure, Ctrl-C exits 130 writing nothing,
temporary names fit, outputs get the umask's permissions, bombs are
refused before they inflate, pipes never block, a BN subclass is not folded.

Cases that start processes (signals, concurrency) are bounded in count and
each process in time, and marked slow.
"""

import base64
import contextlib
import marshal
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import bnconvert
from bnconvert import _keras3
from bnconvert import flavour as flavour_lib
from bnconvert import model_io
from bnconvert import outputs
from bnconvert.errors import OutputError
from file_checks import run_cli
from file_checks import tree_digest

RUN_S = 240  # upper bound for one console-script run on a busy machine


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    inputs = keras.Input((4,), name="x")
    y = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(3, name="d")(inputs))
    k3 = keras.Model(inputs, y, name="k3")
    k3.save(d / "k3.keras")
    k3.save(d / "k3.h5")
    tk = tf_keras.Sequential(
        [tf_keras.Input((4,)), tf_keras.layers.Dense(3, name="d"),
         tf_keras.layers.BatchNormalization(name="bn")],
        name="tk",
    )
    tk.save(d / "tk.h5")
    tk.save(d / "tksm")
    return d


_digest = tree_digest


_run = run_cli


def _one_error(result, *fragments, code=1):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _ours(directory):
    """Temporary names of our pattern left in `directory`."""
    return sorted(p.name for p in pathlib.Path(directory).iterdir() if ".bnc" in p.name)


# ---------------------------------------------------------------- S1: rules are data

def _lambda_rule(work, marker):
    """A rule whose target is a Lambda carrying bytecode that writes `marker`."""
    source = f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]"
    code = compile(source, "rule", "eval").co_consts[0]
    function = base64.b64encode(marshal.dumps(code)).decode()
    path = work / "evil.toml"
    path.write_text(textwrap.dedent(f"""
        [[rule]]
        name = "bn-to-lambda"
        direction = "sync"
        match = ["keras.layers.BatchNormalization"]
        target = "Lambda"
        [rule.config]
        set = {{ function = "{function}", function_type = "lambda", module = "builtins", output_shape_type = "raw", output_shape = [3] }}
        """))
    return path


@pytest.mark.parametrize("model", ["tk.h5", "tksm", "k3.keras"])
def test_s1_rule_target_lambda_is_refused(work, model):
    marker = work / "ran.txt"
    rules = _lambda_rule(work, marker)
    before = _digest(work)
    _one_error(_run("to-sync", work / model, "--rules", rules, "-o", work / "out.h5"
                    if model != "k3.keras" else work / "out.keras"),
               "evil.toml", "target")
    assert not marker.exists()
    assert _digest(work) == before


def test_s1_rule_set_table_cannot_import_a_module(work, monkeypatch):
    """tf-keras imports any module a serialized object names: tables are refused."""
    marker = work / "imported.txt"
    (work / "evil_mod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    (work / "r.toml").write_text(textwrap.dedent("""
        [[rule]]
        name = "bn"
        direction = "sync"
        match = ["keras.layers.BatchNormalization"]
        target = "bnconvert>SyncBatchNormalization"
        [rule.config]
        set = { gamma_initializer = { module = "evil_mod", class_name = "function", config = "f" } }
        """))
    _one_error(_run("to-sync", work / "tk.h5", "--rules", work / "r.toml"),
               "set.gamma_initializer", "serialized objects")
    assert not marker.exists()
    sys.modules.pop("evil_mod", None)


@pytest.mark.parametrize("name", ["keras3", "tf_keras"])
def test_s1_from_config_runs_in_safe_mode(name, tmp_path):
    flavour = flavour_lib.get(name)
    marker = tmp_path / "ran.txt"
    layer = flavour.Lambda(lambda x: (open(marker, "w").write("ran"), x)[1])  # noqa: SIM115
    with pytest.raises(Exception, match="(?i)safe|unsafe|lambda"):
        flavour.from_config(flavour.Lambda, layer.get_config())(np.ones((1, 2), "float32"))
    assert not marker.exists()


# ---------------------------------------------------------------- S2: no local files

def _datasets(f):
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 2 else None)
    return names


def _poison(h5_path, how, secret):
    """Makes the first 2-D dataset (a Dense kernel) point at `secret`."""
    with h5py.File(h5_path, "r+") as f:
        name = _datasets(f)[0]
        data = f[name][()]
        del f[name]
        if how == "external storage":
            secret.write_bytes(np.full(data.shape, 7.0, data.dtype).tobytes())
            f.create_dataset(name, shape=data.shape, dtype=data.dtype,
                             external=[(str(secret), 0, data.nbytes)])
        elif how == "external link":
            with h5py.File(secret, "w") as s:
                s["k"] = np.full(data.shape, 7.0, data.dtype)
            f[name] = h5py.ExternalLink(str(secret), "/k")
        else:
            with h5py.File(secret, "w") as s:
                s["k"] = np.full(data.shape, 7.0, data.dtype)
            layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
            layout[:] = h5py.VirtualSource(str(secret), "k", shape=data.shape)
            f.create_virtual_dataset(name, layout)


def _poison_keras(archive_path, how, secret):
    inner = archive_path.with_name("inner.h5")
    with zipfile.ZipFile(archive_path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    inner.write_bytes(members["model.weights.h5"])
    _poison(inner, how, secret)
    members["model.weights.h5"] = inner.read_bytes()
    inner.unlink()
    with zipfile.ZipFile(archive_path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)


S2_CASES = [
    ("tk.h5", "external storage"), ("tk.h5", "external link"), ("tk.h5", "virtual"),
    ("k3.h5", "external storage"), ("k3.keras", "external storage"),
    ("k3.keras", "external link"),
]


@pytest.mark.parametrize("model,how", S2_CASES)
def test_s2_h5_pointing_outside_is_refused(work, model, how):
    secret = work / "secret.bin"
    target = work / model
    (_poison_keras if model.endswith(".keras") else _poison)(target, how, secret)
    before = _digest(work)
    _one_error(_run("to-sync", target), model, "refused")
    assert _digest(work) == before


# ---------------------------------------------------------------- D1-D3: inputs are sacred

def test_d1_output_directory_holding_the_input(work):
    victim = work / "victim_sm"
    victim.mkdir()
    shutil.copy(work / "tk.h5", victim / "tk.h5")
    before = _digest(work)
    _one_error(_run("to-sync", victim / "tk.h5", "-o", victim, "--force"), "input")
    _one_error(_run("to-inference", victim / "tk.h5", "-o", work / "m.onnx",
                    "--keras-out", victim, "--force"), "input")
    assert _digest(work) == before


def test_d2_output_inside_an_input_savedmodel(work):
    before = _digest(work)
    _one_error(_run("to-sync", work / "tksm", "-o", work / "tksm" / "assets" / "nested"),
               "inside the input")
    assert _digest(work) == before


D3_CASES = {
    "report is a FIFO": lambda w: (os.mkfifo(w / "fifo.json"),
                                   ["--report", w / "fifo.json"])[1],
    "report is the rule file": lambda w: (
        (w / "r.toml").write_text("version = 1\n"),
        ["--rules", w / "r.toml", "--report", w / "r.toml"])[1],
    "report is the custom-objects file": lambda w: (
        (w / "co.py").write_text("X = 1\n"),
        ["--custom-objects", w / "co.py", "--report", w / "co.py"])[1],
    "output is a symlink to the input": lambda w: (
        os.symlink(w / "k3.keras", w / "link.keras"), ["-o", w / "link.keras"])[1],
    "output is a hard link to the input": lambda w: (
        os.link(w / "k3.keras", w / "hard.keras"), ["-o", w / "hard.keras"])[1],
}


@pytest.mark.parametrize("case", list(D3_CASES))
def test_d3_force_never_replaces_an_input_or_a_special_file(work, case):
    extra = D3_CASES[case](work)
    before = _digest(work)
    _one_error(_run("to-sync", work / "k3.keras", "--force", *extra))
    assert _digest(work) == before
    if (work / "fifo.json").exists():
        assert stat.S_ISFIFO(os.lstat(work / "fifo.json").st_mode)


# ---------------------------------------------------------------- D4-D6: outputs

@pytest.mark.parametrize("kind", [outputs.FILE, outputs.DIRECTORY])
def test_d4_an_output_that_appears_meanwhile_is_not_replaced(tmp_path, kind):
    out = tmp_path / ("o.keras" if kind == outputs.FILE else "sm")
    with pytest.raises(OutputError, match="appeared"):
        with outputs.Outputs(force=False) as staged:
            tmp = staged.stage(out, kind)
            if kind == outputs.FILE:
                tmp.write_bytes(b"ours")
                out.write_bytes(b"theirs")
            else:
                (tmp / "saved_model.pb").write_bytes(b"ours")
                out.mkdir()
                (out / "saved_model.pb").write_bytes(b"theirs")
            staged.commit()
    theirs = out if kind == outputs.FILE else out / "saved_model.pb"
    assert theirs.read_bytes() == b"theirs"
    assert _ours(tmp_path) == []


def test_d5_stale_temporaries_of_dead_runs_are_removed(work):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid, live = dead.pid, os.getpid()
    names = {
        f".out.keras.bnc{pid}.abcd1234.partial.keras": "file",
        f".tk2.bnc{pid}.abcd_123.partial": "dir",
        f".m.onnx.bnc{pid}.0123abcd.tmp": "dir",
        f".kept.keras.bnc{live}.abcd1234.partial.keras": "file",
        ".notours.keras.partial": "file",
    }
    for name, kind in names.items():
        (work / name).mkdir() if kind == "dir" else (work / name).write_bytes(b"x")
    # A replaced output whose replacement never arrived comes back.
    (work / f".prev.keras.bnc{pid}.abcdef12.old").write_bytes(b"previous")
    result = _run("to-sync", work / "k3.keras", "-o", work / "new.keras")
    assert result.exit_code == 0, result.output
    assert _ours(work) == [f".kept.keras.bnc{live}.abcd1234.partial.keras"]
    assert (work / ".notours.keras.partial").exists()
    assert (work / "prev.keras").read_bytes() == b"previous"


def test_d6_failing_report_leaves_no_model(work, monkeypatch):
    real = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if ".bnc" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    before = _digest(work)
    _one_error(_run("to-sync", work / "k3.keras", "-o", work / "o.keras",
                    "--report", work / "r.json"), "No space left")
    assert _digest(work) == before


def test_d6_failing_keras_out_leaves_no_onnx(work, monkeypatch):
    def fail(model, tmp, fmt, out):
        raise OutputError(f"Cannot write {out}: No space left on device")

    monkeypatch.setattr(model_io, "write_model", fail)
    before = _digest(work)
    _one_error(_run("to-inference", work / "k3.keras", "-o", work / "m.onnx",
                    "--keras-out", work / "f.keras", "--no-check"), "f.keras")
    assert _digest(work) == before


def test_d6_failed_commit_with_force_restores_replaced_outputs(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_bytes(b"old a")
    with pytest.raises(OutputError):
        with outputs.Outputs(force=True) as staged:
            staged.stage(first).write_bytes(b"new a")
            staged.stage(second).write_bytes(b"new b")
            second.mkdir()  # appears meanwhile, and is not a file: commit fails
            staged.commit()
    assert first.read_bytes() == b"old a"
    assert second.is_dir()
    assert _ours(tmp_path) == []


# ---------------------------------------------------------------- U1, U2, U6: one line

def test_u1_deeply_nested_rule_file(work):
    (work / "deep.toml").write_text("a = " + "[" * 1000 + "]" * 1000 + "\n")
    _one_error(_run("inspect", work / "k3.keras", "--rules", work / "deep.toml"),
               "deep.toml", "nested too deeply")


def test_u2_full_disk_in_savedmodel_save(work, monkeypatch):
    flavour = flavour_lib.get("tf_keras")

    def save(self, model, path, fmt):
        raise tf.errors.ResourceExhaustedError(None, None, "out of disk\nline 2\nline 3")

    monkeypatch.setattr(type(flavour), "save", save)
    before = _digest(work)
    _one_error(_run("to-sync", work / "tksm", "-o", work / "out"), "Cannot write", "out of disk")
    assert _digest(work) == before


def test_u2_unexpected_exception_is_one_line_and_debug_shows_it(work, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(_keras3.Keras3Flavour, "save", boom)
    _one_error(_run("to-sync", work / "k3.keras"), "RuntimeError", "kaboom", "--debug")
    result = _run("--debug", "to-sync", work / "k3.keras")
    assert isinstance(result.exception, RuntimeError)
    assert _ours(work) == [] and not (work / "k3.sync.keras").exists()


def test_u6_warnings_stay_off_stderr(work, monkeypatch):
    import warnings

    real = _keras3.Keras3Flavour.load

    def noisy(self, *args, **kwargs):
        warnings.warn("a Keras UserWarning", UserWarning)
        warnings.warn("Skipping invalid path ../x", UserWarning)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_keras3.Keras3Flavour, "load", noisy)
    result = _run("to-sync", work / "k3.keras")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


# ---------------------------------------------------------------- U3/U4: Ctrl-C

def _sigint_then(swallow):
    """A stand-in step that receives Ctrl-C; Keras's bare except may swallow it."""
    def step(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except BaseException:  # noqa: B036 - what Keras's saving_lib does
            if not swallow:
                raise
        return args
    return step


@pytest.mark.parametrize("where", ["load, swallowed", "load", "save", "report"])
def test_u4_ctrl_c_exits_130_and_writes_nothing(work, monkeypatch, where):
    before = _digest(work)
    if where.startswith("load"):
        real = _keras3.Keras3Flavour.load

        def load(self, *args, **kwargs):
            model = real(self, *args, **kwargs)
            _sigint_then(swallow=where.endswith("swallowed"))()
            return model

        monkeypatch.setattr(_keras3.Keras3Flavour, "load", load)
    elif where == "save":
        monkeypatch.setattr(_keras3.Keras3Flavour, "save", _sigint_then(swallow=True))
    else:
        real_write = pathlib.Path.write_text

        def write_text(self, *args, **kwargs):
            out = real_write(self, *args, **kwargs)
            _sigint_then(swallow=True)()
            return out

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    result = _run("to-sync", work / "k3.keras", "--report", work / "r.json")
    assert _one_error(result, code=130) == "Interrupted: nothing was written."
    assert _digest(work) == before


# ---------------------------------------------------------------- U7, U8, U11

def test_u7_longest_legal_output_names(work):
    name = "n" * 245
    result = _run("to-inference", work / "k3.keras", "-o", work / f"{name}.onnx",
                  "--keras-out", work / f"{name[:-1]}.keras",
                  "--report", work / f"{name}x.json", "--no-check")
    assert result.exit_code == 0, result.output
    assert (work / f"{name}.onnx").is_file() and (work / f"{name[:-1]}.keras").is_file()
    assert len(f"{name}.onnx") == 250 and len(f"{name}x.json") == 251
    assert _ours(work) == []


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_u8_outputs_get_umask_permissions(work, mask):
    with _umask(mask):
        a = _run("to-sync", work / "tksm", "-o", work / "sm_out", "--report", work / "r.json")
        b = _run("to-inference", work / "k3.keras", "-o", work / "m.onnx",
                 "--keras-out", work / "f.keras", "--no-check")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    for name in ("r.json", "m.onnx", "f.keras"):
        assert stat.S_IMODE((work / name).stat().st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE((work / "sm_out").stat().st_mode) == 0o777 & ~mask


def test_u11_failed_save_leaves_no_scratch_directory(work, monkeypatch):
    import tempfile

    made = []
    tempdir_before = tempfile.gettempdir()

    def save(self, model, path, fmt):
        made.append(tempfile.mkdtemp())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_keras3.Keras3Flavour, "save", save)
    _one_error(_run("to-sync", work / "k3.keras"), "No space left")
    assert made and pathlib.Path(made[0]).parent.parent == work
    assert not pathlib.Path(made[0]).exists()
    assert tempfile.gettempdir() == tempdir_before
    assert _ours(work) == []


# ---------------------------------------------------------------- U9: bombs

def test_u9_config_above_the_limit(work, monkeypatch):
    monkeypatch.setenv("BNCONVERT_MAX_CONFIG_MB", "0.001")
    _one_error(_run("inspect", work / "k3.keras"), "config.json", "BNCONVERT_MAX_CONFIG_MB")


def test_u9_zip_bomb_member(work):
    bomb = work / "bomb.keras"
    with zipfile.ZipFile(work / "k3.keras") as src, zipfile.ZipFile(
        bomb, "w", zipfile.ZIP_DEFLATED
    ) as z:
        for n in src.namelist():
            if n != "config.json":
                z.writestr(n, src.read(n))
        with z.open("config.json", "w", force_zip64=True) as f:
            f.write(src.read("config.json")[:-1])
            for _ in range(80):
                f.write(b" " * (1 << 20))
            f.write(b"}")
    assert bomb.stat().st_size < 2 << 20
    _one_error(_run("inspect", bomb), "bomb.keras", "zip bomb")


def test_u9_h5_declaring_more_than_it_holds(work):
    with h5py.File(work / "tk.h5", "r+") as f:
        f.create_dataset("model_weights/huge", shape=(1 << 28,), dtype="f4",
                         chunks=(1 << 16,), compression="gzip")
    assert (work / "tk.h5").stat().st_size < 1 << 20
    _one_error(_run("inspect", work / "tk.h5"), "tk.h5", "declare")


# ---------------------------------------------------------------- U10: no blocking

@pytest.mark.parametrize(
    "case", ["model", "model in a directory", "rule file", "custom-objects file"]
)
def test_u10_fifos_never_block(work, case):
    if case == "model":
        os.mkfifo(work / "pipe.keras")
        argv = ["inspect", work / "pipe.keras"]
    elif case == "model in a directory":
        (work / "d").mkdir()
        os.mkfifo(work / "d" / "pipe.keras")
        argv = ["inspect", work / "d"]
    elif case == "rule file":
        os.mkfifo(work / "pipe.toml")
        argv = ["inspect", work / "k3.keras", "--rules", work / "pipe.toml"]
    else:
        os.mkfifo(work / "pipe.py")
        argv = ["inspect", work / "k3.keras", "--custom-objects", work / "pipe.py"]
    fragments = ["no model file"] if case == "model in a directory" else [
        "pipe.", "not a regular file"]
    _one_error(_run(*argv), *fragments)


# ---------------------------------------------------------------- U12: no wrong fold

def test_u12_bn_subclass_is_kept_not_folded():
    class ShiftedBN(keras.layers.BatchNormalization):
        def call(self, x, training=None):
            return super().call(x, training=training) + 1.0

    inputs = keras.Input((5,))
    y = ShiftedBN(name="mine")(keras.layers.Dense(4, name="d")(inputs))
    model = keras.Model(inputs, y)
    folded, report = bnconvert.convert_model(model, to="inference", return_report=True)
    events = {e.path.split("/")[-1]: e for e in report.events if e.action in ("kept", "folded")}
    assert events["mine"].action == "kept"
    assert any(isinstance(layer, ShiftedBN) for layer in folded.layers)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype("float32")
    np.testing.assert_allclose(folded(x), model(x), atol=1e-6)


# ---------------------------------------------------------------- processes (bounded)

def _script():
    script = pathlib.Path(sys.executable).with_name("bnconvert")
    if not script.exists():
        pytest.skip("the bnconvert console script is not installed")
    return str(script)


def _env(tmpdir):
    env = dict(os.environ, TMPDIR=str(tmpdir))
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.mark.slow
def test_processes_concurrency_sigint_and_warnings(work, tmp_path):
    """D4, U3, U6 in real processes, run side by side (4 processes)."""
    script, scratch = _script(), tmp_path / "scratch"
    scratch.mkdir()
    with zipfile.ZipFile(work / "k3.keras", "a") as z:
        z.writestr("../escape.txt", "zip entries outside the archive are skipped")
    before = _digest(work / "k3.keras")

    def start(*argv):
        return subprocess.Popen([script, *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(scratch),
                                cwd=work)

    racers = [start("to-sync", work / "k3.keras", "-o", work / "same.keras") for _ in range(2)]
    noisy = start("to-sync", work / "k3.keras", "-o", work / "quiet.keras")
    early = start("to-sync", work / "k3.keras", "-o", work / "early.keras")
    time.sleep(0.5)  # TensorFlow is still importing
    early.send_signal(signal.SIGINT)
    results = [p.communicate(timeout=RUN_S) + (p.returncode,) for p in [*racers, noisy, early]]
    codes = sorted(r[2] for r in results[:2])
    assert codes == [0, 1], results[:2]
    loser = next(r for r in results[:2] if r[2] == 1)
    assert loser[1].count("\n") == 1 and "same.keras" in loser[1], loser[1]
    assert zipfile.is_zipfile(work / "same.keras")
    out, err, code = results[2]
    assert code == 0 and err == "", err  # no UserWarning, no zipfile warning
    out, err, code = results[3]
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() in ([], ["Interrupted: nothing was written."])
    assert not (work / "early.keras").exists()
    assert not (work.parent / "escape.txt").exists()
    assert _digest(work / "k3.keras") == before
    assert _ours(work) == []
    assert [p.name for p in scratch.iterdir() if p.name.startswith("tmp")] == []


@pytest.mark.slow
def test_kills_leave_input_intact_and_leftovers_are_cleaned(work, tmp_path):
    """D5/U11 under SIGKILL and U4 under SIGINT: 2 kills and 2 interrupts, each bounded."""
    script, scratch = _script(), tmp_path / "scratch"
    scratch.mkdir()
    before = _digest(work / "k3.keras")
    outs = [work / "m.onnx", work / "f.keras", work / "r.json"]
    interrupted = 0
    command = [script, "to-inference", str(work / "k3.keras"), "-o", str(outs[0]),
               "--keras-out", str(outs[1]), "--report", str(outs[2]), "--force"]
    # Signals land at fractions of an undisturbed run's length, so that they
    # hit a running process on a fast machine and on a loaded one alike.
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, env=_env(scratch), cwd=work,
                   timeout=RUN_S, check=True)
    whole = time.perf_counter() - start
    for p in outs:
        p.unlink()
    for sig, share in [(signal.SIGKILL, 0.4), (signal.SIGKILL, 0.8),
                       (signal.SIGINT, 0.4), (signal.SIGINT, 0.8)]:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(scratch), cwd=work,
        )
        time.sleep(whole * share)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=RUN_S)
        assert _digest(work / "k3.keras") == before
        present = [p.exists() for p in outs]
        assert present in ([True] * 3, [False] * 3), present  # all or none
        if sig == signal.SIGINT:
            assert "Traceback" not in err, err
            if proc.returncode == 130:
                interrupted += 1
        for p in outs:  # the next trial starts from nothing
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    outputs.remove_stale(work)
    assert _ours(work) == []
    # Keras's scratch directories went beside the output, not to TMPDIR.
    assert [p.name for p in scratch.iterdir() if p.name.startswith("tmp")] == []
    assert interrupted >= 1
