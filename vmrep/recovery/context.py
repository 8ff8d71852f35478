"""What the steps of one recovery operation share within a process: its plan and the
site catalogs it was checked against.

Steps receive plain values (a Prefect task's parameters), so each looks its operation's
context up by id from the process's Runtime, which owns the contexts (no module-global
caches: two runtimes, as tests open, never share a plan; dropping a runtime drops them).
The plan is read once from the operation's recorded 'plan' step, so a step run in a new
process (a retry on another worker) finds the same plan; a catalog is read once per
site per operation (one read per object type).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from vmrep.errors import VmrepError
from vmrep.recovery import vms as vmops
from vmrep.recovery.plan import Plan


@dataclass
class OperationContext:
    operation_id: str
    _plan: Plan | None = None
    _catalogs: dict[str, vmops.Catalog] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, store: Any) -> Plan:
        """The plan recorded by the operation's 'plan' step."""
        with self._lock:
            if self._plan is not None:
                return self._plan
        for s in reversed(store.steps(self.operation_id)):
            if s.step == "plan" and s.result == "ok" and s.detail and "plan" in s.detail:
                p = Plan.from_json(s.detail["plan"])
                with self._lock:
                    self._plan = p
                return p
        raise VmrepError(f"operation {self.operation_id[:8]}: no recovery plan recorded")

    def set_plan(self, plan: Plan) -> None:
        with self._lock:
            self._plan = plan

    def catalog(self, rt: Any, site: str) -> vmops.Catalog:
        with self._lock:
            c = self._catalogs.get(site)
        if c is None:
            c = vmops.Catalog.read(rt.client(site))  # outside the lock: one read per type
            with self._lock:
                c = self._catalogs.setdefault(site, c)
        return c


def operation_context(rt: Any, operation_id: str) -> OperationContext:
    with rt._lock:  # noqa: SLF001 - the runtime's own lock guards what it owns
        ctx = rt.operations.get(operation_id)
        if ctx is None:
            ctx = rt.operations[operation_id] = OperationContext(operation_id)
        return ctx  # type: ignore[no-any-return]  # Runtime types it Any: the engine base knows no recovery


def end_operation(rt: Any, operation_id: str) -> None:
    """Drop an operation's context once it ended (its plan is kept in the state database)."""
    with rt._lock:  # noqa: SLF001 - as above
        rt.operations.pop(operation_id, None)
