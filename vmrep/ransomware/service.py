"""Suspicion put to work: alerts, dismissals, the latest clean checkpoint, retention.

Engine code (no Prefect). The replication cycle calls `refresh_alerts` after each
checkpoint; the monitor passes `suspicions` to `vmrep.health.evaluate` as a fact, so both
keep the same ENCRYPTION_SUSPECTED alerts open; the transitions go through
`vmrep.health.apply_transitions` like every alert's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vmrep import stamps
from vmrep.errors import JournalError, NotFound, Refused
from vmrep.health import EncryptionSuspicion, Transition, apply_transitions, encryption_alerts
from vmrep.ransomware import dismissals
from vmrep.ransomware.baseline import Assessment, Dismissal, assess

CODE = "ENCRYPTION_SUSPECTED"


def assess_vpg(journal: Any, vpg: str, infos: list[Any] | None = None) -> Assessment:
    """The VPG's suspicion over its kept checkpoints, with the dismissals on record."""
    if infos is None:
        infos = journal.checkpoints(vpg)
    vdir = journal.chains.vpg_dir(vpg)
    return assess(infos, dismissals.load_dir(vdir), recorded=dismissals.load_incidents_dir(vdir))


def suspicions(a: Assessment) -> list[EncryptionSuspicion]:
    clean = a.last_clean
    return [EncryptionSuspicion(i.vm, i.disk, i.level, i.began_checkpoint, i.began_at, i.share, i.baseline,
                                clean.id if clean else None, clean.time if clean else None)
            for i in a.incidents]


def refresh_alerts(store: Any, journal: Any, vpg: str, now: datetime | None = None,
                   a: Assessment | None = None) -> list[Transition]:
    """Raise or clear the VPG's ENCRYPTION_SUSPECTED alerts to match the journal."""
    a = a or assess_vpg(journal, vpg)
    for i in a.incidents:
        dismissals.record_incident(journal, vpg, i)
    return apply_transitions(store, vpg, encryption_alerts(vpg, suspicions(a)), now or stamps.utcnow(),
                             codes=frozenset({CODE}))


def latest_clean(journal: Any, vpg: str) -> tuple[Any, str]:
    """The checkpoint `latest-clean` names, and why it was chosen (one sentence)."""
    infos = journal.checkpoints(vpg)
    if not infos:
        raise JournalError(f"VPG {vpg}: no checkpoint in the journal (ref 'latest-clean')")
    a = assess_vpg(journal, vpg, infos)
    if not a.incidents:
        return infos[-1], "latest-clean: no encryption suspected, so the newest checkpoint"
    first = a.incidents[0]
    if a.last_clean is None:
        raise JournalError(f"VPG {vpg}: no clean checkpoint kept: encryption is suspected on VM {first.vm} "
                           f"disk {first.disk} since the oldest kept checkpoint {first.began_checkpoint}")
    chosen = next(i for i in infos if i.id == a.last_clean.id)
    where = ", ".join(f"{i.vm} {i.disk} ({100 * i.share:.0f} % encrypted)" for i in a.incidents)
    return chosen, (f"latest-clean: last clean before {first.began_at:%Y-%m-%d %H:%M:%S} UTC, the newest "
                    f"checkpoint before {first.began_checkpoint}, where encryption became suspected on {where}")


def choose(journal: Any, vpg: str, ref: str) -> tuple[Any, str]:
    """The checkpoint `ref` names and, for the refs that pick one, why it was chosen
    (kept in the operation's record and shown in its report)."""
    if ref == "latest-clean":
        return latest_clean(journal, vpg)
    cp = journal.checkpoint(vpg, ref)
    if ref == "latest":
        return cp, "latest: the newest checkpoint"
    if ref == "latest-tagged":
        return cp, f"latest-tagged: the newest tagged checkpoint ({', '.join(cp.tags)})"
    return cp, f"as asked ({ref})"


def annotate(rows: list[dict[str, Any]], a: Assessment) -> list[dict[str, Any]]:
    """`vmrep checkpoints --json` rows (by id) with each checkpoint's `suspicion`,
    `encrypted_share`, `suspect`, and the "last clean before <time>" tag."""
    first = a.incidents[0] if a.incidents else None
    for r in rows:
        v = a.view(r["id"])
        if v is None:
            continue
        r["suspicion"] = v.suspicion
        r["encrypted_share"] = v.encrypted_share
        r["suspect"] = v.suspect
        r["encryption"] = [p.to_json() for p in v.disks]
        if first is not None and a.last_clean is not None and v.id == a.last_clean.id:
            r["tags"] = list(r.get("tags", [])) + [f"last clean before {first.began_at:%Y-%m-%d %H:%M:%S} UTC"]
        for d in r.get("disks", []) if isinstance(r.get("disks"), list) else []:
            # the per-disk rows of `checkpoints --json` (vm, disk, method, bytes_read) get theirs
            p = next((p for p in v.disks if p.vm == d.get("vm") and p.disk == d.get("disk")), None)
            if p is None:  # nothing changed on that disk in this checkpoint
                d["suspicion"], d["encrypted_share"] = "none", None
            else:
                d["suspicion"] = "none" if p.dismissed else (a.disk_suspicion(p.vm, p.disk) if p.suspect else p.level)
                d["encrypted_share"] = None if p.share is None else round(p.share, 4)
    return rows


def keep_since(journal: Any, vpg: str) -> datetime | None:
    """While a suspicion is open, retention keeps everything back to the last clean
    checkpoint (or all kept history when none is clean): the time to keep from."""
    infos = journal.checkpoints(vpg)
    a = assess_vpg(journal, vpg, infos)
    if not a.incidents:
        return None
    return a.last_clean.time if a.last_clean is not None else (infos[0].time if infos else None)


def dismiss(store: Any, journal: Any, vpg: str, vm: str, disk: str | None, reason: str,
            who: str | None = None, now: datetime | None = None) -> tuple[Dismissal, list[Transition]]:
    """Record that the suspicion of `vm` (`disk`, or all its disks) is a false alarm, up
    to the newest checkpoint: clears the alerts and marks, teaches the baseline."""
    infos = journal.checkpoints(vpg)
    a = assess_vpg(journal, vpg, infos)
    mine = [i for i in a.incidents if i.vm == vm and (disk is None or i.disk == disk)]
    if not mine:
        known = {(p.vm, p.disk) for v in a.checkpoints for p in v.disks}
        if disk is not None and (vm, disk) not in known and not any(k[0] == vm for k in known):
            raise NotFound(f"VPG {vpg}: VM {vm} has no disk in the journal")
        if disk is not None and (vm, disk) not in known:
            raise NotFound(f"VPG {vpg}: VM {vm} has no disk {disk!r} in the journal")
        what = f"VM {vm} disk {disk}" if disk else f"VM {vm}"
        raise Refused(f"VPG {vpg}: no encryption suspected on {what}; nothing to dismiss")
    now = now or stamps.utcnow()
    d = Dismissal(vm=vm, disk=disk, through_seq=infos[-1].seq, through_checkpoint=infos[-1].id,
                  reason=reason, by=who or stamps.started_by(), at=now)
    dismissals.record(journal, vpg, d)
    return d, refresh_alerts(store, journal, vpg, now)
