"""Loading and saving models of either flavour, with one-line errors.

`load_model` recognises the input (`bnconvert.formats`), checks its config
before Keras builds anything (`bnconvert.config_checks`), lets its flavour
load it in safe mode, and turns whatever Keras raises into one
`ModelLoadError` line that names the file and says what to do; Keras's own
messages for the same cases run to pages and often name the wrong cause.
`save_model` checks the output place (`bnconvert.paths`) and writes it
atomically in the format the path asks for.
"""

import re
import zipfile
import zlib

from bnconvert import config_checks
from bnconvert import deep_load
from bnconvert import flavour as flavour_lib
from bnconvert import formats
from bnconvert import outputs
from bnconvert import paths
from bnconvert.output_plan import output_kind
from bnconvert.errors import BnconvertError
from bnconvert.errors import ModelLoadError
from bnconvert.errors import first_line

# Keras names an unresolvable class in one of these ways, depending on the
# flavour and on whether the file is an archive, an H5 file or a SavedModel.
_UNKNOWN_OBJECT_PATTERNS = (
    re.compile(r"Could not locate (?:class|function) '([^']+)'"),
    re.compile(r"Unknown (?:\w+ )?(?:layer|object|class|function)[^:']*: '?([^'\s.]+)"),
)
# tf-keras names a function stored by name as the unknown "function" and
# records its name in the config quoted beside the error.
_STORED_FUNCTION = re.compile(r"'class_name': 'function', 'config': '([^']+)'")
# Keras 3 refuses, in safe mode, a vocabulary read from a path.
_VOCABULARY_FILE = re.compile(
    r"vocabulary file outside of the model archive.*?Vocabulary file: '([^'\n]*)'", re.S
)


def load_model(path, *, custom_objects=None, safe_mode=True, allow_asset_paths=False):
    """Loads a Keras 3 or tf-keras model from a file or directory.

    A `.keras` model saved compiled comes back compiled with its saved
    configuration, without optimizer state; other formats come back
    uncompiled.

    Args:
        path: A `.keras` file, an `.h5`/`.hdf5` file saved with
            `model.save()`, a tf-keras SavedModel directory, or a directory
            holding exactly one model file.
        custom_objects: Optional dict name -> class or function.
        safe_mode: If `True` (the default), stored Python code (`Lambda`
            layers) is refused; pass `False` only for files you trust.
        allow_asset_paths: If `False` (the default), a config naming a
            file to read (a lookup layer's `vocabulary` path) is refused
            (see `bnconvert.config_checks`).

    Returns:
        The loaded `keras.Model` or `tf_keras.Model`.

    Raises:
        ModelLoadError: The path is missing or not a model, is corrupt,
            needs custom objects, holds code that safe mode refuses, names
            files, or declares more weights than it stores.
    """
    return load_found(formats.resolve(path), custom_objects=custom_objects, safe_mode=safe_mode,
                      allow_asset_paths=allow_asset_paths)


def load_found(found, *, custom_objects=None, safe_mode=True, allow_asset_paths=False):
    """`load_model` for an input `formats.resolve` has already checked.

    Args:
        found: The `formats.ModelFile` (its checks passed).
        custom_objects, safe_mode, allow_asset_paths: As for `load_model`.
    """
    flavour = flavour_lib.get(found.flavour)
    try:
        layers = config_checks.check_model_config(found, allow_asset_paths=allow_asset_paths)
        model = deep_load.call(
            lambda: flavour.load(found.path, found.format, custom_objects, safe_mode),
            layers, found.path,
        )
    except BnconvertError:
        raise
    except RecursionError:
        raise ModelLoadError(
            f"Cannot load {found.path}: the model is too deep for Keras's loader, which "
            "recursed further than its config's layer count allows for. Split the model, "
            "or load it yourself with a raised recursion limit."
        ) from None
    except Exception as e:  # Keras raises many types for a bad file.
        raise _load_error(found.path, e, flavour, custom_objects) from e
    if not isinstance(model, flavour.Model):
        raise ModelLoadError(
            f"{found.path} holds a {type(model).__name__}, not a Keras model; "
            "save the model itself with model.save()."
        )
    return model


