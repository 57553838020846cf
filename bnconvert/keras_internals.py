"""Every private Keras, tf-keras and TensorFlow name that bnconvert touches.

Keras exports no public way to do a few things a graph rewriter needs: list
a plain layer's direct sublayers, swap one of them in Keras's own tracking
list, read the graph nodes of a Functional model, or find the layer that
produced a symbolic tensor. Those accesses live here and nowhere else, each
behind a small function, and `tests/test_keras_internals.py` pins every one:
an upgrade that removes one fails that test with the name of what moved.

Accesses that a safety check depends on (tf-keras's `SafeModeScope` and
`RevivedLayer`) fail closed: if they cannot be imported, `InternalsError`
is raised and the caller refuses to load the model, rather than loading it
without the check.
"""

import contextlib
import dataclasses
import inspect


class InternalsError(ImportError):
    """A private Keras/TF name bnconvert relies on is gone (an upgrade moved it)."""


def _missing(what, error):
    return InternalsError(
        f"This Keras/TensorFlow version has no {what}, which bnconvert needs; "
        f"install a version in bnconvert's supported range ({error})"
    )


# -- Keras 3 --------------------------------------------------------------


def keras3_functional_class():
    """The class of `keras.Model(inputs, outputs)` models (not exported)."""
    try:
        from keras.src.models.functional import Functional
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("keras.src.models.functional.Functional", e) from e
    return Functional


def direct_sublayers(layer, layer_class):
    """`layer`'s direct sublayers in Keras 3's tracking order (`_layers`)."""
    return [c for c in getattr(layer, "_layers", []) if isinstance(c, layer_class)]


def replace_tracked_sublayer(parent, old, new):
    """Puts `new` in `old`'s place in Keras 3's list of `parent`'s sublayers."""
    parent._tracker.replace_tracked_value("layers", old, new)


# Attributes through which Keras 3 tracks sublayers; an attribute walk that
# swaps a sublayer must leave them to `replace_tracked_sublayer`.
TRACKING_ATTRIBUTES = ("_layers", "_tracker")


def keras3_safe_mode_scope(safe_mode):
    """Keras 3's scope that `Lambda.from_config` and the loaders consult.

    Raises:
        InternalsError: The scope is gone; nothing is deserialized without it.
    """
    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError as e:
        raise _missing("Keras SafeModeScope (safe mode for Lambda layers)", e) from e
    return SafeModeScope(safe_mode)


def has_symbolic_inputs(model):
    """Whether a model was built on symbolic inputs (`keras.Input` tensors).

    Keras 3 models keep them in `_inputs_struct` (its `inputs` property
    raises for a subclassed model); tf-keras's `inputs` is public.
    """
    if hasattr(type(model), "_inputs_struct") or hasattr(model, "_inputs_struct"):
        return getattr(model, "_inputs_struct", None) is not None and bool(model.inputs)
    return bool(getattr(model, "inputs", None))


def call_context_args(operation):
    """The call-context arguments (`training`, ...) a Keras 3 layer's call takes.

    A Functional model's call passes its own `training` to exactly these
    layers (`_call_context_args`); operations have none.
    """
    return getattr(operation, "_call_context_args", ())


@contextlib.contextmanager
def inference_call_context(model):
    """The call context a Keras 3 `model(x, training=False)` opens for its layers.

    Layers called in it see `training=False` from their caller, as inside
    the model's own call, even those not given the argument explicitly
    (a custom layer's sublayers). The context is Keras's global
    `current_call_ctx` (a `CallContext` whose entry layer is `model`).
    """
    try:
        from keras.src.backend.common import global_state
        from keras.src.layers.layer import CallContext
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("Keras's layer CallContext", e) from e
    if global_state.get_global_attribute("current_call_ctx") is not None:
        raise RuntimeError("inference_call_context must not be opened inside a layer call")
    context = CallContext(entry_layer=model)
    context.set_value("training", False)
    global_state.set_global_attribute("current_call_ctx", context)
    try:
        yield
    finally:
        global_state.set_global_attribute("current_call_ctx", None)


def shadow_method(obj, name, function):
    """Sets an instance attribute past Keras's attribute tracking.

    Keras tracks every attribute set on a layer; a temporary method override
    is not state, so it is set with `object.__setattr__` and removed with
    `unshadow_method`.
    """
    object.__setattr__(obj, name, function)


def unshadow_method(obj, name):
    object.__delattr__(obj, name)


