"""Emailing reports to a real SMTP server (aiosmtpd on loopback): plain, STARTTLS, SSL, down."""

from __future__ import annotations

import datetime as dt
import email
import ipaddress
import logging
import socket
import ssl
import time
from email import policy
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from reports import (
    MailError,
    build_compliance_report,
    build_dr_test_report,
    report_recipients,
    send_report,
)
from test_reports_data import EVIL_VM, NOW, SINCE, UNTIL, make_config, populate
from vmrep.state import StateStore

FAST = dict(wait_initial=0.01, wait_max=0.05, timeout=5)
PASSWORD = "s3cret-Pa55/word"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """An SMTP handler that keeps what it receives."""

    def __init__(self) -> None:
        self.envelopes = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 Message accepted"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((login, password))
        ok = login == "vmrep" and password == PASSWORD
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


def smtp_server(**kwargs):
    sink = Sink()
    if kwargs.pop("auth", False):
        kwargs["authenticator"] = sink.authenticate
    ctl = Controller(sink, hostname="127.0.0.1", port=free_port(), **kwargs)
    ctl.start()
    return ctl, sink


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (server context, path of the cert = the CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmrep test smtp")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    crt, pem = d / "cert.pem", d / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(crt, pem)
    return server_ctx, crt


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("maildb") / "state.db"
    store = StateStore.open(f"sqlite:///{path}")
    populate(store)
    yield store
    store.close()


@pytest.fixture(scope="module")
def reports(db, tmp_path_factory):
    cfg = make_config()
    out = tmp_path_factory.mktemp("out")
    dr = build_dr_test_report(db.engine, None, cfg, now=NOW)
    dr.write(out)
    comp = build_compliance_report(db.engine, SINCE, UNTIL, None, cfg, now=NOW)
    comp.write(out)
    return dr, comp


def deliveries(store):
    return store.frame("email_deliveries")


def parts(msg):
    """The MIME tree as nested (content type, [children]) for structure assertions."""
    if msg.is_multipart():
        return (msg.get_content_type(), [parts(p) for p in msg.iter_parts()])
    return msg.get_content_type()


# --------------------------------------------------------------------------- tests


def test_recipients_are_the_vpgs_email_to_then_the_default(reports):
    dr, comp = reports
    cfg = make_config(default_to=["dr-audit@example.com", "ERP-owner@example.com"])
    assert report_recipients(dr, cfg) == ["erp-owner@example.com", "dr-audit@example.com"]
    assert report_recipients(comp, make_config()) == [
        "erp-owner@example.com", "crm-owner@example.com", "dr-audit@example.com"]


def test_dr_report_is_received_as_multipart_with_text_html_charts_and_csv(db, reports):
    dr, _ = reports
    cfg = make_config()
    ctl, sink = smtp_server()
    try:
        cfg.notifications.smtp_port = ctl.port
        rcpt = report_recipients(dr, cfg)
        d = send_report(dr, rcpt, cfg.notifications, db, **FAST)
    finally:
        ctl.stop()
    assert d.ok and d.attempts == 1 and d.error is None
    assert len(sink.envelopes) == 1
    env = sink.envelopes[0]
    assert env.mail_from == "vmrep@dr.example.com"
    assert env.rcpt_tos == ["erp-owner@example.com", "dr-audit@example.com"]
    msg = email.message_from_bytes(env.content, policy=policy.default)
    assert msg["Subject"] == dr.subject and "DR test PASS" in msg["Subject"]
    assert msg["To"] == "erp-owner@example.com, dr-audit@example.com"
    assert msg["Message-ID"] == d.message_id
    assert parts(msg) == (
        "multipart/mixed",
        [
            ("multipart/alternative", ["text/plain", ("multipart/related", ["text/html", "image/png"])]),
            "text/csv", "text/csv", "text/csv",
        ],
    )
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    for s in ("PASS", "42 s", "10 min 12 s", "passed", dr.ref):
        assert s in text and s in html
    assert EVIL_VM in text
    assert "&lt;b&gt;evil&lt;/b&gt;&lt;script&gt;x&lt;/script&gt;" in html and "<script" not in html
    # the chart is an inline part referenced by cid:, no data: URI left in the mail
    img = next(p for p in msg.walk() if p.get_content_type() == "image/png")
    cid = img["Content-ID"].strip("<>")
    assert f'src="cid:{cid}"' in html and "data:image" not in html
    assert img.get_content()[:8] == b"\x89PNG\r\n\x1a\n"
    names = sorted(p.get_filename() for p in msg.iter_attachments())
    assert names == sorted(f"{dr.basename}-{n}.csv" for n in ("summary", "vms", "steps"))
    rows = deliveries(db)
    last = rows.iloc[-1]
    assert bool(last["ok"]) and last["kind"] == "dr_test" and last["ref"] == dr.ref
    assert last["recipients"] == "erp-owner@example.com, dr-audit@example.com"
    assert last["report_path"] == str(dr.paths["html"]) and last["attempts"] == 1


def test_compliance_report_mail_has_one_chart_per_vpg(db, reports):
    _, comp = reports
    cfg = make_config()
    ctl, sink = smtp_server()
    try:
        cfg.notifications.smtp_port = ctl.port
        d = send_report(comp, report_recipients(comp, cfg), cfg, db, **FAST)  # the whole Config works too
    finally:
        ctl.stop()
    assert d.ok
    msg = email.message_from_bytes(sink.envelopes[0].content, policy=policy.default)
    assert sum(1 for p in msg.walk() if p.get_content_type() == "image/png") == 3
    assert "not compliant" in msg.get_body(("plain",)).get_content()
    assert 'data-value="at risk"' in msg.get_body(("html",)).get_content()


def test_smtp_down_is_retried_recorded_and_not_raised(db, reports, caplog):
    dr, _ = reports
    cfg = make_config(smtp_port=free_port())  # nothing listens there
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="reports.mail"):
        d = send_report(dr, ["ops@example.com"], cfg.notifications, db, attempts=3, **FAST)
    assert time.monotonic() - t0 < 5
    assert not d.ok and d.attempts == 3
    assert "ConnectionRefusedError" in d.error
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2
    last = deliveries(db).iloc[-1]
    assert not bool(last["ok"]) and last["attempts"] == 3 and "ConnectionRefusedError" in last["error"]
    assert Path(last["report_path"]).read_text(encoding="utf-8") == dr.html  # the report stays on disk
    with pytest.raises(MailError, match="ConnectionRefusedError"):
        send_report(dr, ["ops@example.com"], cfg.notifications, db, attempts=1, raise_on_failure=True, **FAST)


