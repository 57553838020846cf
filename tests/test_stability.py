"""A fold check on a numerically unstable model says so instead of blaming the fold.

The unstable model is a deep tanh chain with weight gain 4 (the chaotic
regime of random deep networks, where rounding errors grow exponentially
with depth, as in keras.applications EfficientNetV2L with random weights).
The independent reference is the same network evaluated in NumPy float64:
the float32 Keras model itself misses it by more than the fold tolerance,
so no float32 check can judge a fold of it.
"""

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import bnconvert
import bnconvert_cli as cli
from bnconvert import check_batch
from bnconvert import stability
from bnconvert import verify
from bnconvert.errors import VerificationError

L = keras.layers
WIDTH, DEPTH, GAIN = 32, 40, 4.0


def _chain(depth, gain, seed=0):
    """Dense -> BN -> tanh blocks with random weights and BN statistics, and their float64 forward."""
    rng = np.random.default_rng(seed)
    x = inputs = keras.Input((WIDTH,))
    params = []
    for i in range(depth):
        kernel = rng.normal(0, gain / np.sqrt(WIDTH), (WIDTH, WIDTH))
        bias = rng.normal(0, 0.1, WIDTH)
        bn = [rng.uniform(0.5, 2.0, WIDTH), rng.normal(0, 0.1, WIDTH),
              rng.normal(0, 0.1, WIDTH), rng.uniform(0.5, 2.0, WIDTH)]
        dense, norm = L.Dense(WIDTH, name=f"dense{i}"), L.BatchNormalization(name=f"bn{i}")
        x = L.Activation("tanh")(norm(dense(x)))
        dense.set_weights([kernel.astype("float32"), bias.astype("float32")])
        norm.set_weights([v.astype("float32") for v in bn])
        params.append((kernel, bias, bn))
    model = keras.Model(inputs, L.Dense(4, name="head")(x))
    head = [w.astype(np.float64) for w in model.get_layer("head").get_weights()]

    def forward64(batch):
        h = np.asarray(batch, np.float64)
        for kernel, bias, (gamma, beta, mean, var) in params:
            # float64 of the float32 weights the model holds
            kernel, bias = kernel.astype("float32").astype(np.float64), bias.astype("float32")
            gamma, beta, mean, var = (v.astype("float32").astype(np.float64)
                                      for v in (gamma, beta, mean, var))
            h = h @ kernel + bias
            h = np.tanh(gamma * (h - mean) / np.sqrt(var + 1e-3) + beta)
        return h @ head[0] + head[1]

    return model, forward64


def _off_by(model, forward64):
    batch, _ = check_batch.sample_inputs(model)
    got = check_batch.run(model, batch)[0].astype(np.float64)
    want = forward64(batch[0])
    return np.abs(got - want).max() / np.abs(want).max()


def test_chaotic_model_misses_its_float64_reference():
    model, forward64 = _chain(DEPTH, GAIN)
    assert _off_by(model, forward64) > 1e-2
    # The same chain at gain 0.5 is stable: float32 matches float64 closely.
    stable, stable64 = _chain(DEPTH, 0.5)
    assert _off_by(stable, stable64) < 1e-5


def test_fold_of_chaotic_model_is_refused_as_unstable():
    model, _ = _chain(DEPTH, GAIN)
    with pytest.raises(VerificationError, match="numerically unstable in float32") as info:
        bnconvert.convert_model(model, to="inference")
    assert "--no-fold" in str(info.value) and "\n" not in str(info.value)
    # Without folding the swap is exact, and passes.
    _, report = bnconvert.convert_model(model, to="inference", fold=False, return_report=True)
    assert report.max_abs_diff == 0.0


@pytest.mark.parametrize("extra, advice", [
    ([], "--no-fold"),  # the fold check refuses
    (["--no-fold"], "--no-check"),  # the swap passes; the onnxruntime check refuses
])
def test_cli_refuses_unstable_model_in_one_line_and_writes_nothing(tmp_path, extra, advice):
    model, _ = _chain(DEPTH, GAIN)
    source, out = tmp_path / "chaos.keras", tmp_path / "chaos.onnx"
    model.save(source)
    result = CliRunner().invoke(cli.main, ["to-inference", str(source), "-o", str(out), *extra])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "numerically unstable in float32" in lines[0] and advice in lines[0], lines[0]
    assert not out.exists()


def test_stable_model_with_wrong_outputs_is_blamed_not_called_unstable():
    model, _ = _chain(DEPTH, 0.5)
    batch, _ = check_batch.sample_inputs(model)
    wrong = [o * 1.01 for o in check_batch.run(model, batch)]
    with pytest.raises(VerificationError, match="differ from the reference") as info:
        stability.run_and_compare(model, batch, wrong, tolerance=1e-4, relative=True)
    assert "unstable" not in str(info.value)


def test_absolute_check_is_not_probed():
    # A swap must be exact whatever the model's stability.
    model, _ = _chain(DEPTH, GAIN)
    batch, _ = check_batch.sample_inputs(model)
    wrong = [o + 1.0 for o in check_batch.run(model, batch)]
    with pytest.raises(verify.BeyondTolerance) as info:
        stability.run_and_compare(model, batch, wrong, tolerance=1e-6, relative=False)
    assert "unstable" not in str(info.value)


def test_nudge_moves_floats_one_step_and_keeps_other_inputs():
    floats = np.array([1.0, -2.0, 0.0], np.float32)
    ints = np.array([1, 0], np.int32)
    moved = stability.nudge([floats, ints])
    np.testing.assert_array_equal(moved[0], np.nextafter(floats, np.float32(np.inf)))
    assert moved[0].dtype == np.float32 and moved[1] is ints
    assert stability.nudge([ints]) is None
