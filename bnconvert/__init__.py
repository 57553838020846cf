"""bnconvert: rewrite Keras models between BatchNormalization flavours.

The public API lives here and nowhere else. Importing the package registers
`SyncBatchNormalization` with Keras 3 (and, when tf-keras is imported, its
tf-keras twin; see `bnconvert.compat`), and the record with which a `.keras`
file re-applies a conversion its model's config cannot hold
(`bnconvert.persist`), and does nothing more: no
environment variable, logger or file descriptor of the process is touched.
"""

from bnconvert import compat
from bnconvert import persist  # noqa: F401  (registers the conversion record of .keras files)
from bnconvert.convert import convert_model
from bnconvert.convert import inspect_model
from bnconvert.layers import SyncBatchNormalization
from bnconvert.onnx.export import export_onnx
from bnconvert.report import ConversionReport
from bnconvert.report import LayerEvent
from bnconvert.rules import load_rules

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
    "TFKerasSyncBatchNormalization",
    "__version__",
    "convert_model",
    "export_onnx",
    "inspect_model",
    "load_rules",
]
