"""tf2onnx, the fallback exporter: trace, freeze, convert.

The model's inference function is traced once as a `tf.function` whose
signature has a `None` batch dimension, frozen (variables and captured
tensors become constants) and converted by `tf2onnx.convert.from_graph_def`;
inputs carry the Keras input layer names and outputs the names of the
Keras layers that produce them, in the Keras order. TensorFlow ops that
tf2onnx leaves unconverted are named in one line.
"""

import contextlib
import os
import time

import keras
import onnx
import tensorflow as tf

from bnconvert import keras_internals as internals
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line


def supported_opsets():
    """The opsets tf2onnx can write: `range` of its table."""
    from tf2onnx import constants

    known = sorted(constants.OPSET_TO_IR_VERSION)
    return range(known[0], known[-1] + 1)


def input_specs(model, input_names):
    """`tf.TensorSpec`s of the model's inputs, with a `None` batch dimension."""
    return [
        tf.TensorSpec((None,) + tuple(t.shape[1:]), tf.as_dtype(t.dtype), name=name)
        for t, name in zip(model.inputs, input_names)
    ]


def convert(model, input_names, output_names, opset):
    """The ONNX model proto, and a note on how tf2onnx got there.

    tf2onnx copies the whole graph before each optimizer pass so that it can
    roll back a pass that raises; for ResNet50 that is half of the export.
    The fast path turns those copies off; a graph on which it fails is
    exported again with tf2onnx's recovery on, which is what plain tf2onnx
    does.
    """
    specs = input_specs(model, input_names)
    structure = model.input

    def serve(*args):
        args = keras.tree.pack_sequence_as(structure, list(args))
        return tuple(keras.tree.flatten(model(args, training=False)))

    fn = tf.function(serve, input_signature=specs, autograph=False)
    # Callers silence TensorFlow and tf2onnx (attempts.quiet_tensorflow).
    # Freezing here, rather than in `from_function`, also turns the
    # eager tensors a layer keeps outside variables (Normalization's
    # mean and variance) into constants; `from_function` would make
    # each of them an extra graph input.
    try:
        frozen = internals.freeze_concrete_function(fn.get_concrete_function())
    except Exception as e:  # noqa: BLE001 - TensorFlow raises many kinds
        raise ConversionError(
            f"Cannot trace model '{model.name}' for the ONNX export: {first_line(e)}"
        ) from e
    renames = dict(zip((t.name for t in frozen.inputs), input_names))
    renames.update(zip((t.name for t in frozen.outputs), output_names))
    graph_def = frozen.graph.as_graph_def()
    note = "tf2onnx fast path"
    if any(n.op.endswith("PartitionedCall") for n in graph_def.node):
        graph_def = internals.inline_functions(
            graph_def, [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
        )
        note += " (function calls inlined first)"
    start = time.perf_counter()
    try:
        with _tf2onnx_recovery(False):
            proto = _tf2onnx(graph_def, frozen, model, renames, opset)
    except Exception as fast_error:  # noqa: BLE001 - tf2onnx raises many kinds
        retry = time.perf_counter()
        try:
            with _tf2onnx_recovery(True):
                proto = _tf2onnx(graph_def, frozen, model, renames, opset)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(
                f"The ONNX exporter (tf2onnx) failed on model '{model.name}': "
                f"{first_line(e)}. Received: opset={opset}"
            ) from e
        note = (
            f"tf2onnx fast path failed ({first_line(fast_error, 80)}); exported with "
            f"tf2onnx's error recovery, {time.perf_counter() - retry:.1f} s after "
            f"{retry - start:.1f} s on the fast path"
        )
    unconverted = sorted({
        n.op_type for n in proto.graph.node
        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)
    } | {n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if unconverted:
        raise ConversionError(
            f"The ONNX exporter (tf2onnx) cannot convert these TensorFlow ops of model "
            f"'{model.name}': {', '.join(unconverted)}; replace the layers that use "
            f"them, or try another opset. Received: opset={opset}"
        )
    _name_outputs_in_keras_order(proto, output_names)
    return proto, note


def _tf2onnx(graph_def, frozen, model, renames, opset):
    import tf2onnx

    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def,
        name=model.name,
        input_names=[t.name for t in frozen.inputs],
        output_names=[t.name for t in frozen.outputs],
        opset=opset,
        tensors_to_rename=renames,
    )
    return proto


def _name_outputs_in_keras_order(proto, output_names):
    """Order graph outputs like the Keras model's and name the batch dim."""
    by_name = {o.name: o for o in proto.graph.output}
    ordered = [by_name[n] for n in output_names]
    copies = [type(o)() for o in ordered]
    for copy, original in zip(copies, ordered):
        copy.CopyFrom(original)
    del proto.graph.output[:]
    proto.graph.output.extend(copies)
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


@contextlib.contextmanager
def _tf2onnx_recovery(on):
    """tf2onnx's switch for its per-pass graph copies (`TF2ONNX_CATCH_ERRORS`).

    tf2onnx 1.17 compares the variable's *name*, not its value, with "TRUE":
    recovery is off whenever the variable is set at all, and on only when
    it is absent.
    """
    key = "TF2ONNX_CATCH_ERRORS"
    old = os.environ.pop(key, None)
    if not on:
        os.environ[key] = "FALSE"
    try:
        yield
    finally:
        os.environ.pop(key, None)
        if old is not None:
            os.environ[key] = old
