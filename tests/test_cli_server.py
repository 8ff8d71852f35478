"""The CLI's local Prefect server: a new user's first operation starts it (fresh, empty
VMREP_HOME and PREFECT_HOME, no PREFECT_API_URL), the next command reuses it, quick
commands never start one, `vmrep server status/stop` report and end it.

Real processes throughout: `vmrep` as a subprocess (as a user runs it), the two-site lab,
a real `prefect server start`. One server start in this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from deployments import server as srvmod

REPO = Path(__file__).resolve().parents[1]


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VMREP_"))}
    env.update(VMREP_HOME=str(home), PREFECT_HOME=str(home / "prefect-client"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    return env


def vmrep(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from vmrep.cli import entry; entry()", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def status(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    r = vmrep(env, "server", "status", "--json", timeout=60)
    return r.returncode, json.loads(r.stdout)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh VMREP_HOME; whatever server a test left running in it is stopped."""
    h = tmp_path_factory.mktemp("vmrep-home")
    try:
        yield h
    finally:
        srv = srvmod.current(h / "prefect")
        if srv is not None:
            srvmod.stop(srv)


def test_first_operation_starts_one_server_and_the_next_command_reuses_it(lab, home) -> None:  # type: ignore[no-untyped-def]
    env = cli_env(home)
    cfg = str(lab.config_path)
    assert not (home / "prefect").exists() and not (home / "prefect-client").exists()

    # a quick command calls the engine and starts nothing
    r = vmrep(env, "checkpoints", "erp", "-c", cfg)
    assert r.returncode == 0, r.stderr
    code, s = status(env)
    assert code == 1 and s["running"] is False and srvmod.current(home / "prefect") is None

    t0 = time.monotonic()
    r = vmrep(env, "sync", "erp", "-c", cfg)
    first = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "checkpoint cp-" in r.stdout
    err = r.stderr.strip().splitlines()
    assert err[0].startswith("starting a local Prefect server for ") and err[-1].startswith("Prefect UI: http://127.0.0.1:")
    code, s = status(env)
    assert code == 0 and s["healthy"] is True and s["home"] == str(home / "prefect")
    assert s["url"] in err[-1] and s["api_url"] == s["url"] + "/api"
    pid = s["pid"]
    # the flow ran against it: the run is in the server's history
    runs = _flow_runs(s["api_url"])
    assert "initial-sync" in runs

    t0 = time.monotonic()
    r = vmrep(env, "replicate", "erp", "--cycles", "1", "-c", cfg)
    second = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == ""  # nothing started, nothing to say
    code, s = status(env)
    assert code == 0 and s["pid"] == pid  # the same server
    assert "replicate" in _flow_runs(s["api_url"])
    print(f"first operation (server start included) {first:.1f}s, next {second:.1f}s")

    # `server status` in words, then `server stop` ends it for good
    r = vmrep(env, "server", "status")
    assert r.returncode == 0 and f"pid {pid}" in r.stdout and "healthy" in r.stdout
    r = vmrep(env, "server", "stop")
    assert r.returncode == 0 and f"pid {pid}" in r.stdout
    assert not _alive(pid)
    code, s = status(env)
    assert code == 1 and s["running"] is False and s["pid"] is None
    r = vmrep(env, "server", "stop")
    assert r.returncode == 0 and "no local Prefect server" in r.stdout


def test_a_configured_prefect_api_wins(home) -> None:  # type: ignore[no-untyped-def]
    env = {**cli_env(home), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    r = vmrep(env, "server", "status")
    assert r.returncode == 1
    assert "PREFECT_API_URL is set: operations use http://127.0.0.1:9/api" in r.stdout


def _flow_runs(api_url: str) -> set[str]:
    import requests

    flows = requests.post(f"{api_url}/flows/filter", json={}, timeout=10).json()
    names = {f["id"]: f["name"] for f in flows}
    runs = requests.post(f"{api_url}/flow_runs/filter", json={}, timeout=10).json()
    return {names.get(r["flow_id"], "?") for r in runs}


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
