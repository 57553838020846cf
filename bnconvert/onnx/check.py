"""The onnxruntime check of an exported graph: the gate every ONNX file passes.

The serialized model runs in onnxruntime from memory on the generated check
batch (`bnconvert.check_batch.sample_inputs`) and on any batches the user gave
(`.npy` files or arrays); every output element must agree with Keras within
`atol * max(1, rms) + rtol * |keras|` (`bnconvert.verify.compare`).
"""

from bnconvert import check_batch
from bnconvert import check_inputs
from bnconvert import stability
from bnconvert import verify
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line
from bnconvert.errors import VerificationError


def user_batches(model, input_names, inputs):
    """Check inputs given by the user, as one list of arrays per batch (see `check_inputs`)."""
    if inputs is None:
        return []
    return [check_inputs.user_inputs(model, inputs, input_names)]


def check_arguments(tolerance, atol):
    """`(tolerance, atol)` as floats, both finite and >= 0 (`ConversionError` if not).

    `None` (the compute dtype's default, filled in later) stays `None`.
    """
    return (verify.check_tolerance("tolerance", tolerance, optional=True),
            verify.check_tolerance("atol", atol, optional=True))


def compare(model, onnx_model, input_names, output_names, batches, tolerance, atol,
            known=None, allow_nonfinite=False, exporter="native"):
    """Runs each batch in Keras and onnxruntime; returns the worst `(abs, rel)` figures.

    A `None` batch (none could be generated: string inputs) is left out; with
    no batch left the check refuses rather than pass having run nothing.
    onnxruntime failing to load or to run the graph is a `ConversionError`
    naming `exporter`, the one that wrote it.
    """
    import onnxruntime as ort

    if known is not None and batches and batches[0] is None:
        known = None
    batches = [b for b in batches if b is not None]
    if not batches:
        raise VerificationError(
            f"No check batch can be generated for model '{model.name}' (string inputs?), "
            "so the ONNX file cannot be checked; pass inputs= to export_onnx, or skip "
            "the check (check=False, --no-check)."
        )

    options = ort.SessionOptions()
    # Its failures reach the user in our one-line error; its own log lines
    # would print over the CLI's output.
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(
            onnx_model, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds
        raise ConversionError(
            f"onnxruntime cannot load the graph {exporter} wrote for model "
            f"'{model.name}': {first_line(e, 300)}"
        ) from e
    worst = (0.0, 0.0)

    def run(arrays):
        try:
            return session.run(output_names, dict(zip(input_names, arrays)))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds
            raise ConversionError(
                f"onnxruntime fails running the graph {exporter} wrote for model "
                f"'{model.name}': {first_line(e, 300)}"
            ) from e

    for i, batch in enumerate(batches):
        expected = known if i == 0 and known is not None else check_batch.reference(model, batch)
        _, figures = stability.compare_run(
            run, batch, expected,
            tolerance=tolerance, relative=True, atol=atol,
            what=f"The ONNX model of '{model.name}' (onnxruntime)",
            allow_nonfinite=allow_nonfinite, advice=stability.ONNX_ADVICE,
        )
        worst = (max(worst[0], figures[0]), max(worst[1], figures[1]))
    return worst
