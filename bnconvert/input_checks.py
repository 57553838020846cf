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
  bomb: one member, or many members each small enough to pass alone), and
  a compressed or unwritten HDF5 dataset can declare far more bytes than
  the file holds. Those are refused from the zip directory and the HDF5
  headers, before anything is inflated; so is a zip of more than 10,000
  members.
- A zip may hold two members of the same name: Keras reads the last, other
  tools the first, so two readers would see two models. Refused. `config.json` above
  `BNCONVERT_MAX_CONFIG_MB` (default 64) megabytes is refused outright:
  Keras reads and parses it whole.
"""

import contextlib
import io
import os
import shutil
import struct
import tempfile
import zipfile
import zlib

from bnconvert.errors import ModelLoadError

CONFIG_LIMIT_ENV = "BNCONVERT_MAX_CONFIG_MB"
DEFAULT_CONFIG_LIMIT_MB = 64

# A zip member inflating beyond `_BOMB_RATIO` times its stored size is a bomb
# once it exceeds `_BOMB_FLOOR` bytes (real weights barely compress; Keras
# stores them uncompressed).
_BOMB_RATIO = 100
_BOMB_FLOOR = 64 << 20
# Keras writes three members, plus one per asset file (vocabularies).
_MAX_MEMBERS = 10_000
# A zip local file header: signature, versions, flags, method, time, date,
# CRC, sizes, then the lengths of the name and extra field that follow it.
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
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

    Reads the zip directory, then the HDF5 headers of `model.weights.h5`
    (each byte at most once: see `_member_file`), never its data.

    Args:
        model_file: The archive's path, for messages.
        archive: The open `zipfile.ZipFile`.

    Raises:
        ModelLoadError: The archive has too many members or two of the same
            name, a member or all compressed members together would inflate
            like a bomb, `config.json` is above the limit, or the weights
            file points outside itself.
    """
    _check_members(model_file, archive.infolist())
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
            with _member_file(model_file, archive, info) as raw, h5py.File(raw, "r") as f:
                check_h5(model_file, f, info.file_size, "model.weights.h5 in ")
        except ModelLoadError:
            raise
        except (OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile, zlib.error):
            return  # unreadable weights: Keras's loader says what is wrong


def _check_members(model_file, infos):
    """Refuses too many members, duplicate names, and members that inflate like bombs."""
    if len(infos) > _MAX_MEMBERS:
        raise ModelLoadError(
            f"{model_file} is refused: it holds {len(infos)} zip members, more than "
            f"the {_MAX_MEMBERS} a Keras model file needs; re-save the model with "
            "model.save('NAME.keras')."
        )
    seen = set()
    for info in infos:
        if info.filename in seen:
            # zipfile (and Keras) read the last one; other tools the first.
            raise ModelLoadError(
                f"{model_file} is refused: it holds two zip members named "
                f"{info.filename!r}, and tools disagree on which one counts; "
                "re-save the model with model.save('NAME.keras')."
            )
        seen.add(info.filename)
        if _inflates(info.file_size, info.compress_size):
            raise ModelLoadError(
                f"{model_file} is refused: its member {info.filename} would inflate "
                f"from {info.compress_size} to {info.file_size} bytes (a zip bomb?). "
                "Re-save the model with model.save('NAME.keras')."
            )
    # Many members each below the floor inflate as much as one above it.
    packed = [info for info in infos if info.file_size > info.compress_size]
    inflated = sum(info.file_size for info in packed)
    compressed = sum(info.compress_size for info in packed)
    if _inflates(inflated, compressed):
        raise ModelLoadError(
            f"{model_file} is refused: its {len(packed)} compressed members would "
            f"together inflate from {compressed} to {inflated} bytes (a zip bomb?). "
            "Re-save the model with model.save('NAME.keras')."
        )


def _inflates(inflated, compressed):
    return inflated > _BOMB_FLOOR and inflated > _BOMB_RATIO * max(compressed, 1)


@contextlib.contextmanager
def _member_file(model_file, archive, info):
    """A seekable file object holding one member's bytes, each read at most once.

    h5py reads by seeking, backwards too; a zip member stream answers a
    backward seek by reading the member again from its start, which made
    checking a 480 MB file take minutes. A stored member (how Keras writes
    its weights) is read in place, as a window of the archive file; a
    compressed one is inflated once into an anonymous temporary file.
    """
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
        with open(model_file, "rb") as whole:
            start = _data_offset(whole, info)
            if start + info.file_size <= os.fstat(whole.fileno()).st_size:
                with _Window(whole, start, info.file_size) as f:
                    yield f
                return
    with tempfile.TemporaryFile() as spool:
        with archive.open(info) as member:
            shutil.copyfileobj(member, spool, 1 << 20)
        spool.seek(0)
        yield spool


def _data_offset(whole, info):
    """Where a member's bytes start: after its local header, which has its own lengths."""
    whole.seek(info.header_offset)
    header = whole.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


class _Window(io.RawIOBase):
    """The bytes `[start, start + size)` of an open binary file, as a read-only file."""

    def __init__(self, whole, start, size):
        super().__init__()
        self._whole, self._start, self._size, self._at = whole, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._at

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._at = base + offset
        return self._at

    def readinto(self, buffer):
        count = max(0, min(len(buffer), self._size - self._at))
        if not count:
            return 0
        self._whole.seek(self._start + self._at)
        got = self._whole.readinto(memoryview(buffer)[:count])
        self._at += got
        return got


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
