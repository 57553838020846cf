"""`convert_model` and `inspect_model`: the conversion pipeline's Python entry points.

One pipeline serves both flavours: the model (or the file it is loaded
from) decides the `Flavour`, the rules are resolved for it, one
`Converter` walks the model, `bnconvert.fold` folds BN at inference, and
`bnconvert.verify` compares the result with the original on one generated
batch (`training=False`).
"""

import contextlib
import dataclasses
import os
import warnings

from bnconvert import flavour as flavour_lib
from bnconvert import fold as fold_lib
from bnconvert import rules as rules_lib
from bnconvert import verify as verify_lib
from bnconvert.converter import Converter
from bnconvert.errors import ConversionError
from bnconvert.report import ConversionReport


@dataclasses.dataclass(frozen=True)
class _Job:
    """One conversion's inputs, resolved: the model, its flavour, rules, report."""

    model: object
    flavour: object
    ruleset: object
    report: ConversionReport
    converter: Converter


def convert_model(
    model,
    to="sync",
    *,
    rules=None,
    custom_objects=None,
    verify=True,
    tolerance=None,
    fold=True,
    safe_mode=True,
    return_report=False,
):
    """Returns a copy of `model` with its normalization layers rewritten.

    With `to="sync"`, every `keras.layers.BatchNormalization` (exact class,
    synchronized or not) becomes `bnconvert.SyncBatchNormalization`. With
    `to="inference"`, synchronized layers become plain
    `BatchNormalization(synchronized=False)` and, with `fold=True`, BN layers
    are then folded into the layer that feeds them where that is exact.
    Weights, moving statistics, constructor arguments, names, `trainable`,
    dtype policies, regularizers and constraints carry over exactly. The
    original model is not modified.

    Args:
        model: A `keras.Model`, or the path of a saved model.
        to: `"sync"` or `"inference"`.
        rules: Optional list of rule-file paths applied on top of the
            shipped rules (see `rules/README.md`).
        custom_objects: Optional dict name -> class, used to load the model
            and to resolve class names in rules.
        verify: If `True`, run both models on one generated batch with
            `training=False` and compare the outputs.
        tolerance: Largest accepted difference of the outputs: absolute
            (default 1e-6) for a swap, relative to the largest output
            (default 1e-5) when BN layers are folded.
        fold: With `to="inference"`, fold BN into its producer layer.
        safe_mode: Passed to Keras when `model` is a path: refuse to load
            Python code (`Lambda` layers) stored in the file.
        return_report: If `True`, return `(model, report)`.

    Returns:
        A new `keras.Model`, or `(model, ConversionReport)`.

    Raises:
        ConversionError: Bad arguments, or a layer cannot be rewritten as
            its rule asks.
        RuleError: A rule file is wrong.
        ModelLoadError: `model` is a path that cannot be loaded.
        VerificationError: The outputs differ by more than `tolerance`.
    """
    job = _prepare(model, to, rules, custom_objects, safe_mode)
    folding = to == "inference" and fold
    tolerance = verify_lib.default_tolerance(folding) if tolerance is None else tolerance
    with _quiet_keras():
        new_model = job.converter.convert_root(job.model)
        if folding:
            new_model = fold_lib.fold_model(
                new_model, job.ruleset.fold_rules, job.report, flavour=job.flavour
            )
        if verify:
            verify_lib.verify_conversion(
                job.model, new_model, tolerance=tolerance, relative=folding,
                report=job.report,
            )
        else:
            job.report.tolerance = tolerance
            job.report.verification_note = "verification was turned off"
    report = job.report
    if return_report:
        return new_model, report
    return new_model


def inspect_model(model, to="sync", *, rules=None, custom_objects=None, safe_mode=True):
    """Reports what `convert_model` would do, without converting anything.

    Args:
        model: A `keras.Model`, or the path of a saved model.
        to: `"sync"` or `"inference"`.
        rules: Optional list of user rule-file paths.
        custom_objects: Optional dict name -> class.
        safe_mode: Passed to Keras when `model` is a path.

    Returns:
        A `ConversionReport` whose events say, for every normalization
        layer, which rule would apply or why none would.

    Raises:
        ConversionError, RuleError, ModelLoadError: As `convert_model`.
    """
    job = _prepare(model, to, rules, custom_objects, safe_mode)
    job.converter.inspect(job.model)
    job.report.verification_note = "inspection only: nothing was converted"
    return job.report


def _prepare(model, to, rules, custom_objects, safe_mode):
    if to not in rules_lib.DIRECTIONS:
        raise ConversionError(
            f"Unknown conversion direction; use one of {list(rules_lib.DIRECTIONS)}. "
            f"Received: to={to!r}"
        )
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise ConversionError(
            "Argument `custom_objects` must be a dict name -> class. "
            f"Received: custom_objects={custom_objects!r}"
        )
    if isinstance(rules, (str, os.PathLike)):
        rules = [rules]
    flavour = flavour_lib.flavour_of(model)
    ruleset = rules_lib.load_rules(rules, custom_objects=custom_objects, flavour=flavour)
    source = None
    if isinstance(model, (str, os.PathLike)):
        from bnconvert import model_io

        source = os.fspath(model)
        model = model_io.load_model(model, custom_objects=custom_objects, safe_mode=safe_mode)
    if not isinstance(model, flavour.Model):
        raise ConversionError(
            "Expected a keras.Model, a tf_keras.Model or the path of a saved model. "
            f"Received: model={type(model).__name__}"
        )
    report = ConversionReport(
        direction=to, source=source or model.name, rule_sources=ruleset.sources,
    )
    converter = Converter(flavour, ruleset, to, report, custom_objects)
    return _Job(model, flavour, ruleset, report, converter)


@contextlib.contextmanager
def _quiet_keras():
    # Copying a compiled model makes Keras warn about optimizer variables;
    # a rewrite does not carry optimizer state, so the warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer.*")
        yield
