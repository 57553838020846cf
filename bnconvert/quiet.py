"""Keeps TensorFlow's native start-up messages off the user's terminal."""

import contextlib
import os


@contextlib.contextmanager
def native_stderr_silenced():
    """Points file descriptor 2 at /dev/null for the duration.

    TensorFlow's native start-up messages go straight to the file descriptor,
    past Python's `sys.stderr`, and before absl logging is initialised they
    ignore `TF_CPP_MIN_LOG_LEVEL`. Python exceptions still surface: the
    descriptor is restored before they propagate. Does nothing when
    `TF_CPP_MIN_LOG_LEVEL` is 0, i.e. when the user asked for the logs.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        yield
        return
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
