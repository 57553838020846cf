"""The generated check batch, its size limit, and the original model's outputs on it.

Every check bnconvert makes feeds the same generated batch: the conversion
check (original model against converted model, in Keras) and the ONNX check
(Keras against onnxruntime). Float inputs are standard normal, integer
inputs 0 or 1, booleans random, from one seed; an unknown batch size becomes
2 (so that a batch dimension frozen to 1 by mistake shows up) and other
unknown sizes 32 (enough for the 32x downsampling of image backbones), or 8
for a model that refuses 32 (`generated_check`). `reference` runs the
original model on a batch (`run`, every forward pass of a check) and turns
its failure into a `VerificationError`.

The check arrays, generated or read from `.npy` files
(`bnconvert.check_inputs`), are bounded in size before they are allocated
(`BNCONVERT_MAX_CHECK_MB`). How outputs are compared is
`bnconvert.verify`'s.
"""

import math
import os
import re

import numpy as np

from bnconvert import forward
from bnconvert import keras_internals as internals
from bnconvert import verify
from bnconvert.errors import BnconvertError
from bnconvert.errors import VerificationError
from bnconvert.errors import first_line

SAMPLE_BATCH = forward.SAMPLE_BATCH
UNKNOWN_DIM = forward.UNKNOWN_DIM
# Unknown sizes of the second generated batch, for a model refusing the first.
SHORT_DIM = 8
# Every forward pass of a check (`bnconvert.forward`).
run = forward.run
SEED = 1234

# The check arrays (generated or read from .npy) may take this much memory
# unless BNCONVERT_MAX_CHECK_MB says otherwise: a 224x224 RGB batch of two
# takes 1.2 MB, a 4096x4096 one 400 MB; a declared 60000x60000 input 27 GB.
MAX_CHECK_MB_VARIABLE = "BNCONVERT_MAX_CHECK_MB"
DEFAULT_MAX_CHECK_MB = 1024


def input_specs(model):
    """`[(shape, numpy dtype)]` of `model`'s inputs in `model.inputs` order, or `None`.

    Models built on symbolic inputs give their inputs; a subclassed Keras 3
    model built from an input shape gives its build config's shape.
    """
    if internals.has_symbolic_inputs(model):
        return [(tuple(t.shape), verify.numpy_dtype(t.dtype)) for t in model.inputs]
    build = model.get_build_config() if getattr(model, "built", False) else None
    shape = (build or {}).get("input_shape")
    if isinstance(shape, (list, tuple)) and all(d is None or isinstance(d, int) for d in shape):
        return [(tuple(shape), np.dtype("float32"))]
    return None


def sample_inputs(model, batch=SAMPLE_BATCH, unknown=UNKNOWN_DIM):
    """One seeded batch for `model`, as a flat list in `model.inputs` order.

    Args:
        model: A built model of either flavour.
        batch: Size given to an unknown batch dimension.
        unknown: Size given to other unknown dimensions.

    Returns:
        `(arrays, note)`: the arrays, or `None` and the reason when no batch
        can be made (no defined inputs, or string inputs).

    Raises:
        VerificationError: The batch would be larger than the check limit
            (`BNCONVERT_MAX_CHECK_MB`).
    """
    specs = input_specs(model)
    if specs is None:
        return None, (
            f"model '{model.name}' has no defined inputs (not built from an input "
            "shape); nothing to compare"
        )
    shapes = [
        tuple((batch if i == 0 else unknown) if d is None else int(d)
              for i, d in enumerate(shape))
        for shape, _ in specs
    ]
    for i, (_, dtype) in enumerate(specs):
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            kind = "string" if verify.is_string(dtype) else str(dtype)
            return None, (
                f"no check batch can be generated for input {i} of dtype {kind}; pass "
                "your own (--check-input FILE.npy, check_inputs= of convert_model, inputs= of "
                "export_onnx)"
            )
    # standard_normal draws float64 before the cast: 8 bytes an element.
    check_size(sum(math.prod(s) * 8 for s in shapes), f"The check batch of model '{model.name}'",
               shapes)
    rng = np.random.default_rng(SEED)
    arrays = []
    for dims, (_, dtype) in zip(shapes, specs):
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(dims).astype(dtype))
        elif dtype == np.bool_:
            arrays.append(rng.integers(0, 2, size=dims).astype(bool))
        else:
            arrays.append(rng.integers(0, 2, size=dims).astype(dtype))
    return arrays, "one generated batch, training=False"


