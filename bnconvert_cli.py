"""The `bnconvert` command line: options in, one call into the pipeline, results out.

This module lives outside the `bnconvert` package on purpose: importing the
package registers its Keras layers, which imports TensorFlow (seconds), and
`bnconvert --help` or `--version` should answer at once. Commands import
bnconvert only when they run, with TensorFlow's native start-up chatter
sent to /dev/null (`bnconvert_cli_startup`): stdout carries only results,
stderr only progress and errors.
"""

import os
import signal
import sys


def _early_interrupt(signum, frame):
    sys.stderr.write("Interrupted: nothing was written.\n")
    raise SystemExit(130)


# Ctrl-C before the command runs (while Python imports click) exits like
# Ctrl-C later on; only in the console script, never when imported.
_CONSOLE_SCRIPT = os.path.basename(sys.argv[0] or "") == "bnconvert"
if _CONSOLE_SCRIPT:
    signal.signal(signal.SIGINT, _early_interrupt)

import contextlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import click  # noqa: E402

import bnconvert_cli_startup as startup  # noqa: E402

# Layers listed one by one in the summaries; --report has them all.
SUMMARY_ROWS = 30


class Progress:
    """One stderr line per long step, with its elapsed time, when stderr is a terminal."""

    def __init__(self, enabled=None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    @contextlib.contextmanager
    def step(self, label):
        if not self.enabled:
            yield
            return
        click.echo(f"{label} ...", err=True, nl=False)
        begun = time.perf_counter()
        try:
            yield
        except BaseException:
            click.echo(" failed", err=True)
            raise
        click.echo(f" done ({time.perf_counter() - begun:.1f} s)", err=True)


def _one_line(text):
    text = " ".join(str(text).split())
    # Before bnconvert is imported, nothing printed comes from a model.
    printable = sys.modules.get("bnconvert.printable")
    return printable.printable(text) if printable else text


class _Interrupts:
    """Ctrl-C (SIGINT) for the whole command: recorded, then exit 130.

    Keras swallows `KeyboardInterrupt` in places (a bare `except` while
    loading weights), so the signal is also recorded here and the pipeline
    checks it after each step and around placing the outputs: an
    interrupted run writes nothing, whatever Keras did with the exception.
    """

    received = False
    working = False  # inside the pipeline, where outputs must be undone
    placed = False  # every output is in place: Ctrl-C waits for the summary

    @classmethod
    def handler(cls, signum, frame):
        cls.received = True
        if cls.working:
            raise KeyboardInterrupt
        # Parsing options or printing results: click would turn a
        # KeyboardInterrupt into "Aborted!" and exit 1.
        raise _interrupted()

    @classmethod
    def ignore(cls):
        """From here on, Ctrl-C is ignored: what was written stands and is printed."""
        cls.placed = True
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    @classmethod
    @contextlib.contextmanager
    def recorded(cls):
        cls.received = cls.placed = False
        try:
            previous = signal.signal(signal.SIGINT, cls.handler)
        except ValueError:  # not the main thread (an embedding application)
            yield
            return
        try:
            yield
        finally:
            cls.working = False
            # A Python handler left in place would let a Ctrl-C during the
            # interpreter's exit kill the process (signal 2) after success.
            if not (cls.placed and _CONSOLE_SCRIPT):
                signal.signal(signal.SIGINT, previous)


def _interrupted():
    click.echo("Interrupted: nothing was written.", err=True)
    # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C.
    return SystemExit(130)


def _run(**fields):
    """Runs the pipeline; every error becomes one line, Ctrl-C exit 130."""
    debug = bool(click.get_current_context().find_root().params.get("debug"))
    if debug:
        warnings.simplefilter("default")
    _Interrupts.working = True
    try:
        return _run_pipeline(fields)
    except KeyboardInterrupt:
        raise _interrupted() from None
    except click.ClickException:
        raise
    except Exception as e:
        if debug:
            raise
        # A failure inside TensorFlow or Keras that no check foresaw: still
        # one line, with the way to see more.
        raise click.ClickException(_one_line(
            f"{type(e).__name__}: {e} (an unexpected failure; run with --debug "
            "for the traceback)"
        )[:2000]) from None
    finally:
        _Interrupts.working = False


def _run_pipeline(fields):
    progress = Progress()
    if fields.get("custom_objects"):
        with progress.step("importing custom objects"), startup.native_stderr_silenced():
            startup.import_user_modules(fields["custom_objects"])
    with progress.step("starting TensorFlow"):
        startup.start_tensorflow()
    from bnconvert.errors import BnconvertError
    from bnconvert.pipeline import Options
    from bnconvert.pipeline import run

    try:
        return run(Options(**fields), progress, cancelled=lambda: _Interrupts.received,
                   placed=_Interrupts.ignore)
    except BnconvertError as e:
        raise click.ClickException(_one_line(e)) from None
    except OSError as e:
        # Files that vanish or cannot be read between the checks and their use.
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise click.ClickException(_one_line(f"{e.strerror or e}{where}")) from None
    except RecursionError as e:
        raise click.ClickException(
            "An input is nested too deeply to read (a rule file or model config "
            "with hundreds of levels?); flatten it."
        ) from e


def _tolerance(ctx, param, value):
    # Not click.FloatRange: it lets NaN through (every comparison is False).
    if value is None or (math.isfinite(value) and value >= 0):
        return value
    raise click.BadParameter(f"must be a finite number >= 0, not {value}.")


def _common(f):
    """--rules, --custom-objects, --unsafe and --allow-asset-paths, which every command takes."""
    f = click.option("--allow-asset-paths", is_flag=True, help="Allow a model config naming files "
                     "to read (a vocabulary path; copied into outputs). Only for files you trust.")(f)
    f = click.option("--unsafe", is_flag=True, help="Allow loading Python code stored in the "
                     "model (Lambda layers). Only for files you trust.")(f)
    f = click.option(
        "--custom-objects", "custom_objects", multiple=True, metavar="MODULE",
        help="A module (dotted name or .py file) defining the model's custom "
        "layers; imported before loading. Repeatable.",
    )(f)
    return click.option(
        "--rules", "rules", multiple=True, metavar="FILE",
        type=click.Path(dir_okay=False),
        help="A rule file (TOML) applied on top of the shipped rules; repeatable.",
    )(f)


def _writes(f):
    """--report, --force, --allow-nonfinite and --check-input, for the commands that write."""
    f = click.option("--check-input", "check_inputs", multiple=True, metavar="FILE.npy",
                     type=click.Path(dir_okay=False), help="Verify on this batch, not a generated "
                     "one: one .npy per model input, in order (string inputs need it).")(f)
    f = click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf outputs (the check "
                     "then requires the same NaN/Inf), with a warning. Default: refuse.")(f)
    f = click.option("--force", is_flag=True, help="Overwrite existing output files.")(f)
    return click.option(
        "--report", "report_path", type=click.Path(dir_okay=False), default=None,
        metavar="FILE", help="Write the full report (every layer, rule and check) as JSON.",
    )(f)


def _version():
    try:
        return importlib.metadata.version("bnconvert")
    except importlib.metadata.PackageNotFoundError:  # a source tree, not installed
        return "unknown"


class _Main(click.Group):
    """The command group; Ctrl-C anywhere in a command ends it with exit 130."""

    def main(self, *args, **kwargs):
        with _Interrupts.recorded(), warnings.catch_warnings():
            # stderr carries our own lines only: Keras's, TensorFlow's and
            # zipfile's warnings ("Skipping invalid path") concern nobody
            # running a conversion (--debug shows them).
            warnings.simplefilter("ignore")
            return super().main(*args, **kwargs)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="bnconvert")
