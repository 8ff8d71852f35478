"""State store: every test runs on SQLite and on PostgreSQL (the `db_url` fixture)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from sqlalchemy import inspect, text

from vmrep.errors import VmrepError
from vmrep.state import StateStore, default_url
from vmrep.state.models import TABLES

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(db_url: str):
    with StateStore.open(db_url) as s:
        yield s


WORKER = """
import sys
from vmrep.state import StateStore
store = None
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "ping":
        out = "pong"
    elif cmd == "open":
        store = StateStore.open(args[0])
        store.runtime("erp")
        out = "opened"
    elif cmd == "lock":
        out = store.try_lock("erp", args[0], "test")
    print(out, flush=True)
"""


class Worker:
    """A second process (not a thread) that runs store calls sent to it line by line."""

    def __init__(self, tmp_path) -> None:
        self.err = tempfile.TemporaryFile(mode="w+", dir=tmp_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
        )

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def recv(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            self.err.seek(0)
            raise AssertionError(f"worker died ({self.proc.returncode}): {self.err.read()}")
        return line.strip()

    def call(self, line: str) -> str:
        self.send(line)
        return self.recv()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Four worker processes, started once for the module (the imports cost ~1 s each)."""
    ws = [Worker(tmp_path_factory.mktemp("workers")) for _ in range(4)]
    try:
        assert [w.call("ping") for w in ws] == ["pong"] * len(ws)  # imported and waiting
        yield ws
    finally:
        for w in ws:
            w.proc.stdin.close()
        for w in ws:
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.proc.kill()


# --- schema and migrations ---------------------------------------------------------------


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from vmrep.state.store import _alembic_config

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def test_migrations_apply_on_empty_db_and_reopen_is_a_no_op(db_url: str) -> None:
    with StateStore.open(db_url) as s:
        tables = set(inspect(s.engine).get_table_names())
        assert set(TABLES) <= tables and "alembic_version" in tables
        s.set_status("erp", "MeetingSLA")
    for _ in range(2):
        with StateStore.open(db_url) as s:
            with s.engine.connect() as c:
                assert c.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
                    head_revision()
                ]
            assert s.runtime("erp").status == "MeetingSLA"  # data kept


def test_a_schema_newer_than_the_code_is_refused(db_url: str) -> None:
    with StateStore.open(db_url) as s, s.engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = 'f00dcafe'"))
    with pytest.raises(VmrepError, match="revision f00dcafe, unknown to this vmrep"):
        StateStore.open(db_url)


