"""Model files in and out: format detection, safe loading, atomic saving.

Inputs are Keras 3 `.keras` archives, legacy `.h5`/`.hdf5` files that hold a
whole model, or a directory holding exactly one such file. Every input that
cannot be loaded raises `ModelLoadError` with one line that names the file,
says what it is (or is not) and what to do; Keras's own messages for the same
cases run to several lines and often name the wrong cause (a truncated
`.keras` file is reported as "File not found").

Outputs are written to a temporary file in the destination directory and
moved into place with `os.replace`, which is atomic on one file system: a
failed or interrupted save leaves no partial file behind, and an existing
file is either fully replaced or untouched.
"""

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import re
import sys
import tempfile
import warnings
import zipfile
import zlib

from bnconvert.errors import ModelLoadError
from bnconvert.errors import first_line as _first_line
from bnconvert.errors import OutputError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_H5_SUFFIXES = (".h5", ".hdf5")

# Keras names an unresolvable class in one of these ways, depending on
# whether the file is a `.keras` archive or a legacy H5 file.
_UNKNOWN_OBJECT_PATTERNS = (
    re.compile(r"Could not locate (?:class|function) '([^']+)'"),
    re.compile(r"Unknown (?:layer|object|class|function)[^:]*: '([^']+)'"),
)


def load_model(path, *, custom_objects=None, safe_mode=True):
    """Loads a Keras model from a file or a directory holding one.

    A `.keras` model that was saved compiled comes back compiled with the
    saved configuration (optimizer settings, loss, metrics), so that a
    converted copy keeps it; its optimizer state is not loaded (a rewrite
    does not carry it) and a loss or metric that Keras cannot rebuild is
    left out rather than stopping the load. Models in `.h5` files come back
    uncompiled.

    Args:
        path: Path of a `.keras` file, an `.h5`/`.hdf5` file saved with
            `model.save()`, or a directory that holds exactly one such file.
        custom_objects: Optional dict mapping class or function names to
            the objects Keras needs to rebuild custom layers (see
            `import_custom_objects`).
        safe_mode: If `True` (the default), Keras refuses to load Python
            code stored in the file (`Lambda` layers); pass `False` only for
            files you trust.

    Returns:
        The loaded `keras.Model`.

    Raises:
        ModelLoadError: if the path is missing, is not a Keras model, is
            corrupt, is a TensorFlow SavedModel, or needs custom objects or
            `safe_mode=False` to load.
    """
    from bnconvert import compat

    if compat.handles(path):  # tf-keras SavedModel dir or H5: compat/tf_keras_io.py
        from bnconvert.compat import tf_keras_io

        return tf_keras_io.load_model(
            path, custom_objects=custom_objects, safe_mode=safe_mode
        )
    model_file = resolve_model_file(path)
    if model_file.suffix == ".keras":
        _check_keras_archive(model_file)
    else:
        _check_h5_model(model_file)

    import keras

    try:
        model = keras.saving.load_model(
            str(model_file),
            custom_objects=custom_objects,
            compile=False,
            safe_mode=safe_mode,
        )
    except Exception as e:  # Keras raises many types for a bad file.
        raise _load_error(model_file, e) from e
    if not isinstance(model, keras.Model):
        raise ModelLoadError(
            f"{model_file} holds a {type(model).__name__}, not a Keras model; "
            "save the model itself with model.save('NAME.keras')."
        )
    if model_file.suffix == ".keras":
        _compile_as_saved(model, model_file, custom_objects)
    return model


def _compile_as_saved(model, model_file, custom_objects):
    """Compiles `model` with the compile config saved in the `.keras` archive.

    Keras's own `compile=True` also loads the optimizer's variables, which a
    rewritten model does not carry (for ResNet50 with Adam, twice the
    weights), and it fails the whole load on a loss it cannot resolve.
    """
    import keras

    with zipfile.ZipFile(model_file) as archive:
        config = json.loads(archive.read("config.json")).get("compile_config")
    if not config:
        return
    try:
        with warnings.catch_warnings():
            # Keras warns, and does nothing, for a custom compile() method.
            warnings.simplefilter("ignore")
            with keras.saving.custom_object_scope(dict(custom_objects or {})):
                model.compile_from_config(config)
    except Exception:  # an unresolvable loss or metric: left out, as documented
        return


