"""The interface of a Keras flavour: what differs between Keras 3 and tf-keras.

Implemented by `bnconvert._keras3.Keras3Flavour` and
`bnconvert._tf_keras.TFKerasFlavour`; chosen by `bnconvert.flavour.flavour_of`.
"""

KERAS3 = "keras3"
TF_KERAS = "tf_keras"


class Flavour:
    """What differs between Keras 3 and tf-keras, and nothing else.

    Attributes:
        name: `"keras3"` or `"tf_keras"`.
        label: For messages: `"Keras 3"` or `"tf-keras"`.
        keras: The flavour's top-level module (`keras` or `tf_keras`).
        BatchNormalization, SyncBatchNormalization, InputLayer, Layer,
        Model, Sequential, Functional, Lambda: The flavour's classes
            (`SyncBatchNormalization` is bnconvert's layer for it).
        bn_classes: Every class that counts as batch normalization: the
            BN class and, for tf-keras, its deprecated experimental
            `SyncBatchNormalization` (which is not a BN subclass).
        containers: `None` if custom layers and subclassed models holding
            sublayers can be rewritten, else the reason they cannot.
        records_conversions: Whether a `.keras` file can record a
            conversion its model's config cannot hold (`bnconvert.persist`).
        other_prefix: Class paths under this prefix name the other
            flavour's classes (rules written for it).
        hard_sigmoid: `(alpha, beta)` of the flavour's `hard_sigmoid`
            activation, `max(0, min(1, alpha * x + beta))` (for ONNX).

    Which file formats each flavour writes is file knowledge, kept (without
    importing TensorFlow) in `bnconvert.formats`.
    """

    name = None
    label = None
    containers = None
    records_conversions = False
    other_prefix = None
    hard_sigmoid = (1.0 / 6.0, 0.5)

    # -- classes and configs ------------------------------------------------

    def sublayers(self, layer):
        """The direct sublayers the walk looks into, in a stable order."""
        raise NotImplementedError

    def is_graph_model(self, layer):
        """Whether `layer` is a Functional or Sequential model."""
        return isinstance(layer, self.Model) and isinstance(
            layer, (self.Sequential, self.Functional)
        )

    def match_aliases(self, classes):
        """Further classes that a rule naming `classes` matches."""
        return ()

    def config_of(self, layer):
        """`layer.get_config()` as rules see it."""
        return layer.get_config()

    def target_config(self, layer, config, target):
        """The config a rule's `target` is built from, given `layer`'s mapped config."""
        return config

    def registered_object(self, name, custom_objects):
        """The object registered under `name` with this flavour, or `None`."""
        return self.keras.saving.get_registered_object(name, custom_objects)

    def registered_name(self, cls):
        return self.keras.saving.get_registered_name(cls)

    def custom_object_scope(self, objects):
        return self.keras.saving.custom_object_scope(dict(objects or {}))

    def safe_mode_scope(self, safe_mode):
        """A context in which deserializing refuses stored code unless `safe_mode` is off."""
        raise NotImplementedError

    def from_config(self, cls, config, custom_objects=None, safe_mode=True):
        """`cls.from_config(config)` under the custom objects and safe mode."""
        with self.custom_object_scope(custom_objects), self.safe_mode_scope(safe_mode):
            return cls.from_config(config)

    # -- models and layers --------------------------------------------------

    def fresh_copy(self, model, custom_objects=None):
        """An independent copy of `model`, made by the flavour's own save and load.

        Keras re-creates the model as it would from a file (keras-hub models
        through their own constructors), so the copy keeps the model's
        class, config, raw ops and custom layers.
        """
        raise NotImplementedError

    def identity_like(self, layer):
        """A built identity layer named and typed like `layer` (what a folded BN becomes)."""
        raise NotImplementedError

    def build_like(self, original, new, source_of=None):
        """Builds `new` as `original` was built, in the same name scope.

        Args:
            original: The built layer.
            new: Its unbuilt copy.
            source_of: Optional weight name -> original variable, used to
                create the copy's weights from the original's values.

        Returns:
            `{id(new variable): (new variable, original variable)}` for the
            weights created from an original value (may be empty).
        """
        raise NotImplementedError

    # -- files ----------------------------------------------------------------

    def load(self, path, fmt, custom_objects=None, safe_mode=True):
        """Loads the model file or directory `path` of format `fmt`."""
        raise NotImplementedError

    def save(self, model, path, fmt):
        """Writes `model` to `path` (a fresh temporary place) in format `fmt`."""
        raise NotImplementedError
