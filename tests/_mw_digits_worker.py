"""One worker of a two-process MultiWorkerMirroredStrategy digits run.

    python _mw_digits_worker.py REFERENCE.npz OUT.npz STEPS

Reads the single-device reference's weights before each step
(`REFERENCE.npz`, run `"before"` of `save_steps`), runs each step with
`bnconvert.SyncBatchNormalization` in a custom training loop from those
weights, once with each exchange of `bnconvert.sync_stats` forced, and writes
the weights after each step to `OUT.npz` (one run per exchange).
A custom loop because Keras 3.15's `fit` fails under this strategy (see the
README's known limitations). One replica per worker, on its CPU.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

FORCE = {"table": 1 << 30, "centered": 1}


def save_steps(path, runs):
    """Writes `{name: [weights of step 0, ...]}` as `"{name}/{step}/{index}"`."""
    np.savez(path, **{f"{name}/{s}/{i}": w
                      for name, steps in runs.items()
                      for s, weights in enumerate(steps)
                      for i, w in enumerate(weights)})


def load_steps(data, name, steps):
    """The `name` run of `save_steps`, from the loaded `.npz`."""
    count = len([k for k in data.files if k.startswith(f"{name}/0/")])
    return [[data[f"{name}/{s}/{i}"] for i in range(count)] for s in range(steps)]


def _main(reference_path, out_path, steps):
    # Must come before any other TensorFlow op.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import digits_parity as dp
    from bnconvert import sync_stats

    batches = dp.digits_batches(steps)
    before = load_steps(np.load(reference_path), "before", steps)
    runs = {}
    for method, limit in FORCE.items():
        sync_stats.TABLE_MAX_REPLICAS = limit
        runs[method] = dp.loop_steps("keras3", strategy, batches, before)
    save_steps(out_path, runs)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
