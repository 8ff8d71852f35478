"""Operators' dismissals, kept in the journal beside the VPG's checkpoints.

Why the journal and not the state database: suspicion is derived from the checkpoints'
own counts, so keeping the judgements next to them makes `latest-clean` resolvable from
the journal alone (a restore-disk on a machine with only the journal mounted, a journal
restored from a copy); and one file per dismissal needs neither a migration nor a
read-modify-write: `vpgs/<vpg>/ransomware/<time>-<rand>.json`, published atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vmrep.journal._fs import ensure_dir, publish, rand_hex
from vmrep.journal.results import parse_time
from vmrep.ransomware.baseline import Dismissal, Incident

SUBDIR = "ransomware"


def load_dir(vpg_dir: Path) -> list[Dismissal]:
    d = vpg_dir / SUBDIR
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("2*.json")):  # dismissals are named by their time
        try:
            x = json.loads(p.read_text())
            out.append(Dismissal(vm=x["vm"], disk=x.get("disk"), through_seq=int(x["through_seq"]),
                                 through_checkpoint=x["through_checkpoint"], reason=x["reason"], by=x["by"],
                                 at=parse_time(x["at"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged record must not stop recovery; it just teaches nothing
    return out


def load(journal: Any, vpg: str) -> list[Dismissal]:
    return load_dir(journal.chains.vpg_dir(vpg))


def record(journal: Any, vpg: str, d: Dismissal) -> Path:
    vdir = journal.chains.vpg_dir(vpg)
    ensure_dir(vdir / SUBDIR)
    name = f"{d.at.strftime('%Y%m%dT%H%M%S%fZ')}-{rand_hex(3)}.json"
    dest = vdir / SUBDIR / name
    publish(journal.root / "tmp", dest, json.dumps(d.to_json(), indent=1).encode())
    return dest



def load_incidents_dir(vpg_dir: Path) -> list[Incident]:
    """Incidents recorded when they were found: they outlive the checkpoints that showed
    them (retention, a shortened history), so a suspicion is never forgotten silently."""
    d = vpg_dir / SUBDIR
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("incident-*.json")):
        try:
            x = json.loads(p.read_text())
            out.append(Incident(x["vm"], x["disk"], x["began_checkpoint"], int(x["began_seq"]),
                                parse_time(x["began_at"]), float(x["share"]), float(x["baseline"]), x["level"],
                                float(x["share"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def record_incident(journal: Any, vpg: str, i: Incident) -> bool:
    """Record an incident once (named by checkpoint and disk); False if it was already."""
    import hashlib

    vdir = journal.chains.vpg_dir(vpg)
    key = hashlib.blake2s(f"{i.vm}\0{i.disk}".encode(), digest_size=6).hexdigest()
    dest = vdir / SUBDIR / f"incident-{i.began_seq:08d}-{key}.json"
    if dest.exists():
        return False
    ensure_dir(vdir / SUBDIR)
    body = {"vm": i.vm, "disk": i.disk, "began_checkpoint": i.began_checkpoint, "began_seq": i.began_seq,
            "began_at": i.began_at.isoformat(), "share": i.share, "baseline": i.baseline, "level": i.level}
    publish(journal.root / "tmp", dest, json.dumps(body, indent=1).encode())
    return True
