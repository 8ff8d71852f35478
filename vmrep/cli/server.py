"""The local Prefect server the CLI's operations run against, and how a flow is run.

    vmrep server status [--json]      URL, pid, healthy or not
    vmrep server start                start it now (operations start it on first use anyway)
    vmrep server stop

An operation (sync, replicate, test, failover, ...) runs its flow in this process. Without
PREFECT_API_URL, Prefect would start an ephemeral server inside every such command (11-20 s,
and on a fresh PREFECT_HOME more than its own 20 s start-up limit). Instead, the first
operation starts one Prefect server in the background (SQLite under $VMREP_HOME/prefect,
the same one `make server` uses: deployments/server.py) and says where its UI is; later
commands find it running and use it. It runs until `vmrep server stop`.

PREFECT_API_URL set (in the environment or Prefect's profile) wins: nothing is started.
VMREP_LOCAL_SERVER=off keeps Prefect's ephemeral mode (one server per command).

Before a flow runs, the config's sites get their work pools and their vCenter limits
(`vcenter-<site>`, deployments/pools.py) on whichever server it runs against: the tasks
hold those limits strictly, and whatever starts a server creates them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import typer

from vmrep.cli.common import JsonOpt, app, console, console_err, print_json

T = TypeVar("T")

server_app = typer.Typer(help="The local Prefect server that operations run against.", no_args_is_help=True)
app.add_typer(server_app, name="server")


def _srvmod() -> Any:
    from deployments import server as srvmod

    return srvmod


def configured_api_url() -> str | None:
    """A Prefect API the user chose: PREFECT_API_URL in the environment, or in Prefect's
    settings (its profile, or a test harness's temporary settings)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    import sys

    if "prefect" not in sys.modules:  # Prefect's profile is read only if Prefect is loaded anyway
        return None
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def local_server_wanted() -> bool:
    return os.environ.get("VMREP_LOCAL_SERVER", "on").strip().lower() not in ("off", "0", "no", "false", "ephemeral")


def ensure_server() -> Any:
    """The running local server of this VMREP_HOME, started (and waited for) if need be."""
    srvmod = _srvmod()
    srv = srvmod.current()
    if srv is not None and srvmod.healthy(srv.api_url):
        return srv
    if srv is None:
        console_err.print(f"starting a local Prefect server for {srvmod.vmrep_home()} (once; the first start "
                          "sets up its database) ...", markup=False, highlight=False)
    else:  # started by another command a moment ago, or not answering: start() waits, then restarts it
        console_err.print(f"waiting for the local Prefect server (pid {srv.pid}) to answer ...", markup=False,
                          highlight=False)
    srv = srvmod.start()
    if srv.started:
        console_err.print(f"Prefect UI: {srv.ui_url} (runs until 'vmrep server stop')", markup=False, highlight=False)
    return srv


@contextmanager
def flow_api() -> Iterator[str | None]:
    """Prefect pointed at the API flows of this process report to (None: ephemeral mode)."""
    url = configured_api_url()
    if url is None and local_server_wanted():
        url = ensure_server().api_url
    if url is None:
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect reads its environment once, at import: the settings context is what counts
    # for this process; the variable is for whatever this process may start.
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:  # as it was: main() may run again in the same process (tests)
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def ensure_site_objects(api_url: str | None, config_path: str | None) -> None:
    """The sites' work pools and vCenter concurrency limits (`vcenter-<site>`, strict in
    the tasks) on the server this process's flows use: created here, as every starter of
    a server does (deployments/pools.py). Idempotent, a few API calls."""
    from pathlib import Path

    from deployments import pools

    path = Path(config_path or os.environ.get("VMREP_CONFIG") or "vmrep.yaml")
    if path.exists():
        pools.ensure_for_path(api_url, path)


def _config_arg(flow: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    import inspect

    try:
        bound = inspect.signature(flow.fn).bind_partial(*args, **kwargs)
    except (TypeError, AttributeError):
        return None
    value = bound.arguments.get("config")
    return str(value) if value else None


def run_flow(flow: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a flow in this process against the local server (see the module's docstring).
    Its refusals are checked by the caller before, so a bad input never waits for a server."""
    with flow_api() as url:
        ensure_site_objects(url, _config_arg(flow, args, kwargs))
        return flow(*args, **kwargs)


# --------------------------------------------------------------------------------------
# Commands


def _status() -> dict[str, Any]:
    srvmod = _srvmod()
    home = srvmod.default_home()
    srv = srvmod.current(home)
    out: dict[str, Any] = {"home": str(home), "running": srv is not None, "healthy": False,
                           "url": None, "api_url": None, "pid": None, "log": None,
                           "prefect_api_url": configured_api_url()}
    if srv is not None:
        out.update(healthy=srvmod.healthy(srv.api_url), url=srv.ui_url, api_url=srv.api_url, pid=srv.pid,
                   log=str(srv.log_path))
    return out


@server_app.command("status")
def server_status(json_out: JsonOpt = False) -> None:
    """Where the local Prefect server is and whether it answers (exit 1 if not)."""
    s = _status()
    if json_out:
        print_json(s)
    elif not s["running"]:
        console.print(f"no local Prefect server for {s['home']} (the first operation starts one)", markup=False)
    else:
        console.print(f"{s['url']}  pid {s['pid']}  {'healthy' if s['healthy'] else 'NOT answering'}  "
                      f"(home {s['home']}, log {s['log']})", markup=False)
    if s["prefect_api_url"] and s["prefect_api_url"] != s["api_url"] and not json_out:
        console.print(f"PREFECT_API_URL is set: operations use {s['prefect_api_url']}", markup=False)
    if not s["healthy"]:
        raise typer.Exit(1)


@server_app.command("start")
def server_start(json_out: JsonOpt = False) -> None:
    """Start the local Prefect server now (or find it running)."""
    srv = ensure_server()
    ensure_site_objects(srv.api_url, None)  # pools and vCenter limits of $VMREP_CONFIG or ./vmrep.yaml
    if json_out:
        print_json(_status())
    else:
        console.print(f"Prefect UI: {srv.ui_url}  pid {srv.pid}", markup=False)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server of this VMREP_HOME."""
    srvmod = _srvmod()
    srv = srvmod.current()
    if srv is None:
        console.print(f"no local Prefect server for {srvmod.default_home()}", markup=False)
        return
    srvmod.stop(srv)
    console.print(f"stopped the local Prefect server (pid {srv.pid}, {srv.ui_url})", markup=False)
