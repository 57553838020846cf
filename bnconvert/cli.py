"""The `bnconvert` command line: a click group with one command per task.

TensorFlow is imported only when a command runs, so `bnconvert --help` is
instant, and it is imported with its C++ start-up chatter (which ignores
`TF_CPP_MIN_LOG_LEVEL` before absl logging is initialised) sent to
/dev/null: stdout carries only results, stderr only progress and errors.

The helpers here (`user_errors`, `Progress`, `prepare_tensorflow`, the shared
options and `load_input`) are meant for every command of the group.
"""

import contextlib
import json
import math
import os
import sys
import time

import click

from bnconvert import quiet
from bnconvert.errors import BnconvertError
from bnconvert.errors import OutputError

# Layers listed one by one in the to-sync summary; --report has them all.
SUMMARY_ROWS = 30

_NORMALIZATION_SETTINGS = (
    "axis", "momentum", "epsilon", "center", "scale", "renorm", "synchronized",
    "trainable",
)


def _one_line(text):
    return " ".join(str(text).split())


@contextlib.contextmanager
def user_errors():
    """Turns errors caused by the user's input into one-line click errors.

    `BnconvertError` is the library's own; `OSError` covers files that
    vanish or cannot be read between the checks and their use.
    """
    try:
        yield
    except BnconvertError as e:
        raise click.ClickException(_one_line(e)) from None
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise click.ClickException(
            _one_line(f"{e.strerror or e}{where}")
        ) from None


_tensorflow_ready = False


def prepare_tensorflow():
    """Imports TensorFlow and Keras quietly; call before loading a model."""
    global _tensorflow_ready
    if _tensorflow_ready:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with quiet.native_stderr_silenced():
        import tensorflow as tf

        # Device discovery (and its CUDA probe) logs on first use.
        tf.config.list_logical_devices()
    import logging
    import warnings

    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # Keras warns through `warnings` about things that do not concern a
    # conversion (legacy H5, unbuilt metrics, ...).
    warnings.filterwarnings("ignore", module=r"keras(\..*)?$")
    warnings.filterwarnings("ignore", module=r"tensorflow(\..*)?$")
    _tensorflow_ready = True


