"""Pins every private Keras, tf-keras and TensorFlow access (the bnconvert/keras_internals package).

Each test exercises one accessor against the installed versions; when an
upgrade moves a private name, the failing test says which one. The safety
accessors must fail closed: a model is not loaded without them.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import bnconvert  # noqa: E402,F401
from bnconvert import keras_internals as internals  # noqa: E402
from bnconvert import model_io  # noqa: E402
from bnconvert.errors import ModelLoadError  # noqa: E402


def pinned(name, check):
    """Runs `check`; a failure names the private access that moved."""
    try:
        check()
    except Exception as e:  # noqa: BLE001 - any failure means the access moved
        pytest.fail(
            f"Private Keras/TF access '{name}' no longer works with Keras "
            f"{keras.__version__} / tf-keras {tf_keras.__version__} / TF "
            f"{tf.__version__}: {type(e).__name__}: {e}. Update bnconvert/keras_internals/."
        )


class Pair(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(2, name="first")
        self.second = keras.layers.Dense(2, name="second")

    def call(self, x):
        return self.second(self.first(x))


def _k3_functional():
    inputs = keras.Input((4,), name="x")
    y = keras.layers.Dense(3, name="d")(inputs)
    y = keras.layers.BatchNormalization(name="bn")(y, training=False)
    return keras.Model(inputs, y, name="f")


def _tk_functional():
    inputs = tf_keras.Input((4,), name="x")
    y = tf_keras.layers.Dense(3, name="d")(inputs)
    y = tf_keras.layers.BatchNormalization(name="bn")(y, training=False)
    return tf_keras.Model(inputs, y, name="f")


def test_keras3_functional_class():
    def check():
        model = _k3_functional()
        assert type(model) is internals.keras3_functional_class()

    pinned("keras.src.models.functional.Functional", check)


def test_direct_sublayers_and_tracked_swap():
    def check():
        layer = Pair()
        first, second = internals.direct_sublayers(layer, keras.layers.Layer)
        assert (first.name, second.name) == ("first", "second")
        replacement = keras.layers.Dense(2, name="third")
        internals.replace_tracked_sublayer(layer, first, replacement)
        names = [c.name for c in internals.direct_sublayers(layer, keras.layers.Layer)]
        assert names == ["third", "second"]
        assert all(a in vars(layer) for a in internals.TRACKING_ATTRIBUTES)

    pinned("Layer._layers / Layer._tracker.replace_tracked_value", check)


def test_has_symbolic_inputs():
    def check():
        assert internals.has_symbolic_inputs(_k3_functional())
        assert internals.has_symbolic_inputs(_tk_functional())

        class Sub(keras.Model):
            def call(self, x):
                return x

        assert not internals.has_symbolic_inputs(Sub())

    pinned("Model._inputs_struct", check)


def test_call_context_args_and_inference_call_context():
    def check():
        model = _k3_functional()
        bn, dense = model.get_layer("bn"), model.get_layer("d")
        assert "training" in internals.call_context_args(bn)
        x = keras.Input((3,))
        with_op = keras.Model(x, keras.ops.relu(x))
        (op,) = [n.layer for n in internals.graph_nodes(with_op) if not n.is_input]
        assert not isinstance(op, keras.layers.Layer)
        assert "training" not in internals.call_context_args(op)
        seen = []

        class Probe(keras.layers.Layer):  # its call takes no `training`
            def call(self, x):
                seen.append(self._get_call_context().training)
                return x

        probe = Probe()
        with internals.inference_call_context(model):
            probe(np.zeros((1, 3), "float32"))
            dense(np.zeros((1, 4), "float32"))
        probe(np.zeros((1, 3), "float32"))
        assert seen == [False, None]  # inside the context only

    pinned("keras.src.layers.layer.CallContext / global_state current_call_ctx", check)


def test_shadow_method_is_untracked_and_removable():
    def check():
        layer = keras.layers.Dense(2)
        internals.shadow_method(layer, "add_weight", lambda *a, **k: "shadowed")
        assert layer.add_weight() == "shadowed"
        internals.unshadow_method(layer, "add_weight")
        layer.build((None, 3))
        assert [tuple(w.shape) for w in layer.weights] == [(3, 2), (2,)]

    pinned("object.__setattr__ on a Keras layer", check)


def test_backend_calls_through_ops_run_keras_box_utilities_symbolically():
    def convert(boxes):
        return keras.utils.bounding_boxes.convert_format(boxes, source="xyxy",
                                                          target="center_xywh")

    def check():
        x = keras.Input((3, 4))
        with pytest.raises(ValueError, match="KerasTensor"):
            convert(x)  # the backend's own functions refuse symbolic tensors
        with internals.backend_calls_through_ops():
            model = keras.Model(x, convert(x))
        boxes = np.array([[[0.0, 0.0, 2.0, 4.0], [1.0, 1.0, 3.0, 2.0], [0, 0, 0, 0]]], "float32")
        expected = np.asarray(convert(boxes))  # restored: concrete tensors as before
        np.testing.assert_allclose(np.asarray(model(boxes)), expected)
        np.testing.assert_allclose(expected[0, :2], [[1, 2, 2, 4], [2, 1.5, 2, 1]])

    pinned("keras.src.utils.backend_utils.DynamicBackend", check)


def test_none_outputs_dropped_lets_a_layer_return_none_symbolically():
    class Pair(keras.layers.Layer):
        def call(self, x):
            return x * 2.0, None

    def check():
        x = keras.Input((3,))
        with pytest.raises(ValueError, match="must be tensors"):
            Pair()(x)  # Keras refuses None among a symbolic call's outputs
        with internals.none_outputs_dropped():
            y, none = Pair()(x)
        assert none is None
        model = keras.Model(x, y)
        np.testing.assert_allclose(np.asarray(model(np.ones((1, 3), "float32"))), [[2, 2, 2]])
        with pytest.raises(ValueError, match="must be tensors"):
            Pair()(x)  # restored

    pinned("keras.src.ops.node.Node", check)


@pytest.mark.parametrize("build", [_k3_functional, _tk_functional], ids=["keras3", "tf_keras"])
def test_graph_nodes_and_producers(build):
    def check():
        model = build()
        nodes = internals.graph_nodes(model)
        called = [n.layer.name for n in nodes if not n.is_input]
        assert called == ["d", "bn"]
        bn_node = [n for n in nodes if n.layer is not None and n.layer.name == "bn"][0]
        assert bn_node.kwargs.get("training") is False
        (tensor,) = bn_node.input_tensors
        producer, is_input = internals.producer_of(tensor)
        assert producer.name == "d" and not is_input
        assert internals.producing_layer(model.inputs[0]).name == "x"
        assert internals.producer_of(model.inputs[0])[1] is True
        # The native ONNX exporter reads a call's arguments and outputs.
        assert bn_node.args[0] is tensor
        assert bn_node.outputs == tuple(model.outputs)

    pinned("Functional._nodes_by_depth / KerasTensor._keras_history / _inbound_nodes / "
           "Node.arguments, call_args, outputs", check)


def test_producing_node_finds_a_mask_outside_the_graph():
    def check():
        tokens = keras.Input((4,), dtype="int32")
        embedded = keras.layers.Embedding(3, 2, mask_zero=True)(tokens)
        mask = embedded._keras_mask  # made by compute_mask, not a node of the model
        node = internals.producing_node(mask)
        assert node is not None and not node.is_input
        assert node.input_tensors == (tokens,) and node.outputs == (mask,)
        assert internals.producing_node(tokens).is_input

    pinned("KerasTensor._keras_history / _inbound_nodes (a mask's producer)", check)


def test_is_consumed():
    def check():
        x = keras.Input((3, 4))
        y = keras.ops.abs(x)
        z = keras.ops.exp(y)
        keras.Model(x, z)
        assert internals.is_consumed(internals.producing_layer(y))
        assert not internals.is_consumed(internals.producing_layer(z))

    pinned("Operation._outbound_nodes", check)


def test_graph_nodes_of_tf_functions_list_every_tensor_argument():
    def check():
        import tensorflow as tf
        import tf_keras

        x = tf_keras.Input((3, 4), name="x")
        y = tf.einsum("bij,bkj->bik", x, x * 2.0)
        model = tf_keras.Model(x, y)
        (node,) = [n for n in internals.graph_nodes(model)
                   if n.layer is not None and n.layer.name.startswith("tf.einsum")]
        # tf-keras's own `input_tensors` is the first argument: the equation.
        assert len(node.input_tensors) == 2
        assert node.input_tensors[0] is x and node.args[0] == "bij,bkj->bik"

    pinned("tf_keras Node.keras_inputs", check)


def test_graph_nodes_of_a_keras3_sequential():
    def check():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
        (node,) = [n for n in internals.graph_nodes(model) if not n.is_input]
        assert node.layer.name == "d" and node.outputs == tuple(model.outputs)

    pinned("Sequential._functional", check)


def test_freeze_concrete_function():
    def check():
        variable = tf.Variable([2.0, 3.0])
        fn = tf.function(lambda x: x * variable).get_concrete_function(
            tf.TensorSpec([2], tf.float32)
        )
        frozen = internals.freeze_concrete_function(fn)
        assert not frozen.variables
        np.testing.assert_array_equal(frozen(tf.constant([1.0, 1.0]))[0], [2.0, 3.0])

    pinned("tensorflow.python...convert_variables_to_constants_v2", check)


def test_tf_keras_functional_class():
    pinned(
        "tf_keras.src.engine.functional.Functional",
        lambda: isinstance(_tk_functional(), internals.tf_keras_functional_class()) or 1 / 0,
    )


def test_safe_mode_scopes_refuse_lambda_code():
    def check():
        fn_layer = keras.layers.Lambda(lambda x: x + 1)
        config = fn_layer.get_config()
        with internals.keras3_safe_mode_scope(True):
            with pytest.raises(ValueError, match="unsafe|safe_mode"):
                keras.layers.Lambda.from_config(config)
        tk_layer = tf_keras.layers.Lambda(lambda x: x + 1)
        tk_config = tk_layer.get_config()
        with internals.tf_keras_safe_mode_scope(True):
            with pytest.raises(ValueError, match="unsafe|safe_mode"):
                tf_keras.layers.Lambda.from_config(tk_config)

    pinned("keras/tf_keras serialization_lib.SafeModeScope", check)


def test_tf_keras_revived_layer_class():
    pinned(
        "tf_keras.src.saving.legacy.saved_model.load.RevivedLayer",
        # A mixin of the classes tf-keras makes up for unknown custom layers;
        # tests/test_cli_robustness.py loads such a model and sees it refused.
        lambda: internals.tf_keras_revived_layer_class().__name__ == "RevivedLayer" or 1 / 0,
    )


@pytest.mark.parametrize("module", [
    "tf_keras.src.saving.serialization_lib",
    "tf_keras.src.saving.legacy.saved_model.load",
])
def test_tf_keras_load_fails_closed_without_its_safety_checks(tmp_path, monkeypatch, module):
    """If a safety check's private import breaks, the model is refused, not loaded unchecked."""
    path = tmp_path / "tk.h5"
    _tk_functional().save(path)
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # makes `from module import X` fail
    with pytest.raises(ModelLoadError) as e:
        model_io.load_model(path)
    message = str(e.value)
    assert "\n" not in message and "safely" in message and str(path) in message


