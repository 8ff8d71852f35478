"""Reports with their neighbours: Prefect (artifacts, Secret and EmailServerCredentials
blocks, on the session's test server) and PostgreSQL (the same figures as on SQLite)."""

from __future__ import annotations

import email
import json
import socket
from email import policy

import pytest
from aiosmtpd.controller import Controller

import tasks.prefect_secrets  # noqa: F401 - the control plane registers the Prefect Secret resolver
from conftest_pg import pg_server, prefect_harness  # noqa: F401
from reports import build_compliance_report, build_dr_test_report, publish_artifacts, send_report
from test_reports_data import NOW, SINCE, UNTIL, make_config, populate
from vmrep.errors import SecretError
from vmrep.secrets import resolve_secret
from vmrep.state import StateStore


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    store = StateStore.open(f"sqlite:///{tmp_path_factory.mktemp('db') / 'state.db'}")
    ids = populate(store)
    yield store, ids
    store.close()


def test_artifacts_are_published_inside_a_flow_run(prefect_harness, sqlite_store, tmp_path):  # noqa: F811
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    store, ids = sqlite_store

    @flow(name="vmrep-report-artifacts")
    def report_flow():
        report = build_dr_test_report(store.engine, ids["erp_test"], make_config(), now=NOW)
        report.write(tmp_path)
        return report, publish_artifacts(report)

    report, created = report_flow()
    assert created is not None and len(created) == 3
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dr-test-erp", "dr-test-erp-html"]))
        )
    by_key = {a.key: a for a in arts if a.id in created}
    table = by_key["dr-test-erp"].data
    table = table if isinstance(table, list) else json.loads(table)
    figures = {r["figure"]: r["value"] for r in table}
    assert figures["rto_seconds"] == 612.0 and figures["verdict"] == "PASS"
    assert figures["rpo_achieved_seconds"] == 42.0 and figures["verification_ok"] is True
    assert by_key["dr-test-erp"].type == "table"
    link = by_key["dr-test-erp-html"].data  # a link artifact is markdown: [text](uri)
    assert link.endswith(f"({report.paths['html'].resolve().as_uri()})")


def test_secret_block_and_email_credentials_block(prefect_harness, sqlite_store, tmp_path):  # noqa: F811
    from prefect.blocks.system import Secret
    from prefect_email import EmailServerCredentials

    Secret(value="s3cret from a block").save("vmrep-test-secret", overwrite=True)
    Secret(value="1234").save("vmrep-test-numeric", overwrite=True)
    assert resolve_secret("prefect_secret:vmrep-test-secret") == "s3cret from a block"
    assert resolve_secret({"prefect_secret": "vmrep-test-numeric"}) == "1234"
    with pytest.raises(SecretError,
                       match=r"notifications.password \(prefect_secret:vmrep-missing\): no Prefect Secret block"):
        resolve_secret("prefect_secret:vmrep-missing", "notifications.password")

    # the mail relay named by an EmailServerCredentials block
    class Sink:
        def __init__(self):
            self.envelopes = []

        async def handle_DATA(self, server, session, envelope):
            self.envelopes.append(envelope)
            return "250 OK"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = Sink()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        EmailServerCredentials(smtp_server="127.0.0.1", smtp_type="INSECURE", smtp_port=port).save(
            "vmrep-test-smtp", overwrite=True
        )
        store, ids = sqlite_store
        cfg = make_config(smtp_port=1, email_credentials_block="vmrep-test-smtp")  # the block wins
        report = build_dr_test_report(store.engine, ids["hr_test"], cfg, now=NOW)
        report.write(tmp_path)
        d = send_report(report, ["ops@example.com"], cfg.notifications, store, wait_initial=0.01)
        assert d.ok, d.error
        msg = email.message_from_bytes(sink.envelopes[0].content, policy=policy.default)
        assert msg["Subject"].startswith("[vmrep] DR test FAIL: VPG hr")

        cfg = make_config(email_credentials_block="vmrep-no-such-block")
        d = send_report(report, ["ops@example.com"], cfg.notifications, store, wait_initial=0.01)
        assert not d.ok and d.attempts == 1 and "vmrep-no-such-block" in d.error
    finally:
        ctl.stop()


@pytest.mark.postgres
def test_reports_are_the_same_on_postgresql(pg_server, sqlite_store):  # noqa: F811
    """The frames read PostgreSQL (timestamptz, JSONB, real booleans) as they read SQLite."""
    cfg = make_config()
    url = pg_server.create_database()
    pg = StateStore.open(url)
    try:
        pg_ids = populate(pg)
        sq, sq_ids = sqlite_store

        def same(a: dict, b: dict) -> None:
            strip = {"operation_id", "flow_run_id"}

            def norm(f: dict) -> dict:  # ids differ between the two databases; the rest must not
                return {k: ([{kk: vv for kk, vv in o.items() if kk not in strip} for o in v]
                            if k == "live_operations" else v) for k, v in f.items() if k not in strip}

            assert norm(a) == norm(b)

        for key in ("hr_test",):  # the one with failures, alerts and warnings
            a = build_dr_test_report(pg, pg_ids[key], cfg, now=NOW).figures
            b = build_dr_test_report(sq, sq_ids[key], cfg, now=NOW).figures
            same(a, b)
        a = build_compliance_report(pg.engine, SINCE, UNTIL, None, cfg, now=NOW).figures
        b = build_compliance_report(sq.engine, SINCE, UNTIL, None, cfg, now=NOW).figures
        assert a == b
        assert a["vpgs"]["erp"]["verdict"] == "compliant"
    finally:
        pg.close()
