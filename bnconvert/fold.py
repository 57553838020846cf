"""Fold inference-mode BatchNormalization into the layer that feeds it.

At inference a BatchNormalization layer is a per-channel affine map
of its input `y`:

    BN(y)[c] = gamma[c] * (y[c] - mean[c]) / sqrt(var[c] + eps) + beta[c]
             = s[c] * y[c] + t[c],
    s = gamma / sqrt(var + eps),    t = beta - mean * s

(`mean`, `var` are the moving statistics; `gamma = 1` without `scale`,
`beta = 0` without `center`). When `y` is the output of a linear layer,
`y[c] = sum(W[..., c] * x) + b[c]`, the composition is the same linear
layer with

    W'[..., c] = W[..., c] * s[c]
    b'[c]      = (b[c] - mean[c]) * s[c] + beta[c]     (b = 0 without bias)

so the BN layer can be removed. "Per output channel" means the kernel
axis that indexes the producer's output channels, which differs by
layer kind (the rule's `layout`):

- `conv` (Conv1D/2D/3D, any `groups`) and `dense`: kernel
  `(..., in, out)`, scale the last axis.
- `conv_transpose` (Conv1D/2D/3DTranspose): kernel `(..., out, in)`,
  scale the second-to-last axis.
- `depthwise` (DepthwiseConv1D/2D): kernel `(..., in, multiplier)`;
  output channel `i * multiplier + m` is scaled by `s` reshaped to
  `(in, multiplier)`.
- `separable` (SeparableConv1D/2D): only the pointwise kernel
  `(..., in * multiplier, out)` is scaled, on its last axis.

Keras keeps kernels in this layout whatever `data_format` is; the data
format only decides which axis of the *output* holds the channels
(`channels_last`: the last, `channels_first`: 1), and the BN must
normalize exactly that axis.

The fold is exact only when the producer's activation is linear, its
output feeds this BN and nothing else (no other layer, not a model
output), both layers are called once in the graph, and the BN runs in
inference mode. Otherwise the BN is kept and the report says why.
The arithmetic is done in float64 and cast to each variable's dtype.
"""

import dataclasses

import numpy as np

from bnconvert import flavour as flavour_lib
from bnconvert import keras_internals as internals
from bnconvert import verify
from bnconvert import walk as walk_lib
from bnconvert.errors import ConversionError
from bnconvert.report import LayerEvent

# Which kernel variable holds the output channels, and how the per-channel
# scale `s` is shaped to broadcast against it.
_LAYOUTS = {
    "conv": ("kernel", lambda s, shape: s),
    "dense": ("kernel", lambda s, shape: s),
    "separable": ("pointwise_kernel", lambda s, shape: s),
    "conv_transpose": ("kernel", lambda s, shape: s[:, None]),
    "depthwise": ("kernel", lambda s, shape: s.reshape(shape[-2], shape[-1])),
}
# tf-keras names a depthwise kernel `depthwise_kernel` (Keras 3: `kernel`).
_ALIASES = {"depthwise": ("depthwise_kernel",)}


def _kernel_of(producer, layout):
    """The short name of the weight `layout` scales, as `producer` names it (or None)."""
    names = {_short_name(v) for v in producer.weights}
    for name in (_LAYOUTS[layout][0], *_ALIASES.get(layout, ())):
        if name in names:
            return name
    return None

LAYOUTS = tuple(_LAYOUTS)


@dataclasses.dataclass
class _Fold:
    """One BN-into-producer fold decided for a graph."""

    bn: object
    producer: object
    rule: object


def fold_model(model, fold_rules, report=None, flavour=None, rewritten=None):
    """Folds BatchNormalization into the layer before it, in `model` itself.

    Every plain `BatchNormalization` (exactly that class) whose input is
    produced by a layer that a fold rule names is merged into that layer
    when the fold is exact (see the module docstring); the BN disappears
    from the computation and the producer gets `use_bias=True`. Nested
    Functional and Sequential models are folded too; no other layer is
    touched.

    Args:
        model: A built Functional or Sequential `keras.Model`.
        fold_rules: Iterable of fold rules, each with `name`, `into` (the
            producer class names) and `layout` (one of `LAYOUTS`).
        report: Optional `ConversionReport`; one event per normalization
            layer is added, with action `"folded"` or `"kept"` and the
            reason. Event paths start with the model's name
            (`"model/block/bn"`), as in the conversion.
        flavour: The model's `Flavour` (found from the model if `None`).
        rewritten: Optional list; each layer object rewritten in place (the
            producers and the folded BN) is appended to it.

    Returns:
        `model` itself, folded in place: each folded BN layer object becomes
        an identity layer of the same name and its producer gets the folded
        kernel and bias, so the model keeps its class, config and graph. A
        subclassed model, whose graph is unknown, is left as it is (every
        BN is then reported as kept).

    Raises:
        ConversionError: A fold rule names an unknown layout.
    """
    rules = tuple(fold_rules)
    for rule in rules:
        if rule.layout not in _LAYOUTS:
            raise ConversionError(
                f"Fold rule '{rule.name}' has an unknown layout; use one of "
                f"{list(LAYOUTS)}. Received: layout={rule.layout!r}"
            )
    flavour = flavour or flavour_lib.flavour_of(model)
    folder = _Folder(rules, report, flavour)
    folded = folder.fold(model, prefix=model.name)
    if rewritten is not None:
        rewritten.extend(folder.rewritten)
    return folded


