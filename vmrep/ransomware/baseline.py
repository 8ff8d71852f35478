"""Suspicion from each disk's own history: the rule of docs/ransomware.md, as code.

Pure: it reads checkpoint descriptions (their `encryption` entry, `detect.ChangeStats`)
and the operators' dismissals, and returns per checkpoint and per disk a level
none|low|medium|high, the open incidents (a disk whose encrypted share jumped above its
baseline) and the last clean checkpoint. Nothing is stored: marks are derived again
from the journal each time, so a dismissal, a retention run or a restore of the journal
can never leave a stale mark behind.

Per disk, in checkpoint order:

- a checkpoint where the disk changed at least `min_changed_bytes` is a *sample*: its
  share = encrypted bytes / changed bytes. Full copies (initial sync, a new disk) are
  not samples: they show what the disk holds, not what is being written;
- baseline = the `quantile` of the last `window` clean samples, raised to at least the
  highest share an operator dismissed (a dismissal teaches the baseline); no baseline
  before `warmup` samples (the disk is learning: nothing above low);
- excess = share - baseline; level: high when excess >= `high_excess`, medium when
  >= `medium_excess`, low when >= `low_excess`; medium and high also need at least
  `min_encrypted_bytes` encrypted in that checkpoint (a few random blocks are noise);
- the first medium/high sample opens an *incident* on the disk: that checkpoint and
  every later one are suspect (at least the incident's level) until an operator
  dismisses it; suspect samples are not learnt from;
- a dismissal covers the checkpoints up to the newest when it was made: there the
  disk's levels are none, its samples are learnt (clean), and the highest dismissed
  share becomes a floor of the disk's baseline.

Levels of a VM and a VPG are the highest of their disks'. The last clean checkpoint is
the newest before the first checkpoint of the oldest open incident.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Sequence

LEVELS = ("none", "low", "medium", "high")
_RANK = {name: i for i, name in enumerate(LEVELS)}


def worst(levels: Iterable[str]) -> str:
    return max(levels, key=_RANK.__getitem__, default="none")


def at_least(level: str, threshold: str) -> bool:
    return _RANK[level] >= _RANK[threshold]


@dataclass(frozen=True)
class Rule:
    """The thresholds of the rule (module docstring). Defaults chosen in docs/ransomware.md."""

    window: int = 48
    quantile: float = 0.9
    warmup: int = 3
    low_excess: float = 0.15
    medium_excess: float = 0.30
    high_excess: float = 0.50
    min_changed_bytes: int = 1 << 20
    min_encrypted_bytes: int = 4 << 20
    # Only the newest `horizon` checkpoints are judged sample by sample (2 h at 10 s
    # cycles: 15x the window); older ones keep what was recorded (incidents are recorded
    # when found), so a cycle's judgement costs the same after a day of history.
    horizon: int = 720


@dataclass(frozen=True)
class Dismissal:
    """An operator's judgement: the suspicion of `vm` (one disk, or all when `disk` is
    None) up to checkpoint `through_seq` was a false alarm."""

    vm: str
    disk: str | None
    through_seq: int
    through_checkpoint: str
    reason: str
    by: str
    at: datetime

    def covers(self, vm: str, disk: str, seq: int) -> bool:
        return self.vm == vm and self.disk in (None, disk) and seq <= self.through_seq

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "disk": self.disk, "through_seq": self.through_seq,
                "through_checkpoint": self.through_checkpoint, "reason": self.reason, "by": self.by,
                "at": self.at.isoformat()}


@dataclass
class DiskPoint:
    """One disk at one checkpoint."""

    vm: str
    disk: str
    checkpoint: str
    seq: int
    time: datetime
    changed_bytes: int
    encrypted_bytes: int
    share: float | None  # None: not a sample (too little changed, or a full copy)
    baseline: float | None  # None: still learning
    level: str  # of this checkpoint's writes alone
    suspect: bool = False  # inside an open incident
    dismissed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "disk": self.disk, "changed_bytes": self.changed_bytes,
                "encrypted_bytes": self.encrypted_bytes,
                "encrypted_share": None if self.share is None else round(self.share, 4),
                "baseline": None if self.baseline is None else round(self.baseline, 4),
                "suspicion": self.level, "suspect": self.suspect, "dismissed": self.dismissed}


@dataclass
class Incident:
    """An open suspicion on one disk: where it began and how bad it is."""

    vm: str
    disk: str
    began_checkpoint: str
    began_seq: int
    began_at: datetime
    share: float  # the encrypted share of the checkpoint where it began
    baseline: float
    level: str  # the worst level seen since it began
    latest_share: float


@dataclass
class CheckpointView:
    id: str
    seq: int
    time: datetime
    suspicion: str
    encrypted_share: float
    changed_bytes: int
    encrypted_bytes: int
    suspect: bool
    disks: list[DiskPoint] = field(default_factory=list)


@dataclass
class Assessment:
    checkpoints: list[CheckpointView]
    incidents: list[Incident]
    last_clean: CheckpointView | None  # None when no checkpoint is clean (or none kept)

    @property
    def suspicion(self) -> str:
        """The VPG's level now: the worst open incident's (none when there is none)."""
        return worst(i.level for i in self.incidents)

    def vm_suspicion(self, vm: str) -> str:
        return worst(i.level for i in self.incidents if i.vm == vm)

    def disk_suspicion(self, vm: str, disk: str) -> str:
        return worst(i.level for i in self.incidents if i.vm == vm and i.disk == disk)

    def view(self, checkpoint_id: str) -> CheckpointView | None:
        return next((c for c in self.checkpoints if c.id == checkpoint_id), None)

    @property
    def first_suspect(self) -> CheckpointView | None:
        return next((c for c in self.checkpoints if c.suspect), None)


@dataclass
class _DiskState:
    history: deque[float]
    floor: float = 0.0
    incident: Incident | None = None
    ordered: list[float] = field(default_factory=list)  # `history` sorted: the quantile in O(1)

    def learn(self, share: float) -> None:
        if len(self.history) == self.history.maxlen:
            self.ordered.remove(self.history[0])  # the deque drops it on append
        self.history.append(share)
        bisect.insort(self.ordered, share)


def _quantile(s: list[float], q: float) -> float:
    """numpy.quantile's default (linear interpolation) of the sorted `s`, in O(1): the
    rule needs it once per disk and checkpoint over the whole kept history."""
    k = (len(s) - 1) * q
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def _level(excess: float, encrypted: int, rule: Rule) -> str:
    if excess >= rule.high_excess and encrypted >= rule.min_encrypted_bytes:
        return "high"
    if excess >= rule.medium_excess and encrypted >= rule.min_encrypted_bytes:
        return "medium"
    if excess >= rule.low_excess:
        return "low"
    return "none"


def assess(infos: Sequence[Any], dismissals: Sequence[Dismissal] = (), rule: Rule = Rule(),
           recorded: Sequence[Incident] = ()) -> Assessment:
    """`infos`: the VPG's kept checkpoints, oldest first (`CheckpointInfo`s). `recorded`:
    incidents found before (`dismissals.record_incident`): they stay open even when the
    history that showed them is gone (a hard limit, a shortened window), until dismissed."""
    states: dict[tuple[str, str], _DiskState] = {}
    split = max(0, len(infos) - rule.horizon)
    older, infos = infos[:split], infos[split:]
    pending = sorted((i for i in recorded
                      if not any(d.covers(i.vm, i.disk, i.began_seq) for d in dismissals)),
                     key=lambda i: i.began_seq)
    views: list[CheckpointView] = []
    for info in older:  # beyond the horizon: counts, and the recorded incidents' marks
        rows_ = (getattr(info, "encryption", None) or {}).get("disks", [])
        changed_ = sum(int(d.get("changed_bytes", 0)) for d in rows_)
        encrypted_ = sum(int(d.get("encrypted_bytes", 0)) for d in rows_)
        open_ = [i.level for i in pending if i.began_seq <= info.seq]
        views.append(CheckpointView(info.id, info.seq, info.time, worst(open_),
                                    round(encrypted_ / changed_, 4) if changed_ else 0.0,
                                    changed_, encrypted_, bool(open_)))
    for info in infos:
        enc = getattr(info, "encryption", None) or {}
        rows = {(d["vm"], d["disk"]): d for d in enc.get("disks", [])}
        keys = set(rows) | {k for k, s in states.items() if s.incident is not None} | \
            {(i.vm, i.disk) for i in pending if i.began_seq <= info.seq}
        points: list[DiskPoint] = []
        for key in sorted(keys):
            vm, disk = key
            st = states.setdefault(key, _DiskState(deque(maxlen=rule.window)))
            d = rows.get(key, {})
            changed, encrypted = int(d.get("changed_bytes", 0)), int(d.get("encrypted_bytes", 0))
            sample = changed >= rule.min_changed_bytes and not d.get("full")
            share = encrypted / changed if sample else None
            base: float | None = None
            if len(st.history) >= rule.warmup:
                base = max(_quantile(st.ordered, rule.quantile), st.floor)
            elif st.floor > 0:
                base = st.floor
            level = "none"
            if share is not None and base is not None:
                level = _level(share - base, encrypted, rule)
            p = DiskPoint(vm, disk, info.id, info.seq, info.time, changed, encrypted, share, base, level)
            dismissed = any(x.covers(vm, disk, info.seq) for x in dismissals)
            if dismissed and (st.incident is not None or at_least(level, "medium")):
                # A judged false alarm: learnt as clean, and its share becomes a floor
                p.dismissed, p.level = True, "none"
                st.incident = None
                if share is not None:
                    st.floor = max(st.floor, share)
            if st.incident is None and at_least(p.level, "medium"):
                assert share is not None and base is not None
                st.incident = Incident(vm, disk, info.id, info.seq, info.time, share, base, p.level, share)
            if st.incident is None and not dismissed:
                rec = next((i for i in pending if i.vm == vm and i.disk == disk and i.began_seq <= info.seq), None)
                if rec is not None:  # its evidence was dropped by retention: it stays open
                    st.incident = Incident(vm, disk, rec.began_checkpoint, rec.began_seq, rec.began_at, rec.share,
                                           rec.baseline, rec.level, rec.latest_share)
            if st.incident is not None:
                p.suspect = True
                st.incident.level = worst((st.incident.level, p.level))
                if share is not None:
                    st.incident.latest_share = share
            elif share is not None:
                st.learn(share)
            points.append(p)
        changed = sum(p.changed_bytes for p in points)
        encrypted = sum(p.encrypted_bytes for p in points)
        suspect = any(p.suspect for p in points)
        level = worst([p.level for p in points] + [states[(p.vm, p.disk)].incident.level  # type: ignore[union-attr]
                                                   for p in points if p.suspect])
        views.append(CheckpointView(info.id, info.seq, info.time, level,
                                    round(encrypted / changed, 4) if changed else 0.0,
                                    changed, encrypted, suspect, points))
    incidents = [s.incident for s in states.values() if s.incident is not None]
    seen = {(i.vm, i.disk) for i in incidents}
    if not infos:  # everything beyond the horizon (not with the default): the records alone
        incidents += [i for i in pending if (i.vm, i.disk) not in seen]
    incidents.sort(key=lambda i: (i.began_seq, i.vm, i.disk))
    last_clean: CheckpointView | None
    if incidents:
        first = incidents[0].began_seq
        before = [v for v in views if v.seq < first]
        last_clean = before[-1] if before else None
    else:
        last_clean = views[-1] if views else None
    return Assessment(views, incidents, last_clean)