def _error_chain_text(error):
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _load_error(model_file, error, flavour, custom_objects=None):
    """Maps an exception raised while loading to a one-line `ModelLoadError`."""
    if isinstance(error, ImportError) and "bnconvert needs" in str(error):
        return ModelLoadError(f"Cannot load {model_file} safely: {first_line(error)}")
    text = _error_chain_text(error)
    for pattern in _UNKNOWN_OBJECT_PATTERNS:
        match = pattern.search(text)
        if match:
            # Registered names read "package>Class"; users know the class.
            name = match.group(1).split(">")[-1]
            stored = _STORED_FUNCTION.search(text) if name == "function" else None
            if stored:
                name = stored.group(1).split(">")[-1]
            if stored and name in (custom_objects or {}):
                return ModelLoadError(
                    f"{model_file} stores the custom function '{name}' in a form that "
                    f"{flavour.label}'s .h5 loader cannot read back, even when it is "
                    "given (a tf-keras limitation); re-save the model as a SavedModel "
                    "directory (model.save('NAME', save_format='tf')) and convert that."
                )
            if custom_objects is not None:
                return ModelLoadError(
                    f"{model_file} uses the custom class or function '{name}', which "
                    f"none of the custom objects given defines or registers "
                    f"({len(custom_objects)} names); pass the module that defines "
                    f"'{name}' with --custom-objects MODULE as well."
                )
            return ModelLoadError(
                f"{model_file} uses the custom class or function '{name}', which "
                f"{flavour.label} cannot find; pass the module that defines it with "
                "--custom-objects MODULE (custom_objects= in Python)."
            )
    vocabulary = _VOCABULARY_FILE.search(text)
    if vocabulary:
        return ModelLoadError(
            f"{model_file} names the vocabulary file {vocabulary.group(1)!r} outside "
            "the model, which Keras 3 safe mode refuses to read; if you trust the "
            "file, pass --unsafe with --allow-asset-paths (safe_mode=False, "
            "allow_asset_paths=True in Python)."
        )
    if "safe_mode" in text or "unsafe" in text.lower():
        return ModelLoadError(
            f"{model_file} holds Python code (a Lambda layer or a function) that "
            "Keras safe mode refuses to load; if you trust the file, pass --unsafe "
            "(safe_mode=False in Python)."
        )
    if isinstance(error, (zipfile.BadZipFile, EOFError, zlib.error)) or "CRC" in text:
        return ModelLoadError(
            f"{model_file} is a corrupt .keras archive ({first_line(error)}); "
            "re-save the model with model.save('NAME.keras')."
        )
    return ModelLoadError(
        f"Cannot load {model_file} as a {flavour.label} model, it may be truncated "
        f"or corrupt: {type(error).__name__}: {first_line(error)}"
    )


def check_model_output(model_flavour, path, *, force=False, inputs=(), option="--output"):
    """Checks a model output place; returns `(path, format)`.

    Raises:
        OutputError: The flavour cannot write that name, or see
            `paths.check_output`.
    """
    fmt = formats.output_format(model_flavour.name, path)
    suffixes = formats.OUTPUT_FORMATS[model_flavour.name][fmt] or None
    out = paths.check_output(
        path, force=force, inputs=inputs, suffixes=suffixes, kind=output_kind(fmt),
        option=option,
    )
    return out, fmt


def save_model(model, path, *, force=False, inputs=(), fmt=None, check=None):
    """Saves `model` atomically: complete at `path`, or not there at all.

    Args:
        model: A `keras.Model` or `tf_keras.Model`.
        path: The output: `.keras` (Keras 3), `.h5`, or for tf-keras models
            a SavedModel directory (a name without a model suffix).
        force: Whether an existing output may be replaced.
        inputs: Paths that must never be overwritten.
        fmt: The format, if already decided by `check_model_output`.
        check: Optional `(temporary path, format) -> None`, run on the
            written file before it is moved into place (it may raise, and
            may rewrite the file; see `bnconvert.written`).

    Raises:
        OutputError: See `paths.check_output`; also when the file system
            refuses the write (disk full, permissions).
    """
    model_flavour = flavour_lib.flavour_of(model)
    out, checked_fmt = check_model_output(model_flavour, path, force=force, inputs=inputs)
    fmt = fmt or checked_fmt
    with outputs.atomic(out, output_kind(fmt), force=force) as tmp:
        write_model(model, tmp, fmt, out)
        if check is not None:
            check(tmp, fmt)
    return out


def write_model(model, tmp, fmt, out):
    """Writes `model` into the fresh temporary place `tmp` for the output `out`.

    Keras's scratch files go to a directory of ours beside `out`, removed
    afterwards (not /tmp, where a failed or killed save would leave them).

    Raises:
        OutputError: The file system refused the write (disk full,
            permissions), as one line naming `out`.
    """
    model_flavour = flavour_lib.flavour_of(model)
    try:
        with outputs.private_tempdir(out):
            model_flavour.save(model, tmp, fmt)
    except OSError as e:
        raise outputs.write_error(out, e, tmp) from e
    except Exception as e:  # TF raises its own types for a full disk
        if "space" in str(e).lower() or "resource" in type(e).__name__.lower():
            raise outputs.write_error(out, e, tmp) from e
        raise
