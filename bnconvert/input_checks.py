"""Checks on a model file's containers, made before Keras reads a byte of it.

A model file is data from elsewhere. Two things in its containers would
make a loader do more than read the file:

- HDF5 can point outside the file: an *external link* names another file,
  an *external storage* dataset keeps its bytes in other (local) files,
  and a *virtual dataset* maps them in from other files. Loading such a
  model would copy local files into the converted model's weights. Every
  H5 input is refused if it holds any of them (h5py tells, without reading
  data).
- Sizes can lie: a small `.keras` zip can inflate to gigabytes (a zip
  bomb), and a compressed or unwritten HDF5 dataset can declare far more
  bytes than the file holds. Those are refused from the zip directory and
  the HDF5 headers, before anything is inflated. `config.json` above
  `BNCONVERT_MAX_CONFIG_MB` (default 64) megabytes is refused outright:
  Keras reads and parses it whole.
"""

import os

from bnconvert.errors import ModelLoadError

CONFIG_LIMIT_ENV = "BNCONVERT_MAX_CONFIG_MB"
DEFAULT_CONFIG_LIMIT_MB = 64

# A zip member inflating beyond `_BOMB_RATIO` times its stored size is a bomb
# once it exceeds `_BOMB_FLOOR` bytes (real weights barely compress; Keras
# stores them uncompressed).
_BOMB_RATIO = 100
_BOMB_FLOOR = 64 << 20
# HDF5 datasets may declare a little more than the file holds (headers,
# alignment) but never much more when written by Keras (no compression).
_H5_SLACK = 16 << 20


def config_limit():
    """The largest accepted `config.json`, in bytes (`BNCONVERT_MAX_CONFIG_MB`)."""
    raw = os.environ.get(CONFIG_LIMIT_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_CONFIG_LIMIT_MB
    except ValueError:
        raise ModelLoadError(
            f"{CONFIG_LIMIT_ENV} must be a number of megabytes. "
            f"Received: {CONFIG_LIMIT_ENV}={raw!r}"
        ) from None
    return int(mb * (1 << 20))


def _mb(n):
    return f"{n / (1 << 20):.3g} MB"


def check_archive(model_file, archive):
    """Checks a `.keras` zip's directory and the H5 weights inside it.

    Args:
        model_file: The archive's path, for messages.
        archive: The open `zipfile.ZipFile`.

    Raises:
        ModelLoadError: A member would inflate like a bomb, `config.json`
            is above the limit, or the weights file points outside itself.
    """
    for info in archive.infolist():
        if info.file_size > _BOMB_FLOOR and info.file_size > _BOMB_RATIO * max(
            info.compress_size, 1
        ):
            raise ModelLoadError(
                f"{model_file} is refused: its member {info.filename} would inflate "
                f"from {info.compress_size} to {info.file_size} bytes (a zip bomb?). "
                "Re-save the model with model.save('NAME.keras')."
            )
    if "config.json" in archive.namelist():
        size, limit = archive.getinfo("config.json").file_size, config_limit()
        if size > limit:
            raise ModelLoadError(
                f"{model_file} is refused: its config.json is {_mb(size)}, above "
                f"the {_mb(limit)} limit; if you trust the file, raise the limit "
                f"with the environment variable {CONFIG_LIMIT_ENV}=<megabytes>."
            )
    if "model.weights.h5" in archive.namelist():
        import h5py

        info = archive.getinfo("model.weights.h5")
        try:
            with archive.open(info) as raw, h5py.File(raw, "r") as f:
                check_h5(model_file, f, info.file_size, "model.weights.h5 in ")
        except ModelLoadError:
            raise
        except (OSError, ValueError, RuntimeError):
            return  # unreadable weights: Keras's loader says what is wrong


def check_h5(model_file, h5, size, where=""):
    """Refuses an open HDF5 file that points outside itself or inflates.

    Args:
        model_file: The model's path, for messages.
        h5: The open `h5py.File`.
        size: The bytes the H5 file occupies.
        where: Text placed before the model's name in messages.

    Raises:
        ModelLoadError: An external link, external storage dataset or
            virtual dataset, or declared dataset sizes far above `size`.
    """
    import h5py

    found = []

    def visit_link(name, link):
        if isinstance(link, h5py.ExternalLink):
            found.append(f"'{name}' is an external link to {link.filename}")

    h5.visititems_links(visit_link)
    declared = 0

    def visit(name, obj):
        nonlocal declared
        if not isinstance(obj, h5py.Dataset):
            return
        if obj.external:
            found.append(f"dataset '{name}' keeps its data in external file(s) "
                         f"{', '.join(str(e[0]) for e in obj.external)}")
        elif obj.is_virtual:
            found.append(f"dataset '{name}' is a virtual dataset mapping other files")
        declared += int(obj.size) * obj.dtype.itemsize

    h5.visititems(visit)
    if found:
        raise ModelLoadError(
            f"{where}{model_file} is refused: {found[0]}. Model files must hold "
            "their own data (a crafted file could read local files into the "
            "weights); re-save the model with model.save()."
        )
    if declared > 2 * size + _H5_SLACK:
        raise ModelLoadError(
            f"{where}{model_file} is refused: its datasets declare {declared} bytes, "
            f"far more than the {size} bytes it holds (compressed or unwritten "
            "data that would fill memory); re-save the model with model.save()."
        )
