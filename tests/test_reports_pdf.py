"""Reports an auditor can file: step details in words, and the reports as PDF.

The DR test is recorded through StateStore with the step names and detail shapes that
vmrep/recovery/steps.py and operations.py record; the PDFs are made by the `vmrep
report` commands and checked as pictures (pdftoppm) and as text (pdftotext).
"""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from reports import build_dr_test_report
from reports.details import describe
from test_report_cli import write_config
from test_reports_data import NOW, make_config, populate
from vmrep.cli import main
from vmrep.runtime import forget_runtime
from vmrep.state import StateStore

T0 = datetime(2025, 10, 28, 9, 0, tzinfo=UTC)
MIB = 2**20


def record_real_test(store: StateStore) -> str:
    """A DR test of erp as the recovery code records it (steps.py's names and details)."""
    op = store.start_operation("erp", "test", "alice@example.com", params={"checkpoint": "latest"}, started_at=T0)
    t = T0

    def step(vm: str | None, name: str, seconds: float, detail: dict, result: str = "ok") -> None:
        nonlocal t
        store.record_step(op, vm, name, result, started_at=t, ended_at=t + timedelta(seconds=seconds), detail=detail)
        t += timedelta(seconds=seconds)

    plan = {"vpg": "erp", "operation": "test", "operation_id": op, "kind": "test", "site": "dr",
            "checkpoint_id": "cp-0077", "checkpoint_time": (T0 - timedelta(seconds=40)).isoformat(),
            "folder": "vmrep-test-erp", "hardware_from": "source",
            "vms": [{"source": "erp-db", "name": "erp-db-test", "disks": [{"id": "scsi0:0"}]}],
            "groups": [{"name": "databases", "delay_seconds": 0, "vms": ["erp-db"]}]}
    step(None, "cleanup-leftovers", 0.3, {"removed_vms": [], "removed_folders": [], "reason": "nothing left over"},
         result="skipped")
    step(None, "plan", 0.5, {"plan": plan, "checkpoint": "cp-0077", "hardware_from": "source"})
    step(None, "pre-script", 1.2, {"command": "/opt/dr/quiesce.sh --vpg erp", "exit_code": 0, "seconds": 1.18,
                                   "output": "stopping batch jobs\nquiesced"})
    step("erp-db", "write-disks", 0.2, {
        "disks": [{"disk": "scsi0:0", "bytes_written": 24 * MIB, "seconds": 0.14, "skipped": False,
                   "bad_blocks": [], "bad_block_count": 0},
                  {"disk": "scsi0:1", "bytes_written": 0, "seconds": 0.0, "skipped": True,
                   "bad_blocks": [], "bad_block_count": 0}],
        "bytes_written": 24 * MIB})
    step("erp-db", "create-vm", 0.4, {"name": "erp-db-test", "moref": "vm-1042", "created": True})
    step("erp-db", "customize", 0.2, {"ips": ["10.20.0.5"]})
    step("erp-db", "power-on", 0.6, {"group": "databases"})
    step("erp-db", "verify", 2.5, {
        "guest": {"power": "poweredOn", "tools": "guestToolsRunning", "heartbeat": "green", "ip": "10.20.0.5",
                  "ips": ["10.20.0.5"]},
        "expected_ips": ["10.20.0.5"],
        "disks": [{"disk": "scsi0:0", "path": "[ds-dr] vmrep-test-erp/erp-db/scsi0-0-flat.vmdk", "blocks": 24,
                   "ok": True, "size_ok": True, "mismatch_count": 0, "mismatches": [], "seconds": 0.05}],
        "problems": [], "ok": True})
    step(None, "recovered", 0.0, {"rto_seconds": 5.9, "at": (T0 + timedelta(seconds=6)).isoformat()})
    step("erp-db", "remove-vm", 0.3, {"removed": ["erp-db-test"]})
    step(None, "remove-disks", 0.2, {"removed": ["[ds-dr] vmrep-test-erp"]})
    # a detail key no sentence knows: the fallback, in words with units
    step(None, "post-script", 0.1, {"command": "/opt/dr/resume.sh", "exit_code": 0, "seconds": 0.08, "output": "",
                                    "bytes_flushed": 3 * MIB, "wait_seconds": 1.5, "extra": {"a": [1, 2]}})
    store.finish_operation(op, "succeeded", ended_at=t, checkpoint_id="cp-0077",
                           checkpoint_time=T0 - timedelta(seconds=40), checkpoint_age_seconds=40.0,
                           rto_seconds=5.9, rto_target_seconds=900.0)
    store.add_test_result(op, "erp", started_at=T0, ended_at=t, success=True, verification_ok=True,
                          cleanup_ok=True, checkpoint_id="cp-0077", tested_by="alice@example.com")
    return op


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("reports-pdf")
    db = base / "state.db"
    store = StateStore.open(f"sqlite:///{db}")
    populate(store)
    op = record_real_test(store)
    cfg = write_config(base / "vmrep.yaml", db, 2525)  # no email is sent here
    try:
        yield store, op, cfg, base
    finally:
        store.close()
        forget_runtime(cfg)


class _Cells(HTMLParser):
    """The text of the last cell (detail / error) of each step row of table#steps."""

    def __init__(self) -> None:
        super().__init__()
        self.in_steps = False
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.details: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "steps":
            self.in_steps = True
        elif self.in_steps and tag == "tr" and "data-step" in a:
            self.row = []
        elif self.row is not None and tag == "td":
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None and self.row is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.details.append(self.row[-1])
            self.row = None
        elif tag == "table":
            self.in_steps = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


JSON_BITS = re.compile(r'\{|\[\{|": |\}')


