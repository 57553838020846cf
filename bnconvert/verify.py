"""The one output comparison of every check bnconvert makes, and its tolerances.

`compare` holds the checked side's outputs (a converted model, an ONNX graph
in onnxruntime) to the reference outputs on the same check batch
(`bnconvert.check_batch`); this module also holds the default tolerances,
their check (`check_tolerance`), and the dtype helpers the checks share
(`numpy_dtype`, the compute dtype of a model and its rounding).

A swap (BN -> SyncBN and back) must reproduce the outputs exactly, so it is
held to an absolute tolerance (default 1e-6). Folding a BN into the layer
before it, and running a graph in another runtime, change the order of
floating-point operations; those are held element by element to

    |actual - reference| <= atol * max(1, rms(reference)) + rtol * |reference|

per output, `atol` = 1e-5 and `rtol` = 1e-4 by default. A bound relative to
the largest output rejected correct classifiers (a softmax whose largest
probability is 0.006); `atol` covers elements near zero, scaled by the
output's RMS so that large logits get a proportionate floor.
`benchmarks/tolerances.py` measured, on keras.applications models with
random weights and randomized BN statistics (96x96): correct folds differ by
at most 3.4e-8 (ResNet50), their ONNX exports by up to 6.5e-6 (ResNet50V2,
whose softmax peaks at 0.014: 4.7e-4 of its largest output; it needs atol
5.1e-6 at rtol 1e-4); one BN's gamma 1% off in the fold differs by 1.6e-5
(ResNet50V2, needs atol 1.5e-5) and 1.7e-4 (ResNet50): accepted and
rejected respectively by these defaults. A fold that leaves out epsilon
changes these outputs by less than float32 noise; no output check can see it.

A reference output holding NaN or Inf fails every check (the model itself
computes non-finite numbers: a negative moving variance, an overflow), and
so does a checked output that is non-finite where the reference is not:
`nan > tol` is false, so differences are never compared with NaN in them.
`allow_nonfinite=True` accepts non-finite reference elements that the
checked side reproduces exactly, with a warning.

A model computing in a lower precision (a `mixed_float16` or
`mixed_bfloat16` policy), or an ONNX graph written in float16, differs from
any rewriting of itself by that dtype's rounding: its check takes `atol` and
`rtol` = `LOW_PRECISION_EPS` machine epsilons of the lowest compute dtype
(float16: 7.8e-3, bfloat16: 6.3e-2). Measured on ResNet50 (64x64, random
weights, randomized BN statistics, logits of RMS 1): the fold differs by
1.9e-3 (2.0 float16 epsilons) in mixed_float16 and 1.6e-2 (2.0 bfloat16
epsilons) in mixed_bfloat16; the float32 ONNX graph from the float16 Keras
outputs by 1.7e-3. Such a check cannot see a fold error below the dtype's
own rounding.
"""

import math
import numbers
import warnings

import numpy as np

from bnconvert.errors import ConversionError
from bnconvert.errors import VerificationError

ABSOLUTE_TOLERANCE = 1e-6
RELATIVE_TOLERANCE = 1e-4
ATOL = 1e-5

# Machine epsilon of the compute dtypes below float32, and the multiple of it
# the checks of such models allow (see the module docstring).
EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
LOW_PRECISION_EPS = 8

_ALLOW = "pass --allow-nonfinite (allow_nonfinite=True in Python)"


def numpy_dtype(dtype):
    """The NumPy dtype of a Keras 3, tf-keras or TensorFlow `dtype` (string: `object`)."""
    # Keras 3 names its string dtype "string", which NumPy does not know.
    if str(getattr(dtype, "name", dtype)) == "string":
        return np.dtype(object)
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def is_string(dtype):
    return dtype == np.dtype(object)


