"""The two exporters' attempts, each checked, and the fallback between them.

`native` runs the native walk (`bnconvert.onnx.walk`) and the onnxruntime
gate (or, unchecked, the ONNX checker); any failure on the way, an emitter's exception
included, becomes `NativeFailed` with a one-line reason, so that `auto` can
fall back and say why. `with_tf2onnx` runs tf2onnx and the gate; when it
fails after native did, its one-line error gives both reasons:
`native: <why>; tf2onnx: <why>`.
"""

import contextlib
import io
import logging
import threading
import time

import onnx
import onnx.checker

from bnconvert.errors import BnconvertError
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line
from bnconvert.errors import OutputError
from bnconvert.errors import VerificationError

NATIVE, TF2ONNX = "native", "tf2onnx"
FLOAT32, FLOAT16 = "float32", "float16"


class Writer:
    """Writes bytes to a file in a thread; `finish` waits and re-raises its error."""

    def __init__(self, path, data):
        self.error = None
        self.thread = threading.Thread(target=self._write, args=(path, data), daemon=True)
        self.thread.start()

    def _write(self, path, data):
        try:
            path.write_bytes(data)
        except OSError as e:
            self.error = e

    def finish(self):
        self.thread.join()
        if self.error is not None:
            raise self.error


class NativeFailed(Exception):
    def __init__(self, reason, error):
        super().__init__(reason)
        self.reason = reason
        self.error = error


def native(model, input_names, output_names, opset, checked, precision, validate):
    """The native export, serialized and checked: `(data, diffs, exporter, note, seconds, opset)`.

    Every failure becomes `NativeFailed`, with a one-line reason for the
    fallback and the error `exporter="native"` raises. `validate` runs the
    ONNX checker, for exports that onnxruntime does not load (no check):
    onnxruntime validates what it loads, and the checker would add a third
    of a second to ResNet50's export.
    """
    from bnconvert import flavour as flavour_lib
    from bnconvert.onnx import walk
    from bnconvert.onnx.graph import Uncovered
    from bnconvert.onnx.graph import describe

    def failed(reason, error=None):
        return NativeFailed(reason, error or ConversionError(
            f"The native ONNX exporter {reason} on model '{model.name}'; "
            "use the tf2onnx (or auto) exporter."
        ))

    start = time.perf_counter()
    try:
        with quiet_tensorflow():
            data = walk.emit(
                model, flavour_lib.flavour_of(model), input_names, output_names, opset,
                precision, serialized=True,
            )
    except Uncovered as e:
        raise failed(f"does not cover {describe(e.layers)}") from None
    except Exception as e:  # noqa: BLE001 - an emitter bug must not end the run
        raise failed(f"failed while writing the graph ({_error_line(e)})") from None
    seconds = time.perf_counter() - start
    try:
        if validate:
            onnx.checker.check_model(data)
    except Exception as e:  # noqa: BLE001 - the checker raises several kinds
        raise failed(f"wrote an invalid graph ({_error_line(e)})") from None
    try:
        diffs = checked(data, NATIVE)
    except VerificationError as e:
        raise failed(f"wrote a graph that failed the check ({first_line(e, 160)})", e) from None
    except OutputError:
        raise
    except ConversionError as e:  # onnxruntime cannot load or run it: e says which
        raise failed(f"wrote a graph onnxruntime rejects ({first_line(e, 200)})", e) from None
    return data, diffs, NATIVE, "", seconds, opset or walk.DEFAULT_OPSET


def _error_line(error):
    return f"{type(error).__name__}: {first_line(error, 160)}"


def with_tf2onnx(model, input_names, output_names, opset, checked, why, precision):
    """The tf2onnx export, checked; its failure names native's reason too when given."""
    from bnconvert.onnx import tf2onnx

    try:
        if precision != FLOAT32:
            raise ConversionError(f"it does not write precision {precision}")
        start = time.perf_counter()
        with quiet_tensorflow():
            proto, how = tf2onnx.convert(model, input_names, output_names, opset)
        data = proto.SerializeToString()
        seconds = time.perf_counter() - start
        diffs = checked(data, TF2ONNX)
    except OutputError:
        raise
    except Exception as e:  # noqa: BLE001 - tf2onnx raises many kinds
        if not why:
            if isinstance(e, BnconvertError):
                raise
            raise ConversionError(
                f"The ONNX exporter tf2onnx failed on model '{model.name}': {_error_line(e)}"
            ) from None
        kind = type(e) if isinstance(e, BnconvertError) else ConversionError
        reason = first_line(e, 300) if isinstance(e, BnconvertError) else _error_line(e)
        raise kind(f"Cannot export model '{model.name}' to ONNX. native: {why}; "
                   f"tf2onnx: {reason}") from None
    note = f"{why}; {how}" if why else how
    return data, diffs, TF2ONNX, note, seconds, proto_opset(proto)


@contextlib.contextmanager
def quiet_tensorflow():
    """Keeps exporter chatter (tf2onnx progress, TensorFlow retracing notices) off stderr.

    The user's stderr carries bnconvert's own lines only.
    """
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def proto_opset(proto):
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None
