"""Export a Keras model to ONNX and check it in onnxruntime.

Two exporters write the graph:

- **native** (`bnconvert.onnx.walk`): Keras layers and ops straight to
  ONNX nodes, in about a second for ResNet50;
- **tf2onnx** (`bnconvert.onnx.tf2onnx`): trace, freeze and convert the
  TensorFlow graph; slower, but it covers whatever TensorFlow can run.

`auto` (the default) takes the native exporter and falls back to tf2onnx
on any failure of it: a layer it does not cover, an error while writing,
an invalid graph, onnxruntime refusing to load or run it, or the check;
the result says which path was taken and why, and when tf2onnx fails too
the error gives both reasons in one line. Whichever writes it, the serialized model is run in onnxruntime
against the Keras model from memory (the gate), and written (to a
temporary name, renamed into place) only when the outputs agree. Inputs
carry the Keras input layer names and outputs the names of the Keras
layers that produce them, in the Keras order, with a dynamic batch
dimension.
"""

import dataclasses
import os

from bnconvert import check_batch
from bnconvert import keras_internals as internals
from bnconvert import paths
from bnconvert import verify
from bnconvert.errors import ConversionError
from bnconvert.errors import OutputError
from bnconvert.onnx import attempts
from bnconvert.onnx import check as ort_check
from bnconvert.onnx.attempts import FLOAT16  # noqa: F401 - re-exported for callers
from bnconvert.onnx.attempts import FLOAT32
from bnconvert.onnx.attempts import NATIVE
from bnconvert.onnx.attempts import TF2ONNX

