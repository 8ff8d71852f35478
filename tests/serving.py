"""A Prefect server and `python -m deployments.serve` for a test, and waiting on conditions.

Every test that serves the deployments (the report e-mail end to end, the UI in a
browser, schedules, work pools) starts them the same way: a real server on a free
loopback port, `serve` in a process group of its own, both stopped on exit, also after
a failure. `serve` must end by itself on SIGINT, its workers with it, even when the
suite runs with SIGINT ignored (a shell's background job, as CI may start it): if it had
to be killed, or a worker it started outlived it, the test that served it fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]


def wait_for(what: str, fn: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Poll `fn` until it returns something true; its value. A condition, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@contextmanager
def served(config: Path, work: Path, *, args: Sequence[str] = ("--no-schedules", "--no-automations"),
           env: dict[str, str] | None = None, database_url: str | None = None,
           stop_seconds: float = 30) -> Iterator[dict[str, Any]]:
    """Server and `serve` for `config`, their files under `work`. Yields the server, the
    process, the log path and the reports folder. `serve` is stopped with SIGINT (it
    ends its runs' processes and its workers), killed after `stop_seconds`."""
    from deployments import server as srvmod

    reports = work / "reports"
    srv = proc = None
    log = open(work / "serve.log", "wb")
    try:
        srv = srvmod.start(work / "prefect", port=srvmod.free_port(), database_url=database_url)
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        run_env.update(srv.env())
        run_env.update(PREFECT_HOME=str(work / "prefect-client"), PREFECT_RUNNER_POLL_FREQUENCY="1",
                       PREFECT_LOGGING_LEVEL="INFO", VMREP_REPORTS_DIR=str(reports), **(env or {}))
        proc = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--config", str(config), *args],
                                cwd=REPO, env=run_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        yield {"srv": srv, "proc": proc, "log": work / "serve.log", "reports": reports}
    finally:
        problems = []
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=stop_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
                problems.append(f"serve did not end within {stop_seconds:.0f}s of SIGINT")
        log.close()
        for pid in worker_pids(work / "serve.log"):
            try:
                os.killpg(pid, signal.SIGKILL)
                problems.append(f"its worker (pid {pid}) outlived it")
            except ProcessLookupError:
                pass
        if srv is not None:
            srvmod.stop(srv)
        if problems and sys.exc_info()[0] is None:
            raise AssertionError("; ".join(problems))


def worker_pids(serve_log: Path) -> list[int]:
    """The process groups of the workers `serve` started, as its log names them."""
    text = serve_log.read_text(errors="replace") if serve_log.exists() else ""
    return [int(m) for m in re.findall(r"worker of \S+: pid (\d+)", text)]


def forget_prefect_workers() -> None:
    """Stop Prefect's process-wide events and log workers after in-process runs against
    another server. They keep the API URL they were started with (one instance per
    client type, whatever the URL), so the session's later flows would send their events
    and task-run states to a server that is gone; the next use starts fresh ones."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=15)
    APILogWorker.drain_all(timeout=15)
