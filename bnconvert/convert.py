"""Rewrite a Keras model's normalization layers as the rules say.

The converter walks the model once, building a new model beside it; the
original is never modified. Each layer meets one of four fates:

- A rule matches it (its exact class is named, its config meets the rule's
  `when`): a layer of the rule's target class is built from the mapped
  config, with the same build shape, and the weights are copied by name.
- It is a Functional or Sequential model: it is rebuilt with
  `keras.models.clone_model`, every layer going through the converter again,
  so nesting, shared layers and several inputs/outputs are kept as they are.
- It holds sublayers of its own (a subclassed model, a custom layer): a copy
  is created from its config, and every sublayer the copy's `__init__` made
  is swapped, in the copy's attributes, lists, tuples and dicts (as PyTorch's
  `convert_sync_batchnorm` swaps modules), for the converter's counterpart of
  the original's sublayer; then the copy is built and gets the original's
  own variables. (`clone_model` refuses subclassed models, and Keras's own
  deep copy cannot rebuild a custom layer that has no `build()`.)
- Otherwise it is rebuilt from its config with the original's weights.

Every normalization layer gets a `LayerEvent` in the report, including those
left alone and why. One options object travels down the whole recursion.
Finally, outputs of the original and the new model on one generated batch
are compared (`training=False`).
"""

import contextlib
import dataclasses
import os
import warnings
from types import MappingProxyType

import keras
import numpy as np
# Keras exports no name for the class of `keras.Model(inputs, outputs)`
# models; tests/test_convert.py pins that this import keeps working.
from keras.src.models.functional import Functional as _FUNCTIONAL

from bnconvert import rules as rules_lib
from bnconvert import verify as verify_lib
from bnconvert import walk as walk_lib
from bnconvert.errors import BnconvertError
from bnconvert.errors import ConversionError
from bnconvert.report import ConversionReport
from bnconvert.report import LayerEvent
from bnconvert.errors import first_line as _first_line
from bnconvert.walk import join as _join
from bnconvert.walk import short_name as _short_name

# Size given to unknown (None) dimensions of generated verification inputs:
# the batch axis, and the others (large enough for the 32x downsampling of
# image backbones). With `training=False` BN layers use their moving
# statistics, so one sample exercises them as fully as a batch would; a
# second sample made the two ResNet50 forward passes ~60% slower.
_BATCH = 1
_UNKNOWN_DIM = 32
_SEED = 1234


@dataclasses.dataclass(frozen=True)
class _Options:
    """Everything a conversion needs, passed whole down the recursion."""

    direction: str
    ruleset: rules_lib.RuleSet
    custom_objects: MappingProxyType


def convert_model(
    model,
    to="sync",
    *,
    rules=None,
    custom_objects=None,
    verify=True,
    tolerance=None,
    fold=True,
    safe_mode=True,
    return_report=False,
):
    """Returns a copy of `model` with its normalization layers rewritten.

    With `to="sync"`, every `keras.layers.BatchNormalization` (exact class,
    synchronized or not) becomes `bnconvert.SyncBatchNormalization`. With
    `to="inference"`, synchronized layers become plain
    `BatchNormalization(synchronized=False)` and, with `fold=True`, BN layers
    are then folded into the layer that feeds them where that is exact.
    Weights, moving statistics, constructor arguments, names, `trainable`,
    dtype policies, regularizers and constraints carry over exactly. The
    original model is not modified.

    Args:
        model: A `keras.Model`, or the path of a saved model.
        to: `"sync"` or `"inference"`.
        rules: Optional list of rule-file paths applied on top of the
            shipped rules (see `rules/README.md`).
        custom_objects: Optional dict name -> class, used to load the model
            and to resolve class names in rules.
        verify: If `True`, run both models on one generated batch with
            `training=False` and compare the outputs.
        tolerance: Largest accepted difference of the outputs: absolute
            (default 1e-6) for a swap, relative to the largest output
            (default 1e-5) when BN layers are folded.
        fold: With `to="inference"`, fold BN into its producer layer.
        safe_mode: Passed to Keras when `model` is a path: refuse to load
            Python code (`Lambda` layers) stored in the file.
        return_report: If `True`, return `(model, report)`.

    Returns:
        A new `keras.Model`, or `(model, ConversionReport)`.

    Raises:
        ConversionError: Bad arguments, or a layer cannot be rewritten as
            its rule asks.
        RuleError: A rule file is wrong.
        ModelLoadError: `model` is a path that cannot be loaded.
        VerificationError: The outputs differ by more than `tolerance`.
    """
    from bnconvert import compat

    if compat.handles(model):  # a tf-keras model or file: compat/tf_keras_convert.py
        from bnconvert.compat import tf_keras_convert

        return tf_keras_convert.convert_model(
            model, to, rules=rules, custom_objects=custom_objects, verify=verify,
            tolerance=tolerance, fold=fold, safe_mode=safe_mode,
            return_report=return_report,
        )
    options, model, report = _prepare(model, to, rules, custom_objects, safe_mode)
    folding = to == "inference" and fold
    tolerance = verify_lib.default_tolerance(folding) if tolerance is None else tolerance
    converter = _Converter(options, report)
    with _quiet_keras():
        new_model = converter.convert_root(model)
        if folding:
            new_model = _fold(new_model, options.ruleset, report)
        if verify:
            _verify(model, new_model, tolerance, folding, report)
        else:
            report.tolerance = tolerance
            report.verification_note = "verification was turned off"
    if return_report:
        return new_model, report
    return new_model


