"""All outputs of a run: written aside, then placed together or not at all.

An `Outputs` transaction hands out a temporary place beside each output
(`stage`), and `commit` moves them all into place at the end. Placing
never silently replaces anything: without `force` a file is hard-linked to
its final name (which fails if that name appeared meanwhile, as another
run writing the same output would make it) and a directory claims its name
with `mkdir` before the rename; with `force` the existing output is moved
aside first and removed only once every output is in place. If any step
fails, or the run is interrupted, the outputs already placed are removed
and the ones they replaced are put back.

Every temporary name is `.<name>.bnc<pid>.<8 random chars>.<kind>` in the
output's directory, where `<kind>` is `partial<suffix>` (an output being
written), `old` (an output being replaced) or `tmp` (Keras's own scratch
directory during a save). A killed run leaves such names behind;
`remove_stale` deletes those whose process is gone, and puts back an `old`
output whose replacement never arrived.
"""

import contextlib
import errno
import os
import pathlib
import re
import secrets
import shutil
import tempfile

from bnconvert.errors import OutputError
from bnconvert.errors import first_line

FILE = "file"
DIRECTORY = "directory"

# Output names may be up to NAME_MAX (255) bytes; the temporary name keeps
# a short part of the name so that it fits too.
_STEM_CHARS = 80
_SUFFIX_CHARS = 16
_STALE = re.compile(
    r"^\.(?P<stem>.*)\.bnc(?P<pid>\d+)\.[a-z0-9_]{8}\.(?P<kind>partial.*|old|tmp)$"
)


def temporary_prefix(out):
    """`.<name>.bnc<pid>.`: the start of every temporary name for `out`."""
    return f".{pathlib.Path(out).name[:_STEM_CHARS]}.bnc{os.getpid()}."


def _partial_suffix(out, kind):
    # Keras picks the format from the extension, so a file keeps it.
    suffix = pathlib.Path(out).suffix[:_SUFFIX_CHARS] if kind == FILE else ""
    return ".partial" + suffix


def _aside_name(out, kind):
    return pathlib.Path(out).parent / f"{temporary_prefix(out)}{secrets.token_hex(4)}.{kind}"


