"""Rule files: which layers are rewritten, into what, and how.

Rules are TOML files (read with the standard library's `tomllib`) validated
into frozen dataclasses. The schema is described in `rules/README.md`; in
short, a file holds `[[rule]]` tables (one layer rewrite each: the classes it
matches, optional conditions on their config, the target class, a config key
mapping and a weight mapping) and `[[fold]]` tables (which producer layers a
BatchNormalization may be folded into at inference time).

The shipped rule files live in the top-level `rules/` directory of the source
tree, installed as the package data directory `bnconvert/rules/`. User files
are applied on top of them: a rule with the name of an earlier one replaces
it, and rules from later files take precedence when several match a layer.

Class names are resolved without importing anything: through the user's
`custom_objects`, Keras's registered objects (`"bnconvert>SyncBatchNormalization"`),
an attribute path under the `keras` package (`"keras.layers.BatchNormalization"`),
or a bare name of a class in `keras.layers` (`"Conv2D"`). A name under
`tf_keras` (`"tf_keras.layers.experimental.SyncBatchNormalization"`) names a
tf-keras class; tf-keras is imported only when such a name appears.
"""

import dataclasses
import importlib.resources
import os
import pathlib
import sys
import tomllib
from types import MappingProxyType

import keras

from bnconvert.errors import RuleError

DIRECTIONS = ("sync", "inference")
FOLD_LAYOUTS = ("conv", "conv_transpose", "depthwise", "separable", "dense")

_TOP_KEYS = {"version", "rule", "fold"}
_RULE_KEYS = {
    "name", "direction", "description", "enabled", "match", "when", "target",
    "config", "weights",
}
_RULE_REQUIRED = ("name", "direction", "match", "target")
_CONFIG_KEYS = {"drop", "rename", "set"}
_FOLD_KEYS = {"name", "description", "into", "layout"}
_FOLD_REQUIRED = ("name", "into", "layout")


@dataclasses.dataclass(frozen=True)
class ConfigMapping:
    """How a matched layer's `get_config()` becomes the target's config.

    Applied in this order: `drop` removes keys, `rename` moves values to new
    keys, `set` writes fixed values. Every other key is carried unchanged.

    Attributes:
        drop: Keys removed from the source config.
        rename: Read-only mapping old key -> new key.
        set: Read-only mapping key -> value written into the config.
    """

    drop: tuple[str, ...] = ()
    rename: MappingProxyType = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    set: MappingProxyType = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )

    def apply(self, config):
        """Returns a new config dict with the mapping applied to `config`."""
        config = dict(config)
        for key in self.drop:
            config.pop(key, None)
        for old, new in self.rename.items():
            if old in config:
                config[new] = config.pop(old)
        config.update(self.set)
        return config


@dataclasses.dataclass(frozen=True)
class Rule:
    """One layer rewrite.

    Attributes:
        name: Unique name; a later file's rule of the same name replaces it.
        direction: `"sync"` or `"inference"`.
        match: Class names as written in the file.
        match_classes: The resolved classes; a layer matches when its class
            is exactly one of them (subclasses must be named).
        when: Read-only mapping config key -> required value (all must hold).
        target: Target class name as written in the file.
        target_class: The resolved target class.
        config: The `ConfigMapping` from source to target config.
        weights: Read-only mapping target weight name -> source weight name;
            weights not listed keep their name.
        description: Free text shown in docs.
        source: The file the rule comes from.
    """

    name: str
    direction: str
    match: tuple[str, ...]
    match_classes: tuple[type, ...]
    target: str
    target_class: type
    when: MappingProxyType = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    config: ConfigMapping = dataclasses.field(default_factory=ConfigMapping)
    weights: MappingProxyType = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    description: str = ""
    source: str = ""

    def why_not(self, layer):
        """Returns why this rule does not apply to `layer`, or `None` if it does."""
        if type(layer) not in self.match_classes:
            return f"class {type(layer).__name__} is not one of {list(self.match)}"
        if self.when:
            config = layer.get_config()
            for key, expected in self.when.items():
                if key not in config:
                    return f"config has no key '{key}'"
                if config[key] != expected:
                    return f"config {key}={config[key]!r}, rule wants {expected!r}"
        return None

    def source_weight_name(self, target_name):
        """The source weight name that feeds target weight `target_name`."""
        return self.weights.get(target_name, target_name)


