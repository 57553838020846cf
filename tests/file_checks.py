"""Helpers of the robustness tests: run the CLI, and digest every path and its bytes."""

import hashlib
import os
import pathlib
import stat

from click.testing import CliRunner

import bnconvert_cli


def tree_digest(root):
    """Every path under `root` (itself included) with its content hash.

    Directories map to `"dir"`; other non-regular files (pipes, devices,
    dangling links) to their file type, and are never opened: reading a
    pipe would block.
    """
    root = pathlib.Path(root)
    paths = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
    out = {}
    for p in paths:
        rel = str(p.relative_to(root.parent))
        mode = os.lstat(p).st_mode
        if stat.S_ISDIR(mode):
            out[rel] = "dir"
        elif stat.S_ISREG(mode) or (stat.S_ISLNK(mode) and p.is_file()):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = stat.S_IFMT(mode)
    return out


def run_cli(*args):
    """Invokes the `bnconvert` command group in-process with `args` (paths allowed)."""
    return CliRunner().invoke(bnconvert_cli.main, [str(a) for a in args])
