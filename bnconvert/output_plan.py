"""Where a command's outputs go, every place checked before any work.

`plan(options, found, protected)` decides each output of a run (the model or
ONNX file, `--keras-out`, `--report`) and checks it with
`bnconvert.paths.check_output` before the model, which can take long, is
loaded: a mistake in an output place costs nothing. `read_paths` lists what
the run reads, which no output may overwrite.
"""

import dataclasses
import pathlib

from bnconvert import formats
from bnconvert import paths

SYNC_TAIL = ".sync"


@dataclasses.dataclass(frozen=True)
class Plan:
    output: object = None
    output_format: str | None = None
    keras_out: object = None
    keras_format: str | None = None
    report: object = None

    def directories(self):
        """The directories outputs go to (where stale temporaries may lie)."""
        given = (self.output, self.keras_out, self.report)
        return sorted({pathlib.Path(p).parent for p in given if p is not None})


def read_paths(options, found):
    """Every path this run reads: none of them may be written."""
    given = [options.model, found.path, *options.rules, *options.check_inputs]
    given += [m for m in options.custom_objects if m.endswith(".py")]
    return tuple(given)


def plan(options, found, protected):
    """Checks every output place before any work; returns where each goes."""
    force = options.force
    if options.command == "inspect":
        return Plan()
    if options.command == "to-sync":
        out = fmt = None
        if not options.dry_run:
            out = options.output or formats.default_output(options.model, found, SYNC_TAIL)
            fmt = formats.output_format(found.flavour, out)
            if not options.output and found.format == formats.SAVEDMODEL:
                fmt = formats.SAVEDMODEL
            out = paths.check_output(
                out, force=force, inputs=protected, kind=output_kind(fmt),
                suffixes=formats.OUTPUT_FORMATS[found.flavour][fmt] or None,
            )
        paths.check_distinct(("--output", out), ("--report", options.report_path))
        report = _check_report(options, protected + (out,))
        return Plan(output=out, output_format=fmt, report=report)
    out = paths.check_output(
        options.output or paths.beside(options.model, ".onnx"), force=force,
        inputs=protected, suffixes=(".onnx",),
    )
    keras_out = keras_fmt = None
    paths.check_distinct(
        ("--output", out), ("--keras-out", options.keras_out),
        ("--report", options.report_path),
    )
    if options.keras_out:
        keras_fmt = formats.output_format(found.flavour, options.keras_out, "--keras-out")
        keras_out = paths.check_output(
            options.keras_out, force=force, inputs=protected + (out,),
            kind=output_kind(keras_fmt), option="--keras-out",
            suffixes=formats.OUTPUT_FORMATS[found.flavour][keras_fmt] or None,
        )
    report = _check_report(options, protected + (out, keras_out))
    return Plan(output=out, keras_out=keras_out, keras_format=keras_fmt, report=report)


def _check_report(options, protected):
    if options.report_path:
        return paths.check_output(
            options.report_path, force=options.force, inputs=protected, option="--report"
        )
    return None


def output_kind(fmt):
    """`paths.DIRECTORY` for SavedModel outputs, else `paths.FILE`."""
    return paths.DIRECTORY if fmt == formats.SAVEDMODEL else paths.FILE
