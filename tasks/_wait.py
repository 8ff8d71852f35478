"""Waiting on Prefect futures so that none fails unseen. Tasks (PrefectRunner) and flows
both wait this way; it lives with the tasks because tasks do not import flows."""

from __future__ import annotations

from typing import Any, Iterable


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
