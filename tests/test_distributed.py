"""`SyncBatchNormalization` trained with `model.fit` under tf.distribute strategies.

The reference is always the same model with plain `keras.layers.BatchNormalization`
trained on ONE device on the global batch: synchronized BN across replicas must
reproduce it (moving statistics and the SGD update of every weight).

Loss scaling under a strategy: Keras divides each replica's mean loss by the
number of replicas, so with equal shards the summed gradient is the gradient of
the global-batch mean. With uneven shards that is no longer the global mean;
the uneven test therefore uses `reduction="sum"`, which Keras does not rescale,
so single-device training on the same batches is the exact reference whatever
the split.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import bnconvert
from mw_cluster import run_workers
from _mw_worker import (
    InputTargetModel, build_model, compile_model, make_data, weights_dict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mw_worker.py")
WORKER_TIMEOUT = 180


def _train(bn_layer, x, y, batch_size, strategy=None, epochs=1, **compile_args):
    """Builds, compiles and fits a model; returns (weights before, weights after)."""
    if strategy is None:
        model = compile_model(build_model(bn_layer), **compile_args)
    else:
        with strategy.scope():
            model = compile_model(build_model(bn_layer), **compile_args)
    before = weights_dict(model)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return before, weights_dict(model)


def _assert_same_training(before, ours, ref, rtol=1e-5):
    """Moving statistics and weight updates of `ours` equal those of `ref`."""
    assert sorted(ours) == sorted(ref)
    for path, expected in ref.items():
        # Entries near zero are judged against the array's scale.
        atol = rtol * np.abs(expected).max()
        if "moving_" in path:
            np.testing.assert_allclose(ours[path], expected, rtol=rtol, atol=atol,
                                       err_msg=path)
            continue
        # Compare the update itself, not just the updated weight, so a wrong
        # but small gradient cannot hide behind the weight's magnitude.
        expected_delta = expected - before[path]
        assert np.abs(expected_delta).max() > 1e-4, f"{path} did not train"
        np.testing.assert_allclose(
            ours[path] - before[path], expected_delta,
            rtol=20 * rtol, atol=1e-3 * np.abs(expected_delta).max(), err_msg=path,
        )
        np.testing.assert_allclose(ours[path], expected, rtol=rtol, atol=atol,
                                   err_msg=path)


@pytest.mark.parametrize("steps, rtol", [(1, 1e-5), (3, 5e-5)])
def test_fit_matches_single_device_bn(mirrored, steps, rtol):
    # The same global batch of 8, split 4/4 over 2 replicas, `steps` times.
    x, y = make_data(8)
    before, ref = _train(keras.layers.BatchNormalization, x, y, batch_size=8,
                         epochs=steps)
    start, ours = _train(bnconvert.SyncBatchNormalization, x, y, batch_size=8,
                         epochs=steps, strategy=mirrored(2))
    for path in before:
        np.testing.assert_array_equal(start[path], before[path])
    _assert_same_training(before, ours, ref, rtol=rtol)


def test_unsynchronized_bn_differs_from_the_reference(mirrored):
    # Control for the test above: with these data the per-replica statistics
    # differ from the global ones, so the comparison can tell the difference.
    x, y = make_data(8)
    _, ref = _train(keras.layers.BatchNormalization, x, y, batch_size=8)
    _, local = _train(
        keras.layers.BatchNormalization, x, y, batch_size=8, strategy=mirrored(2)
    )
    diff = np.abs(local["bn1/moving_variance"] - ref["bn1/moving_variance"])
    assert diff.max() > 1e-2


def test_fit_with_uneven_last_batch_matches_single_device_bn(mirrored):
    # 15 examples in batches of 8 over 4 replicas: the second step's 7
    # examples are split 2/2/2/1. (Not 6 examples: the split would be 2/2/2/0
    # and TF's CPU Conv2D returns its *input* shape for an empty batch,
    # which breaks any normalization layer after it.)
    x, y = make_data(15, halves=3)
    # The summed loss is ~8x the mean: a smaller step keeps training stable.
    compile_args = dict(reduction="sum", learning_rate=0.01)
    before, ref = _train(
        keras.layers.BatchNormalization, x, y, batch_size=8, **compile_args
    )
    _, ours = _train(
        bnconvert.SyncBatchNormalization, x, y, batch_size=8,
        strategy=mirrored(4), **compile_args
    )
    _assert_same_training(before, ours, ref, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["table", "centered"])
def test_multi_worker_fit_matches_single_device_bn(tmp_path, method):
    steps, global_batch = 3, 8
    failures = run_workers(
        WORKER,
        lambda index: [str(tmp_path / f"worker{index}.npz"), str(steps),
                       str(global_batch), method],
        cwd=tmp_path, timeout=WORKER_TIMEOUT,
    )
    outs = [tmp_path / f"worker{index}.npz" for index in range(2)]
    assert not failures, "\n".join(failures)

    results = [dict(np.load(out)) for out in outs]
    x, _ = make_data(global_batch)
    reference = compile_model(InputTargetModel(keras.layers.BatchNormalization))
    before = weights_dict(reference)
    reference.fit(x, batch_size=global_batch, epochs=steps, shuffle=False, verbose=0)
    ref = weights_dict(reference)
    for path in ref:
        np.testing.assert_array_equal(results[0][path], results[1][path],
                                      err_msg=path)
    _assert_same_training(before, results[0], ref, rtol=5e-5)


@pytest.mark.slow
def test_benchmark_quick_run():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sync_bn.py"), "--quick"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "P1" in proc.stdout and "P2" in proc.stdout, proc.stdout
    assert "P5" in proc.stdout and "ResNet50" in proc.stdout, proc.stdout
    assert "ours" in proc.stdout