def inspect_model(model, to="sync", *, rules=None, custom_objects=None, safe_mode=True):
    """Reports what `convert_model` would do, without converting anything.

    Args:
        model: A `keras.Model`, or the path of a saved model.
        to: `"sync"` or `"inference"`.
        rules: Optional list of user rule-file paths.
        custom_objects: Optional dict name -> class.
        safe_mode: Passed to Keras when `model` is a path.

    Returns:
        A `ConversionReport` whose events say, for every normalization
        layer, which rule would apply or why none would.

    Raises:
        ConversionError, RuleError, ModelLoadError: As `convert_model`.
    """
    from bnconvert import compat

    if compat.handles(model):  # a tf-keras model or file: compat/tf_keras_convert.py
        from bnconvert.compat import tf_keras_convert

        return tf_keras_convert.inspect_model(
            model, to, rules=rules, custom_objects=custom_objects, safe_mode=safe_mode
        )
    options, model, report = _prepare(model, to, rules, custom_objects, safe_mode)
    _Converter(options, report).inspect(model)
    report.verification_note = "inspection only: nothing was converted"
    return report


def _prepare(model, to, rules, custom_objects, safe_mode):
    if to not in rules_lib.DIRECTIONS:
        raise ConversionError(
            f"Unknown conversion direction; use one of {list(rules_lib.DIRECTIONS)}. "
            f"Received: to={to!r}"
        )
    if custom_objects is not None and not isinstance(custom_objects, dict):
        raise ConversionError(
            "Argument `custom_objects` must be a dict name -> class. "
            f"Received: custom_objects={custom_objects!r}"
        )
    if isinstance(rules, (str, os.PathLike)):
        rules = [rules]
    ruleset = rules_lib.load_rules(rules, custom_objects=custom_objects)
    source = None
    if isinstance(model, (str, os.PathLike)):
        from bnconvert import model_io

        source = os.fspath(model)
        model = model_io.load_model(
            model, custom_objects=custom_objects, safe_mode=safe_mode
        )
    if not isinstance(model, keras.Model):
        raise ConversionError(
            "Expected a keras.Model or the path of a saved model. "
            f"Received: model={type(model).__name__}"
        )
    options = _Options(
        direction=to,
        ruleset=ruleset,
        custom_objects=MappingProxyType(dict(custom_objects or {})),
    )
    report = ConversionReport(
        direction=to,
        source=source or model.name,
        rule_sources=ruleset.sources,
    )
    return options, model, report


