"""Crash-safe file writes: atomic replace, fsync, and rename-aside-then-delete, one copy of each.

Every file and folder dreamcoeff writes (alpha and LoRA files, checkpoints, model cards, grids) goes
through these helpers, so a kill or a full disk never leaves a half-written file under its final
name, and a folder being replaced or deleted is never visible half-gone under a name a reader trusts.

A write that fails (full disk, quota, I/O error) surfaces as one exception type, `WriteError`, whose
message says which file and why (`write_failure` recognises the forms the writers raise it in); the
callers add what is intact and what to do.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "WriteError",
    "atomic_write",
    "fsync_dir",
    "fsync_tree",
    "remove_aside",
    "remove_stale_temps",
    "replace_path",
    "write_failure",
]

#: Temporary files a killed write leaves beside its target: `atomic_write`'s ``.<name>.XXXX.tmp`` and
#: safetensors' own ``.tmpXXXXXX`` (its writer stages each file under such a name, then renames it).
TEMP_FILE_RE = re.compile(r"^(\..+\.tmp|\.tmp[A-Za-z0-9]{6})$")

# Under this much free space, a writer's failure without an errno (torch.save) is taken for a full disk.
_NEARLY_FULL_BYTES = 1 << 20


def _free_space(path: Path) -> tuple[int, Path] | None:
    """(bytes free to this user, mount point) of the file system holding `path`, or None."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    mount = folder.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return st.f_bavail * st.f_frsize, mount


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


class WriteError(OSError):
    """A file that could not be written. ``str()`` names the file and the reason, e.g.
    ``could not write /out/x.safetensors: No space left on device (the disk is full: only 4.0 KiB free on
    /out)``; `reason` is the part after the colon. `errno` and `filename` are those of an OSError."""

    def __init__(self, path: str | os.PathLike, code: int, strerror: str):
        super().__init__(code, strerror, str(path))
        detail = ""
        if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            free = _free_space(Path(path))
            what = "the disk is full" if code == errno.ENOSPC else "the disk quota is used up"
            detail = f" ({what}: only {_size(free[0])} free on {free[1]})" if free else f" ({what})"
        self.reason = f"{strerror}{detail}"

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.reason}"

    def __reduce__(self):
        return type(self), (self.filename, self.errno, self.strerror)


def write_failure(exc: BaseException, path: str | os.PathLike) -> WriteError | None:
    """`exc` (or the exception it was raised from) as a `WriteError` when it is a failed write, else None.

    Recognised: a `WriteError` (kept as it is, naming its own file), an OSError with an errno,
    safetensors' writer error (``SafetensorError: ... I/O error: ... (os error 28)``, no errno of its
    own) and torch.save's zip writer error (a RuntimeError with neither errno nor cause: taken for a
    full disk when the disk holding `path` has under 1 MiB free, else for an I/O error). The result
    names `path`, the file the caller was writing.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, WriteError):
            return exc
        if isinstance(exc, OSError) and exc.errno is not None:
            return WriteError(path, exc.errno, exc.strerror or os.strerror(exc.errno))
        text = str(exc)
        found = re.search(r"os error (\d+)\)", text)
        if type(exc).__name__ == "SafetensorError" and found:
            code = int(found.group(1))
            return WriteError(path, code, os.strerror(code))
        if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
            free = _free_space(Path(path))
            if free is not None and free[0] < _NEARLY_FULL_BYTES:
                return WriteError(path, errno.ENOSPC, os.strerror(errno.ENOSPC))
            return WriteError(path, errno.EIO, f"{os.strerror(errno.EIO)} ({text.strip().splitlines()[0]})")
        exc = exc.__cause__
    return None


def _umask() -> int:
    mask = os.umask(0o22)  # read it by setting it: there is no other portable way
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], object]) -> Path:
    """Call `write_fn(tmp_path)` on a temporary file beside `path`, then rename it over `path`.

    A crash or a failed write (full disk) never leaves a half-written file under the final name, and
    an existing file stays intact until the new one is complete. Returns `path`. A failed write
    raises `WriteError` naming `path` (see `write_failure`); the temporary file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:  # mkstemp makes it 0600: give the file the mode open() would have given it
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):  # no fchmod (Windows) or a file system without modes
            pass
        os.close(fd)
        write_fn(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # judged before the partial file goes: torch's writer says nothing of why, the free space does
        failure = write_failure(exc, path) if isinstance(exc, Exception) else None
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if failure is None or failure is exc:
            raise
        raise failure from exc
    return path


def remove_stale_temps(folder: str | os.PathLike, older_than_s: float, recursive: bool = False) -> list[Path]:
    """Delete the temporary files of interrupted writes (`TEMP_FILE_RE`) in `folder` not modified for
    `older_than_s` seconds, and return them. The age keeps a folder that several runs share (the latent
    cache) safe: a temp file another process is writing right now is seconds old, never stale."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for path in folder.rglob("*") if recursive else folder.iterdir():
        try:
            if TEMP_FILE_RE.match(path.name) and path.is_file() and now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # renamed or removed by its writer in the meantime
            continue
    return removed


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
