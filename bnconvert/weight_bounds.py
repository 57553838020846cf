"""How many weights a model's config makes Keras create, bounded from below.

A 2 KB file declaring `Dense(10**9)` makes Keras allocate 16 GB while it
builds the layer, before any weight is read. Every built layer's weights
are stored in the model file, so a config is refused when it declares far
more weights than the file stores: counted as float32, they may take at
most eight times the bytes the file stores for weights (a weight takes half
a byte at least, int4) plus `BNCONVERT_MAX_DECLARED_MB` (default 1024)
megabytes.

The count is a lower bound, so that no real file is refused: only layer
types whose weights follow from their config are counted (dense,
convolutional, recurrent, embedding, normalization and attention layers),
each from its config and its input's last dimension. That dimension comes
from the shape the layer records (`build_config`, `build_input_shape`,
`batch_input_shape`), else from the layer feeding it in the model's graph
(tf-keras `.h5` files record no shapes), through layers whose output's
last dimension is known; where it is unknown it counts as 1.
"""

import json
import math
import os
import re

from bnconvert.errors import ModelLoadError

DECLARED_LIMIT_ENV = "BNCONVERT_MAX_DECLARED_MB"
DEFAULT_DECLARED_LIMIT_MB = 1024
_CAP = 1 << 64

_CONV = re.compile(r"^(Separable|Depthwise)?Conv(?:olution)?([123])D(Transpose)?$")
_RNN_GATES = {
    "LSTM": 4, "LSTMCell": 4, "GRU": 3, "GRUCell": 3, "SimpleRNN": 1, "SimpleRNNCell": 1,
}
_BN_CLASSES = ("BatchNormalization", "SyncBatchNormalization")
# Layers whose output has their input's last dimension (channels last).
_KEEP_LAST_DIM = frozenset({
    "InputLayer", *_BN_CLASSES, "LayerNormalization", "Activation", "ReLU", "LeakyReLU",
    "ELU", "Softmax", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "GaussianNoise", "GaussianDropout", "Add", "Subtract", "Multiply", "Average", "Maximum",
    "Minimum", *(f"{kind}{n}D" for n in (1, 2, 3) for kind in (
        "MaxPooling", "AveragePooling", "GlobalMaxPooling", "GlobalAveragePooling",
        "ZeroPadding", "UpSampling", "Cropping",
    )),
})


def human_size(n):
    """`n` bytes for people: `16 GB`, `11.4 KB`."""
    n = float(min(n, 10 ** 300))
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1024