class Progress:
    """One stderr line per long step, with its elapsed time.

    Shown only when stderr is a terminal, so that piped or captured output
    holds nothing but results and errors.

    Args:
        enabled: Force on or off; defaults to whether stderr is a TTY.
    """

    def __init__(self, enabled=None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    @contextlib.contextmanager
    def step(self, label):
        if not self.enabled:
            yield
            return
        click.echo(f"{label} ...", err=True, nl=False)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            click.echo(" failed", err=True)
            raise
        click.echo(f" done ({time.perf_counter() - start:.1f} s)", err=True)


def rules_option(f):
    return click.option(
        "--rules", "rules", multiple=True, metavar="FILE",
        type=click.Path(dir_okay=False),
        help="A rule file (TOML) applied on top of the shipped rules; repeatable.",
    )(f)


def custom_objects_option(f):
    return click.option(
        "--custom-objects", "custom_objects", multiple=True, metavar="MODULE",
        help="A module (dotted name or .py file) defining the model's custom "
        "layers; imported before loading. Repeatable.",
    )(f)


def unsafe_option(f):
    return click.option(
        "--unsafe", is_flag=True,
        help="Allow loading Python code stored in the model (Lambda layers). "
        "Only for files you trust.",
    )(f)


def force_option(f):
    return click.option(
        "--force", is_flag=True, help="Overwrite existing output files."
    )(f)


def start_tensorflow():
    """Starts TensorFlow quietly, as the first progress step; returns the `Progress`."""
    progress = Progress()
    with progress.step("starting TensorFlow"):
        prepare_tensorflow()
    return progress


def check_opset(opset):
    """Refuses an --opset the exporter cannot write, before the model loads."""
    from bnconvert import onnx_export

    allowed = onnx_export.supported_opsets()
    if opset is not None and opset not in allowed:
        raise click.ClickException(
            f"The ONNX exporter (tf2onnx) cannot write opset {opset}; use one "
            f"from {allowed.start} to {allowed.stop - 1}. Received: --opset={opset}"
        )


def load_input(model_path, *, custom_objects, unsafe, progress, rules=()):
    """Imports custom objects, checks the rule files and loads the model.

    The rule files are read before the model, which can take long to load,
    so that a mistake in one is reported at once.

    Returns:
        `(model, custom_objects_dict_or_None)`.
    """
    from bnconvert import model_io

    objects = import_objects_and_check_rules(custom_objects, rules, progress)
    with progress.step(f"loading {model_path}"):
        model = model_io.load_model(
            model_path, custom_objects=objects, safe_mode=not unsafe
        )
    return model, objects


def import_objects_and_check_rules(custom_objects, rules, progress):
    """Imports the --custom-objects modules, then loads the --rules files.

    Returns:
        The custom objects dict, or `None` without --custom-objects.

    Raises:
        ModelLoadError: a module cannot be imported.
        RuleError: a rule file is wrong.
    """
    from bnconvert import model_io

    objects = None
    if custom_objects:
        with progress.step("importing custom objects"):
            objects = model_io.import_custom_objects(custom_objects)
    if rules:
        from bnconvert import rules as rules_lib

        rules_lib.load_rules(list(rules), custom_objects=objects)
    return objects


def check_distinct_outputs(*named):
    """Refuses two output options that name the same path.

    Args:
        *named: `(option, path)` pairs, such as `("--report", "r.json")`;
            pairs whose path is `None` are ignored.

    Raises:
        OutputError: two of the paths are the same file.
    """
    from bnconvert import model_io

    given = [(option, path) for option, path in named if path is not None]
    for i, (option_a, a) in enumerate(given):
        for option_b, b in given[i + 1:]:
            if model_io.same_file(a, b):
                raise OutputError(
                    f"{option_a} and {option_b} both name {b}; give each output "
                    f"its own path. Received: {option_a}={str(a)!r}"
                )


def check_file_output(path, option):
    """Refuses an existing directory where an output file is expected.

    `model_io.check_output_path` refuses it too, but suggests a `.keras`
    name; this names the option and what it writes.

    Raises:
        OutputError: `path` is a directory.
    """
    if path is not None and os.path.isdir(path):
        raise OutputError(
            f"Output {path} is a directory, but {option} writes a file; give a "
            f"file path. Received: {option}={str(path)!r}"
        )


def _tolerance(ctx, param, value):
    # Not click.FloatRange: it lets NaN through (every comparison is False).
    if value is None or (math.isfinite(value) and value >= 0):
        return value
    raise click.BadParameter(f"must be a finite number >= 0, not {value}.")


def _rules_arg(rules):
    return list(rules) if rules else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnconvert")
def main():
    """Rewrite Keras models between BatchNormalization flavours."""


@main.command("to-sync")
@click.argument("model", type=click.Path())
@click.option(
    # Not dir_okay=False: a tf-keras SavedModel output is a directory.
    "-o", "--output", type=click.Path(), default=None,
    help="Output .keras file (for a tf-keras model: a SavedModel directory, or "
    "an .h5 file). Default: NAME.sync.keras beside the input.",
)
@rules_option
@custom_objects_option
@click.option(
    "--dry-run", is_flag=True,
    help="Convert and verify, print the summary, write no model.",
)
@click.option(
    "--report", "report_path", type=click.Path(dir_okay=False), default=None,
    metavar="FILE", help="Write the full conversion report as JSON to FILE.",
)
@force_option
@unsafe_option
def to_sync(model, output, rules, custom_objects, dry_run, report_path, force, unsafe):
    """Replace BatchNormalization layers with SyncBatchNormalization.

    MODEL is a .keras or .h5 file, or a directory holding one. Weights and
    moving statistics are carried over exactly; the converted model is
    checked against the original on random inputs before it is written.
    A tf-keras model (SavedModel directory or H5 file) stays a tf-keras
    model, written in its input's format: NAME.sync or NAME.sync.h5.
    """
    from bnconvert import compat

    if compat.handles(model):  # tf-keras SavedModel dir or H5: compat/tf_keras_cli.py
        from bnconvert.compat import tf_keras_cli

        return tf_keras_cli.to_sync(
            model, output, rules, custom_objects, dry_run, report_path, force, unsafe
        )
    with user_errors():
        from bnconvert import model_io

        model_file = model_io.resolve_model_file(model)
        out = None
        if not dry_run:
            out = output or model_io.default_output_path(model, ".sync.keras")
            check_file_output(out, "--output")
            model_io.check_output_path(
                out, force=force, inputs=(model, model_file),
                suffixes=(".keras",),
            )
        check_distinct_outputs(("--output", out), ("--report", report_path))
        if report_path:
            model_io.check_output_path(
                report_path, force=force, inputs=(model, model_file)
            )

        progress = start_tensorflow()
        keras_model, objects = load_input(
            model, custom_objects=custom_objects, unsafe=unsafe, progress=progress,
            rules=rules,
        )

        from bnconvert.convert import convert_model

        with progress.step("converting and verifying"):
            converted, report = convert_model(
                keras_model, to="sync", rules=_rules_arg(rules),
                custom_objects=objects, safe_mode=not unsafe, return_report=True,
            )
        if out is not None:
            with progress.step(f"saving {out}"):
                model_io.save_model(
                    converted, out, force=force, inputs=(model, model_file)
                )
        if report_path:
            model_io.write_text(
                report_path, report.to_json(), force=force,
                inputs=(model, model_file),
            )

    # The report's table ends with the totals and the verification figure.
    click.echo(report.summary_table(max_rows=SUMMARY_ROWS))
    if out is None:
        click.echo("Dry run: no model written.")
    else:
        click.echo(f"Wrote {out}")
    if report_path:
        click.echo(f"Wrote report {report_path}")


def _keras3_sublayers(layer):
    # Keras keeps every layer's direct sublayers in `_layers` (Functional and
    # Sequential models, subclassed models and custom layers alike); the
    # converter walks the same attribute, so paths agree.
    return [c for c in getattr(layer, "_layers", []) if hasattr(c, "weights")]


def _flavour(model):
    """What the walk needs to know about `model`'s Keras.

    Returns:
        `(normalization classes, input layer class, sublayers function)`, for
        Keras 3 or, for a tf-keras model, tf-keras (whose converter's walk
        gives the sublayers, so paths agree with its report).
    """
    from bnconvert import compat

    if compat.handles(model):
        import tf_keras

        from bnconvert.compat import tf_keras_convert

        layers = tf_keras.layers
        kinds = (
            layers.BatchNormalization,
            layers.experimental.SyncBatchNormalization,  # not a BatchNormalization
            layers.LayerNormalization,
            layers.GroupNormalization,
        )
        return kinds, layers.InputLayer, tf_keras_convert.sublayers
    import keras

    layers = keras.layers
    kinds = (layers.BatchNormalization, layers.LayerNormalization, layers.GroupNormalization)
    return kinds, layers.InputLayer, _keras3_sublayers


def _normalization_layers(model):
    """Yields `(path, layer)` for every normalization layer, nested included.

    Works for Keras 3 and tf-keras models alike. Paths are layer names from
    the model itself down, joined by `/`, as in the conversion report.
    """
    kinds, input_layer, sublayers = _flavour(model)
    seen = set()

    def walk(layer, path):
        for child in sublayers(layer):
            if id(child) in seen or isinstance(child, input_layer):
                continue
            seen.add(id(child))
            here = f"{path}/{child.name}"
            if isinstance(child, kinds):
                yield here, child
            yield from walk(child, here)

    yield from walk(model, model.name)


def _layer_settings(layer):
    # tf-keras leaves `synchronized` (and `renorm` when off) out of
    # get_config(), and both Sync layers drop `synchronized`; the layer's
    # attribute of the same name says it then.
    config = layer.get_config()
    settings = {}
    for key in _NORMALIZATION_SETTINGS:
        value = config.get(key, getattr(layer, key, None))
        if value is not None:
            settings[key] = value
    axis = settings.get("axis")
    if axis is not None and not isinstance(axis, int):
        # tf-keras keeps a built layer's axes in a tracking ListWrapper.
        settings["axis"] = [int(a) for a in axis]
    settings["trainable"] = bool(layer.trainable)
    if type(layer).__name__.startswith("Sync"):
        settings["synchronized"] = True
    return settings


def _layer_shape(layer):
    shapes = {tuple(int(d) for d in w.shape) for w in layer.weights}
    if len(shapes) == 1:
        return list(shapes.pop())
    return [list(s) for s in sorted(shapes)] or None


def inspect_rows(model, report):
    """Joins the model's normalization layers with the report's events.

    Returns:
        A list of dicts, one per normalization layer (and one per event on a
        layer not found by the walk), each with `path`, `class`, `shape`,
        `settings` and `events` (what the rules would do).
    """
    events_by_path = {}
    for event in report.events:
        events_by_path.setdefault(event.path, []).append(event)
    rows = []
    for path, layer in _normalization_layers(model):
        rows.append({
            "path": path,
            "class": type(layer).__name__,
            "shape": _layer_shape(layer),
            "settings": _layer_settings(layer),
            "events": [_event_dict(e) for e in events_by_path.pop(path, [])],
        })
    for path, events in events_by_path.items():
        rows.append({
            "path": path,
            "class": events[0].class_before,
            "shape": None,
            "settings": {},
            "events": [_event_dict(e) for e in events],
        })
    return rows


def _event_dict(event):
    return {
        "path": event.path,
        "class_before": event.class_before,
        "class_after": event.class_after,
        "rule": event.rule,
        "action": event.action,
        "reason": event.reason,
    }


def _format_settings(settings):
    """`axis=-1 momentum=0.99 epsilon=0.001 center scale`: true flags by name."""
    parts = []
    for key, value in settings.items():
        if key == "trainable":
            if not value:
                parts.append("frozen")
        elif isinstance(value, bool):
            if value:
                parts.append(key)
        elif isinstance(value, float):
            parts.append(f"{key}={value:g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _format_event(event):
    if event["action"] == "applied":
        return f"{event['rule']}: -> {event['class_after']}"
    text = event["action"]
    if event["rule"]:
        text = f"{event['rule']}: {text}"
    return f"{text} ({event['reason']})" if event["reason"] else text


def _format_rows(rows):
    headers = ("path", "class", "shape", "settings", "rule")
    table = []
    for row in rows:
        shape = row["shape"]
        if shape and all(isinstance(d, int) for d in shape):
            shape = "x".join(str(d) for d in shape)
        actions = "; ".join(_format_event(e) for e in row["events"])
        table.append((
            row["path"], row["class"], str(shape or "-"),
            _format_settings(row["settings"]), actions or "no rule applies",
        ))
    widths = [
        max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(headers)
    ]
    # The last column is left unpadded so lines carry no trailing blanks.
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths)) + "  " + headers[-1]
    ]
    for r in table:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1]
        )
    return "\n".join(lines)


