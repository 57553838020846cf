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
from types import MappingProxyType

from bnconvert import check_batch
from bnconvert import check_inputs as check_inputs_lib
from bnconvert import flavour as flavour_lib
from bnconvert import fold as fold_lib
from bnconvert import layer_args
from bnconvert import rules as rules_lib
from bnconvert import stability
from bnconvert import timing
from bnconvert import verify as verify_lib
from bnconvert import walk
from bnconvert.converter import Converter
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line
from bnconvert.report import ConversionReport


@dataclasses.dataclass(frozen=True)
class _Job:
    """One conversion's inputs, resolved: the model, its flavour, rules, report."""

    model: object
    flavour: object
    ruleset: object
    report: ConversionReport
    converter: Converter
    loaded: bool = False


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
    sync_group_size=None,
    check_inputs=None,
    allow_nonfinite=False,
    allow_asset_paths=False,
):
    """Returns a copy of `model` with its normalization layers rewritten.

    The copy is what Keras's own save and load would rebuild (its config
    round trip, without the file: the faster of the ways measured, see the
    README), so it keeps the model's class and config (keras-hub backbones
    and tasks), raw `keras.ops` nodes and custom layers; only the matched
    layers are rewritten in it.

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
        verify: If `True`, run both models on one generated batch (or
            `check_inputs`) with `training=False` and compare the outputs.
        tolerance: Largest accepted difference of the outputs: absolute
            (default 1e-6) for a swap; when BN layers are folded, the `rtol`
            of the per-element check (`bnconvert.verify`; default 1e-4, or 8
            epsilons of float16/bfloat16 for a mixed-precision model, whose
            `atol` is the same).
        fold: With `to="inference"`, fold BN into its producer layer.
        safe_mode: Passed to Keras when `model` is a path: refuse to load
            Python code (`Lambda` layers) stored in the file.
        return_report: If `True`, return `(model, report)`.
        sync_group_size: With `to="sync"`, synchronize statistics within
            groups of this many consecutive replicas instead of all of them
            (set on every layer the rules turn into bnconvert's
            synchronized layer; a rule file can set it too, with
            `[rule.config] set = { sync_group_size = 4 }`); at most
            `bnconvert.layer_args.MAX_SYNC_GROUP_SIZE`.
        check_inputs: Optional inputs to verify on instead of a generated
            batch (needed for string inputs): an array, a list of arrays
            (one per model input), a dict input-name -> array, or `.npy`
            paths; each with at least one row, finite.
        allow_nonfinite: Accept NaN/Inf original outputs that the converted
            model reproduces exactly (with a warning in the report) instead
            of raising `VerificationError`.
        allow_asset_paths: When `model` is a path: accept a config that
            names files to read (a lookup layer's `vocabulary` path), which
            is refused by default (`bnconvert.config_checks`).

    Returns:
        A new `keras.Model`, or `(model, ConversionReport)`.

    Raises:
        ConversionError: Bad arguments, or a layer cannot be rewritten as
            its rule asks.
        RuleError: A rule file is wrong.
        ModelLoadError: `model` is a path that cannot be loaded.
        VerificationError: The outputs differ by more than `tolerance`.
    """
    job = prepare(
        model, to, rules=rules, custom_objects=custom_objects, safe_mode=safe_mode,
        sync_group_size=sync_group_size, allow_asset_paths=allow_asset_paths,
    )
    # A model loaded here from a path is nobody else's: it is rewritten
    # itself. A model given by the caller is copied first.
    tolerance = verify_lib.check_tolerance("tolerance", tolerance, optional=True)
    done = run_conversion(
        job, verify=verify, tolerance=tolerance, fold=fold, in_place=job.loaded,
        check_inputs=check_inputs, allow_nonfinite=allow_nonfinite,
    )
    if return_report:
        return done.model, done.report
    return done.model


@dataclasses.dataclass
class Conversion:
    """A finished conversion.

    Attributes:
        model: The converted model.
        report: Its `ConversionReport`.
        sample: The generated check batch (flat list of arrays), or `None`.
        expected: The original model's outputs on `sample`, or `None`.
        tolerance: The tolerance the outputs are held to.
        relative: Whether that tolerance is relative (BN was folded).
        atol: The absolute term of a relative check (from the compute dtype).
        rewritten: The layer objects the conversion rewrote in place.
        actual: The converted model's outputs on `sample`, or `None`.
        allow_nonfinite: Whether non-finite outputs were accepted.
    """

    model: object
    report: ConversionReport
    sample: list = None
    expected: list = None
    tolerance: float = None
    relative: bool = False
    rewritten: list = dataclasses.field(default_factory=list)
    actual: list = None
    allow_nonfinite: bool = False
    atol: float = verify_lib.ATOL


