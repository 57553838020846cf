"""Models in the wild (issue 9, item 6): keras-hub and keras.applications end to end.

For every model of `zoo_models.ZOO` (built from constructors, no downloads,
BN statistics randomized), four steps, one test each:

1. `to_sync`: the saved file goes through `bnconvert to-sync` (the CLI, in
   process through click's CliRunner); exit 0.
2. `reload`: in a FRESH process (tests/_zoo_worker.py) the written file loads
   as a user would load it (`import bnconvert` plus the model's own library),
   keeps the model's class, holds no plain BatchNormalization anywhere (nested
   models and layers held as attributes included), holds as many
   SyncBatchNormalization as the original held BN, and reproduces the
   original's inference outputs (computed in memory before anything was
   saved) within 1e-6 (see `OUTPUT_TOL`).
3. `train`: in the same subprocess, loaded inside `MirroredStrategy.scope()` on
   2 logical CPUs, 2 `fit` steps with MSE on the outputs give finite losses.
4. `to_inference`: the synchronized file goes through `bnconvert to-inference`
   (unsync, fold, ONNX export, onnxruntime check); exit 0. When step 1 failed,
   the original file is used instead, so the inference side is still tested
   (the test id says nothing different; the timing table notes `input=orig`).

Steps share their work per model (one build, one to-sync, one subprocess);
each subprocess is bounded by `SUBPROCESS_TIMEOUT` and starts in the
background as soon as its model's to-sync is done (`PARALLEL_WORKERS` at a
time). A table of per-step
times and outcomes is printed at the end of the module (pytest -rA or -s
shows it; it is also written to zoo_timings.json in the base temp directory,
and each finished step is appended to zoo/zoo_steps.jsonl as it ends).

Known failures of today's converter are in `XFAIL` (not strict): remove an
entry when its fix lands.
"""

import gc
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import keras  # noqa: E402

pytest.importorskip("keras_hub")

import bnconvert_cli as cli  # noqa: E402
import zoo_models  # noqa: E402

# The reload step runs one model's fresh process (reload and 2 training
# steps): longer than the suite's 600 s per-test limit allows when loaded.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1000)]

NAMES = list(zoo_models.ZOO)
STEPS = ("to_sync", "reload", "train", "to_inference")
SUBPROCESS_TIMEOUT = 900  # seconds; DenseNet121 exceeded 420 s at load average 12 on 2 cores

# Outputs of the reloaded model against the original's: |a - b| <= 1e-6 *
# max(1, max |original|). SyncBatchNormalization in inference is Keras BN
# bit for bit and weights are copied exactly, so the expected difference is 0;
# 1e-6 leaves room for a few float32 ulps of reordering (eps 6e-8) should a
# kernel be picked differently in the fresh process. Outputs here are O(1)
# (softmax, logits, feature maps of 0.1 to 12 measured), so the bound is an
# absolute 1e-6 for all but outputs larger than 1, where it scales with them.
OUTPUT_TOL = 1e-6

# (model, step) -> reason: known failures, not strict. The failures this
# suite was written against (raw keras.ops nodes, configs that do not round
# trip, BN created in __init__, keras-hub classes lost, a too strict ONNX
# check, grouped convolutions tf2onnx could not convert) are fixed.
XFAIL = {}


def _params(step):
    out = []
    for name in NAMES:
        reason = XFAIL.get((name, step))
        marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


# --- shared per-model work --------------------------------------------------

_CACHE = {}
_TIMES = {}
_TIMES_LOG = []  # [path]: one JSON line per finished step, so a killed run keeps its times


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory, request):
    base = tmp_path_factory.mktemp("zoo")
    _TIMES_LOG[:] = [base / "zoo_steps.jsonl"]
    yield base
    _stop_workers()  # only left running when tests were deselected or stopped early
    _print_table(request, tmp_path_factory.getbasetemp())


def _timed(name, step, fn):
    start = time.perf_counter()
    try:
        return fn()
    finally:
        seconds = round(time.perf_counter() - start, 1)
        _TIMES.setdefault(name, {})[step] = seconds
        if _TIMES_LOG:
            with open(_TIMES_LOG[0], "a") as f:
                f.write(json.dumps({"model": name, "step": step, "seconds": seconds}) + "\n")


def _clear():
    keras.backend.clear_session()
    if "tf_keras" in sys.modules:
        sys.modules["tf_keras"].backend.clear_session()
    gc.collect()


def _cli(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    if result.exit_code == 0:
        return 0, ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        line = f"{type(result.exception).__name__}: {result.exception}".splitlines()[0]
    else:
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith("Error")]
        line = (errors or lines or [f"exit {result.exit_code}, no message"])[-1]
    return result.exit_code, line[:500]


