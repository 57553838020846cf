"""Keras 3's own BatchNormalization test suite, run with our layer in its place.

When the installed Keras wheel ships `keras/src/layers/normalization/
batch_normalization_test.py` (Keras 3.x does), its `BatchNormalizationTest`
runs here with `keras.src.layers` replaced, for that module only, by a view
in which `BatchNormalization` is `bnconvert.SyncBatchNormalization`. Nothing
of Keras's code is copied: it is imported from the wheel at test time.

Deliberate differences are listed in `DELIBERATE` with the reason, and are
skipped by name (the README's layer section documents them). The checks at
the end of this file restate the cases the issue names in our own words, so
they run whatever the wheel holds.
"""

import importlib

import numpy as np
import pytest

import bnconvert

try:
    _upstream = importlib.import_module(
        "keras.src.layers.normalization.batch_normalization_test"
    )
except ImportError:  # a wheel without its tests
    _upstream = None

# test name prefix -> why our layer deliberately differs.
DELIBERATE = {}


class _LayersWithOurBN:
    """`keras.src.layers`, except that `BatchNormalization` is ours."""

    def __init__(self, layers):
        self._layers = layers

    def __getattr__(self, name):
        if name == "BatchNormalization":
            return bnconvert.SyncBatchNormalization
        return getattr(self._layers, name)


if _upstream is not None:

    class TestKerasSuiteWithSyncBatchNormalization(_upstream.BatchNormalizationTest):
        """Keras's test cases; our class is what `layers.BatchNormalization` names."""

        def setUp(self):
            super().setUp()
            for prefix, why in DELIBERATE.items():
                if self._testMethodName.startswith(prefix):
                    self.skipTest(f"deliberate difference: {why}")
            self._saved_layers = _upstream.layers
            _upstream.layers = _LayersWithOurBN(self._saved_layers)

        def tearDown(self):
            _upstream.layers = self._saved_layers
            super().tearDown()

        def test_the_substitution_is_in_effect(self):
            assert _upstream.layers.BatchNormalization is bnconvert.SyncBatchNormalization


# Our own statement of the cases the issue names, independent of the wheel.


@pytest.mark.parametrize(
    "clipping, message",
    [
        ({"random_key": 1.0}, "Received invalid keys"),
        ({"rmax": 0.0, "rmin": 1.0}, "rmax should be"),
        ({"rmax": 1.0, "dmax": -1.0}, "dmax should be non-negative"),
    ],
)
@pytest.mark.parametrize(
    "cls",
    [bnconvert.SyncBatchNormalization, bnconvert.compat.SyncBatchNormalization],
    ids=["keras3", "tf_keras"],
)
def test_invalid_renorm_clipping_messages_are_keras_messages(cls, clipping, message):
    with pytest.raises(ValueError, match=message) as info:
        cls(renorm=True, renorm_clipping=clipping)
    assert "Received: renorm_clipping=" in str(info.value)


@pytest.mark.parametrize(
    "cls",
    [bnconvert.SyncBatchNormalization, bnconvert.compat.SyncBatchNormalization],
    ids=["keras3", "tf_keras"],
)
def test_bad_clipping_is_accepted_without_renorm(cls):
    # Keras validates `renorm_clipping` only when renorm is on.
    layer = cls(renorm=False, renorm_clipping={"random_key": 1.0, "dmax": -1.0})
    x = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
    y = np.asarray(layer(x, training=True), np.float64)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3)
    np.testing.assert_allclose(y, expected, atol=1e-5)
