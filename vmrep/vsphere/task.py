"""Waiting for vSphere tasks through `WaitForUpdatesEx`, as govmomi's `task` package does.

A wait makes its own PropertyCollector (the session's default one is shared by every
thread using the client, and a filter's update versions are per collector), puts one
filter on the task's `info.state`, `info.error` and `info.result`, and asks for updates
with a bounded `maxWaitSeconds`: the server answers when the task changes, so a wait
costs a few round trips whatever the task's length, and none between changes (polling
cost one per poll and saw the end up to a poll late).

Only those three paths are watched: `task.info` as a whole fails in pyvmomi for some
simulator tasks. A task that ends in error raises the task's fault, classified like
any other.
"""

from __future__ import annotations

import time
from typing import Any

from pyVmomi import vim, vmodl

from vmrep.errors import NotFound, TransientError
from vmrep.vsphere.connection import Client
from vmrep.vsphere.faults import as_user_error, is_transient

TASK_PATHS = ["info.state", "info.error", "info.result"]

# Longest a single WaitForUpdatesEx may block. Bounded well below the socket timeout
# (Site.timeout_seconds), so a silent server is told from a long task.
MAX_WAIT_S = 30

# A collector dies with its session: after a re-login mid-wait the wait starts again
# with a new one, this many times at most.
RESTARTS = 3


def _max_wait(client: Client, left: float) -> int:
    bound = min(float(MAX_WAIT_S), client.site.timeout_seconds / 2, left)
    return max(1, int(bound))


def _apply(props: dict[str, Any], update: Any) -> None:
    for fs in update.filterSet or []:
        for ou in fs.objectSet or []:
            for change in ou.changeSet or []:
                if change.op in ("remove", "indirectRemove"):
                    props.pop(change.name, None)
                else:
                    props[change.name] = change.val


def _wait_once(client: Client, task: Any, what: str, deadline: float, timeout: float) -> dict[str, Any]:
    """The task's watched properties once it is done (success or error)."""
    PC = vmodl.query.PropertyCollector
    root = client.content.propertyCollector
    pc = client.call(what, root.CreatePropertyCollector, method_name="CreatePropertyCollector")
    try:
        spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=task, skip=False)],
                             propSet=[PC.PropertySpec(type=vim.Task, pathSet=TASK_PATHS, all=False)])
        client.call(what, pc.CreateFilter, spec, True, method_name="CreateFilter")
        props: dict[str, Any] = {}
        version = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransientError(f"site {client.site.name}: {what}: task still "
                                     f"{props.get('info.state', 'unknown')} after {timeout:.0f}s")
            options = PC.WaitOptions(maxWaitSeconds=_max_wait(client, left))
            update = client.call(what, pc.WaitForUpdatesEx, version, options, method_name="WaitForUpdatesEx")
            if update is None:
                continue  # nothing changed within maxWaitSeconds
            version = update.version
            _apply(props, update)
            if props.get("info.state") in ("success", "error"):
                return props
    finally:
        try:
            client.call(what, pc.DestroyPropertyCollector, method_name="DestroyPropertyCollector", attempts=1)
        except Exception:  # noqa: BLE001 - a leaked collector dies with the session; the task's end counts
            pass


def wait_for_task(client: Client, task: Any, what: str, *, timeout: float = 600.0) -> Any:
    """The task's result once it succeeded; its fault, as one line naming `what`, if it failed."""
    deadline = time.monotonic() + timeout
    relogins = client.stats.relogins
    for attempt in range(RESTARTS + 1):
        try:
            props = _wait_once(client, task, what, deadline, timeout)
            break
        except NotFound:
            # The collector is gone (the session was re-established during the wait),
            # or the task is: only the first is worth a new collector.
            if attempt == RESTARTS or client.stats.relogins == relogins:
                raise
            relogins = client.stats.relogins
    else:  # pragma: no cover - the loop breaks or raises
        raise AssertionError("unreachable")
    if props.get("info.state") == "success":
        return props.get("info.result")
    fault = props.get("info.error")
    if fault is not None and is_transient(fault):
        raise TransientError(f"site {client.site.name}: {what}: task failed: {type(fault).__name__}")
    if fault is None:
        raise as_user_error(RuntimeError("task failed without a fault"), f"site {client.site.name}: {what}")
    raise as_user_error(fault, f"site {client.site.name}: {what}")


def run_task(client: Client, what: str, method: Any, *args: Any, timeout: float = 600.0, **kwargs: Any) -> Any:
    """Start a task (one retried call) and wait for it."""
    task = client.call(what, method, *args, **kwargs)
    return wait_for_task(client, task, what, timeout=timeout)