def resolve_model_file(path):
    """Returns the model file that `path` names, without loading it.

    Args:
        path: A model file, or a directory holding exactly one model file.

    Returns:
        A `pathlib.Path` to a file ending in `.keras`, `.h5` or `.hdf5`.

    Raises:
        ModelLoadError: if the path does not exist, is not a model file, is a
            SavedModel directory, or is a directory without exactly one model
            file.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"Model path does not exist: {p}. Check the path; a model is a "
            ".keras or .h5 file, or a directory holding one."
        )
    if p.is_dir():
        return _model_file_in_directory(p)
    if p.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelLoadError(
            f"{p} is not a Keras model file: expected a name ending in .keras, "
            f".h5 or .hdf5. Received: suffix={p.suffix or '(none)'!r}"
        )
    return p


def _model_file_in_directory(directory):
    if (directory / "saved_model.pb").exists():
        if (directory / "keras_metadata.pb").exists():
            # `load_model` hands these to the tf-keras flavour first.
            raise ModelLoadError(
                f"{directory} is a tf-keras (Keras 2) SavedModel directory, not a "
                "Keras 3 model file; load it with bnconvert.model_io.load_model."
            )
        raise ModelLoadError(
            f"{directory} is a TensorFlow SavedModel (e.g. from model.export() or "
            "tf.saved_model.save) that holds a traced graph, not Keras layers to "
            "rewrite; convert the .keras model it was exported from."
        )
    if (directory / "config.json").exists():
        raise ModelLoadError(
            f"{directory} looks like an unzipped .keras archive, which is not "
            "supported; zip it back or re-save the model with "
            "model.save('NAME.keras')."
        )
    candidates = sorted(
        f for f in directory.iterdir()
        if f.is_file() and f.suffix.lower() in MODEL_SUFFIXES
        and not f.name.endswith(".weights.h5")
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelLoadError(
            f"Directory {directory} holds no model file (.keras, .h5 or .hdf5); "
            "pass the model file itself."
        )
    names = ", ".join(f.name for f in candidates)
    raise ModelLoadError(
        f"Directory {directory} holds {len(candidates)} model files ({names}); "
        "pass the one to convert."
    )


def _check_keras_archive(model_file):
    try:
        with zipfile.ZipFile(model_file) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelLoadError(
            f"{model_file} is not a valid .keras archive (a zip file), it may be "
            f"truncated or another kind of file ({e}); re-save the model with "
            "model.save('NAME.keras')."
        ) from e
    if "config.json" not in names:
        raise ModelLoadError(
            f"{model_file} is a zip archive without config.json, not a Keras "
            "model; re-save the model with model.save('NAME.keras')."
        )


def _check_h5_model(model_file):
    import h5py

    try:
        with h5py.File(model_file, "r") as f:
            has_config = "model_config" in f.attrs
    except OSError as e:
        raise ModelLoadError(
            f"{model_file} is not a readable HDF5 file, it may be truncated or "
            "another kind of file; re-save the model with model.save('NAME.keras')."
        ) from e
    if not has_config:
        raise ModelLoadError(
            f"{model_file} holds weights only, no model config (written by "
            "save_weights?); rebuild the model, load these weights and save it "
            "whole with model.save('NAME.keras')."
        )


def _error_chain_text(error):
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _load_error(model_file, error):
    """Maps an exception raised by Keras while loading to a one-line error."""
    text = _error_chain_text(error)
    for pattern in _UNKNOWN_OBJECT_PATTERNS:
        match = pattern.search(text)
        if match:
            # Registered names read "package>Class"; users know the class.
            name = match.group(1).split(">")[-1]
            return ModelLoadError(
                f"{model_file} uses the custom class or function '{name}', which "
                "Keras cannot find; pass the module that defines it with "
                "--custom-objects MODULE (custom_objects= in Python)."
            )
    if "safe_mode" in text:
        return ModelLoadError(
            f"{model_file} holds Python code (a Lambda layer or a function) that "
            "Keras safe mode refuses to load; if you trust the file, pass --unsafe "
            "(safe_mode=False in Python)."
        )
    if isinstance(error, (zipfile.BadZipFile, EOFError, zlib.error)) or "CRC" in text:
        return ModelLoadError(
            f"{model_file} is a corrupt .keras archive ({_first_line(error)}); "
            "re-save the model with model.save('NAME.keras')."
        )
    return ModelLoadError(
        f"Cannot load {model_file} as a Keras model: {type(error).__name__}: "
        f"{_first_line(error)}"
    )



def default_output_path(path, suffix):
    """Returns the default output path beside the input.

    `model.keras` and `model.h5` both give `model{suffix}` in the same
    directory; a directory `models/resnet` gives `models/resnet{suffix}`.

    Args:
        path: The input model path (file or directory).
        suffix: The tail that replaces the input's extension, for example
            `".sync.keras"`.

    Returns:
        A `pathlib.Path`.
    """
    p = pathlib.Path(path)
    if p.is_dir() or p.suffix.lower() not in MODEL_SUFFIXES:
        return p.parent / (p.name + suffix)
    return p.with_name(p.stem + suffix)


def check_output_path(path, *, force=False, inputs=(), suffixes=None):
    """Checks that `path` can be written, before any long work starts.

    Args:
        path: The output path.
        force: Whether an existing file may be replaced.
        inputs: Paths that must never be overwritten (the input model, or a
            directory holding it).
        suffixes: Optional tuple of accepted endings, such as `(".keras",)`.

    Returns:
        The output as a `pathlib.Path`.

    Raises:
        OutputError: if the output is an input, exists without `force`, is a
            directory, has the wrong suffix, or its directory is missing or
            not writable.
    """
    out = pathlib.Path(path)
    if suffixes and not out.name.lower().endswith(tuple(suffixes)):
        raise OutputError(
            f"Output {out} must end in {' or '.join(suffixes)}. "
            f"Received: output={str(out)!r}"
        )
    check_output_place(out, inputs, same=_same_path)
    if out.is_dir():
        raise OutputError(
            f"Output {out} is a directory; give a file name such as "
            f"{out / 'model.keras'}."
        )
    if out.exists() and not force:
        raise OutputError(
            f"Output {out} already exists; pass --force (force=True in Python) "
            "to overwrite it."
        )
    return out


def check_output_place(out, inputs, same=None):
    """Checks that `out` is not an input and that its directory takes files.

    Args:
        out: The output `pathlib.Path`.
        inputs: Paths that must never be overwritten.
        same: Optional `(out, source) -> bool` deciding whether writing `out`
            overwrites `source`; defaults to `same_file`.

    Raises:
        OutputError: `out` is an input, or its directory is missing or not
            writable.
    """
    same = same or same_file
    for source in inputs:
        if source is not None and same(out, source):
            raise OutputError(
                f"Output {out} is the input model; the input is never "
                "overwritten, choose another output path."
            )
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(
            f"Output directory {parent} does not exist; create it first or "
            "choose another output path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Output directory {parent} is not writable.")


def same_file(a, b):
    """Whether paths `a` and `b` name the same file (existing or not)."""
    a, b = pathlib.Path(a), pathlib.Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _same_path(out, source):
    """Whether writing `out` would overwrite the input `source`."""
    if same_file(out, source):
        return True
    source = pathlib.Path(source)
    if source.is_dir():
        # A directory input stands for the model file inside it.
        try:
            return same_file(out, resolve_model_file(source))
        except ModelLoadError:
            return False
    return False


def save_model(model, path, *, force=False, inputs=()):
    """Saves `model` atomically: complete at `path`, or not there at all.

    Args:
        model: The `keras.Model` to save.
        path: Output path ending in `.keras` (or `.h5`/`.hdf5`, Keras's
            legacy format).
        force: Whether an existing file may be replaced.
        inputs: Paths that must never be overwritten (the input model).

    Raises:
        OutputError: see `check_output_path`; also when the file system
            refuses the write (disk full, permissions).
    """
    out = check_output_path(path, force=force, inputs=inputs, suffixes=MODEL_SUFFIXES)
    with atomic_output(out) as tmp:
        try:
            model.save(str(tmp))
        except OSError as e:
            raise OutputError(f"Cannot write {out}: {_first_line(e)}") from e


def write_text(path, text, *, force=False, inputs=()):
    """Writes `text` (UTF-8) to `path` atomically, checking it first.

    Args:
        path: Output path.
        text: The content.
        force: Whether an existing file may be replaced.
        inputs: Paths that must never be overwritten.

    Raises:
        OutputError: see `check_output_path`.
    """
    out = check_output_path(path, force=force, inputs=inputs)
    with atomic_output(out) as tmp:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as e:
            raise OutputError(f"Cannot write {out}: {_first_line(e)}") from e


@contextlib.contextmanager
def atomic_output(path):
    """Context manager: yields a temporary path that replaces `path` on success.

    The temporary file lives in the destination's directory (so the final
    `os.replace` never crosses file systems) and keeps the destination's
    extension, which Keras uses to pick the format. On any exception,
    including `KeyboardInterrupt`, the temporary file is removed and `path`
    is left as it was.

    Args:
        path: The final output path; its directory must exist.

    Yields:
        A `pathlib.Path` to write to.
    """
    out = pathlib.Path(path)
    fd, tmp_name = tempfile.mkstemp(
        dir=out.parent, prefix=f".{out.name}.", suffix=f".partial{out.suffix}"
    )
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file private (0600); give the output the
        # permissions any new file of this user would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def import_custom_objects(module_names):
    """Imports modules that define custom Keras objects, for loading.

    Importing runs any `@keras.saving.register_keras_serializable()`
    decorators in the module. The returned dict also maps the name of every
    public class and function the module defines itself (not the ones it
    imports) to that object, so unregistered custom layers resolve by class
    name; a module-level dict named `custom_objects` is merged in last.

    Args:
        module_names: Iterable of dotted module names (`mypkg.layers`) or
            paths to `.py` files. Modules are looked up on `sys.path` and in
            the current directory.

    Returns:
        A dict of name -> object, suitable for `custom_objects=`.

    Raises:
        ModelLoadError: if a module cannot be found or fails to import.
    """
    objects = {}
    for name in module_names:
        module = _import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_"):
                continue
            if (inspect.isclass(value) or inspect.isfunction(value)) and (
                getattr(value, "__module__", None) == module.__name__
            ):
                objects[attr] = value
        extra = getattr(module, "custom_objects", None)
        if isinstance(extra, dict):
            objects.update(extra)
    return objects


def _import_module(name):
    try:
        if name.endswith(".py") or os.sep in name:
            path = pathlib.Path(name)
            if not path.is_file():
                raise ModelLoadError(
                    f"Custom-objects file {path} does not exist. "
                    f"Received: custom_objects={name!r}"
                )
            module_name = f"_bnconvert_custom_{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
            return module
        # A console script's sys.path starts at its own directory, not the
        # current one, where a user's module usually lives.
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.append(cwd)
        try:
            return importlib.import_module(name)
        finally:
            if added:
                sys.path.remove(cwd)
    except ModelLoadError:
        raise
    except ImportError as e:
        raise ModelLoadError(
            f"Cannot import custom-objects module {name!r}: {_first_line(e)}; "
            "check the name and that it is on PYTHONPATH or in the current "
            "directory."
        ) from e
    except Exception as e:  # The module's own code failed.
        raise ModelLoadError(
            f"Importing custom-objects module {name!r} failed: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
