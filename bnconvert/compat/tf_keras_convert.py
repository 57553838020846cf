"""Rewriting tf-keras (Keras 2) models with bnconvert's rules.

The rule files are the shipped ones (and the user's), read by
`bnconvert.rules`; only their class names are resolved again, against
tf-keras instead of Keras 3: `"keras.layers.X"` and `"tf_keras.layers.X"`
both mean `tf_keras.layers.X`, and `"bnconvert>SyncBatchNormalization"` the
tf-keras flavour of the layer.
tf-keras's deprecated `layers.experimental.SyncBatchNormalization` is
`BatchNormalization(synchronized=True)` under another name, so every rule
that matches `BatchNormalization` matches it too; and since tf-keras leaves
`synchronized` out of `get_config()`, rule conditions (`when`) see it added
back from the layer.

The walk covers Functional and Sequential models, nested at any depth:
each is rebuilt with `tf_keras.models.clone_model`, every layer going
through the converter (shared layers stay shared). A matched layer is
rebuilt as the rule's target from the mapped config and gets the weights by
name; any other layer is rebuilt from its config with its weights.
Subclassed tf-keras models are refused with a one-line error. The result is
compared with the original on a generated batch before it is returned.
"""

import contextlib
import dataclasses
import warnings

import numpy as np
import tensorflow as tf
import tf_keras
from tf_keras.src.engine.functional import Functional as _FUNCTIONAL

from bnconvert import rules as rules_lib
from bnconvert import verify as verify_lib
from bnconvert import walk as walk_lib
from bnconvert.compat import tf_keras_io
from bnconvert.compat import tf_keras_layers  # noqa: F401  (registers the target class)
from bnconvert.errors import BnconvertError
from bnconvert.errors import ConversionError
from bnconvert.report import ConversionReport
from bnconvert.report import LayerEvent
from bnconvert.errors import first_line as _first_line
from bnconvert.walk import short_name as _short_name

_BATCH = 2
_UNKNOWN_DIM = 32
_SEED = 1234
_LEGACY_SYNC_BN = tf_keras.layers.experimental.SyncBatchNormalization


def is_tf_keras_model(obj):
    """Whether `obj` is a `tf_keras.Model`."""
    return isinstance(obj, tf_keras.Model)


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
    """`bnconvert.convert_model` for tf-keras models (same arguments).

    With `to="sync"`, tf-keras `BatchNormalization` (synchronized or not) and
    `layers.experimental.SyncBatchNormalization` become
    `bnconvert.compat.SyncBatchNormalization`; with `to="inference"`,
    synchronized layers become plain tf-keras `BatchNormalization`. Folding
    (`fold=True`) is left to the ONNX exporter for tf-keras models, which
    folds BN into the convolution before it; the report says so.

    Returns:
        A new `tf_keras.Model`, or `(model, ConversionReport)`.
    """
    model, ruleset, report = _prepare(model, to, rules, custom_objects, safe_mode)
    # tf-keras models are not folded in Keras (see above): a swap is exact.
    tolerance = verify_lib.ABSOLUTE_TOLERANCE if tolerance is None else tolerance
    converter = _Converter(ruleset, to, report, custom_objects)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer.*")
        new_model = converter.convert_root(model)
        if verify:
            _verify(model, new_model, tolerance, report)
        else:
            report.tolerance = tolerance
            report.verification_note = "verification was turned off"
    if to == "inference" and fold:
        report.verification_note += (
            "; tf-keras model: BN folding is left to the ONNX exporter"
        )
    if return_report:
        return new_model, report
    return new_model


def inspect_model(model, to="sync", *, rules=None, custom_objects=None, safe_mode=True):
    """`bnconvert.inspect_model` for tf-keras models."""
    model, ruleset, report = _prepare(model, to, rules, custom_objects, safe_mode)
    _Converter(ruleset, to, report, custom_objects).inspect(model)
    report.verification_note = "inspection only: nothing was converted"
    return report


def _prepare(model, to, rules, custom_objects, safe_mode):
    if to not in rules_lib.DIRECTIONS:
        raise ConversionError(
            f"Unknown conversion direction; use one of {list(rules_lib.DIRECTIONS)}. "
            f"Received: to={to!r}"
        )
    if isinstance(rules, str) or hasattr(rules, "__fspath__"):
        rules = [rules]
    ruleset = tf_keras_ruleset(
        rules_lib.load_rules(rules, custom_objects=custom_objects), custom_objects
    )
    source = getattr(model, "name", "")
    if not is_tf_keras_model(model):
        source = str(model)
        model = tf_keras_io.load_model(
            model, custom_objects=custom_objects, safe_mode=safe_mode
        )
    report = ConversionReport(direction=to, source=source, rule_sources=ruleset.sources)
    return model, ruleset, report


