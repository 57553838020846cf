"""Keras 3 or tf-keras: the one place that asks which Keras a model is.

Keras 3 and tf-keras (Keras 2) differ in a few things only: their layer
classes, how a graph is cloned, how a layer's config reads, how files are
loaded and saved, and what the safe-mode scope is called. A `Flavour`
holds exactly those differences; everything else in bnconvert (the walk,
the rules, folding, verification, the report, the paths, the CLI) is
written once against this interface. `flavour_of(model_or_path)` is the
only function that decides which flavour applies; nothing else branches
on it.
"""

import os
import sys

from bnconvert.flavour_api import KERAS3
from bnconvert.flavour_api import TF_KERAS
from bnconvert.flavour_api import Flavour  # noqa: F401  (the interface, for readers)

_INSTANCES = {}


def get(name):
    """The flavour called `name` (`"keras3"` or `"tf_keras"`), created once."""
    if name not in _INSTANCES:
        if name == KERAS3:
            from bnconvert._keras3 import Keras3Flavour as cls
        elif name == TF_KERAS:
            from bnconvert._tf_keras import TFKerasFlavour as cls
        else:
            raise ValueError(f"Unknown Keras flavour. Received: name={name!r}")
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def flavour_of(model_or_path):
    """The flavour of a model object, or of the model file or directory at a path.

    A path is judged by its files alone (see `bnconvert.formats.detect`),
    without importing TensorFlow; anything that is not recognisably a
    tf-keras file is treated as Keras 3, whose loader explains what is
    wrong with it. A model object is a tf-keras model only if `tf_keras`
    is already imported and the model is a `tf_keras.Model`.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        from bnconvert import formats

        return get(formats.flavour_name(model_or_path))
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(model_or_path, tf_keras.layers.Layer):
        return get(TF_KERAS)
    return get(KERAS3)
