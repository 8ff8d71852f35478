"""Where runs execute: one Prefect work pool per site, its process workers, and one global
concurrency limit per vCenter.

- `pool_name(site)` = `vmrep-<site>` (a promise): replication and initial sync of a VPG run
  on its protected site's pool; tests, failovers, moves, commits, rollbacks, retention,
  the monitor and the reports on its recovery site's pool (deployments/serve.py).
- `ensure(api_url, config)`: the pools (type `process`) and the limits `vcenter-<site>`
  (strict, `sites.<site>.vcenter_slots` slots), created or brought to the configured slot
  count. Called by whatever starts a server: `make server` (deployments.serve), the CLI's
  local server (vmrep/cli/server.py), the test fixtures. Idempotent.
- `start_worker(pool, ...)`: `prefect worker start --pool vmrep-<site> --type process` as a
  process group of its own, stopped by `stop_workers` by the id it was started with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from tasks.common import vcenter_limit_name

POOL_PREFIX = "vmrep-"
WORKER_TYPE = "process"


def pool_name(site: str) -> str:
    return f"{POOL_PREFIX}{site}"


def site_slots(config: Any) -> dict[str, int]:
    """Site name -> slots of its vCenter limit, from a loaded config."""
    return {name: int(site.vcenter_slots) for name, site in config.sites.items()}


def ensure_pools(client: Any, sites: Iterable[str]) -> list[str]:
    """Create the process work pool of each site if missing; returns the pool names."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    names = []
    for site in sites:
        name = pool_name(site)
        names.append(name)
        try:
            client.read_work_pool(name)
            continue
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=WORKER_TYPE,
                description=f"vmrep: runs of VPGs at site {site} (process workers near its vCenter)",
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # another starter was quicker
            pass
    return names


def ensure_limits(client: Any, slots: Mapping[str, int]) -> list[str]:
    """Create (or set the slot count of) the global concurrency limit of each vCenter."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    names = []
    for site, n in slots.items():
        name = vcenter_limit_name(site)
        names.append(name)
        try:
            current = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=n, active=True))
                continue
            except ObjectAlreadyExists:
                current = client.read_global_concurrency_limit_by_name(name)
        if current.limit != n or not current.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=n, active=True))
    return names


def ensure(api_url: str | None, config: Any, *, pools: bool = True) -> dict[str, list[str]]:
    """Pools and vCenter limits of a loaded config on the server at `api_url` (None: the
    API this process's Prefect settings name, or its ephemeral server)."""
    from contextlib import nullcontext

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    where = temporary_settings(updates={PREFECT_API_URL: api_url}) if api_url else nullcontext()
    with where, get_client(sync_client=True) as client:
        out = {"limits": ensure_limits(client, site_slots(config))}
        out["pools"] = ensure_pools(client, config.sites) if pools else []
    return out


def ensure_for_path(api_url: str | None, config_path: str | Path, *, pools: bool = True) -> dict[str, list[str]]:
    from vmrep.config import load_config

    return ensure(api_url, load_config(str(Path(config_path).resolve())), pools=pools)


# --------------------------------------------------------------------------------------
# Workers


@dataclass
class Worker:
    pool: str
    pid: int
    log_path: Path
    proc: subprocess.Popen[bytes]


def worker_command(pool: str, name: str | None = None) -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]
    cmd += ["worker", "start", "--pool", pool, "--type", WORKER_TYPE]
    if name:
        cmd += ["--name", name]
    return cmd


def start_worker(pool: str, *, api_url: str, log_dir: Path, cwd: Path, env: Mapping[str, str] | None = None,
                 name: str | None = None) -> Worker:
    """One process worker of `pool`, its own process group (so stop_workers ends the flow
    runs it started too), output in `<log_dir>/worker-<pool>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{pool}.log"
    penv = dict(os.environ if env is None else env)
    penv.update({"PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(worker_command(pool, name), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=penv, cwd=cwd, start_new_session=True)
    return Worker(pool, proc.pid, log_path, proc)


def stop_workers(workers: Iterable[Worker], grace: float = 10.0) -> None:
    """SIGTERM every worker's group at once (a worker cancels and ends its runs; so do the
    runs, which are in its group), wait up to `grace` seconds for all of them together,
    then SIGKILL each group. A Prefect process worker stops on SIGTERM by sending itself
    SIGINT, which does nothing when it inherited SIGINT ignored (a parent started from a
    shell's background; deployments/serve.py now restores it for its workers); the SIGKILL
    is what bounds the stop whatever the worker does. One by one with 20 s each, a caller
    that gave up first (a test's teardown) left the workers running, orphaned."""
    workers = list(workers)
    for w in workers:
        try:
            os.killpg(w.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(w.proc.poll() is None for w in workers):
        time.sleep(0.1)
    for w in workers:
        try:  # what the worker started in its group goes with it, whether it exited or not
            os.killpg(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            w.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass


def stop_worker(w: Worker, grace: float = 10.0) -> None:
    stop_workers([w], grace)


def workers_ready(api_url: str, pools: Iterable[str]) -> bool:
    """Every pool has a worker that sent a heartbeat (the pool's status READY)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for p in pools:
            status = client.read_work_pool(p).status
            if status is None or str(getattr(status, "value", status)).upper() != "READY":
                return False
    return True
