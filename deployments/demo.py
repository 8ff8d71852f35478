"""`make demo`: the whole product in a few minutes on a fresh machine.

    python -m deployments.demo [--out demo-out] [--replicate-seconds 40] [--keep-server]

1. a local Prefect server (so every run is visible in the UI while the demo runs),
2. the two-site lab in a demo folder ($VMREP_HOME/demo), with a local SMTP sink
   (aiosmtpd) so the emails are real and land in <out>/mail/*.eml,
3. validate, initial sync of every VPG (flows),
4. replication of every VPG while guests write into their disks,
4b. ransomware: the guest of erp-db "encrypts" part of its disk (random bytes through
   the lab's /guest/write), two cycles, ENCRYPTION_SUSPECTED fires (docs/ransomware.md),
5. a monitor pass, a DR test of `erp` from `latest-clean` (flow: test VMs created,
   verified, removed, report written and emailed, saying which checkpoint and why),
6. the compliance report over the demo's period,
7. a summary table; then the lab, the SMTP sink and the server are stopped, also after
   a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
               ("PREFECT_LOGGING_LEVEL", "WARNING")):
    os.environ.setdefault(_k, _v)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(highlight=False, soft_wrap=True)

TEST_VPG = "erp"
ATTACKED_VM = "erp-db"  # its guest "encrypts" part of its first disk (the ransomware step)
GUEST_RATE = 2 * 1024 * 1024  # bytes/s per writing VM


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    result: str = "not run"
    detail: str = ""


@dataclass
class Demo:
    out: Path
    base: Path
    replicate_seconds: float
    phases: list[Phase] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str, fn: Callable[[], str | None]) -> Any:
        ph = Phase(name, result="running")
        self.phases.append(ph)
        console.print(f"[bold cyan]>[/] {name} ...")
        t0 = time.monotonic()
        try:
            detail = fn()
            ph.result, ph.detail = "ok", detail or ""
            return detail
        except BaseException as exc:
            ph.result = "interrupted" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            ph.detail = f"{type(exc).__name__}: {exc}"[:300]
            raise
        finally:
            ph.seconds = time.monotonic() - t0
            colour = "green" if ph.result == "ok" else "red"
            console.print(f"  [{colour}]{ph.result}[/] in {ph.seconds:.1f}s" + (f": {ph.detail}" if ph.detail else ""))


# --------------------------------------------------------------------------------------
# SMTP sink


class MailSink:
    """An SMTP server on loopback that saves each message as <dir>/NNN.eml."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.controller: Any = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{self.count:03d}.eml").write_bytes(envelope.content)
        return "250 Message accepted"

    def start(self) -> int | None:
        try:
            from aiosmtpd.controller import Controller
        except ImportError:
            return None
        from deployments.server import free_port

        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())
        self.controller.start()
        return self.controller.port

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


# --------------------------------------------------------------------------------------


