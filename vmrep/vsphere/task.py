"""Waiting for vSphere tasks through PropertyCollector paths.

`task.info` read as a whole fails in pyvmomi for some simulator tasks, so only the
paths needed are read: state, error, result. A task that ends in error raises the
task's fault, which `Client.call` classifies like any other.
"""

from __future__ import annotations

import time
from typing import Any

from vmrep.errors import TransientError
from vmrep.vsphere.connection import Client
from vmrep.vsphere.faults import as_user_error, is_transient
from vmrep.vsphere.property import retrieve_one


def wait_for_task(client: Client, task: Any, what: str, *, timeout: float = 600.0) -> Any:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        obj = retrieve_one(client, task, ["info.state", "info.error", "info.result"])
        state = obj.get("info.state")
        if state == "success":
            return obj.get("info.result")
        if state == "error":
            fault = obj.get("info.error")
            if fault is not None and is_transient(fault):
                raise TransientError(f"site {client.site.name}: {what}: task failed: {type(fault).__name__}")
            if fault is None:
                raise as_user_error(RuntimeError("task failed without a fault"), f"site {client.site.name}: {what}")
            raise as_user_error(fault, f"site {client.site.name}: {what}")
        if time.monotonic() > deadline:
            raise TransientError(f"site {client.site.name}: {what}: task still {state} after {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def run_task(client: Client, what: str, method: Any, *args: Any, timeout: float = 600.0, **kwargs: Any) -> Any:
    """Start a task (one retried call) and wait for it."""
    task = client.call(what, method, *args, **kwargs)
    return wait_for_task(client, task, what, timeout=timeout)