@dataclasses.dataclass(frozen=True)
class FoldRule:
    """Which producer layers a BatchNormalization may be folded into.

    Attributes:
        name: Unique name among fold rules.
        into: Producer class names as written in the file.
        layout: Where the producer's kernel keeps its output channels; one
            of `FOLD_LAYOUTS`.
        source: The file the rule comes from.
        classes: The resolved producer classes (exact classes).
    """

    name: str
    into: tuple[str, ...]
    layout: str
    source: str = ""
    classes: tuple[type, ...] = ()


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """Every rule in force, in precedence order (first match wins).

    Attributes:
        rules: Layer rewrite rules; those of later files come first.
        fold_rules: Fold rules, in file order.
        sources: The files read, in load order.
    """

    rules: tuple[Rule, ...]
    fold_rules: tuple[FoldRule, ...]
    sources: tuple[str, ...]

    def for_direction(self, direction):
        """The enabled rules of one direction, in precedence order."""
        return tuple(r for r in self.rules if r.direction == direction)

    def match(self, layer, direction):
        """Returns the first rule of `direction` that applies to `layer`, or `None`."""
        for rule in self.for_direction(direction):
            if rule.why_not(layer) is None:
                return rule
        return None


def shipped_rule_files():
    """Returns the paths of the rule files shipped with bnconvert, sorted.

    Installed packages hold them in `bnconvert/rules/`; an editable install
    leaves them in the source tree's top-level `rules/` directory (the module
    `bnconvert/rules.py` shadows the data package name, so they are located
    from the `bnconvert` package rather than imported).
    """
    candidates = []
    try:
        candidates.append(importlib.resources.files("bnconvert") / "rules")
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    candidates.append(pathlib.Path(__file__).resolve().parent.parent / "rules")
    for directory in candidates:
        if directory.is_dir():
            files = sorted(
                (p for p in directory.iterdir() if p.name.endswith(".toml")),
                key=lambda p: p.name,
            )
            if files:
                return [str(p) for p in files]
    raise RuleError(
        "The rule files shipped with bnconvert are missing; reinstall the "
        f"package. Received: searched={[str(c) for c in candidates]}"
    )


