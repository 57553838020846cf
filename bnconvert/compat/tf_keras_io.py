"""tf-keras (Keras 2) model files: detection, loading, atomic saving.

Two kinds of input are tf-keras models:

- a SavedModel directory that holds `keras_metadata.pb` (written by
  tf-keras's `model.save(DIR)`, or by `tf.keras` in TensorFlow <= 2.15);
- an H5 file whose root `keras_version` attribute is below 3 (Keras 3's
  legacy H5 writer stamps its own 3.x version).

A SavedModel directory without Keras metadata (a `tf.Module`, or a Keras 3
`model.export()` serving artifact) holds a traced graph and no layers to
rewrite; `bnconvert.model_io` reports it as such.

A tf-keras model is written back in the format it came in: a SavedModel
directory is written to a temporary directory beside the output and renamed
into place, an H5 file to a temporary file, as `model_io` does for files.
"""

import contextlib
import os
import pathlib
import shutil
import tempfile

from bnconvert.errors import ModelLoadError
from bnconvert.errors import first_line as _first_line
from bnconvert.errors import OutputError

SAVEDMODEL = "savedmodel"
H5 = "h5"
_H5_SUFFIXES = (".h5", ".hdf5")


def tf_keras_format(path):
    """Returns `"savedmodel"` or `"h5"` if `path` holds a tf-keras model, else `None`.

    Never raises and never imports TensorFlow: anything unreadable is left
    to the regular loader, which explains what is wrong with it.

    Args:
        path: A file or directory path.
    """
    p = pathlib.Path(path)
    try:
        if p.is_dir():
            if (p / "saved_model.pb").is_file() and (p / "keras_metadata.pb").is_file():
                return SAVEDMODEL
            return None
        if p.is_file() and p.suffix.lower() in _H5_SUFFIXES:
            return H5 if _h5_keras_major(p) in (1, 2) else None
    except OSError:
        return None
    return None


