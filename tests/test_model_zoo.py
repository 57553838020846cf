"""Model-zoo conversions: keras.applications backbones to sync, outputs unchanged.

Each backbone is built with `weights=None` at a small input size, its BN
layers get random moving statistics, gamma and beta, and the converted
model's outputs are compared with the original's.
"""

import keras
import numpy as np
import pytest

import bnconvert

BN = keras.layers.BatchNormalization

ZOO = [
    ("ResNet50", keras.applications.ResNet50, 64),
    ("MobileNetV2", keras.applications.MobileNetV2, 96),
    ("EfficientNetB0", keras.applications.EfficientNetB0, 64),
    ("DenseNet121", keras.applications.DenseNet121, 64),
]


def _bn_layers(model):
    found, stack, seen = [], [model], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, BN):
            found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name, factory, size", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_model_converts_to_sync_with_identical_outputs(name, factory, size):
    model = factory(weights=None, input_shape=(size, size, 3), classes=10)
    rng = np.random.default_rng(0)
    originals = _bn_layers(model)
    assert originals
    for layer in originals:
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))
    x = rng.normal(size=(2, size, size, 3)).astype("float32")
    expected = np.asarray(model(x, training=False), dtype=np.float64)

    synced, report = bnconvert.convert_model(model, "sync", return_report=True)

    converted = _bn_layers(synced)
    assert len(converted) == len(originals) == report.converted
    assert all(type(layer) is bnconvert.SyncBatchNormalization for layer in converted)
    by_name = {layer.name: layer for layer in originals}
    for layer in converted:
        for a, b in zip(by_name[layer.name].weights, layer.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    actual = np.asarray(synced(x, training=False), dtype=np.float64)
    assert np.max(np.abs(actual - expected)) <= 1e-6
    assert report.max_abs_diff <= 1e-6
