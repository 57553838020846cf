"""Test session setup: quiet TensorFlow and sixteen logical CPU devices.

The logical devices must exist before TensorFlow initialises its runtime,
so this runs once, before any test module imports the package.
"""

import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

# Up to 16 replicas: the exchange tests count what each replica count sends.
N_LOGICAL_CPUS = 16

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


_STRATEGIES = {}


def mirrored_strategy(n):
    """The MirroredStrategy over the first `n` logical CPU devices (cached).

    Over CPUs, MirroredStrategy all-reduces with collective ops whose device
    groups are numbered from 1 in every strategy; two strategies of different
    sizes in one process would both claim group 1 and abort ("joining a group
    with size 4, but that group has size 2"). Each replica count gets its own
    key range through the attribute TensorFlow provides for tests.
    """
    if n not in _STRATEGIES:
        tf.distribute.MirroredStrategy._collective_key_base = 1000 * n
        try:
            _STRATEGIES[n] = tf.distribute.MirroredStrategy(cpu_devices(n))
        finally:
            tf.distribute.MirroredStrategy._collective_key_base = 0
    return _STRATEGIES[n]


@pytest.fixture
def mirrored():
    """Factory: the MirroredStrategy over `n` logical CPU devices."""
    return mirrored_strategy


@pytest.fixture
def work(built, tmp_path):
    """A private copy of the module's `built` directory of small models."""
    shutil.copytree(built, tmp_path / "w")
    return tmp_path / "w"
