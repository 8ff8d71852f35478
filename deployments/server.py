"""A local Prefect server (SQLite) on loopback, under VMREP_HOME, for `make server`,
`make demo` and the end-to-end test.

    with running() as srv:                 # starts (or reuses) it, waits until healthy
        os.environ["PREFECT_API_URL"] = srv.api_url

The server runs as its own process group (`prefect server start` also starts workers of
its own); stop() ends exactly that group, by the id it was started with. Its PID and URL
are kept in `<home>/server.json`: the next start reuses a running one (the CLI's operations
all run against it, see vmrep/cli/server.py), and one start at a time per home holds
`<home>/server.lock`, so there is one server per VMREP_HOME, never a pile of them.

Nothing is read from or sent to the internet: analytics are off, DO_NOT_TRACK is set.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vmrep.errors import VmrepError

DEFAULT_PORT = 4200
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


class ServerError(VmrepError):
    pass


@dataclass
class Server:
    host: str
    port: int
    pid: int
    home: Path  # PREFECT_HOME of this server (its SQLite database lives here)
    log_path: Path
    started: bool = True  # False: an already running server of ours was reused

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def ui_url(self) -> str:
        return self.url

    def env(self) -> dict[str, str]:
        """Environment for a client process (serve, flows, CLI) of this server."""
        return {**QUIET_ENV, "PREFECT_API_URL": self.api_url}


def vmrep_home() -> Path:
    return Path(os.environ.get("VMREP_HOME", ".vmrep")).resolve()


def default_home() -> Path:
    return vmrep_home() / "prefect"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    import requests

    try:
        r = requests.get(f"{api_url}/health", timeout=timeout)
        return r.status_code == 200 and r.json() is True
    except (requests.RequestException, ValueError):
        return False


def _prefect_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def _is_our_server(pid: int, home: Path) -> bool:
    """The process is a `prefect server start` whose PREFECT_HOME is `home`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    cmd = b" ".join(cmdline)
    return b"prefect" in cmd and b"server" in cmd and f"PREFECT_HOME={home}".encode() in environ


def _state_file(home: Path) -> Path:
    return home / "server.json"


def start_timeout() -> float:
    """Seconds a start waits for /api/health: a fresh SQLite database is migrated first,
    which takes well over Prefect's own 20 s ephemeral limit on a busy 2-core machine."""
    try:
        return float(os.environ.get("VMREP_SERVER_START_TIMEOUT", "") or 180.0)
    except ValueError:
        raise ServerError(f"VMREP_SERVER_START_TIMEOUT={os.environ['VMREP_SERVER_START_TIMEOUT']!r} "
                          "is not a number of seconds") from None


