"""Holds a converted model's outputs to its original's.

A swap (BN -> SyncBN and back) must reproduce the outputs to the last bit,
so it is held to an absolute tolerance (default 1e-6). Folding a BN into the
layer before it changes the order of floating-point operations, so the
error grows with the size of the outputs; it is held to a tolerance relative
to the largest original output (default 1e-5).
"""

import numpy as np

from bnconvert.errors import VerificationError

ABSOLUTE_TOLERANCE = 1e-6
RELATIVE_TOLERANCE = 1e-5


def compare_outputs(expected, actual, *, tolerance, relative, report, name):
    """Compares two flat lists of outputs and records the figures in `report`.

    Args:
        expected: Flat list of the original model's outputs.
        actual: Flat list of the converted model's outputs.
        tolerance: Largest accepted difference.
        relative: If `True`, the difference is divided by the largest
            absolute original output before it is held to `tolerance`.
        report: The `ConversionReport` that receives the figures.
        name: The model's name, for error messages.

    Raises:
        VerificationError: Different output count or shapes, or a difference
            beyond `tolerance`.
    """
    report.tolerance = tolerance
    report.tolerance_kind = "relative" if relative else "absolute"
    if len(expected) != len(actual):
        raise VerificationError(
            f"The converted model has {len(actual)} outputs, the original "
            f"{len(expected)}. Received: model={name}"
        )
    worst, scale = 0.0, 0.0
    for a, b in zip(expected, actual):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise VerificationError(
                f"An output of the converted model has shape {b.shape}, the "
                f"original's {a.shape}. Received: model={name}"
            )
        if a.size:
            # NaN where the original has NaN too is agreement, not a difference.
            diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
            worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max()))
            scale = max(scale, float(np.nanmax(np.abs(a), initial=0.0)))
    report.verified = True
    report.max_abs_diff = worst
    report.max_rel_diff = worst / scale if scale > 0 else worst
    measured = report.max_rel_diff if relative else worst
    if not measured <= tolerance:
        raise VerificationError(
            f"The converted model's outputs differ from the original's by up to "
            f"{worst:.3g} ({report.max_rel_diff:.3g} relative) on a generated "
            "batch; check the rules, or raise the tolerance if the difference is "
            f"expected. Received: tolerance={tolerance:g} ({report.tolerance_kind})"
        )


def default_tolerance(folding):
    """The default tolerance: relative when BN layers are folded."""
    return RELATIVE_TOLERANCE if folding else ABSOLUTE_TOLERANCE