class _Converter(walk_lib.RuleWalker):
    """One conversion: the options, the report, and what was built so far."""

    input_layer_class = keras.layers.InputLayer

    def __init__(self, options, report):
        super().__init__(
            options.ruleset.for_direction(options.direction), options.direction, report
        )
        self.options = options
        self.pending_weights = []  # (original, new) built only once called
        self.named = set(self.targets)
        for rule in options.ruleset.rules:
            self.named.update(rule.match_classes)
            self.named.add(rule.target_class)

    def convert_root(self, model):
        new = self.convert(model, "")
        for original, layer in self.pending_weights:
            self._carry_all_weights(original, layer, "")
        self._carry_trainable(model, set())
        return new

    # -- what the walk's terms mean in Keras 3 ------------------------------

    def sublayers(self, layer):
        return _children(layer)

    def why_not(self, rule, layer):
        return rule.why_not(layer)

    def is_graph_model(self, layer):
        return _is_graph_model(layer)

    def is_normalization(self, layer):
        return (
            isinstance(layer, keras.layers.BatchNormalization)
            or type(layer) in self.named
        )

    def skip_reason(self, layer):
        if (
            isinstance(layer, keras.layers.BatchNormalization)
            and type(layer) not in self.named
        ):
            return (
                f"{type(layer).__name__} is a subclass of BatchNormalization that "
                "no rule names; add a rule naming it to convert it"
            )
        return None

    # -- the four fates ---------------------------------------------------

    def _apply(self, rule, layer, here):
        kind = type(layer).__name__
        target = rule.target_class
        config = rule.config.apply(layer.get_config())
        source = {_short_name(v): v for v in layer.weights}
        preset = {}
        try:
            with self._scope():
                new = target.from_config(config)
            if layer.built:
                preset = _build_like(
                    layer, new,
                    lambda name: source.get(rule.source_weight_name(name)),
                )
        except Exception as e:
            raise ConversionError(
                f"Rule '{rule.name}' cannot rewrite layer '{here}' ({kind}) into "
                f"{target.__name__}: {_first_line(e)}. Fix the rule's [rule.config] "
                f"mapping. Received: config keys={sorted(config)}"
            ) from e
        carried = self._carry_by_name(rule, source, new, preset, here)
        self.report.add(LayerEvent(
            here, kind, type(new).__name__, rule.name, "applied",
            "weights carried: " + (", ".join(carried) if carried else "none"),
        ))
        return new

    def _carry_by_name(self, rule, source, new, preset, here):
        if not new.weights:
            if source:
                raise ConversionError(
                    f"Layer '{here}' has weights but its rewrite by rule '{rule.name}' "
                    "was not built; the layer has no build config. "
                    f"Received: weights={sorted(source)}"
                )
            return []
        used = []
        for variable in new.weights:
            name = rule.source_weight_name(_short_name(variable))
            if name not in source:
                raise ConversionError(
                    f"Rule '{rule.name}': layer '{here}' has no weight '{name}' for "
                    f"the target's weight '{_short_name(variable)}'; map it in "
                    f"[rule.weights]. Received: source weights={sorted(source)}"
                )
            if tuple(source[name].shape) != tuple(variable.shape):
                raise ConversionError(
                    f"Rule '{rule.name}': weight '{name}' of layer '{here}' has shape "
                    f"{tuple(source[name].shape)} but the target expects "
                    f"{tuple(variable.shape)}. Received: weight={name}"
                )
            if preset.get(id(variable), (None, None))[1] is not source[name]:
                variable.assign(source[name].numpy())
            used.append(name)
        unused = sorted(set(source) - set(used))
        if unused:
            raise ConversionError(
                f"Rule '{rule.name}': weights {unused} of layer '{here}' have no "
                "place in the target layer; change the rule's config or "
                f"[rule.weights]. Received: target weights="
                f"{[_short_name(v) for v in new.weights]}"
            )
        return used

    def _clone_graph(self, model, here):
        def clone_function(layer):
            return self.convert(layer, here)

        kwargs = {}
        if isinstance(model, _FUNCTIONAL) and not isinstance(model, keras.Sequential):
            kwargs["input_tensors"] = _named_inputs(model)
        try:
            new = keras.models.clone_model(
                model, clone_function=clone_function, **kwargs
            )
        except BnconvertError:
            raise
        except Exception as e:
            raise ConversionError(
                f"Cannot rebuild model '{here}' ({type(model).__name__}): "
                f"{_first_line(e)}"
            ) from e
        if model.built and not new.built:
            # A Sequential built by a call has no Input layer to rebuild from.
            new.build_from_config(model.get_build_config())
        return new

    def _copy_other(self, layer, here):
        if _children(layer):
            return self._copy_container(layer, here)
        return self._copy_leaf(layer, here)

    def _copy_container(self, layer, here):
        """Copies a layer that holds sublayers (a subclassed model, a custom layer).

        The copy is made from the layer's config; each sublayer its __init__
        creates is then replaced by the converter's counterpart of the
        original's sublayer (built, with its weights), and only then is the
        copy built and given the original's own variables. Nothing relies on
        the container being rebuildable by Keras from its input shape alone.
        """
        classes = {}
        for sub in _flatten(layer):
            cls = type(sub)
            classes[cls.__name__] = cls
            classes[keras.saving.get_registered_name(cls)] = cls
        classes.update(self.options.custom_objects)
        try:
            with keras.saving.custom_object_scope(classes):
                new = type(layer).from_config(layer.get_config())
        except Exception as e:
            raise ConversionError(
                f"Cannot copy layer '{here}' ({type(layer).__name__}): "
                f"{_first_line(e)}. Give the class a get_config() that its "
                "__init__ accepts, or pass it in custom_objects."
            ) from e
        if new.name != layer.name:
            new.name = layer.name
        self._swap_children(layer, new, here)
        if layer.built:
            build_config = layer.get_build_config()
            with warnings.catch_warnings():
                # Keras warns when build() is the default; the sublayers
                # are already built here.
                warnings.simplefilter("ignore")
                if build_config:
                    new.build_from_config(build_config)
                else:
                    new.built = True
        store = {}
        layer.save_own_variables(store)
        if store:
            new.load_own_variables(store)
        if isinstance(layer, keras.Model) and layer.compiled:
            new.compile_from_config(layer.get_compile_config())
        return new

    def _copy_leaf(self, layer, here):
        try:
            with self._scope():
                if isinstance(layer, keras.layers.Lambda):
                    # The function is already in this process: re-creating
                    # it runs no code from an untrusted file.
                    new = type(layer).from_config(layer.get_config(), safe_mode=False)
                else:
                    new = type(layer).from_config(layer.get_config())
            preset = {}
            if layer.built and layer.weights:
                preset = _build_like(layer, new, _unique_names(layer.weights).get)
        except Exception as e:
            raise ConversionError(
                f"Cannot copy layer '{here}' ({type(layer).__name__}): "
                f"{_first_line(e)}. Check its get_config()/from_config(), or pass "
                "its class in custom_objects."
            ) from e
        if new.weights or not layer.weights:
            self._carry_all_weights(layer, new, here, preset)
        else:
            self.pending_weights.append((layer, new))
        return new

    # -- subclassed containers ------------------------------------------

    def _swap_children(self, original, copied, here):
        """Replaces each sublayer of `copied` by the counterpart of `original`'s."""
        old_children, new_children = _children(original), _children(copied)
        # Paired by position: __init__ creates them in the same order. (The
        # classes may differ: the original may itself be a converted copy.)
        if len(old_children) != len(new_children):
            raise ConversionError(
                f"The copy of '{here}' ({type(original).__name__}) does not create "
                "the same sublayers as the original; make its __init__ create "
                "them from its config alone. Received: sublayers="
                f"{[c.name for c in old_children]}"
            )
        for old, twin in zip(old_children, new_children):
            replacement = self.convert(old, here)
            _replace_sublayer(copied, twin, replacement, _join(here, old.name))

    # -- finishing --------------------------------------------------------

    def _carry_all_weights(self, original, new, here, preset=None):
        if (
            preset
            and _plain_weight_access(original)
            and _plain_weight_access(new)
            and len(preset) == len(new.weights) == len(original.weights)
            and all(
                preset.get(id(v), (None, None))[1] is w
                for v, w in zip(new.weights, original.weights)
            )
        ):
            return  # every weight was created from the original's value
        values = original.get_weights()
        if len(values) != len(new.weights):
            raise ConversionError(
                f"Cannot copy the weights of layer '{here or original.name}' "
                f"({type(original).__name__}): the copy has {len(new.weights)} "
                f"weights, the original {len(values)}. Give the layer a "
                "get_build_config()/build_from_config()."
            )
        new.set_weights(values)

    def _carry_trainable(self, layer, seen):
        # Parents first: setting `trainable` on a layer resets its sublayers.
        if id(layer) in seen:
            return
        seen.add(id(layer))
        new = self.memo.get(id(layer))
        if new is not None and new.trainable != layer.trainable:
            new.trainable = layer.trainable
        for child in _children(layer):
            self._carry_trainable(child, seen)

    @contextlib.contextmanager
    def _scope(self):
        with keras.saving.custom_object_scope(dict(self.options.custom_objects)):
            yield


