"""The Keras 3 flavour: its classes, graph cloning, building, files."""

import contextlib
import json
import math
import warnings
import zipfile

import keras

from bnconvert import flavour_api as flavour
from bnconvert import formats
from bnconvert import keras_internals as internals
from bnconvert import persist
from bnconvert import walk
from bnconvert.layers import SyncBatchNormalization


class Keras3Flavour(flavour.Flavour):
    """Keras 3 with the TensorFlow backend."""

    name = flavour.KERAS3
    label = "Keras 3"
    records_conversions = True
    other_prefix = "tf_keras."
    keras = keras
    BatchNormalization = keras.layers.BatchNormalization
    SyncBatchNormalization = SyncBatchNormalization
    InputLayer = keras.layers.InputLayer
    Layer = keras.layers.Layer
    Model = keras.Model
    Sequential = keras.Sequential
    Functional = internals.keras3_functional_class()
    Lambda = keras.layers.Lambda
    bn_classes = (keras.layers.BatchNormalization,)

    def sublayers(self, layer):
        return internals.direct_sublayers(layer, keras.layers.Layer)

    def safe_mode_scope(self, safe_mode):
        return internals.keras3_safe_mode_scope(safe_mode)

    def fresh_copy(self, model, custom_objects=None):
        # Classes the model itself uses resolve even when nobody registered them.
        classes = {}
        for _, layer in [("", model), *walk.iter_layers(model, self)]:
            if type(layer).__module__.startswith("keras."):
                # Keras finds its own classes by module; by bare name, the
                # `Add` layer would also replace the `x + 3.0` op node of a
                # model that has both (MobileNetV3).
                continue
            classes[type(layer).__name__] = type(layer)
            classes[self.registered_name(type(layer))] = type(layer)
        classes.update(custom_objects or {})
        # Layers whose class the model's own config does not name (a
        # subclassed model, a custom layer creating plain BN in __init__)
        # come back as recorded.
        positions = [
            at for _, at, layer in walk.iter_positions(model, self)
            if isinstance(layer, self.bn_classes) and type(layer) is not self.BatchNormalization
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The config round trip Keras's save and load would make, without
            # the file: a quarter of the time (tests/benchmarks measure it).
            config = keras.saving.serialize_keras_object(model)
            if positions:
                config = persist.wrap_config(config, model, positions)
            # The model is already in this process: re-creating it from its
            # own config runs no code from an untrusted file.
            with _deferred_initializers():
                copy = keras.saving.deserialize_keras_object(
                    config, custom_objects=classes, safe_mode=False
                )
                copy.set_weights(model.get_weights())
            _after_loading(copy, self)
        return copy

    def identity_like(self, layer):
        # A policy object as `dtype` would make the layer unserializable.
        identity = keras.layers.Identity(name=layer.name, dtype=layer.dtype_policy.name)
        identity.build(layer.get_build_config()["input_shape"])
        return identity

    def build_like(self, original, new, source_of=None):
        build_config = original.get_build_config()
        if not build_config:
            return {}
        # Variable paths ("inner_model/dense/kernel") record the name scope a
        # layer was built in; building inside the original's keeps them.
        scope = None
        for variable in original.weights:
            parts = variable.path.split("/")
            if len(parts) >= 3 and parts[-2] == original.name:
                scope = "/".join(parts[:-2])
            break
        with contextlib.ExitStack() as stack:
            for part in scope.split("/") if scope else ():
                stack.enter_context(keras.name_scope(part))
            preset = {}
            if source_of is not None:
                stack.enter_context(_initial_values(new, source_of, preset))
            new.build_from_config(build_config)
        return preset

    def load(self, path, fmt, custom_objects=None, safe_mode=True):
        with _deferred_initializers(), _saving_skipsets():
            model = keras.saving.load_model(
                str(path), custom_objects=custom_objects, compile=False,
                safe_mode=safe_mode,
            )
        if isinstance(model, keras.Model) and fmt == formats.KERAS:
            _compile_as_saved(model, path, custom_objects)
        return model

    def save(self, model, path, fmt):
        with _saving_skipsets():
            model.save(str(path))


def _after_loading(model, flavour_):
    """Runs what a layer does once Keras's load has set its variables.

    `set_weights` sets the same values as a load but skips a layer's own
    `load_own_variables`, where some layers derive state from them (an
    adapted `Normalization` turns its mean and variance into the constants
    its call uses). Each layer that overrides it reloads its own variables.
    """
    base = keras.layers.Layer.load_own_variables
    for layer in [model, *(layer for _, layer in walk.iter_layers(model, flavour_))]:
        if getattr(type(layer), "load_own_variables", base) is not base:
            store = {}
            layer.save_own_variables(store)
            layer.load_own_variables(store)


# Variables smaller than this are drawn as usual: the time is in the large
# kernels, and a layer may read its small state while it builds (Keras's
# Normalization turns its mean and variance into constants there, and
# `set_weights` does not redo that), which must not see a placeholder.
DEFERRED_MIN_SIZE = 1 << 16


def _deferred_initializers():
    """Weights the load then reads from the file are not drawn from their initializers first.

    Only Keras's `Initializer` objects are deferred (their value depends on
    nothing but shape, dtype and their own seed), and only for variables of
    `DEFERRED_MIN_SIZE` elements or more. Without the private hook (an
    upgrade moved it) a load costs more time, nothing else.
    """
    def defer(initializer, shape):
        return (isinstance(initializer, keras.initializers.Initializer)
                and math.prod(shape) >= DEFERRED_MIN_SIZE)

    try:
        return internals.keras3_deferred_initializers(defer)
    except internals.InternalsError:
        return contextlib.nullcontext()


def _saving_skipsets():
    """Keras's save and load reuse each attribute skip set (see the internals function).

    Without the private hook (an upgrade moved it) they cost more time,
    nothing else.
    """
    try:
        return internals.keras3_saving_skipsets()
    except internals.InternalsError:
        return contextlib.nullcontext()


def _compile_as_saved(model, model_file, custom_objects):
    """Compiles `model` with the compile config saved in the `.keras` archive.

    Keras's own `compile=True` also loads the optimizer's variables, which a
    rewritten model does not carry (for ResNet50 with Adam, twice the
    weights), and it fails the whole load on a loss it cannot resolve.
    """
    with zipfile.ZipFile(model_file) as archive:
        config = json.loads(archive.read("config.json")).get("compile_config")
    if not config:
        return
    try:
        with warnings.catch_warnings():
            # Keras warns, and does nothing, for a custom compile() method.
            warnings.simplefilter("ignore")
            with keras.saving.custom_object_scope(dict(custom_objects or {})):
                model.compile_from_config(config)
    except Exception:  # an unresolvable loss or metric: left out, as documented
        return


@contextlib.contextmanager
def _initial_values(layer, source_of, preset):
    """While active, `layer.add_weight` starts weights from original values.

    The copy's weights would be drawn from their initializers only to be
    overwritten by the original's values; for ResNet50 that is a third of
    the conversion time. Keras layers create their weights through
    `self.add_weight(...)` with keyword arguments; calls it cannot read
    (positional arguments) go to Keras untouched. Only the variables are
    affected: the layer keeps its initializers (and its config).
    """
    add_weight = layer.add_weight

    def add_weight_from_original(*args, **kwargs):
        source = None if args else source_of(kwargs.get("name"))
        if source is not None and _fits(layer, source, kwargs):
            kwargs["initializer"] = _Value(source.numpy())
            variable = add_weight(**kwargs)
            preset[id(variable)] = (variable, source)
            return variable
        return add_weight(*args, **kwargs)

    internals.shadow_method(layer, "add_weight", add_weight_from_original)
    try:
        yield
    finally:
        internals.unshadow_method(layer, "add_weight")


def _fits(layer, source, kwargs):
    """Whether `source` has the shape and dtype `add_weight(**kwargs)` asks for."""
    try:
        shape = tuple(int(d) for d in kwargs.get("shape") or ())
        dtype = kwargs.get("dtype") or layer.variable_dtype
        return shape == tuple(source.shape) and keras.backend.standardize_dtype(
            dtype
        ) == keras.backend.standardize_dtype(source.dtype)
    except (TypeError, ValueError):
        return False


class _Value:
    """An initializer that returns one fixed array (it is never serialized)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return self.value