def _count(value):
    """A config value as a whole number in [0, 2**64] (0 if it is none)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, float):
        value = int(min(value, _CAP)) if math.isfinite(value) else 0
    elif isinstance(value, str):
        value = value.strip()
        value = int(value) if value.isdigit() and len(value) < 30 else 0
    return min(value, _CAP) if isinstance(value, int) and value > 0 else 0


def _input_shape(entry):
    """The input shape a serialized layer records (first input's), or `None`."""
    config = entry["config"]
    build = entry.get("build_config")
    build = build if isinstance(build, dict) else {}
    candidates = (
        build.get("input_shape"),
        build.get("shapes_dict"),
        entry.get("build_input_shape"),
        config.get("batch_input_shape"),
        config.get("batch_shape"),
    )
    for shape in candidates:
        while isinstance(shape, list) and shape and isinstance(shape[0], list):
            shape = shape[0]
        if isinstance(shape, dict) and shape:
            shape = next(iter(shape.values()))
        if isinstance(shape, list) and shape:
            return shape
    return None


def _dim(shape, axis):
    """`shape[axis]` as a count, or 1 (a lower bound) when unknown."""
    if not isinstance(shape, list) or not isinstance(axis, int):
        return 1
    if not -len(shape) <= axis < len(shape):
        return 1
    return max(_count(shape[axis]), 1)


def _kernel(config, rank):
    size = config.get("kernel_size")
    sizes = size if isinstance(size, list) else [size] * rank
    product = 1
    for k in sizes:  # capped as it goes: a crafted list cannot make a huge number
        product = min(product * max(_count(k), 1), _CAP)
    return product


def _shape_of(entry, last_dim=None):
    """The layer's recorded input shape, else `[None, last_dim]` (channels last only)."""
    shape = _input_shape(entry)
    if shape is None and last_dim and entry["config"].get("data_format") != "channels_first":
        shape = [None, last_dim]
    return shape


def declared_weights(entry, last_dim=None):
    """A lower bound of the weights the serialized layer `entry` creates when built.

    Args:
        entry: `{"class_name": ..., "config": {...}, ...}` as a file holds it.
        last_dim: The input's last dimension if known from the graph; used
            when the entry records no input shape.
    """
    cls, config, shape = entry["class_name"], entry["config"], _shape_of(entry, last_dim)
    channels = _dim(shape, 1 if config.get("data_format") == "channels_first" else -1)
    units = _count(config.get("units"))
    if cls == "Dense":
        return units * _dim(shape, -1)
    if cls in _RNN_GATES:
        return _RNN_GATES[cls] * units * (units + _dim(shape, -1))
    if cls == "Embedding":
        return _count(config.get("input_dim")) * _count(config.get("output_dim"))
    if cls in _BN_CLASSES:
        axis = config.get("axis", -1)
        return 2 * _dim(shape, axis[0] if isinstance(axis, list) and axis else axis)
    if cls == "MultiHeadAttention":
        return _attention(config, entry.get("build_config"))
    conv = _CONV.match(cls)
    if conv is None:
        return 0
    kind, rank = conv.group(1), int(conv.group(2))
    kernel, filters = _kernel(config, rank), _count(config.get("filters"))
    multiplier = _count(config.get("depth_multiplier", 1))
    if kind == "Depthwise":
        return multiplier * kernel * channels
    if kind == "Separable":
        return multiplier * channels * (kernel + filters)
    groups = _count(config.get("groups", 1)) or 1
    return filters * kernel * max(channels // groups, 1)


def _attention(config, build):
    """Query, key, value and output kernels of a `MultiHeadAttention`."""
    build = build if isinstance(build, dict) else {}
    # Keras 3 records a build with several shapes as {"shapes_dict": {...}}.
    build = build.get("shapes_dict", build)
    build = build if isinstance(build, dict) else {}
    query = _dim(build.get("query_shape"), -1)
    value = _dim(build.get("value_shape"), -1)
    key = _dim(build.get("key_shape") or build.get("value_shape"), -1)
    out = query if config.get("output_shape") is None else 1
    key_dim = _count(config.get("key_dim"))
    value_dim = _count(config.get("value_dim")) or key_dim
    return _count(config.get("num_heads")) * (key_dim * (query + key) + value_dim * (value + out))


def _output_last_dim(entry, last_dim):
    """The last dimension of the layer's output where it surely is, else `None`."""
    cls, config = entry["class_name"], entry["config"]
    if config.get("data_format") == "channels_first":
        return None
    shape = _input_shape(entry)
    if shape is not None:
        last_dim = _count(shape[-1]) or last_dim
    conv = _CONV.match(cls)
    if cls == "Dense" or cls in _RNN_GATES:
        return _count(config.get("units")) or None
    if cls == "Embedding":
        return _count(config.get("output_dim")) or None
    if conv and conv.group(1) == "Depthwise":
        return (last_dim or 0) * _count(config.get("depth_multiplier", 1)) or None
    if conv:
        return _count(config.get("filters")) or None
    return last_dim if cls in _KEEP_LAST_DIM else None


def is_serialized(value):
    """Whether `value` is a serialized object: `{"class_name": ..., "config": {...}}`."""
    return (
        isinstance(value, dict) and isinstance(value.get("class_name"), str)
        and isinstance(value.get("config"), dict)
    )


def _producers(entry):
    """Names of the layers feeding `entry` (`[name, node, tensor]` references in its nodes)."""
    names, stack = [], [entry.get("inbound_nodes")]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
                names.append(value[0])
            else:
                stack.extend(value)
    return names


def graph_last_dims(entries):
    """`{id(entry): its input's last dimension}` from the graphs of the models among `entries`.

    A Sequential model's layers feed each other in order; a Functional
    model's layers name what feeds them in `inbound_nodes`.
    """
    found = {}
    for model in entries:
        layers = model["config"].get("layers")
        if not isinstance(layers, list):
            continue
        sequential = model["class_name"] == "Sequential"
        outputs, previous = {}, None
        for layer in layers:
            if not is_serialized(layer):
                previous = None
                continue
            if sequential:
                last_dim = previous
            else:
                dims = [outputs.get(name) for name in _producers(layer)]
                last_dim = max((d for d in dims if d), default=None)
            if last_dim:
                found[id(layer)] = last_dim
            previous = _output_last_dim(layer, last_dim)
            name = layer["config"].get("name", layer.get("name"))
            if isinstance(name, str):
                outputs[name] = previous
    return found


def declared_limit():
    """Declared weight bytes accepted without backing in the file (`BNCONVERT_MAX_DECLARED_MB`)."""
    raw = os.environ.get(DECLARED_LIMIT_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_DECLARED_LIMIT_MB
    except ValueError:
        mb = math.nan
    if not mb >= 0:
        raise ModelLoadError(
            f"{DECLARED_LIMIT_ENV} must be a number of megabytes >= 0. "
            f"Received: {DECLARED_LIMIT_ENV}={raw!r}"
        )
    return int(min(mb, 1e12) * (1 << 20))


def declared_per_layer(entries):
    """`{(class, name, index): weights}` for the counted layers among `entries`.

    `entries` are the serialized objects of one config document. Every
    serialized layer counts, also when nested models reuse a name (names are
    unique only within one model).
    """
    last_dims = graph_last_dims(entries)
    per_layer = {}
    for i, entry in enumerate(entries):
        n = declared_weights(entry, last_dims.get(id(entry)))
        if n:
            name = entry["config"].get("name")
            per_layer[(entry["class_name"], name if isinstance(name, str) else "?", i)] = n
    return per_layer


def declared(documents):
    """The counted layers of the config document that declares the most.

    A SavedModel records each layer's own node besides the model's config,
    which holds them all again: documents repeat each other's layers, so
    the largest one is the lower bound (a single-document config is itself;
    `config_checks` passes each view of a model as its own document).
    """
    return max((declared_per_layer(d) for d in documents),
               key=lambda per_layer: sum(per_layer.values()), default={})


def check(model_file, documents, stored):
    """Refuses a config whose layers declare far more weights than the file stores.

    Args:
        model_file: The model's path, for messages.
        documents: For each config document, every serialized object in it
            (layers among them).
        stored: The bytes the file really stores for weights.

    Raises:
        ModelLoadError: See the module docstring.
    """
    per_layer = declared(documents)
    total = sum(per_layer.values())
    if 4 * total <= 8 * stored + declared_limit():
        return
    (cls, name, _), largest = max(per_layer.items(), key=lambda item: item[1])
    raise ModelLoadError(
        f"{model_file} is refused: its config declares {_amount(total)} weights "
        f"({human_size(4 * total)} as float32; layer {name!r} ({cls}) alone "
        f"{_amount(largest)}), but the file stores {human_size(stored)} of weights: "
        "building them would fill memory (a crafted config?). If you trust the file, "
        f"raise the limit with the environment variable {DECLARED_LIMIT_ENV}=<megabytes>."
    )


def _amount(n):
    return f"{float(min(n, 10 ** 300)):.3g}"
