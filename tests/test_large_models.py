"""Large models (issue 18) and the `.keras` container checks they go through (issue 16.2, 16.13).

The archive check must read a file's bytes at most about once, however
many datasets its weights hold: h5py on a zip member stream re-read the
member from its start on every backward seek, so checking a 480 MB
EfficientNetV2L took 241 s. The tests count the bytes the process reads
(`rchar` in /proc/self/io), never a time. A zip must not inflate like a bomb
through many small members, nor hold two members of one name.
"""

import contextlib
import json
import os
import pathlib
import sys
import warnings
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import bnconvert
from bnconvert import check_batch
from bnconvert import deep_load
from bnconvert import formats
from bnconvert import forward
from bnconvert import input_checks
from bnconvert import model_io
from bnconvert import pipeline
from bnconvert.errors import ModelLoadError
from file_checks import run_cli

_PROC_IO = pathlib.Path("/proc/self/io")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small Keras 3 model file, and its members (name -> bytes)."""
    d = tmp_path_factory.mktemp("large_models")
    inputs = keras.Input((4,), name="x")
    y = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(3, name="d")(inputs))
    keras.Model(inputs, y, name="small").save(d / "small.keras")
    with zipfile.ZipFile(d / "small.keras") as z:
        members = {n: z.read(n) for n in z.namelist()}
    return d / "small.keras", members


def _write_zip(path, members, compression=zipfile.ZIP_STORED):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", compression, compresslevel=1) as z:
            for name, data in members:
                z.writestr(name, data)
    return path


def _many_datasets(path, count=400, floats=1024):
    """An H5 file of `count` datasets, each `floats` float32 values of data."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i in range(count):
            f.create_dataset(f"layers/l{i:04d}/vars/0", data=rng.standard_normal(floats, "f4"))
    return path.read_bytes()


