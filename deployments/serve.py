"""Every vmrep flow as a Prefect deployment on its site's work pool, and one process worker
per pool on this machine: `make server`.

    python -m deployments.serve [--config vmrep.yaml] [--port 4200] [--no-workers] [--database-url URL]

Without PREFECT_API_URL it first starts a local Prefect server (SQLite under
$VMREP_HOME/prefect, or the database of PREFECT_SERVER_DATABASE_CONNECTION_URL /
--database-url; loopback; see deployments/server.py) and stops it again on exit. Then it
creates the work pools `vmrep-<site>` and the vCenter limits `vcenter-<site>`
(deployments/pools.py), registers the deployments below (each on exactly one pool: see
specs()), creates the alert automation and starts `prefect worker start --pool
vmrep-<site>` for every site: runs triggered from the UI, by a schedule or by an
automation execute in a process that their pool's worker starts.

Deployments (flow/deployment), for the VPGs of the config:

| deployment | when | what |
|---|---|---|
| replicate/<vpg> | a run every 5 minutes; the next starts while the last still cycles and takes over between two checkpoints (two runs may be active, one writes) | continuous replication |
| replicate-site/<site> | the same, its schedule registered switched off: for sites with many VPGs, switched on instead of the site's replicate/<vpg> | every VPG of the site in one run |
| monitor/every-minute | a pass every minute, in runs of 30 minutes back to back | RPO, history, tests due, alerts (as events) |
| dr-test/dr-test | per VPG on its test_interval_months (1st of the month, 02:00 UTC), and from the UI | test failover + report email |
| compliance-report/monthly | 06:00 UTC on the 1st, for the previous month | compliance report + email |
| initial-sync, failover, move, commit, rollback, dr-test-report, notify | from the UI (or the automation) | |
| <flow>/<site> (dr-test/siteB, initial-sync/siteA, ...) | by the UI entry of the flow | the same on that site's pool |
| retention/<site> | every journal.retention_interval_seconds (5 min) | the journal's retention of the VPGs recovered at that site, on its pool |

The parameters of each are pydantic models (deployments/params.py): the UI shows them as
a form with a drop-down of the configured VPGs, and the server refuses invalid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from deployments import params as P
from vmrep.stamps import utcnow

log = logging.getLogger("vmrep.deployments")

TAGS = ["vmrep"]
REPLICATE_RUN_SECONDS = 300  # one replicate run per 5 minutes, back to back
# How long a replicate run may go on past its successor's due time before it ends on its
# own (a successor normally takes over within its start-up time, see flows/replicate.py).
REPLICATE_OVERLAP_SECONDS = 120
REPO = Path(__file__).resolve().parents[1]  # the code the workers run (see code_dir())
MONITOR_SECONDS = 60  # a pass every minute
# One monitor run lives this long and the schedule starts the next as it ends (see
# flows/monitor.py for why a long run). The environment overrides both run lengths for
# the schedule test (tests/test_schedules.py), which must see runs fire within seconds.
MONITOR_RUN_SECONDS = int(os.environ.get("VMREP_MONITOR_RUN_SECONDS", "1800"))
REPLICATE_RUN_SECONDS = int(os.environ.get("VMREP_REPLICATE_RUN_SECONDS", str(REPLICATE_RUN_SECONDS)))
COMPLIANCE_CRON = "0 6 1 * *"  # 06:00 UTC on the 1st: the previous month's report
DR_TEST_HOUR = 2  # scheduled DR tests start at 02:00 UTC (one hour later per further VPG)


@dataclass
class Spec:
    """One deployment: which flow, its name, parameters (model + defaults), schedules."""

    module: str
    flow_attr: str
    name: str
    model: type[BaseModel]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    schedules: list[Any] = field(default_factory=list)
    concurrency: Any = None
    tags: list[str] = field(default_factory=list)
    site: str | None = None  # its work pool is vmrep-<site> (deployments/pools.py)

    def load_flow(self) -> Any:
        return getattr(importlib.import_module(self.module), self.flow_attr)


# --------------------------------------------------------------------------------------
# Schedules


def replicate_interval(rpo_target_seconds: float) -> float:
    """Seconds between checkpoints: a sixth of the RPO target, between 5 s and 60 s (the
    rule replicate-site applies per VPG: one definition)."""
    from flows.replicate_site import interval_for

    return interval_for(rpo_target_seconds)


def dr_test_rrule(months: int, index: int, now: datetime | None = None) -> str:
    """Every `months` months on the 1st, from next month on, at 02:00 UTC (+1 h per VPG)."""
    now = now or utcnow()
    first_next = (now.replace(day=1) + timedelta(days=32)).replace(day=1)
    hour = (DR_TEST_HOUR + index) % 24
    start = first_next.replace(hour=hour, minute=0, second=0, microsecond=0)
    return (f"DTSTART:{start:%Y%m%dT%H%M%SZ}\n"
            f"RRULE:FREQ=MONTHLY;INTERVAL={months};BYMONTHDAY=1;BYHOUR={hour};BYMINUTE=0;BYSECOND=0")


def schedule_text(spec: Spec) -> str:
    """How a DR engineer would say the schedule."""
    out = []
    for s in spec.schedules:
        who = f" ({s.parameters['vpg']})" if s.parameters.get("vpg") else ""
        if s.interval is not None:
            secs = s.interval.total_seconds()
            if s.slug == "monitor" and spec.defaults.get("lifetime_seconds"):
                out.append(f"a pass every {spec.defaults['interval_seconds'] / 60:g} min, in runs of {secs / 60:g} min")
                continue
            out.append(("every minute" if secs == 60 else f"every {secs / 60:g} min") + who)
        elif s.cron is not None:
            out.append(("monthly, 1st 06:00 UTC" if s.cron == COMPLIANCE_CRON else s.cron) + who)
        elif s.rrule is not None:
            rule = s.rrule.split("RRULE:")[-1]
            n = int(rule.split("INTERVAL=")[1].split(";")[0])
            hour = int(rule.split("BYHOUR=")[1].split(";")[0])
            out.append(f"every {n} month{'s' if n > 1 else ''}, 1st {hour:02d}:00 UTC{who}")
    return "; ".join(out) or "on demand"


# --------------------------------------------------------------------------------------
# Sites and pools

# UI entries that serve VPGs of several sites -> whose pool runs the work. Each has one
# per-site deployment `<flow>/<site>` on that site's pool; the UI entry's run hands over
# to it (flows/_common.hand_off), so a deployment has exactly one pool.
DISPATCHED = {
    "initial-sync": "protected",
    "dr-test": "recovery", "dr-test-start": "recovery", "dr-test-stop": "recovery",
    "live-failover": "recovery", "planned-move": "recovery", "commit": "recovery", "rollback": "recovery",
}


def sites_of(config: Any, role: str) -> list[str]:
    """The sites some VPG has as its `role` ("protected" or "recovery"), in config order."""
    out: list[str] = []
    for v in config.vpgs:
        site = v.protected_site if role == "protected" else v.recovery_site
        if site not in out:
            out.append(site)
    return out


def home_site(config: Any) -> str:
    """The pool of what serves every VPG at once (monitor, reports, the UI entries that
    hand over): the recovery site most VPGs recover to (first in config order on a tie);
    without VPGs the first site."""
    rec = [v.recovery_site for v in config.vpgs]
    if not rec:
        return next(iter(config.sites))
    return max(dict.fromkeys(rec), key=rec.count)


def code_dir() -> Path:
    """Where the workers find the code: this checkout (VMREP_CODE_DIR to name another path,
    e.g. where a second machine has the same checkout)."""
    return Path(os.environ.get("VMREP_CODE_DIR") or REPO).resolve()


def per_site(spec: Spec, sites: list[str]) -> list[Spec]:
    """The per-site deployments `<flow>/<site>` a UI entry hands over to: same flow and
    form, no schedules (the UI entry keeps them), each on its site's pool."""
    out = []
    for site in sites:
        out.append(dataclasses.replace(
            spec, name=site, site=site, schedules=[], tags=[*spec.tags, f"site:{site}"],
            description=f"{spec.description} -- On the pool of site {site}: the '{spec.name}' entry hands "
                        f"the VPGs of {site} over to this deployment."))
    return out


