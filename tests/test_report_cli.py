"""`vmrep report dr-test|compliance|emails` over a state database with a month of history,
and emailing to a real SMTP server (aiosmtpd on loopback). No Prefect run, no lab."""

from __future__ import annotations

import email
import json
from datetime import datetime, timezone
from email import policy
from pathlib import Path

import pytest
import yaml

from test_mail import free_port, smtp_server
from test_reports_data import populate
from vmrep.cli import main
from vmrep.cli.report import parse_period, parse_when, reports_dir
from vmrep.errors import VmrepError
from vmrep.runtime import forget_runtime
from vmrep.state import StateStore


def write_config(path: Path, db: Path, smtp_port: int) -> Path:
    vpg = lambda name, **kw: {"name": name, "protected_site": "prod", "recovery_site": "dr",  # noqa: E731
                              "vms": [{"name": f"{name}-01"}], **kw}
    path.write_text(yaml.safe_dump({
        "database_url": f"sqlite:///{db}",
        "sites": {"prod": {"host": "vc-prod.example.com", "password": "env:VMREP_TEST_VC_PW"},
                  "dr": {"host": "vc-dr.example.com", "password": "env:VMREP_TEST_VC_PW"}},
        "notifications": {"smtp_host": "127.0.0.1", "smtp_port": smtp_port, "sender": "vmrep@dr.example.com",
                          "default_to": ["dr-audit@example.com"]},
        "vpgs": [vpg("erp", rpo_target_seconds=300, test_interval_months=3, email_to=["erp-owner@example.com"]),
                 vpg("crm", rpo_target_seconds=120, journal_history_hours=12, email_to=["crm-owner@example.com"]),
                 vpg("hr", rpo_target_seconds=600, test_interval_months=1)],
    }))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("report-cli")
    db = base / "state.db"
    store = StateStore.open(f"sqlite:///{db}")
    ids = populate(store)
    store.close()
    ctl, sink = smtp_server()
    cfg = write_config(base / "vmrep.yaml", db, ctl.port)
    try:
        yield cfg, ids, sink, base
    finally:
        ctl.stop()
        forget_runtime(cfg)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dr_test_report_by_flow_run_id_to_a_file(env, capsys):
    cfg, ids, sink, base = env
    out = base / "out" / "erp-test.html"
    code, stdout, err = run(capsys, "report", "dr-test", "7d1c3a52-0000-4000-8000-000000000001",
                            "--out", str(out), "-c", str(cfg), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["ref"] == ids["erp_test"] and res["verdict"] == "PASS"
    assert Path(res["paths"]["html"]) == out and out.read_text().startswith("<!")
    for name in ("summary.csv", "vms.csv", "steps.csv"):
        p = Path(res["paths"][name])
        assert p.parent == out.parent and p.name.startswith("erp-test-") and p.stat().st_size > 0
    assert "email" not in res and not sink.envelopes  # no --email: nothing sent


def test_dr_test_report_latest_by_default_and_by_prefix(env, capsys):
    cfg, ids, sink, base = env
    code, stdout, err = run(capsys, "report", "dr-test", "-c", str(cfg), "--json")
    assert code == 0, err
    assert json.loads(stdout)["ref"] == ids["erp_test"]  # the latest test (20 Oct)
    # default folder: vmrep.d/reports beside the config
    assert Path(json.loads(stdout)["paths"]["html"]).parent == base / "vmrep.d" / "reports"
    code, stdout, err = run(capsys, "report", "dr-test", ids["hr_test"][:8], "-o", str(base / "o2"), "-c", str(cfg))
    assert code == 0, err
    assert "FAIL" in stdout and str(base / "o2") in stdout


def test_dr_test_report_errors_name_the_problem(env, capsys):
    cfg, ids, sink, base = env
    code, _, err = run(capsys, "report", "dr-test", "no-such-run", "-c", str(cfg))
    assert code != 0 and "no DR test with operation or flow run id 'no-such-run'" in err
    code, _, err = run(capsys, "report", "dr-test", ids["hr_move"], "-c", str(cfg))
    assert code != 0 and "is a move, not a DR test" in err


def test_compliance_report_since_and_email(env, capsys):
    cfg, ids, sink, base = env
    out = base / "comp" / "october.html"
    code, stdout, err = run(capsys, "report", "compliance", "--since", "2025-10-01", "--until", "2025-11-01",
                            "--out", str(out), "--email", "-c", str(cfg), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["kind"] == "compliance" and out.exists()
    assert any(k.endswith(".csv") for k in res["paths"])
    assert res["email"]["ok"] is True
    assert set(res["email"]["recipients"]) == {"erp-owner@example.com", "crm-owner@example.com",
                                               "dr-audit@example.com"}
    msg = email.message_from_bytes(sink.envelopes[-1].content, policy=policy.default)
    assert msg["Subject"] == res["subject"]
    assert any(p.get_filename() and p.get_filename().endswith(".csv") for p in msg.iter_attachments())
    # the delivery is recorded and listed
    code, stdout, err = run(capsys, "report", "emails", "-c", str(cfg), "--json")
    rows = json.loads(stdout)
    assert rows[-1]["ok"] is True and rows[-1]["kind"] == "compliance" and rows[-1]["report_path"] == str(out)


def test_compliance_report_relative_period_and_subset(env, capsys):
    cfg, ids, sink, base = env
    code, stdout, err = run(capsys, "report", "compliance", "--since", "30d", "--vpg", "hr", "-o",
                            str(base / "c30"), "-c", str(cfg), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["vpgs"] == ["hr"]
    code, _, err = run(capsys, "report", "compliance", "--vpg", "nope", "-c", str(cfg))
    assert code != 0 and "no VPG named 'nope'" in err
    code, _, err = run(capsys, "report", "compliance", "--since", "last tuesday", "-c", str(cfg))
    assert code != 0 and "--since: cannot read 'last tuesday'" in err


def test_a_failed_send_is_recorded_and_listed(env, capsys, monkeypatch):
    cfg, ids, sink, base = env
    dead = base / "dead.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["notifications"]["smtp_port"] = free_port()  # nobody listens there
    dead.write_text(yaml.safe_dump(data))
    import reports.mail as mail

    orig = mail.send_report
    monkeypatch.setattr(mail, "send_report", lambda *a, **k: orig(*a, **{**k, "wait_initial": 0.01,
                                                                        "wait_max": 0.02, "timeout": 2}))
    try:
        code, stdout, err = run(capsys, "report", "dr-test", "--email", "-c", str(dead), "-o", str(base / "dead"))
        assert code == 0, err  # the report is written; the failed email does not fail the command
        assert "email FAILED after 3 attempt(s)" in stdout and (base / "dead").is_dir()
        code, stdout, err = run(capsys, "report", "emails", "--failed", "-c", str(dead))
        assert "FAILED" in stdout and "ConnectionRefusedError" in stdout
    finally:
        forget_runtime(dead)


def test_periods():
    now = datetime(2025, 11, 17, 9, 30, tzinfo=timezone.utc)
    assert parse_period("previous-month", now) == (datetime(2025, 10, 1, tzinfo=timezone.utc),
                                                   datetime(2025, 11, 1, tzinfo=timezone.utc))
    assert parse_period("2024-12", now) == (datetime(2024, 12, 1, tzinfo=timezone.utc),
                                            datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert parse_period("2025-11", now)[1] == now
    assert parse_period("30d", now)[0] == datetime(2025, 10, 18, 9, 30, tzinfo=timezone.utc)
    for bad in ("2025-13", "2026-01", "0d", "soon"):
        with pytest.raises(ValueError):
            parse_period(bad, now)
    assert parse_when("12h", now, "x") == datetime(2025, 11, 16, 21, 30, tzinfo=timezone.utc)
    assert parse_when("2025-10-01", now, "x") == datetime(2025, 10, 1, tzinfo=timezone.utc)
    with pytest.raises(VmrepError):
        parse_when("yesterday-ish", now, "--since")


def test_reports_dir_env_wins(tmp_path, monkeypatch):
    from vmrep.config import load_config

    cfg_path = write_config(tmp_path / "vmrep.yaml", tmp_path / "s.db", 25)
    assert reports_dir(load_config(cfg_path)) == tmp_path / "vmrep.d" / "reports"
    monkeypatch.setenv("VMREP_REPORTS_DIR", str(tmp_path / "elsewhere"))
    assert reports_dir(load_config(cfg_path)) == tmp_path / "elsewhere"
