"""Rule files: which layers are rewritten, into what, and how.

Rules are TOML files (read with the standard library's `tomllib`) validated
field by field (`bnconvert.rule_fields`) into frozen dataclasses
(`bnconvert.rule_types`). The schema is described in `rules/README.md`; in
short, a file holds `[[rule]]` tables (one layer rewrite each: the classes it
matches, optional conditions on their config, the target class, a config key
mapping and a weight mapping) and `[[fold]]` tables (which producer layers a
BatchNormalization may be folded into at inference time).

The shipped rule files live in the top-level `rules/` directory of the source
tree, installed as the package data directory `bnconvert/rules/`. User files
are applied on top of them: a rule with the name of an earlier one replaces
it, and rules from later files take precedence when several match a layer.

Class names are resolved in the model's flavour (`resolve_class`) without
importing anything. A rule's target must be a normalization layer class:
rules are data, and a target such as `Lambda` would let a rule file carry
code.
"""

import importlib.resources
import os
import pathlib
import tomllib
from types import MappingProxyType

from bnconvert import flavour as flavour_lib
from bnconvert import layer_args
from bnconvert import rule_fields
from bnconvert.errors import RuleError
# The data types live in their own module; they are part of this one's API.
from bnconvert.rule_types import ConfigMapping
from bnconvert.rule_types import FoldRule
from bnconvert.rule_types import Rule
from bnconvert.rule_types import RuleSet

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


def load_rules(paths=None, *, custom_objects=None, flavour=None):
    """Loads the shipped rules, then the user's rule files on top.

    Args:
        paths: Optional path or list of paths of user rule files, applied in
            order after the shipped ones. A rule or fold rule named like an
            earlier one replaces it; a rule with `enabled = false` removes
            it.
        custom_objects: Optional dict name -> class used to resolve class
            names in the rules.
        flavour: The `Flavour` whose classes the names resolve to
            (`bnconvert.flavour.flavour_of(model)` gives a model's). With
            `None`, `tf_keras.` names resolve in tf-keras and all others in
            Keras 3. For a Keras 3 flavour, a rule whose match or target
            names only `tf_keras.` classes is a tf-keras rule and is left out.

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
        file_rules, file_folds, disabled = _parse_file(path, custom_objects, flavour)
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


def resolve_class(name, custom_objects=None, flavour=None):
    """Returns the layer class that `name` designates in a flavour, or `None`.

    Args:
        name: `"package>Class"` (a registered object), a name in
            `custom_objects`, an attribute path (`"keras.layers.Dense"`; a
            `tf_keras.` prefix means the same), or a bare `layers` name.
            Paths are read in the flavour's own package: for a tf-keras
            model `"keras.layers.Dense"` is `tf_keras.layers.Dense`, and
            for a Keras 3 model `"tf_keras.layers.Dense"` is
            `keras.layers.Dense`, so one rule file serves both.
        custom_objects: Optional dict name -> class.
        flavour: The `Flavour` to resolve in; by default tf-keras for
            `tf_keras.` names and Keras 3 for all others.

    Returns:
        The class, or `None` if nothing of that name is a layer class of
        the flavour. Nothing is ever imported.
    """
    flavour = flavour or _flavour_for(name, None)
    candidate = flavour.registered_object(name, custom_objects)
    if candidate is None and custom_objects:
        # Classes given by value may be keyed by their bare name only.
        candidate = next(
            (c for c in custom_objects.values()
             if isinstance(c, type) and flavour.registered_name(c) == name),
            None,
        )
    if candidate is None and name.startswith(("keras.", "tf_keras.")):
        candidate = flavour.keras
        for part in name.split(".")[1:]:
            if not part.isidentifier() or part.startswith("_"):
                return None
            candidate = getattr(candidate, part, None)
    elif candidate is None and name.isidentifier():
        candidate = getattr(flavour.keras.layers, name, None)
    if isinstance(candidate, type) and issubclass(candidate, flavour.Layer):
        return candidate
    return None


def _parse_file(path, custom_objects, flavour):
    if os.path.exists(path) and not os.path.isfile(path):
        # A FIFO would block the read forever.
        raise RuleError(
            f"Rule file {path} is not a regular file (a directory, pipe or "
            f"device?); pass a TOML file. Received: path={path!r}"
        )
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except RecursionError as e:
        raise RuleError(
            f"Rule file {path} is nested too deeply to read (hundreds of levels "
            "of tables or arrays); a rule file needs three at most."
        ) from e
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
    ctx = rule_fields.Context(path)
    rule_fields.check_keys(ctx, data, _TOP_KEYS, (), "the top level")
    if "version" in data and data["version"] != 1:
        ctx.fail(None, "version", "only version 1 is supported", data["version"])
    rules, disabled, folds = [], [], []
    seen = set()
    for entry in rule_fields.table_list(ctx, data, "rule"):
        name = rule_fields.rule_name(ctx, entry, "rule")
        if name in seen:
            ctx.fail(name, "name", "is used by two rules in this file", name)
        seen.add(name)
        if not rule_fields.optional(ctx, name, entry, "enabled", bool, True):
            disabled.append(name)
            continue
        rule = _parse_rule(ctx, name, entry, custom_objects, flavour)
        if rule is not None:
            rules.append(rule)
    seen = set()
    for entry in rule_fields.table_list(ctx, data, "fold"):
        name = rule_fields.rule_name(ctx, entry, "fold")
        if name in seen:
            ctx.fail(name, "name", "is used by two fold rules in this file", name)
        seen.add(name)
        folds.append(_parse_fold(ctx, name, entry, custom_objects, flavour))
    return rules, folds, disabled


def _foreign(name, flavour):
    """Whether `name` names the other flavour's class (a tf-keras one, for Keras 3)."""
    return flavour is not None and bool(flavour.other_prefix) and name.startswith(
        flavour.other_prefix
    )


