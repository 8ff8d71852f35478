"""End to end through a real Prefect server on loopback, started by the test:

serve every deployment from a subprocess (`python -m deployments.serve`), trigger an
initial sync and a DR test through the API as the UI does, wait for them, then find the
DR-test report email in an SMTP server (aiosmtpd) and the report's artifacts in Prefect;
then raise an alert event and see the alert automation email it through notify/notify.
Every process started here is stopped, also on failure.
"""

from __future__ import annotations

import email
import json
from email import policy
from pathlib import Path

import pytest
import yaml

from serving import served, wait_for
from test_mail import smtp_server



def messages(sink) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(e.content, policy=policy.default) for e in sink.envelopes]


@pytest.fixture
def stack(lab, tmp_path):
    """SMTP sink, a derived vmrep.yaml pointing at it, a Prefect server, and `serve`."""
    ctl, sink = smtp_server()
    cfg = yaml.safe_load(lab.config_path.read_text())
    cfg["notifications"] = {"smtp_host": "127.0.0.1", "smtp_port": ctl.port, "sender": "vmrep@dr.example.test",
                            "default_to": ["dr-audit@example.test"]}
    config = tmp_path / "vmrep.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        with served(config, tmp_path, args=("--no-schedules",), env={"VMREP_USER": "e2e-tester"}) as stack:
            yield {**stack, "sink": sink, "config": config}
    finally:
        ctl.stop()


@pytest.mark.timeout(900)
def test_dr_test_from_the_api_emails_its_report_and_publishes_artifacts(stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sink, srv = stack["sink"], stack["srv"]

    def tail() -> str:
        return stack["log"].read_text(errors="replace")[-3000:]

    with temporary_settings(updates={PREFECT_API_URL: srv.api_url}), get_client(sync_client=True) as client:
        def deployment(name: str):
            try:
                return client.read_deployment_by_name(name)
            except Exception:  # noqa: BLE001 - not registered yet
                assert stack["proc"].poll() is None, f"serve exited:\n{tail()}"
                return None

        # Generous limits: they only bound a failure; on a loaded 2-core machine a flow run's
        # subprocess (imports, Prefect client start) alone can take tens of seconds.
        dr = wait_for("the deployments", lambda: deployment("dr-test/dr-test"), 120)
        sync = deployment("initial-sync/initial-sync")
        assert "isolated test network" in dr.description
        assert dr.parameter_openapi_schema["properties"]["vpg"]["enum"] == ["erp", "files"]
        assert all(not s.active for s in dr.schedules) and len(dr.schedules) == 2  # --no-schedules
        wait_for("the automation", lambda: client.read_automations_by_name("vmrep alert email"), 30)

        # The server refuses what the form would not allow.
        with pytest.raises(PrefectHTTPStatusError):
            client.create_flow_run_from_deployment(dr.id, parameters={"vpg": "no-such-vpg"})

        def run(dep, parameters: dict, timeout: float):
            fr = client.create_flow_run_from_deployment(dep.id, parameters=parameters)  # as the UI's "Run"
            final = wait_for(f"{dep.name} run", lambda: (s := client.read_flow_run(fr.id).state) and s.is_final()
                             and s, timeout)
            assert final.is_completed(), f"{dep.name}: {final.type} {final.message}\n{tail()}"
            return fr

        run(sync, {"vpg": "erp"}, 240)
        fr = run(dr, {"vpg": "erp", "notes": "e2e: triggered through the API"}, 300)

        # The report email, at the VPG's owners and default_to, with the CSVs attached.
        msg = wait_for("the report email", lambda: next(
            (m for m in messages(sink) if "DR test" in m["Subject"]), None), 60)
        assert msg["Subject"].startswith("[vmrep] DR test PASS: VPG erp")
        assert {"dr-team@example.test", "dr-audit@example.test"} <= {a.strip() for a in msg["To"].split(",")}
        names = {p.get_filename() for p in msg.iter_attachments()}
        assert any(n and n.endswith("-steps.csv") for n in names)
        assert "e2e-tester" in msg.get_body(("plain",)).get_content()

        # The UI entry handed the test over to dr-test/siteB, on the recovery site's pool: its
        # run (a subflow of the entry's) did the test and published the artifacts.
        from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId

        [fr] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[fr.id])))
        assert fr.work_pool_name == "vmrep-siteB" and client.read_deployment(fr.deployment_id).name == "siteB"

        # The artifacts of that flow run: table, link to the HTML on disk, summary, email outcome.
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])),
                                     artifact_filter=ArtifactFilter())
        by_key = {a.key: a for a in arts}
        assert {"dr-test-erp", "dr-test-erp-html", "dr-test-erp-summary", "dr-test-erp-email"} <= set(by_key)
        table = by_key["dr-test-erp"].data
        table = json.loads(table) if isinstance(table, str) else table
        figures = {r["figure"]: r["value"] for r in table}
        assert figures["verdict"] == "PASS" and figures["flow_run_id"] == str(fr.id)
        html = Path(by_key["dr-test-erp-html"].data.rsplit("(file://", 1)[1].rstrip(")"))
        assert html.exists() and html.parent == stack["reports"]
        assert "Emailed" in by_key["dr-test-erp-email"].data

        # The alert automation: an alert event -> notify/notify -> an email to the VPG's owners.
        # Sent with a client of this server's own: the process-wide EventsWorker may still be
        # bound to another API (an earlier test's Prefect harness), as it is a singleton.
        import asyncio

        from prefect.events import Event
        from prefect.events.clients import PrefectEventsClient

        async def send() -> None:
            async with PrefectEventsClient(api_url=srv.api_url) as events:
                await events.emit(Event(
                    event="vmrep.alert.raised",
                    resource={"prefect.resource.id": "vmrep.vpg.erp", "prefect.resource.name": "erp"},
                    payload={"code": "RPO_OVER_TARGET", "level": "warning",
                             "text": "RPO 95 s is over the target 60 s", "vm": None, "alert_id": 7}))

        asyncio.run(send())
        alert = wait_for("the alert email", lambda: next(
            (m for m in messages(sink) if "RPO_OVER_TARGET" in m["Subject"]), None), 120)
        assert alert["Subject"] == "[vmrep] VPG erp: warning RPO_OVER_TARGET"
        assert "RPO 95 s is over the target 60 s" in alert.get_body(("plain",)).get_content()
        assert "dr-team@example.test" in alert["To"]
