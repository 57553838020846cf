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
import os
import sys
import time

import click

from bnconvert.errors import BnconvertError

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


@contextlib.contextmanager
def _stderr_fd_silenced():
    """Points file descriptor 2 at /dev/null for the duration.

    TensorFlow's native start-up messages are written straight to the file
    descriptor, past Python's `sys.stderr`.
    """
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def prepare_tensorflow():
    """Imports TensorFlow and Keras quietly; call before loading a model."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" not in sys.modules:
        with _stderr_fd_silenced():
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
    import bnconvert  # noqa: F401  (registers SyncBatchNormalization)


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
        help="A rule file (TOML) to use instead of the shipped rules; repeatable.",
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


def load_input(model_path, *, custom_objects, unsafe, progress):
    """Imports custom objects and loads the input model, with progress.

    Returns:
        `(model, custom_objects_dict_or_None)`.
    """
    from bnconvert import model_io

    objects = None
    if custom_objects:
        with progress.step("importing custom objects"):
            objects = model_io.import_custom_objects(custom_objects)
    with progress.step(f"loading {model_path}"):
        model = model_io.load_model(
            model_path, custom_objects=objects, safe_mode=not unsafe
        )
    return model, objects


def _rules_arg(rules):
    return list(rules) if rules else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnconvert")
def main():
    """Rewrite Keras models between BatchNormalization flavours."""


@main.command("to-sync")
@click.argument("model", type=click.Path())
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default=None,
    help="Output .keras file. Default: NAME.sync.keras beside the input.",
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
    """
    with user_errors():
        from bnconvert import model_io

        model_file = model_io.resolve_model_file(model)
        out = None
        if not dry_run:
            out = output or model_io.default_output_path(model, ".sync.keras")
            model_io.check_output_path(
                out, force=force, inputs=(model, model_file),
                suffixes=(".keras",),
            )
        if report_path:
            model_io.check_output_path(
                report_path, force=force, inputs=(model, model_file, out)
            )

        progress = Progress()
        with progress.step("starting TensorFlow"):
            prepare_tensorflow()
        keras_model, objects = load_input(
            model, custom_objects=custom_objects, unsafe=unsafe, progress=progress
        )

        import bnconvert

        with progress.step("converting and verifying"):
            converted, report = bnconvert.convert_model(
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
                inputs=(model, model_file, out),
            )

    click.echo(report.summary_table())
    n = report.converted
    click.echo(f"{n} layer{'' if n == 1 else 's'} converted")
    verification = format_verification(report.verification)
    if verification:
        click.echo(verification)
    if out is None:
        click.echo("Dry run: no model written.")
    else:
        click.echo(f"Wrote {out}")
    if report_path:
        click.echo(f"Wrote report {report_path}")


def format_verification(verification):
    """One line describing the verification result, or "" if there is none."""
    if not verification:
        return ""
    if not isinstance(verification, dict):
        return f"verification: {verification}"
    parts = []
    for key, value in verification.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        elif isinstance(value, (list, tuple, dict)):
            continue
        parts.append(f"{key}={value}")
    return "verification: " + ", ".join(parts)


def _normalization_layers(model):
    """Yields `(path, layer)` for every normalization layer, nested included."""
    import keras

    kinds = (
        keras.layers.BatchNormalization,
        keras.layers.LayerNormalization,
        keras.layers.GroupNormalization,
    )
    seen = set()

    def walk(container, prefix):
        for layer in container.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            path = f"{prefix}{layer.name}"
            if isinstance(layer, kinds):
                yield path, layer
            if hasattr(layer, "layers") and isinstance(layer, keras.Model):
                yield from walk(layer, f"{path}/")

    yield from walk(model, "")


def _layer_settings(layer):
    config = layer.get_config()
    settings = {k: config[k] for k in _NORMALIZATION_SETTINGS if k in config}
    settings["trainable"] = bool(layer.trainable)
    if "synchronized" not in settings and type(layer).__name__.startswith("Sync"):
        settings["synchronized"] = True
    return settings


def _layer_shape(layer):
    shapes = {tuple(int(d) for d in w.shape) for w in layer.weights}
    if len(shapes) == 1:
        return list(shapes.pop())
    return [list(s) for s in sorted(shapes)] or None


def _event_key(path):
    return path.strip("/").split("/")[-1]


def inspect_rows(model, report):
    """Joins the model's normalization layers with the report's events.

    Returns:
        A list of dicts, one per normalization layer, each with `path`,
        `class`, `shape`, `settings` and `events` (what the rules would do).
    """
    events_by_path = {}
    for event in report.events:
        events_by_path.setdefault(event.path, []).append(event)
    rows = []
    matched = set()
    for path, layer in _normalization_layers(model):
        events = events_by_path.get(path)
        if events is None:
            # Fall back on the layer name when the report spells nested
            # paths differently.
            events = [
                e for e in report.events
                if _event_key(e.path) == layer.name and e.path not in matched
            ]
        matched.update(e.path for e in events)
        rows.append({
            "path": path,
            "class": type(layer).__name__,
            "shape": _layer_shape(layer),
            "settings": _layer_settings(layer),
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


def _format_value(value):
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _format_rows(rows):
    headers = ("path", "class", "shape", "settings", "rule: action")
    table = []
    for row in rows:
        settings = " ".join(
            f"{k}={_format_value(v)}" for k, v in row["settings"].items()
        )
        shape = "x".join(str(d) for d in row["shape"]) if row["shape"] and all(
            isinstance(d, int) for d in row["shape"]
        ) else str(row["shape"])
        actions = "; ".join(
            f"{e['rule'] or '-'}: {e['action']}"
            + (f" -> {e['class_after']}" if e["class_after"]
               and e["class_after"] != e["class_before"] else "")
            + (f" ({e['reason']})" if e["reason"] else "")
            for e in row["events"]
        ) or "no rule applies"
        table.append((row["path"], row["class"], shape, settings, actions))
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
        from bnconvert import model_io

        model_io.resolve_model_file(model)
        progress = Progress()
        with progress.step("starting TensorFlow"):
            prepare_tensorflow()
        keras_model, objects = load_input(
            model, custom_objects=custom_objects, unsafe=unsafe, progress=progress
        )

        import bnconvert

        with progress.step("applying rules (dry run)"):
            report = bnconvert.inspect_model(
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
