"""The walk that rewrites a model's normalization layers in place, for either flavour.

The converter walks every layer of a model once (a shared layer is met
once) and rewrites only the layers a rule matches: a layer of the rule's
target class is built from the mapped config, under the flavour's safe
mode, with the same build shape, the weights are carried by name, and the
original layer object then *becomes* the new layer
(`keras_internals.become`). Every graph node, container attribute and
symbolic tensor that referred to the old layer now refers to the new one,
so nothing else is re-created: the model keeps its own class and config
(keras-hub `Backbone` subclasses), raw `keras.ops` nodes, custom layers
and nested models stay exactly as Keras built them.

The model given is modified; `bnconvert.convert.convert_model` hands it a
fresh copy made by Keras's own save and load. Every normalization layer
(`bnconvert.walk.is_normalization`) gets a `LayerEvent`, including those
left alone and why.
"""

from bnconvert import keras_internals as internals
from bnconvert import walk as walk_lib
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
        self.rewritten = []  # the layer objects rewritten in place, in order

    # -- entry points -------------------------------------------------------

    def convert_in_place(self, model):
        """Rewrites the matched layers of `model` in place; returns `model`."""
        self._walk(model, apply=True)
        return model

    def inspect(self, model):
        """Records the events of a conversion without changing anything."""
        self._walk(model, apply=False)

    def _walk(self, model, apply):
        seen = set()

        def visit(layer, parent):
            if id(layer) in seen or isinstance(layer, self.flavour.InputLayer):
                return
            seen.add(id(layer))
            here = join(parent, layer.name)
            rule = self.decide(layer, here)
            if rule is None:
                for child in self.flavour.sublayers(layer):
                    visit(child, here)
            elif apply:
                self._apply(rule, layer, here)
            else:
                self.report.add(LayerEvent(
                    here, type(layer).__name__, rule.target_class.__name__,
                    rule.name, "applied", "would apply (inspection only)",
                ))

        visit(model, "")

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
        if new.trainable != layer.trainable:
            new.trainable = layer.trainable
        internals.become(layer, new)
        self.rewritten.append(layer)
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