@main.command("inspect")
@click.argument("model", type=click.Path())
@rules_option
@custom_objects_option
@click.option(
    "--to", "target", type=click.Choice(["sync", "inference"]), default="sync",
    show_default=True, help="The conversion whose rules to preview.",
)
@unsafe_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_command(model, rules, custom_objects, target, unsafe, as_json):
    """List the normalization layers of MODEL and what the rules would do.

    Shows each layer's path, class, weight shape and key settings. Writes
    nothing.
    """
    with user_errors():
        from bnconvert import compat
        from bnconvert import model_io

        if not compat.handles(model):  # tf-keras models: compat/tf_keras_io.py
            model_io.resolve_model_file(model)
        progress = start_tensorflow()
        keras_model, objects = load_input(
            model, custom_objects=custom_objects, unsafe=unsafe, progress=progress,
            rules=rules,
        )

        from bnconvert.convert import inspect_model

        with progress.step("applying rules (dry run)"):
            report = inspect_model(
                keras_model, to=target, rules=_rules_arg(rules),
                custom_objects=objects, safe_mode=not unsafe,
            )
        rows = inspect_rows(keras_model, report)

    if as_json:
        click.echo(json.dumps(
            {"model": str(model), "to": target, "layers": rows,
             "report": report.to_dict()},
            indent=2, default=str,
        ))
        return
    if not rows:
        click.echo(f"{model}: no normalization layers.")
    else:
        click.echo(_format_rows(rows))
    n = report.converted
    click.echo(
        f"{n} layer{'' if n == 1 else 's'} would be converted (to {target})"
    )


