"""One table of conversion and CLI cases, run in Keras 3 and in tf-keras.

Every case takes the `flavour` fixture (`keras3`, `tf_keras`); the models,
files and loaders of each flavour come from `tests/flavour_models.py`.
References are never bnconvert's own output: weights are compared bit for
bit with the original model's, outputs with the original model (in memory,
or freshly reloaded from its file by the flavour's own loader) or NumPy.

Where the flavours differ for a documented reason, the table says so:

- `FOLDED_BN`: a folded BN is rewritten in place into an identity of the
  same name (the graph, and the model's class, stay as they are): Keras 3's
  `Identity`, tf-keras's linear `Activation` (`bnconvert/_tf_keras.py`).
- `SUBCLASSED`: Keras 3 rewrites subclassed models; tf-keras refuses them
  (its sublayers cannot be swapped).
- `flavour.sync_output_name`: Keras 3 writes `.keras` only (an `.h5` input
  gives `NAME.sync.keras`); tf-keras keeps the input's format.
- `INSPECT_AXIS`: tf-keras stores a built BN's `axis` as a list of
  positive axes, Keras 3 as the int it was given.
"""

import collections
import hashlib
import json
import pathlib
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import bnconvert
import bnconvert_cli
from bnconvert.errors import ConversionError
from flavour_models import FLAVOURS
from flavour_models import FOLD_RTOL
from flavour_models import SWAP_ATOL
from flavour_models import Flavour
from flavour_models import randomize
from flavour_models import reload_in_fresh_process

# -- the table ----------------------------------------------------------------

Shape = collections.namedtuple("Shape", "bns folded kept")

# Model shape -> its BN layers, and which of them `to-inference` folds or
# keeps (and why, in the comment). The same in both flavours.
SHAPES = {
    "sequential": Shape(("bn1", "bn2"), ("bn1", "bn2"), ()),
    "sequential_no_input": Shape(("bn",), ("bn",), ()),
    "nested": Shape(("outer_bn", "inner_bn"), ("outer_bn", "inner_bn"), ()),
    # Called twice: never folded.
    "shared": Shape(("shared_bn",), (), ("shared_bn",)),
    # bn_out follows a ReLU: nothing to fold into.
    "multi_io": Shape(("bn_a", "bn_b", "bn_out"), ("bn_a", "bn_b"), ("bn_out",)),
    "frozen": Shape(("frozen_bn", "live_bn"), ("frozen_bn", "live_bn"), ()),
    "renorm": Shape(("renorm_bn",), ("renorm_bn",), ()),
    # bn_axis1 normalizes a spatial axis of the conv's output.
    "axis1": Shape(("bn_axis1", "bn_last"), ("bn_last",), ("bn_axis1",)),
    "synchronized": Shape(("sync_bn",), ("sync_bn",), ()),
}

# What stays of a folded BN in the folded model, by the kind of model that
# holds it (see the module docstring): `None` when it is gone.
FOLDED_BN = {
    "keras3": {"Functional": "Identity", "Sequential": "Identity"},
    "tf_keras": {"Functional": "Activation", "Sequential": "Activation"},
}

# convert_model on a subclassed model holding BN: converted, or the refusal.
SUBCLASSED = {"keras3": None, "tf_keras": "subclassed"}

# `inspect` settings of a BN built on a 4-D input with axis=1 / the default.
INSPECT_AXIS = {"keras3": (1, -1), "tf_keras": ([1], [3])}

# Whether `BatchNormalization(synchronized=True)` is still synchronized once
# saved and reloaded: tf-keras leaves `synchronized` out of `get_config()`,
# so its files forget it (the layer comes back as a plain, fused BN).
SYNCHRONIZED_SURVIVES_SAVING = {"keras3": True, "tf_keras": False}

# The shipped rule each flavour's `BatchNormalization(synchronized=True)`
# goes through at inference.
SYNC_BN_INFERENCE_RULE = "keras-sync-bn-to-bn"

FLAVOUR_FORMATS = [(f, fmt) for f in FLAVOURS for fmt in Flavour(f).formats]


@pytest.fixture(params=FLAVOURS)
def flavour(request):
    """The `Flavour` helper of one Keras flavour."""
    return Flavour(request.param)


