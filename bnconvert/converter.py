"""The walk that rewrites a model, for either flavour.

The converter walks the model once, building a new model beside it; the
original is never modified. Each layer is decided once (a shared layer
stays shared) and meets one of four fates:

- A rule matches it (its exact class is named, its config meets the rule's
  `when`): a layer of the rule's target class is built from the mapped
  config, under the flavour's safe mode, with the same build shape, and
  the weights are carried by name.
- It is a Functional or Sequential model: the flavour clones its graph,
  every layer going through the converter again, so nesting, shared
  layers and several inputs/outputs are kept as they are.
- It holds sublayers of its own (a subclassed model, a custom layer): see
  `bnconvert.rebuild` (Keras 3; refused for tf-keras, whose flavour says
  why).
- Otherwise it is rebuilt from its config with the original's weights.

Every normalization layer (`bnconvert.walk.is_normalization`) gets a
`LayerEvent`, including those left alone and why.
"""

from bnconvert import rebuild
from bnconvert import walk as walk_lib
from bnconvert.errors import BnconvertError
from bnconvert.errors import ConversionError
from bnconvert.errors import first_line
from bnconvert.report import LayerEvent
from bnconvert.walk import join
from bnconvert.walk import short_name


class Converter:
    """One conversion: the flavour, the rules, the report, what was built so far.

    Args:
        flavour: The model's `Flavour`.
        ruleset: The `RuleSet`, resolved for that flavour.
        direction: `"sync"` or `"inference"`.
        report: The `ConversionReport` that receives the events.
        custom_objects: Dict name -> class, for re-creating layers.
    """

    def __init__(self, flavour, ruleset, direction, report, custom_objects=None):
        self.flavour = flavour
        self.rules = ruleset.for_direction(direction)
        self.direction = direction
        self.report = report
        self.custom_objects = dict(custom_objects or {})
        self.targets = {r.target_class for r in self.rules}
        self.named = walk_lib.named_classes(ruleset.rules)
        # id(original layer) -> its counterpart in the new model. The
        # originals stay alive (the caller holds the model), so ids are stable.
        self.memo = {}
        self.pending_weights = []  # (original, new) built only once called

    # -- entry points -------------------------------------------------------

    def convert_root(self, model):
        """Returns the converted counterpart of `model`, weights and `trainable` carried."""
        new = self.convert(model, "")
        for original, layer in self.pending_weights:
            self.carry_all_weights(original, layer, "")
        self._carry_trainable(model, set())
        return new

    def inspect(self, model):
        """Records the events of a conversion without building anything."""
        seen = set()

        def visit(layer, parent):
            if id(layer) in seen or isinstance(layer, self.flavour.InputLayer):
                return
            seen.add(id(layer))
            here = join(parent, layer.name)
            rule = self.decide(layer, here)
            if rule is not None:
                self.report.add(LayerEvent(
                    here, type(layer).__name__, rule.target_class.__name__,
                    rule.name, "applied", "would apply (inspection only)",
                ))
                return
            for child in self.flavour.sublayers(layer):
                visit(child, here)

        visit(model, "")

    def convert(self, layer, parent):
        """Returns the new model's counterpart of `layer` (built, with weights)."""
        if id(layer) in self.memo:  # a shared layer stays shared
            return self.memo[id(layer)]
        here = join(parent, layer.name)
        rule = self.decide(layer, here)
        if rule is not None:
            new = self._apply(rule, layer, here)
        elif self.flavour.is_graph_model(layer):
            new = self._clone_graph(layer, here)
        elif self.flavour.sublayers(layer):
            new = self._copy_container(layer, here)
        else:
            new = self.copy_leaf(layer, here)
        self.memo[id(layer)] = new
        return new

    def decide(self, layer, here):
        """Returns the rule for `layer`; records an event for every other norm layer."""
        for rule in self.rules:
            if self.why_not(rule, layer) is None:
                return rule
        if not walk_lib.is_normalization(layer, self.flavour, self.named):
            return None
        kind = type(layer).__name__
        if type(layer) in self.targets:
            action, reason = "unchanged", f"already {kind}"
        elif isinstance(layer, self.flavour.bn_classes) and type(layer) not in self.named:
            action, reason = "skipped", (
                f"{kind} is a subclass of BatchNormalization that no rule names; "
                "add a rule naming it to convert it"
            )
        else:
            action = "skipped"
            why = [
                f"{r.name}: {self.why_not(r, layer)}"
                for r in self.rules if type(layer) in r.match_classes
            ]
            reason = "; ".join(why) or f"no {self.direction} rule matches {kind}"
        self.report.add(LayerEvent(here, kind, kind, None, action, reason))
        return None

    def why_not(self, rule, layer):
        """Why `rule` does not apply to `layer`, or `None`."""
        return rule.why_not(layer, self.flavour.config_of)

    # -- the fates ----------------------------------------------------------

    def _apply(self, rule, layer, here):
        kind = type(layer).__name__
        target = rule.target_class
        config = rule.config.apply(self.flavour.config_of(layer))
        config = self.flavour.target_config(layer, config, target)
        source = {short_name(v): v for v in layer.weights}
        preset = {}
        try:
            new = self.flavour.from_config(target, config, self.custom_objects)
            if layer.built:
                preset = self.flavour.build_like(
                    layer, new, lambda name: source.get(rule.source_weight_name(name))
                )
        except Exception as e:
            raise ConversionError(
                f"Rule '{rule.name}' cannot rewrite layer '{here}' ({kind}) into "
                f"{target.__name__}: {first_line(e)}. Fix the rule's [rule.config] "
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
            name = rule.source_weight_name(short_name(variable))
            if name not in source:
                raise ConversionError(
                    f"Rule '{rule.name}': layer '{here}' has no weight '{name}' for "
                    f"the target's weight '{short_name(variable)}'; map it in "
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
                f"{[short_name(v) for v in new.weights]}"
            )
        return used

    def _clone_graph(self, model, here):
        try:
            return self.flavour.clone_graph(
                model, lambda layer: self.convert(layer, here)
            )
        except BnconvertError:
            raise
        except Exception as e:
            raise ConversionError(
                f"Cannot rebuild model '{here}' ({type(model).__name__}): "
                f"{first_line(e)}"
            ) from e

    def _copy_container(self, layer, here):
        if self.flavour.containers is None:
            return rebuild.copy_container(self, layer, here)
        inner = [
            path for path, sub in walk_lib.normalization_layers(layer, self.flavour, self.named)
        ]
        if isinstance(layer, self.flavour.Model) or inner:
            raise ConversionError(
                f"Layer '{here}' ({type(layer).__name__}) is a subclassed "
                f"{self.flavour.label} model or a custom layer holding "
                f"normalization layers: {self.flavour.containers}."
            )
        return self.copy_leaf(layer, here)

    def copy_leaf(self, layer, here):
        """Re-creates `layer` from its config, built like it, with its weights."""
        try:
            # A Lambda's function is already in this process: re-creating it
            # runs no code from an untrusted file.
            safe = not isinstance(layer, self.flavour.Lambda)
            new = self.flavour.from_config(
                type(layer), layer.get_config(), self.custom_objects, safe_mode=safe
            )
            preset = {}
            if layer.built and layer.weights:
                preset = self.flavour.build_like(layer, new, _unique_names(layer.weights).get)
        except Exception as e:
            raise ConversionError(
                f"Cannot copy layer '{here}' ({type(layer).__name__}): "
                f"{first_line(e)}. Check its get_config()/from_config(), or pass "
                "its class in custom_objects."
            ) from e
        if new.weights or not layer.weights:
            self.carry_all_weights(layer, new, here, preset)
        else:
            self.pending_weights.append((layer, new))
        return new

    # -- finishing ----------------------------------------------------------

    def carry_all_weights(self, original, new, here, preset=None):
        """Gives `new` the values of all of `original`'s weights, in order."""
        if (
            preset
            and _plain_weight_access(original, self.flavour)
            and _plain_weight_access(new, self.flavour)
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
        for child in self.flavour.sublayers(layer):
            self._carry_trainable(child, seen)


def _plain_weight_access(layer, flavour):
    """Whether `layer` gets and sets its weights as Keras does (no override)."""
    cls = type(layer)
    return (
        cls.get_weights is flavour.Layer.get_weights
        and cls.set_weights is flavour.Layer.set_weights
    )


def _unique_names(variables):
    """Maps each short name that occurs once among `variables` to its variable."""
    by_name = {}
    for variable in variables:
        by_name.setdefault(short_name(variable), []).append(variable)
    return {name: found[0] for name, found in by_name.items() if len(found) == 1}
