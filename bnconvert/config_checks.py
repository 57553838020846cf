"""Checks on a model's config, made before Keras builds a layer of it.

The config is data from elsewhere, and Keras acts on it while loading:

- **Asset paths.** `StringLookup`, `IntegerLookup` and `TextVectorization`
  read a `vocabulary` given as a string from that path, and tf-keras then
  copies the file into a SavedModel output's `assets/` (an `.h5` output
  keeps the path). A crafted config naming `~/.ssh/id_rsa` would carry a
  local file into the converted model. Every config value that names a
  file is refused unless the caller opts in (`--allow-asset-paths`,
  `allow_asset_paths=True`): a string under an asset key (`vocabulary`,
  `idf_weights`, `stop_words`, `merges`, `proto`; a local path or a URL),
  and any other string value that names an existing file (absolute,
  relative or `~/...`). Strings inside lists (a vocabulary given inline)
  are data, not paths.
- **Declared sizes.** A 2 KB file declaring `Dense(10**9)` makes Keras
  allocate 16 GB while building the layer. The weights each layer would
  create are counted from its config (a lower bound, for the layer types
  whose weights follow from it: dense, convolutional, recurrent, embedding,
  normalization and attention layers), and a model declaring more than its
  file could hold is refused: every built layer's weights are stored in the
  file, at half a byte per weight at least (int4). The declared weights,
  counted as float32, may take at most eight times the bytes the file
  stores for weights plus `BNCONVERT_MAX_DECLARED_MB` (default 1024)
  megabytes.
- **Config size.** An H5 file's `model_config` attribute and a SavedModel's
  `keras_metadata.pb` are held to the limit of a `.keras` archive's
  `config.json` (`input_checks.config_limit()`), judged from their stored
  size before they are decoded.
"""

import json
import math
import os
import re
import zipfile

from bnconvert import formats
from bnconvert import input_checks
from bnconvert.errors import ModelLoadError

DECLARED_LIMIT_ENV = "BNCONVERT_MAX_DECLARED_MB"
DEFAULT_DECLARED_LIMIT_MB = 1024
# Keys under which Keras layers (and keras-hub tokenizers) take a file path.
ASSET_KEYS = frozenset({"vocabulary", "idf_weights", "stop_words", "merges", "proto"})

_CONV = re.compile(r"^(Separable|Depthwise)?Conv(?:olution)?([123])D(Transpose)?$")
_RNN_GATES = {
    "LSTM": 4, "LSTMCell": 4, "GRU": 3, "GRUCell": 3, "SimpleRNN": 1, "SimpleRNNCell": 1,
}
_BN_CLASSES = ("BatchNormalization", "SyncBatchNormalization")


def check_model_config(found, *, allow_asset_paths=False):
    """Refuses a model whose config names local files or declares too much.

    Args:
        found: The `formats.ModelFile` about to be loaded.
        allow_asset_paths: Whether config values naming files are accepted.

    Raises:
        ModelLoadError: The config is above the size limit or unreadable,
            names a file (unless allowed), or declares far more weights
            than the file stores.
    """
    config, stored = _read_config(found)
    items = list(_items(config))
    if not allow_asset_paths:
        _check_asset_paths(found.path, items)
    _check_declared(found.path, [item[2] for item in items if _is_entry(item[2])], stored)


def _size(n):
    """`n` bytes for people: `16 GB`, `11.4 KB`."""
    n = float(min(n, 10 ** 300))
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1024


def _too_large(model_file, what, size):
    return ModelLoadError(
        f"{model_file} is refused: its {what} is {_size(size)}, above the "
        f"{_size(input_checks.config_limit())} limit; if you trust the file, raise the limit "
        f"with the environment variable {input_checks.CONFIG_LIMIT_ENV}=<megabytes>."
    )


def _unreadable(model_file, what, error):
    return ModelLoadError(
        f"{model_file} is refused: its {what} cannot be read ({type(error).__name__}); "
        "the file is corrupt or crafted. Re-save the model with model.save()."
    )


def _read_config(found):
    """The model's config (JSON), and the bytes its file stores for weights."""
    path = found.path
    if found.format == formats.KERAS:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            stored = (
                archive.getinfo("model.weights.h5").file_size
                if "model.weights.h5" in names else 0
            )
            texts = [archive.read("config.json")]
        what = "config.json"
    elif found.format == formats.H5:
        texts, stored, what = [_h5_model_config(path)], path.stat().st_size, "model_config"
    else:
        texts, stored, what = _saved_model_metadata(path)
    try:
        return [json.loads(text) for text in texts], stored
    except (ValueError, UnicodeDecodeError) as e:
        raise _unreadable(path, what, e) from e


