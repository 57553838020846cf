"""The `to-sync` and `to-inference` commands for tf-keras models.

`bnconvert.cli` hands a MODEL over to these functions when
`bnconvert.compat.handles(MODEL)`: a SavedModel directory with Keras
metadata, or an H5 file written by tf-keras. They take the commands' own
arguments and use the CLI's helpers; only loading, the output format and
saving differ: the result is written in the input's format (a SavedModel
directory, atomically renamed into place, or an H5 file) unless `-o` names
the other one. (`inspect` needs nothing of its own: `model_io.load_model`
and the CLI's layer walk handle both flavours.)
"""


import click

from bnconvert import cli
from bnconvert import quiet
from bnconvert.compat import tf_keras_io


def _load(model, custom_objects, unsafe, progress, rules):
    objects = cli.import_objects_and_check_rules(custom_objects, rules, progress)
    with progress.step(f"loading {model} (tf-keras)"):
        keras_model = tf_keras_io.load_model(
            model, custom_objects=objects, safe_mode=not unsafe
        )
    return keras_model, objects


def to_sync(model, output, rules, custom_objects, dry_run, report_path, force, unsafe):
    """`bnconvert to-sync` for a tf-keras MODEL."""
    from bnconvert import model_io

    with cli.user_errors():
        source_format = tf_keras_io.tf_keras_format(model)
        out = fmt = None
        if not dry_run:
            out = output or tf_keras_io.default_output_path(model, ".sync")
            fmt = tf_keras_io.output_format(out) if output else source_format
            tf_keras_io.check_output(out, fmt, force=force, inputs=(model,))
        cli.check_distinct_outputs(("--output", out), ("--report", report_path))
        if report_path:
            model_io.check_output_path(report_path, force=force, inputs=(model,))

        progress = cli.start_tensorflow()
        keras_model, objects = _load(model, custom_objects, unsafe, progress, rules)

        from bnconvert.compat import tf_keras_convert

        with progress.step("converting and verifying"):
            converted, report = tf_keras_convert.convert_model(
                keras_model, to="sync", rules=list(rules) if rules else None,
                custom_objects=objects, safe_mode=not unsafe, return_report=True,
            )
        report.source = str(model)
        if out is not None:
            with progress.step(f"saving {out}"):
                with quiet.native_stderr_silenced():
                    tf_keras_io.save_model(
                        converted, out, fmt, force=force, inputs=(model,)
                    )
        if report_path:
            model_io.write_text(
                report_path, report.to_json(), force=force, inputs=(model,)
            )

    click.echo(report.summary_table(max_rows=cli.SUMMARY_ROWS))
    if out is None:
        click.echo("Dry run: no model written.")
    else:
        click.echo(f"Wrote {out}")
    if report_path:
        click.echo(f"Wrote report {report_path}")


def to_inference(model, output, keras_out, no_fold, opset, no_check, tolerance,
                 rules, custom_objects, report_path, force, unsafe):
    """`bnconvert to-inference` for a tf-keras MODEL."""
    from bnconvert import model_io

    with cli.user_errors():
        out = output or model_io.default_output_path(model, ".onnx")
        protected = (model,)
        cli.check_file_output(out, "--output")
        model_io.check_output_path(out, force=force, inputs=protected, suffixes=(".onnx",))
        cli.check_distinct_outputs(
            ("--output", out), ("--keras-out", keras_out), ("--report", report_path)
        )
        keras_fmt = None
        if keras_out:
            keras_fmt = tf_keras_io.output_format(keras_out)
            tf_keras_io.check_output(
                keras_out, keras_fmt, force=force, inputs=protected + (out,)
            )
        if report_path:
            model_io.check_output_path(
                report_path, force=force, inputs=protected + (out, keras_out)
            )

        progress = cli.start_tensorflow()
        cli.check_opset(opset)
        from bnconvert import onnx_export

        keras_model, objects = _load(model, custom_objects, unsafe, progress, rules)

        from bnconvert.compat import tf_keras_convert

        with progress.step("unsyncing"):
            converted, report = tf_keras_convert.convert_model(
                keras_model, to="inference", rules=list(rules) if rules else None,
                custom_objects=objects, fold=not no_fold, safe_mode=not unsafe,
                return_report=True,
            )
        report.source = str(model)
        with progress.step("exporting to ONNX" + ("" if no_check else " and checking")):
            result = onnx_export.export_onnx(
                converted, out, opset=opset, tolerance=tolerance, check=not no_check
            )
        if keras_out:
            with progress.step(f"saving {keras_out}"):
                with quiet.native_stderr_silenced():
                    tf_keras_io.save_model(
                        converted, keras_out, keras_fmt, force=force, inputs=protected
                    )
        if report_path:
            cli.write_inference_report(
                report, result, report_path, force, protected + (out, keras_out)
            )

    cli.echo_inference_summary(report, result, out, keras_out, report_path)
