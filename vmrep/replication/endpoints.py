"""Where a transfer reads and writes: a protected VM's disk, a pre-seed copy at the
recovery site, and the journal a VPG's replication writes to (the journal directory, or
the recovery site's journal service when the VPG crosses sites).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from vmrep.config import VPG
from vmrep.errors import NotFound
from vmrep.runtime import Runtime
from vmrep.vsphere.datastore import DatastoreAccess
from vmrep.vsphere.inventory import DiskInfo

log = logging.getLogger(__name__)


class VMDiskSource:
    """A protected VM's disk, read through the datastore interface (local mount or /folder)."""

    def __init__(self, ds: DatastoreAccess, disk: DiskInfo) -> None:
        self.ds = ds
        self.disk = disk
        self.size = disk.capacity

    def read(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        return self.ds.read(self.disk.flat, offset, length)


class DatastoreFileSource:
    """A disk copy already on a datastore (a pre-seed at the recovery site)."""

    def __init__(self, ds: DatastoreAccess, path: str, size: int) -> None:
        self.ds, self.path, self.size = ds, path, size

    def read(self, offset: int, length: int) -> bytes:
        return self.ds.read(self.path, offset, min(length, self.size - offset))


def preseed_source(rt: Runtime, vpg: VPG, path: str, size: int) -> DatastoreFileSource | None:
    """The pre-seed copy at the recovery site, if it is there and of the disk's size."""
    ds = rt.datastores(vpg.recovery_site)
    try:
        if ds.size(path) != size:
            log.warning("VPG %s: pre-seed %s has another size than the disk; not used", vpg.name, path)
            return None
    except NotFound:
        return None
    return DatastoreFileSource(ds, path, size)


# The journal service clients of this process, per Runtime and recovery site.
_remotes: dict[tuple[int, str], Any] = {}


_remotes_lock = threading.Lock()


def journal_for(rt: Runtime, vpg: str) -> Any:
    """The journal a VPG's replication writes to: the recovery site's journal service
    when that site has one and the VPG crosses sites (the WAN is crossed only through
    it), else the journal directory (local replication, the demo)."""
    if not is_remote(rt, vpg):
        return rt.journal
    from vmrep.journal.remote import RemoteJournal

    site = rt.config.site(rt.config.vpg(vpg).recovery_site)
    assert site.journal_service is not None  # is_remote said so
    key = (id(rt), site.name)
    with _remotes_lock:
        j = _remotes.get(key)
        if j is None:
            j = _remotes[key] = RemoteJournal(site.journal_service, where=f"sites.{site.name}.journal_service")
        return j


def is_remote(rt: Runtime, vpg: str) -> bool:
    """Whether the VPG's journal is reached through its recovery site's journal service."""
    return rt.journal_service_of(vpg) is not None