@pytest.fixture(params=FLAVOUR_FORMATS, ids=[f"{f}-{fmt}" for f, fmt in FLAVOUR_FORMATS])
def saved(request):
    """`(flavour, fmt)`: one of the file formats each flavour saves."""
    name, fmt = request.param
    return Flavour(name), fmt


def build(flavour, shape):
    """The model of `shape` (a key of `SHAPES`) in `flavour`."""
    return getattr(flavour, shape)()


def assert_outputs_close(expected, actual, *, atol=None, rtol=None):
    """Each output within `atol`, or within `rtol` of its largest magnitude."""
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        diff = np.abs(e - a).max()
        if atol is not None:
            assert diff <= atol, diff
        else:
            assert diff <= rtol * np.abs(e).max(), (diff, np.abs(e).max())


def assert_weights_equal(expected, actual):
    """Two `{key: array}` snapshots are the same, bit for bit and dtype for dtype."""
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        assert value.dtype == actual[key].dtype, key
        np.testing.assert_array_equal(actual[key], value, err_msg=str(key))


def events_by_layer(report):
    """Layer name -> its one event in `report`."""
    return {e.path.split("/")[-1]: e for e in report.events}


# -- Python API ---------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_to_sync(flavour, shape):
    """Every BN becomes SyncBN; weights, settings, outputs and the original kept."""
    model = build(flavour, shape)
    x = flavour.inputs_for(model)
    before = flavour.all_weights(model)
    reference = flavour.outputs(model, x)

    synced, report = bnconvert.convert_model(model, "sync", return_report=True)

    assert isinstance(synced, flavour.k.Model) and synced is not model
    bns = SHAPES[shape].bns
    assert report.converted == len(bns) and report.skipped == 0
    assert sorted(e.path.split("/")[-1] for e in report.events) == sorted(bns)
    assert {e.rule for e in report.events} == {"bn-to-sync"}
    assert report.verified and report.max_abs_diff <= SWAP_ATOL
    new_bns = flavour.bn_layers(synced)
    assert sorted(l.name for l in new_bns) == sorted(bns)  # a shared BN stays one layer
    for layer in new_bns:
        assert type(layer) is flavour.SYNC, layer.name
        old = flavour.layer(model, layer.name)
        assert layer.trainable == old.trainable
        for key in ("axis", "momentum", "epsilon", "center", "scale", "renorm"):
            assert getattr(layer, key) == getattr(old, key), key
    # Every weight of every layer, bit for bit; the original untouched.
    assert_weights_equal(before, flavour.all_weights(synced))
    assert_weights_equal(before, flavour.all_weights(model))
    assert all(type(l) is flavour.BN for l in flavour.bn_layers(model))
    assert_outputs_close(reference, flavour.outputs(synced, x), atol=SWAP_ATOL)
    if shape == "nested":  # paths from the model down, through the nested model
        assert sorted(e.path for e in report.events) == [
            "nested/inner/inner_bn", "nested/outer_bn",
        ]
    if shape == "shared":
        assert len(flavour.layer(synced, "shared_bn")._inbound_nodes) == 2
    if shape == "renorm":
        assert len(flavour.layer(synced, "renorm_bn").weights) == 7


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_to_inference_folds(flavour, shape):
    """Foldable BN disappear (tf-keras: a linear Activation stays); outputs within 1e-5."""
    model = build(flavour, shape)
    x = flavour.inputs_for(model)
    before = flavour.all_weights(model)
    reference = flavour.outputs(model, x)
    expected = SHAPES[shape]

    folded, report = bnconvert.convert_model(model, "inference", return_report=True)

    assert report.folded == len(expected.folded)
    actions = collections.defaultdict(set)
    for event in report.events:
        actions[event.path.split("/")[-1]].add(event.action)
    for name in expected.folded:
        assert "folded" in actions[name], name
    for name in expected.kept:
        assert actions[name] == {"kept"} or actions[name] == {"kept", "unchanged"}, name
    classes = flavour.classes(folded)
    for name in expected.folded:
        stays = FOLDED_BN[flavour.name][flavour.holder_kind(model, name)]
        if stays is None:
            assert name not in classes, name
        else:
            stand_in = flavour.layer(folded, name)
            assert type(stand_in).__name__ == stays and not stand_in.weights
            assert stand_in.get_config().get("activation", "linear") == "linear"
    for name in expected.kept:
        assert classes[name] is flavour.BN
        kept = flavour.layer(folded, name)
        assert getattr(kept, "synchronized", False) is False
        assert_weights_equal(
            {k: v for k, v in before.items() if k[0] == name},
            {(name, w): v for w, v in flavour.weights(kept).items()},
        )
    assert report.tolerance_kind == "relative" and report.max_rel_diff <= FOLD_RTOL
    assert_outputs_close(reference, flavour.outputs(folded, x), rtol=FOLD_RTOL)
    assert_weights_equal(before, flavour.all_weights(model))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_to_inference_without_fold_and_round_trip(flavour, shape):
    """sync -> inference(fold=False) gives the original back, bit for bit."""
    model = build(flavour, shape)
    x = flavour.inputs_for(model)
    before = flavour.all_weights(model)
    reference = flavour.outputs(model, x)

    plain, report = bnconvert.convert_model(model, "inference", fold=False, return_report=True)
    assert report.folded == 0
    assert all(type(l) is flavour.BN for l in flavour.bn_layers(plain))
    assert sorted(l.name for l in flavour.bn_layers(plain)) == sorted(SHAPES[shape].bns)
    assert_weights_equal(before, flavour.all_weights(plain))
    assert_outputs_close(reference, flavour.outputs(plain, x), atol=SWAP_ATOL)

    synced = bnconvert.convert_model(model, "sync")
    back, report = bnconvert.convert_model(synced, "inference", fold=False, return_report=True)
    assert report.converted == len(SHAPES[shape].bns)
    assert {e.rule for e in report.events} == {"sync-to-bn"}
    assert_weights_equal(before, flavour.all_weights(back))
    for layer in flavour.bn_layers(back):
        assert type(layer) is flavour.BN
        config = flavour.layer(model, layer.name).get_config()
        got = layer.get_config()
        if shape == "synchronized":
            # The synchronized BN comes back plain: that is what to-inference is for.
            assert config.pop("synchronized", True) and not got.pop("synchronized", False)
        assert got == config, layer.name
    assert_outputs_close(reference, flavour.outputs(back, x), atol=SWAP_ATOL)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_converting_twice_changes_nothing(flavour, shape):
    """Already synchronized layers stay as they are ("unchanged"), and so do plain BN."""
    model = build(flavour, shape)
    once = bnconvert.convert_model(model, "sync")
    snapshot = flavour.all_weights(once)
    twice, report = bnconvert.convert_model(once, "sync", return_report=True)
    n = len(SHAPES[shape].bns)
    assert report.converted == 0 and report.unchanged == n
    assert {(e.action, e.rule) for e in report.events} == {("unchanged", None)}
    assert all("already SyncBatchNormalization" in e.reason for e in report.events)
    assert all(type(l) is flavour.SYNC for l in flavour.bn_layers(twice))
    assert_weights_equal(snapshot, flavour.all_weights(twice))

    plain = bnconvert.convert_model(twice, "inference", fold=False)
    again, report = bnconvert.convert_model(plain, "inference", fold=False, return_report=True)
    if shape != "synchronized":
        assert report.converted == 0 and report.unchanged == n
    assert_weights_equal(snapshot, flavour.all_weights(again))


