"""SyncBatchNormalization survives .keras and .h5 files, reloaded in a new process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras

import bnconvert
from test_layers import FULL_CONFIG

RELOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import bnconvert  # registers the layer: no custom_objects below
    model = keras.models.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], model(x, training=False).numpy())
    layer = model.get_layer("sync_bn_full")
    print(json.dumps({
        "class": type(layer).__module__ + "." + type(layer).__name__,
        "weights": {w.path.split("/")[-1]: w.numpy().tolist() for w in layer.weights},
        "config": layer.get_config(),
    }))
    """
)


def build_model():
    config = dict(FULL_CONFIG, trainable=True)
    inputs = keras.Input((4, 3, 2))
    x = keras.layers.Conv2D(2, 1, use_bias=False)(inputs)
    outputs = bnconvert.SyncBatchNormalization(**config)(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.uniform(0.5, 1.5, size=tuple(w.shape)).astype("float32"))
    return model


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_reloads_in_a_fresh_process_without_custom_objects(tmp_path, ext):
    model = build_model()
    path = tmp_path / f"model{ext}"
    model.save(path)
    x = np.random.default_rng(1).normal(size=(3, 4, 3, 2)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["class"] == "bnconvert.layers.SyncBatchNormalization"
    layer = model.get_layer("sync_bn_full")
    for w in layer.weights:
        np.testing.assert_array_equal(info["weights"][w.path.split("/")[-1]], w.numpy())
    expected = layer.get_config()
    for key in FULL_CONFIG:
        assert json.dumps(info["config"][key], sort_keys=True) == json.dumps(
            expected[key], sort_keys=True
        ), key
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), model(x, training=False).numpy())