def test_step_details_read_as_sentences_not_json(env, tmp_path):
    store, op, _, _ = env
    report = build_dr_test_report(store.engine, op, make_config(), now=NOW)
    parser = _Cells()
    parser.feed(report.html)
    details = [d for d in parser.details if d]
    assert len(details) >= 10, details
    for d in details:
        assert not JSON_BITS.search(d), d
    joined = "\n".join(details)
    assert "wrote 24 MiB to scsi0:0 in 0.14 s" in joined
    assert "scsi0:1 was written by an earlier try" in joined
    assert "created VM erp-db-test (vm-1042)" in joined
    assert "scsi0:0: all 24 blocks equal to the checkpoint" in joined
    assert "ran /opt/dr/quiesce.sh --vpg erp: exit code 0 in 1.2 s; last output line: quiesced" in joined
    assert "every VM recovered: RTO 5.9 s" in joined
    assert "skipped: nothing left over" in joined
    # the fallback for keys without a sentence: key: value, with units
    assert "bytes flushed: 3 MiB" in joined and "wait seconds: 1.5 s" in joined and "extra: (a 1, 2)" in joined
    # the text version says the same, without JSON
    text_details = [ln for ln in report.text.splitlines() if re.match(r"\s{4}[a-z-]+: ", ln)]
    assert any("wrote 24 MiB to scsi0:0 in 0.14 s" in ln for ln in text_details), report.text
    for ln in text_details:
        assert not JSON_BITS.search(ln), ln
    # the raw data stays in the steps CSV
    csv = report.csv_bytes()[f"{report.basename}-steps.csv"].decode()
    assert '""bytes_written"": 25165824' in csv


def test_a_detail_without_a_sentence_is_a_readable_list():
    text = describe("some-new-step", {"bytes_copied": 1536 * MIB, "took_seconds": 0.25, "done": True,
                                      "items": [{"disk": "scsi0:0"}]})
    assert text == "bytes copied: 1.5 GiB, took seconds: 0.25 s, done: yes, items: (disk scsi0:0)"
    assert describe("write-disks", None) == ""


def _page1(pdf: Path, tmp: Path) -> tuple[Path, str, str]:
    png_base = tmp / pdf.stem
    subprocess.run(["pdftoppm", "-f", "1", "-l", "1", "-r", "60", "-png", "-singlefile", str(pdf), str(png_base)],
                   check=True)
    first = subprocess.run(["pdftotext", "-f", "1", "-l", "1", "-layout", str(pdf), "-"], check=True,
                           capture_output=True, text=True).stdout
    info = subprocess.run(["pdfinfo", str(pdf)], check=True, capture_output=True, text=True).stdout
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    last = subprocess.run(["pdftotext", "-f", str(pages), "-l", str(pages), str(pdf), "-"], check=True,
                          capture_output=True, text=True).stdout
    assert f"Page {pages} of {pages}" in last, last
    return png_base.with_suffix(".png"), first, last


def _not_blank(png: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 10, f"{png} looks blank (pixel std {pixels.std():.1f})"
    assert (pixels < 128).mean() > 0.01, f"{png}: hardly any dark pixel (no text?)"


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_dr_test_report_as_pdf(env, capsys, tmp_path):
    _, op, cfg, _ = env
    code = main(["report", "dr-test", op, "--format", "pdf", "--out", str(tmp_path), "--config", str(cfg)])
    out = capsys.readouterr().out
    assert code == 0, out
    pdfs = list(tmp_path.glob("*.pdf"))
    assert len(pdfs) == 1 and not list(tmp_path.glob("*.html")), list(tmp_path.iterdir())
    assert list(tmp_path.glob("*-steps.csv")), "the CSVs are written with the PDF"
    assert pdfs[0].read_bytes().startswith(b"%PDF-")
    png, first, _ = _page1(pdfs[0], tmp_path)
    _not_blank(png)
    first = _flat(first)
    assert "2025-10-28 09:00:00 UTC to 2025-10-28 09:00:06 UTC" in first, first
    assert "Verdict rule. PASS when the test operation succeeded" in first, first
    assert "PASS" in first


def test_compliance_report_as_pdf(env, capsys, tmp_path):
    _, _, cfg, _ = env
    code = main(["report", "compliance", "--since", "2025-10", "--format", "pdf", "--out", str(tmp_path / "c.pdf"),
                 "--config", str(cfg)])
    out = capsys.readouterr().out
    assert code == 0, out
    pdf = tmp_path / "c.pdf"
    assert pdf.exists() and (tmp_path / "c-summary.csv").exists()
    png, first, _ = _page1(pdf, tmp_path)
    _not_blank(png)
    first = _flat(first)
    assert "Period 2025-10-01 00:00:00 UTC to 2025-11-01 00:00:00 UTC" in first, first
    assert "compliant at least 99 % of the period's samples meet the RPO target" in first, first
    assert "not compliant less than 95 %" in first and "at risk anything in between" in first


def test_default_format_is_still_html(env, capsys, tmp_path):
    _, op, cfg, _ = env
    assert main(["report", "dr-test", op, "--out", str(tmp_path), "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert list(tmp_path.glob("*.html")) and not list(tmp_path.glob("*.pdf"))


def test_an_unknown_format_is_one_line_and_exit_2(env, capsys, tmp_path):
    _, op, cfg, _ = env
    for cmd in (["dr-test", op], ["compliance"]):
        code = main(["report", *cmd, "--format", "docx", "--out", str(tmp_path), "--config", str(cfg)])
        cap = capsys.readouterr()
        assert code == 2
        lines = [ln for ln in (cap.err + cap.out).splitlines() if ln.strip()]
        assert lines == ["error: --format: no format 'docx' (choose html or pdf)"], lines
    assert not list(tmp_path.iterdir())
