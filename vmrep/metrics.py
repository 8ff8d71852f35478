"""Prometheus metric families from the state database and the config (no Prefect, no HTTP).

    collector = StateCollector(config, store_url)      # registry.register(collector)
    families = collector.collect()                     # read fresh on every scrape

Every scrape reads the database anew with three queries whatever the number of VPGs:
the runtime rows joined to each VPG's newest sample, the newest test result per VPG,
and the open alerts. Values are those `vmrep status --json` and the monitor use:

    actual RPO          scrape time - vpg_runtime.last_checkpoint_at (set at every
                        checkpoint; `vmrep status` reads the same time from the journal)
    status              vpg_runtime.status, written by the monitor's last pass
    history covered     the newest sample's history_seconds, advanced by the time since
                        that sample (the oldest kept checkpoint only moves at retention,
                        which the next monitor pass sees)
    journal used        the newest sample's journal_bytes (the monitor's journal usage)
    last test           the newest test_results row, as `vmrep status` picks it
    targets, VM count   the config

`vmrep_vpg_bytes_stored_total` is not in the database: it counts the `added_bytes` of
the VPG's checkpoints in the journal (at the exporter's start, those kept; then every
new one), so it only grows and restarts with the exporter, as a counter does.

When the database cannot be read, a scrape yields `vmrep_up 0` and nothing else, and one
line is logged (again only when the reason changes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.engine import make_url

from vmrep.health import ALERT_LEVEL, Status
from vmrep.state.models import Alert, Sample, TestResult, VpgRuntime

if TYPE_CHECKING:
    from vmrep.config import Config
    from vmrep.state import StateStore

log = logging.getLogger(__name__)

# Every status name of vmrep.health.Status: one vmrep_vpg_status series each.
STATUS_NAMES: tuple[str, ...] = tuple(
    v for k, v in vars(Status).items() if not k.startswith("_") and isinstance(v, str)
)

# The promise: metric name -> label names. tests/test_exporter.py checks the output against it.
METRICS: dict[str, tuple[str, ...]] = {
    "vmrep_up": (),
    "vmrep_vpg_actual_rpo_seconds": ("vpg",),
    "vmrep_vpg_rpo_target_seconds": ("vpg",),
    "vmrep_vpg_status": ("vpg", "status"),
    "vmrep_vpg_history_covered_seconds": ("vpg",),
    "vmrep_vpg_history_target_seconds": ("vpg",),
    "vmrep_vpg_history_expected_seconds": ("vpg",),
    "vmrep_vpg_journal_used_bytes": ("vpg",),
    "vmrep_vpg_vm_count": ("vpg",),
    "vmrep_vpg_bytes_stored_total": ("vpg",),
    "vmrep_vpg_last_test_timestamp_seconds": ("vpg",),
    "vmrep_vpg_last_test_success": ("vpg",),
    "vmrep_alerts_open": ("vpg", "level", "code"),
    "vmrep_disk_encrypted_share": ("vpg", "vm", "disk"),
}


def store_url(config: "Config") -> str:
    """The database `Runtime.store` opens for this config, without creating anything."""
    url = config.database_url or os.environ.get("VMREP_DB_URL")
    if url:
        return url
    home = os.environ.get("VMREP_HOME") or (str(config.resolve(config.home)) if config.home else ".vmrep")
    return f"sqlite:///{(Path(home) / 'state.db').resolve()}"


@dataclass(frozen=True)
class VpgRow:
    """What the database says of one VPG (None: no row / no sample / never tested)."""

    runtime: VpgRuntime | None
    sample: Sample | None
    test: TestResult | None


@dataclass(frozen=True)
class Snapshot:
    vpgs: dict[str, VpgRow]
    alerts: list[Alert]


def read_snapshot(store: "StateStore") -> Snapshot:
    """Three queries in one read transaction: runtimes with their newest sample, the
    newest test per VPG, the open alerts. The newest rows are found with correlated
    subqueries on the (vpg, at) / vpg indexes, so the cost does not grow with history."""
    newest_sample = (
        select(Sample.id).where(Sample.vpg == VpgRuntime.vpg)
        .order_by(Sample.at.desc(), Sample.id.desc()).limit(1)
        .correlate(VpgRuntime).scalar_subquery()
    )
    # The same order as StateStore.test_results, which `vmrep status` takes the first of.
    newest_test = (
        select(TestResult.id).where(TestResult.vpg == VpgRuntime.vpg)
        .order_by(TestResult.started_at.desc(), TestResult.id.desc()).limit(1)
        .correlate(VpgRuntime).scalar_subquery()
    )
    with store.session(readonly=True) as s:
        rows = s.execute(select(VpgRuntime, Sample).outerjoin(Sample, Sample.id == newest_sample)).all()
        tests = {t.vpg: t for t in s.scalars(select(TestResult).join(VpgRuntime, TestResult.id == newest_test))}
        alerts = list(s.scalars(select(Alert).where(Alert.cleared_at.is_(None)).order_by(Alert.id)))
    vpgs = {rt.vpg: VpgRow(rt, sample, tests.get(rt.vpg)) for rt, sample in rows}
    return Snapshot(vpgs, alerts)


class StoredBytes:
    """The per-VPG counter behind vmrep_vpg_bytes_stored_total: checkpoints seen before
    are not counted again, and those retention removed are forgotten (never subtracted)."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}
        self._total: dict[str, int] = {}

    def update(self, vpg: str, checkpoints: Iterable[Any]) -> int:
        seen = self._seen.get(vpg, set())
        kept = {c.id: int(c.added_bytes) for c in checkpoints}
        self._total[vpg] = self._total.get(vpg, 0) + sum(b for i, b in kept.items() if i not in seen)
        self._seen[vpg] = set(kept)
        return self._total[vpg]