def _flavour_for(name, flavour):
    if flavour is not None:
        return flavour
    tf_keras_name = name.startswith("tf_keras.")
    return flavour_lib.get(flavour_lib.TF_KERAS if tf_keras_name else flavour_lib.KERAS3)


def _classes(ctx, rule, key, names, custom_objects, flavour):
    """Resolves `names`; names of the other flavour's package are left out."""
    classes = []
    for name in names:
        if _foreign(name, flavour):
            continue
        cls = resolve_class(name, custom_objects, _flavour_for(name, flavour))
        if cls is None:
            ctx.fail(
                rule, key,
                "unknown layer class; use a registered name ('package>Class'), "
                "'keras.layers.Class', 'tf_keras.layers.Class' (tf-keras only), or "
                "pass the class in custom_objects",
                name,
            )
        classes.append(cls)
    return tuple(classes)


def _parse_rule(ctx, name, entry, custom_objects, flavour):
    rule_fields.check_keys(ctx, entry, _RULE_KEYS, _RULE_REQUIRED, name)
    direction = entry["direction"]
    if direction not in DIRECTIONS:
        ctx.fail(name, "direction", f"must be one of {list(DIRECTIONS)}", direction)
    match = rule_fields.string_list(ctx, name, entry, "match")
    target = rule_fields.string(ctx, name, entry, "target")
    when = rule_fields.optional(ctx, name, entry, "when", dict, {})
    config = rule_fields.optional(ctx, name, entry, "config", dict, {})
    rule_fields.check_keys(ctx, config, _CONFIG_KEYS, (), name)
    mapping = ConfigMapping(
        drop=rule_fields.string_list(ctx, name, config, "drop", allow_empty=True),
        rename=rule_fields.string_table(ctx, name, config, "rename"),
        set=MappingProxyType(_plain_values(ctx, name, config)),
    )
    match_classes = _classes(ctx, name, "match", match, custom_objects, flavour)
    targets = _classes(ctx, name, "target", (target,), custom_objects, flavour)
    if not match_classes or not targets:
        # A rule naming tf-keras classes only (`tf_keras.layers.X`) is a
        # tf-keras rule: it has nothing to match in a Keras 3 model.
        return None
    target_class = targets[0]
    if not issubclass(target_class, _flavour_for(target, flavour).bn_classes):
        # Rules are data: a target that is not a normalization layer could
        # be a Lambda whose config carries code.
        ctx.fail(
            name, "target",
            "must be a normalization layer class (bnconvert's, a "
            "BatchNormalization class, or a subclass of one)",
            target,
        )
    if flavour is not None:
        match_classes += flavour.match_aliases(match_classes)
    return Rule(
        name=name,
        direction=direction,
        match=match,
        match_classes=match_classes,
        target=target,
        target_class=target_class,
        when=MappingProxyType(dict(when)),
        config=mapping,
        weights=rule_fields.string_table(ctx, name, entry, "weights"),
        description=rule_fields.optional(ctx, name, entry, "description", str, ""),
        source=ctx.path,
    )


def _plain_values(ctx, rule, config):
    """The `set` table. A table value would reach `from_config` as a serialized
    object (`{module = ..., class_name = ...}`), whose module tf-keras imports:
    only plain data is allowed, so that a rule file cannot load code."""
    values = rule_fields.optional(ctx, rule, config, "set", dict, {})
    for key, value in values.items():
        if not rule_fields.is_plain(value):
            ctx.fail(rule, f"set.{key}", "must be a string, number, boolean or array "
                     "of them; serialized objects (tables) are not allowed", value)
    if "sync_group_size" in values:
        # Checked here, before the model loads, with the layer's own bound.
        try:
            layer_args.check_sync_group_size(values["sync_group_size"])
        except ValueError as e:
            ctx.fail(rule, "set.sync_group_size", str(e).split(". Received")[0],
                     values["sync_group_size"])
    return dict(values)


def _parse_fold(ctx, name, entry, custom_objects, flavour):
    rule_fields.check_keys(ctx, entry, _FOLD_KEYS, _FOLD_REQUIRED, name)
    rule_fields.optional(ctx, name, entry, "description", str, "")
    into = rule_fields.string_list(ctx, name, entry, "into")
    layout = entry["layout"]
    if layout not in FOLD_LAYOUTS:
        ctx.fail(name, "layout", f"must be one of {list(FOLD_LAYOUTS)}", layout)
    return FoldRule(
        name=name,
        into=into,
        layout=layout,
        source=ctx.path,
        classes=_classes(ctx, name, "into", into, custom_objects, flavour),
    )


__all__ = [
    "ConfigMapping", "DIRECTIONS", "FOLD_LAYOUTS", "FoldRule", "Rule", "RuleSet",
    "load_rules", "resolve_class", "shipped_rule_files",
]
