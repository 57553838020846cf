"""What the `bnconvert` commands print on stdout, as lines safe for a terminal.

The console script (`bnconvert_cli.py`) parses options and runs the
pipeline; the lines it prints about the result are made here, after
TensorFlow has started. Everything taken from the model or a path has its
control characters escaped (`bnconvert.printable`).
"""

from bnconvert.printable import printable


def _written(result):
    lines = [f"Wrote {p}" for p in (result.output, result.keras_out) if p is not None]
    if result.report_path:
        lines.append(f"Wrote report {result.report_path}")
    return lines


def to_sync_lines(result, max_rows):
    """The summary of `to-sync`, then what was written."""
    lines = [result.report.summary_table(max_rows=max_rows)]
    if result.output is None:
        lines.append("Dry run: no model written.")
    return [printable(line, newlines=True) for line in lines + _written(result)]


def inspect_lines(result, model, target):
    """`inspect`'s table of layers and its closing count."""
    from bnconvert.report import format_inspect_rows

    report = result.report
    n = report.converted
    line = f"{n} layer{'' if n == 1 else 's'} would be converted (to {target})"
    if target == "inference":
        line += f"; {report.folded} would be folded, {report.count('kept')} kept"
    table = format_inspect_rows(result.rows) if result.rows else (
        f"{printable(model)}: no normalization layers."
    )
    return [table, printable(line)]


def to_inference_lines(result, max_rows):
    """The summary of `to-inference`: conversion, onnxruntime check, exporter, outputs."""
    onnx = result.onnx
    lines = [result.report.summary_table(max_rows=max_rows)]
    if onnx.checked:
        lines.append(
            f"onnxruntime check: max |diff| = {onnx.max_abs_diff:.3g}, relative "
            f"{onnx.max_rel_diff:.3g} (per element: {onnx.atol:g} * max(1, rms) + "
            f"{onnx.tolerance:g} * |Keras|), {onnx.compared}, opset {onnx.opset}"
        )
    else:
        lines.append(f"onnxruntime check skipped (--no-check), opset {onnx.opset}")
    note = f" ({onnx.exporter_note})" if onnx.exporter_note else ""
    lines.append(f"exporter: {onnx.exporter}{note}, {onnx.seconds:.1f} s")
    return [printable(line, newlines=True) for line in lines + _written(result)]