@click.option(
    "--debug", is_flag=True,
    help="On an unexpected failure, show the Python traceback (and warnings).",
)
def main(debug):
    """Rewrite Keras models between BatchNormalization flavours."""


@main.command("to-sync")
@click.argument("model", type=click.Path())
@click.option(
    # Not dir_okay=False: a tf-keras SavedModel output is a directory.
    "-o", "--output", type=click.Path(), default=None,
    help="Output .keras file (for a tf-keras model: a SavedModel directory, or "
    "an .h5 file). Default: NAME.sync.keras beside the input.",
)
@click.option("--dry-run", is_flag=True, help="Convert and verify, print the summary, write no model.")
@click.option(
    "--sync-group-size", type=click.IntRange(min=1), default=None, metavar="K",
    help="Synchronize BN statistics within groups of K consecutive replicas "
    "instead of all of them (the layers' sync_group_size).",
)
@_writes
@_common
def to_sync(**options):
    """Replace BatchNormalization layers with SyncBatchNormalization.

    MODEL is a .keras or .h5 file, or a directory holding one. Weights and
    moving statistics are carried over exactly; the converted model is
    checked against the original on random inputs before it is written.
    A tf-keras model (SavedModel directory or H5 file) stays a tf-keras
    model, written in its input's format: NAME.sync or NAME.sync.h5.
    """
    result = _run(command="to-sync", **_tuples(options))
    from bnconvert import console  # TensorFlow has started

    click.echo("\n".join(console.to_sync_lines(result, SUMMARY_ROWS)))


