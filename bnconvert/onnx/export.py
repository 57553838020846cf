"""Export a Keras model to ONNX and check it in onnxruntime.

Two exporters write the graph:

- **native** (`bnconvert.onnx.walk`): Keras layers and ops straight to
  ONNX nodes, in about a second for ResNet50;
- **tf2onnx** (`bnconvert.onnx.tf2onnx`): trace, freeze and convert the
  TensorFlow graph; slower, but it covers whatever TensorFlow can run.

`auto` (the default) takes the native exporter and falls back to tf2onnx
when the model holds a layer the native one does not cover, or when its
graph does not pass the check; the result says which path was taken and
why. Whichever writes it, the serialized model is run in onnxruntime
against the Keras model from memory (the gate), and written (to a
temporary name, renamed into place) only when the outputs agree. Inputs
carry the Keras input layer names and outputs the names of the Keras
layers that produce them, in the Keras order, with a dynamic batch
dimension.
"""

import contextlib
import dataclasses
import io
import logging
import os
import threading
import time


from bnconvert import keras_internals as internals
from bnconvert.onnx import check as ort_check
from bnconvert import paths
from bnconvert import verify
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line
from bnconvert.errors import OutputError
from bnconvert.errors import VerificationError

AUTO, NATIVE, TF2ONNX = "auto", "native", "tf2onnx"
EXPORTERS = (AUTO, NATIVE, TF2ONNX)
NATIVE_OPSETS = range(13, 22)


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
        batches: Number of input batches the check ran on.
        atol: Its absolute term.
        exporter: The exporter that wrote the file: `"native"` or `"tf2onnx"`.
        exporter_note: Why that one, and how it ran (for tf2onnx: its fast
            path, or a retry with its error recovery on, and what that cost).
        seconds: Time spent writing the graph (not checking it).
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
    exporter: str = NATIVE
    exporter_note: str = ""
    seconds: float = 0.0

    def to_dict(self):
        """The result as a JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["input_names"] = list(self.input_names)
        out["output_names"] = list(self.output_names)
        return out


def export_onnx(model, path, *, opset=None, tolerance=verify.RELATIVE_TOLERANCE,
                atol=verify.ATOL, inputs=None, check=True, exporter=AUTO, reference=None,
                allow_nonfinite=False):
    """Write `model` as ONNX and check it against Keras in onnxruntime.

    The ONNX graph has a dynamic batch dimension and the Keras input and
    output names. The check feeds a generated batch (and `inputs`, when
    given) to both the Keras model and onnxruntime; the export is kept
    only when every element agrees within `atol * max(1, rms) + tolerance *
    |keras|` (see `bnconvert.verify`). The file is written atomically: on
    any error no file is left at `path`, and an existing file there is
    replaced only on success.

    Args:
        model: A built `keras.Model` (Keras 3 or tf-keras).
        path: Where to write the `.onnx` file; its directory must exist.
        opset: ONNX opset; None picks the exporter's default (native: 17).
        tolerance: `rtol` of the per-element check (see above).
        atol: Its absolute term.
        inputs: Extra check inputs: an array, a list of arrays (one per
            model input), a dict input-name -> array, a `.npy` path, or a
            list of `.npy` paths (one per model input).
        check: Run the onnxruntime check; False only writes the file.
        exporter: `"auto"` (native, else tf2onnx), `"native"` or `"tf2onnx"`.
        reference: Optional `(arrays, outputs)`: `model`'s outputs on the
            generated check batch (`verify.sample_inputs`), when the caller
            has already computed them; saves running the model again.
        allow_nonfinite: Accept NaN/Inf Keras outputs that onnxruntime
            reproduces (with a warning) instead of failing the check.

    Returns:
        An `OnnxExportResult`.

    Raises:
        OutputError: The directory of `path` does not exist or is not
            writable.
        ConversionError: The exporter cannot produce the graph (for
            example an unsupported opset, or with `exporter="native"` a
            layer it does not cover, named).
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
    opset = check_opset(opset, exporter)
    tolerance, atol = ort_check.check_arguments(tolerance, atol)
    model = _graph_view(model)
    input_names = _input_names(model)
    output_names = _output_names(model)
    extra = ort_check.user_batches(model, input_names, inputs)
    if reference is not None:
        sample, known = reference
    else:
        sample, known = verify.sample_inputs(model)[0], None
    batches = [sample] + extra

    def checked(data):
        """Checks `data` while writing it aside; it becomes `path` only if it passes."""
        try:
            with paths.atomic_file(path) as tmp:
                # The 100 MB write of a ResNet50 overlaps onnxruntime's check
                # (file I/O releases the GIL); a failed check removes it.
                writer = _Writer(tmp, data)
                try:
                    if not check:
                        return (None, None)
                    return ort_check.compare(model, data, input_names, output_names,
                                              batches, tolerance, atol, known, allow_nonfinite)
                finally:
                    writer.finish()
        except OSError as e:
            raise OutputError(
                f"Cannot write the ONNX file ({e.strerror or e}). Received: path={path!r}"
            ) from None

    written = None
    why = ""
    if exporter == NATIVE or (exporter == AUTO and opset in (None, *NATIVE_OPSETS)):
        try:
            written = _native(model, input_names, output_names, opset, checked)
        except _NativeFailed as e:
            if exporter == NATIVE:
                raise e.error from None
            why = f"the native exporter {e.reason}"
    elif exporter == AUTO:
        why = f"opset {opset} is outside the native exporter's range"
    if written is None:
        written = _with_tf2onnx(model, input_names, output_names, opset, checked, why)
    data, diffs, name, note, seconds, proto_opset = written
    return OnnxExportResult(
        path=path,
        opset=proto_opset,
        input_names=tuple(input_names),
        output_names=tuple(output_names),
        checked=bool(check),
        max_abs_diff=diffs[0],
        max_rel_diff=diffs[1],
        tolerance=tolerance,
        atol=atol,
        batches=len(batches) if check else 0,
        exporter=name,
        exporter_note=note,
        seconds=seconds,
    )


