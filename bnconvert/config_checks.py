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
- **Declared sizes.** A config declaring far more weights than the file
  stores is refused before Keras builds them (`bnconvert.weight_bounds`).
- **Config size.** An H5 file's `model_config` attribute and a SavedModel's
  `keras_metadata.pb` are held to the limit of a `.keras` archive's
  `config.json` (`input_checks.config_limit()`), judged from their stored
  size before they are decoded.
"""

import json
import os
import zipfile

from bnconvert import formats
from bnconvert import input_checks
from bnconvert import weight_bounds
from bnconvert.errors import ModelLoadError
from bnconvert.weight_bounds import human_size

# Keys under which Keras layers (and keras-hub tokenizers) take a file path.
ASSET_KEYS = frozenset({"vocabulary", "idf_weights", "stop_words", "merges", "proto"})
_WEIGHTS_RATIO = 16


def check_model_config(found, *, allow_asset_paths=False):
    """Refuses a model whose config names local files or declares too much.

    Args:
        found: The `formats.ModelFile` about to be loaded.
        allow_asset_paths: Whether config values naming files are accepted.

    Returns:
        The number of layers the config counts (nested models' layers
        included; of a SavedModel's views of its model, the largest), which
        bounds how deep Keras's loader recurses (`bnconvert.deep_load`).

    Raises:
        ModelLoadError: The config is above the size limit or unreadable,
            names a file (unless allowed), or declares far more weights
            than the file stores.
    """
    config, stored = _read_config(found)
    # One walk of the config serves every check (a 1,000-layer model's
    # config holds some 180,000 values); its views cover every document.
    views = [list(_items(view)) for view in _model_views(config)]
    if not allow_asset_paths:
        _check_asset_paths(found.path, (item for items in views for item in items))
    serialized = [[item for item in items if weight_bounds.is_serialized(item[2])]
                  for items in views]
    weight_bounds.check(found.path, [[item[2] for item in items] for items in serialized], stored)
    # Layers: the items of every `layers` list, at any depth.
    return max((sum(1 for _, key, _, in_list in items if in_list and key == "layers")
                for items in serialized), default=0)


def _model_views(documents):
    """Each config document, with a SavedModel root's two views of its model apart.

    A tf-keras SavedModel's root metadata holds the model's config twice
    (`config` and `model_config`); its layers' own nodes repeat them again.
    `weight_bounds.check` counts the largest view.
    """
    for document in documents:
        if isinstance(document, dict) and isinstance(document.get("model_config"), dict):
            yield {k: v for k, v in document.items() if k != "model_config"}
            yield document["model_config"]
        else:
            yield document


def _allocated(path):
    """The bytes a file really holds: a sparse file's holes and a zip directory's claims count not."""
    st = os.stat(path)
    # Filesystems that report no blocks at all get the apparent size.
    return min(st.st_size, st.st_blocks * 512) if st.st_blocks else st.st_size


def _too_large(model_file, what, size):
    return ModelLoadError(
        f"{model_file} is refused: its {what} is {human_size(size)}, above the "
        f"{human_size(input_checks.config_limit())} limit; if you trust the file, raise the limit "
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
            # Weights (.h5 or .npz) and assets; a member's stated size counts
            # up to a deflate ratio real weights never reach (zeros do).
            stored = sum(
                min(info.file_size, _WEIGHTS_RATIO * info.compress_size)
                for info in archive.infolist()
                if info.filename not in ("config.json", "metadata.json")
            )
            # The directory's sizes are claims: no more than the archive
            # itself holds, at that ratio, counts.
            stored = min(stored, _WEIGHTS_RATIO * _allocated(path))
            texts = [archive.read("config.json")]
        what = "config.json"
    elif found.format == formats.H5:
        texts, stored, what = [_h5_model_config(path)], _allocated(path), "model_config"
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
        _allocated(p) for p in variables.iterdir() if p.is_file()
    ) if variables.is_dir() else 0
    return texts, stored, "keras_metadata.pb"


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
            inner = value if weight_bounds.is_serialized(value) else owner
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
