"""TensorFlow (frozen graphs for tf2onnx) and tf-keras (safe mode, revived layers, metadata)."""

from bnconvert.keras_internals._errors import _missing


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
    nodes that tf2onnx cannot convert. Grappler inlines only functions not
    marked `_XlaMustCompile`, which export does not need.
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
        InternalsError: The class is gone; nothing loads without the check using it.
    """
    try:
        from tf_keras.src.saving.legacy.saved_model.load import RevivedLayer
    except ImportError as e:
        raise _missing("tf-keras RevivedLayer (detects unresolved custom classes)", e) from e
    return RevivedLayer


def tf_keras_saved_metadata(data):
    """The layers' metadata (JSON texts) in the bytes of a tf-keras `keras_metadata.pb`.

    Raises:
        InternalsError: The message class is gone; nothing loads unchecked.
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