def resolve_class(name, custom_objects=None):
    """The tf-keras layer class a rule's class name designates, or `None`.

    Args:
        name: `"package>Class"` (registered with tf-keras), a name in
            `custom_objects`, `"keras.layers.Class"` (read as
            `tf_keras.layers.Class`), `"tf_keras.layers.Class"`, or a bare
            `tf_keras.layers` name.
        custom_objects: Optional dict name -> class.
    """
    candidate = tf_keras.saving.get_registered_object(name, custom_objects)
    if candidate is None and name.startswith(("keras.", "tf_keras.")):
        candidate = tf_keras
        for part in name.split(".")[1:]:
            if not part.isidentifier() or part.startswith("_"):
                return None
            candidate = getattr(candidate, part, None)
    elif candidate is None and name.isidentifier():
        candidate = getattr(tf_keras.layers, name, None)
    if isinstance(candidate, type) and issubclass(candidate, tf_keras.layers.Layer):
        return candidate
    return None


def tf_keras_ruleset(ruleset, custom_objects=None):
    """`ruleset` with its classes resolved against tf-keras.

    A rule whose target has no tf-keras counterpart is left out (no tf-keras
    layer can be rewritten into it); match names without one are ignored.
    """
    converted = []
    for rule in ruleset.rules:
        target = resolve_class(rule.target, custom_objects)
        matched = [resolve_class(n, custom_objects) for n in rule.match]
        matched = [c for c in matched if c is not None]
        if tf_keras.layers.BatchNormalization in matched:
            matched.append(_LEGACY_SYNC_BN)
        if target is None or not matched:
            continue
        converted.append(dataclasses.replace(
            rule, match_classes=tuple(matched), target_class=target
        ))
    return rules_lib.RuleSet(
        rules=tuple(converted), fold_rules=(), sources=ruleset.sources
    )


def _config_view(layer):
    """The config rule conditions see: tf-keras drops `synchronized`."""
    config = layer.get_config()
    if isinstance(layer, tf_keras.layers.BatchNormalization) or isinstance(
        layer, _LEGACY_SYNC_BN
    ):
        config.setdefault("synchronized", bool(getattr(layer, "synchronized", False)))
    return config


def _why_not(rule, layer):
    if type(layer) not in rule.match_classes:
        return f"class {type(layer).__name__} is not one of {list(rule.match)}"
    config = _config_view(layer)
    for key, expected in rule.when.items():
        if key not in config:
            return f"config has no key '{key}'"
        if config[key] != expected:
            return f"config {key}={config[key]!r}, rule wants {expected!r}"
    return None


def _is_normalization_class(cls):
    return issubclass(cls, (tf_keras.layers.BatchNormalization, _LEGACY_SYNC_BN))


def _is_normalization(layer):
    return isinstance(layer, (tf_keras.layers.BatchNormalization, _LEGACY_SYNC_BN))