def generated_check(model):
    """A generated check batch and the original `model`'s outputs on it.

    Unknown sizes other than the batch's are `UNKNOWN_DIM`. A model that
    fails on that batch is tried once more with them at `SHORT_DIM` (a text
    model whose position table is shorter than 32 accepts 8).

    Returns:
        `(arrays, note, outputs)`; `(None, reason, None)` when no batch can
        be made (see `sample_inputs`).

    Raises:
        VerificationError: The model fails on both batches (the first
            failure is the one named).
    """
    arrays, note = sample_inputs(model)
    if arrays is None:
        return None, note, None
    try:
        return arrays, note, reference(model, arrays)
    except VerificationError as first:
        specs = input_specs(model)
        if not any(d is None for shape, _ in specs for d in shape[1:]):
            raise
        short, _ = sample_inputs(model, unknown=SHORT_DIM)
        try:
            outputs = reference(model, short)
        except VerificationError:
            raise first from None
    note = f"{note}, unknown sizes {SHORT_DIM} (the model fails on {UNKNOWN_DIM})"
    return short, note, outputs


def reference(model, batch):
    """The original `model`'s outputs on a check batch (`run`), refusing one it cannot run on.

    A generated batch gives unknown sizes `UNKNOWN_DIM`; a model may not
    accept them (a text model's position embedding shorter than that).

    Raises:
        VerificationError: The model raises on `batch`; the check cannot run.
    """
    try:
        return run(model, batch)
    except BnconvertError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model raises anything
        shapes = ", ".join(str(tuple(np.shape(a))) for a in batch)
        raise VerificationError(
            f"Model '{model.name}' fails on the check batch of input shapes {shapes}, so "
            f"nothing can be checked: {type(e).__name__}: {_reason(e)}; pass inputs it "
            "accepts (--check-input FILE.npy, check_inputs= of convert_model, inputs= of "
            "export_onnx)."
        ) from e


def _reason(error):
    """The line of a Keras error that says what went wrong (its first only says where)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in str(error).splitlines()]
    lines = [l for l in lines if l]
    if len(lines) > 1 and lines[0].startswith("Exception encountered"):
        return first_line(lines[1])
    return first_line(error)


def max_check_bytes():
    """The size limit of check arrays, from `BNCONVERT_MAX_CHECK_MB` (default 1024)."""
    text = os.environ.get(MAX_CHECK_MB_VARIABLE)
    if text is None:
        return DEFAULT_MAX_CHECK_MB << 20
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = 0
    if megabytes < 1:
        # Fail closed: a limit that cannot be read is not switched off.
        raise VerificationError(
            f"{MAX_CHECK_MB_VARIABLE} must be a whole number of megabytes >= 1. "
            f"Received: {MAX_CHECK_MB_VARIABLE}={text!r}"
        )
    return megabytes << 20


def check_size(nbytes, what, shapes):
    """Refuses check arrays of `nbytes` over `max_check_bytes()`, before allocating them."""
    limit = max_check_bytes()
    if nbytes > limit:
        raise VerificationError(
            f"{what} would take {nbytes / 2**30:.1f} GiB (shapes {list(shapes)}), over "
            f"the {limit >> 20} MB limit; pass a smaller check input, or raise "
            f"{MAX_CHECK_MB_VARIABLE} if you have the memory."
        )