def _h5_keras_major(path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version")
    except (OSError, ValueError):
        return None
    if isinstance(version, bytes):
        version = version.decode("utf-8", "replace")
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def load_model(path, *, custom_objects=None, safe_mode=True):
    """Loads a tf-keras model from a SavedModel directory or an H5 file.

    Args:
        path: A path for which `tf_keras_format()` is not `None`.
        custom_objects: Optional dict name -> class for custom layers.
        safe_mode: Passed to tf-keras where it applies (Lambda layers).

    Returns:
        The `tf_keras.Model`, without its training configuration.

    Raises:
        ModelLoadError: the model cannot be loaded.
    """
    import tf_keras

    from bnconvert import compat

    compat.install_registration_hook()
    try:
        with tf_keras.saving.custom_object_scope(custom_objects or {}):
            with _safe_mode(safe_mode):
                model = tf_keras.models.load_model(str(path), compile=False)
    except Exception as e:  # tf-keras raises many types for a bad file.
        text = str(e)
        if "Unknown layer" in text or "Could not locate" in text or "Unknown object" in text:
            raise ModelLoadError(
                f"{path} is a tf-keras model with a custom class tf-keras cannot "
                f"find ({_first_line(e)}); pass the module that defines it with "
                "--custom-objects MODULE (custom_objects= in Python)."
            ) from e
        raise ModelLoadError(
            f"Cannot load {path} as a tf-keras model, it may be truncated or "
            f"corrupt: {type(e).__name__}: {_first_line(e)}; re-save it with "
            "tf-keras's model.save()."
        ) from e
    if not isinstance(model, tf_keras.Model):
        raise ModelLoadError(
            f"{path} holds a {type(model).__name__}, not a tf-keras model; save "
            "the model itself with model.save()."
        )
    revived = _revived_class_name(model)
    if revived is not None:
        raise ModelLoadError(
            f"{path} is a tf-keras model with a custom class tf-keras cannot "
            f"find ('{revived}'); pass the module that defines it with "
            "--custom-objects MODULE (custom_objects= in Python)."
        )
    return model


def _revived_class_name(model):
    """The class name of a layer tf-keras could only revive as a traced graph.

    A SavedModel whose custom class is not importable still loads: tf-keras
    stands in a generic "revived" layer that runs the saved graph but has no
    config to rebuild it from, so a rewrite would silently compute something
    else. Returns `None` when every layer is a real class.
    """
    try:
        from tf_keras.src.saving.legacy.saved_model.load import RevivedLayer
    except ImportError:  # pragma: no cover - other tf-keras versions
        return None
    for layer in [model, *model.submodules]:
        if isinstance(layer, RevivedLayer):
            return type(layer).__name__.split(">")[-1]
    return None


@contextlib.contextmanager
def _safe_mode(safe_mode):
    # tf-keras's Lambda layers consult this scope before running stored code.
    try:
        from tf_keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:  # pragma: no cover - other tf-keras versions
        yield
        return
    with SafeModeScope(safe_mode):
        yield


def output_format(path):
    """The tf-keras format an output path asks for.

    Args:
        path: The output path.

    Returns:
        `"h5"` for names ending in `.h5`/`.hdf5`; `"savedmodel"` (a
        directory) for names without a model suffix.

    Raises:
        OutputError: the name ends in `.keras`; tf-keras models are not
            written in that format here.
    """
    name = pathlib.Path(path).name.lower()
    if name.endswith(_H5_SUFFIXES):
        return H5
    if name.endswith(".keras"):
        raise OutputError(
            f"Output {path} asks for a .keras file, but tf-keras models are "
            "written as a SavedModel directory or an .h5 file; give a name "
            f"without an extension or ending in .h5. Received: output={str(path)!r}"
        )
    return SAVEDMODEL


def default_output_path(path, tail):
    """`models/resnet` -> `models/resnet.sync`; `model.h5` -> `model.sync.h5`.

    Args:
        path: The input model path.
        tail: The marker to add, such as `".sync"`.
    """
    p = pathlib.Path(path)
    if p.suffix.lower() in _H5_SUFFIXES and not p.is_dir():
        return p.with_name(p.stem + tail + p.suffix)
    return p.parent / (p.name + tail)


def check_output(path, fmt, *, force=False, inputs=()):
    """Checks that a tf-keras model can be written at `path` in format `fmt`.

    Returns:
        The output as a `pathlib.Path`.

    Raises:
        OutputError: the output is the input, exists without `force`, is of
            the wrong kind, or its directory is missing or not writable.
    """
    from bnconvert import model_io

    if fmt == H5:
        if pathlib.Path(path).is_dir():
            raise OutputError(
                f"Output {path} is a directory, but an .h5 model is a file; give "
                f"a file path. Received: output={str(path)!r}"
            )
        return model_io.check_output_path(
            path, force=force, inputs=inputs, suffixes=_H5_SUFFIXES
        )
    out = pathlib.Path(path)
    model_io.check_output_place(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"Output {out} is a file, but a SavedModel is a directory; choose "
            "another output path."
        )
    if out.exists() and not force:
        raise OutputError(
            f"Output {out} already exists; pass --force (force=True in Python) "
            "to overwrite it."
        )
    if out.is_dir() and any(out.iterdir()) and not (out / "saved_model.pb").exists():
        raise OutputError(
            f"Output {out} is a directory that is not a SavedModel; it is not "
            "replaced even with --force. Choose another output path."
        )
    return out


def save_model(model, path, fmt, *, force=False, inputs=()):
    """Saves a tf-keras model atomically as a SavedModel directory or H5 file.

    A SavedModel is written into a temporary directory beside `path` and
    renamed into place; an existing output (with `force`) is moved aside
    first and removed once the new one is in place. A failed save leaves
    nothing behind and the old output untouched.

    Args:
        model: The `tf_keras.Model`.
        path: The output path.
        fmt: `"savedmodel"` or `"h5"`.
        force: Whether an existing output may be replaced.
        inputs: Paths that must never be overwritten.

    Raises:
        OutputError: see `check_output`, or the file system refused the write.
    """
    from bnconvert import model_io

    out = check_output(path, fmt, force=force, inputs=inputs)
    if fmt == H5:
        with model_io.atomic_output(out) as tmp:
            try:
                model.save(str(tmp), save_format="h5")
            except OSError as e:
                raise OutputError(f"Cannot write {out}: {_first_line(e)}") from e
        return out
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    old = None
    try:
        try:
            model.save(str(tmp), save_format="tf")
        except OSError as e:
            raise OutputError(f"Cannot write {out}: {_first_line(e)}") from e
        if out.exists():
            old = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