def load_rules(paths=None, *, custom_objects=None):
    """Loads the shipped rules, then the user's rule files on top.

    Args:
        paths: Optional path or list of paths of user rule files, applied in
            order after the shipped ones. A rule or fold rule named like an
            earlier one replaces it; a rule with `enabled = false` removes
            it.
        custom_objects: Optional dict name -> class used to resolve class
            names in the rules.

    Returns:
        A `RuleSet`.

    Raises:
        RuleError: A file is unreadable or not valid TOML, or a rule has an
            unknown or missing key, a value of the wrong type, an unknown
            class, a bad direction or layout, or a name used twice in one
            file.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = shipped_rule_files() + [os.fspath(p) for p in paths]
    rules = {}  # name -> (file index, Rule); dicts keep insertion order
    folds = {}
    for index, path in enumerate(files):
        file_rules, file_folds, disabled = _parse_file(path, custom_objects)
        for rule in file_rules:
            rules.pop(rule.name, None)
            rules[rule.name] = (index, rule)
        for name in disabled:
            rules.pop(name, None)
        for fold in file_folds:
            folds.pop(fold.name, None)
            folds[fold.name] = fold
    # Later files first; the stable sort keeps file order within one file.
    ordered = sorted(rules.values(), key=lambda item: -item[0])
    return RuleSet(
        rules=tuple(rule for _, rule in ordered),
        fold_rules=tuple(folds.values()),
        sources=tuple(files),
    )


def resolve_class(name, custom_objects=None):
    """Returns the layer class that `name` designates, or `None`.

    Args:
        name: `"package>Class"` (a registered Keras object), a name in
            `custom_objects`, an attribute path under `keras`
            (`"keras.layers.Dense"`) or `tf_keras`
            (`"tf_keras.layers.BatchNormalization"`), or a bare
            `keras.layers` class name.
        custom_objects: Optional dict name -> class.

    Returns:
        The class, or `None` if nothing of that name is a Keras (or tf-keras)
        layer class.
    """
    if name.startswith("tf_keras."):
        return _tf_keras_class(name)
    candidate = keras.saving.get_registered_object(name, custom_objects)
    if candidate is None and custom_objects:
        # Classes given by value may be keyed by their bare name only.
        candidate = next(
            (c for c in custom_objects.values()
             if isinstance(c, type) and keras.saving.get_registered_name(c) == name),
            None,
        )
    if candidate is None and name.startswith("keras."):
        candidate = keras
        for part in name.split(".")[1:]:
            if not part.isidentifier() or part.startswith("_"):
                return None
            candidate = getattr(candidate, part, None)
    elif candidate is None and name.isidentifier():
        candidate = getattr(keras.layers, name, None)
    if isinstance(candidate, type) and issubclass(candidate, keras.layers.Layer):
        return candidate
    if candidate is None and ">" in name and "tf_keras" in sys.modules:
        # A custom class registered with tf-keras rather than Keras 3.
        candidate = sys.modules["tf_keras"].saving.get_registered_object(name)
        if isinstance(candidate, type) and issubclass(
            candidate, sys.modules["tf_keras"].layers.Layer
        ):
            return candidate
    return None


def _tf_keras_class(name):
    """The tf-keras layer class at attribute path `name` ("tf_keras.X.Y"), or `None`."""
    parts = name.split(".")[1:]
    if not all(p.isidentifier() and not p.startswith("_") for p in parts):
        return None
    try:
        import tf_keras
    except ImportError:
        return None
    candidate = tf_keras
    for part in parts:
        candidate = getattr(candidate, part, None)
    if isinstance(candidate, type) and issubclass(candidate, tf_keras.layers.Layer):
        return candidate
    return None


def _parse_file(path, custom_objects):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise RuleError(
            f"Cannot read rule file {path}: {e.strerror}. "
            f"Check the path. Received: path={path!r}"
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise RuleError(
            f"Rule file {path} is not valid TOML: {e}. Fix the syntax."
        ) from e
    except UnicodeDecodeError as e:
        raise RuleError(
            f"Rule file {path} is not UTF-8 text (byte {e.start}); TOML files "
            "are UTF-8, save it as such."
        ) from e
    ctx = _Context(path)
    _check_keys(ctx, data, _TOP_KEYS, (), "the top level")
    if "version" in data and data["version"] != 1:
        ctx.fail(None, "version", "only version 1 is supported", data["version"])
    rules, disabled, folds = [], [], []
    seen = set()
    for entry in _table_list(ctx, data, "rule"):
        name = _rule_name(ctx, entry, "rule")
        if name in seen:
            ctx.fail(name, "name", "is used by two rules in this file", name)
        seen.add(name)
        if not _optional(ctx, name, entry, "enabled", bool, True):
            disabled.append(name)
            continue
        rules.append(_parse_rule(ctx, name, entry, custom_objects))
    seen = set()
    for entry in _table_list(ctx, data, "fold"):
        name = _rule_name(ctx, entry, "fold")
        if name in seen:
            ctx.fail(name, "name", "is used by two fold rules in this file", name)
        seen.add(name)
        folds.append(_parse_fold(ctx, name, entry, custom_objects))
    return rules, folds, disabled


class _Context:
    """Builds one-line errors that name the file, the rule and the key."""

    def __init__(self, path):
        self.path = path

    def fail(self, rule, key, what, value):
        where = f"rule '{rule}'" if rule else "top level"
        raise RuleError(
            f"Rule file {self.path}, {where}, key '{key}': {what}. "
            f"Received: {key}={value!r}"
        )


def _table_list(ctx, data, key):
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        ctx.fail(None, key, f"must be an array of tables ([[{key}]])", entries)
    return entries


def _rule_name(ctx, entry, kind):
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        ctx.fail(None, "name", f"every [[{kind}]] needs a non-empty string name", name)
    return name


def _check_keys(ctx, table, allowed, required, rule):
    for key in table:
        if key not in allowed:
            ctx.fail(rule, key, f"unknown key; allowed keys are {sorted(allowed)}",
                     table[key])
    for key in required:
        if key not in table:
            ctx.fail(rule, key, "is required", None)


def _optional(ctx, rule, table, key, kind, default):
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kind):
        ctx.fail(rule, key, f"must be of type {kind.__name__}", value)
    return value


def _string(ctx, rule, table, key):
    value = table[key]
    if not isinstance(value, str) or not value:
        ctx.fail(rule, key, "must be a non-empty string", value)
    return value


def _string_list(ctx, rule, table, key, allow_empty=False):
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        ctx.fail(rule, key, "must be an array of non-empty strings", value)
    if not value and not allow_empty:
        ctx.fail(rule, key, "must name at least one class", value)
    return tuple(value)


def _string_table(ctx, rule, table, key):
    value = table.get(key, {})
    if not isinstance(value, dict) or not all(
        isinstance(v, str) and v for v in value.values()
    ):
        ctx.fail(rule, key, "must be a table of string values", value)
    return MappingProxyType(dict(value))


def _classes(ctx, rule, key, names, custom_objects):
    classes = []
    for name in names:
        cls = resolve_class(name, custom_objects)
        if cls is None:
            ctx.fail(
                rule, key,
                "unknown layer class; use a registered name ('package>Class'), "
                "'keras.layers.Class', 'tf_keras.layers.Class', or pass the "
                "class in custom_objects",
                name,
            )
        classes.append(cls)
    return tuple(classes)


def _parse_rule(ctx, name, entry, custom_objects):
    _check_keys(ctx, entry, _RULE_KEYS, _RULE_REQUIRED, name)
    direction = entry["direction"]
    if direction not in DIRECTIONS:
        ctx.fail(name, "direction", f"must be one of {list(DIRECTIONS)}", direction)
    match = _string_list(ctx, name, entry, "match")
    target = _string(ctx, name, entry, "target")
    when = _optional(ctx, name, entry, "when", dict, {})
    config = _optional(ctx, name, entry, "config", dict, {})
    _check_keys(ctx, config, _CONFIG_KEYS, (), name)
    mapping = ConfigMapping(
        drop=_string_list(ctx, name, config, "drop", allow_empty=True),
        rename=_string_table(ctx, name, config, "rename"),
        set=MappingProxyType(dict(_optional(ctx, name, config, "set", dict, {}))),
    )
    return Rule(
        name=name,
        direction=direction,
        match=match,
        match_classes=_classes(ctx, name, "match", match, custom_objects),
        target=target,
        target_class=_classes(ctx, name, "target", (target,), custom_objects)[0],
        when=MappingProxyType(dict(when)),
        config=mapping,
        weights=_string_table(ctx, name, entry, "weights"),
        description=_optional(ctx, name, entry, "description", str, ""),
        source=ctx.path,
    )


def _parse_fold(ctx, name, entry, custom_objects):
    _check_keys(ctx, entry, _FOLD_KEYS, _FOLD_REQUIRED, name)
    _optional(ctx, name, entry, "description", str, "")
    into = _string_list(ctx, name, entry, "into")
    layout = entry["layout"]
    if layout not in FOLD_LAYOUTS:
        ctx.fail(name, "layout", f"must be one of {list(FOLD_LAYOUTS)}", layout)
    return FoldRule(
        name=name,
        into=into,
        layout=layout,
        source=ctx.path,
        classes=_classes(ctx, name, "into", into, custom_objects),
    )