@contextlib.contextmanager
def backend_calls_through_ops():
    """Keras utilities that call backend functions directly dispatch through `keras.ops` meanwhile.

    `keras.utils.bounding_boxes` and the preprocessing layers call the
    backend's own functions through a `DynamicBackend`
    (`keras.src.utils.backend_utils`), which raise on symbolic tensors; the
    same functions of `keras.ops` record them as graph nodes, and on concrete
    tensors compute the same thing.

    Raises:
        InternalsError: `DynamicBackend` is gone.
    """
    try:
        from keras.src.utils.backend_utils import DynamicBackend
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("keras.src.utils.backend_utils.DynamicBackend", e) from e
    import keras

    namespaces = {"numpy": keras.ops, "nn": keras.ops, "math": keras.ops, "core": keras.ops,
                  "image": keras.ops.image, "linalg": keras.ops.linalg}
    original = DynamicBackend.__getattr__

    def through_ops(self, name):
        own = original(self, name)
        if inspect.ismodule(own) and name in namespaces:
            return _OpsFirst(namespaces[name], own)
        if callable(own) and hasattr(keras.ops, name):
            return getattr(keras.ops, name)
        return own

    DynamicBackend.__getattr__ = through_ops
    try:
        yield
    finally:
        DynamicBackend.__getattr__ = original


class _OpsFirst:
    """A backend module whose functions `keras.ops` has are taken from `keras.ops`."""

    def __init__(self, ops, own):
        self._ops = ops
        self._own = own

    def __getattr__(self, name):
        return getattr(self._ops, name, None) or getattr(self._own, name)


# -- rewriting a layer in place, both flavours -----------------------------

# What ties a layer object to the graphs it was called in and to its place in
# the model; everything else about it comes from its replacement.
_PLACE_ATTRIBUTES = frozenset({
    "_inbound_nodes", "_outbound_nodes", "_parent_path", "_path",  # Keras 3
    "_inbound_nodes_value", "_outbound_nodes_value",  # tf-keras
    "_saved_model_inputs_spec", "_saved_model_arg_spec",  # both
})


def become(layer, new):
    """Turns the object `layer` into `new`, keeping its place in every graph.

    Graph nodes, parent layers' attributes and lists, and symbolic tensors'
    histories all hold the layer object itself; giving that object the new
    layer's class and state (its config, build state and variables) rewrites
    the layer without touching anything that refers to it: the model's own
    class and config, raw ops, custom layers and nested models stay as they
    are. Only the attributes that record where the layer was called are kept.
    `new` must not be used afterwards.
    """
    state = dict(vars(new))
    state.update({k: v for k, v in vars(layer).items() if k in _PLACE_ATTRIBUTES})
    vars(layer).clear()
    vars(layer).update(state)
    object.__setattr__(layer, "__class__", type(new))
    # A graph replays each call with the keyword arguments recorded for it
    # (Keras 3 records `mask=None` for a BN); drop those the new call lacks.
    parameters = inspect.signature(type(new).call).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        for node in getattr(layer, "_inbound_nodes", None) or ():
            arguments = getattr(node, "arguments", None)
            kwargs = arguments.kwargs if arguments is not None else getattr(
                node, "call_kwargs", None
            )
            if isinstance(kwargs, dict):
                for key in [k for k in kwargs if k not in parameters]:
                    del kwargs[key]


# -- graph nodes, both flavours --------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphNode:
    """One call of a layer in a Functional graph.

    Attributes:
        layer: The layer (or Keras 3 operation) called.
        is_input: Whether the node is an InputLayer's.
        input_tensors: The symbolic tensors passed in.
        kwargs: The keyword arguments of the call (`training`, ...).
        args: The positional arguments of the call, tensors in place.
        outputs: The symbolic tensors the call produced, flat.
    """

    layer: object
    is_input: bool
    input_tensors: tuple
    kwargs: dict
    args: tuple = ()
    outputs: tuple = ()