def test_keras3_load_fails_closed_without_safe_mode_scope(tmp_path, monkeypatch):
    from bnconvert import convert

    model = _k3_functional()
    import sys

    monkeypatch.setitem(sys.modules, "keras.src.saving.serialization_lib", None)
    # Re-creating a layer needs the safe-mode scope: without it, nothing is built.
    with pytest.raises(Exception) as e:
        convert.convert_model(model)
    assert "SafeModeScope" in str(e.value)


def test_tf_keras_saved_metadata(tmp_path):
    def check():
        _tk_functional().save(tmp_path / "sm")
        texts = internals.tf_keras_saved_metadata((tmp_path / "sm" / "keras_metadata.pb").read_bytes())
        assert any('"class_name": "BatchNormalization"' in t for t in texts), texts
        with pytest.raises(ValueError):
            internals.tf_keras_saved_metadata(b"\xff" * 16)

    pinned("tf_keras.protobuf.saved_metadata_pb2.SavedMetadata", check)


def test_keras3_deferred_initializers():
    def check():
        with internals.keras3_deferred_initializers(lambda init, shape: True):
            layer = keras.layers.Dense(2, kernel_initializer=keras.initializers.Ones())
            layer.build((None, 3))
            assert np.isnan(layer.kernel.numpy()).all()  # the draw was deferred
        np.testing.assert_array_equal(layer.kernel.numpy(), np.ones((3, 2)))

    pinned("keras.src.backend.tensorflow.core.Variable._initialize_with_initializer", check)