# --------------------------------------------------------------------------------------
# The catalogue


def specs(config: Any, config_path: str, now: datetime | None = None) -> list[Spec]:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron, Interval

    # Two replicate runs at once: the next starts while the last still cycles and takes
    # over from it (flows/replicate.HandOff), so a flow's start-up is not an RPO gap.
    two_enqueue = ConcurrencyLimitConfig(limit=2, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    one_enqueue = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    base = {"config": config_path}
    out: list[Spec] = []

    for v in config.vpgs:
        every = replicate_interval(v.rpo_target_seconds)
        out.append(Spec(
            "flows.replicate", "replicate", v.name, P.ReplicateParams,
            f"Continuous replication of VPG {v.name} ({v.protected_site} -> {v.recovery_site}): a checkpoint "
            f"every {every:g} s (RPO target {v.rpo_target_seconds:g} s). A run lasts "
            f"{REPLICATE_RUN_SECONDS // 60} minutes: the next one starts while it runs and takes over "
            "between two checkpoints (no gap). Needs the initial sync first.",
            # A run ends when its successor has started (normally seconds after the next is
            # due); for_seconds only bounds a run whose successor never comes.
            defaults={**base, "vpg": v.name, "for_seconds": REPLICATE_RUN_SECONDS + REPLICATE_OVERLAP_SECONDS,
                      "interval_seconds": every},
            schedules=[Interval(timedelta(seconds=REPLICATE_RUN_SECONDS), slug=f"replicate-{v.name}",
                                anchor_date=datetime(2020, 1, 1, tzinfo=timezone.utc))],
            concurrency=two_enqueue, tags=["replication", f"vpg:{v.name}"], site=v.protected_site))
    for site in sites_of(config, "protected"):
        out.append(Spec(
            "flows.replicate_site", "replicate_site", site, P.ReplicateSiteParams,
            f"Continuous replication of every VPG protected at {site} by one run (flows/replicate_site.py): "
            "each VPG on its own interval (RPO target / 6), at most 8 cycles at once, one task run per cycle. "
            f"For sites with many VPGs, instead of replicate/<vpg>: its schedule (a run every "
            f"{REPLICATE_RUN_SECONDS // 60} minutes, the next taking over between checkpoints) is registered "
            "switched off; switch it on and switch off the replicate/<vpg> schedules of the site's VPGs "
            "(docs/operations.md).",
            defaults={**base, "site": site, "for_seconds": REPLICATE_RUN_SECONDS + REPLICATE_OVERLAP_SECONDS},
            schedules=[Interval(timedelta(seconds=REPLICATE_RUN_SECONDS), slug=f"replicate-site-{site}",
                                anchor_date=datetime(2020, 1, 1, tzinfo=timezone.utc), active=False)],
            concurrency=two_enqueue, tags=["replication", f"site:{site}"], site=site))
    home = home_site(config)

    # The journal's retention, where the journal is: one deployment per recovery site on
    # its pool (a served replicate run applies none, flows/retention.py says why). A run
    # still going when the next is due makes that one be cancelled, not queued.
    every_retention = float(config.journal.retention_interval_seconds)
    for site in sites_of(config, "recovery"):
        out.append(Spec(
            "flows.retention", "retention", site, P.RetentionParams,
            f"The journal's retention at site {site}, every {every_retention / 60:g} min: for every VPG recovered "
            "there, history older than its journal_history_hours promoted, the hard limit honoured, locked "
            "history (retention_lock_hours, back to the last clean checkpoint while encryption is suspected) "
            "kept; JOURNAL_LIMIT_LOCKED raised and cleared.",
            defaults={**base, "site": site},
            schedules=[Interval(timedelta(seconds=every_retention), slug=f"retention-{site}",
                                anchor_date=datetime(2020, 1, 1, tzinfo=timezone.utc))],
            concurrency=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            tags=["retention", f"site:{site}"], site=site))

    out.append(Spec(
        "flows.monitor", "monitor", "every-minute", P.MonitorParams,
        "Every minute: judge every VPG (RPO against target, journal history, tests due, configuration), "
        "raise and clear alerts, and emit them as events: the 'vmrep alert email' automation emails them. "
        f"One run makes a pass a minute for {MONITOR_RUN_SECONDS // 60} minutes, taking only what changed in "
        "vSphere since the previous pass; the next run starts as it ends.",
        # The run stops a pass interval before its end: it has ended when the next is due.
        defaults={**base, "lifetime_seconds": max(0, MONITOR_RUN_SECONDS - MONITOR_SECONDS),
                  "interval_seconds": MONITOR_SECONDS},
        schedules=[Interval(timedelta(seconds=MONITOR_RUN_SECONDS), slug="monitor",
                            anchor_date=datetime(2020, 1, 1, tzinfo=timezone.utc))],
        concurrency=one_enqueue, tags=["monitoring"], site=home))

    out.append(Spec(
        "flows.initial_sync", "initial_sync", "initial-sync", P.InitialSyncParams,
        "Initial sync of a VPG: validate it, copy every disk into the journal (resumes where a broken run "
        "stopped), take the first checkpoint. Run once per new VPG, before replication or any test.",
        defaults=dict(base), tags=["replication"], site=home))

    out.append(Spec(
        "flows.reports", "compliance_report", "monthly", P.ComplianceParams,
        "The compliance report: per VPG, RPO met, journal history kept, DR test done and not overdue. "
        "Scheduled on the 1st of each month for the previous month; run it by hand for any period. "
        "Written to disk, shown in Artifacts, emailed.",
        defaults={**base, "period": "previous-month"},
        schedules=[Cron(COMPLIANCE_CRON, timezone="UTC", slug="compliance-monthly")], tags=["reports"],
        site=home))

    out.append(Spec(
        "flows.reports", "dr_test_report_flow", "dr-test-report", P.DrTestReportParams,
        "Issue the report of a DR test again (the latest, or one by operation id): HTML + CSV on disk, "
        "Prefect artifacts, email. Every DR test sends its report by itself; this is for a re-send.",
        defaults=dict(base), tags=["reports"], site=home))

    out.append(Spec(
        "flows.reports", "notify", "notify", P.NotifyParams,
        "Email a VPG's owners about an event. Run by the 'vmrep alert email' automation when the monitor "
        "raises an alert (Prefect's open-source server has no SMTP notification block).",
        defaults=dict(base), tags=["notifications"], site=home))

    out += recovery_specs(config, base, now)
    for spec in list(out):
        if spec.name in DISPATCHED:
            out += per_site(spec, sites_of(config, DISPATCHED[spec.name]))
    return out


RECOVERY = [
    # (module, flow attribute, deployment name, params model, description)
    ("flows.dr_test", "dr_test", "dr-test", P.DrTestParams,
     "DR test (test failover) of a VPG: its VMs are recovered from a checkpoint into the isolated test "
     "network as '<vm> - testing recovery', booted by boot group, verified (power, tools, IP, every disk "
     "block), kept for the time asked, then removed. Production keeps running and replicating. The report "
     "(verdict, RPO achieved, RTO measured) is written, shown in Artifacts and emailed. Scheduled per VPG "
     "on its test interval."),
    ("flows.dr_test", "dr_test_start", "dr-test-start", P.DrTestStartParams,
     "Start a DR test and leave the test VMs running for people to check the applications; end it with "
     "dr-test-stop."),
    ("flows.dr_test", "dr_test_stop", "dr-test-stop", P.DrTestStopParams,
     "Stop the VPG's running DR test: record whether it succeeded, remove the test VMs and scratch copies."),
    ("flows.failover", "failover", "live-failover", P.FailoverParams,
     "LIVE failover of a VPG into the production network at its recovery site, for when the protected "
     "site is lost. The VPG then waits for commit or rollback (or its commit policy). Type the VPG's name "
     "again to confirm."),
    ("flows.move", "move", "planned-move", P.MoveParams,
     "Planned move of a VPG: shut the protected VMs down, final checkpoint (no data lost), fail over to "
     "it, commit, and by default protect it back to the original site. Type the VPG's name again to confirm."),
    ("flows.failover", "commit", "commit", P.CommitParams,
     "Commit a live failover or move that waits for it: the recovered VMs stay."),
    ("flows.failover", "rollback", "rollback", P.RollbackParams,
     "Roll back a live failover or move that waits for commit: recovered VMs removed, protected VMs "
     "powered back on as they were."),
]


def recovery_specs(config: Any, base: dict[str, Any], now: datetime | None = None) -> list[Spec]:
    from prefect.schedules import RRule

    out = []
    for module, attr, name, model, description in RECOVERY:
        schedules = []
        if name == "dr-test":
            for i, v in enumerate(config.vpgs):
                if v.test_interval_months != "off":
                    schedules.append(RRule(dr_test_rrule(int(v.test_interval_months), i, now), timezone="UTC",
                                           parameters={"vpg": v.name}, slug=f"dr-test-{v.name}"))
        out.append(Spec(module, attr, name, model, description, defaults=dict(base), schedules=schedules,
                        tags=["recovery"], site=home_site(config)))
    return out


# --------------------------------------------------------------------------------------
# Building


def check_model(flow: Any, model: type[BaseModel]) -> None:
    """Every field of the parameters model must be a parameter of the flow."""
    import inspect

    names = set(inspect.signature(flow.fn).parameters)
    missing = [f for f in model.model_fields if f not in names]
    if missing:
        raise TypeError(f"flow {flow.name!r} has no parameter(s) {', '.join(missing)} of {model.__name__}")


def build(spec: Spec, vpgs: list[str], *, schedules_active: bool = True) -> Any:
    """A RunnerDeployment of the spec on its site's work pool, its parameter schema from
    the pydantic model. Code storage: the checkout on this machine (code_dir()); a worker's
    flow run starts in that directory (a `set_working_directory` pull step) and imports
    the flow by module path, so no image and no push."""
    from prefect.deployments.runner import EntrypointType
    from prefect.runner.storage import LocalStorage
    from prefect.utilities.callables import ParameterSchema

    from deployments.pools import pool_name

    flow = spec.load_flow()
    check_model(flow, spec.model)
    # a schedule registered switched off (replicate-site/<site>) stays off
    schedules = [dataclasses.replace(s, active=schedules_active and s.active) for s in spec.schedules]
    dep = flow.to_deployment(
        spec.name,
        parameters=spec.defaults,
        description=spec.description,
        schedules=schedules or None,
        concurrency_limit=spec.concurrency,
        tags=TAGS + spec.tags,
        paused=False,
        enforce_parameter_schema=True,
        entrypoint_type=EntrypointType.MODULE_PATH,  # flows/reports.py must not shadow the reports package
        work_pool_name=pool_name(spec.site) if spec.site else None,
    )
    if spec.site:
        dep.storage = LocalStorage(str(code_dir()))
    dep._parameter_openapi_schema = ParameterSchema(**P.parameter_schema(spec.model, vpgs))
    return dep


def build_deployments(config_path: str | Path, *, strict: bool = False,
                      schedules_active: bool = True) -> tuple[list[Any], list[Spec]]:
    """All deployments for the config. A flow module that does not exist yet is skipped
    with a warning (strict: raised). `schedules_active` False registers the schedules
    switched off (they can be switched on in the UI)."""
    from vmrep.config import load_config

    path = str(Path(config_path).resolve())
    config = load_config(path)
    vpgs = [v.name for v in config.vpgs]
    deps, built = [], []
    for spec in specs(config, path):
        try:
            spec.load_flow()
        except (ModuleNotFoundError, AttributeError) as exc:
            if strict:
                raise
            log.warning("deployment %s skipped: flow %s.%s not found (%s)", spec.name, spec.module,
                        spec.flow_attr, exc)
            continue
        deps.append(build(spec, vpgs, schedules_active=schedules_active))
        built.append(spec)
    return deps, built


def summary_table(built: list[Spec]) -> Any:
    from rich.table import Table

    t = Table(title="vmrep deployments", show_lines=False)
    t.add_column("deployment", style="bold", no_wrap=True)
    t.add_column("schedule")
    for s in built:
        flow_name = s.load_flow().name
        t.add_row(f"{flow_name}/{s.name}", schedule_text(s))
    return t


# --------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.serve",
                                 description="Register every vmrep deployment on its site's work pool and run one "
                                             "process worker per pool (starts a local Prefect server if "
                                             "PREFECT_API_URL is not set).")
    ap.add_argument("--config", "-c", default=os.environ.get("VMREP_CONFIG", "vmrep.yaml"),
                    help="vmrep.yaml (default: $VMREP_CONFIG or ./vmrep.yaml)")
    ap.add_argument("--port", type=int, default=None, help="port of the local server (default 4200, else any free)")
    ap.add_argument("--no-automations", action="store_true", help="do not create the alert email automation")
    ap.add_argument("--no-schedules", action="store_true",
                    help="register the schedules switched off (only UI/API/automation runs)")
    ap.add_argument("--no-workers", action="store_true",
                    help="register pools, limits and deployments, then exit: workers run elsewhere "
                         "(prefect worker start --pool vmrep-<site>)")
    ap.add_argument("--database-url", default=None,
                    help="the local server's database (default $PREFECT_SERVER_DATABASE_CONNECTION_URL, else "
                         "SQLite), e.g. postgresql+asyncpg://user@host/prefect")
    a = ap.parse_args(argv)

    for k, v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(k, v)
    config_path = Path(a.config).resolve()
    if not config_path.exists():
        print(f"error: config {config_path} not found. Start the lab first (`make lab-up` writes ./vmrep.yaml) "
              "or give --config / set VMREP_CONFIG.", file=sys.stderr)
        return 2
    os.environ["VMREP_CONFIG"] = str(config_path)

    from deployments import server as srvmod

    srv = None
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(srvmod.default_home()))
        print("starting a local Prefect server ...", flush=True)
        srv = srvmod.start(port=a.port, database_url=a.database_url)
        os.environ["PREFECT_API_URL"] = srv.api_url
        os.environ.setdefault("PREFECT_UI_URL", srv.ui_url)
    try:
        return _serve(config_path, srv, automations=not a.no_automations, schedules=not a.no_schedules,
                      workers=not a.no_workers)
    except KeyboardInterrupt:
        return 130
    finally:
        if srv is not None and srv.started:
            srvmod.stop(srv)
            print("Prefect server stopped.", flush=True)


