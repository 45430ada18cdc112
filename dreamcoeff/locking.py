"""One run per output folder: an exclusive OS lock on ``<folder>/.dreamcoeff.lock``.

The trainer (``--output_dir``) and the sampler (``--output``) hold a :class:`FolderLock` on their
output folder for their whole life, taken before anything in the folder is read for a decision,
cleaned or overwritten. A second run on the same folder gets a :class:`FolderBusyError` naming the
first one (pid, host, start time, read from the lock file) and touches nothing.

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)``: the kernel releases it when its owner dies, so even a
``kill -9`` never leaves a folder locked. The file's content (JSON: pid, host, start time) is only
information; an owner that ended cleanly removes the file, so a new owner that finds content there
knows the previous run ended without releasing it, and says so. Where there is no ``fcntl``
(Windows), or the file system refuses locks, a warning says the folder is not locked and the run
goes on.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderBusyError", "FolderLock", "LockOwner", "read_owner"]

LOCK_NAME = ".dreamcoeff.lock"
logger = logging.getLogger("dreamcoeff")

# flock's "held by someone else" (EWOULDBLOCK is EAGAIN on Linux; some systems answer EACCES)
_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}
# the file system cannot lock at all (some network file systems)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or held) a lock, as its lock file says; any field may be unknown."""

    pid: int | None = None
    host: str | None = None
    started: str | None = None

    @classmethod
    def current(cls) -> LockOwner:
        """This process: its pid, this host's name, now (local time with its UTC offset)."""
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), now)

    @classmethod
    def from_text(cls, text: str) -> LockOwner | None:
        """Parse a lock file's content; None when it is empty, an unknown owner when it is not JSON."""
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        pid = data.get("pid")
        return cls(
            pid if isinstance(pid, int) else None,
            str(data["host"]) if data.get("host") is not None else None,
            str(data["started"]) if data.get("started") is not None else None,
        )

    def to_text(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "started": self.started}) + "\n"

    def describe(self) -> str:
        """``pid N on HOST, started T`` (``?`` for what the file does not say)."""

        def known(value: object) -> str:
            return "?" if value is None else str(value)

        return f"pid {known(self.pid)} on {known(self.host)}, started {known(self.started)}"


def read_owner(folder: str | os.PathLike) -> LockOwner | None:
    """What ``folder``'s lock file says about its owner (None: no file, or an empty one). This does
    not tell whether the owner still runs; only taking the lock does."""
    try:
        return LockOwner.from_text((Path(folder) / LOCK_NAME).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock. The message names it and what to do."""

    def __init__(self, folder: Path, owner: LockOwner | None, flag: str) -> None:
        self.folder, self.owner, self.flag = folder, owner, flag
        who = f"another run ({owner.describe()})" if owner is not None else "another run (still starting)"
        super().__init__(f"{who} is using {folder}: wait for it, or choose another {flag}")


class FolderLock:
    """An exclusive lock on ``folder`` (created if missing) for one run; use as a context manager::

        with FolderLock(out, flag="--output_dir"):
            ...  # nobody else holds out/.dreamcoeff.lock

    ``flag`` is the command-line flag that named the folder, for the busy message. ``warn`` receives the
    warnings (a previous owner that ended without releasing the lock; no locking on this platform).
    """

    def __init__(
        self, folder: str | os.PathLike, flag: str = "--output_dir", warn: Callable[[str], object] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.flag = flag
        self.warn = warn if warn is not None else logger.warning
        self.previous: LockOwner | None = None  # the owner named by a file left by a run that died
        self._fd: int | None = None
        self._created_folder = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderBusyError` at once (never waits). Creates the folder
        when it is missing (removed again on release if still empty). Other ``OSError`` (no
        permission to write the folder) propagates."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        if fcntl is None:
            self.warn(f"cannot lock {self.folder} on this platform (no fcntl): make sure no other run uses it")
            return self
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)  # FileExistsError where a file has the folder's name
            self._created_folder = True
        for _ in range(100):  # a retry only when the file was replaced under us (a releasing owner)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                text = _read_fd(fd)
                os.close(fd)
                if exc.errno in _BUSY:
                    self._remove_created_folder()
                    raise FolderBusyError(self.folder, LockOwner.from_text(text), self.flag) from None
                if exc.errno in _UNSUPPORTED:
                    if not text:  # the empty file just opened: no lock, no lock file
                        self.path.unlink(missing_ok=True)
                    self._remove_created_folder()
                    self.warn(f"cannot lock {self.folder} ({exc.strerror}): make sure no other run uses it")
                    return self
                raise
            # An owner that released between our open and our flock unlinked the file we opened: the
            # lock is on a file nobody else will look at. Take the one at the path now instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            break
        else:  # pragma: no cover - a folder whose lock file is replaced a hundred times in a row
            raise OSError(errno.EAGAIN, f"the lock file {self.path} keeps changing")
        self.previous = LockOwner.from_text(_read_fd(fd))
        if self.previous is not None:
            self.warn(
                f"{self.folder}: taking over the lock of a run that ended without releasing it "
                f"({self.previous.describe()})"
            )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, LockOwner.current().to_text().encode(), 0)
            os.fsync(fd)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (the file goes first, while still held, so no
        other run can take the lock on a file that is being removed). Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.unlink(self.path)
            except OSError:
                pass
        finally:
            os.close(fd)  # closing the last descriptor of the file releases the flock
        self._remove_created_folder()

    def _remove_created_folder(self) -> None:
        """A folder this lock created and nothing else used: gone again (a refused run leaves no trace)."""
        if self._created_folder:
            self._created_folder = False
            try:
                self.folder.rmdir()
            except OSError:
                pass  # not empty: the run wrote into it

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *_exc_info: object) -> None:
        self.release()


def _read_fd(fd: int, limit: int = 4096) -> str:
    """The first bytes of an open file, as text (what its owner wrote)."""
    try:
        return os.pread(fd, limit, 0).decode("utf-8", errors="replace")
    except OSError:
        return ""