def _h5_model_config(path):
    """The `model_config` attribute, read only once its stored size is known to fit."""
    import h5py

    limit = input_checks.config_limit()
    with h5py.File(path, "r") as f:
        attribute = h5py.h5a.open(f.id, b"model_config")
        if attribute.dtype.kind == "O":
            # A variable-length string lives in the file's heap, outside its
            # datasets: the bytes of the file that no dataset stores bound it.
            datasets = []
            f.visititems(lambda _, obj: datasets.append(obj.id.get_storage_size())
                         if isinstance(obj, h5py.Dataset) else None)
            size = path.stat().st_size - sum(datasets)
            what = "model_config attribute (with the file's other metadata)"
        else:
            size, what = attribute.get_storage_size(), "model_config attribute"
        if size > limit:
            raise _too_large(path, what, size)
        text = f.attrs["model_config"]
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _saved_model_metadata(directory):
    """The layers' metadata of a tf-keras SavedModel, and its variables' bytes."""
    from bnconvert import keras_internals

    metadata = directory / "keras_metadata.pb"
    size = metadata.stat().st_size
    if size > input_checks.config_limit():
        raise _too_large(directory, "keras_metadata.pb", size)
    try:
        texts = keras_internals.tf_keras_saved_metadata(metadata.read_bytes())
    except ValueError as e:
        raise _unreadable(directory, "keras_metadata.pb", e) from e
    variables = directory / "variables"
    stored = sum(
        p.stat().st_size for p in variables.iterdir() if p.is_file()
    ) if variables.is_dir() else 0
    return texts, stored, "keras_metadata.pb"


def _is_entry(value):
    """Whether `value` is a serialized object: `{"class_name": ..., "config": {...}}`."""
    return (
        isinstance(value, dict) and isinstance(value.get("class_name"), str)
        and isinstance(value.get("config"), dict)
    )


def _items(tree):
    """Yields `(owner, key, value, in_list)` for every value in a JSON tree, parents first.

    `owner` is the innermost serialized object holding the value, `key` the
    dict key it is under (list items inherit their list's key, and have
    `in_list` true). The walk keeps its own stack: a config nested
    thousands deep cannot exhaust Python's.
    """
    stack = [(None, None, tree, False)]
    while stack:
        item = stack.pop()
        yield item
        owner, key, value, _ = item
        if isinstance(value, dict):
            inner = value if _is_entry(value) else owner
            stack.extend((inner, k, v, False) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((owner, key, v, True) for v in reversed(value))


def _names_a_file(key, value, in_list):
    text = value.strip()
    if not text or in_list:
        return False
    if key in ASSET_KEYS:
        return True
    # Elsewhere only a path to an existing file counts: encoded data (a
    # Lambda's base64 bytecode) can look like a path that is not there.
    if len(text) > 4096 or "\0" in text or not ("/" in text or os.sep in text or text[0] == "~"):
        return False
    try:
        return os.path.isfile(os.path.expanduser(text))
    except (OSError, ValueError):
        return False


def _describe(owner):
    if owner is None:
        return "the model's config"
    name = owner["config"].get("name", owner.get("name"))
    return f"layer {name!r} ({owner['class_name']})"


def _check_asset_paths(model_file, items):
    for owner, key, value, in_list in items:
        if isinstance(value, str) and _names_a_file(key, value, in_list):
            raise ModelLoadError(
                f"{model_file} is refused: {_describe(owner)} names the file "
                f"{value.strip()!r} in its config ({key}); loading would read that "
                "file into the model and copy it into the outputs. If you trust "
                "the file and mean it, pass --allow-asset-paths "
                "(allow_asset_paths=True in Python)."
            )


# -- declared sizes ---------------------------------------------------------------


def _count(value):
    """A config value as a non-negative whole number (0 if it is none)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value > 0 else 0
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isdigit() and len(value) < 400 else 0
    return value if isinstance(value, int) and value > 0 else 0


def _input_shape(entry):
    """The input shape a serialized layer records (first input's), or `None`."""
    config = entry["config"]
    build = entry.get("build_config")
    candidates = (
        build.get("input_shape") if isinstance(build, dict) else None,
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
    if shape is None or not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
        return 1
    return max(_count(shape[axis]), 1)


def _kernel(config, rank):
    size = config.get("kernel_size")
    if isinstance(size, list):
        return math.prod(max(_count(k), 1) for k in size)
    return max(_count(size), 1) ** rank


def declared_weights(entry):
    """A lower bound of the weights the serialized layer `entry` creates when built."""
    cls, config, shape = entry["class_name"], entry["config"], _input_shape(entry)
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
        return 4 * _count(config.get("num_heads")) * _count(config.get("key_dim"))
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


def _check_declared(model_file, entries, stored):
    per_layer = {}
    for entry in entries:
        n = declared_weights(entry)
        if n:
            # One layer can be serialized twice (a SavedModel records each
            # layer's node and the model's config holding it).
            key = (entry["class_name"], json.dumps(entry["config"], sort_keys=True, default=str))
            per_layer[key] = max(per_layer.get(key, (0, None)), (n, _describe(entry)),
                                 key=lambda pair: pair[0])
    total = sum(n for n, _ in per_layer.values())
    if 4 * total <= 8 * stored + declared_limit():
        return
    largest, layer = max(per_layer.values(), key=lambda pair: pair[0])
    raise ModelLoadError(
        f"{model_file} is refused: its config declares {_amount(total)} weights "
        f"({_size(4 * total)} as float32; {layer} alone {_amount(largest)}), "
        f"but the file stores {_size(stored)} of weights: building them would fill memory "
        "(a crafted config?). If you trust the file, raise the limit with the "
        f"environment variable {DECLARED_LIMIT_ENV}=<megabytes>."
    )


def _amount(n):
    return f"{float(min(n, 10 ** 300)):.3g}"