def _age(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else (now - then).total_seconds()


def families(config: "Config", snap: Snapshot, now: datetime,
             stored_bytes: dict[str, int] | None = None,
             encrypted_share: dict[tuple[str, str, str], float] | None = None) -> list[Metric]:
    """The metric families for the configured VPGs as of `now` (alerts: every VPG with one
    open). A value the database does not have yet (no checkpoint, no sample, never tested)
    is left out rather than reported as 0."""
    g: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        name: GaugeMetricFamily(name, HELP[name], labels=list(labels)) for name, labels in METRICS.items()
        if name != "vmrep_up"}
    # A counter family is named without _total; the exposition adds it to the sample.
    stored = g["vmrep_vpg_bytes_stored_total"] = CounterMetricFamily(
        "vmrep_vpg_bytes_stored", HELP["vmrep_vpg_bytes_stored_total"], labels=["vpg"])
    open_count: dict[tuple[str, str, str], int] = {}
    for a in snap.alerts:
        open_count[(a.vpg, a.level, a.code)] = open_count.get((a.vpg, a.level, a.code), 0) + 1

    for v in config.vpgs:
        row = snap.vpgs.get(v.name, VpgRow(None, None, None))
        rt, sample, test = row.runtime, row.sample, row.test

        rpo = _age(now, rt.last_checkpoint_at if rt else None)
        if rpo is None and sample is not None and sample.rpo_seconds is not None:
            # Checkpoints the runtime row never heard of (an older database): the monitor saw them.
            rpo = sample.rpo_seconds + (now - sample.at).total_seconds()
        if rpo is not None:
            g["vmrep_vpg_actual_rpo_seconds"].add_metric([v.name], rpo)
        g["vmrep_vpg_rpo_target_seconds"].add_metric([v.name], v.rpo_target_seconds)

        # A VPG without a runtime row is what `vmrep status` shows as Initializing.
        current = rt.status if rt else Status.INITIALIZING
        for name in STATUS_NAMES + (() if current in STATUS_NAMES else (current,)):
            g["vmrep_vpg_status"].add_metric([v.name, name], 1.0 if name == current else 0.0)

        covered = None
        if sample is not None and sample.history_seconds is not None:
            covered = sample.history_seconds + (now - sample.at).total_seconds()
            g["vmrep_vpg_history_covered_seconds"].add_metric([v.name], covered)
        g["vmrep_vpg_history_target_seconds"].add_metric([v.name], v.history_seconds)
        # health.evaluate judges history against min(window, time since the first checkpoint).
        start = rt.first_checkpoint_at if rt else None
        since_start = _age(now, start) if start else covered
        if since_start is not None:
            g["vmrep_vpg_history_expected_seconds"].add_metric([v.name], min(v.history_seconds, max(since_start, 0.0)))

        if sample is not None and sample.journal_bytes is not None:
            g["vmrep_vpg_journal_used_bytes"].add_metric([v.name], sample.journal_bytes)
        g["vmrep_vpg_vm_count"].add_metric([v.name], len(v.vms))
        if stored_bytes is not None and v.name in stored_bytes:
            stored.add_metric([v.name], stored_bytes[v.name])
        if test is not None:
            g["vmrep_vpg_last_test_timestamp_seconds"].add_metric([v.name], test.started_at.timestamp())
            g["vmrep_vpg_last_test_success"].add_metric([v.name], 1.0 if test.success else 0.0)

        # Zero series for the monitor's own codes, so that a panel or rule sees 0, not no data.
        for code, level in ALERT_LEVEL.items():
            open_count.setdefault((v.name, level, code), 0)

    for (vpg, level, code), n in sorted(open_count.items()):
        g["vmrep_alerts_open"].add_metric([vpg, level, code], n)
    for (vpg, vm, disk), share in sorted((encrypted_share or {}).items()):
        g["vmrep_disk_encrypted_share"].add_metric([vpg, vm, disk], share)
    return list(g.values())


def up(value: bool) -> GaugeMetricFamily:
    return GaugeMetricFamily("vmrep_up", HELP["vmrep_up"], value=1.0 if value else 0.0)