def umask_mode(mode):
    """`mode` as a normal create under the current umask would give it."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _remove(path):
    path = pathlib.Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(directory):
    """Removes temporary outputs left in `directory` by killed runs.

    Only names of our own pattern, owned by this user, whose process is
    gone are touched. An `old` output (moved aside to be replaced) is put
    back when nothing took its place, and removed otherwise.

    Returns:
        The number of entries removed or put back.
    """
    count = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or _alive(int(match["pid"])):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
        except OSError:
            continue
        original = pathlib.Path(directory) / match["stem"]
        if (match["kind"] == "old" and len(match["stem"]) < _STEM_CHARS
                and not os.path.lexists(original)):
            with contextlib.suppress(OSError):
                os.rename(entry.path, original)
                count += 1
            continue
        _remove(entry.path)
        count += 1
    return count


@contextlib.contextmanager
def private_tempdir(near):
    """Points `tempfile` (and `TMPDIR`) at a fresh directory beside `near`.

    Keras and TensorFlow write scratch files through `tempfile` while
    saving; a failed or killed save would leave them in /tmp. Here they go
    to a directory of our naming that is removed afterwards, or by
    `remove_stale` after a kill.
    """
    scratch = _aside_name(near, "tmp")
    os.mkdir(scratch, 0o700)
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(scratch)
    os.environ["TMPDIR"] = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(scratch, ignore_errors=True)


def _place(tmp, out, kind):
    """Moves `tmp` to `out`, failing if `out` exists (no silent replacement)."""
    if kind == DIRECTORY:
        # Claim the name: mkdir fails if it exists; rename then replaces
        # the empty directory we just made, atomically.
        os.mkdir(out)
        try:
            os.rename(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(out)
            raise
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise
    except OSError as e:
        # A file system without hard links: check, then rename.
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
        if os.path.lexists(out):
            raise FileExistsError(errno.EEXIST, "File exists", str(out)) from e
        os.rename(tmp, out)
        return
    os.unlink(tmp)


def _check_replaceable(out, kind):
    """Re-checks, at commit time, that `--force` may replace what is at `out`."""
    if kind == FILE and out.is_symlink():
        return  # the link itself is replaced, never its target
    if kind == FILE and not out.is_file():
        raise OutputError(
            f"Output {out} is no longer a regular file; --force replaces regular "
            "files only. Nothing was written."
        )
    if kind == DIRECTORY and not (out.is_dir() and (
        (out / "saved_model.pb").exists() or not any(out.iterdir())
    )):
        raise OutputError(
            f"Output {out} is no longer a SavedModel directory; it is not "
            "replaced. Nothing was written."
        )


class Outputs:
    """A set of outputs placed together at `commit`, or not at all.

    Args:
        force: Whether existing outputs may be replaced.

    Use as a context manager: leaving it with an exception (an interrupt
    included) removes every temporary place and undoes a commit that had
    not finished.
    """

    def __init__(self, force=False):
        self.force = force
        self._staged = []  # (final path, temporary path, kind)
        self._placed = []  # [final path, kind, moved-aside old output or None, placed?]
        self._done = False

    def stage(self, out, kind=FILE, *, create=True):
        """Returns a new temporary place (an empty file or directory) for `out`.

        With `create=False` only a free name is returned, for a writer that
        creates the file itself.
        """
        out = pathlib.Path(out)
        prefix, suffix = temporary_prefix(out), _partial_suffix(out, kind)
        if not create:
            tmp = out.parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        elif kind == DIRECTORY:
            tmp = tempfile.mkdtemp(dir=out.parent, prefix=prefix, suffix=suffix)
            # mkdtemp makes it private (0700); outputs get the umask's mode.
            os.chmod(tmp, umask_mode(0o777))
        else:
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=prefix, suffix=suffix)
            os.close(fd)
        self._staged.append((out, pathlib.Path(tmp), kind))
        return pathlib.Path(tmp)

    def commit(self):
        """Places every staged output; on any failure, places none."""
        try:
            for out, tmp, kind in self._staged:
                old = None
                if os.path.lexists(out):
                    if not self.force:
                        raise _appeared(out)
                    _check_replaceable(out, kind)
                    old = _aside_name(out, "old")
                    os.rename(out, old)
                # Recorded before placing: a failure puts `old` back.
                entry = [out, kind, old, False]
                self._placed.append(entry)
                if kind == FILE:
                    os.chmod(tmp, umask_mode(0o666))
                try:
                    _place(tmp, out, kind)
                except FileExistsError:
                    raise _appeared(out) from None
                entry[3] = True
        except BaseException:
            self.rollback()
            raise

    def finish(self):
        """Forgets the replaced outputs: the commit stands."""
        for _, _, old, _ in self._placed:
            if old is not None:
                _remove(old)
        self._done = True

    def rollback(self):
        """Removes what was placed and puts back what it replaced."""
        for out, kind, old, placed in reversed(self._placed):
            if placed:
                _remove(out)
            if old is None:
                continue
            if os.path.lexists(out):
                # Another run took the name meanwhile; its output stays.
                _remove(old)
            else:
                with contextlib.suppress(OSError):
                    os.rename(old, out)
        self._placed = []

    def discard(self):
        for _, tmp, _ in self._staged:
            _remove(tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None and not self._done:
            self.rollback()
        self.discard()
        return False


def write_error(out, error, tmp=None):
    """The `OutputError` for a refused write of `out`, naming it, never its temporary place `tmp`."""
    text = getattr(error, "strerror", None) or first_line(error)
    if tmp is not None:
        text = text.replace(str(tmp), str(out))
    return OutputError(f"Cannot write {out}: {text}; nothing was written.")


def _appeared(out):
    return OutputError(
        f"Output {out} appeared while this run was working (another run writing "
        "the same output?); nothing was written. Pass --force to replace it."
    )


@contextlib.contextmanager
def atomic(path, kind=FILE, *, force=True):
    """Yields a temporary place that becomes `path` on success (one-output `Outputs`)."""
    with Outputs(force) as outputs:
        tmp = outputs.stage(path, kind)
        yield tmp
        outputs.commit()
        outputs.finish()
