"""File-system primitives of the journal: atomic publish, directory fsync, flock locks."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import time
from pathlib import Path

from vmrep.errors import JournalError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry was created."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def rand_hex(nbytes: int = 16) -> str:
    return secrets.token_hex(nbytes)


def publish(tmp_dir: Path, dest: Path, data: bytes | memoryview, *, owner: str = "",
            sync_dir: bool = True) -> None:
    """Write `data` to a temp file, fsync, rename to `dest`, fsync dest's directory.

    A reader sees either no `dest` or the whole of it. The temp file's name starts with
    `owner` (a session id), so recover() leaves the temp files of live sessions alone.
    """
    tmp = tmp_dir / f"{owner or rand_hex(8)}{rand_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, dest)
    if sync_dir:
        fsync_dir(dest.parent)


def unlink_quiet(path: Path) -> int:
    """Remove a file, returning its size (0 if it was already gone)."""
    try:
        size = path.stat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return 0


class FileLock:
    """An flock(2) lock on a file. Shared or exclusive; per open file description, so two
    locks in one process conflict exactly as two processes would."""

    def __init__(self, path: Path, *, shared: bool) -> None:
        self.path = path
        self.shared = shared
        self.fd: int | None = None

    def acquire(self, timeout: float = 0.0, what: str = "") -> bool:
        if self.fd is not None:
            raise JournalError(f"lock {self.path} acquired twice")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, mode)
                self.fd = fd
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None