@main.command("inspect")
@click.argument("model", type=click.Path())
@click.option(
    "--to", "target", type=click.Choice(["sync", "inference"]), default="sync",
    show_default=True, help="The conversion whose rules to preview.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_common
def inspect_command(as_json, **options):
    """List the normalization layers of MODEL and what the rules would do.

    Shows each layer's path, class, weight shape and key settings. Writes
    nothing.
    """
    result = _run(command="inspect", **_tuples(options))
    model, target = options["model"], options["target"]
    if as_json:
        click.echo(json.dumps(
            {"model": str(model), "to": target, "layers": result.rows,
             "report": result.report.to_dict()},
            indent=2, default=str,
        ))
        return
    from bnconvert import console

    click.echo("\n".join(console.inspect_lines(result, model, target)))


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
@click.option("--exporter", type=click.Choice(["auto", "native", "tf2onnx"]), default="auto",
              show_default=True, help="native: Keras layers straight to ONNX; tf2onnx: "
              "through the TensorFlow graph; auto: native, else tf2onnx (said why).")
@click.option("--opset", type=int, default=None, help="ONNX opset. Default: the exporter's (native: 17).")
@click.option("--precision", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Float type of the ONNX graph (float16: native only).")
@click.option("--no-check", is_flag=True, help="Do not run the ONNX model in onnxruntime.")
@click.option("--tolerance", type=float, default=None, callback=_tolerance, help="rtol of the "
              "onnxruntime-vs-Keras check: each element may differ by ATOL * max(1, rms of its "
              "output) + TOLERANCE * |Keras value|. Default: 1e-4; 8 epsilons of float16/bfloat16 "
              "for mixed precision or a float16 graph.")
@click.option("--atol", type=float, default=None, callback=_tolerance,
              help="atol of that check. Default: 1e-5; as --tolerance for lower precisions.")
@_writes
@_common
def to_inference(no_fold, no_check, **options):
    """Unsync, fold BatchNormalization and export MODEL to ONNX.

    Synchronized BN layers become plain BatchNormalization, each BN that
    follows a Conv/Dense it can be folded into exactly is folded, and the
    result is written as ONNX (dynamic batch size) after onnxruntime has
    reproduced the Keras outputs within --tolerance. MODEL is a .keras or
    .h5 file, a directory holding one, or a tf-keras SavedModel directory.
    """
    result = _run(command="to-inference", fold=not no_fold, check=not no_check, **_tuples(options))
    from bnconvert import console  # TensorFlow has started

    click.echo("\n".join(console.to_inference_lines(result, SUMMARY_ROWS)))


def _tuples(options):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


if __name__ == "__main__":  # pragma: no cover
    main()
