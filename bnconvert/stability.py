"""Runs a converted model on the check batch and tells chaos from a wrong conversion.

A deep network can be numerically unstable in its compute precision: it
amplifies rounding errors until its outputs are noise. keras.applications
EfficientNetV2L with random weights (`weights=None`, moving statistics 0 and
1) is one: its activations grow to an RMS of 1e7 and, on a 64x64 batch, its
own float32 outputs differ from its float64 evaluation by 1.1 times their
largest value; moving every input by one float32 rounding step changes its
features by 0.87 of their largest value. Folding BN changes the rounding, so
the fold check fails by up to 1 on the softmax although the fold is exact
(the same fold evaluated in float64 differs only through the float32
rounding of the folded weights, and that too grows to 1 through the net).

When a relative (fold) check fails, `run_and_compare` runs the checked model
once more on the check batch with every float input moved by one rounding
step (`numpy.nextafter`). If that alone moves its outputs beyond the same
tolerance, the check cannot tell a correct conversion from a wrong one and
the error says so; it still refuses (fail closed). The extra forward pass is
taken only on that failure path.
"""

import numpy as np

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
        lambda batch: verify.run(model, batch), sample, expected, tolerance=tolerance,
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
            verify.compare(
                actual, run(nudged), tolerance=tolerance, relative=True, atol=atol,
                what=what, allow_nonfinite=True,
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