class _Folder:
    def __init__(self, rules, report, flavour):
        self.rules = rules
        self.report = report
        self.flavour = flavour
        self.rewritten = []

    # -- entry per model ---------------------------------------------------

    def fold(self, model, prefix):
        if isinstance(model, self.flavour.Sequential):
            return self._fold_sequential(model, prefix)
        if self.flavour.is_graph_model(model):
            return self._fold_functional(model, prefix)
        for path, layer in walk_lib.normalization_layers(model, self.flavour):
            self._event(path.rsplit("/", 1)[0], layer, None, "kept",
                        f"model '{model.name}' is subclassed: its graph is not known")
        return model

    def _fold_sequential(self, model, prefix):
        layers = list(model.layers)
        if not model.built or not model.inputs:
            for path, layer in walk_lib.normalization_layers(model, self.flavour):
                self._event(path.rsplit("/", 1)[0], layer, None, "kept",
                            f"Sequential model '{model.name}' has no Input: it is not built")
            return model
        folds = {}
        for i, layer in enumerate(layers):
            if not self._candidate(prefix, layer):
                continue
            if i == 0:
                self._event(prefix, layer, None, "kept", "its input is the model input")
                continue
            producer = layers[i - 1]
            if layers.count(layer) > 1 or layers.count(producer) > 1:
                self._event(prefix, layer, None, "kept",
                            "the layer or its producer is used more than once")
                continue
            rank = len(_input_shape(layer))
            self._decide(prefix, layer, producer, rank, consumers=1,
                         training=None, folds=folds)
        self._apply(folds)
        for layer in layers:
            if isinstance(layer, self.flavour.Model):
                self.fold(layer, _join(prefix, layer.name))
        return model

    def _fold_functional(self, model, prefix):
        nodes = internals.graph_nodes(model)
        calls = {}
        consumers = {}
        for node in nodes:
            if node.layer is None or node.is_input:
                continue
            calls[id(node.layer)] = calls.get(id(node.layer), 0) + 1
            for t in node.input_tensors:
                consumers[id(t)] = consumers.get(id(t), 0) + 1
        for t in model.outputs:
            consumers[id(t)] = consumers.get(id(t), 0) + 1

        folds = {}
        met = set()  # a layer called at several sites is decided (and reported) once
        for node in nodes:
            bn = node.layer
            if node.is_input or id(bn) in met:
                continue
            met.add(id(bn))
            if not self._candidate(prefix, bn):
                continue
            if calls[id(bn)] > 1:
                self._event(prefix, bn, None, "kept",
                            "the layer is called more than once in the graph")
                continue
            tensors = node.input_tensors
            if len(tensors) != 1:
                self._event(prefix, bn, None, "kept", "its call has more than one input tensor")
                continue
            y = tensors[0]
            producer, producer_is_input = internals.producer_of(y)
            if producer_is_input or id(producer) not in calls:
                self._event(prefix, bn, None, "kept", "its input is the model input")
                continue
            if calls[id(producer)] > 1:
                self._event(prefix, bn, None, "kept",
                            f"its producer '{producer.name}' is called more than once")
                continue
            training = node.kwargs.get("training")
            self._decide(prefix, bn, producer, len(y.shape),
                         consumers=consumers[id(y)], training=training, folds=folds)

        self._apply(folds)
        nested = {id(n.layer): n.layer for n in nodes if isinstance(n.layer, self.flavour.Model)}
        for layer in nested.values():
            self.fold(layer, _join(prefix, layer.name))
        return model

    # -- decisions ---------------------------------------------------------

    def _candidate(self, prefix, layer):
        """Whether `layer` is a BN to consider; a BN whose maths may differ is kept."""
        if not walk_lib.is_normalization(layer, self.flavour):
            return False
        if walk_lib.is_plain_bn(layer, self.flavour):
            return True
        self._event(
            prefix, layer, None, "kept",
            f"{type(layer).__name__} is not plain BatchNormalization (a subclass or "
            "a synchronized layer): its inference maths may differ from the fold's",
        )
        return False

    def _decide(self, prefix, bn, producer, rank, consumers, training, folds):
        """Record in `folds` (keyed by BN id) when the fold is exact."""
        rule = self._rule_for(producer)
        kind = type(producer).__name__
        if rule is None:
            reason = f"producer '{producer.name}' ({kind}) is not foldable: no fold rule names it"
            self._event(prefix, bn, None, "kept", reason)
            return
        why = _why_not(bn, producer, rule, rank, consumers, training)
        if why:
            self._event(prefix, bn, rule, "kept", why)
            return
        folds[id(bn)] = _Fold(bn, producer, rule)
        self._event(prefix, bn, rule, "folded",
                    f"folded into '{_join(prefix, producer.name)}' ({kind})",
                    class_after=kind)

    def _rule_for(self, producer):
        """The first fold rule naming the producer's exact class, or None."""
        for rule in self.rules:
            if type(producer) in rule.classes:
                return rule
        return None

    # -- rewriting in place --------------------------------------------------

    def _apply(self, folds):
        """Gives each producer its folded weights and turns each folded BN into an identity."""
        for fold in folds.values():
            producer, bn = fold.producer, fold.bn
            values = _folded_weights(fold)
            have = {_short_name(v): v for v in producer.weights}
            if set(values) <= set(have):
                # The producer already has a bias: new values, same layer
                # (re-creating it costs a third of a ResNet50 fold).
                for name, value in values.items():
                    have[name].assign(value.astype(_dtype(have[name])))
            else:
                config = dict(producer.get_config(), use_bias=True)
                folded = self.flavour.from_config(type(producer), config)
                self.flavour.build_like(producer, folded)
                for var in folded.weights:
                    var.assign(values[_short_name(var)].astype(_dtype(var)))
                folded.trainable = producer.trainable
                internals.become(producer, folded)
            internals.become(bn, self.flavour.identity_like(bn))
            self.rewritten += [producer, bn]

    # -- report ------------------------------------------------------------

    def _event(self, prefix, layer, rule, action, reason, class_after=None):
        if self.report is None:
            return
        kind = type(layer).__name__
        fields = dict(
            path=_join(prefix, layer.name),
            class_before=kind,
            class_after=class_after if class_after is not None else kind,
            rule=getattr(rule, "name", None),
            action=action,
            reason=reason,
        )
        self.report.add(LayerEvent(**fields))


