"""Recording a conversion in a `.keras` file so that loading it re-applies it.

A `.keras` file stores a model as its config: Keras re-creates the model
from it and then loads the weights. For most models the config names each
layer's class, so a converted layer comes back converted. Not always: a
keras-hub backbone's config is its constructor's arguments, and a custom
layer that creates its BatchNormalization in `__init__` creates it again on
load; either way plain BN comes back, and the file would silently undo the
conversion.

For such models the written file's `config.json` wraps the model's own
config in a `bnconvert>ConvertedModel` record that also lists, by layer
path, the serialized layers the conversion put in place. Loading the file
(after `import bnconvert`, which loading our layer needs anyway) re-creates
the model from its own config, as Keras would, then rewrites exactly the
recorded layers in place, so the weights Keras loads next fit them. The
object returned is the model's own class. Only normalization layers and
Keras's own code-free layers can be recorded (see `_recordable`).
"""

import json
import os
import shutil
import zipfile

import keras

from bnconvert import keras_internals as internals
from bnconvert import walk

_CONFIG = "config.json"


@keras.saving.register_keras_serializable(package="bnconvert")
class ConvertedModel:
    """The config record of a model whose conversion its own config cannot hold.

    Never instantiated: `from_config` returns the model itself.
    """

    def get_config(self):  # pragma: no cover - the record is written by `record()`
        return {}

    @classmethod
    def from_config(cls, config):
        """Re-creates the model from its own config, then re-applies the recorded layers."""
        model = keras.saving.deserialize_keras_object(config["model"])
        layers = {at: layer for _, at, layer in walk.iter_positions(model, _Keras3Walk)}
        for entry in config["layers"]:
            path = entry["path"]
            if entry["position"] not in layers:
                raise ValueError(
                    f"The conversion record names layer '{path}', which the model "
                    "does not have; the file was changed after bnconvert wrote it."
                )
            new = keras.saving.deserialize_keras_object(entry["layer"])
            if not _recordable(new):
                raise ValueError(
                    f"The conversion record puts a {type(new).__name__} at '{path}'; "
                    "only normalization layers and Keras's own code-free layers may "
                    "be recorded."
                )
            internals.become(layers[entry["position"]], new)
        return model


def _recordable(layer):
    """Normalization layers (bnconvert's included) and Keras's built-in layers but Lambda.

    A conversion rewrites normalization layers and, when folding, the
    Conv/Dense before them and the identity a folded BN becomes; none of
    them carries code, so a file cannot use a record to run any.
    """
    if isinstance(layer, keras.layers.BatchNormalization):
        return True
    builtin = type(layer).__module__.startswith("keras.src.layers.")
    return builtin and not isinstance(layer, keras.layers.Lambda)


class _Keras3Walk:
    """The sublayer view `walk.iter_layers` needs, without importing the flavours."""

    InputLayer = keras.layers.InputLayer

    @staticmethod
    def sublayers(layer):
        return internals.direct_sublayers(layer, keras.layers.Layer)


def wrap_config(config, model, positions):
    """A model's serialized config wrapped with the record of the layers at `positions`.

    Args:
        config: `keras.saving.serialize_keras_object(model)`, or a `.keras`
            file's `config.json`.
        model: The converted model.
        positions: Positions (see `walk.iter_positions`) of the layers that
            the model's own config does not bring back.
    """
    wanted = set(positions)
    entries = [
        {"path": path, "position": at, "layer": keras.saving.serialize_keras_object(layer)}
        for path, at, layer in walk.iter_positions(model, _Keras3Walk)
        if at in wanted
    ]
    config = dict(config)
    # Compiling belongs to the outer record, so that `compile=False` still
    # means no compiling.
    compile_config = config.pop("compile_config", None)
    return {
        "module": ConvertedModel.__module__,
        "class_name": "ConvertedModel",
        "registered_name": keras.saving.get_registered_name(ConvertedModel),
        "config": {"model": config, "layers": entries},
        "compile_config": compile_config,
    }


def record(archive, model, positions):
    """Rewrites the `.keras` file `archive` so that loading it re-applies some layers.

    Args:
        archive: A `.keras` file written from `model` (rewritten in place,
            through a temporary file beside it).
        model: The converted model the file was written from.
        positions: Positions (see `walk.iter_positions`) of the layers that
            the file's own config does not bring back.
    """
    if not positions:
        return
    rewritten = f"{archive}.record"
    try:
        with zipfile.ZipFile(archive) as source, zipfile.ZipFile(rewritten, "w") as target:
            for info in source.infolist():
                if info.filename == _CONFIG:
                    config = json.loads(source.read(info))
                    target.writestr(info, json.dumps(wrap_config(config, model, positions)))
                else:
                    with source.open(info) as src, target.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(rewritten, archive)
    finally:
        if os.path.exists(rewritten):
            os.unlink(rewritten)
