"""The commands' pipeline: options in, files checked, model converted, outputs written.

`run(options)` does everything a `bnconvert` command does except printing:

1. Recognise the input (`bnconvert.formats`) and check every output place
   (`bnconvert.output_plan`) so that a mistake costs nothing.
2. Import the `--custom-objects` modules.
3. Read the rule files (a mistake in one is reported before the model,
   which can take long, is loaded), then load the model.
4. Convert or inspect (`bnconvert.convert`), export to ONNX
   (`bnconvert.onnx.export`), write the outputs atomically.

Both flavours take exactly this path; the model's `Flavour` carries what
differs.
"""

import dataclasses
import json

from bnconvert import formats
from bnconvert import output_plan
from bnconvert import outputs
from bnconvert import timing
from bnconvert.errors import OutputError


@dataclasses.dataclass(frozen=True)
class Options:
    """What a command was asked to do.

    Attributes:
        command: `"to-sync"`, `"to-inference"` or `"inspect"`.
        model: The input path.
        output: `-o`: the model (to-sync) or ONNX (to-inference) output.
        keras_out: `--keras-out` (to-inference).
        report_path: `--report`.
        rules: `--rules` files.
        custom_objects: `--custom-objects` modules or `.py` files.
        dry_run, force, unsafe: The flags of the same names.
        allow_asset_paths: `--allow-asset-paths`: accept a model config
            naming files to read (see `bnconvert.config_checks`).
        fold: `False` with `--no-fold`.
        opset, check, tolerance, atol, exporter, precision: ONNX export
            settings (`check` is `False` with `--no-check`; `tolerance` is
            the check's `rtol`, None for the compute dtype's default;
            `exporter` is `auto`, `native` or `tf2onnx`; `precision` is
            `float32` or `float16`).
        target: `inspect --to`.
        sync_group_size: `to-sync --sync-group-size`.
        allow_nonfinite: `--allow-nonfinite`: accept NaN/Inf outputs that
            the converted model reproduces, with a warning.
        check_inputs: `--check-input` `.npy` files, one per model input:
            the batch to verify on instead of a generated one.
    """

    command: str
    model: str
    output: str | None = None
    keras_out: str | None = None
    report_path: str | None = None
    rules: tuple = ()
    custom_objects: tuple = ()
    dry_run: bool = False
    force: bool = False
    unsafe: bool = False
    allow_asset_paths: bool = False
    fold: bool = True
    opset: int | None = None
    check: bool = True
    tolerance: float | None = None
    atol: float | None = None
    exporter: str = "auto"
    precision: str = "float32"
    target: str = "sync"
    sync_group_size: int | None = None
    allow_nonfinite: bool = False
    check_inputs: tuple = ()


@dataclasses.dataclass
class Result:
    """What a command did, for printing.

    Attributes:
        report: The `ConversionReport`.
        output: The model or ONNX file written (`None` on a dry run).
        keras_out: The Keras model written by `--keras-out`, if any.
        report_path: The report written, if any.
        onnx: The `OnnxExportResult` of `to-inference`.
        rows: `inspect`'s layer rows (see `report.inspect_rows`).
    """

    report: object
    output: object = None
    keras_out: object = None
    report_path: object = None
    onnx: object = None
    rows: list = None


