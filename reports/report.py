"""The Report object every builder returns: HTML, plain text, key figures, frames."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd


FORMATS = ("html", "pdf")  # what Report.write (and `vmrep report … --format`) writes


@dataclass
class Report:
    kind: str  # "dr_test" | "compliance"
    ref: str  # operation id, or the period and VPGs: what email_deliveries.ref records
    title: str
    subject: str
    html: str
    text: str
    figures: dict[str, Any]  # key figures, JSON-able (also the artifact table)
    frames: dict[str, pd.DataFrame]  # name -> frame, each written as <basename>-<name>.csv
    vpgs: list[str]  # the VPGs it is about (whose email_to receive it)
    basename: str
    generated_at: datetime
    verdict: str = ""
    print_html: str = ""  # the print layout, made into the PDF (reports.pdf)
    paths: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a flow returns about the report (JSON-able: Prefect stores it)."""
        return {"kind": self.kind, "ref": self.ref, "title": self.title, "subject": self.subject,
                "verdict": self.verdict, "vpgs": list(self.vpgs),
                "paths": {k: str(v) for k, v in self.paths.items()}}

    def csv_bytes(self) -> dict[str, bytes]:
        """File name -> CSV content, for each frame."""
        return {f"{self.basename}-{name}.csv": _csv(df).encode("utf-8") for name, df in self.frames.items()}

    def write(self, out: Path | str, fmt: str = "html") -> dict[str, Path]:
        """Write the document (HTML, or PDF when fmt is "pdf") and the CSVs. `out` is a
        directory, or the document's path (.html/.htm/.pdf: the CSVs go beside it).

        Returns {"html" or "pdf": path, "<frame>.csv": path, ...}. Each file is written to
        a temporary name and renamed into place: a reader never sees half a report.
        """
        if fmt not in FORMATS:
            raise ValueError(f"no report format {fmt!r} (choose {', '.join(FORMATS)})")
        out = Path(out)
        if out.suffix.lower() in (".html", ".htm", ".pdf"):
            folder = out.parent
            stem = out.stem
            same = out.suffix.lower() in ((".html", ".htm") if fmt == "html" else (".pdf",))
            doc_path = out if same else out.with_suffix(f".{fmt}")
        else:
            folder = out
            stem = self.basename
            doc_path = folder / f"{stem}.{fmt}"
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "pdf":
            from reports.pdf import render_pdf  # WeasyPrint is imported only for a PDF

            data = render_pdf(self)
        else:
            data = self.html.encode("utf-8")
        paths: dict[str, Path] = {fmt: doc_path}
        _atomic_write(doc_path, data)
        for name, df in self.frames.items():
            p = folder / f"{stem}-{name}.csv"
            _atomic_write(p, _csv(df).encode("utf-8"))
            paths[f"{name}.csv"] = p
        self.paths = paths
        return dict(paths)


def _csv(df: pd.DataFrame) -> str:
    out = df.copy()
    for col in out.columns:
        if isinstance(out[col].dtype, pd.DatetimeTZDtype):
            out[col] = out[col].map(lambda v: "" if pd.isna(v) else v.isoformat())
    return out.to_csv(index=False, lineterminator="\n")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def slug(text: str, maxlen: int = 60) -> str:
    """Lowercase letters, digits and dashes (file names, Prefect artifact keys)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:maxlen].rstrip("-")) or "x"