def test_keras3_saving_skipsets():
    def check():
        from keras.src.saving import saving_lib

        fresh = saving_lib.get_attr_skipset("Layer")
        # Keras alone rebuilds the set on every call (the reason for the hook;
        # once this fails, Keras caches it itself and the hook can go).
        assert saving_lib.get_attr_skipset("Layer") is not fresh
        with internals.keras3_saving_skipsets():
            cached = saving_lib.get_attr_skipset("Layer")
            assert cached == fresh and saving_lib.get_attr_skipset("Layer") is cached
            assert saving_lib.get_attr_skipset("Functional") == (
                fresh | {"operations", "_operations"}
            )
        assert saving_lib.get_attr_skipset("Layer") is not cached  # taken away again

    pinned("keras.src.saving.saving_lib.get_attr_skipset", check)


def test_bnconvert_save_and_load_leave_keras_skipsets_alone(tmp_path):
    from keras.src.saving import saving_lib

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(inputs))
    model.get_layer("d").kernel.assign(np.arange(6, dtype="float32").reshape(3, 2) / 7)
    out = model_io.save_model(model, tmp_path / "m.keras")
    loaded = model_io.load_model(out)
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    # Keras's own save and load afterwards run as they would without bnconvert.
    assert saving_lib.get_attr_skipset("Layer") is not saving_lib.get_attr_skipset("Layer")