def current(home: Path | None = None) -> Server | None:
    """The server recorded in `<home>/server.json` if that process is still ours, else None."""
    home = (home or default_home()).resolve()
    try:
        old = json.loads(_state_file(home).read_text())
        srv = Server(old["host"], int(old["port"]), int(old["pid"]), home, Path(old["log"]), started=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return srv if _is_our_server(srv.pid, home) else None


@contextmanager
def _start_lock(home: Path) -> Iterator[None]:
    """One start at a time per home: two commands run at once on a fresh home would
    otherwise each start a server (or stop the other's, still migrating, as unhealthy)."""
    import fcntl

    with open(home / "server.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wait_healthy(srv: Server, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = srv.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ServerError(f"the Prefect server exited at start (code {proc.returncode}): {' | '.join(tail)}")
        if proc is None and not _is_our_server(srv.pid, srv.home):
            return False
        if healthy(srv.api_url, timeout=1.0):
            return True
        time.sleep(0.3)
    return False


def start(home: Path | None = None, *, port: int | None = None, host: str = "127.0.0.1",
          timeout: float | None = None, reuse: bool = True, database_url: str | None = None) -> Server:
    """Start `prefect server start` on `host:port` with PREFECT_HOME=`home`; wait until
    /api/health answers (`timeout`: default start_timeout()). `port` None: 4200 if free,
    else any free port. With `reuse`, a server of ours already running from the same home
    is returned as is (after waiting for it to become healthy, if it is still starting).

    `database_url` (default: PREFECT_SERVER_DATABASE_CONNECTION_URL of the environment):
    the server's database, e.g. `postgresql+asyncpg://user@host:5432/prefect`; none: SQLite
    under `home`. PostgreSQL is what many workers need (SQLite serialises every write)."""
    home = (home or default_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    timeout = start_timeout() if timeout is None else timeout
    with _start_lock(home):
        old = current(home)
        if old is not None:
            if reuse and (not port or port == old.port) and _wait_healthy(old, time.monotonic() + timeout):
                return old
            stop(old)
        _state_file(home).unlink(missing_ok=True)
        return _spawn(home, port, host, timeout, database_url or os.environ.get(DB_URL_ENV) or None)


DB_URL_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"


def prefect_database_url(sqlalchemy_url: str) -> str:
    """The Prefect server's form of a PostgreSQL URL: its async driver is asyncpg
    (`postgresql+psycopg://...` as vmrep's state uses becomes `postgresql+asyncpg://...`)."""
    scheme, sep, rest = sqlalchemy_url.partition("://")
    if sep and scheme.split("+")[0] in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    return sqlalchemy_url


def _spawn(home: Path, port: int | None, host: str, timeout: float, database_url: str | None = None) -> Server:
    if not port:  # None or 0: the usual port when free, else any
        port = DEFAULT_PORT if port_free(DEFAULT_PORT, host) else free_port(host)
    elif not port_free(port, host):
        raise ServerError(f"port {host}:{port} is in use; give another port or stop what listens there")
    log_path = home / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(QUIET_ENV)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        # The UI must call the API where it really is (not on its default 4200).
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
    })
    if database_url:
        env[DB_URL_ENV] = prefect_database_url(database_url)
    args = [*_prefect_cmd(), "server", "start", "--host", host, "--port", str(port), "--analytics-off"]
    with open(log_path, "ab") as log:
        # Its own session: a Ctrl-C in the terminal of the command that started it does
        # not reach it, and stop() can end its whole process group.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=home)
    srv = Server(host, port, proc.pid, home, log_path)
    _state_file(home).write_text(json.dumps({"pid": proc.pid, "host": host, "port": port, "log": str(log_path)}))
    try:
        if _wait_healthy(srv, time.monotonic() + timeout, proc):
            return srv
        raise ServerError(f"the Prefect server did not become healthy within {timeout:.0f}s (log: {log_path})")
    except BaseException:
        stop(srv)
        raise


def stop(srv: Server, timeout: float = 15.0) -> None:
    """End the server's process group (SIGTERM, then SIGKILL), only if it is ours."""
    pid = srv.pid
    if _is_our_server(pid, srv.home) or _alive_child(pid):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
            while time.monotonic() < deadline:
                if not _group_alive(pid):
                    break
                _reap(pid)
                time.sleep(0.1)
            else:
                continue
            break
        _reap(pid)
    state = _state_file(srv.home)
    try:
        if json.loads(state.read_text()).get("pid") == pid:
            state.unlink()
    except (OSError, ValueError):
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _alive_child(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies of the group count as gone.
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@contextmanager
def running(home: Path | None = None, *, port: int | None = None, host: str = "127.0.0.1",
            keep: bool = False) -> Iterator[Server]:
    """A server for the duration of the block; stopped at the end (also on an error or
    Ctrl-C) if this block started it, unless `keep`."""
    srv = start(home, port=port, host=host)
    try:
        yield srv
    finally:
        if srv.started and not keep:
            stop(srv)


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.server [start|stop|status]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m deployments.server")
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--home", type=Path, default=None, help="PREFECT_HOME (default: $VMREP_HOME/prefect)")
    a = ap.parse_args(argv)
    home = (a.home or default_home()).resolve()
    if a.action == "start":
        srv = start(home, port=a.port)
        print(f"Prefect server: {srv.ui_url} (PREFECT_API_URL={srv.api_url}, pid {srv.pid})")
        return 0
    srv = current(home)
    if srv is None:
        print("no server running from", home)
        return 0 if a.action == "stop" else 1
    if a.action == "stop":
        stop(srv)
        print("stopped")
        return 0
    ok = healthy(srv.api_url)
    print(f"{srv.ui_url}: {'healthy' if ok else 'not answering'} (pid {srv.pid})")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
