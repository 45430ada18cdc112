"""Crash-safe file writes: atomic replace, fsync, and rename-aside-then-delete, one copy of each.

Every file and folder dreamcoeff writes (alpha and LoRA files, checkpoints, model cards, grids) goes
through these helpers, so a kill or a full disk never leaves a half-written file under its final
name, and a folder being replaced or deleted is never visible half-gone under a name a reader trusts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "fsync_tree", "remove_aside", "replace_path"]


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], object]) -> Path:
    """Call `write_fn(tmp_path)` on a temporary file beside `path`, then rename it over `path`.

    A crash or a failed write (full disk) never leaves a half-written file under the final name, and
    an existing file stays intact until the new one is complete. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is flushed)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported by every file system
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush a folder's files and the folder itself to disk (a rename is only as durable as its data)."""
    folder = Path(folder)
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def remove_aside(path: str | os.PathLike, aside: str | os.PathLike | None = None) -> None:
    """Delete a folder by first renaming it to `aside` (default `<name>.old`), then removing that.

    A kill mid-delete leaves only the aside name (which readers ignore and the next run cleans up),
    never a half-deleted folder under a name that a reader would accept.
    """
    path = Path(path)
    trash = Path(aside) if aside is not None else path.with_name(path.name + ".old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_path(src: str | os.PathLike, dst: str | os.PathLike, aside: str | os.PathLike | None = None) -> None:
    """Move a finished file or folder `src` into place at `dst`.

    A folder that exists at `dst` is renamed aside first (to `aside`, default `.<name>.old.tmp`) and
    removed only after the new one is in place, so `dst` is never missing or half-written.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir() and dst.exists():
        old = Path(aside) if aside is not None else dst.with_name(f".{dst.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