def _original(name, zoo_dir):
    """Builds and saves the model; the reference outputs come from memory."""
    key = (name, "original")
    if key not in _CACHE:
        def work():
            model = zoo_models.build(name)
            inputs = zoo_models.sample_inputs(model, name)
            feed = inputs[0] if len(inputs) == 1 else inputs
            expected = [np.asarray(o) for o in keras.tree.flatten(model(feed, training=False))]
            d = zoo_dir / name
            d.mkdir()
            paths = [str(d / f"input{i}.npy") for i in range(len(inputs))]
            for p, a in zip(paths, inputs):
                np.save(p, a)
            path = d / f"{name}{zoo_models.suffix(name)}"
            model.save(path)
            info = {
                "path": path,
                "inputs": paths,
                "expected": expected,
                "class": type(model).__name__,
                "module": type(model).__module__,
                "n_bn": len(zoo_models.batchnorm_layers(model)),
            }
            del model
            _clear()
            return info

        _CACHE[key] = _timed(name, "build+save", work)
    return _CACHE[key]


def _custom_args(name):
    args = []
    for module in zoo_models.ZOO[name][1]:
        args += ["--custom-objects", module]
    return args


def _synced(name, zoo_dir):
    key = (name, "to_sync")
    if key not in _CACHE:
        orig = _original(name, zoo_dir)
        out = orig["path"].with_name(f"{name}.sync{zoo_models.suffix(name)}")
        code, line = _timed(name, "to_sync", lambda: _cli(
            "to-sync", orig["path"], "-o", out, "--force", *_custom_args(name)))
        _clear()
        _CACHE[key] = {"code": code, "error": line, "path": out if code == 0 else None}
        if code == 0:
            _queue_fresh(name, zoo_dir)
    return _CACHE[key]


# Fresh processes run in the background, at most `PARALLEL_WORKERS` at a
# time, in test order: a model's worker starts as soon as its to-sync is
# done, and the reload test only waits for it. Most of a worker's time is
# single-threaded tracing of the training step, so two of them (with the
# test process) share 2 cores well: the zoo took 31 min run one at a time.
PARALLEL_WORKERS = 2
_QUEUE = []  # names whose worker waits for a free slot, in order
_RUNNING = {}  # name -> (Popen, start time, spec, stderr file)


def _spec(name, zoo_dir):
    orig = _original(name, zoo_dir)
    synced = _synced(name, zoo_dir)
    d = orig["path"].parent
    spec = {
        "model": str(synced["path"]),
        "flavour": zoo_models.flavour(name),
        "imports": zoo_models.ZOO[name][1],
        "inputs": orig["inputs"],
        "outputs": str(d / "reloaded_outputs.npz"),
        "result": str(d / "fresh_result.json"),
    }
    spec_path = d / "fresh_spec.json"
    spec_path.write_text(json.dumps(spec))
    return spec, spec_path


def _queue_fresh(name, zoo_dir):
    """Queues the model's fresh-process worker (its to-sync must have succeeded)."""
    if (name, "fresh") in _CACHE or name in _RUNNING or name in _QUEUE:
        return
    _QUEUE.append(name)
    _pump(zoo_dir)


def _pump(zoo_dir):
    # A finished worker whose result nobody has read yet holds no slot.
    while _QUEUE and sum(p.poll() is None for p, *_ in _RUNNING.values()) < PARALLEL_WORKERS:
        name = _QUEUE.pop(0)
        spec, spec_path = _spec(name, zoo_dir)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
        stderr = open(pathlib.Path(spec["result"]).with_name("fresh_stderr.txt"), "w")
        proc = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).with_name("_zoo_worker.py")),
             str(spec_path)],
            cwd=pathlib.Path(__file__).parents[1], env=env, stdout=subprocess.DEVNULL,
            stderr=stderr, text=True,
        )
        _RUNNING[name] = (proc, time.time(), spec, stderr)


def _collect(name, zoo_dir):
    """Waits for the model's worker (bounded by `SUBPROCESS_TIMEOUT`) and reads its result."""
    deadline = time.perf_counter() + SUBPROCESS_TIMEOUT
    while name not in _RUNNING and time.perf_counter() < deadline:
        _pump(zoo_dir)
        if name not in _RUNNING:
            time.sleep(0.2)  # workers queued before this one still run
    if name not in _RUNNING:
        msg = f"fresh process did not start within {SUBPROCESS_TIMEOUT} s"
        return {"reload": {"error": msg}, "train": {"error": msg}}
    proc, start, spec, stderr = _RUNNING[name]
    try:
        proc.wait(timeout=max(1.0, SUBPROCESS_TIMEOUT - (time.time() - start)))
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    finally:
        stderr.close()
        del _RUNNING[name]
        _pump(zoo_dir)
    # The worker's own run time (its result file's age), not the wait here.
    done = os.path.getmtime(spec["result"]) if os.path.exists(spec["result"]) else time.time()
    seconds = round(done - start, 1)
    _TIMES.setdefault(name, {})["fresh process"] = seconds
    if _TIMES_LOG:
        with open(_TIMES_LOG[0], "a") as f:
            f.write(json.dumps({"model": name, "step": "fresh process", "seconds": seconds}) + "\n")
    if timed_out:
        msg = f"fresh process timed out after {SUBPROCESS_TIMEOUT} s"
        return {"reload": {"error": msg}, "train": {"error": msg}}
    if proc.returncode != 0 or not os.path.exists(spec["result"]):
        lines = pathlib.Path(stderr.name).read_text().strip().splitlines()
        msg = f"fresh process exit {proc.returncode}: {(lines or ['(no stderr)'])[-1]}"
        return {"reload": {"error": msg}, "train": {"error": msg}}
    with open(spec["result"]) as f:
        result = json.load(f)
    if "error" not in result["reload"]:
        with np.load(spec["outputs"]) as z:
            result["reload"]["outputs"] = [z[f"arr_{i}"] for i in range(len(z.files))]
    return result


