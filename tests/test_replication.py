"""Replication against the lab: data really moves, every kept checkpoint rebuilds exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrep.errors import TransientError, VSphereError
from vmrep.replication import engine
from vmrep.runtime import Runtime, forget_runtime, get_runtime
from vmrep.vsphere.datastore import LocalDatastore

MiB = 1024 * 1024


def flat_files(rt: Runtime, vpg: str) -> dict[tuple[str, str], Path]:
    v = rt.config.vpg(vpg)
    local = LocalDatastore(rt.config.site(v.protected_site).datastore_mounts)
    return {(name, d.id): local.local(d.flat) for name, vm in engine.vpg_vms(rt, v).items() for d in vm.disks}


def synced(rt: Runtime, vpg: str) -> engine.CycleResult:
    r = engine.initial_sync(rt, rt.config.vpg(vpg))
    rt.store.update_runtime(vpg, initial_sync_done=True)
    return r


def rebuild(rt: Runtime, vpg: str, cp: str, vm: str, disk: str, out: Path) -> bytes:
    rt.journal.restore_disk(vpg, cp, vm, disk, out)
    return out.read_bytes()


def test_initial_sync_then_cycles_rebuild_exactly(fresh_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rt = fresh_lab.runtime()
    files = flat_files(rt, "erp")
    first = synced(rt, "erp")
    total = sum(p.stat().st_size for p in files.values())
    # CBT on: only the allocated areas (changeId "*") are read; the seeded zeros are holes.
    assert 0 < first.bytes_read < total
    assert {s.method for t in first.vms.values() for s in t.disks.values()} == {"full"}
    # Zero regions cost nothing; random regions are stored once, the block shared by all VMs once.
    assert 0 < first.bytes_stored < total // 2
    saved = {first.checkpoint_id: {k: p.read_bytes() for k, p in files.items()}}
    rng = random.Random(5)
    for _ in range(3):
        for (vm, disk), p in files.items():
            for _ in range(rng.randrange(0, 4)):
                fresh_lab.guest_write(vm, disk, rng.randrange(p.stat().st_size - 4096), rng.randbytes(4096))
        r = engine.run_cycle(rt, rt.config.vpg("erp"))
        saved[r.checkpoint_id] = {k: p.read_bytes() for k, p in files.items()}
        assert r.bytes_stored <= r.blocks_changed * MiB + 4096
    for cp, disks in saved.items():
        for (vm, disk), data in disks.items():
            assert rebuild(rt, "erp", cp, vm, disk, tmp_path / "x.img") == data, (cp, vm, disk)
    # No replication snapshot is left on any VM.
    assert all(not vm.snapshots for vm in engine.vpg_vms(rt, rt.config.vpg("erp")).values())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 1), st.integers(1, 300_000),
                                          st.booleans()), max_size=6), min_size=1, max_size=4))
def test_random_writes_between_cycles(lab, tmp_path: Path, writes) -> None:  # type: ignore[no-untyped-def]
    """Random writes (data or zeros) on several disks of several VMs between cycles; every kept
    checkpoint of every disk is rebuilt and compared byte for byte with the copy saved then."""
    rt = lab.runtime()
    v = rt.config.vpg("erp")
    if not rt.store.runtime("erp").initial_sync_done:
        synced(rt, "erp")
    files = flat_files(rt, "erp")
    keys = sorted(files)
    rng = random.Random(len(writes))
    saved = {}
    for cycle in writes:
        for disk_i, where, length, zeros in cycle:
            key = keys[disk_i % len(keys)]
            size = files[key].stat().st_size
            off = int(where * (size - length))
            lab.guest_write(*key, off, bytes(length) if zeros else rng.randbytes(length))
        r = engine.run_cycle(rt, v)
        saved[r.checkpoint_id] = {k: files[k].read_bytes() for k in keys}
    kept = {c.id for c in rt.journal.checkpoints("erp")}
    for cp, disks in saved.items():
        assert cp in kept
        for (vm, disk), data in disks.items():
            assert rebuild(rt, "erp", cp, vm, disk, tmp_path / "r.img") == data


def test_dedup_across_vms(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    rt = fresh_lab.runtime()
    files = flat_files(rt, "erp")
    same = random.Random(1).randbytes(4 * MiB)
    for vm, disk in files:
        fresh_lab.guest_write(vm, disk, 2 * MiB, same)
    before = synced(rt, "erp")
    # A second VPG protecting other VMs with the same bytes stores nothing new for them.
    local = LocalDatastore(rt.config.site("siteA").datastore_mounts)
    files01 = {d.id: local.local(d.flat) for d in engine.vpg_vms(rt, rt.config.vpg("files"))["files-01"].disks}
    fresh_lab.guest_write("files-01", "scsi0:0", 0, bytes(files01["scsi0:0"].stat().st_size))  # zero it all...
    fresh_lab.guest_write("files-01", "scsi0:0", 8 * MiB, same)  # ...but for the shared 4 MiB
    fresh_lab.guest_write("files-01", "scsi0:1", 0, bytes(files01["scsi0:1"].stat().st_size))
    r = synced(rt, "files")
    assert before.bytes_stored > 4 * MiB
    assert r.bytes_stored == 0


def test_kill_mid_initial_sync_then_rerun_sends_only_the_rest(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    rt = fresh_lab.runtime()
    v = rt.config.vpg("erp")
    ctl = fresh_lab.control("siteA")
    # Reads go through /folder for this test, so the fault lands on the 3rd VM's disk read.
    cfg_path = without_mounts(fresh_lab, "siteA")
    rt_http = get_runtime(cfg_path)
    ctl.fault("DatastoreFile.GET", "http503", count=0, match="erp-web")
    try:
        with pytest.raises(TransientError):
            engine.initial_sync(rt_http, rt_http.config.vpg("erp"))
    finally:
        ctl.clear_faults()
    assert rt_http.journal.checkpoints("erp") == []  # nothing half-published
    r = engine.initial_sync(rt_http, v)
    full = r.bytes_read
    # Only the VM whose read failed (and what it alone holds) is stored by the rerun.
    assert r.vms["erp-db"].bytes_stored == 0 and r.vms["erp-app"].bytes_stored == 0
    assert r.vms["erp-web"].bytes_stored > 0
    # the rerun read every allocated area again (changeId "*"), the holes not at all
    assert 0 < full < sum(d.capacity for vm in engine.vpg_vms(rt, v).values() for d in vm.disks)
    forget_runtime(cfg_path)


def without_mounts(lab, site: str) -> Path:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(lab.config_path.read_text())
    data["sites"][site]["datastore_mounts"] = {}
    p = lab.config_path.with_name(f"vmrep-http-{site}.yaml")
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("method, raised", [
    # the VMs are snapshotted all at once: whichever asks first gets the fault
    ("CreateSnapshot_Task", r"^site siteA: VM erp-(db|app|web): consistency point: SystemError: SystemError "
                            r"\(injected by the lab into CreateSnapshot_Task\)$"),
    # the VMs are read in parallel: whichever VM's first disk is read first gets the fault
    ("DatastoreFile.GET", r"^reading \[LocalDS_0\] erp-(db|app|web)/disk0-flat\.vmdk: HTTP 500$"),
])
def test_fault_mid_cycle_leaves_no_snapshot_and_next_cycle_succeeds(lab, method: str, raised: str) -> None:  # type: ignore[no-untyped-def]
    cfg_path = without_mounts(lab, "siteA")
    rt = get_runtime(cfg_path)
    v = rt.config.vpg("erp")
    if not rt.store.runtime("erp").initial_sync_done:
        synced(rt, "erp")
    before = [c.id for c in rt.journal.checkpoints("erp")]
    for vm in ("erp-db", "erp-app", "erp-web"):  # something for CBT to read on every VM
        lab.guest_write(vm, "scsi0:0", 4096, random.Random(vm).randbytes(4096))
    ctl = lab.control("siteA")
    ctl.fault(method, "fault", "SystemError", count=1)  # one VM fails, the others got theirs
    try:
        with pytest.raises(VSphereError, match=raised):
            engine.run_cycle(rt, v)
    finally:
        ctl.clear_faults()
    assert [c.id for c in rt.journal.checkpoints("erp")] == before
    assert all(not vm.snapshots for vm in engine.vpg_vms(rt, v).values())
    r = engine.run_cycle(rt, v)
    assert r.checkpoint_id not in before
    assert all(not vm.snapshots for vm in engine.vpg_vms(rt, v).values())
    forget_runtime(cfg_path)


def test_replicate_refused_before_initial_sync(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    from vmrep.errors import Refused

    rt = fresh_lab.runtime()
    with pytest.raises(Refused, match="VPG files: initial sync has not completed"):
        engine.ensure_replicable(rt, rt.config.vpg("files"))


def test_cli_checkpoints_tag_verify_restore(lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import json

    from vmrep.cli import main

    rt = lab.runtime()
    if not rt.store.runtime("erp").initial_sync_done:
        synced(rt, "erp")
    cfg = str(lab.config_path)
    assert main(["checkpoint", "tag", "erp", "before upgrade", "-c", cfg]) == 0
    capsys.readouterr()
    assert main(["checkpoints", "erp", "--json", "-c", cfg]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1]["tags"] == ["before upgrade"]
    assert {"id", "time", "tags", "added_bytes"} <= set(rows[-1])
    out = tmp_path / "db0.img"
    assert main(["restore-disk", "erp", "erp-db", "0", "--checkpoint", "latest-tagged", "--out", str(out),
                 "-c", cfg]) == 0
    files = flat_files(rt, "erp")
    assert out.read_bytes() == files[("erp-db", "scsi0:0")].read_bytes()
    assert main(["verify", "erp", "-c", cfg]) == 0
    assert "no mismatch" in capsys.readouterr().out


def test_sync_and_replicate_flows(fresh_lab, prefect_harness) -> None:  # type: ignore[no-untyped-def]
    """The Prefect flows: initial sync (one task per disk), then two replication cycles,
    each a checkpoint; status and records as the monitor and reports expect them."""
    from flows.initial_sync import initial_sync
    from flows.replicate import replicate

    cfg = str(fresh_lab.config_path)
    rt = fresh_lab.runtime()
    s = initial_sync("files", cfg, who="flow-test")
    # changeId "*": the allocated areas only (15 of the 32 MiB were seeded)
    assert len(s["disks"]) == 2 and s["bytes_read"] == 15 * MiB
    row = rt.store.runtime("files")
    assert row.initial_sync_done and (row.status, row.lock_holder) == ("MeetingSLA", None)
    op = rt.store.operations("files", kind="initial_sync")[0]
    assert (op.result, op.started_by) == ("succeeded", "flow-test")
    fresh_lab.guest_write("files-01", "scsi0:0", 3 * MiB, random.Random(9).randbytes(2 * MiB))
    cycles = replicate("files", cfg, cycles=2, interval_seconds=0)
    assert [c["blocks_changed"] for c in cycles] == [2, 0]
    assert [c["checkpoint"] for c in cycles] == [c.id for c in rt.journal.checkpoints("files")[-2:]]
    assert all(c["seconds"] >= c["transfer_seconds"] for c in cycles)
    assert all(not vm.snapshots for vm in engine.vpg_vms(rt, rt.config.vpg("files")).values())
