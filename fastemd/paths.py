"""Can this path be written? One answer for every command, asked before any work is done.

`unwritable_folder` for a folder a command makes and fills (a run folder, a trace folder);
`unwritable_file` for a file it writes (a manifest, a probe's JSON); `input_it_is` for the rule
every command keeps: never write over what it reads (links followed). Each returns why not, in
words a one-line error can carry after the option's name, or None."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def _first_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where the folders to be made would start)."""
    while not path.exists():
        path = path.parent
    return path


def unwritable_folder(folder: Path) -> str | None:
    """Why `folder` cannot be (made and) written, or None."""
    if str(folder) in ("", "."):
        return None if os.access(".", os.W_OK) else "the current folder is not writable"
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    parent = _first_existing(folder)
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def unwritable_file(path: Path, make_parents: bool = True) -> str | None:
    """Why a file cannot be written at `path`, or None: a broken link, a folder, a parent that is
    a file (or, without `make_parents`, missing), no write permission. Whether an existing file
    may be replaced is the command's rule, asked before this."""
    if path.is_symlink() and not path.exists():
        return "is a broken link; name a file to write"
    if path.is_dir():
        return "is a folder; name the file to write"
    if not make_parents and not path.parent.is_dir():
        return f"folder {path.parent} does not exist"
    parent = _first_existing(path.parent)  # the folders to be made: the first existing one must be a folder
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "not writable"
    return None


def same_file(a: Path, b: Path) -> bool:
    """Both exist and are one file (a hard or symbolic link counts)."""
    try:
        return a.samefile(b)
    except OSError:
        return False


def input_it_is(path: Path, inputs: Iterable[str]) -> str | None:
    """The input (as given) that writing `path` would overwrite, links followed, or None.
    `ANN.json::IMAGE_DIR` reads ANN.json."""
    for given in inputs:
        source = Path(given.partition("::")[0]).expanduser()
        if path.resolve() == source.resolve() or same_file(path, source):
            return given.partition("::")[0]
    return None