def _stop_workers():
    for proc, _, _, stderr in _RUNNING.values():
        proc.kill()
        proc.wait()
        stderr.close()
    _RUNNING.clear()
    _QUEUE.clear()


def _fresh(name, zoo_dir):
    key = (name, "fresh")
    if key not in _CACHE:
        if _synced(name, zoo_dir)["path"] is None:
            _CACHE[key] = None
            return None
        _queue_fresh(name, zoo_dir)
        _CACHE[key] = _collect(name, zoo_dir)
    return _CACHE[key]


def _inference(name, zoo_dir):
    key = (name, "to_inference")
    if key not in _CACHE:
        orig = _original(name, zoo_dir)
        synced = _synced(name, zoo_dir)
        source = synced["path"] or orig["path"]
        out = orig["path"].with_name(f"{name}.onnx")
        code, line = _timed(name, "to_inference", lambda: _cli(
            "to-inference", source, "-o", out, "--force", *_custom_args(name)))
        _TIMES[name]["inference input"] = "sync" if synced["path"] else "orig"
        _clear()
        _CACHE[key] = {"code": code, "error": line}
    return _CACHE[key]


def _print_table(request, basetemp):
    rows = []
    for name in NAMES:
        if name not in _TIMES:
            continue
        t = _TIMES[name]
        rows.append({"model": name, **t})
    (basetemp / "zoo_timings.json").write_text(json.dumps(rows, indent=1))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    cols = ["build+save", "to_sync", "fresh process", "to_inference", "inference input"]
    reporter.write_line("")
    reporter.write_line("zoo timings (s): " + " | ".join(cols))
    total = 0.0
    for row in rows:
        values = [row.get(c, "-") for c in cols]
        total += sum(v for v in values if isinstance(v, float))
        reporter.write_line(f"  {row['model']:24s} " + "  ".join(f"{v!s:>8}" for v in values))
    reporter.write_line(f"  total {total:.0f} s")


# --- the four steps ---------------------------------------------------------

@pytest.mark.parametrize("name", _params("to_sync"))
def test_to_sync(name, zoo_dir):
    synced = _synced(name, zoo_dir)
    assert synced["code"] == 0, synced["error"]


@pytest.mark.parametrize("name", _params("reload"))
def test_reload(name, zoo_dir):
    orig = _original(name, zoo_dir)
    fresh = _fresh(name, zoo_dir)
    assert fresh is not None, f"{_NOT_CONVERTED}: {_synced(name, zoo_dir)['error']}"
    reload = fresh["reload"]
    assert "error" not in reload, reload["error"]
    # Every finding is reported, not only the first.
    problems = []
    if (reload["module"], reload["class"]) != (orig["module"], orig["class"]):
        problems.append(f"class not kept: reloaded {reload['class']}, original {orig['class']}")
    if reload["n_plain"]:
        problems.append(
            f"{reload['n_plain']} plain BatchNormalization after reload "
            f"({reload['n_sync']} synchronized), e.g. {reload['plain_examples']}")
    if reload["n_sync"] != orig["n_bn"]:
        problems.append(
            f"{reload['n_sync']} SyncBatchNormalization after reload, original had {orig['n_bn']} BN")
    actual, expected = reload["outputs"], orig["expected"]
    if len(actual) != len(expected):
        problems.append(f"{len(actual)} outputs after reload, original had {len(expected)}")
    for i, (a, b) in enumerate(zip(actual, expected)):
        if a.shape != b.shape:
            problems.append(f"output {i} has shape {a.shape}, original {b.shape}")
            continue
        scale = max(1.0, float(np.max(np.abs(b))))
        diff = float(np.max(np.abs(a.astype(np.float64) - b)))
        if not diff <= OUTPUT_TOL * scale:
            problems.append(f"output {i} differs by {diff:.3g} (scale {scale:.3g})")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("name", _params("train"))
def test_train(name, zoo_dir):
    fresh = _fresh(name, zoo_dir)
    assert fresh is not None, f"{_NOT_CONVERTED}: {_synced(name, zoo_dir)['error']}"
    train = fresh["train"]
    assert "error" not in train, train["error"]
    assert train["replicas"] == 2
    assert len(train["losses"]) == 2, train["losses"]
    assert np.all(np.isfinite(train["losses"])), train["losses"]


@pytest.mark.parametrize("name", _params("to_inference"))
def test_to_inference(name, zoo_dir):
    result = _inference(name, zoo_dir)
    assert result["code"] == 0, result["error"]
