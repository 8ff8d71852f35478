"""Write into a lab VM's disk as its guest would: through the launcher's guest I/O.

A guest write is `POST /guest/write?vm=NAME&disk=N&offset=BYTES` on the site's control
endpoint (answered once the bytes are fsynced); the launcher puts it where ESXi would
(the base extent, or the delta of the VM's latest snapshot) and change tracking sees it.
Only a running VM's guest writes (409 otherwise). Nothing here touches a disk's files.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import requests

from vmrep.config import Config
from vmrep.errors import NotFound, VmrepError

CONTENT_KINDS: tuple[str, ...] = ("random", "text", "zeros")


class GuestError(VmrepError):
    pass


@dataclass
class WriteStats:
    vm: str
    disk: str
    writes: int
    bytes: int
    seconds: float


@dataclass
class GuestDisk:
    index: int
    key: int
    label: str
    file: str
    capacity: int
    bus: int = 0
    unit: int = 0

    @property
    def id(self) -> str:
        """The disk's name as vmrep gives it (controller slot, 'scsi0:1')."""
        return f"scsi{self.bus}:{self.unit}"


class Guest:
    """One VM's guest, on the site whose launcher serves `control_url`."""

    def __init__(self, control_url: str, vm: str, http: requests.Session | None = None) -> None:
        self.url = control_url.rstrip("/")
        self.vm = vm
        self.http = http or requests.Session()

    def _check(self, r: requests.Response, what: str) -> requests.Response:
        if r.status_code != 200:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text.strip()
            raise GuestError(f"VM {self.vm}: {what}: {msg} (HTTP {r.status_code})")
        return r

    def disks(self) -> list[GuestDisk]:
        r = self.http.get(f"{self.url}/guest/disks", params={"vm": self.vm}, timeout=10)
        if r.status_code == 404:
            raise NotFound(f"VM {self.vm!r} not found at {self.url}")
        body = self._check(r, "listing disks").json()
        return [GuestDisk(d["index"], d["key"], d["label"], d["file"], d["capacity"], d["bus"], d["unit"])
                for d in body["disks"] or []]

    def write(self, disk: int, offset: int, data: bytes) -> int:
        r = self.http.post(f"{self.url}/guest/write", params={"vm": self.vm, "disk": disk, "offset": offset},
                           data=data, timeout=60)
        return int(self._check(r, f"write of {len(data)} bytes at {offset} of disk {disk}").json()["written"])

    def read(self, disk: int, offset: int, length: int) -> bytes:
        r = self.http.get(f"{self.url}/guest/read",
                          params={"vm": self.vm, "disk": disk, "offset": offset, "length": length}, timeout=60)
        return self._check(r, f"read of {length} bytes at {offset} of disk {disk}").content


def find_guest(config: Config, vm_name: str) -> Guest:
    """The VM's guest at the site that holds it (the VPG's protected site first)."""
    sites = [v.protected_site for v in config.vpgs if any(s.name == vm_name for s in v.vms)]
    sites += [s for s in config.sites if s not in sites]
    for site_name in sites:
        url = config.site(site_name).lab_control_url
        if not url:
            continue
        g = Guest(url, vm_name)
        try:
            g.disks()
        except NotFound:
            continue
        return g
    raise NotFound(f"VM {vm_name!r} not found at any lab site (sites need lab_control_url)")


# --------------------------------------------------------------------------------------
# What a guest writes

_WORDS = ("order", "invoice", "customer", "shipped", "payment", "received", "warehouse", "session", "login",
          "user", "cart", "item", "stock", "update", "commit", "rollback", "query", "index", "page", "cache",
          "miss", "hit", "retry", "timeout", "ok", "error", "warning", "backup", "report", "account")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


def text_pool(rng: random.Random, size: int = 4 * 1024 * 1024) -> bytes:
    """Log-like lines (timestamps, levels, words, numbers): compresses about 2-4x with zstd,
    as database and log pages do."""
    lines: list[str] = []
    n = 0
    t = 1_700_000_000.0
    while n < size:
        t += rng.random() * 0.2
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 8)))
        line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t))}.{int(t * 1000) % 1000:03d}Z "
                f"{rng.choice(_LEVELS)} [worker-{rng.randrange(32)}] {words} id={rng.randrange(10**9)} "
                f"amount={rng.randrange(10**6) / 100:.2f} crc={rng.getrandbits(32):08x}\n")
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:size]


class ContentSource:
    """Bytes for guest writes of one kind."""

    def __init__(self, kind: str, rng: random.Random) -> None:
        if kind not in CONTENT_KINDS:
            raise GuestError(f"--content: unknown kind {kind!r} (random, text, zeros)")
        self.kind, self.rng = kind, rng
        self._pool = text_pool(rng) if kind == "text" else b""

    def take(self, n: int) -> bytes:
        if self.kind == "zeros":
            return bytes(n)
        if self.kind == "random":
            return self.rng.randbytes(n)
        # A slice of the pool starting at a random line: realistic text, cheap to make.
        start = self._pool.find(b"\n", self.rng.randrange(len(self._pool) - n)) + 1
        out = self._pool[start:start + n]
        return out if len(out) == n else (out + self._pool)[:n]


def write(guest: Guest, disk: GuestDisk, *, rate: float, seconds: float, io_size: int = 64 * 1024,
          rng: random.Random | None = None, content: str = "text",
          on_write: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Write `rate` bytes/s for `seconds` at random aligned offsets; returns (writes, bytes)."""
    rng = rng or random.Random()
    source = ContentSource(content, rng)
    slots = max(1, disk.capacity // io_size)
    size = min(io_size, disk.capacity)
    start = time.monotonic()
    writes = written = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            break
        if written >= rate * elapsed:
            time.sleep(min(0.01, seconds - elapsed))
            continue
        off = rng.randrange(slots) * io_size
        n = guest.write(disk.index, off, source.take(size))
        writes += 1
        written += n
        if on_write:
            on_write(off, n)
    return writes, written


def guest_write(config: Config, vm_name: str, *, disk: int | None = None, rate: float = 4 * 1024 * 1024,
                seconds: float = 10.0, seed: int | None = None, content: str = "text") -> list[WriteStats]:
    if content not in CONTENT_KINDS:
        raise GuestError(f"--content: unknown kind {content!r} (random, text, zeros)")
    guest = find_guest(config, vm_name)
    disks = guest.disks()
    if disk is not None and not 0 <= disk < len(disks):
        raise GuestError(f"VM {vm_name}: no disk {disk} (it has {len(disks)})")
    chosen = [disks[disk]] if disk is not None else disks
    rng = random.Random(seed)
    out = []
    per_disk_rate = rate / len(chosen)
    # Disks are written one after another for simplicity; the rate is shared between them.
    for d in chosen:
        t0 = time.monotonic()
        writes, written = write(guest, d, rate=per_disk_rate, seconds=seconds / len(chosen), rng=rng,
                                content=content)
        out.append(WriteStats(vm_name, d.id, writes, written, time.monotonic() - t0))
    return out
