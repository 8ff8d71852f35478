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
        with self._lock:
            if self._journal is None:
                from vmrep.journal import Journal

                j = self.config.journal
                self._journal = Journal.open(self.config.journal_path, block_size=j.block_size,
                                             compression_level=j.compression_level)
            return self._journal

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
