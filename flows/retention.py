"""The journal's retention at a recovery site: `retention/<site>`, on the pool
`vmrep-<site>`, every few minutes (journal.retention_interval_seconds), applies the
retention of every VPG recovered at that site (engine.apply_retention: history window,
hard limit, retention_lock_hours, and everything back to the last clean checkpoint while
encryption is suspected), with the state database at hand, so that JOURNAL_HARD_LIMIT is
recorded and JOURNAL_LIMIT_LOCKED raised and cleared; the transitions go out as events at
the end, as the monitor's do.

Why here and not in the replicate cycle: the journal is at the recovery site, and the
protected site reaches it, when the sites differ, only through the journal service, whose
writer credential may never shorten history (docs/journal-service.md). A served replicate
run therefore applies no retention (flows/replicate.py); `vmrep replicate`/`vmrep sync` on
one machine still do after each cycle.

VPGs are retained one after another: retention may collect the journal's garbage, which
is journal-wide. A VPG whose retention fails does not stop the others; the run fails at
the end with one line per VPG that failed."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks.monitoring import emit_recorded
from tasks.retention import journal_retention
from vmrep.errors import ConfigError, VmrepError
from vmrep.runtime import get_runtime


def recovered_at(config: Any, site: str) -> list[str]:
    """The VPGs whose recovery site is `site`, in config order."""
    return [v.name for v in config.vpgs if v.recovery_site == site]


@flow(name="retention")
def retention(site: str, config: str = "vmrep.yaml", vpgs: list[str] | None = None) -> list[dict[str, Any]]:
    """Apply the journal's retention of the VPGs recovered at `site` (only `vpgs` when given)."""
    cfg = get_runtime(config).config
    cfg.site(site)  # one line naming an unknown site
    names = recovered_at(cfg, site)
    if vpgs:
        wrong = [n for n in vpgs if n not in names]
        if wrong:
            raise ConfigError(f"VPG {', '.join(wrong)}: not recovered at site {site} "
                              f"(its retention runs in retention/<its recovery site>)")
        names = [n for n in names if n in vpgs]
    log = get_run_logger()
    out: list[dict[str, Any]] = []
    failed: list[str] = []
    for name in names:
        state = journal_retention(config, name, return_state=True)
        if state.is_completed():
            r = state.result()
            out.append(r)
            log.info("VPG %s: history from %s, %d checkpoint(s) promoted, %d dropped by the hard limit%s",
                     name, r.get("base"), r.get("promoted", 0), r.get("dropped_by_limit", 0),
                     "; hard limit blocked by locked history" if r.get("lock_blocked_limit") else "")
        else:
            failed.append(f"VPG {name}: {state.message or state.name}")
    emit_recorded(config, return_state=True)  # JOURNAL_LIMIT_LOCKED and the like, as events now
    if failed:
        raise VmrepError("; ".join(failed), lines=failed)
    return out