def test_shared_bn_kept_by_fold_is_one_event(flavour):
    """The report counts layers: a shared BN that is not folded is kept once."""
    model = flavour.shared()
    _, report = bnconvert.convert_model(model, "inference", return_report=True)
    kept = [e for e in report.events if e.action == "kept"]
    assert [e.path for e in kept] == ["shared/shared_bn"]
    assert report.counts()["kept"] == 1


def test_synchronized_bn_to_inference_goes_plain(flavour):
    """`BatchNormalization(synchronized=True)` becomes `synchronized=False` (no fold)."""
    model = flavour.synchronized()
    plain, report = bnconvert.convert_model(model, "inference", fold=False, return_report=True)
    (event,) = report.events
    assert (event.action, event.rule) == ("applied", SYNC_BN_INFERENCE_RULE)
    layer = flavour.layer(plain, "sync_bn")
    assert type(layer) is flavour.BN and layer.synchronized is False


def test_outputs_match_numpy(flavour):
    """Synced and folded outputs against a float64 NumPy BN(Dense(x))."""
    L = flavour.k.layers
    inp = flavour.k.Input((8,))
    model = randomize(flavour.k.Model(
        inp, flavour.BN(name="bn", epsilon=1e-3)(L.Dense(6, name="dense")(inp))
    ))
    x = flavour.inputs_for(model)
    w, b = (v.numpy().astype(np.float64) for v in model.get_layer("dense").weights)
    gamma, beta, mean, var = (v.numpy().astype(np.float64) for v in model.get_layer("bn").weights)
    scale = gamma / np.sqrt(var + 1e-3)
    expected = (x.astype(np.float64) @ w + b - mean) * scale + beta

    synced = bnconvert.convert_model(model, "sync")
    np.testing.assert_allclose(flavour.outputs(synced, x)[0], expected, rtol=0, atol=1e-5)
    folded = bnconvert.convert_model(model, "inference")
    np.testing.assert_allclose(flavour.outputs(folded, x)[0], expected, rtol=0, atol=1e-5)
    # The folded Dense holds W * s and (b - mean) * s + beta (float64, rounded once).
    kernel, bias = (v.numpy() for v in folded.get_layer("dense").weights)
    np.testing.assert_allclose(kernel, (w * scale).astype("float32"), rtol=1e-7)
    np.testing.assert_allclose(bias, ((b - mean) * scale + beta).astype("float32"), rtol=1e-6, atol=1e-7)


