"""Shared fixtures: a throw-away PostgreSQL server, per-test databases, one Prefect harness.

Use from another test module by importing the fixtures into tests/conftest.py:

    from conftest_pg import db_url, pg_server, prefect_harness  # noqa: F401

- `pg_server` (session): a private PostgreSQL cluster in a temp dir, listening on a free
  loopback port (and a unix socket in the same temp dir); yields a `PgServer` with
  `.url(dbname)` and `.create_database()`. Stopped and removed at the end, also after a
  failure. If PostgreSQL is not installed it is installed (`apt-get install -y
  postgresql-15`); if that is impossible the fixture fails, it never skips.
- `db_url` (function, parametrized ``sqlite`` / ``postgresql``): a fresh empty database
  URL for the test; the PostgreSQL one is a new database (CREATE DATABASE, dropped after).
- `prefect_harness` (session): `prefect_test_harness()` started once, with its own
  PREFECT_HOME, analytics off and a fast event persister; yields the API URL.

The server and the harness are kept on the pytest config object, so they are started
once per session even if this module is imported under two names.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

PG_PACKAGE = "postgresql-15"
LAB_SITES = ("siteA", "siteB")  # the sites `vmrep lab up` configures (lab/manage.py)


def _pg_bindir() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    preferred = Path("/usr/lib/postgresql/15/bin")
    for d in [preferred, *candidates]:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _install_postgres() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", PG_PACKAGE]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bindir: Path
    root: Path
    port: int = 0
    user: str = "postgres"
    as_user: list[str] = field(default_factory=list)  # runuser prefix when we are root
    running: bool = False

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*self.as_user, str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            log = self.root / "postgres.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({proc.returncode}): {proc.stderr or proc.stdout}\n{tail}"
            )
        return proc

    def start(self) -> None:
        self.socket_dir.mkdir()
        self.data.mkdir()
        if self.as_user:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.root)], check=True)
        self._run(
            "initdb", "-D", str(self.data), "-U", self.user, "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between probe and bind
            self.port = _free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200 -c shared_buffers=32MB"
            )
            try:
                self._run(
                    "pg_ctl", "-D", str(self.data), "-o", opts,
                    "-l", str(self.root / "postgres.log"), "-w", "-t", "60", "start",
                )  # fmt: skip
                self.running = True
                return
            except RuntimeError as exc:
                last = exc
        raise RuntimeError(f"PostgreSQL did not start: {last}")

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        try:  # FILE_COPY: ~30 ms instead of ~300 ms (PostgreSQL 15+, fsync is off here)
            self.admin(f'CREATE DATABASE "{name}" STRATEGY = FILE_COPY')
        except psycopg.errors.SyntaxError:
            self.admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_pg_server() -> PgServer:
    """Start a private PostgreSQL server (installing the package if needed), or raise."""
    bindir = _pg_bindir()
    if bindir is None:
        _install_postgres()
        bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError(
            f"PostgreSQL server binaries not found and `apt-get install -y {PG_PACKAGE}` "
            "did not provide them: the PostgreSQL tests cannot run"
        )
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root but there is no 'postgres' user") from None
        as_user = ["runuser", "-u", "postgres", "--"]
    # /tmp rather than pytest's per-user 0700 base dir: the postgres user must reach it.
    root = Path(tempfile.mkdtemp(prefix="vmrep-pg-", dir="/tmp" if as_user else None))
    server = PgServer(bindir=bindir, root=root, as_user=as_user)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    atexit.register(server.stop)  # also when the session dies before its finalizers
    return server


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    config = request.config
    server = getattr(config, "_vmrep_pg_server", None)
    if server is None:
        try:
            server = start_pg_server()
        except Exception as exc:
            pytest.fail(f"PostgreSQL test server: {exc}", pytrace=False)
        config._vmrep_pg_server = server  # type: ignore[attr-defined]
        config.add_cleanup(server.stop)
    yield server


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    yield url
    try:
        server.drop_database(name)
    except Exception:  # the server is thrown away at the end anyway
        pass


@pytest.fixture(scope="session")
def prefect_harness(request: pytest.FixtureRequest) -> Iterator[str]:
    """One Prefect test server for the whole session (~14 s to start); yields its API URL."""
    config = request.config
    url = getattr(config, "_vmrep_prefect_api_url", None)
    if url is None:
        home = Path(tempfile.mkdtemp(prefix="vmrep-prefect-"))
        env = {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            # events reach the API's event store within a fraction of a second
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.2",
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
        from prefect.testing.utilities import prefect_test_harness

        settings = temporary_settings(updates={PREFECT_HOME: home})
        # Its first start migrates a new SQLite database: 60 s was overrun with three suites
        # at once on 2 cores; the CLI's own server start waits up to 180 s as well.
        harness = prefect_test_harness(server_startup_timeout=180)
        settings.__enter__()
        started = time.monotonic()
        harness.__enter__()
        url = PREFECT_API_URL.value()
        config._vmrep_prefect_api_url = url  # type: ignore[attr-defined]
        # Whatever starts a server creates the vCenter limits the tasks hold strictly
        # (deployments/pools.py): here those of the lab's two sites.
        from deployments.pools import ensure_limits
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            ensure_limits(client, {site: 4 for site in LAB_SITES})

        def stop() -> None:
            try:
                harness.__exit__(None, None, None)
            finally:
                settings.__exit__(None, None, None)
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                shutil.rmtree(home, ignore_errors=True)

        config.add_cleanup(stop)
        print(f"prefect test harness up in {time.monotonic() - started:.1f} s at {url}")
    yield url