def run_conversion(job, *, verify=True, tolerance=None, fold=True, in_place=False,
                   check_inputs=None, allow_nonfinite=False, steps=None, check=True):
    """Converts `job.model` (in place, or a fresh copy of it) and verifies the outputs.

    The original outputs are computed before anything changes, so that an
    in-place conversion is verified against the model as it was; they are
    kept in the result for checking the files written later.

    Args:
        steps: Optional `bnconvert.timing.Steps` timing each step.
        check: With `verify`, also run the converted model and hold it to
            the original outputs. `False` when the caller checks the file
            written from it instead (`bnconvert.written`): the same
            comparison, one forward pass fewer.
    """
    steps = steps or timing.Steps()
    folding = job.report.direction == "inference" and fold
    report = job.report
    # A fold in float16/bfloat16 compute is held to that dtype's rounding.
    report.compute_dtype = verify_lib.compute_dtype(job.model)
    rtol, atol = verify_lib.relative_tolerance(report.compute_dtype)
    if tolerance is None:
        tolerance = rtol if folding else verify_lib.ABSOLUTE_TOLERANCE
    report.tolerance = tolerance
    report.atol = atol if folding else None
    report.tolerance_kind = "relative" if folding else "absolute"
    sample = expected = None
    if verify and check_inputs is not None:
        sample = check_inputs_lib.user_inputs(job.model, check_inputs)
        report.verification_note = "the given check inputs, training=False"
        with steps.step("verify", "computing the original outputs"):
            expected = check_batch.reference(job.model, sample)
    elif verify:
        with steps.step("verify", "computing the original outputs"):
            sample, report.verification_note, expected = check_batch.generated_check(job.model)
    else:
        report.verification_note = "verification was turned off"
    with _quiet_keras():
        work = job.model
        if not in_place:
            with steps.step("copy", "copying the model"):
                work = _copy(job)
        with steps.step("convert", "converting"):
            job.converter.convert_in_place(work)
        if folding:
            with steps.step("fold", "folding"):
                fold_lib.fold_model(
                    work, job.ruleset.fold_rules, report, flavour=job.flavour,
                    rewritten=job.converter.rewritten,
                )
        done = Conversion(
            work, report, sample, expected, tolerance, folding, list(job.converter.rewritten),
            None, allow_nonfinite, atol,
        )
        if expected is not None and check:
            with steps.step("verify", "checking the converted outputs"):
                check_converted(done)
        nonfinite = verify_lib.nonfinite_note(expected) if expected is not None else None
        if nonfinite:
            report.warnings.append(f"non-finite outputs accepted (allow_nonfinite): {nonfinite}")
    report.timings = steps.ordered()
    return done


def check_converted(conversion):
    """Runs the converted model on the check batch and holds it to the original outputs.

    Sets `conversion.actual` and the report's figures. `run_conversion`
    calls it unless the caller checks a file written from the model
    instead; such a caller calls it when that check fails, to tell a wrong
    conversion from a wrong file.

    Raises:
        VerificationError: The outputs differ beyond the tolerance (see
            `bnconvert.stability.run_and_compare`).
    """
    report = conversion.report
    with _quiet_keras():
        conversion.actual, (report.max_abs_diff, report.max_rel_diff) = (
            stability.run_and_compare(
                conversion.model, conversion.sample, conversion.expected,
                tolerance=conversion.tolerance, relative=conversion.relative,
                atol=conversion.atol, allow_nonfinite=conversion.allow_nonfinite,
            ))
    report.verified = True


def _copy(job):
    try:
        copy = job.flavour.fresh_copy(job.model, job.converter.custom_objects)
    except Exception as e:  # noqa: BLE001 - Keras raises many kinds here
        raise ConversionError(
            f"Cannot copy model '{job.model.name}' through {job.flavour.label}'s own "
            f"save and load: {first_line(e)}. Save the model to a file and convert "
            "the file, or make the model savable (get_config for custom layers)."
        ) from e
    _align(job.model, copy, job.flavour)
    return copy


