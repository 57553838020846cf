"""The tf-keras SyncBatchNormalization survives SavedModel dirs and H5 files.

Each file is reloaded in a fresh process with `tf_keras.models.load_model`
and no `custom_objects`: `import bnconvert` alone must register the layer,
whether tf_keras is imported after bnconvert or before it.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tf_keras

import bnconvert
from test_compat_layers import full_config

RELOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    if sys.argv[4] == "bnconvert-first":
        import bnconvert
        assert "tf_keras" not in sys.modules, "import bnconvert imported tf_keras"
        import tf_keras
    else:
        import tf_keras
        import bnconvert
    model = tf_keras.models.load_model(sys.argv[1], compile=False)
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], model(x, training=False).numpy())
    layers = {}
    for name in ("sync_bn_full", "sync_bn_default"):
        layer = model.get_layer(name)
        layers[name] = {
            "class": type(layer).__module__ + "." + type(layer).__name__,
            "weights": [w.numpy().tolist() for w in layer.weights],
            "config": layer.get_config(),
        }
    print(json.dumps(layers))
    """
)


def build_model():
    config = dict(full_config(), trainable=True)
    inputs = tf_keras.Input((4, 3, 2))
    x = tf_keras.layers.Conv2D(2, 1, use_bias=False)(inputs)
    x = bnconvert.compat.SyncBatchNormalization(**config)(x)
    outputs = bnconvert.compat.SyncBatchNormalization(name="sync_bn_default")(x)
    model = tf_keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.uniform(0.5, 1.5, size=tuple(w.shape)).astype("float32"))
    return model


def reload(path, x_path, y_path, order):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(path), str(x_path), str(y_path), order],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt,order",
    [("savedmodel", "bnconvert-first"), ("h5", "bnconvert-first"), ("savedmodel", "tf_keras-first")],
)
def test_reloads_in_a_fresh_process_without_custom_objects(tmp_path, fmt, order):
    model = build_model()
    path = tmp_path / ("model" if fmt == "savedmodel" else "model.h5")
    model.save(path)
    if fmt == "savedmodel":
        assert (path / "keras_metadata.pb").is_file()
    x = np.random.default_rng(1).normal(size=(3, 4, 3, 2)).astype("float32")
    np.save(tmp_path / "x.npy", x)

    info = reload(path, tmp_path / "x.npy", tmp_path / "y.npy", order)

    for name, reloaded in info.items():
        assert reloaded["class"] == "bnconvert.compat.tf_keras_layers.SyncBatchNormalization"
        layer = model.get_layer(name)
        assert len(reloaded["weights"]) == len(layer.weights)
        for saved, w in zip(reloaded["weights"], layer.weights):
            np.testing.assert_array_equal(saved, w.numpy(), err_msg=w.name)
        expected = layer.get_config()
        for key in expected:
            # default=list: tf-keras keeps `axis` in a ListWrapper.
            assert json.dumps(reloaded["config"][key], sort_keys=True) == json.dumps(
                expected[key], sort_keys=True, default=list
            ), (name, key)
    np.testing.assert_array_equal(
        np.load(tmp_path / "y.npy"), model(x, training=False).numpy()
    )
