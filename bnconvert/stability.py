"""Runs a converted model on the check batch and tells chaos from a wrong conversion.

A deep network can be numerically unstable in its compute precision: it
amplifies rounding errors until its outputs are noise. keras.applications
EfficientNetV2L with random weights (`weights=None`, moving statistics 0 and
1) is one. On a 64x64 check batch its activations grow to an RMS of 1e7 and
its final features (`top_activation`), unfolded, differ from its own float64
evaluation by 1.13 times their largest value; moving every input by one
float32 rounding step changes them by 0.87. Folding BN changes the rounding,
so the fold check fails by up to 1 on the softmax although the fold is
exact: evaluated in float64, the folded model differs from the original at
first by 4e-8 (the float32 rounding of the folded weights), and that too
grows to 1.0 through the net. EfficientNetV2S stays stable (fold: 6e-7).

When a relative check (a fold, an ONNX graph) fails, `compare_run` runs the
checked side once more on the check batch with every float input moved by
one rounding step (`numpy.nextafter`). If that alone moves its outputs
beyond the tolerance in use and beyond the float32 defaults (so that a
tolerance of 0 does not make every model unstable), no check can tell a
correct result from a wrong one, and the error says so; it still refuses
(fail closed). The extra forward pass runs only on that failure path.
"""

import numpy as np

from bnconvert import check_batch
from bnconvert import verify
from bnconvert.errors import VerificationError


FOLD_ADVICE = "Convert with --no-fold (fold=False) or the trained model."
ONNX_ADVICE = "Skip the check (--no-check, check=False) or export the trained model."


def run_and_compare(model, sample, expected, *, tolerance, relative, atol=verify.ATOL,
                    what="The converted model", allow_nonfinite=False):
    """Runs a Keras `model` on `sample` and holds its outputs to `expected` (see `compare_run`).

    Returns:
        `(actual, (max_abs_diff, max_rel_diff))`.
    """
    return compare_run(
        lambda batch: check_batch.run(model, batch), sample, expected, tolerance=tolerance,
        relative=relative, atol=atol, what=what, allow_nonfinite=allow_nonfinite,
        advice=FOLD_ADVICE,
    )


def compare_run(run, sample, expected, *, tolerance, relative, atol, what, allow_nonfinite,
                advice):
    """`verify.compare(expected, run(sample))`, telling an unstable model from a wrong one.

    Args:
        run: Callable from a flat list of arrays to the checked side's flat
            list of outputs (a Keras model, an onnxruntime session).
        sample: Flat list of check arrays.
        expected: Flat list of the reference outputs on `sample`.
        tolerance, relative, atol, what, allow_nonfinite: As `verify.compare`.
        advice: The last sentence of the instability error: how to proceed.

    Returns:
        `(actual, (max_abs_diff, max_rel_diff))`.

    Raises:
        VerificationError: As `verify.compare`; a relative check failing
            where `run`'s outputs themselves move beyond the tolerance when
            the float inputs move by one rounding step says that the model
            is numerically unstable, and `advice`.
    """
    actual = run(sample)
    try:
        figures = verify.compare(
            expected, actual, tolerance=tolerance, relative=relative, atol=atol, what=what,
            allow_nonfinite=allow_nonfinite,
        )
    except verify.BeyondTolerance as failure:
        nudged = nudge(sample)
        if not relative or nudged is None:
            raise
        try:
            # Held to at least the default float32 bounds: a tolerance of 0
            # would call every model unstable.
            verify.compare(
                actual, run(nudged), tolerance=max(tolerance, verify.RELATIVE_TOLERANCE),
                relative=True, atol=max(atol, verify.ATOL), what=what, allow_nonfinite=True,
            )
        except verify.BeyondTolerance as noise:
            dtype = next(a.dtype for a in sample if _is_float(a))
            # Cause and remedy first: an exporter fallback quotes only the start.
            raise VerificationError(
                f"{what} cannot be checked: the model is numerically unstable in {dtype}. "
                f"{advice} On the check batch its outputs differ from the reference's by up "
                f"to {failure.max_abs:.3g} ({failure.max_rel:.3g} relative to the largest "
                f"output), and moving each input by one rounding step changes them by up to "
                f"{noise.max_abs:.3g} ({noise.max_rel:.3g}), so no check can tell a correct "
                "result from a wrong one (random weights in a very deep network?); nothing "
                "was written."
            ) from failure
        raise
    return actual, figures


def nudge(arrays):
    """`arrays` with every float element moved one rounding step up, or `None` if none is float."""
    if not any(_is_float(a) for a in arrays):
        return None
    return [np.nextafter(a, np.array(np.inf, a.dtype)) if _is_float(a) else a for a in arrays]


def _is_float(array):
    return np.issubdtype(np.asarray(array).dtype, np.floating)