class _Writer:
    """Writes bytes to a file in a thread; `finish` waits and re-raises its error."""

    def __init__(self, path, data):
        self.error = None
        self.thread = threading.Thread(target=self._write, args=(path, data), daemon=True)
        self.thread.start()

    def _write(self, path, data):
        try:
            path.write_bytes(data)
        except OSError as e:
            self.error = e

    def finish(self):
        self.thread.join()
        if self.error is not None:
            raise self.error


class _NativeFailed(Exception):
    def __init__(self, reason, error):
        super().__init__(reason)
        self.reason = reason
        self.error = error


def _native(model, input_names, output_names, opset, checked):
    """The native export, serialized and checked: `_Written` fields."""
    from bnconvert import flavour as flavour_lib
    from bnconvert.onnx import walk
    from bnconvert.onnx.graph import Uncovered
    from bnconvert.onnx.graph import describe

    start = time.perf_counter()
    try:
        with quiet_tensorflow():
            proto = walk.emit(
                model, flavour_lib.flavour_of(model), input_names, output_names, opset
            )
    except Uncovered as e:
        raise _NativeFailed(f"does not cover {describe(e.layers)}", ConversionError(
            f"The native ONNX exporter does not cover these layers of model "
            f"'{model.name}': {describe(e.layers)}; use the tf2onnx (or auto) exporter."
        )) from None
    data = proto.SerializeToString()
    seconds = time.perf_counter() - start
    try:
        diffs = checked(data)
    except (ConversionError, VerificationError) as e:
        raise _NativeFailed(f"wrote a graph that failed the check ({first_line(e, 160)})", e) from None
    return data, diffs, NATIVE, "", seconds, _proto_opset(proto)


def _with_tf2onnx(model, input_names, output_names, opset, checked, why):
    from bnconvert.onnx import tf2onnx

    start = time.perf_counter()
    with quiet_tensorflow():
        proto, how = tf2onnx.convert(model, input_names, output_names, opset)
    data = proto.SerializeToString()
    seconds = time.perf_counter() - start
    diffs = checked(data)
    note = f"{why}; {how}" if why else how
    return data, diffs, TF2ONNX, note, seconds, _proto_opset(proto)


@contextlib.contextmanager
def quiet_tensorflow():
    """Keeps exporter chatter (tf2onnx progress, TensorFlow retracing notices) off stderr.

    The user's stderr carries bnconvert's own lines only.
    """
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


def supported_opsets(exporter=AUTO):
    """The opsets `exporter` can write, as a `range`.

    `auto` accepts what either exporter writes: an opset outside the
    native exporter's range goes to tf2onnx.
    """
    from bnconvert.onnx import tf2onnx

    if exporter == NATIVE:
        return NATIVE_OPSETS
    tf2onnx_range = tf2onnx.supported_opsets()
    if exporter == TF2ONNX:
        return tf2onnx_range
    low = min(tf2onnx_range.start, NATIVE_OPSETS.start)
    return range(low, max(tf2onnx_range.stop, NATIVE_OPSETS.stop))


def check_exporter(exporter):
    """Returns `exporter` if it names an exporter; raises `ConversionError` if not."""
    if exporter not in EXPORTERS:
        raise ConversionError(
            f"Unknown ONNX exporter; use one of {', '.join(EXPORTERS)}. "
            f"Received: exporter={exporter!r}"
        )
    return exporter


def check_opset(opset, exporter=AUTO):
    """Returns `opset` if `exporter` can write it; raises `ConversionError` if not."""
    check_exporter(exporter)
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ConversionError(
            f"Argument `opset` must be a whole number (an int) or None. Received: opset={opset!r}"
        )
    allowed = supported_opsets(exporter)
    if opset not in allowed:
        who = {AUTO: "The ONNX exporters", NATIVE: "The native ONNX exporter",
               TF2ONNX: "The ONNX exporter tf2onnx"}[exporter]
        raise ConversionError(
            f"{who} cannot write opset {opset}; use one from "
            f"{allowed.start} to {allowed.stop - 1}. Received: opset={opset!r}"
        )
    return opset


def _graph_view(model):
    """`model`, or for a subclassed model built from a shape, a Functional model calling it.

    Both exporters need symbolic inputs and outputs; a subclassed model built
    with `build(shape)` has neither. Its ONNX input is named `input` (or
    `input_0`, ...) and its output after the model.
    """
    if internals.has_symbolic_inputs(model):
        return model
    specs = verify.input_specs(model)
    if specs is None:
        raise ConversionError(
            f"Model '{model.name}' has no defined inputs; build it on a keras.Input "
            "(or call build() with an input shape) before exporting."
        )
    from bnconvert import flavour as flavour_lib

    keras = flavour_lib.flavour_of(model).keras
    inputs = [
        keras.Input(batch_shape=shape, dtype=dtype.name,
                    name="input" if len(specs) == 1 else f"input_{i}")
        for i, (shape, dtype) in enumerate(specs)
    ]
    outputs = model(inputs[0] if len(inputs) == 1 else inputs)
    return keras.Model(inputs, outputs, name=model.name)


def _input_names(model):
    return [internals.producing_layer(t).name for t in model.inputs]


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


def _proto_opset(proto):
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None