def _bytes_read():
    # rchar: bytes this process read through read(2) and friends.
    for line in _PROC_IO.read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not _PROC_IO.exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_archive_check_reads_the_weights_about_once(tmp_path, small, compression):
    _, members = small
    weights = _many_datasets(tmp_path / "w.h5")
    archive = _write_zip(
        tmp_path / "many.keras",
        [("config.json", members["config.json"]), ("model.weights.h5", weights)],
        compression,
    )
    size = archive.stat().st_size
    before = _bytes_read()
    with zipfile.ZipFile(archive) as z:
        input_checks.check_archive(archive, z)
    read = _bytes_read() - before
    # A re-read per backward seek costs hundreds of times the file here.
    assert read <= 2 * size + (1 << 20), (read, size)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_archive_check_sees_an_external_link_in_either_storage(tmp_path, small, compression):
    _, members = small
    inner = tmp_path / "w.h5"
    inner.write_bytes(members["model.weights.h5"])
    with h5py.File(inner, "r+") as f:
        f["leak"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/k")
    archive = _write_zip(
        tmp_path / "linked.keras",
        [(n, inner.read_bytes() if n == "model.weights.h5" else data)
         for n, data in members.items()],
        compression,
    )
    with pytest.raises(ModelLoadError, match="external link"):
        formats.resolve(archive)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_member_file_gives_the_member_bytes_at_any_seek(tmp_path, small, compression):
    _, members = small
    archive = _write_zip(tmp_path / "m.keras", list(members.items()), compression)
    want = members["model.weights.h5"]
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("model.weights.h5")
        with input_checks._member_file(archive, z, info) as f:
            assert f.read() == want
            for at in (len(want) - 7, 3, 0, len(want) // 2):
                f.seek(at)
                assert f.read(11) == want[at:at + 11]
            f.seek(-5, os.SEEK_END)
            assert f.read() == want[-5:]
            assert f.read(4) == b""


def test_well_formed_file_still_loads(small):
    path, _ = small
    model = model_io.load_model(path)
    assert [layer.name for layer in model.layers] == ["x", "d", "bn"]


# ---------------------------------------------------------------- 16.2: aggregate bomb

def test_many_small_members_inflating_together_are_refused(tmp_path, small):
    _, members = small
    zeros = bytes(20 << 20)  # each member stays below the per-member floor
    archive = _write_zip(
        tmp_path / "bombs.keras",
        [*members.items(), *((f"assets/pad{i}.bin", zeros) for i in range(5))],
        zipfile.ZIP_DEFLATED,
    )
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(ModelLoadError, match="compressed members would together inflate"):
        formats.resolve(archive)


def test_compressed_members_within_the_ratio_pass(tmp_path, small):
    _, members = small
    noise = np.random.default_rng(1).integers(0, 4, 80 << 20, np.uint8).tobytes()
    archive = _write_zip(
        tmp_path / "assets.keras", [*members.items(), ("assets/vocab.bin", noise)],
        zipfile.ZIP_DEFLATED,
    )
    assert formats.resolve(archive).format == formats.KERAS


def test_too_many_members_are_refused(tmp_path, small):
    _, members = small
    archive = _write_zip(
        tmp_path / "crowd.keras",
        [*members.items(), *((f"assets/{i}", b"") for i in range(10_000))],
    )
    with pytest.raises(ModelLoadError, match="10003 zip members"):
        formats.resolve(archive)


# ---------------------------------------------------------------- 16.13: duplicate names

@pytest.mark.parametrize("name", ["config.json", "model.weights.h5", "assets/a.txt"])
def test_duplicate_member_names_are_refused(tmp_path, small, name):
    _, members = small
    entries = [*members.items(), ("assets/a.txt", b"a")]
    entries.append((name, dict(entries)[name]))
    archive = _write_zip(tmp_path / "twice.keras", entries)
    with pytest.raises(ModelLoadError, match=f"two zip members named '{name}'") as raised:
        formats.resolve(archive)
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------- the cost of each step

def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_to_sync_report_times_every_step_and_does_no_work_twice(tmp_path, small, monkeypatch):
    path, _ = small
    checks = _counting(monkeypatch, input_checks, "check_archive")
    passes = _counting(monkeypatch, check_batch, "run")
    result = run_cli("to-sync", path, "-o", tmp_path / "s.keras", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data["timings"]) == [
        "input_checks", "rules", "load", "convert", "verify", "save", "file_check",
    ]
    assert all(seconds >= 0 for seconds in data["timings"].values())
    assert len(checks) == 1  # the input, once; never the file we wrote
    assert len(passes) == 2  # the original, and the written file loaded back
    verification = data["verification"]
    assert verification["verified"] and verification["max_abs_diff"] == 0.0
    assert verification["max_abs_diff"] == data["file_checks"][0]["max_abs_diff"]


def test_to_inference_report_times_fold_export_and_check(tmp_path, small):
    path, _ = small
    result = run_cli("to-inference", path, "-o", tmp_path / "m.onnx", "--report",
                     tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    timings = json.loads((tmp_path / "r.json").read_text())["timings"]
    assert {"load", "convert", "fold", "verify", "export", "onnxruntime_check"} <= set(timings)


def test_progress_shows_every_timed_step(tmp_path, small):
    path, _ = small
    shown = []

    class Recorder:
        @contextlib.contextmanager
        def step(self, label):
            shown.append(label)
            yield

    result = pipeline.run(
        pipeline.Options(command="to-sync", model=str(path), output=str(tmp_path / "p.keras")),
        Recorder(),
    )
    # One line per timed step, some steps (verify) more than once.
    assert len(shown) >= len(result.report.timings) == 7
    assert shown[-1].startswith(f"loading {tmp_path / 'p.keras'} back")


def test_convert_model_from_a_path_checks_the_file_once(small, monkeypatch):
    path, _ = small
    checks = _counting(monkeypatch, input_checks, "check_archive")
    model = bnconvert.convert_model(str(path))
    assert len(checks) == 1
    assert type(model.get_layer("bn")).__name__ == "SyncBatchNormalization"


# ---------------------------------------------------------------- forward passes of large models

def _chain():
    inputs = keras.Input((6, 6, 3), name="img")
    x = keras.layers.Conv2D(5, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="d")], name="inner")
    y = inner(keras.layers.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, y, name="chain")


def test_eager_bytes_counts_every_tensor_of_the_graph():
    model = _chain()
    arrays = [np.zeros((2, 6, 6, 3), "float32")]
    # conv and bn: 2*6*6*5 floats each; pool: 2*5; inner model: its dense 2*4,
    # and its output once more in the outer graph.
    want = 4 * (2 * (2 * 6 * 6 * 5) + 2 * 5 + 2 * 4 + 2 * 4)
    assert forward.eager_bytes(model, arrays) == want


def test_large_models_are_walked_eagerly_and_never_traced(monkeypatch):
    model = _chain()
    arrays, _ = check_batch.sample_inputs(model)
    eager = model(arrays[0], training=False).numpy()
    calls = _counting(monkeypatch, tf, "function")

    def traced():  # Keras makes tf.functions of its own
        return [c for c in calls if c and getattr(c[0], "__module__", "") == forward.__name__]

    # However large, a Functional model is run node by node (bnconvert.forward).
    monkeypatch.setattr(forward, "EAGER_LIMIT", 0)
    (walked,) = check_batch.run(model, arrays)
    np.testing.assert_array_equal(walked, eager)
    _, report = bnconvert.convert_model(model, return_report=True)
    assert report.verified and report.max_abs_diff <= 1e-6
    assert not traced()


# ---------------------------------------------------------------- models deeper than the recursion limit

def _loads_in(monkeypatch):
    """Records the thread each model load runs in."""
    from bnconvert import flavour as flavour_lib

    threads = []
    flavour = flavour_lib.get("keras3")
    real = type(flavour).load

    def load(self, *args, **kwargs):
        import threading

        threads.append((threading.current_thread().name, sys.getrecursionlimit()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(flavour), "load", load)
    return threads


def test_a_load_deeper_than_the_limit_runs_on_a_large_stack(small, monkeypatch):
    path, _ = small
    threads = _loads_in(monkeypatch)
    limit = sys.getrecursionlimit()
    model_io.load_model(path)
    assert threads[-1] == ("MainThread", limit)  # fits: loaded as before
    # As if each of its layers needed many frames: the worker thread, the
    # limit raised as far as the config's layer count needs, then put back.
    layers = len(keras.saving.load_model(path).layers)
    monkeypatch.setattr(deep_load, "FRAMES_PER_LAYER", 1000)
    model = model_io.load_model(path)
    assert threads[-1] == ("bnconvert-deep-load", deep_load.frames_needed(layers))
    assert sys.getrecursionlimit() == limit
    assert [l.name for l in model.layers] == ["x", "d", "bn"]


def test_a_config_counting_too_many_layers_is_refused_before_keras(small, monkeypatch):
    path, _ = small
    threads = _loads_in(monkeypatch)
    monkeypatch.setattr(deep_load, "FRAMES_PER_LAYER", 1000)
    monkeypatch.setattr(deep_load, "MAX_LAYERS", 2)
    with pytest.raises(ModelLoadError, match=r"counts 3 layers, more than the 2") as info:
        model_io.load_model(path)
    assert "\n" not in str(info.value) and not threads


@pytest.mark.slow
def test_a_chain_of_1200_layers_loads_with_its_outputs(tmp_path):
    # Keras's loader recurses once per layer: 1,201 layers exceed the
    # default limit of 1,000. Building the model recurses the same way.
    x = inputs = keras.Input((8,), name="x")
    for i in range(600):
        x = keras.layers.BatchNormalization(name=f"bn_{i}")(keras.layers.Dense(8, name=f"d_{i}")(x))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        model = keras.Model(inputs, x, name="chain")
    finally:
        sys.setrecursionlimit(limit)
    model.save(tmp_path / "chain.keras")
    with pytest.raises(RecursionError):
        keras.saving.load_model(tmp_path / "chain.keras")
    loaded = model_io.load_model(tmp_path / "chain.keras")
    assert sys.getrecursionlimit() == limit and len(loaded.layers) == 1201
    arrays, _ = check_batch.sample_inputs(model)
    np.testing.assert_array_equal(
        check_batch.run(loaded, arrays)[0], check_batch.run(model, arrays)[0]
    )