@main.command("to-inference")
@click.argument("model", type=click.Path())
@click.option(
    "-o", "--output", type=click.Path(), default=None,
    help="Output .onnx file. Default: NAME.onnx beside the input.",
)
@click.option(
    # Not dir_okay=False: a tf-keras model is saved as a SavedModel directory.
    "--keras-out", type=click.Path(), default=None, metavar="PATH",
    help="Also save the unsynced (and folded) Keras model to PATH: a .keras "
    "file (a SavedModel directory or .h5 file for tf-keras models).",
)
@click.option("--no-fold", is_flag=True, help="Keep every BatchNormalization layer.")
@click.option(
    "--opset", type=int, default=None,
    help="ONNX opset. Default: the exporter's (tf2onnx) default.",
)
@click.option(
    "--no-check", is_flag=True, help="Do not run the ONNX model in onnxruntime."
)
@click.option(
    "--tolerance", type=float, default=1e-4, show_default=True, callback=_tolerance,
    help="Largest accepted onnxruntime-vs-Keras difference, relative to the "
    "largest output magnitude.",
)
@rules_option
@custom_objects_option
@click.option(
    "--report", "report_path", type=click.Path(dir_okay=False), default=None,
    metavar="FILE", help="Write the full report (layers and ONNX check) as JSON to FILE.",
)
@force_option
@unsafe_option
def to_inference(model, output, keras_out, no_fold, opset, no_check, tolerance,
                 rules, custom_objects, report_path, force, unsafe):
    """Unsync, fold BatchNormalization and export MODEL to ONNX.

    Synchronized BN layers become plain BatchNormalization, each BN that
    follows a Conv/Dense it can be folded into exactly is folded, and the
    result is written as ONNX (dynamic batch size) after onnxruntime has
    reproduced the Keras outputs within --tolerance. MODEL is a .keras or
    .h5 file, a directory holding one, or a tf-keras SavedModel directory.
    """
    from bnconvert import compat

    if compat.handles(model):  # tf-keras SavedModel dir or H5: compat/tf_keras_cli.py
        from bnconvert.compat import tf_keras_cli

        return tf_keras_cli.to_inference(
            model, output, keras_out, no_fold, opset, no_check, tolerance,
            rules, custom_objects, report_path, force, unsafe,
        )
    with user_errors():
        from bnconvert import model_io

        model_file = model_io.resolve_model_file(model)
        out = output or model_io.default_output_path(model, ".onnx")
        protected = (model, model_file)
        check_file_output(out, "--output")
        model_io.check_output_path(out, force=force, inputs=protected, suffixes=(".onnx",))
        check_distinct_outputs(
            ("--output", out), ("--keras-out", keras_out), ("--report", report_path)
        )
        if keras_out:
            check_file_output(keras_out, "--keras-out")
            model_io.check_output_path(
                keras_out, force=force, inputs=protected + (out,), suffixes=(".keras",)
            )
        if report_path:
            model_io.check_output_path(
                report_path, force=force, inputs=protected + (out, keras_out)
            )

        progress = start_tensorflow()
        check_opset(opset)
        from bnconvert import onnx_export

        keras_model, objects = load_input(
            model, custom_objects=custom_objects, unsafe=unsafe, progress=progress,
            rules=rules,
        )

        from bnconvert.convert import convert_model

        with progress.step("unsyncing" + ("" if no_fold else " and folding")):
            converted, report = convert_model(
                keras_model, to="inference", rules=_rules_arg(rules),
                custom_objects=objects, fold=not no_fold, safe_mode=not unsafe,
                return_report=True,
            )
        with progress.step("exporting to ONNX" + ("" if no_check else " and checking")):
            result = onnx_export.export_onnx(
                converted, out, opset=opset, tolerance=tolerance, check=not no_check
            )
        if keras_out:
            with progress.step(f"saving {keras_out}"):
                model_io.save_model(converted, keras_out, force=force, inputs=protected)
        if report_path:
            write_inference_report(report, result, report_path, force, protected + (out, keras_out))

    echo_inference_summary(report, result, out, keras_out, report_path)


def write_inference_report(report, result, path, force, protected):
    """Writes the conversion report and the ONNX check figures as JSON."""
    from bnconvert import model_io

    data = report.to_dict()
    data["onnx"] = result.to_dict()
    model_io.write_text(path, json.dumps(data, indent=2), force=force, inputs=protected)


def echo_inference_summary(report, result, out, keras_out, report_path):
    """Prints what `to-inference` did: the layer table, the check, the files."""
    click.echo(report.summary_table(max_rows=SUMMARY_ROWS))
    if result.checked:
        click.echo(
            f"onnxruntime check: max |diff| = {result.max_abs_diff:.3g}, relative "
            f"{result.max_rel_diff:.3g} (tolerance {result.tolerance:g}), opset {result.opset}"
        )
    else:
        click.echo(f"onnxruntime check skipped (--no-check), opset {result.opset}")
    click.echo(f"Wrote {out}")
    if keras_out:
        click.echo(f"Wrote {keras_out}")
    if report_path:
        click.echo(f"Wrote report {report_path}")
