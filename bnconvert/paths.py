"""Where outputs may go, and writing them so that they appear whole or not at all.

Every output is checked before any long work starts: it is not an input,
does not contain one and does not lie inside one; its directory exists and
takes files; it exists only if `--force` allows replacing it, and `--force`
replaces only a regular file or a SavedModel directory, never a device, a
pipe, a dangling symbolic link or another kind of directory.

Outputs are written to a temporary name in the destination directory and
renamed into place (atomic on one file system): a failed or interrupted
write leaves the destination as it was.
"""

import os
import pathlib

from bnconvert import outputs
from bnconvert.errors import OutputError
from bnconvert.errors import first_line

# The output kinds (a file, or a directory for a SavedModel).
FILE = outputs.FILE
DIRECTORY = outputs.DIRECTORY


def beside(path, tail):
    """`model.keras` -> `model{tail}`; a directory `models/resnet` -> `models/resnet{tail}`."""
    p = pathlib.Path(path)
    if p.is_dir() or p.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        return p.parent / (p.name + tail)
    return p.with_name(p.stem + tail)


def same_file(a, b):
    """Whether paths `a` and `b` name the same file (existing or not)."""
    a, b = pathlib.Path(a), pathlib.Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _inside(inner, outer):
    """Whether `inner` lies at or below the directory `outer`."""
    inner, outer = pathlib.Path(inner).resolve(), pathlib.Path(outer).resolve()
    return inner == outer or outer in inner.parents


def check_output(path, *, force=False, inputs=(), suffixes=None, kind=FILE, option="--output"):
    """Checks that `path` can be written, before any long work starts.

    Args:
        path: The output path.
        force: Whether an existing output may be replaced.
        inputs: Paths that must never be overwritten, contained or entered
            (the model, rule files, custom-object files, check arrays).
        suffixes: Optional accepted endings, such as `(".keras",)`.
        kind: `"file"`, or `"directory"` for a SavedModel output.
        option: The option that names the output, for messages.

    Returns:
        The output as a `pathlib.Path`.

    Raises:
        OutputError: The output is or holds an input, lies inside one,
            exists without `force`, is of the wrong kind, has the wrong
            suffix, or its directory is missing or not writable.
    """
    out = pathlib.Path(path)
    if suffixes and not out.name.lower().endswith(tuple(suffixes)):
        raise OutputError(
            f"Output {out} must end in {' or '.join(suffixes)}. "
            f"Received: {option}={str(out)!r}"
        )
    for source in inputs:
        if source is None:
            continue
        if same_file(out, source):
            raise OutputError(
                f"Output {out} is the input model or another input of this run; "
                "inputs are never overwritten, choose another output path. "
                f"Received: {option}={str(out)!r}"
            )
        if _inside(source, out) or (pathlib.Path(source).is_dir() and _inside(out, source)):
            raise OutputError(
                f"Output {out} contains or lies inside the input {source}; choose "
                f"a path outside it. Received: {option}={str(out)!r}"
            )
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(
            f"Output directory {parent} does not exist; create it first or "
            "choose another output path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Output directory {parent} is not writable.")
    if not (out.exists() or out.is_symlink()):
        return out
    if not out.exists():
        # Writing through it would create its target wherever it points.
        raise OutputError(
            f"Output {out} is a dangling symbolic link (to {os.readlink(out)}); it is "
            "not replaced, even with --force. Remove the link or choose another output path."
        )
    if kind == FILE and out.is_dir():
        raise OutputError(
            f"Output {out} is a directory, but {option} writes a file; give a "
            f"file path. Received: {option}={str(out)!r}"
        )
    if kind == FILE and not out.is_file():
        raise OutputError(
            f"Output {out} is not a regular file (a device or a pipe?); --force "
            "replaces regular files only. Choose another output path."
        )
    if kind == DIRECTORY and not out.is_dir():
        raise OutputError(
            f"Output {out} is a file, but a SavedModel is a directory; choose "
            "another output path."
        )
    if kind == DIRECTORY and any(out.iterdir()) and not (out / "saved_model.pb").exists():
        raise OutputError(
            f"Output {out} is a directory that is not a SavedModel; it is not "
            "replaced even with --force. Choose another output path."
        )
    if not force:
        raise OutputError(
            f"Output {out} already exists; pass --force (force=True in Python) "
            "to overwrite it."
        )
    return out


def check_distinct(*named):
    """Refuses two outputs that name the same path.

    Args:
        *named: `(option, path)` pairs; pairs whose path is `None` are ignored.

    Raises:
        OutputError: Two of the paths are the same file.
    """
    given = [(option, path) for option, path in named if path is not None]
    for i, (option_a, a) in enumerate(given):
        for option_b, b in given[i + 1:]:
            if same_file(a, b):
                raise OutputError(
                    f"{option_a} and {option_b} both name {b}; give each output "
                    f"its own path. Received: {option_a}={str(a)!r}"
                )


def atomic_file(path, *, force=True):
    """Yields a temporary path in `path`'s directory that becomes `path` on success.

    The temporary file keeps the destination's extension (Keras picks the
    format from it). On any exception, `KeyboardInterrupt` included, it is
    removed and `path` is left as it was. With `force=False` an output that
    appears at `path` meanwhile is not replaced (`OutputError`). See
    `bnconvert.outputs`.
    """
    return outputs.atomic(path, FILE, force=force)


def write_text(path, text, *, force=False, inputs=(), option="--report"):
    """Checks `path`, then writes `text` (UTF-8) to it atomically.

    Raises:
        OutputError: see `check_output`, or the file system refused the write.
    """
    out = check_output(path, force=force, inputs=inputs, option=option)
    with atomic_file(out, force=force) as tmp:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as e:
            raise OutputError(f"Cannot write {out}: {first_line(e)}") from e
    return out
