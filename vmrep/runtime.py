"""What every operation needs, opened once per process: config, journal, state store,
and one logged-in client per site.

Prefect tasks receive only plain parameters (config path, VPG name), so they look the
runtime up here by config path; within one process all tasks share it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrep.config import Config, load_config
from vmrep.vsphere.connection import Client, connect
from vmrep.vsphere.datastore import DatastoreAccess
from vmrep.vsphere.inventory import Inventory


@dataclass
class Runtime:
    config: Config
    _clients: dict[str, Client] = field(default_factory=dict)
    _ds: dict[str, DatastoreAccess] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _journal: Any = None
    _store: Any = None
    # Recovery operations' contexts by operation id (vmrep.recovery.context): kept here,
    # not in module globals, so they live and die with this runtime.
    operations: dict[str, Any] = field(default_factory=dict)

    # -- journal and state ------------------------------------------------------------

    @property
    def journal(self) -> Any:
        """The journal directory of this config. Where this config writes some VPGs'
        journals through a journal service (a protected site's config: docs/journal-service.md),
        the directory here is not theirs: it is guarded (`GuardedJournal`), the one place
        that decides it for every command that reads `rt.journal`."""
        with self._lock:
            if self._journal is None:
                from vmrep.journal import Journal

                j = self.config.journal
                local = Journal.open(self.config.journal_path, block_size=j.block_size,
                                     compression_level=j.compression_level)
                remote = any(self.journal_service_of(v.name) is not None for v in self.config.vpgs)
                self._journal = GuardedJournal(local, self) if remote else local
            return self._journal

    def ensure_local_journal(self, vpgs: list[str]) -> None:
        """Refuse (one line, `Refused`) when one of `vpgs` has its journal behind a journal
        service from this config: for commands that run only where the journal is (the
        recovery site) and would otherwise find out only mid-way (in a flow)."""
        for name in vpgs:
            if self.journal_service_of(name) is not None:
                from vmrep.errors import Refused

                raise Refused(GuardedJournal(None, self).refusal(name))

    def journal_service_of(self, vpg: str) -> Any:
        """The journal service a VPG's journal is reached through from this config (its
        recovery site's `journal_service`, when the VPG crosses sites), or None: the
        journal directory."""
        v = self.config.vpg(vpg)
        if v.protected_site == v.recovery_site:
            return None
        return self.config.site(v.recovery_site).journal_service

    @property
    def store(self) -> Any:
        with self._lock:
            if self._store is None:
                from vmrep.state import StateStore

                if self.config.home and "VMREP_HOME" not in os.environ:
                    os.environ["VMREP_HOME"] = str(self.config.resolve(self.config.home))
                # The file's database_url wins: a config names the state that belongs to it.
                self._store = StateStore.open(self.config.database_url or os.environ.get("VMREP_DB_URL"))
            return self._store

    # -- sites ------------------------------------------------------------------------

    def client(self, site: str) -> Client:
        with self._lock:
            c = self._clients.get(site)
            if c is None:
                c = connect(self.config.site(site))
                self._clients[site] = c
            return c

    def inventory(self, site: str) -> Inventory:
        """A fresh inventory read (one round trip per object type)."""
        return Inventory(self.client(site))

    def datastores(self, site: str, datacenter: str | None = None) -> DatastoreAccess:
        with self._lock:
            ds = self._ds.get(site)
            if ds is None:
                dc = datacenter or self.config.site(site).datacenter or self.inventory(site).datacenter_name()
                ds = DatastoreAccess(self.client(site), dc)
                self._ds[site] = ds
            return ds

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
            self._ds.clear()
            self.operations.clear()


class GuardedJournal:
    """`rt.journal` for a config that reaches some VPGs' journals through a journal service.

    A call naming such a VPG (its first argument, or `vpg=`) is refused with one line
    (`Refused`) before it starts: the journal directory here is not that VPG's journal,
    and what a command reads from it (checkpoints, blocks, usage) would be wrong or
    empty, or fail later with a 403 through the service. Refused, not answered through
    the service: a writer credential may read checkpoints and block maps, but every
    command that reads them here goes on to read blocks, verify, recover or judge,
    which only the recovery site may; the protected site's own work (sync, replicate,
    a new tagged checkpoint) reaches the service through `engine.journal_for`, never
    `rt.journal`. Calls for the other VPGs, and those naming none (gc, recover), go to
    the directory as before."""

    def __init__(self, local: Any, rt: Runtime) -> None:
        self._local, self._rt = local, rt

    def refusal(self, vpg: str) -> str:
        svc = self._rt.journal_service_of(vpg)
        return (f"VPG {vpg}'s journal is remote (journal service at {svc.url}): "
                "run this at the recovery site")

    def _remote(self, vpg: str) -> bool:
        names = {v.name for v in self._rt.config.vpgs}
        return vpg in names and self._rt.journal_service_of(vpg) is not None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._local, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            vpg = args[0] if args else kwargs.get("vpg")
            if isinstance(vpg, str) and self._remote(vpg):
                from vmrep.errors import Refused

                raise Refused(self.refusal(vpg))
            return attr(*args, **kwargs)

        return call


_runtimes: dict[str, Runtime] = {}
_runtimes_lock = threading.Lock()


def get_runtime(config_path: str | Path | None = None) -> Runtime:
    key = str(Path(config_path or os.environ.get("VMREP_CONFIG", "vmrep.yaml")).resolve())
    with _runtimes_lock:
        rt = _runtimes.get(key)
        if rt is None:
            rt = Runtime(load_config(key))
            _runtimes[key] = rt
        return rt


def forget_runtime(config_path: str | Path | None = None) -> None:
    key = str(Path(config_path or os.environ.get("VMREP_CONFIG", "vmrep.yaml")).resolve())
    with _runtimes_lock:
        rt = _runtimes.pop(key, None)
    if rt is not None:
        rt.close()