AUTO = "auto"
EXPORTERS = (AUTO, NATIVE, TF2ONNX)
PRECISIONS = (FLOAT32, FLOAT16)
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
        precision: The float type the graph computes in: `"float32"` or
            `"float16"` (tf2onnx writes a mixed-precision model as traced:
            `"as traced"`).
        compute_dtype: The least precise dtype the Keras model computes in;
            with `precision`, it sets the check's default tolerance.
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
    precision: str = "float32"
    compute_dtype: str = "float32"

    @property
    def compared(self):
        """How the check compared, in words (for the report)."""
        graph = "traced" if self.precision == "as traced" else self.precision
        return f"Keras in {self.compute_dtype} against a {graph} graph"

    def to_dict(self):
        """The result as a JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["input_names"] = list(self.input_names)
        out["output_names"] = list(self.output_names)
        out["compared"] = self.compared
        return out


def export_onnx(model, path, *, opset=None, tolerance=None, atol=None, inputs=None,
                check=True, exporter=AUTO, reference=None, precision=FLOAT32,
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
        tolerance: `rtol` of the per-element check (see above); None
            takes it from the compute dtype (`verify.relative_tolerance`):
            1e-4 for float32, 8 epsilons of float16 or bfloat16 for a
            mixed-precision model or a float16 graph.
        atol: Its absolute term; None likewise (float32: 1e-5).
        inputs: Extra check inputs: an array, a list of arrays (one per
            model input), a dict input-name -> array, a `.npy` path, or a
            list of `.npy` paths (one per model input).
        check: Run the onnxruntime check; False only writes the file.
        exporter: `"auto"` (native, else tf2onnx), `"native"` or `"tf2onnx"`.
        reference: Optional `(arrays, outputs)`: `model`'s outputs on the
            generated check batch (`check_batch.sample_inputs`), when the caller
            has already computed them; saves running the model again.
        precision: `"float32"` (also for a mixed-precision model, whose
            variables are float32) or `"float16"`: the float type the graph
            computes in. Float inputs and outputs stay float32 unless the
            Keras model's own are float16. float16 is written by the native
            exporter only.
        allow_nonfinite: Accept NaN/Inf Keras outputs that onnxruntime
            reproduces (with a warning) instead of failing the check.

    Returns:
        An `OnnxExportResult`.

    Raises:
        OutputError: The directory of `path` does not exist or is not
            writable.
        ConversionError: The exporter cannot produce the graph (for
            example an unsupported opset, or with `exporter="native"` a
            layer it does not cover, named), or onnxruntime cannot load or
            run it. With `auto`, the message gives both exporters' reasons.
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
    check_precision(precision, exporter)
    model = _graph_view(model)
    input_names = _input_names(model)
    output_names = _output_names(model, input_names)
    _refuse_strings(model, input_names)
    compute = verify.compute_dtype(model)
    rtol, default_atol = verify.relative_tolerance(verify.lowest_precision(compute, precision))
    tolerance = rtol if tolerance is None else tolerance
    atol = default_atol if atol is None else atol
    extra = ort_check.user_batches(model, input_names, inputs)
    if reference is not None:
        sample, known = reference
    elif check:
        sample, _, known = check_batch.generated_check(model)
    else:
        sample = known = None
    batches = [sample] + extra

    def checked(data, name):
        """Checks `data` while writing it aside; it becomes `path` only if it passes."""
        try:
            with paths.atomic_file(path) as tmp:
                # The 100 MB write of a ResNet50 overlaps onnxruntime's check
                # (file I/O releases the GIL); a failed check removes it.
                writer = attempts.Writer(tmp, data)
                try:
                    if not check:
                        return (None, None)
                    return ort_check.compare(model, data, input_names, output_names,
                                              batches, tolerance, atol, known,
                                              allow_nonfinite, exporter=name)
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
            written = attempts.native(model, input_names, output_names, opset, checked,
                                      precision, validate=not check)
        except attempts.NativeFailed as e:
            if exporter == NATIVE:
                raise e.error from None
            why = f"the native exporter {e.reason}"
    elif exporter == AUTO:
        why = f"opset {opset} is outside the native exporter's range"
    if written is None:
        written = attempts.with_tf2onnx(model, input_names, output_names, opset, checked, why,
                                precision)
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
        precision=precision if name == NATIVE or compute == FLOAT32 else "as traced",
        compute_dtype=compute,
    )


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


def check_precision(precision, exporter=AUTO):
    """Returns `precision` if `exporter` can write it; raises `ConversionError` if not."""
    if precision not in PRECISIONS or (precision != FLOAT32 and exporter == TF2ONNX):
        raise ConversionError(
            f"Unknown ONNX precision; use one of {', '.join(PRECISIONS)} (float16 with "
            f"the native or auto exporter). Received: precision={precision!r}, "
            f"exporter={exporter!r}"
        )
    return precision


def _refuse_strings(model, input_names):
    for tensor, name in zip(model.inputs, input_names):
        if "string" in str(getattr(tensor.dtype, "name", tensor.dtype)):
            raise ConversionError(
                f"Input '{name}' of model '{model.name}' holds strings, which the ONNX "
                "export does not cover; export the model from its first numeric layer."
            )


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
    specs = check_batch.input_specs(model)
    if specs is None:
        raise ConversionError(
            f"Model '{model.name}' has no defined inputs; build it on a keras.Input "
            "(or call build() with an input shape) before exporting."
        )
    from bnconvert import flavour as flavour_lib

    keras = flavour_lib.flavour_of(model).keras

    def view(batch_shapes):
        inputs = [keras.Input(batch_shape=shape, dtype=dtype.name,
                              name="input" if len(specs) == 1 else f"input_{i}")
                  for i, ((_, dtype), shape) in enumerate(zip(specs, batch_shapes))]
        outputs = model(inputs[0] if len(inputs) == 1 else inputs)
        return keras.Model(inputs, outputs, name=model.name)

    # A model built by a call on data records that batch's size; it takes any.
    try:
        return view([(None,) + tuple(shape[1:]) if shape else shape for shape, _ in specs])
    except Exception:  # noqa: BLE001 - its code needs the recorded batch size
        return view([shape for shape, _ in specs])


def _input_names(model):
    return [internals.producing_layer(t).name for t in model.inputs]


def _output_names(model, input_names=()):
    """Keras output layer names, made distinct from each other and from the inputs'.

    A model whose output is one of its inputs names the output `<input>_1`.
    """
    names = []
    for tensor in model.outputs:
        name = internals.producing_layer(tensor).name
        base, i = name, 1
        while name in names or name in input_names:
            name = f"{base}_{i}"
            i += 1
        names.append(name)
    return names
