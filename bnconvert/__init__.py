"""bnconvert: rewrite Keras models between BatchNormalization flavours.

The public API lives here and nowhere else.
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bnconvert.layers import SyncBatchNormalization  # noqa: E402

__version__ = "0.1.0"

__all__ = ["SyncBatchNormalization", "__version__"]