class StateCollector(Collector):
    """A prometheus_client collector over the state database; `journal` (optional) feeds
    vmrep_vpg_bytes_stored_total. The engine is made once and kept; nothing is created
    or migrated (a SQLite file that is not there is reported, not made)."""

    def __init__(self, config: "Config", url: str | None = None, journal: Any = None) -> None:
        self.config = config
        self.url = url or store_url(config)
        self.journal = journal
        self._store: "StateStore | None" = None
        self._stored = StoredBytes()
        self._last_error: str | None = None

    def _open(self) -> "StateStore":
        u = make_url(self.url)
        if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
            if not Path(u.database).is_file():
                raise FileNotFoundError(f"no file {u.database}")
        if self._store is None:
            from vmrep.state import StateStore

            self._store = StateStore.open(self.url, migrate_schema=False)
        return self._store

    def _stored_bytes(self) -> dict[str, int] | None:
        if self.journal is None:
            return None
        out = {}
        for v in self.config.vpgs:
            try:
                out[v.name] = self._stored.update(v.name, self.journal.checkpoints(v.name))
            except Exception as exc:  # the journal is optional to the exporter: the rest still answers
                self._note(f"journal {getattr(self.journal, 'root', '')}, VPG {v.name}: {exc}")
        return out

    def _encrypted_share(self) -> dict[tuple[str, str, str], float] | None:
        """Per disk, the encrypted share of its newest checkpoint with enough changed bytes
        to judge (vmrep.ransomware), read from the journal like the stored bytes."""
        if self.journal is None:
            return None
        from vmrep.ransomware.service import assess_vpg

        out: dict[tuple[str, str, str], float] = {}
        for v in self.config.vpgs:
            try:
                for view in assess_vpg(self.journal, v.name).checkpoints:
                    for p in view.disks:
                        if p.share is not None:
                            out[(v.name, p.vm, p.disk)] = round(p.share, 4)
            except Exception as exc:  # the journal is optional to the exporter: the rest still answers
                self._note(f"journal {getattr(self.journal, 'root', '')}, VPG {v.name}: {exc}")
        return out

    def _note(self, reason: str | None) -> None:
        if reason is not None and reason != self._last_error:
            log.warning("%s", reason)
        elif reason is None and self._last_error is not None:
            log.warning("state database %s readable again", self.safe_url())
        self._last_error = reason

    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def collect(self, now: datetime | None = None) -> Iterator[Metric]:
        now = now or datetime.now(timezone.utc)
        try:
            snap = read_snapshot(self._open())
        except Exception as exc:  # any database failure is a down scrape, said in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._note(f"state database {self.safe_url()} unreadable: {first}")
            yield up(False)
            return
        self._note(None)
        yield up(True)
        yield from families(self.config, snap, now, self._stored_bytes(), self._encrypted_share())

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


HELP: dict[str, str] = {
    "vmrep_up": "1 when the state database could be read for this scrape, else 0 (and nothing else is reported)",
    "vmrep_vpg_actual_rpo_seconds": "Scrape time minus the VPG's newest checkpoint (vpg_runtime.last_checkpoint_at, "
                                    "as vmrep status); absent before the first checkpoint",
    "vmrep_vpg_rpo_target_seconds": "rpo_target_seconds of the VPG, from the config",
    "vmrep_vpg_status": "1 for the VPG's current status (vpg_runtime.status, set by the monitor), 0 for the others",
    "vmrep_vpg_history_covered_seconds": "Journal history covered: the monitor's last sample (samples.history_seconds) "
                                         "plus the time since that sample",
    "vmrep_vpg_history_target_seconds": "Configured journal history (journal_history_hours), from the config",
    "vmrep_vpg_history_expected_seconds": "History the monitor judges against: the configured window, or the time "
                                          "since the first checkpoint (vpg_runtime) for a younger VPG",
    "vmrep_vpg_journal_used_bytes": "Stored bytes the VPG's kept checkpoints reference, from the monitor's last sample "
                                    "(samples.journal_bytes)",
    "vmrep_vpg_vm_count": "VMs in the VPG, from the config",
    "vmrep_vpg_bytes_stored_total": "Bytes replication stored in the journal for the VPG (added_bytes of its "
                                    "checkpoints, read from the journal, not the database); restarts with the exporter",
    "vmrep_vpg_last_test_timestamp_seconds": "Start of the newest DR test (test_results.started_at), Unix time",
    "vmrep_vpg_last_test_success": "1 if the newest DR test (test_results.success) passed, else 0",
    "vmrep_alerts_open": "Open alerts (alerts with cleared_at null) per VPG, level and code; 0 for the monitor's "
                         "codes that are not open",
    "vmrep_disk_encrypted_share": "Share of the disk's changed bytes that looked encrypted in its newest checkpoint "
                                  "with enough change to judge (docs/ransomware.md), read from the journal",
}