def _serve(config_path: Path, srv: Any, *, automations: bool, schedules: bool = True, workers: bool = True) -> int:
    import signal
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings
    from rich.console import Console

    from deployments import pools

    console = Console()
    api_url = os.environ["PREFECT_API_URL"]
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        made = pools.ensure_for_path(api_url, config_path)
        console.print(f"work pools: {', '.join(made['pools'])}; vCenter limits: {', '.join(made['limits'])}",
                      markup=False)
        deps, built = build_deployments(config_path, schedules_active=schedules)
        for d in deps:
            d.apply()  # registered now, so the automation can name the notify deployment
        if automations:
            from deployments.automations import ensure_alert_email

            try:
                auto = ensure_alert_email()
                console.print(f"automation: {auto.name!r} (vmrep.alert.raised -> notify/notify)", markup=False)
            except Exception as exc:  # noqa: BLE001 - serving matters more than the automation
                console.print(f"automation not created: {exc}", markup=False)
        console.print(summary_table(built))
        ui = srv.ui_url if srv is not None else api_url.removesuffix("/api")
        console.print(f"Prefect UI: {ui}  (Deployments -> dr-test/dr-test -> Run -> Custom run -> choose the VPG)",
                      markup=False)
        if not workers:
            console.print("registered; start a worker per pool: prefect worker start --pool <pool> --type process",
                          markup=False)
            return 0
        log_dir = Path(os.environ.get("PREFECT_HOME") or (srv.home if srv else ".")).resolve() / "workers"
        started: list[pools.Worker] = []

        def stop(*_: Any) -> None:
            raise KeyboardInterrupt

        # SIGINT too, explicitly: started from a non-interactive shell's background (`&`, a
        # CI runner), a process inherits SIGINT ignored and Python then installs no
        # KeyboardInterrupt for it; serve ignored Ctrl-C, and so did its workers (which
        # inherit the disposition, and stop themselves on SIGTERM by sending SIGINT to
        # themselves). A handler is reset to the default on exec: the workers get SIGINT back.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        try:
            for pool in made["pools"]:
                started.append(pools.start_worker(pool, api_url=api_url, log_dir=log_dir, cwd=code_dir()))
                console.print(f"worker of {pool}: pid {started[-1].pid}, log {started[-1].log_path}", markup=False)
            console.print(f"config: {config_path}; Ctrl-C stops the workers" + (" and the server" if srv else ""),
                          markup=False)
            while True:  # the workers run the flows; a worker that dies is started again
                time.sleep(2)
                for i, w in enumerate(started):
                    if w.proc.poll() is not None:
                        console.print(f"worker of {w.pool} exited ({w.proc.returncode}); starting it again "
                                      f"(log {w.log_path})", markup=False)
                        started[i] = pools.start_worker(w.pool, api_url=api_url, log_dir=log_dir, cwd=code_dir())
        finally:
            pools.stop_workers(started)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
