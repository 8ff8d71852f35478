"""What every vmrep task shares: retry only transient faults, no result caching
(a step's inputs are live vSphere objects, and a retried step must run again), and the
runner that lets an engine sequence submit its steps as task runs."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

from prefect.cache_policies import NO_CACHE

from vmrep.runner import retryable


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a step only when its failure may pass."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we classify, Prefect re-raises
        return retryable(exc)
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


def vcenter_limit_name(site: str) -> str:
    """The Prefect global concurrency limit of a site's vCenter (created by whatever
    starts a server: deployments/pools.py)."""
    return f"vcenter-{site}"


@contextmanager
def vcenter_slot(site: str) -> Iterator[None]:
    """Hold one slot of the site's vCenter limit for a vCenter-heavy step (snapshot create
    and remove), so many VPGs never overload one vCenter. Strict: a limit that does not
    exist is an error, not a free pass (it would silently let every VPG through). Waits
    as long as it takes: a slot is held for seconds, and a step that waits is still due.

    The held interval is logged (`vcenter slot <name> held <t0> <t1>`, monotonic-free
    epoch seconds): tests read it back from the API to measure overlap."""
    from prefect.concurrency.sync import concurrency

    name = vcenter_limit_name(site)
    with concurrency(name, occupy=1, strict=True):
        t0 = time.time()
        try:
            yield
        finally:
            _run_log().info("vcenter slot %s held %.6f %.6f", name, t0, time.time())


def _run_log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:  # called outside a task run
        return logging.getLogger("vmrep.tasks")


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


class PrefectStepRunner:
    """Run an engine sequence's steps as task runs of the current flow: the same
    interface as `vmrep.runner.DirectRunner`, over a table of step name -> task."""

    def __init__(self, tasks: Mapping[str, Any]) -> None:
        self.tasks = tasks

    def one(self, step: str, *args: Any) -> Any:
        return self.tasks[step](*args)

    def each(self, step: str, calls: list[tuple[Any, ...]], *, settle: bool = False) -> list[Any]:
        if not calls:
            return []
        futures = [self.tasks[step].submit(*a) for a in calls]
        if not settle:
            return wait_all(futures)
        out: list[Any] = []
        for f in futures:
            f.wait()
            try:
                out.append(f.result())
            except BaseException as exc:  # noqa: BLE001 - a finding, returned in place
                out.append(exc)
        return out
