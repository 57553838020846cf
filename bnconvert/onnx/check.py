"""The onnxruntime check of an exported graph: the gate every ONNX file passes.

The serialized model runs in onnxruntime from memory on the generated check
batch (`bnconvert.verify.sample_inputs`) and on any batches the user gave
(`.npy` files or arrays); every output element must agree with Keras within
`atol * max(1, rms) + rtol * |keras|` (`bnconvert.verify.compare`).
"""

import os

import numpy as np

from bnconvert import verify
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line
from bnconvert.errors import VerificationError


def user_batches(model, input_names, inputs):
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


def compare(model, onnx_model, input_names, output_names, batches, tolerance, atol,
             known=None, exporter="native"):
    """Runs each batch in Keras and onnxruntime; returns the worst `(abs, rel)` figures.

    onnxruntime failing to load or to run the graph is a `ConversionError`
    naming `exporter`, the one that wrote it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
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
    for i, batch in enumerate(batches):
        try:
            got = session.run(output_names, dict(zip(input_names, batch)))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds
            raise ConversionError(
                f"onnxruntime fails running the graph {exporter} wrote for model "
                f"'{model.name}': {first_line(e, 300)}"
            ) from e
        figures = verify.compare(
            known if i == 0 and known is not None else verify.run(model, batch),
            got,
            tolerance=tolerance, relative=True, atol=atol,
            what=f"The ONNX model of '{model.name}' (onnxruntime)",
        )
        worst = (max(worst[0], figures[0]), max(worst[1], figures[1]))
    return worst
