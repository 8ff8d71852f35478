"""VPG status and alerts: `evaluate` on facts, and the transitions recorded in the store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from vmrep.config import VPG, VMSpec
from vmrep.health import (
    ALERT_CODES,
    DesiredAlert,
    Facts,
    UnprotectedVM,
    add_months,
    apply_transitions,
    evaluate,
    gather_facts,
)
from vmrep.state import StateStore

NOW = datetime(2025, 10, 15, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)
GiB = 1024**3


def vpg(**kw) -> VPG:
    base = dict(
        name="erp",
        protected_site="dc1",
        recovery_site="dc2",
        vms=[VMSpec(name="erp-db"), VMSpec(name="erp-app")],
        rpo_target_seconds=300,
        journal_history_hours=24,
        journal_hard_limit_gb=100,
        journal_warning_percent=75,
        test_interval_months=6,
    )
    base.update(kw)
    return VPG(**base)


def facts(now: datetime = NOW, **kw) -> Facts:
    """A healthy, mature VPG: RPO 10 s, full 24 h of history, tested 10 days ago."""
    base = dict(
        newest_checkpoint_at=now - timedelta(seconds=10),
        oldest_checkpoint_at=now - timedelta(hours=24),
        first_checkpoint_at=now - 90 * DAY,
        created_at=now - 91 * DAY,
        journal_bytes=10 * GiB,
        initial_sync_done=True,
        last_test_at=now - 10 * DAY,
    )
    base.update(kw)
    return Facts(now=now, **base)


def state(cfg: VPG, f: Facts) -> tuple[str, str | None, set[str]]:
    ev = evaluate(cfg, f)
    return ev.status, ev.substatus, ev.codes


@pytest.fixture
def store(db_url: str):
    with StateStore.open(db_url) as s:
        yield s


# --- pure evaluation --------------------------------------------------------------------


def test_healthy_vpg_meets_sla_with_no_alerts() -> None:
    ev = evaluate(vpg(), facts())
    assert (ev.status, ev.substatus, ev.alerts) == ("MeetingSLA", None, ())
    assert ev.rpo_seconds == 10 and ev.history_seconds == 24 * 3600
    assert ev.sample()["journal_limit_bytes"] == 100 * GiB


@pytest.mark.parametrize(
    "rpo, status, codes",
    [
        (300, "MeetingSLA", set()),  # at the target is still meeting it
        (301, "RpoNotMeetingSLA", {"RPO_OVER_TARGET"}),
        (600, "RpoNotMeetingSLA", {"RPO_OVER_TARGET"}),
        (601, "RpoNotMeetingSLA", {"RPO_OVER_2X_TARGET"}),  # only the worse one
    ],
)
def test_rpo_thresholds(rpo: int, status: str, codes: set[str]) -> None:
    f = facts(newest_checkpoint_at=NOW - timedelta(seconds=rpo))
    assert state(vpg(), f) == (status, None, codes)
    levels = {a.code: a.level for a in evaluate(vpg(), f).alerts}
    assert levels == {c: ("error" if "2X" in c else "warning") for c in codes}


@pytest.mark.parametrize(
    "covered_h, status, codes",
    [
        (24, "MeetingSLA", set()),
        (20.5, "MeetingSLA", set()),  # 85.4 %
        (20.3, "HistoryNotMeetingSLA", {"HISTORY_UNDER_85"}),  # 84.6 %
        (18.1, "HistoryNotMeetingSLA", {"HISTORY_UNDER_85"}),  # 75.4 %
        (17.9, "HistoryNotMeetingSLA", {"HISTORY_UNDER_75"}),  # only the worse one
        (2, "HistoryNotMeetingSLA", {"HISTORY_UNDER_75"}),
    ],
)
def test_history_thresholds(covered_h: float, status: str, codes: set[str]) -> None:
    f = facts(oldest_checkpoint_at=NOW - timedelta(hours=covered_h))
    assert state(vpg(), f) == (status, None, codes)


def test_rpo_and_history_both_bad_is_not_meeting_sla() -> None:
    f = facts(
        newest_checkpoint_at=NOW - timedelta(seconds=400),
        oldest_checkpoint_at=NOW - timedelta(hours=12),
    )
    ev = evaluate(vpg(), f)
    assert (ev.status, ev.codes) == ("NotMeetingSLA", {"RPO_OVER_TARGET", "HISTORY_UNDER_75"})
    assert "RPO 400 s is over the target 300 s" in ev.detail


def test_young_vpg_is_judged_against_the_history_it_could_have() -> None:
    first = NOW - timedelta(hours=2)  # a 2 h old VPG with a 24 h window
    young = facts(first_checkpoint_at=first, oldest_checkpoint_at=first, created_at=first)
    assert state(vpg(), young) == ("MeetingSLA", None, set())
    lost = facts(first_checkpoint_at=first, oldest_checkpoint_at=NOW - timedelta(hours=1))
    assert state(vpg(), lost) == ("HistoryNotMeetingSLA", None, {"HISTORY_UNDER_75"})
    # once it has existed for the whole window, the full window is expected
    first = NOW - timedelta(hours=30)
    assert state(vpg(), facts(first_checkpoint_at=first, oldest_checkpoint_at=first))[0] == "MeetingSLA"
    mature = facts(first_checkpoint_at=first, oldest_checkpoint_at=NOW - timedelta(hours=12))
    assert state(vpg(), mature)[2] == {"HISTORY_UNDER_75"}


def test_test_overdue() -> None:
    cfg = vpg(test_interval_months=6)
    assert "TEST_OVERDUE" not in state(cfg, facts(last_test_at=NOW - 150 * DAY))[2]
    overdue = evaluate(cfg, facts(last_test_at=datetime(2025, 4, 14, 12, tzinfo=timezone.utc)))
    assert overdue.codes == {"TEST_OVERDUE"} and overdue.status == "MeetingSLA"
    assert "overdue since 2025-10-14" in overdue.alerts[0].text
    assert overdue.alerts[0].level == "warning"
    # never tested: the clock starts at the first checkpoint
    never = facts(last_test_at=None, first_checkpoint_at=NOW - 200 * DAY)
    assert state(cfg, never)[2] == {"TEST_OVERDUE"}
    assert "never tested" in evaluate(cfg, never).alerts[0].text
    assert state(cfg, facts(last_test_at=None, first_checkpoint_at=NOW - 30 * DAY))[2] == set()
    # ... or, before any checkpoint, at the VPG's creation
    created = facts(last_test_at=None, first_checkpoint_at=None, created_at=NOW - 200 * DAY)
    assert state(cfg, created)[2] == {"TEST_OVERDUE"}
    assert state(vpg(test_interval_months="off"), never)[2] == set()
    assert state(vpg(test_interval_months=12), never)[2] == set()
    assert state(vpg(test_interval_months=1), facts(last_test_at=NOW - 32 * DAY))[2] == {"TEST_OVERDUE"}


def test_add_months_clamps_to_month_end() -> None:
    t = datetime(2025, 8, 31, 9, 30, tzinfo=timezone.utc)
    assert add_months(t, 6) == datetime(2026, 2, 28, 9, 30, tzinfo=timezone.utc)
    assert add_months(t, 1) == datetime(2025, 9, 30, 9, 30, tzinfo=timezone.utc)
    assert add_months(t, 12) == datetime(2026, 8, 31, 9, 30, tzinfo=timezone.utc)


def test_vm_deleted_or_gained_a_multi_writer_disk() -> None:
    f = facts(
        unprotected_vms=[
            UnprotectedVM("erp-db", "deleted"),
            UnprotectedVM("erp-app", "multi_writer", "scsi0:1 data.vmdk"),
        ]
    )
    ev = evaluate(vpg(), f)
    assert (ev.status, ev.substatus) == ("Error", "NeedsConfiguration")
    alerts = {a.vm: a for a in ev.alerts}
    assert set(alerts) == {"erp-db", "erp-app"}
    assert {a.code for a in ev.alerts} == {"VM_NOT_PROTECTED"}
    assert all(a.level == "error" for a in ev.alerts)
    assert "deleted" in alerts["erp-db"].text
    assert "multi-writer disk (scsi0:1 data.vmdk)" in alerts["erp-app"].text
    assert alerts["erp-app"].data == {"reason": "multi_writer", "detail": "scsi0:1 data.vmdk"}
    assert "erp-app gained a multi-writer disk" in ev.detail


def test_recovery_network_missing_is_one_alert_per_network() -> None:
    ev = evaluate(vpg(), facts(recovery_networks_missing=["test-net", "prod-net"]))
    assert (ev.status, ev.substatus) == ("Error", "NeedsConfiguration")
    assert sorted((a.code, a.subject) for a in ev.alerts) == [
        ("RECOVERY_NETWORK_MISSING", "prod-net"),
        ("RECOVERY_NETWORK_MISSING", "test-net"),
    ]


def test_paused_vpg() -> None:
    ev = evaluate(vpg(), facts(paused=True))
    assert (ev.status, ev.substatus, ev.codes) == ("Paused", None, {"REPLICATION_PAUSED"})
    # a long pause: the RPO really is over the target, and says so
    long = facts(paused=True, newest_checkpoint_at=NOW - timedelta(minutes=20))
    assert state(vpg(), long) == ("Paused", None, {"REPLICATION_PAUSED", "RPO_OVER_2X_TARGET"})


def test_journal_near_its_hard_limit() -> None:
    cfg = vpg(journal_hard_limit_gb=100, journal_warning_percent=75)
    assert state(cfg, facts(journal_bytes=74 * GiB))[2] == set()
    ev = evaluate(cfg, facts(journal_bytes=75 * GiB))
    assert ev.codes == {"JOURNAL_NEAR_LIMIT"} and ev.status == "MeetingSLA"
    assert "75 % of its hard limit 100.0 GiB" in ev.alerts[0].text
    assert state(vpg(journal_warning_percent=90), facts(journal_bytes=80 * GiB))[2] == set()
    assert state(vpg(journal_hard_limit_gb=0), facts(journal_bytes=10**15))[2] == set()


@pytest.mark.parametrize(
    "kw, status, substatus, codes",
    [
        (dict(initial_sync_done=False, newest_checkpoint_at=None, oldest_checkpoint_at=None,
              first_checkpoint_at=None, last_test_at=None, operation_kind="initial_sync"),
         "Initializing", "InitialSync", set()),
        (dict(operation_kind="failover"), "FailingOver", None, set()),
        (dict(operation_kind="failover", awaiting_commit_since=NOW - timedelta(minutes=5)),
         "FailingOver", "FailingOverBeforeCommit", {"AWAITING_COMMIT"}),
        (dict(operation_kind="commit", awaiting_commit_since=NOW, live_recovery_kind="failover"),
         "FailingOver", "FailingOverCommitting", {"AWAITING_COMMIT"}),
        (dict(operation_kind="rollback", live_recovery_kind="failover"),
         "FailingOver", "FailingOverRollingBack", set()),
        (dict(operation_kind="move", awaiting_commit_since=NOW),
         "Moving", "MovingBeforeCommit", {"AWAITING_COMMIT"}),
        (dict(committed=True, newest_checkpoint_at=NOW - 7 * DAY),
         "Recovered", "NeedsConfiguration", set()),
        (dict(operation_kind="delete"), "Deleting", None, set()),
        (dict(delta_sync=True), "MeetingSLA", "DeltaSync", set()),
        (dict(operation_kind="test"), "MeetingSLA", None, set()),
        (dict(error="journal path not writable"), "Error", None, set()),
        (dict(test_cleanup_failed="erp-db - testing recovery"), "MeetingSLA", None,
         {"TEST_CLEANUP_FAILED"}),
    ],
)  # fmt: skip
def test_operation_states(kw, status, substatus, codes) -> None:
    assert state(vpg(), facts(**kw)) == (status, substatus, codes)


def test_failover_suspends_the_sla_alerts() -> None:
    stale = dict(newest_checkpoint_at=NOW - DAY, oldest_checkpoint_at=NOW - timedelta(hours=2))
    assert state(vpg(), facts(**stale))[0] == "NotMeetingSLA"
    f = facts(**stale, operation_kind="failover", awaiting_commit_since=NOW - timedelta(hours=1))
    assert state(vpg(), f) == ("FailingOver", "FailingOverBeforeCommit", {"AWAITING_COMMIT"})


# --- transitions in the store -----------------------------------------------------------


def test_rpo_alerts_raise_and_clear_at_the_right_samples(store: StateStore) -> None:
    """Checkpoints stop at T for 12 minutes, then resume; one evaluation a minute."""
    cfg, t_stop = vpg(rpo_target_seconds=300), NOW
    timeline = []
    for minute in range(0, 15):
        now = t_stop + timedelta(minutes=minute, seconds=30)
        newest = t_stop if minute < 12 else now - timedelta(seconds=5)
        ev = evaluate(cfg, facts(now, newest_checkpoint_at=newest))
        store.add_sample("erp", **ev.sample())
        changes = apply_transitions(store, "erp", ev, now)
        timeline.append((minute, [(t.kind, t.code or t.status) for t in changes]))
    moments = [(m, c) for m, c in timeline if c]
    assert moments == [
        (0, [("status", "MeetingSLA")]),
        (5, [("status", "RpoNotMeetingSLA"), ("raised", "RPO_OVER_TARGET")]),  # RPO 330 s
        (10, [("cleared", "RPO_OVER_TARGET"), ("raised", "RPO_OVER_2X_TARGET")]),  # RPO 630 s
        (12, [("status", "MeetingSLA"), ("cleared", "RPO_OVER_2X_TARGET")]),
    ]
    df = store.frame("alerts", vpg="erp")
    rows = {r.code: r for r in df.itertuples()}
    assert rows["RPO_OVER_TARGET"].raised_at == t_stop + timedelta(minutes=5, seconds=30)
    assert rows["RPO_OVER_TARGET"].cleared_at == t_stop + timedelta(minutes=10, seconds=30)
    assert rows["RPO_OVER_2X_TARGET"].raised_at == t_stop + timedelta(minutes=10, seconds=30)
    assert rows["RPO_OVER_2X_TARGET"].cleared_at == t_stop + timedelta(minutes=12, seconds=30)
    assert rows["RPO_OVER_2X_TARGET"].level == "error"
    assert store.open_alerts("erp") == []
    hist = [(h.status, h.at) for h in store.status_history("erp")][1:]  # after "created"
    assert hist == [
        ("MeetingSLA", t_stop + timedelta(seconds=30)),
        ("RpoNotMeetingSLA", t_stop + timedelta(minutes=5, seconds=30)),
        ("MeetingSLA", t_stop + timedelta(minutes=12, seconds=30)),
    ]
    samples = store.frame("samples", vpg="erp")
    assert len(samples) == 15
    assert list(samples["rpo_seconds"][:3]) == [30.0, 90.0, 150.0]
    assert list(samples["status"][4:7]) == ["MeetingSLA", "RpoNotMeetingSLA", "RpoNotMeetingSLA"]


def test_vm_alert_clears_when_the_vm_is_protected_again(store: StateStore) -> None:
    cfg = vpg()
    bad = facts(unprotected_vms=[UnprotectedVM("erp-app", "rdm")], recovery_networks_missing=["n1"])
    first = apply_transitions(store, "erp", evaluate(cfg, bad), NOW)
    assert {(t.kind, t.code, t.vm, t.subject) for t in first} == {
        ("status", None, None, None),
        ("raised", "VM_NOT_PROTECTED", "erp-app", None),
        ("raised", "RECOVERY_NETWORK_MISSING", None, "n1"),
    }
    assert apply_transitions(store, "erp", evaluate(cfg, bad), NOW + timedelta(minutes=1)) == []
    later = NOW + timedelta(minutes=2)
    fixed = apply_transitions(store, "erp", evaluate(cfg, facts(later)), later)
    assert [(t.kind, t.code, t.vm, t.subject) for t in fixed] == [
        ("status", None, None, None),
        ("cleared", "RECOVERY_NETWORK_MISSING", None, "n1"),  # in the order they were raised
        ("cleared", "VM_NOT_PROTECTED", "erp-app", None),
    ]
    assert (fixed[0].previous_status, fixed[0].status) == ("Error", "MeetingSLA")


def test_apply_transitions_leaves_alerts_of_other_codes_alone(store: StateStore) -> None:
    store.raise_alert("erp", "SOMETHING_ELSE", "warning", "raised by a flow")
    changes = apply_transitions(store, "erp", [DesiredAlert("REPLICATION_PAUSED", "warning", "p")], NOW)
    assert [(t.kind, t.code) for t in changes] == [("raised", "REPLICATION_PAUSED")]
    changes = apply_transitions(store, "erp", [], NOW)
    assert [(t.kind, t.code) for t in changes] == [("cleared", "REPLICATION_PAUSED")]
    assert [a.code for a in store.open_alerts("erp")] == ["SOMETHING_ELSE"]
    assert "SOMETHING_ELSE" not in ALERT_CODES


def test_gather_facts_reads_the_runtime_and_the_last_test(store: StateStore) -> None:
    first = NOW - 30 * DAY
    store.note_checkpoint("erp", first)
    store.note_checkpoint("erp", NOW - timedelta(seconds=20))
    store.update_runtime("erp", initial_sync_done=True, paused=True)
    op = store.start_operation("erp", "test", "alice")
    store.try_lock("erp", op, "test")
    store.add_test_result(op, "erp", started_at=NOW - DAY, success=True, cleanup_ok=False,
                          notes="erp-db - testing recovery left")  # fmt: skip
    f = gather_facts(store, "erp", NOW, oldest_checkpoint_at=NOW - timedelta(hours=24))
    assert (f.first_checkpoint_at, f.newest_checkpoint_at) == (first, NOW - timedelta(seconds=20))
    assert (f.initial_sync_done, f.paused, f.operation_kind, f.last_test_at) == (
        True,
        True,
        "test",
        NOW - DAY,
    )
    ev = evaluate(vpg(), f)
    assert (ev.status, ev.codes) == ("Paused", {"REPLICATION_PAUSED", "TEST_CLEANUP_FAILED"})
    assert "erp-db - testing recovery left" in next(
        a.text for a in ev.alerts if a.code == "TEST_CLEANUP_FAILED"
    )


def test_only_a_passed_test_resets_the_test_overdue_clock(store: StateStore) -> None:
    cfg = vpg(test_interval_months=6)
    store.note_checkpoint("erp", NOW - 400 * DAY)
    store.update_runtime("erp", initial_sync_done=True)
    passed = NOW - 200 * DAY
    store.add_test_result(None, "erp", started_at=passed, success=True)
    store.add_test_result(None, "erp", started_at=NOW - 10 * DAY, success=False)  # proves nothing
    f = gather_facts(store, "erp", NOW, oldest_checkpoint_at=NOW - timedelta(hours=24))
    assert f.last_test_at == passed
    ev = evaluate(cfg, f)
    assert "TEST_OVERDUE" in ev.codes
    assert "last passed test " + f"{passed:%Y-%m-%d}" in next(a.text for a in ev.alerts if a.code == "TEST_OVERDUE")
    # none passed: the clock runs from the first checkpoint, as if never tested
    store.note_checkpoint("crm", NOW - 400 * DAY)
    store.update_runtime("crm", initial_sync_done=True)
    store.add_test_result(None, "crm", started_at=NOW - DAY, success=False)
    g = gather_facts(store, "crm", NOW, oldest_checkpoint_at=NOW - timedelta(hours=24))
    assert g.last_test_at is None
    assert "never tested successfully" in next(a.text for a in evaluate(vpg(name="crm"), g).alerts
                                               if a.code == "TEST_OVERDUE")
