"""`vmrep exporter`: the metric promise, values equal to the database's, the rule file, the
dashboard, and Debian's real Prometheus scraping the exporter and evaluating the rules.

The state database is filled the way a monitor pass fills it (checkpoint times, a test
result, then `health.evaluate` + `apply_transitions` + `add_sample`), minus vSphere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml

from vmrep.config import Config, load_config
from vmrep.health import Status, apply_transitions, evaluate, gather_facts
from vmrep.metrics import StateCollector
from vmrep.runtime import Runtime
from vmrep.state import StateStore

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "ops" / "prometheus" / "vmrep-rules.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "vmrep.json"
GiB = 1024**3

# The promise of issue 15, written out here (not imported) so that a rename fails.
PROMISE: dict[str, set[str]] = {
    "vmrep_vpg_actual_rpo_seconds": {"vpg"},
    "vmrep_vpg_rpo_target_seconds": {"vpg"},
    "vmrep_vpg_status": {"vpg", "status"},
    "vmrep_vpg_history_covered_seconds": {"vpg"},
    "vmrep_vpg_history_target_seconds": {"vpg"},
    "vmrep_vpg_journal_used_bytes": {"vpg"},
    "vmrep_vpg_vm_count": {"vpg"},
    "vmrep_vpg_bytes_stored_total": {"vpg"},
    "vmrep_vpg_last_test_timestamp_seconds": {"vpg"},
    "vmrep_vpg_last_test_success": {"vpg"},
    "vmrep_alerts_open": {"vpg", "level", "code"},
}
# Added beside the promise: whether the scrape read the database, and the history the
# monitor judges against (the rules need it).
EXTRA: dict[str, set[str]] = {"vmrep_up": set(), "vmrep_vpg_history_expected_seconds": {"vpg"}}
STATUS_NAMES = {"Initializing", "MeetingSLA", "NotMeetingSLA", "RpoNotMeetingSLA", "HistoryNotMeetingSLA",
                "FailingOver", "Moving", "Deleting", "Recovered", "Paused", "Error"}

# erp: healthy (RPO 20 s, the whole 24 h of history), a passed test, journal near its
# 1 GiB limit (JOURNAL_NEAR_LIMIT open). crm: RPO 700 s over twice its 300 s target,
# 80 % of its history (HISTORY_UNDER_85).
RPO_AGO = {"erp": 20.0, "crm": 700.0}
HISTORY_COVERED = {"erp": 24 * 3600.0, "crm": 0.8 * 24 * 3600.0}


BS = 4096


def write_config(tmp: Path, db: Path) -> Path:
    vms = lambda *names: [{"name": n} for n in names]  # noqa: E731
    data = {
        "sites": {"a": {"host": "127.0.0.1:1", "password": "env:VMREP_TEST_PW"},
                  "b": {"host": "127.0.0.1:2", "password": "env:VMREP_TEST_PW"}},
        "journal": {"path": str(tmp / "journal"), "block_size": BS},
        "database_url": f"sqlite:///{db}",
        "vpgs": [
            # a hard limit of ~10 KiB, so that the few blocks below make JOURNAL_NEAR_LIMIT
            {"name": "erp", "protected_site": "a", "recovery_site": "b", "vms": vms("erp-db", "erp-app"),
             "rpo_target_seconds": 300, "journal_history_hours": 24, "journal_hard_limit_gb": 1e-5},
            {"name": "crm", "protected_site": "a", "recovery_site": "b", "vms": vms("crm-db"),
             "rpo_target_seconds": 300, "journal_history_hours": 24},
        ],
    }
    path = tmp / "vmrep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def replicate(rt: Runtime, now: datetime) -> None:
    """Two real checkpoints per VPG in the journal (the oldest kept and the newest), noted
    in the state as the replication engine notes them; the first ever was 90 days ago."""
    for v in rt.config.vpgs:
        rt.store.note_checkpoint(v.name, now - timedelta(days=90))  # pruned since
        for ago, blocks in ((HISTORY_COVERED[v.name], 3), (RPO_AGO[v.name], 1)):
            with rt.journal.begin(v.name) as w:
                w.set_disk_size(v.vms[0].name, "scsi0:0", 4 * BS)
                for i in range(blocks):
                    w.put_block(v.vms[0].name, "scsi0:0", i, os.urandom(BS))
                cp = w.commit(time=now - timedelta(seconds=ago))
            rt.store.note_checkpoint(v.name, cp.time)
        rt.store.update_runtime(v.name, initial_sync_done=True)


def monitor_pass(rt: Runtime, now: datetime) -> dict[str, Any]:
    """What vmrep.monitor.monitor_pass records for each VPG (its journal facts, then
    evaluate, transitions, sample), without the vSphere findings (all VMs fine)."""
    out = {}
    for v in rt.config.vpgs:
        cps = rt.journal.checkpoints(v.name)
        facts = dict(newest_checkpoint_at=cps[-1].time, oldest_checkpoint_at=cps[0].time,
                     journal_bytes=rt.journal.usage(v.name).total_bytes)
        ev = evaluate(v, gather_facts(rt.store, v.name, now, **facts))
        apply_transitions(rt.store, v.name, ev, now)
        rt.store.add_sample(v.name, **ev.sample())
        out[v.name] = ev
    return out


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[tuple[Config, StateStore, dict[str, Any], datetime]]:
    db = tmp_path / "state.db"
    rt = Runtime(load_config(write_config(tmp_path, db)))
    now = datetime.now(timezone.utc)
    replicate(rt, now)
    rt.store.add_test_result(None, "erp", started_at=now - timedelta(days=10), success=True,
                             ended_at=now - timedelta(days=10) + timedelta(minutes=5))
    evs = monitor_pass(rt, now)
    assert evs["erp"].status == Status.MEETING_SLA and evs["erp"].codes == {"JOURNAL_NEAR_LIMIT"}
    assert evs["crm"].status == Status.NOT_MEETING_SLA
    assert evs["crm"].codes == {"RPO_OVER_2X_TARGET", "HISTORY_UNDER_85"}
    try:
        yield rt.config, rt.store, evs, now
    finally:
        rt.store.close()


def collector_for(cfg: Config, store: StateStore) -> StateCollector:
    from vmrep.journal import Journal

    return StateCollector(cfg, store.url, journal=Journal.open(cfg.journal_path, block_size=BS, create=False))


def samples(collector: StateCollector, now: datetime) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for fam in collector.collect(now):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(found: dict[str, list[Any]], name: str, **labels: str) -> float:
    hits = [s.value for s in found[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, found.get(name))
    return hits[0]


# --- in-process ----------------------------------------------------------------------


def test_metric_names_and_labels_are_the_promise(filled) -> None:
    cfg, store, _, now = filled
    found = samples(collector_for(cfg, store), now)
    assert {n: {k for s in ss for k in s.labels} for n, ss in found.items()} == {**PROMISE, **EXTRA}
    assert {s.labels["status"] for s in found["vmrep_vpg_status"] if s.labels["vpg"] == "erp"} == STATUS_NAMES
    # every per-VPG metric is there for both VPGs
    for name in set(PROMISE) - {"vmrep_alerts_open", "vmrep_vpg_bytes_stored_total",
                                "vmrep_vpg_last_test_timestamp_seconds", "vmrep_vpg_last_test_success"}:
        assert {s.labels["vpg"] for s in found[name]} == {"erp", "crm"}, name


def test_values_are_what_the_database_and_vmrep_status_say(filled, tmp_path: Path) -> None:
    cfg, store, evs, now = filled
    later = now + timedelta(seconds=30)  # a scrape some time after the monitor's pass
    found = samples(collector_for(cfg, store), later)
    assert value(found, "vmrep_up") == 1
    for name in ("erp", "crm"):
        rt = store.runtime(name)
        assert value(found, "vmrep_vpg_actual_rpo_seconds", vpg=name) == pytest.approx(
            (later - rt.last_checkpoint_at).total_seconds())
        assert value(found, "vmrep_vpg_actual_rpo_seconds", vpg=name) == pytest.approx(RPO_AGO[name] + 30)
        assert value(found, "vmrep_vpg_rpo_target_seconds", vpg=name) == 300
        assert value(found, "vmrep_vpg_history_covered_seconds", vpg=name) == pytest.approx(HISTORY_COVERED[name] + 30)
        assert value(found, "vmrep_vpg_history_target_seconds", vpg=name) == 24 * 3600
        assert value(found, "vmrep_vpg_history_expected_seconds", vpg=name) == evs[name].history_target_seconds
        assert value(found, "vmrep_vpg_journal_used_bytes", vpg=name) == evs[name].journal_bytes
        on = [s.labels["status"] for s in found["vmrep_vpg_status"] if s.labels["vpg"] == name and s.value == 1]
        assert on == [evs[name].status] == [rt.status]
    assert value(found, "vmrep_vpg_vm_count", vpg="erp") == 2
    from vmrep.journal import Journal

    journal = Journal.open(cfg.journal_path, block_size=BS, create=False)
    for name in ("erp", "crm"):
        added = sum(c.added_bytes for c in journal.checkpoints(name))
        assert added >= 4 * BS  # four random blocks, stored raw (they do not compress)
        assert value(found, "vmrep_vpg_bytes_stored_total", vpg=name) == added
    test = store.test_results("erp")[0]
    assert value(found, "vmrep_vpg_last_test_timestamp_seconds", vpg="erp") == test.started_at.timestamp()
    assert value(found, "vmrep_vpg_last_test_success", vpg="erp") == 1
    assert "crm" not in {s.labels["vpg"] for s in found["vmrep_vpg_last_test_success"]}  # never tested
    open_ = {(s.labels["vpg"], s.labels["level"], s.labels["code"]) for s in found["vmrep_alerts_open"] if s.value}
    assert open_ == {(a.vpg, a.level, a.code) for a in store.open_alerts()} == {
        ("erp", "warning", "JOURNAL_NEAR_LIMIT"), ("crm", "error", "RPO_OVER_2X_TARGET"),
        ("crm", "warning", "HISTORY_UNDER_85")}
    assert value(found, "vmrep_alerts_open", vpg="erp", code="RPO_OVER_TARGET") == 0  # zero, not absent

    # `vmrep status --json` (its row builder, reading the same journal and database) agrees
    from vmrep.cli.monitor import status_rows

    for row in status_rows(Runtime(cfg), later):
        v = row["vpg"]
        assert value(found, "vmrep_vpg_actual_rpo_seconds", vpg=v) == pytest.approx(row["rpo_seconds"], abs=0.1)
        assert value(found, "vmrep_vpg_history_covered_seconds", vpg=v) == pytest.approx(
            row["history_seconds"], abs=0.1)
        assert value(found, "vmrep_vpg_history_target_seconds", vpg=v) == row["history_target_seconds"]
        assert value(found, "vmrep_vpg_rpo_target_seconds", vpg=v) == row["rpo_target_seconds"]
        on = [s.labels["status"] for s in found["vmrep_vpg_status"] if s.labels["vpg"] == v and s.value]
        assert on == [row["status"]]
        if row["last_test_success"] is not None:
            assert value(found, "vmrep_vpg_last_test_success", vpg=v) == float(row["last_test_success"])
        assert {a["code"] for a in row["alerts"]} == {s.labels["code"] for s in found["vmrep_alerts_open"]
                                                      if s.labels["vpg"] == v and s.value}


def test_bytes_stored_counter_only_grows() -> None:
    from vmrep.metrics import StoredBytes

    class Cp:
        def __init__(self, id: str, n: int) -> None:
            self.id, self.added_bytes = id, n

    c = StoredBytes()
    assert c.update("erp", [Cp("a", 100), Cp("b", 10)]) == 110
    assert c.update("erp", [Cp("a", 100), Cp("b", 10)]) == 110  # nothing new
    assert c.update("erp", [Cp("b", 10), Cp("c", 5)]) == 115  # "a" retained away: not subtracted
    assert c.update("crm", []) == 0


def test_missing_or_unreadable_database_is_vmrep_up_0_and_one_line(tmp_path: Path, caplog) -> None:
    cfg = load_config(write_config(tmp_path, tmp_path / "nothing-here.db"))
    collector = StateCollector(cfg)
    caplog.set_level(logging.WARNING, logger="vmrep.metrics")
    for _ in range(3):
        fams = list(collector.collect())
        assert [(f.name, [s.value for s in f.samples]) for f in fams] == [("vmrep_up", [0.0])]
    assert not (tmp_path / "nothing-here.db").exists()  # not created by looking
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "nothing-here.db" in lines[0] and "\n" not in lines[0]
    assert not any(r.exc_info for r in caplog.records)

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    caplog.clear()
    fams = list(StateCollector(cfg, f"sqlite:///{garbage}").collect())
    assert [(f.name, [s.value for s in f.samples]) for f in fams] == [("vmrep_up", [0.0])]
    assert len(caplog.records) == 1 and "garbage.db" in caplog.records[0].getMessage()


@pytest.mark.parametrize("listen", ["nope", "127.0.0.1:99999", "127.0.0.1:", ":9496", "1:2:3:9496", "[zz]:1"])
def test_bad_listen_is_one_line_and_exit_2(listen: str, capsys) -> None:
    from vmrep.cli import main

    assert main(["exporter", "--listen", listen]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and listen in err[0] and err[0].startswith("error: --listen"), err


def test_listen_address_in_use_is_one_line_and_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    from vmrep.cli import main

    monkeypatch.setenv("VMREP_TEST_PW", "unused")
    path = write_config(tmp_path, tmp_path / "state.db")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        assert main(["exporter", "--listen", where, "--config", str(path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and where in err[0] and "cannot listen" in err[0], err


def test_rule_file_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make deps` installs Debian's prometheus package"
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bvmrep_[a-z0-9_]+\b", expr))


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dash = json.loads(DASHBOARD.read_text())
    known = set(PROMISE) | set(EXTRA)
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in dash["panels"]}
    used = set().union(*(metric_names(e) for es in exprs.values() for e in es))
    used |= metric_names(json.dumps(dash["templating"]))
    assert used and used <= known, used - known
    joined = {title: " ".join(es) for title, es in exprs.items()}

    def panel_with(*names: str) -> bool:
        return any(all(n in e for n in names) for e in joined.values())

    assert panel_with("vmrep_vpg_actual_rpo_seconds", "vmrep_vpg_rpo_target_seconds")
    assert panel_with("vmrep_vpg_status")
    assert panel_with("vmrep_vpg_history_covered_seconds", "vmrep_vpg_history_target_seconds")
    assert panel_with("vmrep_vpg_journal_used_bytes")
    assert panel_with("vmrep_alerts_open")
    rules = yaml.safe_load(RULES.read_text())
    rule_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert set().union(*map(metric_names, rule_exprs)) <= known


# --- a real Prometheus ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (requests.RequestException, KeyError, IndexError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_the_exporter_and_evaluates_the_rules(filled, tmp_path: Path) -> None:
    cfg, store, evs, _ = filled
    prom_bin = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(prom_bin).exists(), "prometheus missing: `make deps` installs Debian's prometheus package"
    exp_port, prom_port = free_port(), free_port()
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "vmrep", "static_configs": [{"targets": [f"127.0.0.1:{exp_port}"]}]}],
    }))
    env = {**os.environ, "VMREP_TEST_PW": "unused"}
    exporter = prom = None
    t0 = time.monotonic()
    try:
        exporter = subprocess.Popen(
            [str(Path(sys.executable).with_name("vmrep")), "exporter", "--listen", f"127.0.0.1:{exp_port}",
             "--config", str(cfg.source)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        text = wait_for("the exporter", lambda: requests.get(f"http://127.0.0.1:{exp_port}/metrics", timeout=2).text)
        assert 'vmrep_up 1.0' in text
        prom = subprocess.Popen(
            [prom_bin, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def query(q: str) -> list[dict[str, Any]]:
            r = requests.get(f"{api}/query", params={"query": q}, timeout=5).json()
            assert r["status"] == "success", r
            return r["data"]["result"]

        wait_for("a scrape", lambda: query('up{job="vmrep"} == 1') and query('vmrep_vpg_actual_rpo_seconds{vpg="erp"}'))

        # erp's RPO, as the database says it at the scrape's own timestamp
        (rpo,) = query('vmrep_vpg_actual_rpo_seconds{vpg="erp"}')
        (ts,) = query('timestamp(vmrep_vpg_actual_rpo_seconds{vpg="erp"})')
        scraped_at = float(ts["value"][1])
        last_cp = store.runtime("erp").last_checkpoint_at.timestamp()
        assert float(rpo["value"][1]) == pytest.approx(scraped_at - last_cp, abs=0.5)

        (meeting,) = query('vmrep_vpg_status{vpg="erp",status="MeetingSLA"}')
        assert meeting["value"][1] == "1"
        assert query('sum(vmrep_vpg_status{vpg="erp"})')[0]["value"][1] == "1"
        opened = query("vmrep_alerts_open > 0")
        assert {(s["metric"]["vpg"], s["metric"]["level"], s["metric"]["code"]) for s in opened} == {
            (a.vpg, a.level, a.code) for a in store.open_alerts()}
        assert ("erp", "warning", "JOURNAL_NEAR_LIMIT") in {
            (s["metric"]["vpg"], s["metric"]["level"], s["metric"]["code"]) for s in opened}

        # The rules fire exactly the monitor's RPO / history alerts: crm's two, none for erp.
        monitor_codes = {(v, c) for v, ev in evs.items() for c in ev.codes if c.startswith(("RPO_", "HISTORY_"))}

        seen: list[set[tuple[str, str]]] = [set()]

        def firing() -> bool:
            alerts = requests.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
            seen[0] = {(a["labels"]["vpg"], a["labels"]["code"]) for a in alerts if a["state"] == "firing"}
            return seen[0] == monitor_codes

        try:
            wait_for("the rules to fire", firing)
        except AssertionError:
            raise AssertionError(f"rules fire {seen[0]}, the monitor raised {monitor_codes}") from None
        assert monitor_codes == {("crm", "RPO_OVER_2X_TARGET"), ("crm", "HISTORY_UNDER_85")}
    finally:
        stop(prom)
        stop(exporter)
    out = exporter.stdout.read() if exporter and exporter.stdout else ""
    assert "Traceback" not in out, out
    assert exporter.returncode == 0, out  # SIGTERM ends it cleanly
    assert time.monotonic() - t0 < 30