def test_models_and_migrations_agree(store: StateStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from vmrep.state.models import Base

    with store.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_concurrent_first_open_from_several_processes(db_url: str, workers) -> None:
    for w in workers:  # all of them migrate the empty database at the same moment
        w.send(f"open {db_url}")
    assert [w.recv() for w in workers] == ["opened"] * len(workers)
    with StateStore.open(db_url) as s, s.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert len(s.status_history("erp")) == 1  # the runtime row was created once


def test_default_url_from_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("VMREP_DB_URL", raising=False)
    monkeypatch.setenv("VMREP_HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path / 'home' / 'state.db'}"
    assert (tmp_path / "home").is_dir()
    monkeypatch.setenv("VMREP_DB_URL", "postgresql+psycopg://u@h/db")
    assert default_url() == "postgresql+psycopg://u@h/db"
    monkeypatch.delenv("VMREP_DB_URL")
    monkeypatch.delenv("VMREP_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_url() == f"sqlite:///{tmp_path / '.vmrep' / 'state.db'}"


# --- runtime, status, times -----------------------------------------------------------


def test_runtime_is_created_once_and_status_history_only_on_change(store: StateStore) -> None:
    rt = store.runtime("erp")
    assert (rt.status, rt.paused, rt.initial_sync_done, rt.lock_holder) == (
        "Initializing",
        False,
        False,
        None,
    )
    assert store.runtime("erp").created_at == rt.created_at
    t = rt.created_at + timedelta(seconds=1)
    assert store.set_status("erp", "Initializing", "InitialSync", "copying", at=t) == (
        "Initializing",
        None,
    )
    assert store.set_status("erp", "Initializing", "InitialSync", "still copying", at=t) is None
    assert store.set_status("erp", "MeetingSLA", None, at=t + timedelta(minutes=5))
    assert store.set_status("erp", "MeetingSLA", None) is None
    hist = [(h.status, h.substatus, h.detail) for h in store.status_history("erp")]
    assert hist == [
        ("Initializing", None, "VPG created"),
        ("Initializing", "InitialSync", "copying"),
        ("MeetingSLA", None, None),
    ]
    rt = store.update_runtime("erp", paused=True, initial_sync_done=True)
    assert store.runtime("erp").paused and store.runtime("erp").initial_sync_done
    with pytest.raises(TypeError, match="nope"):
        store.update_runtime("erp", nope=1)


def test_times_are_stored_and_returned_as_aware_utc(store: StateStore) -> None:
    cest = timezone(timedelta(hours=2))
    store.note_checkpoint("erp", datetime(2025, 6, 1, 14, 0, tzinfo=cest))
    store.note_checkpoint("erp", datetime(2025, 6, 1, 13, 0, tzinfo=timezone.utc))
    rt = store.runtime("erp")
    assert rt.first_checkpoint_at == datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
    assert rt.last_checkpoint_at == datetime(2025, 6, 1, 13, 0, tzinfo=timezone.utc)
    assert rt.last_checkpoint_at.tzinfo == timezone.utc
    with pytest.raises(Exception, match="naive"):
        store.note_checkpoint("erp", datetime(2025, 6, 1, 15, 0))
    df = store.frame("vpg_runtime")
    assert isinstance(df["last_checkpoint_at"].dtype, pd.DatetimeTZDtype)
    assert str(df["last_checkpoint_at"].dtype.tz) == "UTC"
    assert df["last_checkpoint_at"][0].isoformat() == "2025-06-01T13:00:00+00:00"


# --- lock ---------------------------------------------------------------------------


def test_lock_contention_between_two_stores(db_url: str) -> None:
    with StateStore.open(db_url) as a, StateStore.open(db_url) as b:
        assert a.try_lock("erp", "op-a", "test")
        assert a.try_lock("erp", "op-a", "test")  # the holder may ask again (task retry)
        assert not b.try_lock("erp", "op-b", "failover")
        assert not b.unlock("erp", "op-b")  # not the holder
        rt = b.runtime("erp")
        assert (rt.lock_holder, rt.lock_kind) == ("op-a", "test")
        assert rt.lock_acquired_at is not None
        assert a.unlock("erp", "op-a")
        assert b.try_lock("erp", "op-b", "failover")
        assert not a.try_lock("erp", "op-a", "test")
        assert a.force_unlock("erp") == "op-b"
        assert a.force_unlock("erp") is None
        rt = b.runtime("erp")
        assert (rt.lock_holder, rt.lock_kind, rt.lock_acquired_at) == (None, None, None)
        assert a.try_lock("other", "op-c", "replicate")  # locks are per VPG


def test_lock_across_processes(db_url: str, workers) -> None:
    other = workers[0]
    assert other.call(f"open {db_url}") == "opened"
    assert other.call("lock op-a") == "True"
    with StateStore.open(db_url) as here:
        assert not here.try_lock("erp", "op-here", "failover")
        assert here.runtime("erp").lock_holder == "op-a"
        assert other.call("lock op-b") == "False"
        assert here.unlock("erp", "op-a")
        assert other.call("lock op-b") == "True"
        assert not here.try_lock("erp", "op-here", "failover")


def test_lock_race_between_processes_has_exactly_one_winner(db_url: str, workers) -> None:
    StateStore.open(db_url).close()
    assert [w.call(f"open {db_url}") for w in workers] == ["opened"] * len(workers)
    for i, w in enumerate(workers):
        w.send(f"lock op-{i}")
    results = [w.recv() for w in workers]
    assert sorted(results) == ["False"] * (len(workers) - 1) + ["True"]
    with StateStore.open(db_url) as s:
        assert s.runtime("erp").lock_holder == f"op-{results.index('True')}"


def test_holding_a_vpg_records_and_locks_in_one_call_or_records_the_refusal(db_url: str) -> None:
    from vmrep.errors import Refused
    from vmrep.state.holding import holding_vpg

    with StateStore.open(db_url) as a, StateStore.open(db_url) as b:
        with holding_vpg(a, "erp", "failover", who="alice", params={}, flow_run_id=None, keep=True,
                         refusal=lambda row: f"held by {row.lock_kind}") as live:
            assert b.runtime("erp").lock_holder == live
        assert b.runtime("erp").lock_holder == live  # kept: awaiting commit
        with pytest.raises(Refused, match="^held by failover$"):
            with holding_vpg(b, "erp", "test", who="bob", params={}, flow_run_id=None,
                             refusal=lambda row: f"held by {row.lock_kind}"):
                raise AssertionError("a refused operation runs nothing")
        refused = b.operations("erp", kind="test")[0]
        assert (refused.result, refused.started_by) == ("failed", "bob")
        assert refused.error == f"VPG erp: test refused: held by failover operation {live[:8]}"
        # A commit takes the lock from the failover and, when it fails, hands it back.
        with pytest.raises(RuntimeError):
            with holding_vpg(b, "erp", "commit", who="bob", params={}, flow_run_id=None,
                             take_from=(live, "failover"), refusal=str) as commit:
                assert a.runtime("erp").lock_holder == commit
                raise RuntimeError("disk full")
        assert (a.runtime("erp").lock_holder, a.runtime("erp").lock_kind) == (live, "failover")
        assert (a.operation(commit).result, a.operation(commit).error) == ("failed", "disk full")
        # A rollback that succeeds releases the VPG; it ends its operation itself.
        with holding_vpg(b, "erp", "rollback", who="bob", params={}, flow_run_id=None,
                         take_from=(live, "failover"), refusal=str) as rb:
            b.finish_operation(rb, "succeeded")
        assert a.runtime("erp").lock_holder is None
        assert a.operation(rb).result == "succeeded"


# --- operations and steps -----------------------------------------------------------------


def test_operation_lifecycle(store: StateStore) -> None:
    op = store.start_operation(
        "erp", "test", "alice", {"checkpoint": "latest"}, "flow-run-1", started_at=T0
    )
    assert store.start_operation("erp", "test", "alice", operation_id=op) == op  # retry
    o = store.operation(op)
    assert (o.result, o.started_by, o.params, o.flow_run_id, o.started_at) == (
        "running",
        "alice",
        {"checkpoint": "latest"},
        "flow-run-1",
        T0,
    )
    store.finish_operation(
        op,
        "succeeded",
        ended_at=T0 + timedelta(minutes=4),
        checkpoint_id="cp-7",
        checkpoint_time=T0 - timedelta(seconds=30),
        checkpoint_age_seconds=30.0,
        rto_seconds=240.0,
        notes="fine",
    )
    o = store.operation(op)
    assert (o.result, o.rto_seconds, o.checkpoint_id, o.ended_at) == (
        "succeeded",
        240.0,
        "cp-7",
        T0 + timedelta(minutes=4),
    )
    other = store.start_operation("erp", "failover", "bob", started_at=T0 + timedelta(hours=1))
    store.start_operation("crm", "test", "bob")
    assert [x.id for x in store.operations("erp")] == [other, op]  # newest first
    assert [x.id for x in store.operations(kind="failover")] == [other]
    assert [x.id for x in store.operations("erp", result="running")] == [other]
    with pytest.raises(ValueError, match="operation kind"):
        store.start_operation("erp", "explode", "eve")
    with pytest.raises(ValueError, match="operation result"):
        store.finish_operation(op, "meh")
    with pytest.raises(ValueError, match="no operation"):
        store.finish_operation("missing", "failed")


def test_step_context_records_ok_skip_and_failure_with_error_text(store: StateStore) -> None:
    op = store.start_operation("erp", "test", "alice")
    with store.step(op, "web-1", "write_disks") as st:
        st.detail["bytes"] = 4096
    with store.step(op, None, "cleanup") as st:
        st.skip("nothing to remove")
    with pytest.raises(RuntimeError, match="tools heartbeat"):
        with store.step(op, "web-1", "verify_tools", detail={"timeout": 300}):
            raise RuntimeError("no tools heartbeat after 300 s")
    with pytest.raises(KeyboardInterrupt):
        with store.step(op, "db-1", "power_on"):
            raise KeyboardInterrupt()
    store.record_step(op, "db-1", "verify_ip", "failed", error="expected 10.0.0.5")
    steps = store.steps(op)
    assert [(s.vm, s.step, s.result) for s in steps] == [
        ("web-1", "write_disks", "ok"),
        (None, "cleanup", "skipped"),
        ("web-1", "verify_tools", "failed"),
        ("db-1", "power_on", "failed"),
        ("db-1", "verify_ip", "failed"),
    ]
    assert steps[0].detail == {"bytes": 4096} and steps[0].error is None
    assert steps[1].detail == {"reason": "nothing to remove"}
    assert steps[2].error == "RuntimeError: no tools heartbeat after 300 s"
    assert steps[2].detail == {"timeout": 300}
    assert steps[3].error.startswith("cancelled: KeyboardInterrupt")
    assert all(s.ended_at is not None and s.ended_at >= s.started_at for s in steps)


# --- tests, samples, alerts, emails, frames ---------------------------------------------


def test_test_result_resets_the_test_clock(store: StateStore) -> None:
    op = store.start_operation("erp", "test", "alice", started_at=T0)
    store.add_test_result(
        op,
        "erp",
        started_at=T0,
        ended_at=T0 + timedelta(minutes=20),
        success=True,
        checkpoint_id="cp-1",
        checkpoint_time=T0 - timedelta(seconds=12),
        verification_ok=True,
        cleanup_ok=True,
        notes="all verified",
        tested_by="alice",
    )
    older = T0 - timedelta(days=30)
    store.add_test_result(None, "erp", started_at=older, success=False, cleanup_ok=False)
    rt = store.runtime("erp")
    assert (rt.last_test_at, rt.last_test_success) == (T0, True)  # an older record does not
    assert [r.started_at for r in store.test_results("erp")] == [T0, older]
    df = store.frame("test_results", vpg="erp")
    assert list(df["success"]) == [False, True]  # frames are oldest first


def test_alerts_are_unique_while_open(store: StateStore) -> None:
    a = store.raise_alert("erp", "RPO_OVER_TARGET", "warning", "RPO 400 s > 300 s", at=T0)
    assert a is not None and a.id
    assert store.raise_alert("erp", "RPO_OVER_TARGET", "warning", "again") is None
    n1 = store.raise_alert("erp", "RECOVERY_NETWORK_MISSING", "error", "x", subject="net-a")
    n2 = store.raise_alert("erp", "RECOVERY_NETWORK_MISSING", "error", "x", subject="net-b")
    v = store.raise_alert("erp", "VM_NOT_PROTECTED", "error", "gone", vm="db-1", data={"r": 1})
    assert None not in (n1, n2, v)
    assert store.raise_alert("crm", "RPO_OVER_TARGET", "warning", "other VPG") is not None
    assert len(store.open_alerts("erp")) == 4 and len(store.open_alerts()) == 5
    assert store.clear_alert(a.id, at=T0 + timedelta(minutes=3))
    assert not store.clear_alert(a.id)
    again = store.raise_alert("erp", "RPO_OVER_TARGET", "warning", "later", at=T0 + timedelta(hours=1))
    assert again is not None and again.id != a.id
    df = store.frame("alerts", vpg="erp", code="RPO_OVER_TARGET")
    assert list(df["cleared_at"].isna()) == [False, True]
    assert df["cleared_at"][0] == T0 + timedelta(minutes=3)
    with pytest.raises(ValueError, match="alert level"):
        store.raise_alert("erp", "X", "critical", "no")


def test_samples_emails_and_frame_filters(store: StateStore) -> None:
    for i in range(5):
        store.add_sample(
            "erp",
            at=T0 + timedelta(minutes=i),
            rpo_seconds=None if i == 0 else 10.0 * i,
            rpo_target_seconds=300,
            history_seconds=60.0 * i,
            history_target_seconds=86400,
            journal_bytes=10**10 * i,  # beyond 32 bits
            journal_limit_bytes=150 * 1024**3,
            status="MeetingSLA",
        )
    store.add_sample("crm", rpo_seconds=1, rpo_target_seconds=300, history_seconds=1,
                     history_target_seconds=3600)  # fmt: skip
    df = store.frame("samples", vpg="erp", since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=4))
    assert list(df["rpo_seconds"]) == [10.0, 20.0, 30.0]
    assert int(df["journal_bytes"].iloc[-1]) == 3 * 10**10
    assert len(store.frame("samples", vpg=["erp", "crm"])) == 6
    assert store.frame("samples", vpg="erp")["rpo_seconds"].isna().sum() == 1
    assert store.frame("samples", vpg="nobody").empty
    store.record_email("dr-test", "op-1", ["a@x", "b@x"], "DR test erp", True, report_path="/r/1.html")
    store.record_email("compliance", "2025-Q1", "c@x", "Q1", False, error="refused", attempts=3)
    em = store.frame("email_deliveries", ok=False)
    assert list(em["recipients"]) == ["c@x"] and list(em["attempts"]) == [3]
    assert list(store.frame("email_deliveries", kind="dr-test")["recipients"]) == ["a@x, b@x"]
    with pytest.raises(ValueError, match="no table"):
        store.frame("nope")
    with pytest.raises(ValueError, match="no column"):
        store.frame("samples", nope=1)
