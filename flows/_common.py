"""Helpers the flows share: who started a run, waiting on futures so none fails unseen."""

from __future__ import annotations

import os
from typing import Any, Iterable

from vmrep.errors import VmrepError


def flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a run there is no id
        return None


def started_by(default: str | None = None) -> str:
    return default or os.environ.get("VMREP_USER") or os.environ.get("USER") or "prefect"


def wait_all(futures: Iterable[Any]) -> list[Any]:
    """Wait for every future; then raise the first failure (after all have finished,
    so no step is left running or unobserved)."""
    futures = list(futures)
    for f in futures:
        f.wait()
    results, first_error = [], None
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            results.append(exc)
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return results


def problem_lines(problems: list[Any]) -> VmrepError:
    lines = [p.line() for p in problems]
    return VmrepError("; ".join(lines), lines=lines)
