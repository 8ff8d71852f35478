"""The journal's retention at the recovery site (issue 12 §1): the `retention` flow, run
in process here against the session's Prefect test server, applies every bound of
engine.retention_bounds to the VPGs recovered at its site, on the journal directory, also
for a VPG its protected site reaches only through the journal service, with the state
database at hand: JOURNAL_LIMIT_LOCKED is raised while only locked history could meet the
hard limit, cleared when the limit can be honoured again. A cycle told not to apply
retention (a served replicate run) drops nothing and, while the alert is open, refuses.
Where the retention deployment runs (its pool) is read back in tests/test_pools.py."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving import forget_prefect_workers
from test_recovery import synced
from vmrep.errors import ConfigError, Refused
from vmrep.replication import engine
from vmrep.runtime import forget_runtime, get_runtime

MiB = 1 << 20
LOCK = "JOURNAL_LIMIT_LOCKED"
TINY = 1 / 1024 / 64  # GB: 16 KiB, far below what erp uses


def recovery_config(lab: Any, path: Path, *, service: bool = True, **erp: Any) -> Path:
    """The recovery site's config (siteB): the lab's, with erp's settings changed and siteB's
    journal service named, so that erp is replicated through the service as its protected
    site sees it (engine.is_remote) — the service itself is not needed at the recovery site.
    `service` False: the journal directory written directly (one machine)."""
    data = yaml.safe_load(lab.config_path.read_text())
    data["journal"]["path"] = str(lab.config.journal_path)  # the same journal wherever this file is
    if service:
        client = yaml.safe_load((lab.lab.dir / "journal-service" / "client.yaml").read_text())["journal_service"]
        data["sites"]["siteB"]["journal_service"] = client
    for v in data["vpgs"]:
        if v["name"] == "erp":
            v.update(erp)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    forget_runtime(path)  # the flow's runtime reads the file as it is now
    return path


@pytest.fixture(scope="module")
def erp(lab):  # type: ignore[no-untyped-def]
    """erp synced and three cycles taken by its protected site, writing the journal
    directory (the lab's config), retention left to the recovery site."""
    rt = lab.runtime()
    synced(rt, "erp")
    ctl = lab.control("siteA")
    rng = random.Random(7)
    for _ in range(3):
        ctl.guest_write("erp-db", 0, rng.randrange(8) * MiB, rng.randbytes(256 << 10))
        engine.run_cycle(rt, rt.config.vpg("erp"), retention=False)
    return lab


def lock_alerts(rt: Any) -> list[Any]:
    return [a for a in rt.store.open_alerts("erp") if a.code == LOCK]


def test_a_cycle_without_retention_drops_nothing(erp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = recovery_config(erp, tmp_path / "small.yaml", service=False, journal_hard_limit_gb=TINY)
    try:
        rt = get_runtime(cfg)  # erp with a hard limit that leaves only the newest checkpoint
        before = [c.id for c in rt.journal.checkpoints("erp")]
        assert len(before) >= 2
        r = engine.run_cycle(rt, rt.config.vpg("erp"), retention=False)
        assert [c.id for c in rt.journal.checkpoints("erp")] == before + [r.checkpoint_id]
        # the same cycle in one process (the CLI's) applies the VPG's retention after it
        r = engine.run_cycle(rt, rt.config.vpg("erp"))
        assert [c.id for c in rt.journal.checkpoints("erp")] == [r.checkpoint_id]
    finally:
        forget_runtime(cfg)


def test_the_retention_flow_holds_locked_history_and_raises_journal_limit_locked(
        erp, prefect_harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from flows.retention import retention

    prt = erp.runtime()  # the protected site's
    ctl = erp.control("siteA")
    for _ in range(2):  # history to keep or drop
        ctl.guest_write("erp-db", 0, 0, random.randbytes(256 << 10))
        engine.run_cycle(prt, prt.config.vpg("erp"), retention=False)
    kept = [c.id for c in prt.journal.checkpoints("erp")]
    assert len(kept) >= 3
    cfg = recovery_config(erp, tmp_path / "siteB.yaml", retention_lock_hours=1.0, journal_hard_limit_gb=TINY)
    rrt = get_runtime(cfg)
    assert engine.is_remote(rrt, "erp")  # as the protected site sees it: through the service
    try:
        out = retention("siteB", str(cfg))
        forget_prefect_workers()
        # erp is the one VPG recovered at siteB (files recovers at siteA)
        assert [r["vpg"] for r in out] == ["erp"]
        assert out[0]["lock_blocked_limit"] and out[0]["locked"] == len(kept)
        assert [c.id for c in prt.journal.checkpoints("erp")] == kept  # locked: nothing dropped
        [alert] = lock_alerts(rrt)
        assert alert.level == "error" and "replication paused" in alert.text
        # the protected site's served cycle (no retention of its own) refuses while it is open
        with pytest.raises(Refused, match="replication paused"):
            engine.run_cycle(prt, prt.config.vpg("erp"), retention=False)
        assert [c.id for c in prt.journal.checkpoints("erp")] == kept

        # the lock lifted (here the setting; in time the window moving on): the next run
        # honours the hard limit, drops the oldest history and clears the alert
        cfg = recovery_config(erp, cfg, journal_hard_limit_gb=TINY)
        rrt = get_runtime(cfg)
        [r] = retention("siteB", str(cfg), vpgs=["erp"])
        forget_prefect_workers()
        assert r["hard_limit_hit"] and not r["lock_blocked_limit"] and r["dropped_by_limit"] == len(kept) - 1
        assert [c.id for c in prt.journal.checkpoints("erp")] == kept[-1:]
        assert lock_alerts(rrt) == []
        engine.run_cycle(prt, prt.config.vpg("erp"), retention=False)  # cycles run again

        # bad input: one line naming the site or the VPG
        with pytest.raises(ConfigError, match="no site named 'siteZ'"):
            retention("siteZ", str(cfg))
        with pytest.raises(ConfigError, match="VPG files: not recovered at site siteB"):
            retention("siteB", str(cfg), vpgs=["files"])
        forget_prefect_workers()
    finally:
        forget_runtime(cfg)


def test_vmrep_journal_retention_applies_it_in_process(erp, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Without Prefect (cron at the recovery site): `vmrep journal retention` does what the
    retention run does, for a VPG replicated through the service too."""
    import json

    from vmrep.cli import main as cli_main

    prt = erp.runtime()
    for _ in range(2):
        erp.control("siteA").guest_write("erp-db", 0, 0, random.randbytes(64 << 10))
        engine.run_cycle(prt, prt.config.vpg("erp"), retention=False)
    kept = [c.id for c in prt.journal.checkpoints("erp")]
    assert len(kept) >= 2
    cfg = recovery_config(erp, tmp_path / "siteB.yaml", journal_hard_limit_gb=TINY)
    try:
        assert cli_main(["journal", "retention", "--site", "siteB", "--json", "--config", str(cfg)]) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert row["vpg"] == "erp" and row["dropped_by_limit"] == len(kept) - 1 and row["hard_limit_hit"]
        assert [c.id for c in prt.journal.checkpoints("erp")] == kept[-1:]
    finally:
        forget_runtime(cfg)


def test_a_new_checkpoint_waits_for_retention_but_not_for_another_writer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Retention now runs in a process of its own (the recovery site's retention run): a
    cycle's checkpoint that finds it holding the VPG waits for it (Journal.begin `wait`, as
    the engine and the journal service call it) instead of failing the cycle; another
    writer is still refused at once."""
    import threading
    import time

    from vmrep.errors import JournalLocked
    from vmrep.journal import Journal
    from vmrep.journal._sessions import open_session, vpg_lock

    j = Journal.open(tmp_path / "journal", block_size=4096)
    w = j.begin("g")
    w.set_disk_size("vm", "d", 4096)
    w.put_block("vm", "d", 0, b"x" * 4096)
    w.commit()
    held = threading.Event()

    def retention_holding(seconds: float) -> None:  # what journal/retention.py holds while it works
        lk = vpg_lock(j.chains.vpg_dir("g"), "g", 5.0, "retention")
        s = open_session(j.root, j.store, "retention", "g")
        held.set()
        time.sleep(seconds)
        s.close()
        lk.release()

    t = threading.Thread(target=retention_holding, args=(1.0,))
    t.start()
    held.wait(5)
    with pytest.raises(JournalLocked):
        j.begin("g")  # without waiting: refused, as before
    t0 = time.monotonic()
    w = j.begin("g", wait=10)
    waited = time.monotonic() - t0
    t.join()
    assert 0.5 < waited < 5, waited
    try:
        other = Journal.open(tmp_path / "journal")
        t0 = time.monotonic()
        with pytest.raises(JournalLocked, match="locked by another writer"):
            other.begin("g", wait=10)
        assert time.monotonic() - t0 < 2  # a writer holds it: no waiting
        other.close()
    finally:
        w.abort()
        j.close()
