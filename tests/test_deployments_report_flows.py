"""The report flows and tasks inside Prefect runs (the session's test server): a failed
email is recorded and visible (failed task run, `-email` artifact) but never fails the
run that reports; the compliance flow emails; notify fails when it cannot notify."""

from __future__ import annotations

import email
import json
from email import policy

import pytest

from test_mail import free_port, smtp_server
from test_report_cli import write_config
from test_reports_data import populate
from vmrep.runtime import forget_runtime
from vmrep.state import StateStore


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    base = tmp_path_factory.mktemp("report-flows")
    path = base / "state.db"
    store = StateStore.open(f"sqlite:///{path}")
    ids = populate(store)
    store.close()
    return base, path, ids


@pytest.fixture
def fast_mail(monkeypatch):
    import reports.mail as mail  # email_owners, which the email-report task calls, sends through it

    orig = mail.send_report
    monkeypatch.setattr(mail, "send_report", lambda *a, **k: orig(*a, **{**k, "wait_initial": 0.01, "wait_max": 0.02,
                                                                      "timeout": 3}))


def _artifact(client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(arts, key=lambda a: a.created) if arts else None


def test_a_failed_email_is_visible_and_does_not_fail_the_test_run(prefect_harness, db, tmp_path, fast_mail):  # noqa: F811
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.reports import dr_test_report

    base, path, ids = db
    cfg = write_config(tmp_path / "vmrep.yaml", path, free_port())  # nobody listens on that port
    out = tmp_path / "reports"

    @flow(name="vmrep-dr-test-stand-in")
    def stand_in(op: str):
        return dr_test_report(str(cfg), op, out_dir=str(out))

    try:
        state = stand_in(ids["erp_test"], return_state=True)
        assert state.is_completed()  # the email failed; the run that reports did not
        res = state.result()
        assert res["verdict"] == "PASS" and res["email"]["ok"] is False
        assert "ConnectionRefusedError" in res["email"]["error"]
        assert (out / f"dr-test-erp-{ids['erp_test']}.html").exists()  # the report stays on disk
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            by_name = {r.name.rsplit("-", 1)[0]: r for r in runs}
            assert by_name["write-report"].state.is_completed()
            assert by_name["email-report"].state.is_failed()  # red in the UI
            art = _artifact(client, "dr-test-erp-email")
            assert art is not None and "Email FAILED" in art.data and "ConnectionRefusedError" in art.data
            assert _artifact(client, "dr-test-erp") is not None
        store = StateStore.open(f"sqlite:///{path}")
        try:
            rows = store.frame("email_deliveries", ref=ids["erp_test"])
        finally:
            store.close()
        assert len(rows) and not bool(rows.iloc[-1]["ok"]) and int(rows.iloc[-1]["attempts"]) == 3
    finally:
        forget_runtime(cfg)


def test_no_operation_recorded_means_no_report(prefect_harness, db, tmp_path):  # noqa: F811
    from prefect import flow

    from flows.reports import dr_test_report

    base, path, ids = db
    cfg = write_config(tmp_path / "vmrep.yaml", path, free_port())

    @flow(name="vmrep-refused-test-stand-in")
    def refused():
        return dr_test_report(str(cfg), None)  # this run recorded no test operation

    try:
        assert refused() is None
    finally:
        forget_runtime(cfg)


def test_compliance_flow_emails_its_report(prefect_harness, db, tmp_path):  # noqa: F811
    from flows.reports import compliance_report

    base, path, ids = db
    ctl, sink = smtp_server()
    cfg = write_config(tmp_path / "vmrep.yaml", path, ctl.port)
    try:
        res = compliance_report(str(cfg), period="2025-10")
        assert res["since"].startswith("2025-10-01") and res["until"].startswith("2025-11-01")
        assert res["email"]["ok"] is True
        msg = email.message_from_bytes(sink.envelopes[-1].content, policy=policy.default)
        assert msg["Subject"] == res["subject"]
        assert json.dumps(res)  # a plain result Prefect can store
    finally:
        ctl.stop()
        forget_runtime(cfg)


def test_notify_fails_when_nobody_can_be_told(prefect_harness, db, tmp_path, fast_mail):  # noqa: F811
    from flows.reports import notify

    base, path, ids = db
    cfg = write_config(tmp_path / "vmrep.yaml", path, free_port())
    try:
        state = notify(str(cfg), vpg="erp", subject="VPG erp: error RPO_OVER_2X_TARGET", text="RPO 700 s",
                       return_state=True)
        assert state.is_failed() and "RPO_OVER_2X_TARGET" in state.message
    finally:
        forget_runtime(cfg)
