"""The journal's retention as a Prefect task: one VPG's retention (one retry unit) at its
recovery site, where the journal is (flows/retention.py runs it for every VPG recovered
at a site, on that site's pool)."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.common import step_options
from vmrep.replication import engine
from vmrep.runtime import get_runtime


@task(name="journal-retention", **step_options())
def journal_retention(config: str, vpg: str) -> dict[str, Any]:
    """engine.apply_retention at the recovery site: history window, hard limit and the
    locks of engine.retention_bounds, with JOURNAL_HARD_LIMIT / JOURNAL_LIMIT_LOCKED
    recorded in the state database. Safe to repeat (retention is idempotent)."""
    rt = get_runtime(config)
    return engine.retention_summary(engine.apply_retention(rt, rt.config.vpg(vpg), at_recovery_site=True))
