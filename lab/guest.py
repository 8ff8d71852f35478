"""Write into a lab VM's disk as its guest would: random offsets, random bytes, a given rate.

The lab's datastores are local folders, so a guest write is a write into the VM's flat
extent on the local file system, which the simulator then serves through `/folder`.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmrep.config import Config
from vmrep.errors import NotFound
from vmrep.vsphere.connection import connect
from vmrep.vsphere.datastore import LocalDatastore
from vmrep.vsphere.inventory import DiskInfo, Inventory


@dataclass
class WriteStats:
    vm: str
    disk: str
    writes: int
    bytes: int
    seconds: float


def locate_disks(config: Config, vm_name: str) -> list[tuple[DiskInfo, Path]]:
    """The VM's disks and their flat files on this host, looked up at the site that holds it."""
    sites = [v.protected_site for v in config.vpgs if any(s.name == vm_name for s in v.vms)]
    sites += [s for s in config.sites if s not in sites]
    for site_name in sites:
        site = config.site(site_name)
        with connect(site) as client:
            found = Inventory(client).vms_by_name().get(vm_name)
        if found is not None:
            local = LocalDatastore(site.datastore_mounts)
            return [(d, local.local(d.flat)) for d in found.disks]
    raise NotFound(f"VM {vm_name!r} not found at any site")


def write(path: Path, size: int, *, rate: float, seconds: float, io_size: int = 64 * 1024,
          rng: random.Random | None = None, on_write: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Write `rate` bytes/s for `seconds` at random aligned offsets; returns (writes, bytes)."""
    rng = rng or random.Random()
    slots = max(1, size // io_size)
    start = time.monotonic()
    writes = written = 0
    fd = os.open(path, os.O_WRONLY)
    try:
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                break
            due = rate * elapsed
            if written >= due:
                time.sleep(min(0.01, seconds - elapsed))
                continue
            off = rng.randrange(slots) * io_size
            n = os.pwrite(fd, rng.randbytes(io_size), off)
            writes += 1
            written += n
            if on_write:
                on_write(off, n)
    finally:
        os.close(fd)
    return writes, written


def guest_write(config: Config, vm_name: str, *, disk: int | None = None, rate: float = 4 * 1024 * 1024,
                seconds: float = 10.0, seed: int | None = None) -> list[WriteStats]:
    disks = locate_disks(config, vm_name)
    chosen = [disks[disk]] if disk is not None else disks
    rng = random.Random(seed)
    out = []
    per_disk_rate = rate / len(chosen)
    # Disks are written one after another for simplicity; the rate is shared between them.
    for info, path in chosen:
        t0 = time.monotonic()
        writes, written = write(path, info.capacity, rate=per_disk_rate, seconds=seconds / len(chosen), rng=rng)
        out.append(WriteStats(vm_name, info.id, writes, written, time.monotonic() - t0))
    return out