def test_bn_subclass_is_skipped_and_kept_by_fold(flavour):
    """A user's BN subclass no rule names: skipped with its reason, never folded."""
    model = flavour.with_subclass()
    x = flavour.inputs_for(model)
    mine = flavour.weights(model.get_layer("mine"))
    reference = flavour.outputs(model, x)

    synced, report = bnconvert.convert_model(model, "sync", return_report=True)
    events = events_by_layer(report)
    assert events["mine"].action == "skipped"
    assert "MyBN is a subclass of BatchNormalization that no rule names" in events["mine"].reason
    assert events["plain"].action == "applied"
    assert report.converted == 1 and report.skipped == 1
    assert type(synced.get_layer("mine")) is flavour.MyBN
    assert type(synced.get_layer("plain")) is flavour.SYNC

    folded, report = bnconvert.convert_model(model, "inference", return_report=True)
    actions = collections.defaultdict(list)
    for event in report.events:
        actions[event.path.split("/")[-1]].append((event.action, event.reason))
    assert [a for a, _ in actions["mine"]] == ["skipped", "kept"]
    assert "not plain BatchNormalization" in actions["mine"][1][1]
    assert [a for a, _ in actions["plain"]] == ["unchanged", "folded"]
    assert type(folded.get_layer("mine")) is flavour.MyBN
    assert_weights_equal(mine, flavour.weights(folded.get_layer("mine")))
    # d2 feeds the subclass: its kernel is left alone.
    np.testing.assert_array_equal(
        folded.get_layer("d2").weights[0].numpy(), model.get_layer("d2").weights[0].numpy()
    )
    assert_outputs_close(reference, flavour.outputs(folded, x), rtol=FOLD_RTOL)


MYBN_RULE = textwrap.dedent("""
    version = 1

    [[rule]]
    name = "mybn-to-sync"
    direction = "sync"
    match = ["flavour_tests>MyBN"]
    target = "bnconvert>SyncBatchNormalization"
    """)

BN_TO_SYNC_OFF = textwrap.dedent("""
    version = 1

    [[rule]]
    name = "bn-to-sync"
    enabled = false
    """)


def test_rule_file_naming_a_class(flavour, tmp_path):
    """A user rule naming the BN subclass by its registered name converts it."""
    rules = tmp_path / "mine.toml"
    rules.write_text(MYBN_RULE)
    model = flavour.with_subclass()
    x = flavour.inputs_for(model)
    before = flavour.all_weights(model)
    synced, report = bnconvert.convert_model(model, "sync", rules=[rules], return_report=True)
    assert type(synced.get_layer("mine")) is flavour.SYNC
    assert report.converted == 2
    assert {e.path.split("/")[-1]: e.rule for e in report.events} == {
        "plain": "bn-to-sync", "mine": "mybn-to-sync",
    }
    assert_weights_equal(before, flavour.all_weights(synced))
    assert_outputs_close(flavour.outputs(model, x), flavour.outputs(synced, x), atol=SWAP_ATOL)


