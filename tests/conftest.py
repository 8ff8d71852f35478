"""Shared fixtures: a real two-site lab (two simulator processes), its config and runtime.

Nothing of vSphere is mocked: the lab is the govmomi simulator behind our launcher,
reached with pyvmomi over HTTPS with the lab's CA verified.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

# Prefect must stay local and quiet in tests (no telemetry, a home of our own).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
_PREFECT_HOME = Path(__file__).resolve().parents[1] / "build" / "test-prefect-home"
os.environ.setdefault("PREFECT_HOME", str(_PREFECT_HOME))
# The CLI's operations called in-process run in Prefect's ephemeral mode, as the flows the
# tests call directly do, instead of leaving a local server running behind the suite;
# tests/test_cli_server.py and test_cli_signals.py run `vmrep` with a home and server of their own.
os.environ.setdefault("VMREP_LOCAL_SERVER", "off")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import manage  # noqa: E402
from vmrep.config import Config, load_config  # noqa: E402
from vmrep.runtime import Runtime, forget_runtime, get_runtime  # noqa: E402


class MailSink:
    """A real SMTP server on loopback that keeps what it receives (the lab's mail relay)."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.messages: list = []  # type: ignore[type-arg]
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        import email

        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def stop(self) -> None:
        self.controller.stop()


class LabHandle:
    """A running lab and what tests need of it."""

    def __init__(self, base: Path, lab: manage.Lab, mail: MailSink) -> None:
        self.base = base
        self.lab = lab
        self.mail = mail
        self.config_path = lab.config_path

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    def runtime(self) -> Runtime:
        return get_runtime(self.config_path)

    def site(self, name: str) -> manage.SiteProcess:
        return self.lab.sites[name]

    def control(self, site: str) -> "LabControl":
        return LabControl(self.lab.sites[site].control_url)

    def guest_write(self, vm: str, disk: str, offset: int, data: bytes, site: str = "siteA") -> None:
        """What the running VM's guest writes to its disk `disk` (vmrep's id, 'scsi0:1'):
        through the launcher, as a guest's I/O reaches ESXi (never into the files)."""
        ctl = self.control(site)
        ctl.guest_write(vm, ctl.disk_index(vm, disk), offset, data)


class LabControl:
    """The launcher's fault-injection and inspection endpoint."""

    def __init__(self, url: str) -> None:
        import requests

        self.url = url.rstrip("/")
        self.http = requests.Session()

    def fault(self, method: str, action: str = "fault", fault: str | None = None, *, count: int = 1,
              delay_ms: int = 0, match: str | None = None) -> None:
        body = {"method": method, "action": action, "count": count, "delay_ms": delay_ms}
        if fault:
            body["fault"] = fault
        if match:
            body["match"] = match
        r = self.http.post(f"{self.url}/faults", json=body, timeout=5)
        r.raise_for_status()

    def clear_faults(self) -> None:
        self.http.delete(f"{self.url}/faults", timeout=5).raise_for_status()

    def calls(self) -> dict[str, int]:
        r = self.http.get(f"{self.url}/calls", timeout=5)
        r.raise_for_status()
        return r.json()

    def reset_calls(self) -> None:
        self.http.delete(f"{self.url}/calls", timeout=5).raise_for_status()

    def drop_sessions(self) -> None:
        self.http.delete(f"{self.url}/sessions", timeout=5).raise_for_status()

    def never_boot(self, vm: str, never: bool = True) -> None:
        self.http.post(f"{self.url}/vms/never-boot", json={"name": vm, "never": never}, timeout=5).raise_for_status()

    def boot_delay(self, ms: int) -> None:
        self.http.post(f"{self.url}/guest-boot-delay", json={"ms": ms}, timeout=5).raise_for_status()

    # Guest I/O: what a running VM's guest writes and reads (lab/launcher/guestio.go).

    def guest_write(self, vm: str, disk: int, offset: int, data: bytes) -> int:
        r = self.http.post(f"{self.url}/guest/write", params={"vm": vm, "disk": disk, "offset": offset},
                           data=data, timeout=60)
        r.raise_for_status()
        return int(r.json()["written"])

    def guest_read(self, vm: str, disk: int, offset: int, length: int) -> bytes:
        r = self.http.get(f"{self.url}/guest/read", params={"vm": vm, "disk": disk, "offset": offset,
                                                            "length": length}, timeout=60)
        r.raise_for_status()
        return r.content

    def disk_index(self, vm: str, disk_id: str) -> int:
        """The guest I/O index (controller order) of the VM's disk with vmrep's id 'scsiB:U'."""
        r = self.http.get(f"{self.url}/guest/disks", params={"vm": vm}, timeout=5)
        r.raise_for_status()
        for d in r.json()["disks"]:
            if f"scsi{d['bus']}:{d['unit']}" == disk_id:
                return int(d["index"])
        raise LookupError(f"{vm} has no disk {disk_id}")

    def cbt_reset(self, vm: str, disk: int) -> None:
        self.http.post(f"{self.url}/cbt/reset", params={"vm": vm, "disk": disk}, timeout=5).raise_for_status()

    def cbt_max_areas(self, n: int) -> None:
        self.http.post(f"{self.url}/cbt/max-areas", json={"n": n}, timeout=5).raise_for_status()


def _start_lab(base: Path, boot_delay: str = "200ms") -> LabHandle:
    base.mkdir(parents=True, exist_ok=True)
    mail = MailSink()
    try:
        lab = manage.up(base=base, config_path=base / "vmrep.yaml", boot_delay=boot_delay,
                        database_url=f"sqlite:///{base / 'state.db'}",
                        notifications={"smtp_host": "127.0.0.1", "smtp_port": mail.port, "security": "plain",
                                       "default_to": ["dr-reports@example.test"]})
    except BaseException:
        mail.stop()
        raise
    return LabHandle(base, lab, mail)


def _stop_lab(handle: LabHandle) -> None:
    forget_runtime(handle.config_path)
    try:
        manage.down(base=handle.base)
    finally:
        handle.mail.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A two-site lab shared by the tests of one module."""
    handle = _start_lab(tmp_path_factory.mktemp("lab"))
    try:
        yield handle
    finally:
        _stop_lab(handle)


@pytest.fixture
def fresh_lab(tmp_path: Path) -> Iterator[LabHandle]:
    """A two-site lab of the test's own."""
    handle = _start_lab(tmp_path / "lab")
    try:
        yield handle
    finally:
        _stop_lab(handle)


from conftest_pg import db_url, pg_server, prefect_harness  # noqa: E402,F401  (shared fixtures)