def _why_not(bn, producer, rule, rank, consumers, training):
    """Why folding `bn` into `producer` would be wrong, or None."""
    name = producer.name
    config = producer.get_config()
    activation = config.get("activation", "linear")
    if activation not in (None, "linear"):
        shown = activation if isinstance(activation, str) else getattr(
            producer.activation, "__name__", repr(activation))
        return f"producer '{name}' has nonlinear activation '{shown}'"
    if consumers > 1:
        return (f"producer '{name}' output is used {consumers} times "
                "(by other layers or as a model output)")
    if training is True:
        return "the BN is called with training=True"
    if getattr(producer, "quantization_mode", None):
        return f"producer '{name}' is quantized ({producer.quantization_mode})"
    if getattr(producer, "lora_enabled", False):
        return f"producer '{name}' has LoRA enabled"
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    axes = sorted({int(a) % rank for a in axes})
    if rule.layout == "dense" or config.get("data_format", "channels_last") == "channels_last":
        channel_axis = rank - 1
    else:
        channel_axis = 1
    if axes != [channel_axis]:
        return (f"the BN normalizes axis {axes if len(axes) > 1 else axes[0]} but "
                f"producer '{name}' puts its channels on axis {channel_axis}")
    if not producer.built or not bn.built:
        return f"producer '{name}' or the BN is not built"
    if _kernel_of(producer, rule.layout) is None:
        kernel = _LAYOUTS[rule.layout][0]
        return f"producer '{name}' has no '{kernel}' weight for layout '{rule.layout}'"
    return None


def _folded_weights(fold):
    """The producer's weights with the BN folded in, as float64 arrays."""
    bn, producer = fold.bn, fold.producer
    mean = _f64(bn.moving_mean)
    var = _f64(bn.moving_variance)
    gamma = _f64(bn.gamma) if bn.scale else np.ones_like(mean)
    beta = _f64(bn.beta) if bn.center else np.zeros_like(mean)
    s = gamma / np.sqrt(var + float(bn.epsilon))
    values = {_short_name(v): _f64(v) for v in producer.weights}
    _, shape_scale = _LAYOUTS[fold.rule.layout]
    kernel_name = _kernel_of(producer, fold.rule.layout)
    kernel = values[kernel_name]
    values[kernel_name] = kernel * shape_scale(s, kernel.shape)
    bias = values.get("bias", np.zeros_like(mean))
    values["bias"] = (bias - mean) * s + beta
    return values


def _dtype(variable):
    # Its dtype, without reading its value (a copy of ResNet50's kernels).
    return verify.numpy_dtype(variable.dtype)


def _f64(variable):
    return np.asarray(variable.numpy(), dtype=np.float64)


_short_name = walk_lib.short_name


def _input_shape(layer):
    config = layer.get_build_config() or {}
    return config.get("input_shape") or ()


_join = walk_lib.join
