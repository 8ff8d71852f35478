"""A report as PDF, for filing: WeasyPrint lays out the report's print HTML (the same
content and charts as the HTML, charts as embedded PNGs; the period and the verdict rule
on the first page; page numbers from CSS @page counters in base.html.j2)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reports.report import Report

# WeasyPrint and fontTools log every font subset and unknown CSS property at INFO/WARNING:
# noise in a command's output, not something the reader of the PDF can act on.
for _name in ("weasyprint", "fontTools"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def render_pdf(report: Report) -> bytes:
    """The PDF bytes of a report (its print layout; the screen HTML when it has none)."""
    from weasyprint import HTML

    html = report.print_html or report.html
    # base_url: nothing is fetched (charts are data: URIs), but WeasyPrint wants one.
    return HTML(string=html, base_url=".").write_pdf()


__all__ = ["render_pdf"]