def check_tolerance(name, value, *, optional=False):
    """Returns `value` as a float if it is finite and >= 0; raises `ConversionError` if not.

    An infinite or NaN tolerance would switch the check off silently.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value >= 0
    ):
        raise ConversionError(
            f"Argument `{name}` must be a finite number >= 0 (inf or NaN would turn "
            f"the check off). Received: {name}={value!r}"
        )
    return float(value)


def compare(expected, actual, *, tolerance, relative, what="The converted model", atol=ATOL,
            allow_nonfinite=False):
    """Holds `actual` outputs to `expected` ones (see the module docstring).

    Args:
        expected: Flat list of reference outputs.
        actual: Flat list of outputs to check.
        tolerance: With `relative=False`, the largest accepted absolute
            difference; with `relative=True`, `rtol`.
        relative: Whether to use the per-element relative check.
        what: Names the checked side in messages.
        atol: The absolute term of the relative check.
        allow_nonfinite: Accept NaN/Inf reference elements that `actual`
            reproduces exactly (with a `RuntimeWarning`) instead of failing.

    Returns:
        `(max_abs_diff, max_rel_diff)`: the largest absolute difference, and
        the largest one of an output divided by that output's largest
        reference magnitude (for the report), over finite elements.

    Raises:
        VerificationError: Different output count or shapes, a non-finite
            reference (unless allowed), a non-finite output where the
            reference differs, or a difference beyond the tolerance (then a
            `BeyondTolerance`, carrying the worst figures).
    """
    if len(expected) != len(actual):
        raise VerificationError(
            f"{what} has {len(actual)} outputs, the reference {len(expected)}."
        )
    checked = what[0].lower() + what[1:]
    worst_abs, worst_rel, failed = 0.0, 0.0, None
    for i, (a, b) in enumerate(zip(expected, actual)):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise VerificationError(
                f"An output of {checked} has shape {b.shape}, the reference's {a.shape}."
            )
        if not a.size:
            continue
        output = f"output {i} (of {len(expected)})"
        finite = np.isfinite(a)
        if not finite.all():
            counts = _nonfinite_counts(a, finite)
            if not allow_nonfinite:
                raise VerificationError(
                    f"The reference {output} that {checked} is compared with holds "
                    f"{counts}: the model itself computes non-finite values (a negative "
                    "moving variance? an overflow?), so the check proves nothing; nothing "
                    f"was written. Fix the model, or {_ALLOW} to accept it."
                )
            warnings.warn(
                f"bnconvert: the reference {output} holds {counts}; accepted because "
                "allow_nonfinite=True, where the checked side reproduces them.",
                RuntimeWarning, stacklevel=2,
            )
        # Equal values (equal infinities included) and NaN facing NaN agree.
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        wild = ~same & ~(finite & np.isfinite(b))
        if wild.any():
            raise VerificationError(
                f"{what} gives {int(wild.sum())} NaN/Inf value(s) in {output} where the "
                f"reference has other values ({_nonfinite_counts(b, np.isfinite(b))} in "
                "that output); nothing was written. Check the rules and the model."
            )
        with np.errstate(invalid="ignore"):  # inf - inf where both agree
            diff = np.where(same, 0.0, np.abs(a - b))
        scale = float(np.max(np.abs(a[finite]), initial=0.0))
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float(diff.max()) / scale if scale > 0 else float(diff.max()))
        if relative:
            rms = float(np.sqrt(np.mean(np.square(a[finite])))) if finite.any() else 0.0
            allowed = atol * max(1.0, rms) + tolerance * np.abs(np.where(finite, a, 0.0))
        else:
            allowed = tolerance
        if failed is None and not np.all(diff <= allowed):
            failed = float(diff.max())
    if failed is not None:
        rule = (
            f"{atol:g} * max(1, rms) + {tolerance:g} * |reference| per element"
            if relative else f"{tolerance:g} absolute"
        )
        raise BeyondTolerance(
            f"{what}'s outputs differ from the reference's by up to {worst_abs:.3g} "
            f"({worst_rel:.3g} relative to the largest output), beyond {rule}, on the "
            "check batch; nothing was written. Check the rules, or raise the "
            "tolerance if the difference is expected.",
            worst_abs, worst_rel,
        )
    return worst_abs, worst_rel


class BeyondTolerance(VerificationError):
    """`compare` found differences beyond the tolerance (`max_abs`, `max_rel`: the worst)."""

    def __init__(self, message, max_abs=None, max_rel=None):
        super().__init__(message)
        self.max_abs, self.max_rel = max_abs, max_rel


def nonfinite_note(outputs):
    """What non-finite values `outputs` (flat list) hold, in a few words, or `None`."""
    notes = []
    for i, values in enumerate(outputs):
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            notes.append(f"output {i}: {_nonfinite_counts(values, finite)}")
    return "; ".join(notes) or None


def _nonfinite_counts(values, finite):
    nan = int(np.isnan(values).sum())
    return f"{nan} NaN and {int((~finite).sum()) - nan} Inf among {values.size} values"


def default_tolerance(folding):
    """The default tolerance: relative when BN layers are folded."""
    return RELATIVE_TOLERANCE if folding else ABSOLUTE_TOLERANCE


def compute_dtype(model):
    """The least precise float dtype any layer of `model` computes in.

    `"float32"` for a plain model; `"float16"` or `"bfloat16"` for a
    mixed-precision one (its variables stay float32).
    """
    found, stack, seen = "float32", [model], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        dtype = str(getattr(layer, "compute_dtype", None) or "float32")
        if EPSILON.get(dtype, 0.0) > EPSILON.get(found, 0.0):
            found = dtype
        stack.extend(getattr(layer, "layers", None) or [])
    return found


def lowest_precision(*dtypes):
    """Of float dtype names, the one with the coarsest rounding."""
    return max(dtypes, key=lambda d: EPSILON.get(d, 0.0))


def relative_tolerance(dtype):
    """`(rtol, atol)` of the per-element check for outputs computed in `dtype`."""
    if dtype in EPSILON:
        bound = LOW_PRECISION_EPS * EPSILON[dtype]
        return bound, bound
    return RELATIVE_TOLERANCE, ATOL