def _replace_sublayer(parent, old, new, where):
    """Replaces `old` by `new` everywhere `parent` holds it, keeping the order."""
    found = False

    def swap(value):
        nonlocal found
        if value is old:
            found = True
            return new
        if isinstance(value, (list, tuple)):
            items = [swap(item) for item in value]
            if all(a is b for a, b in zip(items, value)):
                return value
            if issubclass(type(value), list):  # list, Keras's TrackedList
                for i, item in enumerate(items):
                    list.__setitem__(value, i, item)
                return value
            # Tuples, named tuples, and TensorFlow's tracking proxies of them
            # are rebuilt and assigned again.
            if hasattr(value, "_fields"):
                return type(value)(*items)
            return tuple(items) if isinstance(value, tuple) else list(items)
        if isinstance(value, dict):
            for key, item in list(value.items()):
                swapped = swap(item)
                if swapped is not item:
                    value[key] = swapped
            return value
        return value

    # Keras's own list of direct sublayers: weights, saving and `trainable`
    # follow it, so the new layer takes the old one's place in it.
    parent._tracker.replace_tracked_value("layers", old, new)
    for name, value in list(vars(parent).items()):
        if name in ("_layers", "_tracker"):
            continue
        swapped = swap(value)
        if swapped is not value:
            setattr(parent, name, swapped)
    if not found:
        raise ConversionError(
            f"Layer '{where}' is not held in an attribute, list, tuple or dict of "
            f"its parent '{parent.name}', so it cannot be swapped; store it in an "
            "attribute."
        )


