"""The tf-keras (Keras 2) flavour: its classes, graph cloning, building, files.

tf-keras's deprecated `layers.experimental.SyncBatchNormalization` is
`BatchNormalization(synchronized=True)` under another name but not a
subclass of it, so it is listed among the BN classes and matched by every
rule that names `BatchNormalization`. tf-keras leaves `synchronized` out
of `get_config()`; rule conditions see it added back from the layer.

What tf-keras cannot do here, and why:

- Custom layers and subclassed models that hold normalization layers are
  not rewritten: tf-keras tracks sublayers through attribute assignment
  with no public or private way to swap one in place, so the copy could
  not be made to hold the converted sublayer.
- A folded BN becomes a linear `Activation` of the same name (Keras 3:
  an `Identity`).
"""

import os
import tempfile
import warnings

import tf_keras

from bnconvert import flavour_api as flavour
from bnconvert import formats
from bnconvert import keras_internals as internals
from bnconvert.compat.tf_keras_layers import SyncBatchNormalization
from bnconvert.errors import ModelLoadError

_LEGACY_SYNC_BN = tf_keras.layers.experimental.SyncBatchNormalization


class TFKerasFlavour(flavour.Flavour):
    """tf-keras, the `tf_keras` package (`tf.keras` of TensorFlow <= 2.15)."""

    name = flavour.TF_KERAS
    label = "tf-keras"
    keras = tf_keras
    # tf-keras keeps the old slope; Keras 3 uses relu6(x + 3) / 6.
    hard_sigmoid = (0.2, 0.5)
    BatchNormalization = tf_keras.layers.BatchNormalization
    SyncBatchNormalization = SyncBatchNormalization
    InputLayer = tf_keras.layers.InputLayer
    Layer = tf_keras.layers.Layer
    Model = tf_keras.Model
    Sequential = tf_keras.Sequential
    Functional = internals.tf_keras_functional_class()
    Lambda = tf_keras.layers.Lambda
    bn_classes = (tf_keras.layers.BatchNormalization, _LEGACY_SYNC_BN)
    containers = (
        "tf-keras custom layers and subclassed models cannot have a sublayer "
        "swapped; rebuild it as a Functional model, or port it to Keras 3"
    )

    def sublayers(self, layer):
        if isinstance(layer, tf_keras.Model):
            return list(layer.layers)
        return [m for m in layer.submodules if isinstance(m, tf_keras.layers.Layer)]

    def match_aliases(self, classes):
        """Classes a rule naming `classes` matches too (the legacy SyncBN)."""
        if tf_keras.layers.BatchNormalization in classes:
            return (_LEGACY_SYNC_BN,)
        return ()

    def config_of(self, layer):
        config = layer.get_config()
        if isinstance(layer, self.bn_classes):
            config.setdefault("synchronized", bool(getattr(layer, "synchronized", False)))
        return config

    def target_config(self, layer, config, target):
        if getattr(layer, "fused", None) is False and issubclass(target, self.bn_classes):
            # tf-keras synchronized BN never fuses, and `fused` is not in its
            # config: the target must run the same (non-fused) kernels.
            config = dict(config, fused=False)
        return config

    def safe_mode_scope(self, safe_mode):
        return internals.tf_keras_safe_mode_scope(safe_mode)

    def fresh_copy(self, model, custom_objects=None):
        with tempfile.TemporaryDirectory(prefix="bnconvert-copy-") as tmp:
            path = os.path.join(tmp, "copy.h5")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save(path, save_format="h5")
                with self.custom_object_scope(custom_objects), self.safe_mode_scope(False):
                    # The model is already in this process (see Keras 3's twin).
                    copy = tf_keras.models.load_model(path, compile=False)
        # tf-keras leaves these BN settings out of get_config(); the copy
        # takes them from the original, layer by layer.
        from bnconvert import walk

        pairs = zip(walk.iter_layers(model, self), walk.iter_layers(copy, self))
        for (path_a, a), (path_b, b) in pairs:
            if path_a == path_b and isinstance(a, self.bn_classes) and type(a) is type(b):
                for name in ("synchronized", "fused"):
                    if hasattr(a, name):
                        setattr(b, name, getattr(a, name))
        return copy

    def identity_like(self, layer):
        # A linear Activation: tf-keras's `Identity` has no place in its
        # H5 and SavedModel loaders' layer tables in every version.
        identity = tf_keras.layers.Activation(
            "linear", name=layer.name, dtype=layer.dtype_policy.name
        )
        identity.build(layer.get_build_config()["input_shape"])
        return identity

    def build_like(self, original, new, source_of=None):
        if not original.built or new.built:
            return {}
        build_config = original.get_build_config()
        if not build_config or build_config.get("input_shape") is None:
            if original.weights:
                raise ValueError("the layer was built but records no input shape")
            return {}
        with tf_keras.backend.name_scope(new.name):
            new.build_from_config(build_config)
        return {}

    def load(self, path, fmt, custom_objects=None, safe_mode=True):
        revived_class = internals.tf_keras_revived_layer_class()
        with self.custom_object_scope(custom_objects), self.safe_mode_scope(safe_mode):
            model = tf_keras.models.load_model(str(path), compile=False)
        if isinstance(model, tf_keras.Model):
            for layer in [model, *model.submodules]:
                if isinstance(layer, revived_class):
                    # tf-keras stands in a generic layer that runs the saved
                    # graph but has no config: a rewrite would compute
                    # something else.
                    raise ModelLoadError(
                        f"{path} is a tf-keras model with a custom class tf-keras "
                        f"cannot find ('{type(layer).__name__.split('>')[-1]}'); pass "
                        "the module that defines it with --custom-objects MODULE "
                        "(custom_objects= in Python)."
                    )
        return model

    def save(self, model, path, fmt):
        model.save(str(path), save_format="h5" if fmt == formats.H5 else "tf")
