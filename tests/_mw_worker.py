"""Shared model and data for the distributed tests, and the multi-worker worker.

Imported by `tests/test_distributed.py` for `build_model` and `make_data`. Run
as a script, it is one worker of a `MultiWorkerMirroredStrategy` cluster
described by the `TF_CONFIG` environment variable: it trains the model with
`bnconvert.SyncBatchNormalization` through `model.fit` on its own shard of a
fixed global batch and writes the resulting weights to an `.npz` file.

    python _mw_worker.py OUT.npz STEPS GLOBAL_BATCH [table|centered]

The optional last argument picks the exchange of `bnconvert.sync_stats`
(default: whatever the replica count selects).

The worker keeps TensorFlow's single CPU device: one replica per worker.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

INPUT_SHAPE = (6, 6, 3)
LEARNING_RATE = 0.1


def make_data(n, seed=0, halves=2):
    """Returns `(x, y)` float32 arrays of `n` examples.

    Consecutive blocks of `n // halves` examples get different channel
    offsets, so per-replica statistics differ from the global ones and a
    layer that does not synchronize gives different numbers.
    """
    rs = np.random.RandomState(seed)
    x = rs.randn(n, *INPUT_SHAPE) * 0.5
    block = max(1, n // halves)
    for i in range(n):
        x[i] += 3.0 * (i // block) + np.array([1.0, -2.0, 0.5])
    y = rs.randn(n, 2)
    return x.astype("float32"), y.astype("float32")


def build_model(bn_layer, seed=0):
    """A small conv net with two normalization layers, weights set from `seed`.

    Args:
        bn_layer: callable returning a fresh normalization layer (called with
            `momentum=` and `name=`).
        seed: seed of the NumPy generator the weights are drawn from, so two
            models built with the same seed start identical whatever the
            normalization class.

    Returns:
        An uncompiled `keras.Model`.
    """
    inputs = keras.Input(INPUT_SHAPE)
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    h = bn_layer(momentum=0.5, name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(5, use_bias=False, name="dense1")(h)
    h = bn_layer(momentum=0.7, name="bn2")(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    rs = np.random.RandomState(seed)
    weights = []
    for w in model.weights:
        if "moving_variance" in w.path:
            value = 1.0 + rs.rand(*w.shape)
        elif "gamma" in w.path:
            value = 1.0 + 0.3 * rs.randn(*w.shape)
        else:
            value = 0.3 * rs.randn(*w.shape)
        weights.append(value.astype("float32"))
    model.set_weights(weights)
    return model


def compile_model(model, reduction="sum_over_batch_size", learning_rate=LEARNING_RATE):
    """SGD without momentum, so one step moves each weight by `-lr * grad`."""

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.MeanSquaredError(reduction=reduction),
    )
    return model


def _target(x):
    import tensorflow as tf

    projection = tf.constant([[1.0, -0.5], [0.3, 0.8], [-0.7, 0.2]])
    return tf.tanh(tf.reduce_mean(x, axis=(1, 2)) @ projection)


class InputTargetModel(keras.Model):
    """`build_model(bn_layer)` trained to predict a fixed function of its input.

    Works around two faults of Keras 3.15's `fit` under
    `MultiWorkerMirroredStrategy` (keras-team/keras#20585):
    - before training it averages the first batch over workers with
      `strategy.reduce`, which fails on a tuple of per-replica values, so
      the dataset holds `x` alone and the target is computed from `x` in
      `compute_loss`;
    - after each step it averages the step's logs with
      `strategy.reduce(..., axis=0)`, which fails on scalars, so
      `train_step` returns its logs with shape `[1]`.
    """

    def __init__(self, bn_layer, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.net = build_model(bn_layer, seed)

    def call(self, x, training=False):
        return self.net(x, training=training)

    def train_step(self, data):
        import tensorflow as tf

        logs = super().train_step(data)
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        return super().compute_loss(
            x=x, y=_target(x), y_pred=y_pred, sample_weight=sample_weight,
            training=training,
        )


def weights_dict(model):
    """Weights of `model` by path, as NumPy arrays."""
    return {w.path: np.asarray(w.numpy()) for w in model.weights}


def _main(out_path, steps, global_batch, method=None):
    import tensorflow as tf

    # Must come before any other TensorFlow op.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import bnconvert
    from bnconvert import sync_stats

    if method is not None:
        sync_stats.TABLE_MAX_REPLICAS = {"table": 1 << 30, "centered": 1}[method]

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    workers = strategy.num_replicas_in_sync
    per_worker = global_batch // workers
    x, _ = make_data(global_batch)
    shard = slice(task * per_worker, (task + 1) * per_worker)

    def dataset_fn(input_context):
        # Each worker feeds its own, fixed shard: no auto-sharding, no
        # rebatching, so the global batch is exactly `x` every step.
        return tf.data.Dataset.from_tensors(x[shard]).repeat(steps)

    with strategy.scope():
        model = compile_model(InputTargetModel(bnconvert.SyncBatchNormalization))
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    model.fit(dataset, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    np.savez(out_path, **weights_dict(model))


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
          sys.argv[4] if len(sys.argv) > 4 else None)
