"""Convert a small ResNet to synchronized BN and train it under MirroredStrategy.

The CPU is split into two logical devices, so this runs anywhere; on a
machine with GPUs, drop `_split_cpu` and MirroredStrategy uses them.

Run from the repository root:

    python examples/train_mirrored.py
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

REPLICAS = 2


def _split_cpu(n):
    # Must run before TensorFlow initialises its devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * n
    )


_split_cpu(REPLICAS)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bnconvert  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_small_model import build_small_resnet  # noqa: E402
from make_small_model import randomize_batchnorm  # noqa: E402


def main():
    keras.utils.set_random_seed(0)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:REPLICAS]
    strategy = tf.distribute.MirroredStrategy(devices)
    print(f"replicas: {strategy.num_replicas_in_sync}")

    # A model as it comes from single-device training.
    original = build_small_resnet()
    randomize_batchnorm(original)

    # Variables must be created under the strategy's scope to be mirrored,
    # so the converted model is built there.
    with strategy.scope():
        model, report = bnconvert.convert_model(original, return_report=True)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    sync_layers = [
        layer.name for layer in model.layers
        if isinstance(layer, bnconvert.SyncBatchNormalization)
    ]
    print(f"converted: {report.converted} BatchNormalization -> "
          f"SyncBatchNormalization ({len(sync_layers)} in the model)")
    # One copy of each variable per replica: the model belongs to the strategy.
    mirrored = isinstance(
        model.get_layer("stem_bn").moving_mean.value, tf.distribute.DistributedValues
    )
    print(f"variables mirrored across replicas: {mirrored}")

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=64)
    stem = model.get_layer("stem_bn")
    before = stem.moving_mean.numpy().copy()
    # Global batch 16: 8 examples per replica, statistics over all 16.
    history = model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=4, verbose=0)
    losses = history.history["loss"]
    moved = float(np.abs(stem.moving_mean.numpy() - before).max())
    print(f"loss after 4 steps: {losses[-1]:.4f}")
    print(f"stem_bn moving mean moved by up to {moved:.3g}")
    if not (
        mirrored and np.isfinite(losses[-1]) and moved > 0
        and len(sync_layers) == report.converted > 0
    ):
        sys.exit("training under MirroredStrategy did not behave as expected")
    print("ok")


if __name__ == "__main__":
    main()