def _build_like(original, new, source_of=None):
    """Builds `new` from `original`'s build config, under the same name scope.

    Variable paths ("inner_model/dense/kernel") record the name scope a layer
    was built in; building inside the original's scope keeps them equal.

    The copy's weights would be drawn from their initializers only to be
    overwritten by the original's values; for ResNet50 that is a third of
    the conversion time. So, while `new` builds, each weight that
    `source_of(name)` pairs with an original variable of the same shape and
    dtype is created from that variable's value instead. Only the variables
    are affected: the layer keeps its initializers (and its config).

    Args:
        original: The built layer to copy.
        new: Its unbuilt counterpart.
        source_of: Optional function: weight name -> original variable or
            `None`.

    Returns:
        A dict `id(new variable) -> (new variable, original variable)` of
        the weights created from an original's value; the caller still
        pairs and checks every weight, and assigns the others.
    """
    build_config = original.get_build_config()
    if not build_config:
        return {}
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


@contextlib.contextmanager
def _initial_values(layer, source_of, preset):
    """While active, `layer.add_weight` starts weights from original values.

    Keras layers create their weights through `self.add_weight(...)` with
    keyword arguments; an instance attribute shadows the method for the
    duration of the build only. Calls it cannot read (positional
    arguments) go to Keras untouched.
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

    # Set and removed past Keras's attribute tracking: a function is not
    # state to track, and the layer must be left exactly as Keras made it.
    object.__setattr__(layer, "add_weight", add_weight_from_original)
    try:
        yield
    finally:
        object.__delattr__(layer, "add_weight")


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


def _plain_weight_access(layer):
    """Whether `layer` gets and sets its weights as Keras does (no override)."""
    cls = type(layer)
    return (
        cls.get_weights is keras.layers.Layer.get_weights
        and cls.set_weights is keras.layers.Layer.set_weights
    )


def _unique_names(variables):
    """Maps each short name that occurs once among `variables` to its variable."""
    by_name = {}
    for variable in variables:
        by_name.setdefault(_short_name(variable), []).append(variable)
    return {name: found[0] for name, found in by_name.items() if len(found) == 1}


def _fold(model, ruleset, report):
    try:
        from bnconvert import fold as fold_lib
    except ImportError:  # folding ships separately; without it, only unsync
        report.verification_note = "folding is not available"
        return model
    return fold_lib.fold_model(model, ruleset.fold_rules, report)


def _verify(original, converted, tolerance, relative, report):
    inputs, note = sample_inputs(original)
    report.verification_note = note
    if inputs is None:
        report.tolerance = tolerance
        return
    verify_lib.compare_outputs(
        keras.tree.flatten(original(inputs, training=False)),
        keras.tree.flatten(converted(inputs, training=False)),
        tolerance=tolerance, relative=relative, report=report, name=original.name,
    )


def sample_inputs(model):
    """One seeded batch for `model`, and a note on what was generated.

    Float inputs are standard normal, integer inputs are 0 or 1, booleans are
    random; an unknown batch size becomes 1 and other unknown sizes 32.

    Args:
        model: A built `keras.Model`.

    Returns:
        `(inputs, note)`: inputs in the structure the model takes, or `None`
        and the reason when no batch can be made.
    """
    rng = np.random.default_rng(_SEED)
    if getattr(model, "_inputs_struct", None) is not None and model.inputs:
        specs = keras.tree.map_structure(
            lambda t: (tuple(t.shape), str(t.dtype)), model.input
        )
    else:
        build = model.get_build_config() if model.built else None
        shape = (build or {}).get("input_shape")
        if shape is None:
            return None, (
                f"model '{model.name}' is not built (or not from an input shape); "
                "nothing to compare"
            )
        specs = _shape_specs(shape)
        if specs is None:
            return None, f"model '{model.name}' has an input shape it cannot sample"

    def make(spec):
        shape, dtype = spec
        dims = tuple(
            (_BATCH if i == 0 else _UNKNOWN_DIM) if d is None else int(d)
            for i, d in enumerate(shape)
        )
        if "float" in dtype:
            return rng.standard_normal(dims).astype(dtype)
        if "int" in dtype:
            return rng.integers(0, 2, size=dims).astype(dtype)
        if dtype == "bool":
            return rng.integers(0, 2, size=dims).astype(bool)
        raise TypeError(dtype)

    try:
        inputs = _map_specs(make, specs)
    except TypeError as e:
        return None, f"cannot generate inputs of dtype {e}"
    return inputs, "one generated batch, training=False"


def _map_specs(fn, specs):
    if _is_spec(specs):
        return fn(specs)
    if isinstance(specs, dict):
        return {k: _map_specs(fn, v) for k, v in specs.items()}
    return [_map_specs(fn, v) for v in specs]


def _is_spec(value):
    return (
        isinstance(value, tuple) and len(value) == 2
        and isinstance(value[1], str) and isinstance(value[0], tuple)
    )


def _shape_specs(shape):
    """Turns a build config's input shape (one, a list, or a dict) into specs."""
    if isinstance(shape, (list, tuple)) and all(
        d is None or isinstance(d, int) for d in shape
    ):
        return (tuple(shape), "float32")
    if isinstance(shape, dict):
        specs = {k: _shape_specs(v) for k, v in shape.items()}
        return None if any(v is None for v in specs.values()) else specs
    if isinstance(shape, (list, tuple)):
        specs = [_shape_specs(v) for v in shape]
        return None if any(v is None for v in specs) else specs
    return None


