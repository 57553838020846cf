"""The rule data types: a layer rewrite (`Rule`), a fold (`FoldRule`), a `RuleSet`.

Frozen dataclasses, built by `bnconvert.rules` from TOML files; every class
name in them is already resolved for one Keras flavour.
"""

import dataclasses
from types import MappingProxyType


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

    def why_not(self, layer, config_of=None):
        """Returns why this rule does not apply to `layer`, or `None` if it does.

        Args:
            layer: The layer.
            config_of: Optional layer -> config function (the flavour's
                `config_of`); defaults to `layer.get_config()`.
        """
        if type(layer) not in self.match_classes:
            return f"class {type(layer).__name__} is not one of {list(self.match)}"
        if self.when:
            config = config_of(layer) if config_of else layer.get_config()
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
