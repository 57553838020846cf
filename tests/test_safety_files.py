"""Issue 16's findings on what a model file's config makes Keras do: 1, 5, 6, 14, 15.

1: a config naming a local file (a lookup layer's `vocabulary` path) is
refused before Keras reads it, unless opted in. 5: a config declaring more
weights than its file stores is refused before anything is built. 6: an H5
`model_config` and a SavedModel's `keras_metadata.pb` are held to the
config size limit. 14: Keras 3's own refusal of a vocabulary path is
reported as what it is. 15: a tf-keras `.h5` needing an unregistered
activation says which and how to pass it.
"""

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tf_keras
from tf_keras.protobuf import saved_metadata_pb2

import bnconvert
from bnconvert import config_checks
from bnconvert import flavour as flavour_lib
from bnconvert import formats
from bnconvert import model_io
from bnconvert import weight_bounds
from bnconvert.errors import ModelLoadError
from file_checks import run_cli
from file_checks import tree_digest
from test_safety import _one_error
from test_safety import built  # noqa: F401  (the fixture behind `work`)

SECRET = "TOPSECRET-not-to-be-copied"


def _rewrite_zip(path, edit, out=None):
    """Rewrites `config.json` of the `.keras` archive `path` with `edit(config)`."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(out or path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out or path


def _layer(config, name):
    return next(l for l in config["config"]["layers"] if l["config"]["name"] == name)


def _point_h5(path, target):
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        _layer(config, "lookup")["config"]["vocabulary"] = str(target)
        f.attrs["model_config"] = json.dumps(config).encode()


def _point_saved_model(directory, target):
    path = directory / "keras_metadata.pb"
    message = saved_metadata_pb2.SavedMetadata()
    message.ParseFromString(path.read_bytes())
    for node in message.nodes:
        node.metadata = node.metadata.replace(
            '"vocabulary": ["a", "b"]', json.dumps({"vocabulary": str(target)})[1:-1]
        )
    path.write_bytes(message.SerializeToString())


@pytest.fixture(scope="module")
def lookups(built, tmp_path_factory):  # noqa: F811
    """Lookup models of each flavour and format whose vocabulary names a secret file."""
    d = tmp_path_factory.mktemp("lookups")
    secret = d / "id_rsa"
    secret.write_text(SECRET + "\n")
    inputs = tf_keras.Input((1,), dtype="string")
    y = tf_keras.layers.StringLookup(vocabulary=["a", "b"], name="lookup")(inputs)
    y = tf_keras.layers.CategoryEncoding(4, output_mode="one_hot")(y)
    y = tf_keras.layers.BatchNormalization(name="bn")(tf_keras.layers.Dense(2, name="d")(y))
    tk = tf_keras.Model(inputs, y)
    tk.save(d / "tk.h5")
    _point_h5(d / "tk.h5", secret)
    tk.save(d / "tksm")
    _point_saved_model(d / "tksm", secret)
    inputs = keras.Input((1,), dtype="string")
    y = keras.layers.StringLookup(vocabulary=["a", "b"], name="lookup")(inputs)
    k3 = keras.Model(inputs, y)
    k3.save(d / "k3.keras")
    k3.save(d / "k3.h5")
    _point_h5(d / "k3.h5", secret)
    _rewrite_zip(d / "k3.keras",
                 lambda c: _layer(c, "lookup")["config"].update(vocabulary=str(secret)))
    return d


# ------------------------------------------------- 1: local files named in a config

@pytest.mark.parametrize("name", ["tk.h5", "tksm", "k3.keras", "k3.h5"])
def test_1_vocabulary_path_is_refused_and_nothing_is_written(lookups, tmp_path, name):
    before = tree_digest(lookups)
    out = tmp_path / {"tk.h5": "out.h5", "tksm": "out"}.get(name, "out.keras")
    line = _one_error(
        run_cli("to-sync", lookups / name, "-o", out),
        "'lookup' (StringLookup)", "vocabulary", "id_rsa", "--allow-asset-paths",
    )
    assert SECRET not in line
    assert list(tmp_path.iterdir()) == []
    assert tree_digest(lookups) == before


@pytest.mark.parametrize("name", ["tk.h5", "tksm"])
def test_1_opting_in_converts_the_model(lookups, tmp_path, name):
    out = tmp_path / ("out.h5" if name == "tk.h5" else "out")
    result = run_cli("to-sync", lookups / name, "-o", out, "--allow-asset-paths")
    assert result.exit_code == 0, result.output
    assert out.exists()
    model = model_io.load_model(out, allow_asset_paths=True)
    assert type(model.get_layer("bn")).__name__ == "SyncBatchNormalization"
    if name == "tk.h5":
        # The vocabulary was read from the named file, as the user allowed
        # (a SavedModel's lookup table comes back from its saved graph).
        assert SECRET in model.get_layer("lookup").get_vocabulary()


def test_1_api_refuses_unless_allowed(lookups):
    with pytest.raises(ModelLoadError, match="allow_asset_paths=True"):
        bnconvert.inspect_model(str(lookups / "tk.h5"))
    report = bnconvert.inspect_model(str(lookups / "tk.h5"), allow_asset_paths=True)
    assert report.converted == 1


def _archive(tmp_path, layer_config, class_name="Dense", name="m.keras"):
    """A `.keras` archive holding only a config: one layer with `layer_config`."""
    config = {
        "class_name": "Functional",
        "config": {"name": "m", "layers": [
            {"class_name": class_name, "config": {"name": "x", **layer_config}},
        ]},
    }
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", json.dumps(config))
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
    return formats.resolve(path)


@pytest.mark.parametrize("value, refused", [
    ("/etc/hostname-that-need-not-exist", True),  # an asset key: any string
    ("gs://bucket/vocab.txt", True),
    (["/etc/passwd", "a", "~"], False),  # an inline vocabulary is data
    (None, False),
])
def test_1_asset_keys(tmp_path, value, refused):
    found = _archive(tmp_path, {"vocabulary": value}, "StringLookup")
    if refused:
        with pytest.raises(ModelLoadError, match="'x' \\(StringLookup\\) names the file"):
            config_checks.check_model_config(found)
    else:
        config_checks.check_model_config(found)
    config_checks.check_model_config(found, allow_asset_paths=True)


def test_1_any_key_naming_an_existing_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file.txt").write_text(SECRET)
    monkeypatch.chdir(tmp_path)
    for value in (str(tmp_path / "sub" / "file.txt"), "sub/file.txt"):
        found = _archive(tmp_path, {"anything": {"deep": value}}, "Custom")
        with pytest.raises(ModelLoadError, match="names the file.*\\(deep\\)"):
            config_checks.check_model_config(found)
    # Paths that name no file, and encoded data that looks like a path, pass.
    for value in (str(tmp_path / "missing.txt"), "/9j/4AAQSkZJRg==", "relu"):
        config_checks.check_model_config(_archive(tmp_path, {"anything": value}, "Custom"))


# ------------------------------------------------- 5: declared weight sizes

def _big_dense(work, units, input_dim=4):
    def edit(config):
        dense = _layer(config, "d")
        dense["config"]["units"] = units
        dense["build_config"] = {"input_shape": [None, input_dim]}
    return _rewrite_zip(work / "k3.keras", edit, work / "big.keras")


def test_5_dense_of_a_billion_units_is_refused_before_keras_builds(work, monkeypatch):
    big = _big_dense(work, 10 ** 9)
    assert big.stat().st_size < 16 << 10

    def no_load(*args, **kwargs):
        raise AssertionError("Keras was asked to build the declared model")

    monkeypatch.setattr(flavour_lib.get("keras3"), "load", no_load)
    line = _one_error(
        run_cli("inspect", big), "big.keras", "layer 'd' (Dense)", "4e+09", "14.9 GB",
        "BNCONVERT_MAX_DECLARED_MB",
    )
    assert "KB of weights" in line


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_5_tf_keras_h5_sizes_follow_the_graph(tmp_path, kind):
    """tf-keras `.h5` configs record no input shapes: the graph tells them."""
    if kind == "sequential":
        model = tf_keras.Sequential([
            tf_keras.Input((4,)), tf_keras.layers.Dense(5, name="wide"),
            tf_keras.layers.BatchNormalization(), tf_keras.layers.Dense(3, name="next"),
        ])
    else:
        inputs = tf_keras.Input((4,))
        y = tf_keras.layers.Dense(5, name="wide")(inputs)
        y = tf_keras.layers.Add()([tf_keras.layers.ReLU()(y), y])
        model = tf_keras.Model(inputs, tf_keras.layers.Dense(3, name="next")(y))
    path = tmp_path / "m.h5"
    model.save(path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        _layer(config, "wide")["config"]["units"] = 10 ** 5
        _layer(config, "next")["config"]["units"] = 10 ** 5
        assert "build_config" not in json.dumps(_layer(config, "next"))
        f.attrs["model_config"] = json.dumps(config).encode()
    # Each layer's units alone are 4e5 and 1e5 weights; 'next' builds 1e10.
    with pytest.raises(ModelLoadError, match="1e\\+10 weights.*layer 'next' \\(Dense\\)"):
        config_checks.check_model_config(formats.resolve(path))


def test_5_zeros_in_the_archive_do_not_count_as_stored_weights(work, monkeypatch):
    monkeypatch.setenv("BNCONVERT_MAX_DECLARED_MB", "0")
    big = _big_dense(work, 10 ** 6)  # 4e6 weights, 15 MB as float32
    with zipfile.ZipFile(big, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("assets/padding", bytes(8 << 20))  # states 8 MB, holds ~8 KB
    with pytest.raises(ModelLoadError, match="layer 'd' \\(Dense\\)"):
        config_checks.check_model_config(formats.resolve(big))


def test_5_limit_is_overridable(work, monkeypatch):
    big = _big_dense(work, 3000, input_dim=100)  # 300k weights, 1.14 MB as float32
    found = formats.resolve(big)
    monkeypatch.setenv("BNCONVERT_MAX_DECLARED_MB", "0.5")
    with pytest.raises(ModelLoadError, match="declares 3e\\+05 weights"):
        config_checks.check_model_config(found)
    monkeypatch.setenv("BNCONVERT_MAX_DECLARED_MB", "2")
    config_checks.check_model_config(found)
    monkeypatch.setenv("BNCONVERT_MAX_DECLARED_MB", "nan")
    with pytest.raises(ModelLoadError, match="BNCONVERT_MAX_DECLARED_MB must be"):
        config_checks.check_model_config(found)


_LAYERS = [
    (lambda: keras.layers.Dense(7), (None, 5)),
    (lambda: keras.layers.Conv2D(4, 3), (None, 8, 8, 3)),
    (lambda: keras.layers.Conv2D(6, 3, groups=3), (None, 8, 8, 3)),
    (lambda: keras.layers.Conv1D(4, 3, data_format="channels_first"), (None, 3, 9)),
    (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (None, 8, 8, 3)),
    (lambda: keras.layers.SeparableConv1D(5, 3), (None, 10, 4)),
    (lambda: keras.layers.Conv2DTranspose(4, 3), (None, 8, 8, 3)),
    (lambda: keras.layers.Conv3D(2, (1, 2, 3)), (None, 4, 4, 4, 2)),
    (lambda: keras.layers.Embedding(50, 8), (None, 3)),
    (lambda: keras.layers.LSTM(6), (None, 4, 5)),
    (lambda: keras.layers.GRU(6), (None, 4, 5)),
    (lambda: keras.layers.SimpleRNN(6), (None, 4, 5)),
    (lambda: keras.layers.BatchNormalization(), (None, 5)),
    (lambda: bnconvert.SyncBatchNormalization(axis=1), (None, 5, 2)),
    (lambda: keras.layers.MultiHeadAttention(2, 4, value_dim=3), [(None, 3, 8), (None, 3, 8)]),
]


@pytest.mark.parametrize("make, shape", _LAYERS)
def test_5_declared_weights_bound_what_keras_builds(make, shape):
    layer = make()
    layer.build(*shape) if isinstance(shape, list) else layer.build(shape)
    built_weights = sum(int(np.prod(w.shape)) for w in layer.weights)
    entry = dict(keras.saving.serialize_keras_object(layer), build_config=layer.get_build_config())
    entry = json.loads(json.dumps(entry))  # as a file holds it
    declared = weight_bounds.declared_weights(entry)
    # A lower bound (never refusing a real file), and a tight one.
    assert built_weights / 2 <= declared <= built_weights, (declared, built_weights)


def _real_models():
    k_inputs = keras.Input((12,), dtype="int32")
    y = keras.layers.Embedding(100, 8)(k_inputs)
    y = keras.layers.LSTM(16)(y)
    y = keras.layers.BatchNormalization()(keras.layers.Dense(1000)(y))
    k3 = keras.Model(k_inputs, keras.layers.Dense(500)(y))
    t_inputs = tf_keras.Input((16, 16, 3))
    y = tf_keras.layers.Conv2D(64, 3)(t_inputs)
    y = tf_keras.layers.SeparableConv2D(32, 3)(tf_keras.layers.BatchNormalization()(y))
    y = tf_keras.layers.GlobalAveragePooling2D()(tf_keras.layers.DepthwiseConv2D(3)(y))
    tk = tf_keras.Model(t_inputs, tf_keras.layers.Dense(2000)(tf_keras.layers.Dense(1000)(y)))
    return k3, tk


def test_5_real_models_pass_without_slack(tmp_path, monkeypatch):
    monkeypatch.setenv("BNCONVERT_MAX_DECLARED_MB", "0")
    k3, tk = _real_models()
    k3.save(tmp_path / "k3.keras")
    k3.save(tmp_path / "k3.h5")
    tk.save(tmp_path / "tk.h5")
    tk.save(tmp_path / "tksm")
    seen = []

    def check(model_file, documents, stored):
        seen.append((sum(weight_bounds.declared(documents).values()), stored))
        return real_check(model_file, documents, stored)

    real_check = weight_bounds.check
    monkeypatch.setattr(weight_bounds, "check", check)
    for name in ("k3.keras", "k3.h5", "tk.h5", "tksm"):
        config_checks.check_model_config(formats.resolve(tmp_path / name))
    # Never more than the file really stores (no layer counted twice), and
    # most of it (these models' weights are in counted layers).
    for (declared, stored), model in zip(seen, (k3, k3, tk, tk)):
        actual = model.count_params()
        assert 0.8 * actual <= declared <= actual <= stored / 4, (declared, actual, stored)


# ------------------------------------------------- 6: config size of H5 and SavedModel

def _pad_h5_config(path, fixed):
    """Rewrites the H5 model `path` with a 2 MB `model_config` (fixed or variable length)."""
    padded = path.with_name("padded.h5")
    with h5py.File(path, "r") as src, h5py.File(padded, "w", libver="latest") as dst:
        for name in src:
            src.copy(src[name], dst)
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        text = json.dumps(json.loads(src.attrs["model_config"])) + " " * (2 << 20)
        del dst.attrs["model_config"]
        dst.attrs["model_config"] = np.bytes_(text.encode()) if fixed else text.encode()
    padded.replace(path)


@pytest.mark.parametrize("fixed", [False, True], ids=["variable-length", "fixed-length"])
def test_6_h5_model_config_above_the_limit(work, monkeypatch, fixed):
    monkeypatch.setenv("BNCONVERT_MAX_CONFIG_MB", "1")
    model_io.load_model(work / "tk.h5")  # the same file, below the limit
    _pad_h5_config(work / "tk.h5", fixed)
    with h5py.File(work / "tk.h5", "r") as f:
        assert h5py.h5a.open(f.id, b"model_config").dtype.kind == ("S" if fixed else "O")
    _one_error(run_cli("inspect", work / "tk.h5"), "tk.h5", "model_config", "BNCONVERT_MAX_CONFIG_MB")
    monkeypatch.setenv("BNCONVERT_MAX_CONFIG_MB", "3")
    model_io.load_model(work / "tk.h5")


def test_6_saved_model_metadata_above_the_limit(work, monkeypatch):
    monkeypatch.setenv("BNCONVERT_MAX_CONFIG_MB", "0.001")
    _one_error(run_cli("inspect", work / "tksm"), "tksm", "keras_metadata.pb",
               "BNCONVERT_MAX_CONFIG_MB")


def test_6_unreadable_metadata_is_refused(work):
    (work / "tksm" / "keras_metadata.pb").write_bytes(b"\xff" * 64)
    _one_error(run_cli("inspect", work / "tksm"), "tksm", "keras_metadata.pb", "cannot be read")


def test_6_saved_model_check_fails_closed(work, monkeypatch):
    import sys

    import tf_keras.protobuf

    monkeypatch.delattr(tf_keras.protobuf, "saved_metadata_pb2", raising=False)
    monkeypatch.setitem(sys.modules, "tf_keras.protobuf.saved_metadata_pb2", None)
    with pytest.raises(ModelLoadError, match="safely"):
        model_io.load_model(work / "tksm")


# ------------------------------------------------- 14, 15: messages that say what happened

def test_14_keras3_refusing_a_vocabulary_path_is_not_called_a_lambda(lookups):
    line = _one_error(
        run_cli("inspect", lookups / "k3.keras", "--allow-asset-paths"),
        "vocabulary file", "id_rsa", "--unsafe",
    )
    assert "Lambda" not in line
    result = run_cli("inspect", lookups / "k3.keras", "--allow-asset-paths", "--unsafe")
    assert result.exit_code == 0, result.output


def test_15_missing_custom_activation_is_named(tmp_path):
    def doubled(x):
        return x * 2.0

    model = tf_keras.Sequential([
        tf_keras.Input((4,)), tf_keras.layers.Dense(3, activation=doubled, name="d"),
        tf_keras.layers.BatchNormalization(name="bn"),
    ])
    model.save(tmp_path / "act.h5")
    line = _one_error(run_cli("inspect", tmp_path / "act.h5"), "'doubled'", "--custom-objects")
    assert "corrupt" not in line
    module = tmp_path / "acts.py"
    module.write_text("def doubled(x):\n    return x * 2.0\n")
    # tf-keras writes such a function in a form its own .h5 loader cannot
    # read back even when given it: said so, not "pass it".
    _one_error(run_cli("inspect", tmp_path / "act.h5", "--custom-objects", module),
               "'doubled'", "tf-keras limitation", "SavedModel")
    # Older writers stored the function's name, which loads once given.
    with h5py.File(tmp_path / "act.h5", "r+") as f:
        config = json.loads(f.attrs["model_config"])
        _layer(config, "d")["config"]["activation"] = "doubled"
        f.attrs["model_config"] = json.dumps(config).encode()
    _one_error(run_cli("inspect", tmp_path / "act.h5"), "'doubled'", "--custom-objects MODULE")
    out = tmp_path / "out"  # a SavedModel: tf-keras's .h5 writer has the limitation
    result = run_cli("to-sync", tmp_path / "act.h5", "-o", out, "--custom-objects", module)
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    reloaded = tf_keras.models.load_model(out, custom_objects={"doubled": doubled})
    np.testing.assert_allclose(reloaded(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


# ------------------------------------------- 5: the stored size is what the file really holds

def _declare_big_dense(config, units):
    if isinstance(config, dict):
        if config.get("class_name") == "Dense":
            config["config"]["units"] = units
            config["build_config"] = {"input_shape": [None, units]}
        for value in config.values():
            _declare_big_dense(value, units)
    elif isinstance(config, list):
        for value in config:
            _declare_big_dense(value, units)


def _crafted_keras(tmp_path, model, units, pad_claims=0):
    """`model` saved, its Dense layers declaring `units` x `units`; padding members claiming 4 GB."""
    import struct

    model.save(tmp_path / "src.keras")
    with zipfile.ZipFile(tmp_path / "src.keras") as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(members["config.json"])
    _declare_big_dense(config, units)
    members["config.json"] = json.dumps(config).encode()
    out = tmp_path / "crafted.keras"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for i in range(pad_claims):
            archive.writestr(f"assets/pad{i}", b"x")
    data = bytearray(out.read_bytes())
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:  # the central directory: sizes are only claims
        length = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46:pos + 46 + length]).startswith(b"assets/pad"):
            struct.pack_into("<LL", data, pos + 20, 0xFFFFFFF0, 0xFFFFFFF0)
        pos = data.find(b"PK\x01\x02", pos + 46)
    out.write_bytes(bytes(data))
    return out


def test_5_zip_directory_claims_do_not_count_as_stored_weights(tmp_path):
    inputs = keras.Input((8,), name="in")
    model = keras.Model(inputs, keras.layers.Dense(4, name="d")(inputs))
    # 1e10 declared weights (37 GB); 12 members claim 4 GB each but hold a byte.
    crafted = _crafted_keras(tmp_path, model, 100_000, pad_claims=12)
    assert crafted.stat().st_size < 64 << 10
    with pytest.raises(ModelLoadError, match="declares 1e\\+10 weights"):
        config_checks.check_model_config(formats.resolve(crafted))


def test_5_nested_models_reusing_a_layer_name_each_count(tmp_path):
    inputs = keras.Input((16,), name="in")
    x = inputs
    for i in range(40):
        x = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, name="d")],
                             name=f"s{i}")(x)
    # 40 Dense layers all named "d", each declaring 16000 x 16000: 1e10 weights.
    crafted = _crafted_keras(tmp_path, keras.Model(inputs, x), 16_000)
    with pytest.raises(ModelLoadError, match="declares 1.02e\\+10 weights"):
        config_checks.check_model_config(formats.resolve(crafted))


def test_5_a_sparse_h5_does_not_count_its_holes(tmp_path):
    inputs = keras.Input((8,), name="in")
    keras.Model(inputs, keras.layers.Dense(4, name="d")(inputs)).save(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        config = json.loads(f.attrs["model_config"])
        _declare_big_dense(config, 100_000)
        f.attrs["model_config"] = json.dumps(config)
        # 8 GB declared, never written: a hole on disk.
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        plist.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        space = h5py.h5s.create_simple((2 << 30,))
        h5py.h5d.create(f.id, b"hole", h5py.h5t.NATIVE_FLOAT, space, plist)
    st = (tmp_path / "m.h5").stat()
    if st.st_blocks * 512 >= st.st_size:
        pytest.skip("this filesystem stores no sparse files")
    with pytest.raises(ModelLoadError, match="declares 1e\\+10 weights"):
        config_checks.check_model_config(formats.resolve(tmp_path / "m.h5"))
