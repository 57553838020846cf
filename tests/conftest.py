"""Test session setup: quiet TensorFlow and four logical CPU devices.

The logical devices must exist before TensorFlow initialises its runtime,
so this runs once, before any test module imports the package.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

N_LOGICAL_CPUS = 4

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * N_LOGICAL_CPUS
)

import pytest  # noqa: E402


def cpu_devices(n):
    """Names of the first `n` logical CPU devices."""
    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(names) >= n, names
    return names[:n]


@pytest.fixture
def mirrored():
    """Factory: a MirroredStrategy over `n` logical CPU devices."""

    def make(n):
        return tf.distribute.MirroredStrategy(cpu_devices(n))

    return make
