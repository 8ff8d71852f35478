"""Where reports are written and which period a compliance report covers: plain helpers
shared by the `vmrep report` commands and the report flows (free of Prefect, so the
CLI stays quick)."""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from vmrep.errors import VmrepError
from vmrep.stamps import utcnow


def reports_dir(config: Any) -> Path:
    """Where reports are written: $VMREP_REPORTS_DIR, else `vmrep.d/reports` beside the
    config file (or under $VMREP_HOME when the config was not read from a file)."""
    env = os.environ.get("VMREP_REPORTS_DIR")
    if env:
        return Path(env).resolve()
    source = getattr(config, "source", None)
    if source is not None:
        return Path(source).parent / "vmrep.d" / "reports"
    return Path(os.environ.get("VMREP_HOME") or ".vmrep").resolve() / "reports"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)")
_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_when(text: str, now: datetime, what: str) -> datetime:
    """A point in time: an ISO date/time (UTC when no zone is given), `now`, or a duration
    back from now (`30d`, `12h`)."""
    t = text.strip().lower()
    if t == "now":
        return now
    m = _DURATION.fullmatch(t)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        d = datetime.fromisoformat(text.strip())
    except ValueError:
        raise VmrepError(f"{what}: cannot read {text!r} (try 30d, 12h, 2025-10-01 or 2025-10-01T08:00)") from None
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d.astimezone(timezone.utc)


def parse_period(period: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """A compliance period as [since, until) in UTC.

    `previous-month` (the calendar month before now), `this-month` (its start until now),
    `YYYY-MM` (that month, until now if it is the current one), or a duration back from
    now: `30d`, `12h`, `90m`, `2w`.
    """
    now = (now or utcnow()).astimezone(timezone.utc)
    p = period.strip().lower()
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if p == "previous-month":
        prev = (month_start - timedelta(days=1)).replace(day=1)
        return prev, month_start
    if p == "this-month":
        return month_start, now
    m = re.fullmatch(r"(\d{4})-(\d{2})", p)
    if m:
        year, month = int(m.group(1)), int(m.group(2))
        if not 1 <= month <= 12:
            raise ValueError(f"period {period!r}: there is no month {month}")
        start = datetime(year, month, 1, tzinfo=timezone.utc)
        end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=timezone.utc)
        if start >= now:
            raise ValueError(f"period {period!r} has not started yet")
        return start, min(end, now)
    m = _DURATION.fullmatch(p)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if seconds <= 0:
            raise ValueError(f"period {period!r}: must be longer than zero")
        return now - timedelta(seconds=seconds), now
    raise ValueError(f"period {period!r}: use previous-month, this-month, YYYY-MM or a duration such as 30d")