def run(options, progress=None, cancelled=None, placed=None):
    """Runs one command.

    Args:
        options: The `Options`.
        progress: Optional object whose `step(label)` context manager
            brackets each long step (the CLI prints them).
        cancelled: Optional callable, true once the run must stop (the CLI
            records Ctrl-C there, since Keras swallows `KeyboardInterrupt`
            in places). Checked after each step and around the commit.
        placed: Optional callable, called once every output is in place
            and the run can no longer be undone (the CLI then lets Ctrl-C
            wait for the few lines it prints).

    Returns:
        A `Result`.

    Raises:
        BnconvertError: Any problem with the input, the options or the
            outputs, as one line.
        KeyboardInterrupt: `cancelled()` became true; nothing was written.
    """
    steps = timing.Steps(progress)
    cancelled = cancelled or (lambda: False)
    _check_arguments(options)
    with steps.step("input_checks", f"checking {options.model}"):
        found = formats.resolve(options.model)
    protected = output_plan.read_paths(options, found)
    plan = output_plan.plan(options, found, protected)
    for directory in plan.directories():
        outputs.remove_stale(directory)

    from bnconvert import custom_objects as custom_objects_lib

    objects = None
    if options.custom_objects:
        with steps.step("custom_objects", "importing custom objects"):
            objects = custom_objects_lib.import_custom_objects(options.custom_objects)
    from bnconvert import flavour as flavour_lib
    from bnconvert import rules as rules_lib

    flavour = flavour_lib.get(found.flavour)
    rules = list(options.rules) or None
    with steps.step("rules", "reading the rules"):
        rules_lib.load_rules(rules, custom_objects=objects, flavour=flavour)
    from bnconvert import convert
    from bnconvert import model_io

    with steps.step("load", f"loading {options.model} ({flavour.label})"):
        model = model_io.load_found(
            found, custom_objects=objects, safe_mode=not options.unsafe,
            allow_asset_paths=options.allow_asset_paths,
        )
    _stop_if(cancelled)
    if options.command == "inspect":
        return _inspect(options, model, flavour, rules, objects, steps)

    direction = "sync" if options.command == "to-sync" else "inference"
    with steps.step("rules", "applying the rules"):
        job = convert.prepare(
            model, direction, rules=rules, custom_objects=objects,
            safe_mode=not options.unsafe, sync_group_size=options.sync_group_size,
        )
    # The model was loaded here for this run only: it is rewritten itself.
    # A written model file is checked against the original outputs
    # (`written`), which makes checking the model in memory first a second
    # forward pass of the same comparison. So does the onnxruntime gate,
    # when it holds the graph to the original outputs at the fold check's
    # tolerance or a stricter one (`_gate_checks_fold`).
    gate_checks_fold = direction == "inference" and _gate_checks_fold(options, model)
    conversion = convert.run_conversion(
        job, fold=options.fold, in_place=True, steps=steps,
        check=(direction == "inference" and not gate_checks_fold) or plan.output is None,
        allow_nonfinite=options.allow_nonfinite, check_inputs=list(options.check_inputs) or None,
    )
    converted, report = conversion.model, conversion.report
    _stop_if(cancelled)
    report.source = str(options.model)

    def check(tmp, fmt, name):
        from bnconvert import written

        _stop_if(cancelled)  # a save that swallowed Ctrl-C left nothing to check

        figures = written.check_file(
            tmp, fmt, flavour, converted, conversion, name=name,
            custom_objects=objects, safe_mode=not options.unsafe,
        )
        report.file_checks.append(figures)
        if conversion.expected is not None and not report.verified:
            # Checked on the written file only (see run_conversion's `check`).
            report.max_abs_diff = figures["max_abs_diff"]
            report.max_rel_diff = figures["max_rel_diff"]
            report.verified_on = "the written file"
            report.verification_note += f", on {report.verified_on}"
            report.verified = True

    result = Result(report=report, report_path=options.report_path)
    # Every output is written aside first and all are placed together at
    # the end: a failure or an interrupt anywhere leaves none of them.
    with outputs.Outputs(force=options.force) as staged:
        if direction == "sync":
            if plan.output is not None:
                _write_model(staged, converted, plan.output, plan.output_format, steps, check)
                result.output = plan.output
            report.timings = steps.ordered()
            data = report.to_dict()
        else:
            result.onnx = _write_onnx(staged, conversion, plan.output, options, steps)
            result.output = plan.output
            _stop_if(cancelled)
            if plan.keras_out is not None:
                _write_model(staged, converted, plan.keras_out, plan.keras_format, steps, check)
                result.keras_out = plan.keras_out
            report.timings = steps.ordered()
            data = report.to_dict()
            data["onnx"] = result.onnx.to_dict()
        if options.report_path:
            tmp = staged.stage(options.report_path)
            try:
                tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
            except OSError as e:
                raise outputs.write_error(options.report_path, e, tmp) from e
        _stop_if(cancelled)
        staged.commit()
        # An interrupt that arrived during the renames undoes them.
        _stop_if(cancelled)
        if placed is not None:
            placed()
        staged.finish()
    return result


def _check_arguments(options):
    """Refuses bad option values before anything is read or loaded."""
    for option, value in (("--output", options.output), ("--keras-out", options.keras_out),
                          ("--report", options.report_path)):
        if value is not None and not str(value).strip():
            raise OutputError(
                f"{option} is empty; give a path, or leave the option out for the "
                f"default. Received: {option}={str(value)!r}"
            )
    if options.command == "to-inference":
        from bnconvert import verify
        from bnconvert.onnx import export as onnx_export

        onnx_export.check_opset(options.opset, options.exporter)
        onnx_export.check_precision(options.precision, options.exporter)
        # None: the compute dtype's default.
        verify.check_tolerance("tolerance", options.tolerance, optional=True)
        verify.check_tolerance("atol", options.atol, optional=True)
    if options.sync_group_size is not None:
        from bnconvert import convert

        convert.check_group_size(options.sync_group_size)


