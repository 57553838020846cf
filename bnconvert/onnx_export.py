"""Export a Keras model to ONNX and check it in onnxruntime.

The model's inference function is traced once as a `tf.function` whose
signature has a `None` batch dimension, frozen (variables and captured
tensors become constants) and converted by `tf2onnx.convert.from_graph_def`;
inputs carry the Keras input layer names and outputs the names of the
Keras layers that produce them, in the Keras order. TensorFlow ops that
tf2onnx leaves unconverted are named in one line. The serialized model is
run in onnxruntime against the Keras model from memory, and written (to a
temporary name, renamed into place) only when the outputs agree.
"""

import contextlib
import dataclasses
import io
import logging
import os
import time

import keras
import numpy as np
import onnx
import tensorflow as tf

from bnconvert import keras_internals as internals
from bnconvert import paths
from bnconvert import verify
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line
from bnconvert.errors import OutputError
from bnconvert.errors import VerificationError


@dataclasses.dataclass(frozen=True)
class OnnxExportResult:
    """What `export_onnx` wrote and how closely onnxruntime agrees.

    Attributes:
        path: The ONNX file written.
        opset: The ONNX opset of the default domain.
        input_names: ONNX input names (the Keras input layer names).
        output_names: ONNX output names (the Keras output layer names).
        checked: Whether the onnxruntime check ran.
        max_abs_diff: Largest |onnxruntime - Keras| over all outputs and
            check inputs (None when not checked).
        max_rel_diff: Largest `max_abs_diff` of an output divided by the
            largest |Keras output| of that output (None when not checked).
        tolerance: The `rtol` of the per-element check.
        atol: Its absolute term.
        batches: Number of input batches the check ran on.
        exporter_note: How tf2onnx ran: its fast path, or a retry with its
            error recovery on (and what that cost).
    """

    path: str
    opset: int
    input_names: tuple
    output_names: tuple
    checked: bool
    max_abs_diff: float | None
    max_rel_diff: float | None
    tolerance: float
    batches: int
    atol: float = verify.ATOL
    exporter_note: str = ""

    def to_dict(self):
        """The result as a JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["input_names"] = list(self.input_names)
        out["output_names"] = list(self.output_names)
        return out


def export_onnx(model, path, *, opset=None, tolerance=verify.RELATIVE_TOLERANCE,
                atol=verify.ATOL, inputs=None, check=True):
    """Write `model` as ONNX and check it against Keras in onnxruntime.

    The ONNX graph has a dynamic batch dimension and the Keras input and
    output names. The check feeds a generated batch (and `inputs`, when
    given) to both the Keras model and onnxruntime; the export is kept
    only when every element agrees within `atol * max(1, rms) + tolerance *
    |keras|` (see `bnconvert.verify`). The file is written atomically: on
    any error no file is left at `path`, and an existing file there is
    replaced only on success.

    Args:
        model: A built `keras.Model`.
        path: Where to write the `.onnx` file; its directory must exist.
        opset: ONNX opset; None picks tf2onnx's default.
        tolerance: `rtol` of the per-element check (see above).
        atol: Its absolute term.
        inputs: Extra check inputs: an array, a list of arrays (one per
            model input), a dict input-name -> array, a `.npy` path, or a
            list of `.npy` paths (one per model input).
        check: Run the onnxruntime check; False only writes the file.

    Returns:
        An `OnnxExportResult`.

    Raises:
        OutputError: The directory of `path` does not exist or is not
            writable.
        ConversionError: The exporter cannot produce the graph (for
            example an unsupported opset).
        VerificationError: onnxruntime disagrees with Keras beyond
            `tolerance`, or `inputs` do not fit the model.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(
            "The output directory does not exist; create it or choose another "
            f"path. Received: path={path!r}"
        )
    opset = check_opset(opset)
    input_names, specs = _input_specs(model)
    output_names = _output_names(model)
    extra = _user_batches(model, input_names, inputs)

    batches = [verify.sample_inputs(model)[0]] + extra
    diffs = (None, None)
    proto, note = _convert(model, specs, input_names, output_names, opset)
    # Serialized and checked in memory: the file appears only once it is
    # known good, written in one go.
    data = proto.SerializeToString()
    if check:
        diffs = _compare(model, data, input_names, output_names, batches, tolerance, atol)
    try:
        with paths.atomic_file(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise OutputError(
            f"Cannot write the ONNX file ({e.strerror or e}). Received: path={path!r}"
        ) from None
    return OnnxExportResult(
        path=path,
        opset=_proto_opset(proto),
        input_names=tuple(input_names),
        output_names=tuple(output_names),
        checked=bool(check),
        max_abs_diff=diffs[0],
        max_rel_diff=diffs[1],
        tolerance=tolerance,
        atol=atol,
        batches=len(batches) if check else 0,
        exporter_note=note,
    )


def supported_opsets():
    """The opsets this exporter can write: `range` of tf2onnx's table."""
    from tf2onnx import constants

    known = sorted(constants.OPSET_TO_IR_VERSION)
    return range(known[0], known[-1] + 1)


def check_opset(opset):
    """Returns `opset` if the exporter can write it; raises `ConversionError` if not."""
    if opset is None:
        return None
    allowed = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in allowed:
        raise ConversionError(
            f"The ONNX exporter (tf2onnx) cannot write opset {opset}; use one from "
            f"{allowed.start} to {allowed.stop - 1}. Received: opset={opset!r}"
        )
    return opset


def _input_specs(model):
    if not model.inputs:
        raise ConversionError(
            f"Model '{model.name}' has no defined inputs; build it on a keras.Input "
            "before exporting."
        )
    names, specs = [], []
    for tensor in model.inputs:
        name = internals.producing_layer(tensor).name
        names.append(name)
        shape = (None,) + tuple(tensor.shape[1:])
        specs.append(tf.TensorSpec(shape, tf.as_dtype(tensor.dtype), name=name))
    return names, specs


def _output_names(model):
    names = []
    for tensor in model.outputs:
        name = internals.producing_layer(tensor).name
        base, i = name, 1
        while name in names:
            name = f"{base}_{i}"
            i += 1
        names.append(name)
    return names


def _convert(model, specs, input_names, output_names, opset):
    """The ONNX model proto, and a note on how tf2onnx got there.

    tf2onnx copies the whole graph before each optimizer pass so that it can
    roll back a pass that raises; for ResNet50 that is half of the export.
    The fast path turns those copies off; a graph on which it fails is
    exported again with tf2onnx's recovery on, which is what plain tf2onnx
    does.
    """
    structure = model.input

    def serve(*args):
        args = keras.tree.pack_sequence_as(structure, list(args))
        return tuple(keras.tree.flatten(model(args, training=False)))

    fn = tf.function(serve, input_signature=specs, autograph=False)
    with _quiet_tf2onnx():
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


@contextlib.contextmanager
def _quiet_tf2onnx():
    # tf2onnx logs progress, rewriter exceptions it recovers from (with
    # tracebacks) and TensorFlow deprecation notices; none concerns the
    # user, whose stderr carries bnconvert's own lines only.
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _proto_opset(proto):
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _user_batches(model, input_names, inputs):
    """Check inputs given by the user, as one list of arrays per batch."""
    if inputs is None:
        return []
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, dict):
        missing = [n for n in input_names if n not in inputs]
        if missing:
            raise VerificationError(
                f"Check inputs lack model input(s) {missing}. Received: "
                f"inputs keys={sorted(inputs)}"
            )
        arrays = [inputs[n] for n in input_names]
    elif isinstance(inputs, (list, tuple)):
        arrays = list(inputs)
    else:
        arrays = [inputs]
    arrays = [_load_array(a) for a in arrays]
    if len(arrays) != len(input_names):
        raise VerificationError(
            f"Model '{model.name}' has {len(input_names)} input(s) {input_names} but "
            f"{len(arrays)} check array(s) were given. Received: inputs={len(arrays)} array(s)"
        )
    for name, array, tensor in zip(input_names, arrays, model.inputs):
        want = tuple(tensor.shape[1:])
        got = array.shape[1:]
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            raise VerificationError(
                f"Check input for '{name}' has shape {array.shape}, the model expects "
                f"(batch,) + {want}. Received: shape={array.shape}"
            )
    return [[a.astype(t.dtype) for a, t in zip(arrays, model.inputs)]]


def _load_array(value):
    if isinstance(value, (str, os.PathLike)):
        try:
            return np.load(value, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VerificationError(
                f"Cannot read check input as a .npy array ({e}). Received: path={os.fspath(value)!r}"
            ) from None
    return np.asarray(value)


def _compare(model, onnx_model, input_names, output_names, batches, tolerance, atol):
    """Runs each batch in Keras and onnxruntime; returns the worst `(abs, rel)` figures."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            onnx_model, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(
            f"onnxruntime cannot load the exported graph of model '{model.name}': {first}"
        ) from e
    worst = (0.0, 0.0)
    for batch in batches:
        figures = verify.compare(
            verify.run(model, batch),
            session.run(output_names, dict(zip(input_names, batch))),
            tolerance=tolerance, relative=True, atol=atol,
            what=f"The ONNX model of '{model.name}' (onnxruntime)",
        )
        worst = (max(worst[0], figures[0]), max(worst[1], figures[1]))
    return worst
