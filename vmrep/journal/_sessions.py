"""Sessions: who is using the journal right now, and which condemned blocks they have seen.

Every writer and long reader registers a session: `locks/<sid>.lock`, a file it holds an
exclusive flock on for its whole life, holding JSON with the highest garbage-collection
epoch it had seen when it loaded the index. Garbage collection deletes a condemned blob
only once every live session has seen its condemnation (so none can deduplicate against
it). A lock file whose flock can be taken belongs to a dead process and is removed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

from vmrep.errors import JournalLocked
from vmrep.journal._fs import FileLock, ensure_dir, rand_hex

if TYPE_CHECKING:
    from vmrep.journal.store import BlockStore


def _remove_if_unlocked(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

SID_LEN = 16  # hex characters of a session id; temp files and packs start with their owner's


class Session:
    def __init__(self, root: Path, kind: str, vpg: str | None = None) -> None:
        self.root = root
        self.sid = rand_hex(SID_LEN // 2)
        self.kind = kind
        self.vpg = vpg
        locks = root / "locks"
        ensure_dir(locks)
        tmp = locks / f"{self.sid}.new"  # probers ignore .new files (see live_sessions)
        self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # renamed only once locked, so a prober never mistakes it for a dead session's
        self.path = locks / f"{self.sid}.lock"
        os.rename(tmp, self.path)
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Record the highest condemnation epoch seen (call after loading the index)."""
        self.epoch = epoch
        body = json.dumps({
            "sid": self.sid, "kind": self.kind, "vpg": self.vpg, "pid": os.getpid(),
            "host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat(),
            "epoch": epoch,
        }).encode()
        os.pwrite(self.fd, body, 0)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def live_sessions_of(root: Path, sid: str) -> dict[str, int]:
    """live_sessions() restricted to one session id."""
    return live_sessions(root, only=sid)


def live_sessions(root: Path, only: str | None = None) -> dict[str, int]:
    """sid -> epoch of every live session (-1 while it has not recorded one yet).
    Lock files of dead sessions are removed on the way."""
    out: dict[str, int] = {}
    try:
        entries = list(os.scandir(root / "locks"))
    except FileNotFoundError:
        return out
    for e in entries:
        if only is not None and not e.name.startswith(only + "."):
            continue
        if e.name.endswith(".new"):
            # a session being created (locked, then renamed, within microseconds); one
            # left by a crash at that moment is removed once it is clearly old
            try:
                if time.time() - e.stat().st_mtime > 600:
                    _remove_if_unlocked(e.path)
            except FileNotFoundError:
                pass
            continue
        if not e.name.endswith(".lock"):
            continue
        sid = e.name.split(".", 1)[0]
        try:
            fd = os.open(e.path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                try:
                    out[sid] = int(json.loads(os.pread(fd, 4096, 0) or b"{}").get("epoch", -1))
                except ValueError:
                    out[sid] = -1
                continue
            try:  # nobody holds it: its process is gone
                os.unlink(e.path)
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return out


def live_writer_of(root: Path, vpg: str) -> bool:
    """Whether a live checkpoint writer of `vpg` has described its session (a session
    whose description is not written yet does not count: callers poll)."""
    try:
        entries = list(os.scandir(root / "locks"))
    except FileNotFoundError:
        return False
    for e in entries:
        if not e.name.endswith(".lock"):
            continue
        try:
            fd = os.open(e.path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                d = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                continue
            if not isinstance(d, dict) or d.get("kind") != "writer" or d.get("vpg") != vpg:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return True  # held: the writer lives
                raise
            fcntl.flock(fd, fcntl.LOCK_UN)  # a dead writer's file: live_sessions removes it
        finally:
            os.close(fd)
    return False


def open_session(root: Path, store: "BlockStore", kind: str, vpg: str | None = None) -> Session:
    """Register as a user of the journal, then load the index: garbage collection will
    not delete a blob this session might still deduplicate against or read."""
    s = Session(root, kind, vpg)
    try:
        store.refresh()  # condemned blobs first, then the index
        s.set_epoch(max(store.condemned, default=0))
    except BaseException:
        s.close()
        raise
    return s


def gc_lock(root: Path, timeout: float) -> FileLock | None:
    """gc.lock, exclusive: one garbage collection, recover() or index repair at a time."""
    lk = FileLock(root / "gc.lock", shared=False)
    return lk if lk.acquire(timeout) else None


def vpg_lock(vpg_dir: Path, vpg: str, timeout: float, what: str) -> FileLock:
    """The VPG's writer.lock, exclusive: one checkpoint writer, retention or removal."""
    ensure_dir(vpg_dir)
    lk = FileLock(vpg_dir / "writer.lock", shared=False)
    if not lk.acquire(timeout):
        raise JournalLocked(f"VPG {vpg}: journal is locked by another writer ({what} refused)")
    return lk
