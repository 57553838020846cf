"""The rule walk that the Keras 3 and tf-keras converters share.

Both converters (`bnconvert/convert.py`, `bnconvert/compat/tf_keras_convert.py`)
walk a model the same way: each layer is decided once against the rules of
the direction (a shared layer stays shared), every normalization layer no
rule rewrites is reported with the reason, and an inspection walks the
same paths without building anything. What differs between the flavours
(how sublayers are listed, which layers count as normalization layers, how
a rule reads a config, what is done with a layer no rule matches) is left
to the subclasses.
"""

from bnconvert.report import LayerEvent


class RuleWalker:
    """Base of one conversion: the rules, the report, the layers built so far.

    A subclass provides, for its flavour of Keras:

    - `input_layer_class`: the InputLayer class, which inspection passes over.
    - `sublayers(layer)`: the sublayers the walk looks into.
    - `is_normalization(layer)`: whether an unmatched layer gets an event.
    - `why_not(rule, layer)`: why `rule` does not apply to `layer`, or `None`.
    - `is_graph_model(layer)`: whether `layer` is Functional or Sequential.
    - The fates: `_apply(rule, layer, here)`, `_clone_graph(model, here)`
      and `_copy_other(layer, here)`, each returning the new layer.

    and may override `skip_reason(layer)` and `no_rule_reason`.

    Args:
        rules: The rules of the direction, in precedence order.
        direction: `"sync"` or `"inference"`.
        report: The `ConversionReport` that receives the events.
    """

    input_layer_class = None
    # Reason given to a normalization layer no rule of the direction names.
    no_rule_reason = "no {direction} rule matches {kind}"

    def __init__(self, rules, direction, report):
        self.rules = tuple(rules)
        self.direction = direction
        self.report = report
        self.targets = {r.target_class for r in self.rules}
        # id(original layer) -> its counterpart in the new model. The
        # originals stay alive (the caller holds the model), so ids are stable.
        self.memo = {}

    def skip_reason(self, layer):
        """Why `layer` is left alone before any rule is asked, or `None`."""
        return None

    def convert_root(self, model):
        return self.convert(model, "")

    def inspect(self, model):
        """Records the events of a conversion without building anything."""
        seen = set()

        def walk(layer, parent):
            if id(layer) in seen or isinstance(layer, self.input_layer_class):
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
            for child in self.sublayers(layer):
                walk(child, here)

        walk(model, "")

    def convert(self, layer, parent):
        """Returns the new model's counterpart of `layer` (built, with weights)."""
        if id(layer) in self.memo:  # a shared layer stays shared
            return self.memo[id(layer)]
        here = join(parent, layer.name)
        rule = self.decide(layer, here)
        if rule is not None:
            new = self._apply(rule, layer, here)
        elif self.is_graph_model(layer):
            new = self._clone_graph(layer, here)
        else:
            new = self._copy_other(layer, here)
        self.memo[id(layer)] = new
        return new

    def decide(self, layer, here):
        """Returns the rule for `layer`; records an event for every other norm layer."""
        for rule in self.rules:
            if self.why_not(rule, layer) is None:
                return rule
        if not self.is_normalization(layer):
            return None
        kind = type(layer).__name__
        if type(layer) in self.targets:
            action, reason = "unchanged", f"already {kind}"
        else:
            action, reason = "skipped", self.skip_reason(layer)
        if reason is None:
            why = [
                f"{r.name}: {self.why_not(r, layer)}"
                for r in self.rules
                if type(layer) in r.match_classes
            ]
            reason = "; ".join(why) or self.no_rule_reason.format(
                direction=self.direction, kind=kind
            )
        self.report.add(LayerEvent(here, kind, kind, None, action, reason))
        return None


def join(parent, name):
    """The path of layer `name` under the layer path `parent`."""
    return f"{parent}/{name}" if parent else name


def short_name(variable):
    """A variable's name without its scope and `:0` suffix."""
    return variable.name.split("/")[-1].split(":")[0]
