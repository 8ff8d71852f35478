"""Whether a recovery operation can reach the protected site: decided once per operation.

A failover is for the day the protected site is gone. Then every step that would talk
to it (reading the VMs' hardware, shutting the source VMs down) would pay a connect
timeout and its retries, one after the other. Instead the operation probes the site
once, bounded by the site's `connect_timeout_seconds` (`vsphere.connection.unreachable`),
and records the answer as its step `protected-site`; the steps after it, in this
process or a retry in another, read the record and stay away from a site found gone.
"""

from __future__ import annotations

import logging
from typing import Any

from vmrep.config import VPG
from vmrep.vsphere.connection import unreachable

log = logging.getLogger(__name__)

STEP = "protected-site"
# The warning a failover records (notes, step detail) when it skipped the shutdown policy.
SOURCE_NOT_SHUT_DOWN = "protected site unreachable: source VMs not shut down"


def recorded(store: Any, op_id: str) -> dict[str, Any] | None:
    """The decision recorded for operation `op_id` ({reachable, reason, site}), or None."""
    for s in store.steps(op_id):
        if s.step == STEP and s.result in ("ok", "skipped") and s.detail and "reachable" in s.detail:
            return dict(s.detail)
    return None


def protected_site_unreachable(rt: Any, vpg: VPG, op_id: str) -> str | None:
    """Why the protected site is unreachable for this operation (None: it answers).
    Probes at most once per operation; the first answer stands for the whole operation."""
    done = recorded(rt.store, op_id)
    if done is not None:
        return None if done["reachable"] else str(done.get("reason") or "unreachable")
    site = rt.config.site(vpg.protected_site)
    with rt.store.step(op_id, None, STEP) as h:
        reason = unreachable(site)
        h.detail.update(site=vpg.protected_site, reachable=reason is None, reason=reason)
        if reason is not None:
            log.warning("VPG %s: %s; this operation will not contact it again", vpg.name, reason)
    return reason


def is_unreachable(store: Any, op_id: str) -> bool:
    """What operation `op_id` decided (False when it never probed)."""
    d = recorded(store, op_id)
    return d is not None and not d["reachable"]
