"""Running the steps of an engine sequence without Prefect.

The engine writes each sequence (a replication cycle, an initial sync, a DR test, a
failover…) once, as calls to a *runner*: ``runner.one(step, *args)`` runs one step,
``runner.each(step, calls)`` runs it once per argument tuple, all at once. A step is a
plain function of plain values, looked up by name in a table (`vmrep.replication.steps`,
`vmrep.recovery.steps`), and one retry unit. `DirectRunner` calls the steps in this
process; the flows pass a runner that submits each step as a Prefect task
(`tasks/common.PrefectStepRunner`). Both retry a step only when its failure may pass.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_chain, wait_fixed

from vmrep.vsphere.faults import is_transient

log = logging.getLogger(__name__)


def retryable(exc: BaseException) -> bool:
    """A step's failure that may pass: a transient fault, or one wrapping it. Never a
    cancellation (a BaseException that is not an Exception)."""
    if not isinstance(exc, Exception):
        return False
    return is_transient(exc) or (exc.__cause__ is not None and is_transient(exc.__cause__))


class DirectRunner:
    """Run steps in this process: the calls of one step in parallel threads, transient
    failures retried as the Prefect tasks retry them."""

    def __init__(self, steps: Mapping[str, Callable[..., Any]], *, retries: int = 3,
                 delays: Sequence[float] = (0.5, 1.0, 2.0), max_workers: int = 8) -> None:
        self.steps = steps
        self.retries, self.delays, self.max_workers = retries, list(delays), max_workers

    def _call(self, step: str, args: tuple[Any, ...]) -> Any:
        fn = self.steps[step]

        def warn(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("step %s failed transiently (%s); retrying", step, exc)

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_chain(*(wait_fixed(d) for d in self.delays or [0.0])),
            retry=retry_if_exception(retryable),
            before_sleep=warn,
            reraise=True,
        )
        return retrying(fn, *args)

    def one(self, step: str, *args: Any) -> Any:
        return self._call(step, args)

    def each(self, step: str, calls: list[tuple[Any, ...]], *, settle: bool = False) -> list[Any]:
        """Run `step` once per argument tuple, all at once; wait for all. With `settle`,
        failures come back in place of results; else the first failure is raised (after
        every call has ended, so none is left running unobserved)."""
        if not calls:
            return []
        results: list[Any] = []
        with ThreadPoolExecutor(min(self.max_workers, len(calls))) as ex:
            futs = [ex.submit(self._call, step, a) for a in calls]
            for f in futs:
                try:
                    results.append(f.result())
                except BaseException as exc:  # noqa: BLE001 - returned or re-raised below
                    results.append(exc)
        if not settle:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results