def test_rule_file_disabling_a_shipped_rule(flavour, tmp_path):
    """`enabled = false` turns a shipped rule off: every BN is skipped."""
    rules = tmp_path / "off.toml"
    rules.write_text(BN_TO_SYNC_OFF)
    model = flavour.nested()
    out, report = bnconvert.convert_model(model, "sync", rules=[rules], return_report=True)
    assert report.converted == 0 and report.skipped == 2
    assert all(type(l) is flavour.BN for l in flavour.bn_layers(out))


def test_subclassed_model(flavour):
    """Keras 3 rewrites a subclassed model; tf-keras refuses it in one line."""
    k = flavour.k

    class Net(k.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = k.layers.Dense(4)
            self.bn = flavour.BN()

        def call(self, x, training=None):
            return self.bn(self.dense(x), training=training)

    net = Net()
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    net(x)
    if SUBCLASSED[flavour.name] is None:
        synced, report = bnconvert.convert_model(net, return_report=True)
        assert type(synced) is Net and type(synced.bn) is flavour.SYNC
        assert report.converted == 1
        assert_outputs_close(flavour.outputs(net, x), flavour.outputs(synced, x), atol=SWAP_ATOL)
    else:
        with pytest.raises(ConversionError, match=SUBCLASSED[flavour.name]) as info:
            bnconvert.convert_model(net)
        assert "\n" not in str(info.value)


def test_convert_model_from_a_path(saved, tmp_path):
    """`convert_model` takes the path of each format; the result saves and reloads."""
    flavour, fmt = saved
    model = flavour.nested()
    path = flavour.save(model, tmp_path, fmt)
    original = flavour.load(path)
    x = flavour.inputs_for(original)
    out, report = bnconvert.convert_model(str(path), "sync", return_report=True)
    assert isinstance(out, flavour.k.Model)
    assert report.source == str(path) and report.converted == 2
    assert_weights_equal(flavour.all_weights(original), flavour.all_weights(out))
    assert_outputs_close(flavour.outputs(original, x), flavour.outputs(out, x), atol=SWAP_ATOL)
    # The result saves in the same format and loads back as SyncBN.
    (tmp_path / "out").mkdir()
    reloaded = flavour.load(flavour.save(out, tmp_path / "out", fmt))
    assert {type(l) for l in flavour.bn_layers(reloaded)} == {flavour.SYNC}
    assert_outputs_close(
        flavour.outputs(original, x), flavour.outputs(reloaded, x), atol=SWAP_ATOL
    )


# -- command line ---------------------------------------------------------------


def cli(*args):
    """Runs `bnconvert ARGS` in this process; returns click's `Result`."""
    return CliRunner().invoke(bnconvert_cli.main, [str(a) for a in args])


def digest(root):
    """Every file under `root` (or `root` itself) -> its SHA-256."""
    root = pathlib.Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def listing(directory):
    return sorted(p.name for p in pathlib.Path(directory).iterdir())


def assert_one_line_error(result, *fragments):
    """Exit code != 0, one "Error: ..." line on stderr, nothing on stdout."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def assert_cli_sync_output(flavour, fmt, path, out, x):
    """`out` is `path` converted: right format, SyncBN everywhere, same numbers."""
    expected_fmt = "keras" if flavour.name == "keras3" else fmt
    assert flavour.written_format(out) == expected_fmt
    original, converted = flavour.load(path), flavour.load(out)
    assert isinstance(converted, flavour.k.Model)
    assert sorted(l.name for l in flavour.bn_layers(converted)) == ["inner_bn", "outer_bn"]
    assert all(type(l) is flavour.SYNC for l in flavour.bn_layers(converted))
    assert_weights_equal(flavour.all_weights(original), flavour.all_weights(converted))
    assert_outputs_close(
        flavour.outputs(original, x), flavour.outputs(converted, x), atol=SWAP_ATOL
    )


def test_cli_to_sync_default_output(saved, tmp_path):
    """`to-sync MODEL` writes NAME.sync[.keras|.h5] and leaves the input alone."""
    flavour, fmt = saved
    path = flavour.save(flavour.nested(), tmp_path, fmt)
    before = digest(tmp_path)

    result = cli("to-sync", path)

    assert result.exit_code == 0, result.output
    out = flavour.sync_output_name(path, fmt)
    assert f"Wrote {out}" in result.stdout
    assert "2 layer(s) converted" in result.stdout and "verified on the written file: max |diff|" in result.stdout
    assert "nested/inner/inner_bn" in result.stdout
    assert listing(tmp_path) == sorted([path.name, out.name])
    assert {k: v for k, v in digest(tmp_path).items() if k in before} == before
    assert_cli_sync_output(flavour, fmt, path, out, flavour.inputs_for(flavour.nested()))


def test_cli_to_sync_output_and_force(saved, tmp_path):
    """`-o` onto an existing output is refused without `--force`, replaced with it."""
    flavour, fmt = saved
    path = flavour.save(flavour.nested(), tmp_path, fmt)
    (tmp_path / "out").mkdir()
    out_fmt = "keras" if flavour.name == "keras3" else fmt
    out = tmp_path / "out" / ("converted" if out_fmt == "savedmodel" else f"converted.{out_fmt}")

    assert cli("to-sync", path, "-o", out).exit_code == 0
    first = digest(out)
    assert_one_line_error(cli("to-sync", path, "-o", out), str(out), "already exists", "--force")
    assert digest(out) == first

    result = cli("to-sync", path, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert listing(out.parent) == [out.name]  # no temporary or moved-aside copy left
    assert_cli_sync_output(flavour, fmt, path, out, flavour.inputs_for(flavour.nested()))


# An output name in a format the flavour does not write.
FOREIGN_OUTPUT = {"keras3": ("o.h5", ".keras"), "tf_keras": ("o.keras", ".h5")}


def test_cli_output_in_a_format_the_flavour_does_not_write(saved, tmp_path):
    """Keras 3 refuses `-o x.h5`; tf-keras refuses `-o x.keras`."""
    flavour, fmt = saved
    path = flavour.save(flavour.nested(), tmp_path, fmt)
    name, fragment = FOREIGN_OUTPUT[flavour.name]
    assert_one_line_error(cli("to-sync", path, "-o", tmp_path / name), fragment)
    assert listing(tmp_path) == [path.name]


def test_cli_dry_run_and_report(saved, tmp_path):
    """`--dry-run` writes no model; `--report` writes the JSON, replaced only with `--force`."""
    flavour, fmt = saved
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = flavour.save(flavour.nested(), model_dir, fmt)
    report = tmp_path / "report.json"

    result = cli("to-sync", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Dry run: no model written." in result.stdout
    assert "2 layer(s) converted" in result.stdout
    assert listing(model_dir) == [path.name] and listing(tmp_path) == ["model"]

    result = cli("to-sync", path, "--dry-run", "--report", report)
    assert result.exit_code == 0, result.output
    assert f"Wrote report {report}" in result.stdout
    assert listing(model_dir) == [path.name] and listing(tmp_path) == ["model", "report.json"]
    data = json.loads(report.read_text())
    assert data["direction"] == "sync" and data["counts"]["applied"] == 2
    assert sorted(e["path"] for e in data["events"]) == ["nested/inner/inner_bn", "nested/outer_bn"]
    assert all(e["class_after"] == "SyncBatchNormalization" for e in data["events"])
    assert data["verification"]["verified"] is True
    assert data["verification"]["max_abs_diff"] <= SWAP_ATOL

    # An existing report needs --force, checked before any work: no model written.
    report.write_text("keep")
    assert_one_line_error(cli("to-sync", path, "--report", report), "report.json", "already exists")
    assert report.read_text() == "keep" and listing(model_dir) == [path.name]
    result = cli("to-sync", path, "--report", report, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["counts"]["applied"] == 2
    assert listing(model_dir) == sorted([path.name, flavour.sync_output_name(path, fmt).name])


def test_cli_rules(saved, tmp_path):
    """`--rules`: a file disabling the shipped rule, a file naming a class."""
    flavour, fmt = saved
    path = flavour.save(flavour.with_subclass(), tmp_path, fmt)
    off, mine = tmp_path / "off.toml", tmp_path / "mine.toml"
    off.write_text(BN_TO_SYNC_OFF)
    mine.write_text(MYBN_RULE)

    result = cli("to-sync", path, "--rules", off, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "0 layer(s) converted (2 skipped)" in result.stdout

    result = cli("inspect", path, "--rules", mine, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in json.loads(result.stdout)["layers"]}
    assert [e["rule"] for e in rows["sub/mine"]["events"]] == ["mybn-to-sync"]
    assert rows["sub/mine"]["class"] == "MyBN"

    out = tmp_path / ("s.keras" if flavour.name == "keras3" else "s.h5")
    result = cli("to-sync", path, "--rules", mine, "-o", out)
    assert result.exit_code == 0, result.output
    assert "2 layer(s) converted" in result.stdout
    converted = flavour.load(out)
    assert type(converted.get_layer("mine")) is flavour.SYNC


def inspect_model(flavour):
    """One layer per setting `inspect` shows, each away from its default, and a LayerNorm."""
    k = flavour.k
    inputs = k.Input((7, 7, 3))
    x = k.layers.Conv2D(4, 3, name="conv")(inputs)  # (None, 5, 5, 4)
    x = flavour.BN(momentum=0.5, epsilon=1e-4, center=False, name="bn_a")(x)
    x = flavour.BN(axis=1, renorm=True, name="bn_renorm")(x)
    x = flavour.BN(synchronized=True, scale=False, name="bn_sync")(x)
    x = k.layers.LayerNormalization(name="ln")(x)
    model = k.Model(inputs, x, name="settings")
    model.get_layer("bn_renorm").trainable = False
    return model


def test_cli_inspect(saved, tmp_path):
    """`inspect` (table and `--json`): settings, shapes, events, nested paths; writes nothing."""
    flavour, fmt = saved
    path = flavour.save(inspect_model(flavour), tmp_path, fmt)
    nested = flavour.save(flavour.nested(), tmp_path, fmt)
    before = digest(tmp_path)

    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {row["path"]: row for row in data["layers"]}
    # LayerNormalization is not batch normalization, and no rule names it.
    assert set(rows) == {"settings/bn_a", "settings/bn_renorm", "settings/bn_sync"}
    axis1, last = INSPECT_AXIS[flavour.name]
    common = {"center": True, "scale": True, "renorm": False, "synchronized": False,
              "trainable": True, "momentum": 0.99, "epsilon": 1e-3, "axis": last}
    assert rows["settings/bn_a"]["settings"] == {
        **common, "momentum": 0.5, "epsilon": 1e-4, "center": False}
    assert rows["settings/bn_renorm"]["settings"] == {
        **common, "axis": axis1, "renorm": True, "trainable": False}
    assert rows["settings/bn_sync"]["settings"] == {
        **common, "scale": False,
        "synchronized": SYNCHRONIZED_SURVIVES_SAVING[flavour.name]}
    assert rows["settings/bn_a"]["shape"] == [4]
    assert rows["settings/bn_renorm"]["shape"] == [5]  # axis 1 of (None, 5, 5, 4)
    for row in rows.values():
        assert row["class"] == "BatchNormalization"
        (event,) = row["events"]
        assert event["path"] == row["path"] and event["action"] == "applied"
        assert event["class_after"] == "SyncBatchNormalization"

    table = cli("inspect", path)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["path", "class", "shape", "settings", "rule"]
    line = next(l for l in lines if l.startswith("settings/bn_a "))
    for fragment in ("BatchNormalization", " 4 ", "momentum=0.5", "epsilon=0.0001",
                     "bn-to-sync: -> SyncBatchNormalization"):
        assert fragment in line, line
    assert "3 layers would be converted (to sync)" in table.stdout

    # Nested models: one row per layer, each joined with its one event.
    result = cli("inspect", nested, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["layers"]
    assert sorted(r["path"] for r in rows) == ["nested/inner/inner_bn", "nested/outer_bn"]
    for row in rows:
        assert [e["path"] for e in row["events"]] == [row["path"]]
    assert digest(tmp_path) == before  # inspect writes nothing


def test_cli_inspect_inference_of_a_synced_file(saved, tmp_path):
    """`inspect --to inference` previews sync-to-bn on every synchronized layer."""
    flavour, fmt = saved
    path = flavour.save(flavour.synced(), tmp_path, fmt)
    result = cli("inspect", path, "--to", "inference")
    assert result.exit_code == 0, result.output
    rows = [l for l in result.stdout.splitlines() if l.startswith("synced/")]
    assert len(rows) == 3
    assert all("SyncBatchNormalization" in r and "synchronized" in r for r in rows)
    assert "sync-to-bn: -> BatchNormalization" in rows[0]
    assert "3 layers would be converted (to inference)" in result.stdout


def test_cli_to_inference(saved, tmp_path):
    """Unsync, fold, export: ONNX and --keras-out against the reloaded input."""
    flavour, fmt = saved
    path = flavour.save(flavour.synced(), tmp_path, fmt)
    before = digest(path)
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    keras_out = flavour.keras_out_name(tmp_path, fmt)

    result = cli("to-inference", path, "-o", out, "--keras-out", keras_out, "--report", report)

    assert result.exit_code == 0, result.output
    assert "onnxruntime check: max |diff|" in result.stdout
    assert "2 folded" in result.stdout and "1 kept" in result.stdout
    assert f"Wrote {out}" in result.stdout and f"Wrote {keras_out}" in result.stdout
    assert digest(path) == before

    original = flavour.load(path)
    x = flavour.inputs_for(original)
    want = flavour.outputs(original, x)

    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})
    assert_outputs_close(want, [np.asarray(g, np.float64) for g in got], rtol=1e-4)

    expected_fmt = "keras" if flavour.name == "keras3" else fmt
    assert flavour.written_format(keras_out) == expected_fmt
    folded = flavour.load(keras_out)
    classes = {n: c.__name__ for n, c in flavour.classes(folded).items()}
    assert "SyncBatchNormalization" not in classes.values()
    assert classes["sbn2"] == "BatchNormalization"  # after a ReLU: kept
    for name in ("sbn1", "sbn3"):
        assert classes.get(name) == FOLDED_BN[flavour.name]["Functional"], name
    assert_outputs_close(want, flavour.outputs(folded, x), rtol=FOLD_RTOL)

    data = json.loads(report.read_text())
    assert data["counts"]["folded"] == 2 and data["counts"]["kept"] == 1
    assert data["onnx"]["checked"] and data["onnx"]["max_rel_diff"] <= 1e-4


def test_cli_to_inference_without_fold(flavour, tmp_path):
    """Default ONNX name, --no-fold, --no-check, and --force for both outputs."""
    fmt = flavour.formats[0]
    path = flavour.save(flavour.synced(), tmp_path, fmt)
    onnx = path.parent / (path.name + ".onnx" if fmt == "savedmodel" else path.stem + ".onnx")
    keras_out = flavour.keras_out_name(tmp_path, fmt)
    args = ["to-inference", path, "--keras-out", keras_out, "--no-fold", "--no-check"]

    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "check skipped" in result.stdout and f"Wrote {onnx}" in result.stdout
    assert onnx.is_file()
    original, plain = flavour.load(path), flavour.load(keras_out)
    assert sorted(l.name for l in flavour.bn_layers(plain)) == ["sbn1", "sbn2", "sbn3"]
    assert all(type(l) is flavour.BN for l in flavour.bn_layers(plain))
    assert_weights_equal(flavour.all_weights(original), flavour.all_weights(plain))
    x = flavour.inputs_for(original)
    assert_outputs_close(flavour.outputs(original, x), flavour.outputs(plain, x), atol=SWAP_ATOL)

    first = {**digest(onnx), **digest(keras_out)}
    assert_one_line_error(cli(*args), "already exists", "--force")
    assert {**digest(onnx), **digest(keras_out)} == first
    result = cli(*args, "--force")
    assert result.exit_code == 0, result.output
    assert type(flavour.load(keras_out).get_layer("sbn1")) is flavour.BN
    assert listing(tmp_path) == sorted([path.name, onnx.name, keras_out.name])


@pytest.mark.slow
def test_cli_output_reloads_in_a_fresh_process(saved, tmp_path):
    """`import bnconvert` is all a new process needs to load the written model."""
    flavour, fmt = saved
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = flavour.save(flavour.nested(), model_dir, fmt)
    assert cli("to-sync", path).exit_code == 0
    out = flavour.sync_output_name(path, fmt)
    x = flavour.inputs_for(flavour.nested())
    y, y_original, classes = reload_in_fresh_process(flavour, out, path, x, tmp_path)
    np.testing.assert_allclose(y, y_original, rtol=0, atol=SWAP_ATOL)
    sync = f"{flavour.SYNC.__module__}.{flavour.SYNC.__name__}"
    assert classes["outer_bn"] == sync and classes["inner_bn"] == sync