def _children(layer):
    """Direct sublayers of `layer`, in Keras's tracking order."""
    # Keras keeps a layer's direct sublayers in `_layers`; there is no public
    # accessor for plain layers (tests pin this).
    return [c for c in getattr(layer, "_layers", []) if isinstance(c, keras.layers.Layer)]


def _flatten(layer):
    """`layer` and every layer below it, each once."""
    seen, out, stack = set(), [], [layer]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        out.append(current)
        stack.extend(reversed(_children(current)))
    return out


def _named_inputs(model):
    """Fresh input tensors named like `model`'s InputLayers.

    Left to itself, clone_model names each new InputLayer after its tensor
    ("keras_tensor_890"), which would rename the inputs users, saved files
    and the ONNX export see.
    """
    names = {
        id(layer.output): layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.InputLayer)
    }
    return keras.tree.map_structure(
        lambda t: keras.Input(
            batch_shape=t.shape, dtype=t.dtype, sparse=t.sparse,
            name=names.get(id(t), t.name),
        ),
        model.input,
    )


def _is_graph_model(layer):
    """Whether `layer` is a Functional or Sequential model (a graph of layers)."""
    return isinstance(layer, keras.Model) and isinstance(
        layer, (keras.Sequential, _FUNCTIONAL)
    )


@contextlib.contextmanager
def _quiet_keras():
    # Copying a compiled model makes Keras warn about optimizer variables;
    # a rewrite does not carry optimizer state, so the warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer.*")
        yield
