"""The Keras 3 flavour: its classes, graph cloning, building, files."""

import contextlib
import json
import warnings
import zipfile

import keras

from bnconvert import flavour_api as flavour
from bnconvert import formats
from bnconvert import keras_internals as internals
from bnconvert.layers import SyncBatchNormalization


class Keras3Flavour(flavour.Flavour):
    """Keras 3 with the TensorFlow backend."""

    name = flavour.KERAS3
    label = "Keras 3"
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

    def clone_graph(self, model, clone_function, bypass=frozenset()):
        kwargs = {}
        if isinstance(model, self.Functional) and not isinstance(model, keras.Sequential):
            kwargs["input_tensors"] = keras.tree.map_structure(
                self.fresh_input, model.input
            )
        if bypass:
            def call_function(layer, *args, **kw):
                if id(layer) in bypass:
                    return args[0] if args else kw["inputs"]
                return layer(*args, **kw)

            kwargs["call_function"] = call_function
        new = keras.models.clone_model(model, clone_function=clone_function, **kwargs)
        if model.built and not new.built:
            # A Sequential built by a call has no Input layer to rebuild from.
            new.build_from_config(model.get_build_config())
        return new

    def fresh_input(self, tensor):
        """A new `keras.Input` like `tensor`, named after its InputLayer.

        Left to itself, clone_model names each new InputLayer after its
        tensor ("keras_tensor_890"), which would rename the inputs users,
        saved files and the ONNX export see.
        """
        layer = internals.producing_layer(tensor)
        return keras.Input(
            batch_shape=tensor.shape, dtype=tensor.dtype, sparse=tensor.sparse,
            name=layer.name,
        )

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
        model = keras.saving.load_model(
            str(path), custom_objects=custom_objects, compile=False,
            safe_mode=safe_mode,
        )
        if isinstance(model, keras.Model) and fmt == formats.KERAS:
            _compile_as_saved(model, path, custom_objects)
        return model

    def save(self, model, path, fmt):
        model.save(str(path))


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
