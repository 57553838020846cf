"""Training on real data (sklearn's digits) under R replicas equals one device.

Each step starts from the single-device reference's weights (see
`tests/digits_parity.py`) and must end within `STEP_TOL` of it, for every
weight and moving statistic, at R = 2, 4 (the table exchange) and 8, 16 (the
centered sums), with each epoch ending on an uneven global batch, through
`model.fit` and through a custom loop, in both flavours, and under
MultiWorkerMirroredStrategy with two processes. One float64 run is compared
as a whole trajectory, which float32 through ReLU cannot be.
"""

import os

import numpy as np
import pytest

import digits_parity as dp

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "_mw_digits_worker.py")
MW_TIMEOUT = 300

# The issue measured 1.2e-7 per step; a wrong statistic (per-replica instead
# of global) is off by >1e-3 (see the control below).
STEP_TOL = 1e-6


def _check_steps(after, ref_before, ref_after):
    assert dp.smallest_update(ref_before, ref_after) > 1e-6
    error = dp.worst_step_error(after, ref_after)
    assert error <= STEP_TOL, f"worst step error {error:.2e}"
    return error


def _skewed(n, replicas):
    # Shards as uneven as the batch allows: 1, then equal, the rest last.
    per = n // replicas
    return [1] + [per] * (replicas - 2) + [n - 1 - per * (replicas - 2)]


@pytest.mark.parametrize("path, replicas", [("fit", 2), ("loop", 4)])
def test_steps_match_single_device_bn(mirrored, replicas, path):
    # One epoch: three full global batches of 32, then 31.
    batches = dp.digits_batches(dp.STEPS_PER_EPOCH)
    before, ref_after = dp.reference_steps("keras3", batches)
    if path == "fit":
        after = dp.fit_steps("keras3", mirrored(replicas), batches, before)
    else:
        after = dp.loop_steps("keras3", mirrored(replicas), batches, before,
                              split=_skewed)
    _check_steps(after, before, ref_after)


def test_plain_bn_under_the_strategy_fails_the_comparison(mirrored):
    # Control: per-replica statistics are far outside STEP_TOL on these data.
    import keras

    batches = dp.digits_batches(2)
    before, ref_after = dp.reference_steps("keras3", batches)
    after = dp.loop_steps("keras3", mirrored(4), batches, before,
                          norm=keras.layers.BatchNormalization)
    assert dp.worst_step_error(after, ref_after) > 1e-3


# Keras 3 through the custom loop and `fit` at every R (2 and 4: the table,
# 8 and 16: the centered sums); the tf-keras twin once per exchange and path,
# to keep the slow total to minutes on 2 cores. Keras 3's `fit` at R = 16
# takes 30 s on a quiet machine, up to 2 minutes at load 10, most of it
# TensorFlow releasing the 16-device input iterator when `fit` returns (at
# load 10 about 2 s per step consumed, measured without our layer);
# tf-keras's `fit` at 16 took 2 minutes, so the twin runs once per exchange
# and path.
MATRIX = [("keras3", path, r) for path in ("loop", "fit") for r in (2, 4, 8, 16)] + [
    ("tf_keras", "loop", 8), ("tf_keras", "fit", 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("flavour, path, replicas", MATRIX)
def test_64_steps_match_single_device_bn(mirrored, flavour, replicas, path):
    batches = dp.digits_batches(64)
    before, ref_after = dp.reference_steps(flavour, batches)
    if path == "fit":
        after = dp.fit_steps(flavour, mirrored(replicas), batches, before)
    else:
        after = dp.loop_steps(flavour, mirrored(replicas), batches, before,
                              split=_skewed)
    _check_steps(after, before, ref_after)


@pytest.mark.slow
def test_multi_worker_steps_match_single_device_bn(tmp_path):
    # Two processes, one replica each; the last batch of each epoch (31)
    # splits 16/15. Both exchanges are forced in turn inside the workers.
    from _mw_digits_worker import FORCE, load_steps, save_steps
    from mw_cluster import run_workers

    steps = 64
    batches = dp.digits_batches(steps)
    before, ref_after = dp.reference_steps("keras3", batches)
    save_steps(tmp_path / "before.npz", {"before": before})
    failures = run_workers(
        WORKER, lambda index: [str(tmp_path / "before.npz"),
                               str(tmp_path / f"worker{index}.npz"), str(steps)],
        cwd=tmp_path, timeout=MW_TIMEOUT,
    )
    assert not failures, "\n".join(failures)
    results = [np.load(tmp_path / f"worker{index}.npz") for index in range(2)]
    for key in results[0].files:
        np.testing.assert_array_equal(results[0][key], results[1][key], key)
    for method in FORCE:
        _check_steps(load_steps(results[0], method, steps), before, ref_after)


@pytest.mark.slow
def test_float64_trajectory_matches_single_device_bn(mirrored):
    # Whole float64 run, 100 steps, 8 replicas (centered sums): rounding at
    # 1e-16 flips no ReLU gate, so the trajectories stay together.
    batches = dp.digits_batches(100, dtype="float64")
    before, ref_after = dp.reference_steps("keras3", batches, dtype="float64")
    after = dp.loop_steps("keras3", mirrored(8), batches, dtype="float64",
                          split=_skewed)
    assert after[-1][0].dtype == np.float64
    assert dp.smallest_update(before[:1], before[-1:]) > 1e-2
    error = dp.worst_step_error(after, ref_after)
    assert error <= 1e-9, f"worst trajectory error {error:.2e}"