def test_no_recipients_is_recorded_as_a_failure(db, reports):
    dr, _ = reports
    d = send_report(dr, [], make_config().notifications, db, **FAST)
    assert not d.ok and d.attempts == 0 and "no recipients" in d.error
    assert "no recipients" in deliveries(db).iloc[-1]["error"]


def test_starttls_with_login_from_a_secret_reference(db, reports, tls, monkeypatch, caplog):
    dr, _ = reports
    server_ctx, ca = tls
    client_ctx = ssl.create_default_context(cafile=str(ca))
    monkeypatch.setenv("VMREP_TEST_SMTP_PW", PASSWORD)
    ctl, sink = smtp_server(tls_context=server_ctx, require_starttls=True, auth=True, auth_require_tls=True)
    try:
        cfg = make_config(smtp_port=ctl.port, security="starttls", username="vmrep",
                          password="env:VMREP_TEST_SMTP_PW")
        with caplog.at_level(logging.DEBUG):
            d = send_report(dr, ["ops@example.com"], cfg.notifications, db, ssl_context=client_ctx, **FAST)
        assert d.ok, d.error
        assert sink.logins == [("vmrep", PASSWORD)]
        assert len(sink.envelopes) == 1
        assert all(PASSWORD not in r.getMessage() for r in caplog.records)

        # a wrong password is permanent: one attempt, recorded, the password nowhere
        monkeypatch.setenv("VMREP_TEST_SMTP_PW", "wrong-" + PASSWORD)
        d = send_report(dr, ["ops@example.com"], cfg.notifications, db, ssl_context=client_ctx, **FAST)
        assert not d.ok and d.attempts == 1 and "SMTPAuthenticationError" in d.error
        assert PASSWORD not in d.error

        # the secret missing: named by its reference, nothing sent
        monkeypatch.delenv("VMREP_TEST_SMTP_PW")
        d = send_report(dr, ["ops@example.com"], cfg.notifications, db, ssl_context=client_ctx, **FAST)
        assert not d.ok and d.attempts == 1
        assert "env:VMREP_TEST_SMTP_PW" in d.error and "not set" in d.error

        # an unverifiable certificate is refused (permanent, not retried)
        d = send_report(dr, ["ops@example.com"], cfg.notifications, db, **FAST)
        assert not d.ok and d.attempts == 1 and "CERTIFICATE_VERIFY_FAILED" in d.error
    finally:
        ctl.stop()
    assert len(sink.envelopes) == 1


def test_implicit_ssl(db, reports, tls):
    dr, _ = reports
    server_ctx, ca = tls
    ctl, sink = smtp_server(server_hostname="127.0.0.1", ssl_context=server_ctx)
    try:
        cfg = make_config(smtp_port=ctl.port, security="ssl")
        d = send_report(dr, ["ops@example.com"], cfg.notifications, db,
                        ssl_context=ssl.create_default_context(cafile=str(ca)), **FAST)
    finally:
        ctl.stop()
    assert d.ok, d.error
    assert len(sink.envelopes) == 1
