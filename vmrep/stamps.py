"""When and by whom: the one clock and the one "who started this" of the code base.

Every record vmrep writes (operations, alerts, samples, report stamps) is an aware UTC
datetime from `utcnow`, and every operation names who started it with `started_by`,
so the CLI, the flows and the engine agree on both.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone


def utcnow() -> datetime:
    """Now, as an aware UTC datetime (the state database refuses naive ones)."""
    return datetime.now(timezone.utc)


def started_by(who: str | None = None, *, fallback: str = "unknown") -> str:
    """Who started an operation: `who` when given (a flow parameter, a UI user), else
    $VMREP_USER, else $USER, else `fallback` (the flows pass "prefect": a scheduled or
    UI-triggered run with neither variable set was started by Prefect)."""
    return who or os.environ.get("VMREP_USER") or os.environ.get("USER") or fallback
