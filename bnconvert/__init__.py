"""bnconvert: rewrite Keras models between BatchNormalization flavours.

The public API lives here and nowhere else.
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's native start-up lines bypass TF_CPP_MIN_LOG_LEVEL.
from bnconvert.quiet import native_stderr_silenced as _quiet  # noqa: E402

with _quiet():
    from bnconvert.layers import SyncBatchNormalization  # noqa: E402
    from bnconvert.onnx_export import export_onnx  # noqa: E402
    from bnconvert.convert import convert_model, inspect_model  # noqa: E402
    from bnconvert.report import ConversionReport, LayerEvent  # noqa: E402
    from bnconvert.rules import load_rules  # noqa: E402
    # The tf-keras flavour: registered with tf-keras when tf_keras is imported.
    from bnconvert import compat  # noqa: E402

compat.install_registration_hook()

__version__ = "0.1.0"


def __getattr__(name):
    # The tf-keras flavour imports tf_keras (half a second): only on request.
    if name == "TFKerasSyncBatchNormalization":
        return compat.SyncBatchNormalization
    raise AttributeError(f"module 'bnconvert' has no attribute {name!r}")


__all__ = [
    "ConversionReport",
    "LayerEvent",
    "SyncBatchNormalization",
    "__version__",
    "TFKerasSyncBatchNormalization",
    "convert_model",
    "export_onnx",
    "inspect_model",
    "load_rules",
]