def _align(original, copy, flavour):
    """Gives the copy's layers the names and `trainable` flags of the original's.

    A save and load round trip re-creates sublayers that a custom layer
    makes in `__init__` under new automatic names, and does not always
    keep a nested model's `trainable`. Layers are paired in walk order,
    parents first (setting `trainable` on a parent resets its children).
    """
    pairs = zip(
        [original, *(layer for _, layer in walk.iter_layers(original, flavour))],
        [copy, *(layer for _, layer in walk.iter_layers(copy, flavour))],
    )
    for a, b in pairs:
        if type(a) is not type(b):
            continue
        if a.name != b.name:
            with contextlib.suppress(AttributeError):  # read-only in tf-keras
                b.name = a.name
        if a.trainable != b.trainable:
            b.trainable = a.trainable


def inspect_model(model, to="sync", *, rules=None, custom_objects=None, safe_mode=True,
                  allow_asset_paths=False):
    """Reports what `convert_model` would do, without converting anything.

    Args:
        model: A `keras.Model`, or the path of a saved model.
        to: `"sync"` or `"inference"`.
        rules: Optional list of user rule-file paths.
        custom_objects: Optional dict name -> class.
        safe_mode: Passed to Keras when `model` is a path.
        allow_asset_paths: As for `convert_model`.

    Returns:
        A `ConversionReport` whose events say, for every normalization
        layer, which rule would apply or why none would.

    Raises:
        ConversionError, RuleError, ModelLoadError: As `convert_model`.
    """
    job = prepare(
        model, to, rules=rules, custom_objects=custom_objects, safe_mode=safe_mode,
        allow_asset_paths=allow_asset_paths,
    )
    job.converter.inspect(job.model)
    job.report.verification_note = "inspection only: nothing was converted"
    return job.report


def prepare(model, to, *, rules=None, custom_objects=None, safe_mode=True,
            sync_group_size=None, allow_asset_paths=False):
    """Resolves a conversion's inputs: the model (loaded if a path), flavour, rules, report."""
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
    source = found = None
    if isinstance(model, (str, os.PathLike)):
        from bnconvert import formats

        # Checked once here; loading below trusts this check.
        source, found = os.fspath(model), formats.resolve(model)
        flavour = flavour_lib.get(found.flavour)
    else:
        flavour = flavour_lib.flavour_of(model)
    ruleset = rules_lib.load_rules(rules, custom_objects=custom_objects, flavour=flavour)
    if sync_group_size is not None:
        ruleset = _with_group_size(ruleset, flavour, check_group_size(sync_group_size))
    if found is not None:
        from bnconvert import model_io

        model = model_io.load_found(
            found, custom_objects=custom_objects, safe_mode=safe_mode,
            allow_asset_paths=allow_asset_paths,
        )
    if not isinstance(model, flavour.Model):
        raise ConversionError(
            "Expected a keras.Model, a tf_keras.Model or the path of a saved model. "
            f"Received: model={type(model).__name__}"
        )
    report = ConversionReport(
        direction=to, source=source or model.name, rule_sources=ruleset.sources,
    )
    converter = Converter(flavour, ruleset, to, report, custom_objects)
    return _Job(model, flavour, ruleset, report, converter, loaded=source is not None)


def check_group_size(group_size):
    """Returns `group_size` if it is a whole number from 1 to the layers' maximum."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (
        1 <= group_size <= layer_args.MAX_SYNC_GROUP_SIZE
    ):
        raise ConversionError(
            "`sync_group_size` must be a whole number of replicas from 1 to "
            f"{layer_args.MAX_SYNC_GROUP_SIZE}. Received: sync_group_size={group_size!r}"
        )
    return group_size


def _with_group_size(ruleset, flavour, group_size):
    """`ruleset` whose rules into bnconvert's synchronized layer also set `sync_group_size`."""
    rules = []
    for rule in ruleset.rules:
        if issubclass(rule.target_class, flavour.SyncBatchNormalization):
            settings = MappingProxyType({**rule.config.set, "sync_group_size": group_size})
            rule = dataclasses.replace(rule, config=dataclasses.replace(rule.config, set=settings))
        rules.append(rule)
    return dataclasses.replace(ruleset, rules=tuple(rules))


@contextlib.contextmanager
def _quiet_keras():
    # Copying a compiled model makes Keras warn about optimizer variables;
    # a rewrite does not carry optimizer state, so the warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer.*")
        yield
