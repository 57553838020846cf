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

import keras
import numpy as np

from bnconvert.errors import ConversionError

try:  # The report classes are owned by bnconvert.report.
    from bnconvert.report import LayerEvent
except ImportError:  # pragma: no cover - only while report.py is missing
    LayerEvent = None

# Which kernel variable holds the output channels, and how the per-channel
# scale `s` is shaped to broadcast against it.
_LAYOUTS = {
    "conv": ("kernel", lambda s, shape: s),
    "dense": ("kernel", lambda s, shape: s),
    "separable": ("pointwise_kernel", lambda s, shape: s),
    "conv_transpose": ("kernel", lambda s, shape: s[:, None]),
    "depthwise": ("kernel", lambda s, shape: s.reshape(shape[-2], shape[-1])),
}

LAYOUTS = tuple(_LAYOUTS)


@dataclasses.dataclass
class _Fold:
    """One BN-into-producer fold decided for a graph."""

    bn: keras.layers.Layer
    producer: keras.layers.Layer
    rule: object


def fold_model(model, fold_rules, report=None):
    """Return a copy of `model` with BatchNormalization folded away.

    Every `keras.layers.BatchNormalization` (and subclass) whose input is
    produced by a layer that a fold rule names is merged into that layer
    when the fold is exact (see the module docstring); the BN disappears
    from the graph and the producer gets `use_bias=True`. Nested
    Functional and Sequential models are folded too. All other layers are
    copied with their weights; the input model is not modified.

    Args:
        model: A built Functional or Sequential `keras.Model`.
        fold_rules: Iterable of fold rules, each with `name`, `into` (the
            producer class names) and `layout` (one of `LAYOUTS`).
        report: Optional report with an `events` list (or an `add`
            method); one event per BN layer is appended, with action
            `"folded"` or `"kept"` and the reason. Event paths start with
            the model's name (`"model/block/bn"`), as in the conversion.

    Returns:
        A new `keras.Model` of the same kind, or `model` itself when it is
        a subclassed model whose graph cannot be rebuilt (every BN is
        then reported as kept).

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
    return _Folder(rules, report).fold(model, prefix=model.name)


class _Folder:
    def __init__(self, rules, report):
        self.rules = rules
        self.report = report

    # -- entry per model ---------------------------------------------------

    def fold(self, model, prefix):
        if isinstance(model, keras.Sequential):
            return self._fold_sequential(model, prefix)
        if isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth"):
            return self._fold_functional(model, prefix)
        for layer in _bn_layers(model):
            self._event(prefix, layer, None, "kept",
                        f"model '{model.name}' is subclassed: its graph cannot be rebuilt")
        return model

    def _fold_sequential(self, model, prefix):
        layers = list(model.layers)
        if not model.built or not model.inputs:
            for layer in _bn_layers(model):
                self._event(prefix, layer, None, "kept",
                            f"Sequential model '{model.name}' has no Input: it is not built")
            return model
        folds = {}
        for i, layer in enumerate(layers):
            if not _is_bn(layer):
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
        clones = {}
        new_layers = [
            self._clone(layer, folds, clones, prefix)
            for layer in layers
            if id(layer) not in folds
        ]
        inputs = _fresh_input(model.inputs[0])
        folded = keras.Sequential([inputs] + new_layers, name=model.name,
                                  trainable=model.trainable)
        self._carry_weights(clones, folds)
        return folded

    def _fold_functional(self, model, prefix):
        by_depth = model._nodes_by_depth
        nodes = [n for depth in sorted(by_depth, reverse=True) for n in by_depth[depth]]
        calls = {}
        consumers = {}
        for node in nodes:
            if node.operation is None or node.is_input:
                continue
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
            for t in node.input_tensors:
                consumers[id(t)] = consumers.get(id(t), 0) + 1
        for t in model.outputs:
            consumers[id(t)] = consumers.get(id(t), 0) + 1
        graph_nodes = {id(n) for n in nodes}

        folds = {}
        for node in nodes:
            bn = node.operation
            if node.is_input or not _is_bn(bn):
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
            producer, node_index, _ = y._keras_history
            producer_node = producer._inbound_nodes[node_index]
            if id(producer_node) not in graph_nodes or producer_node.is_input:
                self._event(prefix, bn, None, "kept", "its input is the model input")
                continue
            if calls[id(producer)] > 1:
                self._event(prefix, bn, None, "kept",
                            f"its producer '{producer.name}' is called more than once")
                continue
            training = node.arguments.kwargs.get("training")
            self._decide(prefix, bn, producer, len(y.shape),
                         consumers=consumers[id(y)], training=training, folds=folds)

        clones = {}

        def clone_function(layer):
            return self._clone(layer, folds, clones, prefix)

        def call_function(layer, *args, **kwargs):
            if id(layer) in folds:
                return args[0] if args else kwargs["inputs"]
            return layer(*args, **kwargs)

        folded = keras.models.clone_model(
            model,
            input_tensors=keras.tree.map_structure(_fresh_input, model.input),
            clone_function=clone_function,
            call_function=call_function,
        )
        self._carry_weights(clones, folds)
        return folded

    # -- decisions ---------------------------------------------------------

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
        kind = type(producer)
        for rule in self.rules:
            classes = getattr(rule, "classes", ())
            if classes:
                if kind in classes:
                    return rule
            elif kind.__name__ in rule.into and getattr(keras.layers, kind.__name__, kind) is kind:
                # Unresolved rule: match the bare name, but a user subclass
                # that merely shares a Keras layer's name is not that layer.
                return rule
        return None

    # -- rebuilding --------------------------------------------------------

    def _clone(self, layer, folds, clones, prefix):
        if isinstance(layer, keras.Model):
            return self.fold(layer, _join(prefix, layer.name))
        if id(layer) in folds:
            return layer  # never called: call_function bypasses it
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless op (e.g. `x + y` on KerasTensors)
        config = layer.get_config()
        if _fold_of_producer(layer, folds) is not None:
            config["use_bias"] = True
        clone = type(layer).from_config(config)
        clones[id(layer)] = (layer, clone)
        return clone

    def _carry_weights(self, clones, folds):
        for layer, clone in clones.values():
            fold = _fold_of_producer(layer, folds)
            if fold is None:
                clone.set_weights(layer.get_weights())
                continue
            values = _folded_weights(fold)
            for var in clone.weights:
                var.assign(values[_short_name(var)].astype(var.dtype))

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
        event = LayerEvent(**fields) if LayerEvent is not None else fields
        if hasattr(self.report, "add"):
            self.report.add(event)
        else:
            self.report.events.append(event)


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
    kernel, _ = _LAYOUTS[rule.layout]
    if kernel not in {_short_name(v) for v in producer.weights}:
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
    kernel_name, shape_scale = _LAYOUTS[fold.rule.layout]
    kernel = values[kernel_name]
    values[kernel_name] = kernel * shape_scale(s, kernel.shape)
    bias = values.get("bias", np.zeros_like(mean))
    values["bias"] = (bias - mean) * s + beta
    return values


def _f64(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)


def _short_name(variable):
    return variable.name


def _fold_of_producer(layer, folds):
    for fold in folds.values():
        if fold.producer is layer:
            return fold
    return None


def _fresh_input(tensor):
    """A new `keras.Input` like `tensor`, named after its InputLayer."""
    layer = tensor._keras_history[0]
    return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=layer.name)


def _is_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def _bn_layers(model):
    found = []
    for layer in getattr(model, "layers", []):
        if _is_bn(layer):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(_bn_layers(layer))
    return found


def _input_shape(layer):
    config = layer.get_build_config() or {}
    return config.get("input_shape") or ()


def _join(prefix, name):
    return f"{prefix}/{name}" if prefix else name
