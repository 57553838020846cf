"""Loading a Keras 3 model does not draw the weights it then reads from the file (issue 18).

Keras builds every layer of a loaded model, drawing each weight from its
initializer, and then assigns every weight from the file: for EfficientNetV2L
half of its load. bnconvert's load defers those draws. These tests check the
result against Keras's own load, bit for bit, and that a variable the file
does not restore still gets its initializer's value.
"""

import os
import threading

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bnconvert import _keras3 as _k3  # noqa: E402
from bnconvert import flavour  # noqa: E402
from bnconvert import formats  # noqa: E402
from bnconvert import keras_internals as internals  # noqa: E402


@keras.saving.register_keras_serializable("test_deferred")
class CountingNormal(keras.initializers.RandomNormal):
    """A seeded initializer that counts its draws."""

    calls = 0

    def __call__(self, shape, dtype=None):
        type(self).calls += 1
        return super().__call__(shape, dtype=dtype)


@keras.saving.register_keras_serializable("test_deferred")
class HalfSaved(keras.layers.Layer):
    """Saves `kept` only; `fresh` comes from its seeded initializer at every load."""

    def build(self, input_shape):
        self.kept = self.add_weight(
            shape=(input_shape[-1], 3), initializer="glorot_uniform", name="kept")
        self.fresh = self.add_weight(
            shape=FRESH, initializer=keras.initializers.RandomNormal(seed=7), trainable=False,
            name="fresh")

    def call(self, x):
        return x @ self.kept + keras.ops.mean(self.fresh)

    def save_own_variables(self, store):
        store["0"] = self.kept.numpy()

    def load_own_variables(self, store):
        self.kept.assign(store["0"])


# Large enough to be deferred (`_keras3.DEFERRED_MIN_SIZE`).
FRESH = (256, 256)


def _model():
    inputs = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(128, 1)(inputs)
    y = keras.layers.Conv2D(64, 3, kernel_initializer=CountingNormal(seed=1))(y)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.Dropout(0.2)(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    y = keras.layers.LayerNormalization()(y)
    y = keras.layers.Dense(5)(y)
    y = HalfSaved()(y)
    return keras.Model(inputs, y)


def _values(model):
    # A seed generator's state is drawn from Python's `random` at every load.
    return {v.path: v.numpy() for v in model.variables if "seed_generator" not in v.path}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _model()
    rng = np.random.default_rng(0)
    for v in model.variables:
        if "seed_generator" not in v.path and "fresh" not in v.path:
            v.assign(rng.normal(size=v.shape).astype(v.dtype))
    path = tmp_path_factory.mktemp("deferred") / "m.keras"
    model.save(path)
    return path


def _load(path):
    return flavour.get(flavour.KERAS3).load(path, formats.KERAS)


def test_load_equals_keras_load_bit_for_bit(saved):
    ours, theirs = _values(_load(saved)), _values(keras.saving.load_model(saved))
    assert ours.keys() == theirs.keys() and len(ours) >= 12
    for path, value in theirs.items():
        np.testing.assert_array_equal(ours[path], value, err_msg=path)
    # The weight the file does not hold is its initializer's draw, not NaN.
    fresh = next(v for k, v in ours.items() if k.endswith("fresh"))
    np.testing.assert_array_equal(
        fresh, keras.initializers.RandomNormal(seed=7)(FRESH).numpy())


def test_load_draws_no_weight_the_file_holds(saved):
    CountingNormal.calls = 0
    keras.saving.load_model(saved)
    assert CountingNormal.calls == 1  # Keras's own load draws the kernel, then overwrites it
    CountingNormal.calls = 0
    model = _load(saved)
    assert CountingNormal.calls == 0
    assert all(np.isfinite(v).all() for v in _values(model).values())


def test_nan_weights_read_from_the_file_stay_nan(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.layers[0].kernel.assign(np.full((3, 2), np.nan, "float32"))
    model.save(tmp_path / "nan.keras")
    kernel = _load(tmp_path / "nan.keras").layers[0].kernel.numpy()
    assert np.isnan(kernel).all()


def test_a_variable_set_past_assign_is_kept():
    with internals.keras3_deferred_initializers(lambda init, shape: True):
        layer = keras.layers.Dense(2)
        layer.build((None, 3))
        assert np.isnan(layer.kernel.numpy()).all()  # not drawn yet
        layer.kernel.value.assign(np.ones((3, 2), "float32"))  # TensorFlow's own assign
    np.testing.assert_array_equal(layer.kernel.numpy(), np.ones((3, 2)))
    np.testing.assert_array_equal(layer.bias.numpy(), np.zeros(2))  # drawn on leaving


def test_other_threads_and_nested_scopes_draw_as_usual():
    made = {}

    def build():
        layer = keras.layers.Dense(2, kernel_initializer=keras.initializers.Ones())
        layer.build((None, 3))
        made["kernel"] = layer.kernel.numpy()

    with internals.keras3_deferred_initializers(lambda init, shape: True):
        thread = threading.Thread(target=build)
        thread.start()
        thread.join()
        with internals.keras3_deferred_initializers(lambda init, shape: True):
            inner = keras.layers.Dense(2, kernel_initializer=keras.initializers.Ones())
            inner.build((None, 3))
        # The inner scope did nothing of its own: the outer one still defers.
        assert np.isnan(inner.kernel.numpy()).all()
    np.testing.assert_array_equal(made["kernel"], np.ones((3, 2)))
    np.testing.assert_array_equal(inner.kernel.numpy(), np.ones((3, 2)))
    # Outside every scope, variables are drawn when made.
    after = keras.layers.Dense(2, kernel_initializer=keras.initializers.Ones())
    after.build((None, 3))
    np.testing.assert_array_equal(after.kernel.numpy(), np.ones((3, 2)))


def test_a_failed_load_leaves_variable_creation_as_it_was(tmp_path):
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(Exception):
        with internals.keras3_deferred_initializers(lambda init, shape: True):
            keras.layers.Dense(2).build((None, 3))
            raise ValueError("the load failed")
    layer = keras.layers.Dense(2, kernel_initializer=keras.initializers.Ones())
    layer.build((None, 3))
    np.testing.assert_array_equal(layer.kernel.numpy(), np.ones((3, 2)))


def test_small_state_a_layer_reads_while_it_builds_is_drawn_as_usual(tmp_path):
    # Normalization turns its adapted mean and variance into constants in
    # build; a placeholder there would become NaN outputs after set_weights.
    data = np.random.default_rng(1).normal(3.0, 2.0, size=(64, 4)).astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(data)
    model = keras.Sequential([keras.Input((4,)), norm, keras.layers.Dense(2)])
    keras3 = flavour.get(flavour.KERAS3)
    copy = keras3.fresh_copy(model, {})
    np.testing.assert_allclose(copy(data).numpy(), model(data).numpy(), rtol=0, atol=0)
    model.save(tmp_path / "norm.keras")
    loaded = _load(tmp_path / "norm.keras")
    np.testing.assert_allclose(loaded(data).numpy(), model(data).numpy(), rtol=0, atol=0)
    assert _k3.DEFERRED_MIN_SIZE > 4
