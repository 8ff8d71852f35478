"""A state database with a month of history for the report and mail tests (no tests here).

Everything is written through the StateStore API (operations, steps, test results,
alerts), except the month of RPO samples, which go in with one SQLAlchemy Core insert
into the store's own `samples` table (1,000+ rows one session each would cost seconds).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from vmrep.config import parse_config
from vmrep.state import StateStore
from vmrep.state.models import Sample

EVIL_VM = "<b>evil</b><script>x</script>"
SINCE = datetime(2025, 10, 1, tzinfo=UTC)
UNTIL = datetime(2025, 11, 1, tzinfo=UTC)
NOW = datetime(2025, 11, 2, 12, 0, tzinfo=UTC)
SAMPLE_EVERY = timedelta(hours=1)


def make_config(smtp_port: int = 25, **notifications):
    notif = {
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "sender": "vmrep@dr.example.com",
        "default_to": ["dr-audit@example.com"],
    }
    notif.update(notifications)
    return parse_config(
        {
            "sites": {
                "prod": {"host": "vc-prod.example.com", "password": "env:VMREP_TEST_VC_PW"},
                "dr": {"host": "vc-dr.example.com", "password": "env:VMREP_TEST_VC_PW"},
            },
            "notifications": notif,
            "vpgs": [
                {
                    "name": "erp",
                    "protected_site": "prod",
                    "recovery_site": "dr",
                    "vms": [{"name": "erp-db"}, {"name": "erp-app"}, {"name": EVIL_VM}],
                    "rpo_target_seconds": 300,
                    "journal_history_hours": 24,
                    "test_interval_months": 3,
                    "email_to": ["erp-owner@example.com"],
                },
                {
                    "name": "crm",
                    "protected_site": "prod",
                    "recovery_site": "dr",
                    "vms": [{"name": "crm-web"}, {"name": "crm-db"}],
                    "rpo_target_seconds": 120,
                    "journal_history_hours": 12,
                    "test_interval_months": 6,
                    "email_to": ["crm-owner@example.com"],
                },
                {
                    "name": "hr",
                    "protected_site": "prod",
                    "recovery_site": "prod",
                    "vms": [{"name": "hr-app"}],
                    "rpo_target_seconds": 600,
                    "test_interval_months": 1,
                },
            ],
        }
    )


def _steps(store: StateStore, op: str, t0: datetime, vms: list[str], plan: dict) -> datetime:
    """Record VPG-wide and per-VM steps; plan maps (vm, step) -> (result, error, detail)."""
    t = t0
    store.record_step(op, None, "select_checkpoint", "ok", started_at=t, ended_at=t + timedelta(seconds=2),
                      detail={"checkpoint": "cp-0042"})
    t += timedelta(seconds=2)
    store.record_step(op, None, "pre_script", "ok", started_at=t, ended_at=t + timedelta(seconds=8))
    t += timedelta(seconds=8)
    end = t
    for i, vm in enumerate(vms):
        tv = t + timedelta(seconds=5 * i)
        for step, secs in (("write_disks", 240 + 30 * i), ("create_vm", 12), ("power_on", 45), ("verify", 90)):
            result, error, detail = plan.get((vm, step), ("ok", None, None))
            if step == "verify" and detail is None:
                detail = {"blocks_checked": 4096, "mismatched": 0 if result == "ok" else 17}
            store.record_step(op, vm, step, result, started_at=tv, ended_at=tv + timedelta(seconds=secs),
                              error=error, detail=detail)
            tv += timedelta(seconds=secs)
        end = max(end, tv)
    store.record_step(op, None, "cleanup", plan.get((None, "cleanup"), ("ok", None, None))[0],
                      started_at=end + timedelta(seconds=600), ended_at=end + timedelta(seconds=660),
                      error=plan.get((None, "cleanup"), ("ok", None, None))[1])
    return end + timedelta(seconds=660)


def populate(store: StateStore) -> dict:
    """Three VPGs over October 2025: erp compliant, crm at risk, hr not compliant."""
    ids: dict = {}

    # ---- samples, hourly
    rows = []
    start = SINCE - timedelta(days=2)
    n = int((UNTIL - start) / SAMPLE_EVERY)
    for k in range(n + 1):
        at = start + k * SAMPLE_EVERY
        # erp: 30..90 s, with 3 spikes over its 300 s target (99.6 % met)
        rpo = 30 + 60 * (0.5 + 0.5 * math.sin(k / 7))
        if k in (200, 201, 450):
            rpo = 420 + k % 7
        rows.append(dict(vpg="erp", at=at, rpo_seconds=rpo, rpo_target_seconds=300.0,
                         history_seconds=86400.0 + 60, history_target_seconds=86400.0,
                         journal_bytes=40 * 2**30, journal_limit_bytes=150 * 2**30, status="MeetingSLA"))
        # crm: every 40th sample over its 120 s target (97.5 % met), history short 60 h
        rpo = 200.0 if k % 40 == 0 else 45.0 + (k % 5)
        hist = 20000.0 if 100 <= k < 160 else 43200.0
        rows.append(dict(vpg="crm", at=at, rpo_seconds=rpo, rpo_target_seconds=120.0,
                         history_seconds=hist, history_target_seconds=43200.0,
                         journal_bytes=10 * 2**30, journal_limit_bytes=150 * 2**30, status="MeetingSLA"))
        # hr: fine RPO; before its first checkpoint for the first 3 samples
        rows.append(dict(vpg="hr", at=at, rpo_seconds=None if k < 3 else 100.0, rpo_target_seconds=600.0,
                         history_seconds=86400.0, history_target_seconds=86400.0,
                         journal_bytes=2**30, journal_limit_bytes=150 * 2**30, status="MeetingSLA"))
    with store.engine.begin() as conn:
        conn.execute(sa.insert(Sample.__table__), rows)
    ids["samples"] = len(rows)

    # ---- erp: an old passed test (July) and the October test that passed
    t_old = datetime(2025, 7, 10, 9, 0, tzinfo=UTC)
    op = store.start_operation("erp", "test", "bob", params={"checkpoint": "latest"}, started_at=t_old)
    end = _steps(store, op, t_old, ["erp-db", "erp-app"], {})
    store.finish_operation(op, "succeeded", ended_at=end, checkpoint_id="cp-0001",
                           checkpoint_time=t_old - timedelta(seconds=50), checkpoint_age_seconds=50.0,
                           rto_seconds=400.0)
    store.add_test_result(op, "erp", started_at=t_old, ended_at=end, success=True, verification_ok=True,
                          cleanup_ok=True, tested_by="bob", checkpoint_id="cp-0001")
    ids["erp_old_test"] = op

    t1 = datetime(2025, 10, 20, 10, 0, tzinfo=UTC)
    op = store.start_operation("erp", "test", "alice@example.com", params={"checkpoint": "latest", "keep_minutes": 10},
                               flow_run_id="7d1c3a52-0000-4000-8000-000000000001", started_at=t1)
    end = _steps(store, op, t1, ["erp-db", "erp-app", EVIL_VM], {})
    store.raise_alert("erp", "test_running", "warning", "VPG erp: a DR test is running", at=t1 + timedelta(seconds=1))
    store.finish_operation(op, "succeeded", ended_at=end, checkpoint_id="cp-0042",
                           checkpoint_time=t1 - timedelta(seconds=42), checkpoint_age_seconds=42.0,
                           rto_seconds=612.0, rto_target_seconds=900.0,
                           notes="Recovered into test-net <isolated>.")
    store.add_test_result(op, "erp", started_at=t1, ended_at=end, success=True, verification_ok=True,
                          cleanup_ok=True, checkpoint_id="cp-0042", checkpoint_time=t1 - timedelta(seconds=42),
                          tested_by="alice@example.com",
                          notes="All applications answered.\nLogin page <i>OK</i> & orders visible.")
    ids["erp_test"] = op

    # ---- crm: a passed test in September, an RPO alert in October
    t2 = datetime(2025, 9, 15, 14, 0, tzinfo=UTC)
    op = store.start_operation("crm", "test", "carol", started_at=t2)
    end = _steps(store, op, t2, ["crm-web", "crm-db"], {})
    store.finish_operation(op, "succeeded", ended_at=end, checkpoint_id="cp-0900",
                           checkpoint_time=t2 - timedelta(seconds=30), checkpoint_age_seconds=30.0,
                           rto_seconds=480.0, rto_target_seconds=600.0)
    store.add_test_result(op, "crm", started_at=t2, ended_at=end, success=True, verification_ok=True,
                          cleanup_ok=True, tested_by="carol")
    ids["crm_test"] = op
    a = store.raise_alert("crm", "rpo_over_target", "warning", "RPO 200 s over target 120 s",
                          at=datetime(2025, 10, 5, 0, 0, tzinfo=UTC))
    store.clear_alert(a.id, at=datetime(2025, 10, 5, 1, 0, tzinfo=UTC))
    # an alert entirely before the period: not reported
    a = store.raise_alert("crm", "rpo_over_target", "error", "old", at=datetime(2025, 9, 1, tzinfo=UTC))
    store.clear_alert(a.id, at=datetime(2025, 9, 2, tzinfo=UTC))

    # ---- hr: a failed DR test in October (verification failed on hr-app), and a move
    t3 = datetime(2025, 10, 8, 8, 0, tzinfo=UTC)
    op = store.start_operation("hr", "test", "dave", started_at=t3)
    end = _steps(store, op, t3, ["hr-app"],
                 {("hr-app", "verify"): ("failed", "disk 0: 17 blocks differ from the checkpoint", None)})
    store.finish_operation(op, "failed", error="verification failed for 1 VM", ended_at=end,
                           checkpoint_id="cp-0300", checkpoint_time=t3 - timedelta(seconds=700),
                           checkpoint_age_seconds=700.0, rto_seconds=1500.0, rto_target_seconds=900.0)
    store.add_test_result(op, "hr", started_at=t3, ended_at=end, success=False, verification_ok=False,
                          cleanup_ok=True, tested_by="dave", notes="hr-app data mismatch")
    ids["hr_test"] = op
    t4 = datetime(2025, 10, 25, 22, 0, tzinfo=UTC)
    op = store.start_operation("hr", "move", "erin", started_at=t4)
    store.finish_operation(op, "succeeded", ended_at=t4 + timedelta(minutes=14), checkpoint_id="cp-0500",
                           checkpoint_age_seconds=3.0, rto_seconds=840.0)
    ids["hr_move"] = op
    store.raise_alert("hr", "awaiting_commit", "error", "VPG hr: move awaiting commit",
                      at=t4 + timedelta(minutes=14))
    return ids
