"""Jinja rendering: HTML (autoescaped, CSS inlined for email clients) and plain text."""

from __future__ import annotations

import html as html_lib
import math
from datetime import datetime
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import css_inline
import jinja2
import pandas as pd

TEMPLATES = Path(__file__).parent / "templates"

GOOD = {"ok", "succeeded", "pass", "passed", "compliant", "true", "yes", "met"}
BAD = {"failed", "fail", "not compliant", "false", "no", "error", "missed", "overdue"}
WARN = {"at risk", "warning", "cancelled", "not met"}
INFO = {"running", "in progress"}


def missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def fmt_dt(value: Any, with_zone: bool = True) -> str:
    if missing(value):
        return "—"
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if with_zone else "")


def fmt_duration(seconds: Any) -> str:
    if missing(seconds):
        return "—"
    s = float(seconds)
    neg = s < 0
    s = abs(s)
    if s < 60:
        out = f"{s:.0f} s" if s >= 10 or s == int(s) else f"{s:.1f} s"
    elif s < 3600:
        m, sec = divmod(int(round(s)), 60)
        out = f"{m} min {sec:02d} s" if sec else f"{m} min"
    elif s < 86400:
        h, rem = divmod(int(round(s)), 3600)
        out = f"{h} h {rem // 60:02d} min" if rem // 60 else f"{h} h"
    else:
        d, rem = divmod(int(round(s)), 86400)
        out = f"{d} d {rem // 3600} h" if rem // 3600 else f"{d} d"
    return ("-" if neg else "") + out


def fmt_pct(share: Any, digits: int = 1) -> str:
    if missing(share):
        return "—"
    v = float(share) * 100
    if v != 100 and round(v, digits) == 100:
        return f"{math.floor(v * 10**digits) / 10**digits:.{digits}f} %"
    return f"{v:.{digits}f} %"


def fmt_bytes(n: Any) -> str:
    if missing(n):
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_bool(value: Any, yes: str = "yes", no: str = "no", unknown: str = "—") -> str:
    if missing(value):
        return unknown
    return yes if bool(value) else no


def data_value(value: Any) -> str:
    """The machine-readable form put in `data-value` attributes."""
    if missing(value):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime, pd.Timestamp)):
        ts = pd.Timestamp(value)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        return ts.isoformat()
    if isinstance(value, float):
        return repr(float(value))
    try:  # numpy scalars
        import numpy as np

        if isinstance(value, np.bool_):
            return "true" if bool(value) else "false"
        if isinstance(value, np.integer):
            return str(int(value))
        if isinstance(value, np.floating):
            return repr(float(value))
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def tone(value: Any) -> str:
    """CSS class for a result/verdict word: good, bad, warn, info or muted."""
    if isinstance(value, bool):
        return "good" if value else "bad"
    if missing(value):
        return "muted"
    v = str(value).strip().lower()
    if v in GOOD:
        return "good"
    if v in BAD:
        return "bad"
    if v in WARN:
        return "warn"
    if v in INFO:
        return "info"
    return "muted"


def text_table(rows: list[list[Any]], headers: list[str], indent: int = 2) -> str:
    """A plain-text table with aligned columns (for the text/plain email part)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    pad = " " * indent
    lines = [pad + "  ".join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip()]
    lines.append(pad + "  ".join("-" * w for w in widths))
    for r in cells[1:]:
        lines.append(pad + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _filters(env: jinja2.Environment) -> None:
    env.filters.update(
        dt=fmt_dt,
        duration=fmt_duration,
        pct=fmt_pct,
        size=fmt_bytes,
        yesno=fmt_bool,
        dv=data_value,
        tone=tone,
        missing=missing,
    )
    env.globals.update(text_table=text_table, missing=missing)


@lru_cache(maxsize=1)
def html_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every value is escaped unless marked safe in code
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    _filters(env)
    return env


@lru_cache(maxsize=1)
def text_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    _filters(env)
    return env


_INLINER = css_inline.CSSInliner(
    keep_style_tags=False,
    keep_at_rules=True,  # @media print/screen stay in a <style> for clients that read it
    load_remote_stylesheets=False,
)


class _AttributeEscaper(HTMLParser):
    """Re-emit HTML unchanged except that attribute values are fully escaped.

    css_inline serialises with html5ever, which (like HTML5 serialisers before 2025)
    leaves `<` and `>` raw inside quoted attribute values: valid, and browsers read it as
    text, but a VM called `<script>` would then appear as raw markup in an attribute,
    which regex-based email sanitisers may mangle (mutation XSS). Everything else is
    passed through byte for byte.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.out: list[str] = []

    def _tag(self, tag: str, attrs: list[tuple[str, str | None]], close: str) -> None:
        parts = [tag]
        for k, v in attrs:
            parts.append(k if v is None else f'{k}="{html_lib.escape(v, quote=True)}"')
        self.out.append("<" + " ".join(parts) + close)

    def handle_starttag(self, tag, attrs):
        self._tag(tag, attrs, ">")

    def handle_startendtag(self, tag, attrs):
        self._tag(tag, attrs, " />")

    def handle_endtag(self, tag):
        self.out.append(f"</{tag}>")

    def handle_data(self, data):
        self.out.append(data)

    def handle_entityref(self, name):
        self.out.append(f"&{name};")

    def handle_charref(self, name):
        self.out.append(f"&#{name};")

    def handle_comment(self, data):
        self.out.append(f"<!--{data}-->")

    def handle_decl(self, decl):
        self.out.append(f"<!{decl}>")

    def handle_pi(self, data):
        self.out.append(f"<?{data}>")

    def unknown_decl(self, data):
        self.out.append(f"<![{data}]>")


def escape_attributes(html: str) -> str:
    p = _AttributeEscaper()
    p.feed(html)
    p.close()
    return "".join(p.out)


def render_html(template: str, **context: Any) -> str:
    html = html_env().get_template(template).render(**context)
    return escape_attributes(_INLINER.inline(html))


def render_print(template: str, **context: Any) -> str:
    """The HTML for the PDF: the print layout (`for_print`), CSS left in its <style>
    (WeasyPrint reads it, and its @page rules cannot be inlined)."""
    return html_env().get_template(template).render(**context, for_print=True)


def render_text(template: str, **context: Any) -> str:
    return text_env().get_template(template).render(**context)


def render_report(name: str, **context: Any) -> tuple[str, str, str]:
    """A report's three renderings from its templates `<name>.html.j2` and `<name>.txt.j2`:
    (e-mail HTML, plain text, print HTML for the PDF)."""
    return (render_html(f"{name}.html.j2", **context), render_text(f"{name}.txt.j2", **context),
            render_print(f"{name}.html.j2", **context))
