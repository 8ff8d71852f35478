"""Helpers the flows share: the flow run's id, waiting on futures so none fails unseen
(who started a run is `vmrep.stamps.started_by`, as everywhere)."""

from __future__ import annotations

from typing import Any

from tasks.common import wait_all  # re-exported: the flows wait as the tasks do
from vmrep.errors import VmrepError

__all__ = ["flow_run_id", "problem_lines", "wait_all"]


def flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a run there is no id
        return None


def problem_lines(problems: list[Any]) -> VmrepError:
    lines = [p.line() for p in problems]
    return VmrepError("; ".join(lines), lines=lines)