class _Converter(walk_lib.RuleWalker):
    """One conversion of a tf-keras model: rules, report, layers built so far."""

    input_layer_class = tf_keras.layers.InputLayer
    no_rule_reason = "no {direction} rule matches {kind}; add a rule naming it"

    def __init__(self, ruleset, direction, report, custom_objects):
        super().__init__(ruleset.for_direction(direction), direction, report)
        self.custom_objects = dict(custom_objects or {})

    def sublayers(self, layer):
        return sublayers(layer)

    def why_not(self, rule, layer):
        return _why_not(rule, layer)

    def is_graph_model(self, layer):
        return _is_graph_model(layer)

    def is_normalization(self, layer):
        return _is_normalization(layer)

    def _copy_other(self, layer, here):
        if isinstance(layer, tf_keras.Model) or any(
            _is_normalization(m) for m in layer.submodules
        ):
            raise ConversionError(
                f"Layer '{here}' ({type(layer).__name__}) is a subclassed tf-keras "
                "model or layer; only Functional and Sequential tf-keras models can "
                "be rewritten. Rebuild it as a Functional model, or port it to Keras 3."
            )
        return self._copy_leaf(layer, here)

    def _apply(self, rule, layer, here):
        kind = type(layer).__name__
        target = rule.target_class
        config = rule.config.apply(layer.get_config())
        if getattr(layer, "fused", None) is False and _is_normalization_class(target):
            # tf-keras synchronized BN never fuses, and `fused` is not in its
            # config: the target must run the same (non-fused) kernels.
            config["fused"] = False
        try:
            with self._scope():
                new = target.from_config(config)
            _build_like(layer, new)
        except Exception as e:
            raise ConversionError(
                f"Rule '{rule.name}' cannot rewrite layer '{here}' ({kind}) into "
                f"{target.__name__}: {_first_line(e)}. Received: config keys="
                f"{sorted(config)}"
            ) from e
        source = {_short_name(v): v for v in layer.weights}
        used = []
        for variable in new.weights:
            name = rule.source_weight_name(_short_name(variable))
            if name not in source or tuple(source[name].shape) != tuple(variable.shape):
                raise ConversionError(
                    f"Rule '{rule.name}': layer '{here}' has no weight '{name}' of "
                    f"shape {tuple(variable.shape)} for the target; map it in "
                    f"[rule.weights]. Received: source weights={sorted(source)}"
                )
            variable.assign(source[name].numpy())
            used.append(name)
        unused = sorted(set(source) - set(used))
        if unused:
            raise ConversionError(
                f"Rule '{rule.name}': weights {unused} of layer '{here}' have no "
                "place in the target layer; change the rule's config or "
                "[rule.weights]."
            )
        self.report.add(LayerEvent(
            here, kind, type(new).__name__, rule.name, "applied",
            "weights carried: " + (", ".join(used) if used else "none"),
        ))
        return new

    def _clone_graph(self, model, here):
        try:
            new = tf_keras.models.clone_model(
                model, clone_function=lambda layer: self.convert(layer, here)
            )
        except BnconvertError:
            raise
        except Exception as e:
            raise ConversionError(
                f"Cannot rebuild model '{here}' ({type(model).__name__}): "
                f"{_first_line(e)}"
            ) from e
        if model.built and not new.built:
            new.build_from_config(model.get_build_config())
        new.trainable = model.trainable
        return new

    def _copy_leaf(self, layer, here):
        try:
            with self._scope():
                new = type(layer).from_config(layer.get_config())
            _build_like(layer, new)
            new.set_weights(layer.get_weights())
        except Exception as e:
            raise ConversionError(
                f"Cannot copy layer '{here}' ({type(layer).__name__}): "
                f"{_first_line(e)}. Check its get_config()/from_config(), or pass "
                "its class in custom_objects."
            ) from e
        return new

    @contextlib.contextmanager
    def _scope(self):
        with tf_keras.saving.custom_object_scope(self.custom_objects):
            yield


def _build_like(original, new):
    """Builds `new` with `original`'s build input shape, in its name scope."""
    if not original.built or new.built:
        return
    build_config = original.get_build_config()
    if not build_config or build_config.get("input_shape") is None:
        if original.weights:
            raise ValueError("the layer was built but records no input shape")
        return
    with tf_keras.backend.name_scope(new.name):
        new.build_from_config(build_config)


def _verify(original, converted, tolerance, report):
    inputs = sample_inputs(original)
    if inputs is None:
        report.tolerance = tolerance
        report.verification_note = (
            f"model '{original.name}' has no defined inputs; nothing to compare"
        )
        return
    report.verification_note = "one generated batch, training=False"
    verify_lib.compare_outputs(
        tf.nest.flatten(original(inputs, training=False)),
        tf.nest.flatten(converted(inputs, training=False)),
        tolerance=tolerance, relative=False, report=report, name=original.name,
    )


def sample_inputs(model):
    """One seeded batch in the structure `model` takes, or `None`."""
    if not model.inputs:
        return None
    rng = np.random.default_rng(_SEED)

    def make(tensor):
        dims = tuple(
            (_BATCH if i == 0 else _UNKNOWN_DIM) if d is None else int(d)
            for i, d in enumerate(tensor.shape)
        )
        dtype = tensor.dtype.as_numpy_dtype
        if np.issubdtype(dtype, np.floating):
            return rng.standard_normal(dims).astype(dtype)
        if dtype == np.bool_:
            return rng.integers(0, 2, size=dims).astype(bool)
        return rng.integers(0, 2, size=dims).astype(dtype)

    return tf.nest.map_structure(make, model.input)


def sublayers(layer):
    """Sublayers to look into: a model's layers, or all of a custom layer's.

    The conversion walk and `bnconvert inspect` both use it, so their layer
    paths agree.
    """
    if isinstance(layer, tf_keras.Model):
        return list(layer.layers)
    return [m for m in layer.submodules if isinstance(m, tf_keras.layers.Layer)]


def _is_graph_model(layer):
    return isinstance(layer, (tf_keras.Sequential, _FUNCTIONAL))


__all__ = [
    "convert_model", "inspect_model", "resolve_class", "sublayers", "tf_keras_ruleset",
]