def _stop_if(cancelled):
    if cancelled():
        raise KeyboardInterrupt


def _write_model(staged, model, out, fmt, steps, check):
    from bnconvert import model_io

    tmp = staged.stage(out, output_plan.output_kind(fmt))
    with steps.step("save", f"saving {out}"):
        model_io.write_model(model, tmp, fmt, out)
    with steps.step("file_check", f"loading {out} back to check it"):
        check(tmp, fmt, out)


def _gate_checks_fold(options, model):
    """Whether the onnxruntime gate, held to the original outputs, checks the fold too.

    It does when it runs at the fold check's own tolerance or a stricter
    one: float32 graphs (a float16 graph is held to float16's rounding, too
    loose for a fold) and no `--tolerance`/`--atol` above the defaults.
    """
    from bnconvert import verify

    if not (options.check and options.fold and options.precision == "float32"):
        return False
    rtol, atol = verify.relative_tolerance(verify.compute_dtype(model))
    return ((options.tolerance is None or options.tolerance <= rtol)
            and (options.atol is None or options.atol <= atol))


def _write_onnx(staged, conversion, out, options, steps):
    from bnconvert import convert
    from bnconvert.errors import BnconvertError
    from bnconvert.onnx import export as onnx_export

    report = conversion.report
    # Checked in memory: the gate compares with the folded model's outputs.
    # If not, with the original's: the fold and the graph at once.
    on_gate = conversion.actual is None and conversion.expected is not None
    known = conversion.expected if on_gate else conversion.actual
    # export_onnx writes its file atomically itself: give it a free name.
    tmp = staged.stage(out, create=False)
    step = "exporting to ONNX" + (" and checking" if options.check else "")
    before = steps.seconds.get("export", 0.0)
    with steps.step("export", step):
        try:
            onnx = onnx_export.export_onnx(
                conversion.model, tmp, opset=options.opset, tolerance=options.tolerance,
                atol=options.atol, check=options.check, exporter=options.exporter,
                precision=options.precision,
                reference=(conversion.sample, known) if known is not None else None,
                allow_nonfinite=options.allow_nonfinite,
            )
        except OutputError as e:
            # export_onnx names the path it was given: here a temporary one.
            raise outputs.write_error(out, e, tmp) from None
        except BnconvertError:
            if on_gate:
                # Both graphs failed: a wrong fold fails its own check here
                # and is named as such, as when it is checked first.
                convert.check_converted(conversion)
            raise
    if on_gate and onnx.checked:
        report.max_abs_diff, report.max_rel_diff = onnx.max_abs_diff, onnx.max_rel_diff
        report.tolerance, report.atol = onnx.tolerance, onnx.atol
        report.verified_on = "the ONNX file (onnxruntime)"
        report.verification_note += f", on {report.verified_on}"
        report.verified = True
    if options.check:
        # export_onnx times building the graph; the rest of the step (the
        # file written while onnxruntime runs it) counts as the check.
        checking = max(0.0, steps.seconds["export"] - before - onnx.seconds)
        steps.seconds["export"] -= checking
        steps.add("onnxruntime_check", checking)
    return dataclasses.replace(onnx, path=str(out))


def _inspect(options, model, flavour, rules, objects, steps):
    """What a conversion would do, the model's layers as they are now.

    For `--to inference` the conversion runs for real on the model loaded for
    this inspection (nothing is written), so that folding says what it
    would fold and keep, and why.
    """
    from bnconvert import convert
    from bnconvert import report as report_lib
    from bnconvert import walk

    job = convert.prepare(
        model, options.target, rules=rules, custom_objects=objects,
        safe_mode=not options.unsafe,
    )
    rows = report_lib.inspect_rows(model, flavour, walk.named_classes(job.ruleset.rules))
    if options.target == "inference":
        convert.run_conversion(job, verify=False, in_place=True, steps=steps)
        job.report.verification_note = "inspection only: nothing was written"
    else:
        with steps.step("convert", "applying rules (dry run)"):
            job.converter.inspect(model)
        job.report.verification_note = "inspection only: nothing was converted"
    job.report.timings = steps.ordered()
    return Result(report=job.report, rows=report_lib.add_events(rows, job.report))
