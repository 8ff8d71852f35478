"""What every vmrep task shares: retry only transient faults, no result caching
(a step's inputs are live vSphere objects, and a retried step must run again)."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from vmrep.vsphere.faults import is_transient


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a step only when its failure may pass."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we classify, Prefect re-raises
        return is_transient(exc) or is_transient(exc.__cause__ or exc)
    return False


def step_options(*, retries: int = 3, timeout: float | None = None, **extra: Any) -> dict[str, Any]:
    """Options of a vmrep task. No Prefect timeout by default: tasks run in worker
    threads, which Prefect cannot interrupt (it only warns, on every run); every
    external call inside bounds its own wait instead (the site's timeout_seconds on each
    SOAP and HTTP request, task waits with a deadline)."""
    opts: dict[str, Any] = dict(
        retries=retries,
        retry_delay_seconds=[1, 3, 10][:max(retries, 1)],
        retry_jitter_factor=0.3,
        retry_condition_fn=transient_only,
        cache_policy=NO_CACHE,
        timeout_seconds=timeout,
        log_prints=False,
    )
    opts.update(extra)
    return opts