def _clean_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.html", "*.csv", "mail/*.eml"):
        for p in out.glob(pattern):
            p.unlink()


def _configure(config_path: Path, smtp_port: int | None) -> None:
    """Point the lab's config at the SMTP sink (or at nothing: email is then recorded as failed)."""
    import yaml

    data = yaml.safe_load(config_path.read_text())
    data["notifications"] = {"smtp_host": "127.0.0.1", "smtp_port": smtp_port or 9, "security": "plain",
                             "sender": "vmrep-demo@localhost", "default_to": ["dr-audit@example.test"]}
    head = config_path.read_text().splitlines()[0]
    config_path.write_text(head + "\n# notifications: the demo's SMTP sink\n" + yaml.safe_dump(data, sort_keys=False))


class _QuietThreadTimeouts(logging.Filter):
    """Prefect warns once per task run that a timeout cannot interrupt a worker thread:
    true, known, and hundreds of lines in a demo."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread" not in record.getMessage()


def _flush_prefect_logs() -> None:
    try:
        from prefect.logging.handlers import APILogHandler

        APILogHandler.flush()
    except Exception:  # noqa: BLE001 - best effort
        pass


def run(demo: Demo, keep_server: bool) -> int:
    demo_started = time.time()
    from deployments import pools
    from deployments import server as srvmod
    from lab import manage

    logging.getLogger("prefect.task_runs").addFilter(_QuietThreadTimeouts())

    base, out = demo.base, demo.out
    with ExitStack() as stack:
        # ---- Prefect server first: every run below shows in its UI
        def start_server() -> str:
            srv = srvmod.start()
            os.environ["PREFECT_API_URL"] = srv.api_url
            os.environ.setdefault("PREFECT_HOME", str(srv.home))
            if srv.started and not keep_server:
                stack.callback(lambda: (srvmod.stop(srv), console.print("Prefect server stopped")))
                stack.callback(_flush_prefect_logs)  # runs first: logs reach the server before it stops
            demo.facts["ui"] = srv.ui_url
            demo.facts["server_kept"] = keep_server or not srv.started
            return f"{srv.ui_url} ({'started' if srv.started else 'already running, reused'})"

        demo.step("Prefect server", start_server)

        sink = MailSink(out / "mail")

        def lab_up() -> str:
            manage.down(base)  # a lab left by an interrupted demo
            if base.exists():
                shutil.rmtree(base)
            base.mkdir(parents=True)
            stack.callback(lambda: (manage.down(base), console.print("lab stopped and removed")))
            lab = manage.up(base=base, config_path=base / "vmrep.yaml", boot_delay="300ms",
                            database_url=f"sqlite:///{base / 'state.db'}")
            port = sink.start()
            stack.callback(sink.stop)
            _configure(lab.config_path, port)
            demo.facts["config"] = str(lab.config_path)
            demo.facts["smtp"] = f"127.0.0.1:{port}" if port else None
            sites = ", ".join(f"{n} {s.url}" for n, s in lab.sites.items())
            return f"{sites}; config {lab.config_path}"

        demo.step("Lab up (two vCenter simulators, VMs with real disk bytes)", lab_up)
        config = demo.facts["config"]
        os.environ["VMREP_CONFIG"] = config
        # Whatever starts a server creates the sites' vCenter limits, which the snapshot
        # tasks hold strictly (deployments/pools.py); the demo's flows run in this process.
        pools.ensure_for_path(None, config, pools=False)
        os.environ["VMREP_REPORTS_DIR"] = str(out)
        os.environ.setdefault("VMREP_USER", "make-demo")

        from vmrep.runtime import forget_runtime, get_runtime

        stack.callback(lambda: forget_runtime(config))
        rt = get_runtime(config)
        vpgs = [v.name for v in rt.config.vpgs]

        def validate() -> str:
            from vmrep.validate import validate as check

            problems = check(rt.config)
            if problems:
                raise RuntimeError("; ".join(p.line() for p in problems))
            return f"VPGs {', '.join(vpgs)}: no problems"

        demo.step("Validate", validate)

        def initial_sync() -> str:
            from flows.initial_sync import initial_sync as flow

            parts = []
            for name in vpgs:
                s = flow(name, config)
                parts.append(f"{name}: {s['bytes_read'] / 2**20:.0f} MiB read, "
                             f"{s['bytes_stored'] / 2**20:.1f} MiB stored")
            return "; ".join(parts)

        demo.step("Initial sync (flow per VPG)", initial_sync)

        def replicate() -> str:
            from flows.replicate import replicate as flow
            from lab.guest import guest_write

            secs = demo.replicate_seconds
            writers, stats = [], []
            for v in rt.config.vpgs:
                for vm in v.vms:
                    t = threading.Thread(target=lambda n=vm.name: stats.extend(
                        guest_write(rt.config, n, rate=GUEST_RATE, seconds=secs)), daemon=True)
                    writers.append(t)
            results: dict[str, Any] = {}
            errors: dict[str, BaseException] = {}

            def rep(name: str) -> None:
                try:
                    interval = max(5.0, min(10.0, rt.config.vpg(name).rpo_target_seconds / 6))
                    results[name] = flow(name, config, for_seconds=secs, interval_seconds=interval)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors[name] = exc

            def sample() -> None:
                # The monitor's samples are what the compliance report charts: take one
                # every few seconds while replication runs, as the every-minute schedule would.
                from vmrep.monitor import monitor_pass

                while not done.wait(5.0):
                    try:
                        monitor_pass(rt)
                    except Exception:  # noqa: BLE001 - a missed sample shows as a gap, not a failure
                        pass

            done = threading.Event()
            sampler = threading.Thread(target=sample, daemon=True)
            reps = [threading.Thread(target=rep, args=(n,), daemon=True) for n in vpgs]
            for t in writers + reps:
                t.start()
            sampler.start()
            for t in writers + reps:
                t.join()
            done.set()
            sampler.join()
            if errors:
                name, exc = next(iter(errors.items()))
                raise RuntimeError(f"replication of {name} failed: {exc}")
            written = sum(s.bytes for s in stats)
            demo.facts["guest_bytes"] = written
            demo.facts["cycles"] = {n: results[n] for n in vpgs}
            parts = [f"{n}: {len(c)} checkpoints, {sum(x['blocks_changed'] for x in c)} blocks changed, "
                     f"max cycle {max(x['seconds'] for x in c):.1f}s" for n, c in results.items()]
            return f"guests wrote {written / 2**20:.0f} MiB; " + "; ".join(parts)

        demo.step(f"Replication for {demo.replicate_seconds:.0f}s with guests writing", replicate)

        def monitor() -> str:
            from flows.monitor import monitor as flow

            res = flow(config)
            demo.facts["monitor"] = res
            return "; ".join(f"{r['vpg']}: {r['status']}, RPO {r['rpo_seconds'] or 0:.0f}s" for r in res)

        def ransomware() -> str:
            import random

            from flows.replicate import replicate as flow
            from lab.guest import find_guest
            from vmrep.ransomware.service import latest_clean

            guest = find_guest(rt.config, ATTACKED_VM)
            disk = guest.disks()[0]
            rng = random.Random(13)
            n = (disk.capacity // 2) // 2**20 * 2**20
            for off in range(0, n, 2**20):  # whole files rewritten encrypted, as ransomware does
                guest.write(disk.index, off, rng.randbytes(2**20))
            flow(TEST_VPG, config, cycles=2, interval_seconds=2.0)
            alerts = [a for a in rt.store.open_alerts(TEST_VPG) if a.code == "ENCRYPTION_SUSPECTED"]
            if not alerts:
                raise RuntimeError(f"{ATTACKED_VM}: ENCRYPTION_SUSPECTED did not fire within two cycles")
            cp, why = latest_clean(rt.journal, TEST_VPG)
            demo.facts["latest_clean"] = (cp.id, why)
            return f"{n // 2**20} MiB of {ATTACKED_VM} encrypted: {alerts[0].level} alert; {why}"

        demo.step(f"Ransomware: the guest of {ATTACKED_VM} encrypts half its disk", ransomware)

        demo.step("Monitor pass", monitor)

        def dr_test() -> str:
            from flows.dr_test import dr_test as flow

            try:
                res = flow(TEST_VPG, config, checkpoint="latest-clean",
                           notes="make demo: DR test from the last clean checkpoint")
            finally:
                demo.facts["dr_test_html"] = sorted(out.glob(f"dr-test-{TEST_VPG}-*.html"))
            demo.facts["dr_test"] = res
            rto = res.get("rto_seconds")
            return (f"VPG {TEST_VPG}: success {res.get('success')}, verification {res.get('verification_ok')}, "
                    f"RTO {rto:.1f}s" if rto is not None else f"VPG {TEST_VPG}: {res.get('result')}")

        demo.step(f"DR test of {TEST_VPG} from latest-clean (flow: recover into the test network, verify, "
                  "clean up, report)", dr_test)

        def compliance() -> str:
            from flows.reports import compliance_report

            # the demo's own period, so the RPO chart spans what was replicated
            res = compliance_report(config, period=f"{int(time.time() - demo_started) + 5}s")
            demo.facts["compliance"] = res
            return f"{res['verdict'] or 'written'}: {res['paths']['html']}"

        demo.step("Compliance report (the demo's period)", compliance)
        summary(demo, rt)
        return 0


def summary(demo: Demo, rt: Any) -> None:
    from reports.status import short_seconds, status_rows

    t = Table(title="vmrep demo: VPGs")
    for col in ("VPG", "status", "RPO/target", "ckpts", "journal", "last test", "alerts"):
        t.add_column(col)
    for r in status_rows(rt):
        usage = rt.journal.usage(r["vpg"])
        test = "never" if r["last_test_at"] is None else \
            f"{r['last_test_at'][11:19]} {'passed' if r['last_test_success'] else 'FAILED'}"
        t.add_row(r["vpg"], r["status"] + (f" / {r['substatus']}" if r["substatus"] else ""),
                  f"{short_seconds(r['rpo_seconds'])} / {short_seconds(r['rpo_target_seconds'])}",
                  str(r["checkpoints"]),
                  f"{usage.total_bytes / 2**20:.1f} MiB", test, ", ".join(a["code"] for a in r["alerts"]) or "-")
    console.print(t)
    dr = demo.facts.get("dr_test") or {}
    if dr:
        k = Table(title=f"DR test of {TEST_VPG}", show_header=False)
        k.add_column(style="bold")
        k.add_column()
        age = dr.get("checkpoint_age_seconds")
        k.add_row("result", str(dr.get("result")))
        k.add_row("RPO achieved (checkpoint age)", f"{age:.1f}s" if age is not None else "-")
        k.add_row("RTO measured", f"{dr['rto_seconds']:.1f}s" if dr.get("rto_seconds") is not None else "-")
        k.add_row("checkpoint", f"{dr.get('checkpoint_id')}: {dr.get('checkpoint_reason') or ''}")
        k.add_row("verification", str(dr.get("verification_ok")))
        k.add_row("test VMs cleaned up", str(dr.get("cleanup_ok")))
        k.add_row("operation", str(dr.get("operation_id")))
        console.print(k)
    emails = rt.store.frame("email_deliveries")
    if len(emails):
        console.print(f"emails: {int(emails['ok'].sum())} sent, {int((~emails['ok'].astype(bool)).sum())} failed "
                      f"(vmrep report emails -c {demo.facts.get('config')})", markup=False)


def print_phases(demo: Demo, total: float) -> None:
    t = Table(title=f"vmrep demo: {total:.0f}s in all")
    t.add_column("phase")
    t.add_column("result")
    t.add_column("seconds", justify="right")
    for p in demo.phases:
        colour = "green" if p.result == "ok" else "red"
        t.add_row(p.name, f"[{colour}]{p.result}[/]", f"{p.seconds:.1f}")
    console.print(t)


def print_outputs(demo: Demo) -> None:
    out = demo.out
    dr = demo.facts.get("dr_test_html") or sorted(out.glob("dr-test-*.html"))
    comp = sorted(out.glob("compliance-*.html"))
    mails = sorted((out / "mail").glob("*.eml"))
    console.print("[bold]Reports[/]")
    for p in dr:
        console.print(f"  DR-test report:    {p.resolve()}", markup=False)
    for p in comp:
        console.print(f"  compliance report: {p.resolve()}", markup=False)
    csvs = sorted(out.glob("*.csv"))
    if csvs:
        console.print(f"  CSV files:         {len(csvs)} in {out.resolve()}", markup=False)
    if mails:
        console.print(f"  emails received:   {len(mails)} in {(out / 'mail').resolve()}", markup=False)
    if demo.facts.get("ui"):
        if demo.facts.get("server_kept"):
            console.print(f"  Prefect UI: {demo.facts['ui']} -> Flow runs, Artifacts (server left running; "
                          "stop it with: python -m deployments.server stop)", markup=False)
        else:
            console.print(f"  Prefect UI was at {demo.facts['ui']} while the demo ran; to browse the runs afterwards "
                          "run the demo with VMREP_DEMO_KEEP_SERVER=1 (or --keep-server)", markup=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="where the reports go (default demo-out/)")
    ap.add_argument("--replicate-seconds", type=float, default=40.0)
    ap.add_argument("--keep-server", action="store_true", help="leave the Prefect server running at the end")
    a = ap.parse_args(argv)
    a.keep_server = a.keep_server or os.environ.get("VMREP_DEMO_KEEP_SERVER", "") not in ("", "0")
    home = Path(os.environ.get("VMREP_HOME", ".vmrep")).resolve()
    demo = Demo(out=a.out.resolve(), base=home / "demo", replicate_seconds=a.replicate_seconds)
    _clean_out(demo.out)
    t0 = time.monotonic()
    code = 1
    try:
        code = run(demo, a.keep_server)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: cleaned up")
        code = 130
    except Exception as exc:  # noqa: BLE001 - the demo reports and exits non-zero
        console.print(f"[red]demo failed[/]: {type(exc).__name__}: {exc}")
        if os.environ.get("VMREP_DEMO_TRACEBACK"):
            traceback.print_exc()
    print_phases(demo, time.monotonic() - t0)
    print_outputs(demo)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
