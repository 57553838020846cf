"""The one forward runner (`bnconvert.forward.run`): the model's own outputs, bounded memory.

Every check compares `forward.run` with `model(x, training=False)` to the
bit, on graphs with branches, shared layers, keras.ops nodes, masks,
nested models, several inputs and outputs, and (slow) keras.applications
and tf-keras models through the flavour interface; and counts the
intermediate tensors still alive while it runs (weak references), never a
time.
"""

import os
import subprocess
import sys
import weakref

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import bnconvert  # noqa: E402,F401
from bnconvert import check_batch  # noqa: E402
from bnconvert import flavour as flavour_lib  # noqa: E402
from bnconvert import forward  # noqa: E402


def _own(model, arrays):
    inputs = forward._structured(model, arrays)
    return [np.asarray(o) for o in keras.tree.flatten(model(inputs, training=False))]


def assert_same(model, arrays=None):
    arrays = arrays if arrays is not None else check_batch.sample_inputs(model)[0]
    got, want = forward.run(model, arrays), _own(model, arrays)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
    return got


class NoTrainingArg(keras.layers.Layer):
    """A custom layer whose call takes no `training`: its BN inherits the caller's."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization(name="inner_bn")
        self.drop = keras.layers.Dropout(0.5)

    def call(self, x):
        return self.drop(self.bn(x))


def _branchy():
    a = keras.Input((8, 8, 3), name="a")
    b = keras.Input((5,), name="b")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(a)
    x = keras.layers.BatchNormalization(name="bn")(x)
    shared = keras.layers.Conv2D(4, 1, name="shared")
    y = keras.layers.Add(name="sum")([shared(x), shared(keras.layers.ReLU()(x))])
    y = keras.ops.relu(y) * 2.0 + keras.ops.mean(x, axis=-1, keepdims=True)
    y = NoTrainingArg(name="custom")(y)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(y)
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"),
                              keras.layers.BatchNormalization(name="bn1")], name="seq")
    i = keras.Input((3,))
    nested = keras.Model(i, keras.layers.Dense(2, name="d2")(keras.layers.Dropout(0.3)(i)),
                         name="nested")
    z = keras.layers.Concatenate(name="cat")([nested(inner(pooled)), b])
    out = keras.layers.Dense(3, activation="softmax", name="head")(z)
    model = keras.Model({"a": a, "b": b}, [out, pooled], name="branchy")
    _randomize_bn(model)
    return model


def _randomize_bn(model):
    rng = np.random.default_rng(0)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(size=shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, size=shape).astype("float32"))


def test_a_branchy_graph_gives_the_models_own_outputs_to_the_bit():
    model = _branchy()
    assert forward.walkable(model)
    assert_same(model)


def test_masks_and_a_skipped_branch():
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(10, 4, mask_zero=True, name="emb")(tokens)
    x = keras.layers.GRU(3, return_sequences=True, name="gru")(x)
    y = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    model = keras.Model(tokens, y)
    arrays = [np.array([[1, 2, 3, 0, 0, 0], [4, 0, 0, 0, 0, 0]], "int32")]
    assert_same(model, arrays)


def test_each_intermediate_tensor_is_freed_after_its_last_reader():
    alive = []

    class Remember(keras.layers.Layer):
        def call(self, x):
            alive.append(weakref.ref(x))
            return x + 1.0

    class Count(keras.layers.Layer):
        def call(self, x):
            counts.append(sum(r() is not None for r in alive))
            return x

    counts = []
    inputs = keras.Input((3,))
    x, skip = inputs, None
    for i in range(12):
        x = Remember(name=f"r{i}")(x)
        skip = x if i == 3 else skip  # read again at the end
    model = keras.Model(inputs, keras.layers.Add()([Count()(x), skip]))
    arrays = [np.ones((2, 3), "float32")]
    got = forward.run(model, arrays)
    walked, alive[:] = counts[-1], []
    want = _own(model, arrays)
    # Keras's own call holds every tensor; the walk only the inputs of Count
    # (the last one) and the skip connection (r3's input and output alike).
    assert counts[-1] == 12 and walked <= 3
    np.testing.assert_array_equal(got[0], want[0])


def test_what_it_does_not_walk_runs_whole_and_as_a_graph_above_the_limit(monkeypatch):
    calls = []
    real = tf.function
    monkeypatch.setattr(tf, "function", lambda *a, **k: calls.append(a) or real(*a, **k))

    def traced():  # Keras makes tf.functions of its own
        return [c for c in calls if c and getattr(c[0], "__module__", "") == forward.__name__]

    monkeypatch.setattr(forward, "EAGER_LIMIT", 0)
    walked = _branchy()
    assert_same(walked)
    assert not traced()  # walked: no graph, however large

    class Own(keras.Model):
        def call(self, x):
            return self.dense(x) * 2.0

        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

    subclassed = Own()
    subclassed(np.ones((1, 4), "float32"))
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    for model in (subclassed, seq):
        assert not forward.walkable(model)
    arrays = [np.ones((2, 4), "float32")]
    assert_same(seq, arrays)
    assert len(traced()) == 1  # a Sequential has a graph: over the limit of 0


def test_mixed_precision_models_are_called_whole():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    finally:
        keras.config.set_dtype_policy("float32")
    assert not forward.walkable(model)
    assert_same(model, [np.ones((2, 4), "float32")])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV3Small", "EfficientNetV2B0", "ResNet50V2"])
def test_keras_applications_to_the_bit(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3))
    _randomize_bn(model)
    assert forward.walkable(model)
    assert_same(model)


@pytest.mark.slow
def test_tf_keras_models_through_the_flavour_interface():
    import tf_keras

    model = tf_keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3))
    assert flavour_lib.flavour_of(model).name == "tf_keras"
    assert not forward.walkable(model)
    arrays = check_batch.sample_inputs(model)[0]
    got = forward.run(model, arrays)
    np.testing.assert_array_equal(got[0], model(arrays[0], training=False).numpy())


def test_a_max_pooling_window_larger_than_its_input_is_refused_not_crashed(tmp_path):
    # TensorFlow's CPU MaxPool dies of SIGFPE there (InceptionV3 built for any
    # image size, on the check batch's 32x32): the process would end, with no
    # error to read. Run in a child process so that a crash fails this test
    # instead of ending the suite.
    code = (
        "import os\n"
        "os.environ['KERAS_BACKEND'] = 'tensorflow'\n"
        "import keras\n"
        "from bnconvert import export_onnx\n"
        "from bnconvert.errors import BnconvertError\n"
        "x = keras.Input((None, None, 3))\n"
        "y = keras.layers.Conv2D(2, 31)(x)\n"
        "y = keras.layers.MaxPooling2D(3, strides=1, name='small_input_pool')(y)\n"
        "model = keras.Model(x, keras.layers.GlobalAveragePooling2D()(y))\n"
        "try:\n"
        f"    export_onnx(model, {str(tmp_path / 'm.onnx')!r})\n"
        "except BnconvertError as e:\n"
        "    print('REFUSED', type(e).__name__, e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-1500:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("REFUSED")]
    assert line and "VerificationError" in line[0] and "'small_input_pool'" in line[0]
    assert "smaller than its window (3, 3)" in line[0]
