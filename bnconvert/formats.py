"""Which model a path holds, judged from its files alone (no TensorFlow import).

Keras 3 writes `.keras` archives and, in its legacy writer, `.h5` files
stamped with its own 3.x `keras_version`. tf-keras (Keras 2) writes
SavedModel directories holding `keras_metadata.pb`, `.h5` files stamped
2.x, and `.keras` archives whose `metadata.json` says 2.x. A SavedModel
without Keras metadata (`model.export()`, `tf.saved_model.save`) holds a
traced graph, not layers, and is refused.

Every input that is not a model raises `ModelLoadError` with one line that
names the path, says what it is (or is not) and what to do.
"""

import dataclasses
import json
import pathlib
import zipfile

from bnconvert import input_checks
from bnconvert.errors import ModelLoadError
from bnconvert.errors import OutputError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
H5_SUFFIXES = (".h5", ".hdf5")

KERAS = "keras"
H5 = "h5"
SAVEDMODEL = "savedmodel"


# What each flavour writes: format -> accepted suffixes (none: a directory).
OUTPUT_FORMATS = {
    "keras3": {KERAS: (".keras",)},
    "tf_keras": {SAVEDMODEL: (), H5: H5_SUFFIXES},
}
# Why an output name fits none of them.
_WRITTEN_AS = {
    "keras3": "must end in .keras.",
    "tf_keras": (
        "asks for a .keras file, but tf-keras models are written as a SavedModel "
        "directory or an .h5 file; give a name without an extension or ending in .h5."
    ),
}
# The default output's ending for each flavour and input format: a Keras 3
# model is always written as .keras, a tf-keras model keeps its format.
_DEFAULT_ENDING = {
    ("keras3", KERAS): ".keras", ("keras3", H5): ".keras",
    ("tf_keras", SAVEDMODEL): "", ("tf_keras", H5): ".h5", ("tf_keras", KERAS): ".h5",
}


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A recognised model input.

    Attributes:
        path: The model file or SavedModel directory itself.
        flavour: `"keras3"` or `"tf_keras"`.
        format: `"keras"`, `"h5"` or `"savedmodel"`.
    """

    path: pathlib.Path
    flavour: str
    format: str


def flavour_name(path):
    """`"tf_keras"` if `path` recognisably holds a tf-keras model, else `"keras3"`.

    Never raises: an unreadable path is left to `resolve`, which says why.
    """
    try:
        return resolve(path).flavour
    except (ModelLoadError, OSError):
        return "keras3"


def resolve(path):
    """Finds the model at `path` and says which flavour and format it is.

    Args:
        path: A model file, a SavedModel directory, or a directory holding
            exactly one model file.

    Returns:
        A `ModelFile`.

    Raises:
        ModelLoadError: The path is missing, is not a regular file or
            directory, or holds no recognisable model.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"Model path does not exist: {p}. Check the path; a model is a "
            ".keras or .h5 file, or a directory holding one."
        )
    if p.is_dir():
        if (p / "saved_model.pb").is_file():
            if (p / "keras_metadata.pb").is_file():
                return ModelFile(p, "tf_keras", SAVEDMODEL)
            raise ModelLoadError(
                f"{p} is a TensorFlow SavedModel (e.g. from model.export() or "
                "tf.saved_model.save) that holds a traced graph, not Keras layers "
                "to rewrite; convert the .keras model it was exported from."
            )
        p = _model_file_in_directory(p)
    elif not p.is_file():
        raise ModelLoadError(
            f"{p} is not a regular file or directory (a pipe or device?); pass "
            "a model file."
        )
    suffix = p.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise ModelLoadError(
            f"{p} is not a Keras model file: expected a name ending in .keras, "
            f".h5 or .hdf5. Received: suffix={p.suffix or '(none)'!r}"
        )
    if suffix == ".keras":
        major = _check_keras_archive(p)
        return ModelFile(p, "tf_keras" if major in (1, 2) else "keras3", KERAS)
    major = _check_h5_model(p)
    return ModelFile(p, "tf_keras" if major in (1, 2) else "keras3", H5)


def _model_file_in_directory(directory):
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
    """Checks a `.keras` zip and returns the Keras major version it records."""
    try:
        with zipfile.ZipFile(model_file) as archive:
            input_checks.check_archive(model_file, archive)
            names = set(archive.namelist())
            metadata = {}
            if "metadata.json" in names:
                info = archive.getinfo("metadata.json")
                if info.file_size < 1 << 20:
                    metadata = json.loads(archive.read("metadata.json") or b"{}")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
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
    return _major(metadata.get("keras_version") if isinstance(metadata, dict) else None)


def _check_h5_model(model_file):
    """Checks an H5 model file and returns the Keras major version it records."""
    import h5py

    try:
        with h5py.File(model_file, "r") as f:
            has_config = "model_config" in f.attrs
            version = f.attrs.get("keras_version")
            input_checks.check_h5(model_file, f, model_file.stat().st_size)
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
    if isinstance(version, bytes):
        version = version.decode("utf-8", "replace")
    return _major(version)


def _major(version):
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def output_format(flavour, path, option="--output"):
    """The format in which a model of `flavour` (its name) is written to `path`.

    Keras 3 models are written as `.keras` files; tf-keras models as `.h5`
    files, or SavedModel directories for names without a model suffix.

    Raises:
        OutputError: The name asks for a format the flavour is not written in.
    """
    if SAVEDMODEL not in OUTPUT_FORMATS[flavour] and pathlib.Path(path).is_dir():
        raise OutputError(
            f"Output {path} is a directory, but {option} writes a file; give a "
            f"file path. Received: {option}={str(path)!r}"
        )
    name = str(path).lower()
    for fmt, suffixes in OUTPUT_FORMATS[flavour].items():
        if suffixes and name.endswith(suffixes):
            return fmt
    if SAVEDMODEL in OUTPUT_FORMATS[flavour] and not name.endswith(MODEL_SUFFIXES):
        return SAVEDMODEL
    raise OutputError(f"Output {path} {_WRITTEN_AS[flavour]} Received: {option}={str(path)!r}")


def default_output(path, found, tail):
    """Where a converted copy of the input at `path` (found as `found`) goes by default.

    `model.keras` -> `model{tail}.keras`; a tf-keras SavedModel `models/resnet`
    -> `models/resnet{tail}`, a tf-keras `model.h5` -> `model{tail}.h5`.
    """
    from bnconvert import paths

    return paths.beside(path, tail + _DEFAULT_ENDING[found.flavour, found.format])
