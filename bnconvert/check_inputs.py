"""Check inputs given by the user: read safely, validated against the model, cast.

`convert_model(check_inputs=...)` and `export_onnx(inputs=...)` accept
arrays, dicts of them, or `.npy` paths. A path is opened without blocking
(a FIFO is refused, never waited on), its header is read first so that a
declared size over the check limit (`BNCONVERT_MAX_CHECK_MB`) is refused
before anything is allocated, and pickled objects are never loaded. Every
array must match its input's shape and kind, hold at least one row and,
for floats, only finite values: a check on an empty or NaN batch proves
nothing.
"""

import math
import os
import stat

import numpy as np

from bnconvert import check_batch
from bnconvert import keras_internals as internals
from bnconvert import verify
from bnconvert.errors import VerificationError


def input_names(model):
    """The names of `model`'s inputs (their input layers), or `input_0`, ... without any."""
    if internals.has_symbolic_inputs(model):
        return [internals.producing_layer(t).name for t in model.inputs]
    return [f"input_{i}" for i in range(len(check_batch.input_specs(model) or ()))]


def user_inputs(model, inputs, names=None):
    """Check inputs given by the user, validated and cast: a flat list of arrays.

    Args:
        model: The model they feed.
        inputs: An array, a list of arrays (one per model input), a dict
            input-name -> array, a `.npy` path or a list of them.
        names: The model's input names (default: `input_names(model)`).

    Raises:
        VerificationError: Unreadable, of the wrong kind, count, shape or
            dtype, empty, non-finite, or too large (`.npy` headers are
            read first).
    """
    specs = check_batch.input_specs(model)
    if specs is None:
        raise VerificationError(
            f"Model '{model.name}' has no defined inputs; check inputs cannot be "
            "matched to it. Build it on keras.Input first."
        )
    names = list(names or input_names(model))
    if isinstance(inputs, dict):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise VerificationError(
                f"Check inputs lack model input(s) {missing}. Received: "
                f"inputs keys={sorted(map(str, inputs))}"
            )
        arrays = [inputs[n] for n in names]
    elif isinstance(inputs, (list, tuple)):
        arrays = list(inputs)
    else:
        arrays = [inputs]
    if len(arrays) != len(names):
        raise VerificationError(
            f"Model '{model.name}' has {len(names)} input(s) {names} but "
            f"{len(arrays)} check array(s) were given. Received: inputs={len(arrays)} array(s)"
        )
    return [
        _checked_input(name, _load_array(value), shape, dtype)
        for name, value, (shape, dtype) in zip(names, arrays, specs)
    ]


def _checked_input(name, array, shape, dtype):
    where = f"Check input for '{name}'"
    if verify.is_string(dtype):
        if array.dtype.kind not in "USO":
            raise VerificationError(
                f"{where} must hold strings, the model input is a string. "
                f"Received: dtype={array.dtype}"
            )
    elif array.dtype.kind not in "biuf":
        raise VerificationError(
            f"{where} must be a numeric array (the model expects {dtype}). "
            f"Received: dtype={array.dtype}"
        )
    want = tuple(shape[1:])
    got = array.shape[1:]
    if not array.ndim or len(got) != len(want) or any(
        w is not None and w != g for w, g in zip(want, got)
    ):
        raise VerificationError(
            f"{where} has shape {array.shape}, the model expects (batch,) + {want}. "
            f"Received: shape={array.shape}"
        )
    if not array.shape[0]:
        raise VerificationError(
            f"{where} has no rows: nothing would be checked. Received: shape={array.shape}"
        )
    if verify.is_string(dtype):
        return array.astype(object)
    try:
        with np.errstate(all="ignore"):
            cast = array.astype(dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise VerificationError(f"{where} cannot be cast to {dtype}: {e}") from None
    # Checked on both sides of the cast: 1e300 is finite in float64 and Inf
    # in float32, and NaN would become an arbitrary integer.
    for values in (array, cast):
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise VerificationError(
                f"{where} holds {int(np.sum(~np.isfinite(values)))} NaN/Inf value(s) as "
                f"{values.dtype}; a check on non-finite inputs proves nothing. Give finite "
                f"values in the model's range. Received: dtype={array.dtype}"
            )
    return cast


def _load_array(value):
    """`value` as an array; a `.npy` path is read without pickles, header first."""
    if not isinstance(value, (str, os.PathLike)):
        array = np.asarray(value)
        if array.dtype.hasobject and not all(isinstance(v, (str, bytes)) for v in array.flat):
            raise VerificationError(
                "A check input is an object array; give a numeric (or string) array. "
                f"Received: dtype={array.dtype}"
            )
        return array
    path = os.fspath(value)
    try:
        # Non-blocking: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise VerificationError(
            f"Cannot read check input {path}: {e.strerror or e}. Received: path={path!r}"
        ) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise VerificationError(
                f"Check input {path} is not a regular file (a pipe or a device?); give "
                f"a .npy file. Received: path={path!r}"
            )
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = read_header(f)
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            raise VerificationError(
                f"Cannot read check input {path} as a .npy array ({e}). Received: path={path!r}"
            ) from None
        if dtype.hasobject:
            raise VerificationError(
                f"Check input {path} holds Python objects, which are never unpickled; "
                f"save a numeric array. Received: dtype={dtype}"
            )
        # A string element costs a Python object once cast (8 bytes of pointer
        # at least), even when the file declares zero-width strings ('<U0').
        per_element = max(dtype.itemsize, 1) + (8 if dtype.kind in "US" else 0)
        check_batch.check_size(math.prod(shape) * per_element, f"Check input {path}", [shape])
        f.seek(0)
        try:
            return np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VerificationError(
                f"Cannot read check input {path} as a .npy array ({e}). Received: path={path!r}"
            ) from None