def graph_nodes(model):
    """The nodes of a Functional model, inputs first (`_nodes_by_depth`)."""
    # A Keras 3 Sequential keeps its graph in a Functional it builds.
    by_depth = getattr(model, "_nodes_by_depth", None)
    if by_depth is None:
        by_depth = model._functional._nodes_by_depth
    nodes = []
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            # Keras 3 names the called object `operation`, tf-keras `layer`.
            layer = getattr(node, "operation", None)
            if layer is None:
                layer = getattr(node, "layer", None)
            arguments = getattr(node, "arguments", None)
            kwargs = arguments.kwargs if arguments is not None else getattr(
                node, "call_kwargs", {}
            )
            args = arguments.args if arguments is not None else getattr(node, "call_args", ())
            # tf-keras's `input_tensors` is the first argument only (a string
            # for `tf.einsum`, a number for `0 * x`); `keras_inputs` is all of them.
            tensors = node.input_tensors if node.is_input else getattr(
                node, "keras_inputs", node.input_tensors)
            nodes.append(GraphNode(
                layer, bool(node.is_input), tuple(_flat(tensors)),
                dict(kwargs or {}), tuple(args or ()), tuple(_flat(node.outputs)),
            ))
    return nodes


def _flat(tensors):
    if isinstance(tensors, (list, tuple)):
        return [t for item in tensors for t in _flat(item)]
    if isinstance(tensors, dict):
        return [t for item in tensors.values() for t in _flat(item)]
    return [tensors]


def producer_of(tensor):
    """`(layer, node_is_input)` for the call that produced a symbolic tensor."""
    layer, node_index, _ = tensor._keras_history
    node = layer._inbound_nodes[node_index]
    return layer, bool(node.is_input)


def producing_layer(tensor):
    """The layer whose call produced a symbolic tensor (`_keras_history`)."""
    return tensor._keras_history[0]


def is_consumed(operation):
    """Whether another op or layer of a graph takes one of `operation`'s outputs."""
    return bool(operation._outbound_nodes)


# -- TensorFlow ------------------------------------------------------------


def freeze_concrete_function(function):
    """A concrete function with its variables turned into constants."""
    try:
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("convert_variables_to_constants_v2", e) from e
    return convert_variables_to_constants_v2(function)


def inline_functions(graph_def, input_names, output_names):
    """`graph_def` with its function calls inlined by TensorFlow's grappler.

    Keras 3 runs some ops as XLA-compiled functions on CPU (a grouped
    convolution), which a frozen graph keeps as `StatefulPartitionedCall`
    nodes that tf2onnx cannot convert. Grappler inlines a function only if
    it is not marked `_XlaMustCompile`; for export it need not be.
    """
    import tensorflow as tf
    from tf2onnx import tf_loader

    for holder in [*graph_def.node, *graph_def.library.function]:
        for key in ("_XlaMustCompile", "_noinline"):
            if key in holder.attr:
                del holder.attr[key]
    with tf.Graph().as_default():
        return tf_loader.tf_optimize_grappler(list(input_names), list(output_names), graph_def)


# -- tf-keras --------------------------------------------------------------


def tf_keras_functional_class():
    """tf-keras's Functional model class (not exported)."""
    try:
        from tf_keras.src.engine.functional import Functional
    except ImportError as e:  # pragma: no cover - pinned by a test
        raise _missing("tf_keras.src.engine.functional.Functional", e) from e
    return Functional


def tf_keras_safe_mode_scope(safe_mode):
    """tf-keras's scope that its Lambda layers consult before running stored code.

    Raises:
        InternalsError: The scope is gone; loading must not go on without it.
    """
    try:
        from tf_keras.src.saving.serialization_lib import SafeModeScope
    except ImportError as e:
        raise _missing("tf-keras SafeModeScope (safe mode for Lambda layers)", e) from e
    return SafeModeScope(safe_mode)


def tf_keras_revived_layer_class():
    """The class tf-keras stands in for a layer whose class it cannot find.

    Raises:
        InternalsError: The class is gone; loading must not go on without
            the check that uses it.
    """
    try:
        from tf_keras.src.saving.legacy.saved_model.load import RevivedLayer
    except ImportError as e:
        raise _missing("tf-keras RevivedLayer (detects unresolved custom classes)", e) from e
    return RevivedLayer


def tf_keras_saved_metadata(data):
    """The layers' metadata (JSON texts) in the bytes of a tf-keras `keras_metadata.pb`.

    Raises:
        InternalsError: tf-keras's message class is gone; a SavedModel is
            not loaded without the config checks that read it.
        ValueError: `data` is not such a message.
    """
    try:
        from google.protobuf.message import DecodeError
        from tf_keras.protobuf import saved_metadata_pb2
    except ImportError as e:
        raise _missing("tf-keras SavedMetadata (reads keras_metadata.pb)", e) from e
    message = saved_metadata_pb2.SavedMetadata()
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(str(e)) from e
    return [node.metadata for node in message.nodes]
