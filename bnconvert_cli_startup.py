"""How the `bnconvert` command's process starts: user modules, then TensorFlow, quietly.

Beside `bnconvert_cli.py` and outside the `bnconvert` package for the same
reason: importing the package imports TensorFlow. The command imports the
`--custom-objects` modules first (`import_user_modules`), then TensorFlow and
bnconvert (`start_tensorflow`), with TensorFlow's native start-up chatter sent
to /dev/null (`native_stderr_silenced`): stdout carries only results, stderr
only progress and errors. Benchmarks start their process the same way.
"""

import contextlib
import os
import sys


@contextlib.contextmanager
def native_stderr_silenced():
    """Points file descriptor 2 at /dev/null while TensorFlow starts.

    TensorFlow's native start-up messages go straight to the descriptor and,
    before absl logging is initialised, ignore `TF_CPP_MIN_LOG_LEVEL`.
    Python exceptions still surface: the descriptor is restored before they
    propagate. Nothing is silenced when `TF_CPP_MIN_LOG_LEVEL` is 0.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def start_tensorflow():
    """Imports TensorFlow, Keras and bnconvert quietly (the CLI's process only)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with native_stderr_silenced():
        import tensorflow as tf

        # Device discovery (and its CUDA probe) logs on first use.
        tf.config.list_logical_devices()
        import bnconvert  # noqa: F401  (registers the layers)
    import logging
    import warnings

    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # Keras warns about things that do not concern a conversion (legacy
    # H5, unbuilt metrics, ...).
    for module in ("keras", "tf_keras", "tensorflow"):
        warnings.filterwarnings("ignore", module=rf"{module}(\..*)?$")



def import_user_modules(names):
    """Imports the --custom-objects modules before TensorFlow starts.

    A model zoo may configure TensorFlow when imported (`TF_USE_LEGACY_KERAS`,
    registering its layers with tf-keras); that must happen first. A module
    that fails here is imported again by the pipeline, which reports the
    failure in one line (bnconvert.custom_objects).
    """
    import importlib.util

    for name in names:
        try:
            if name.endswith(".py") or os.sep in name:
                path = os.path.abspath(name)
                if not os.path.isfile(path):  # a pipe would block; reported later
                    continue
                # The name bnconvert.custom_objects.module_name_for_file gives.
                module_name = "_bnconvert_custom_" + os.path.splitext(os.path.basename(path))[0]
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            else:
                sys.path.append(os.getcwd())
                try:
                    importlib.import_module(name)
                finally:
                    sys.path.pop()
        except Exception:  # noqa: BLE001 - reported by the pipeline
            sys.modules.pop(locals().get("module_name", ""), None)
