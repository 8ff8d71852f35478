"""Replication by changed block tracking, through the lab with real pyvmomi: a cycle reads
only the areas QueryChangedDiskAreas reports (counted as the bytes the launcher's /folder
served), and every fallback (reset id, resized disk, VM without CBT) scans by hash and
still rebuilds every disk exactly; `verify --against-source` finds what CBT missed."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from pyVmomi import vim

from vmrep.replication import engine
from vmrep.runtime import Runtime, get_runtime
from vmrep.vsphere.property import retrieve_one
from vmrep.vsphere.task import run_task

MiB = 1024 * 1024
VPG = "files"
VM = "files-01"


def http_runtime(lab: Any, **vpg_settings: Any) -> tuple[Runtime, str]:
    """The lab's config with the protected site's datastores read over HTTPS (/folder),
    as from a real vCenter without NFS: the launcher then counts every byte read."""
    cfg = yaml.safe_load(Path(lab.config_path).read_text())
    cfg["sites"]["siteA"].pop("datastore_mounts", None)
    for v in cfg["vpgs"]:
        if v["name"] == VPG:
            v.update(vpg_settings)
    path = Path(lab.base) / f"vmrep-http-{len(vpg_settings)}-{abs(hash(json.dumps(vpg_settings, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return get_runtime(path), str(path)


def served(lab: Any) -> int:
    ctl = lab.control("siteA")
    return int(ctl.http.get(f"{ctl.url}/served", timeout=5).json()["DatastoreFile.GET"])


def reset_served(lab: Any) -> None:
    ctl = lab.control("siteA")
    ctl.http.delete(f"{ctl.url}/served", timeout=5).raise_for_status()


def sync(rt: Runtime) -> engine.CycleResult:
    return engine.initial_sync(rt, rt.config.vpg(VPG))


def cycle(rt: Runtime) -> engine.CycleResult:
    return engine.run_cycle(rt, rt.config.vpg(VPG))


def disks_of(r: engine.CycleResult) -> dict[str, Any]:
    return r.vms[VM].disks


def assert_exact(lab: Any, rt: Runtime, cp: str, tmp: Path) -> None:
    """Every disk of the VM as of checkpoint `cp` equals what its guest reads now (no
    guest write since the checkpoint's snapshot)."""
    ctl = lab.control("siteA")
    for (vm, disk), size in rt.journal.disks(VPG, cp).items():
        out = tmp / f"{disk}.img"
        rt.journal.restore_disk(VPG, cp, vm, disk, out)
        assert out.read_bytes() == ctl.guest_read(vm, ctl.disk_index(vm, disk), 0, size), (cp, vm, disk)


def test_cbt_cycle_reads_only_the_changed_areas(fresh_lab, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from vmrep.cli import main

    rt, cfg = http_runtime(fresh_lab)
    first = sync(rt)
    assert {s.method for s in disks_of(first).values()} == {"full"}
    assert all(s.change_id for s in disks_of(first).values())
    # Initial copy with "*": the seeded zeros (holes) are neither read nor sent.
    total = sum(d.capacity for d in engine.vpg_vms(rt, rt.config.vpg(VPG))[VM].disks)
    assert first.bytes_read < total
    reset_served(fresh_lab)
    rng = random.Random(1)
    fresh_lab.guest_write(VM, "scsi0:0", 3 * MiB + 100, rng.randbytes(4096))  # block 3
    fresh_lab.guest_write(VM, "scsi0:0", 5 * MiB - 100, rng.randbytes(200))  # blocks 4 and 5
    fresh_lab.guest_write(VM, "scsi0:1", 5 * MiB, rng.randbytes(512))  # block 5 of the other disk
    r = cycle(rt)
    d = disks_of(r)
    assert {k: s.method for k, s in d.items()} == {"scsi0:0": "cbt", "scsi0:1": "cbt"}
    assert d["scsi0:0"].bytes_read == 3 * MiB and d["scsi0:1"].bytes_read == MiB
    assert d["scsi0:0"].bytes_changed == 4096 + 200 and d["scsi0:1"].bytes_changed == 512
    # What the cycle read is what the site served: 4 blocks, not the 2 disks.
    assert served(fresh_lab) == r.bytes_read == 4 * MiB
    assert_exact(fresh_lab, rt, r.checkpoint_id, tmp_path)
    # Nothing written: a cycle reads nothing.
    reset_served(fresh_lab)
    idle = cycle(rt)
    assert idle.bytes_read == 0 and served(fresh_lab) == 0
    capsys.readouterr()
    assert main(["checkpoints", VPG, "--json", "-c", cfg]) == 0
    rows = json.loads(capsys.readouterr().out)
    cbt_keys = ("vm", "disk", "method", "bytes_read")  # the ransomware issue adds suspicion, encrypted_share
    assert all({"suspicion", "encrypted_share"} <= d.keys() for x in rows for d in x["disks"])
    assert [[{k: d[k] for k in cbt_keys} for d in x["disks"]] for x in rows[-2:]] == [
        [{"vm": VM, "disk": "scsi0:0", "method": "cbt", "bytes_read": 3 * MiB},
         {"vm": VM, "disk": "scsi0:1", "method": "cbt", "bytes_read": MiB}],
        [{"vm": VM, "disk": "scsi0:0", "method": "cbt", "bytes_read": 0},
         {"vm": VM, "disk": "scsi0:1", "method": "cbt", "bytes_read": 0}]]
    assert (rows[-2]["bytes_read"], rows[-2]["bytes_changed"]) == (4 * MiB, 4096 + 200 + 512)
    assert rows[-2]["bytes_sent"] == r.bytes_stored > 0
    assert rows[0]["disks"][0]["method"] == "full"


def test_a_reset_id_gives_one_scan_then_cbt_again(fresh_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rt, _ = http_runtime(fresh_lab)
    sync(rt)
    rt.store.set_status(VPG, "MeetingSLA", None)
    ctl = fresh_lab.control("siteA")
    fresh_lab.guest_write(VM, "scsi0:0", 2 * MiB, random.Random(2).randbytes(10_000))
    ctl.cbt_reset(VM, ctl.disk_index(VM, "scsi0:0"))
    reset_served(fresh_lab)
    r = cycle(rt)
    d = disks_of(r)
    assert (d["scsi0:0"].method, d["scsi0:1"].method) == ("scan", "cbt")
    assert "refused" in (d["scsi0:0"].fallback or "")
    assert d["scsi0:0"].bytes_read == 24 * MiB and served(fresh_lab) == 24 * MiB  # the whole disk, once
    assert_exact(fresh_lab, rt, r.checkpoint_id, tmp_path)
    # The fallback showed as DeltaSync while it ran, and the cycle's end cleared it.
    hist = [(h.status, h.substatus) for h in rt.store.status_history(VPG)]
    assert hist[-2:] == [("MeetingSLA", "DeltaSync"), ("MeetingSLA", None)]
    assert rt.journal.checkpoint(VPG, r.checkpoint_id).meta["disks"][0]["fallback"].startswith("change id")
    fresh_lab.guest_write(VM, "scsi0:0", 7 * MiB, random.Random(3).randbytes(3000))
    reset_served(fresh_lab)
    again = cycle(rt)
    assert {s.method for s in disks_of(again).values()} == {"cbt"}
    assert served(fresh_lab) == again.bytes_read == MiB
    assert_exact(fresh_lab, rt, again.checkpoint_id, tmp_path)


def test_a_resized_disk_is_copied_in_full_then_cbt(fresh_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rt, _ = http_runtime(fresh_lab)
    sync(rt)
    vm = engine.vpg_vms(rt, rt.config.vpg(VPG))[VM]
    client = rt.client("siteA")
    disk = next(d for d in retrieve_one(client, vm.ref, ["config.hardware.device"]).get("config.hardware.device")
                if isinstance(d, vim.vm.device.VirtualDisk) and d.key == vm.disks[0].key)
    disk.capacityInKB, disk.capacityInBytes = 28 * 1024, 28 * MiB
    run_task(client, "resize", vm.ref.ReconfigVM_Task, spec=vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)]))
    fresh_lab.guest_write(VM, "scsi0:0", 26 * MiB, random.Random(4).randbytes(5000))  # in the grown part
    r = cycle(rt)
    d = disks_of(r)["scsi0:0"]
    assert d.method == "full" and "resized" in (d.fallback or "")
    assert rt.journal.disks(VPG, r.checkpoint_id)[(VM, "scsi0:0")] == 28 * MiB
    assert_exact(fresh_lab, rt, r.checkpoint_id, tmp_path)
    fresh_lab.guest_write(VM, "scsi0:0", 27 * MiB, random.Random(5).randbytes(100))
    again = cycle(rt)
    assert disks_of(again)["scsi0:0"].method == "cbt" and disks_of(again)["scsi0:0"].bytes_read == MiB
    assert_exact(fresh_lab, rt, again.checkpoint_id, tmp_path)


def test_a_vm_that_cannot_have_cbt_replicates_by_scan(fresh_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rt, _ = http_runtime(fresh_lab)
    vm = engine.vpg_vms(rt, rt.config.vpg(VPG))[VM]
    run_task(rt.client("siteA"), "no cbt", vm.ref.ReconfigVM_Task, spec=vim.vm.ConfigSpec(
        extraConfig=[vim.option.OptionValue(key="vmrep.lab.noChangeTracking", value="TRUE")]))
    first = sync(rt)
    assert all(s.method == "full" and s.change_id is None for s in disks_of(first).values())
    fresh_lab.guest_write(VM, "scsi0:1", 4 * MiB, random.Random(6).randbytes(8192))
    r = cycle(rt)
    assert all(s.method == "scan" and s.fallback == "the VM does not track changes" for s in disks_of(r).values())
    assert r.bytes_read == 32 * MiB and r.blocks_changed == 1
    assert_exact(fresh_lab, rt, r.checkpoint_id, tmp_path)


def test_change_tracking_off_scans_and_use_if_present_enables_nothing(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    rt, _ = http_runtime(fresh_lab, change_tracking="use-if-present")
    vm = engine.vpg_vms(rt, rt.config.vpg(VPG))[VM]
    first = sync(rt)
    assert not retrieve_one(rt.client("siteA"), vm.ref, ["config.changeTrackingEnabled"]).get(
        "config.changeTrackingEnabled")
    assert all(s.change_id is None for s in disks_of(first).values())
    off, _ = http_runtime(fresh_lab, change_tracking="off")
    r = engine.run_cycle(off, off.config.vpg(VPG))
    assert {s.fallback for s in disks_of(r).values()} == {"change tracking is off for this VPG"}


def test_pagination_of_changed_areas_is_followed(fresh_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rt, _ = http_runtime(fresh_lab)
    sync(rt)
    ctl = fresh_lab.control("siteA")
    for i in range(9):  # nine areas in nine blocks
        fresh_lab.guest_write(VM, "scsi0:0", i * 1536 * 1024 + 77, bytes([i + 1]) * 300)
    ctl.cbt_max_areas(2)
    try:
        ctl.reset_calls()
        r = cycle(rt)
    finally:
        ctl.cbt_max_areas(64)
    d = disks_of(r)["scsi0:0"]
    assert d.method == "cbt" and d.bytes_changed == 9 * 300
    assert d.blocks_changed == len({(i * 1536 * 1024 + 77) // MiB for i in range(9)})
    assert ctl.calls().get("QueryChangedDiskAreas", 0) >= 5 + 1  # 5 pages for this disk, 1 for the other
    assert_exact(fresh_lab, rt, r.checkpoint_id, tmp_path)


def test_verify_against_source_finds_what_cbt_missed(fresh_lab, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from vmrep.cli import main

    rt, cfg = http_runtime(fresh_lab)
    sync(rt)
    rt.store.update_runtime(VPG, initial_sync_done=True)
    assert main(["verify", VPG, "--against-source", "--json", "-c", cfg]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and {d["disk"] for d in out["disks"]} == {"scsi0:0", "scsi0:1"}
    # A change CBT never saw (as after a host fault): written into the flat file behind
    # the simulator's back, which only a block-by-block comparison can find.
    flat = Path(fresh_lab.site("siteA").datastores["LocalDS_0"]) / VM / "disk0-flat.vmdk"
    with open(flat, "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"\xee" * 4096)
    assert main(["verify", VPG, "--against-source", "-c", cfg]) != 0
    assert "1 block(s) differ from the source" in capsys.readouterr().err
    assert [a.code for a in rt.store.open_alerts(VPG)] == ["SOURCE_MISMATCH"]
    r = cycle(rt)  # that disk compared block by block, the alert cleared
    assert disks_of(r)["scsi0:0"].method == "scan" and disks_of(r)["scsi0:1"].method == "cbt"
    assert not rt.store.open_alerts(VPG)
    assert_exact(fresh_lab, rt, r.checkpoint_id, tmp_path)
    assert main(["verify", VPG, "--against-source", "-c", cfg]) == 0


def test_scheduled_verification(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    rt, _ = http_runtime(fresh_lab, verify_against_source_hours=1)
    sync(rt)
    first, second = cycle(rt), cycle(rt)
    assert first.verified is not None and first.verified["ok"]
    assert second.verified is None  # not due again for an hour


# --------------------------------------------------------------------------------------
# Crash consistency (issue 10 §3)

REC = 4096


def record(i: int) -> bytes:
    return i.to_bytes(8, "big") * (REC // 8)


def test_every_checkpoint_holds_a_prefix_of_the_guest_writes(fresh_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A guest writes sequence-numbered records round robin over both disks of the VM,
    each write completed before the next, while cycles run back to back: every restored
    disk at every checkpoint holds records 0..n-1 of the history and nothing after, the
    same n on every disk of the VM."""
    rt, _ = http_runtime(fresh_lab)
    sync(rt)
    ctl = fresh_lab.control("siteA")
    disks = ["scsi0:0", "scsi0:1"]
    index = {d: ctl.disk_index(VM, d) for d in disks}
    base = 2 * MiB
    before = {d: ctl.guest_read(VM, index[d], base, 1000 * REC) for d in disks}
    stop = threading.Event()
    written: list[int] = []
    errors: list[BaseException] = []

    def guest() -> None:
        from conftest import LabControl

        c = LabControl(ctl.url)
        i = 0
        try:
            while not stop.is_set() and i < 1800:
                d = disks[i % 2]
                c.guest_write(VM, index[d], base + (i // 2) * REC, record(i + 1))
                written.append(i)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=guest, daemon=True)
    t.start()
    cps = []
    try:
        deadline = time.monotonic() + 20
        while len(cps) < 4 and time.monotonic() < deadline:
            cps.append(cycle(rt).checkpoint_id)
    finally:
        stop.set()
        t.join()
    assert not errors and len(cps) == 4
    prefixes = []
    for cp in cps:
        seen: dict[str, int] = {}
        for d in disks:
            out = tmp_path / "img"
            rt.journal.restore_disk(VPG, cp, VM, d, out)
            data = out.read_bytes()[base:]
            k = 0
            while (k + 1) * REC <= len(data) and data[k * REC:(k + 1) * REC] == record(2 * k + disks.index(d) + 1):
                k += 1
            # nothing past the prefix: the region is as it was before the guest started
            assert data[k * REC:1000 * REC] == before[d][k * REC:], (cp, d, k)
            seen[d] = k
        n0, n1 = seen["scsi0:0"], seen["scsi0:1"]
        # records 0..n-1, round robin: disk 0 holds ceil(n/2), disk 1 floor(n/2)
        assert n0 - n1 in (0, 1), (cp, seen)
        prefixes.append(n0 + n1)
    assert prefixes == sorted(prefixes) and prefixes[-1] > prefixes[0] and prefixes[-1] <= len(written)


def test_a_guest_writing_during_a_dr_test_does_not_change_what_is_recovered(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    """The test recovers the checkpoint taken before it, block for block (the test's own
    verification compares every block of the test VM's disks with it), while the
    protected VM's guest keeps writing."""
    from vmrep.recovery import operations as ops

    rt = fresh_lab.runtime()
    cfg = str(fresh_lab.config_path)
    sync(rt)
    rt.store.set_status(VPG, "MeetingSLA", None)
    cp = cycle(rt).checkpoint_id
    fresh_lab.control("siteA").boot_delay(100)
    stop = threading.Event()
    writes: list[int] = []

    def guest() -> None:
        from conftest import LabControl

        c = LabControl(fresh_lab.control("siteA").url)
        rng = random.Random(7)
        while not stop.is_set():
            c.guest_write(VM, 0, rng.randrange(0, 20 * MiB), rng.randbytes(65536))
            writes.append(1)

    t = threading.Thread(target=guest, daemon=True)
    t.start()
    try:
        s = ops.run_test(cfg, VPG, verify_timeout=20)
    finally:
        stop.set()
        t.join()
    assert len(writes) > 10 and s["checkpoint_id"] == cp
    ver = s["verification"][VM]
    assert ver["ok"] and all(d["ok"] and d["mismatch_count"] == 0 for d in ver["disks"])


def test_a_guest_writing_until_a_move_shuts_it_down_is_recovered_to_its_last_write(fresh_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A move's final checkpoint is taken after the graceful shutdown: every write the
    guest completed before its VM went down is in it, and the recovered VM's disk is that
    checkpoint, byte for byte."""
    import requests

    from test_recovery import power_on_sources
    from vmrep.recovery import operations as ops
    from vmrep.vsphere.datastore import LocalDatastore
    from vmrep.vsphere.inventory import Inventory

    lab = fresh_lab
    rt = lab.runtime()
    cfg = str(lab.config_path)
    engine.initial_sync(rt, rt.config.vpg("erp"))
    rt.store.set_status("erp", "MeetingSLA", None)
    for s in ("siteA", "siteB"):
        lab.control(s).boot_delay(100)
    power_on_sources(rt, ("erp-db", "erp-app", "erp-web"))
    acked: list[tuple[int, bytes]] = []
    refused: list[int] = []

    def guest() -> None:
        from conftest import LabControl

        c = LabControl(lab.control("siteA").url)
        rng = random.Random(11)
        while True:
            off, data = rng.randrange(0, 15 * MiB // 4096) * 4096, rng.randbytes(4096)
            try:
                c.guest_write("erp-db", 0, off, data)
            except requests.HTTPError as exc:
                refused.append(exc.response.status_code)  # the VM went down: its guest stops
                return
            acked.append((off, data))

    t = threading.Thread(target=guest, daemon=True)
    t.start()
    time.sleep(0.3)
    m = ops.run_move(cfg, "erp", confirm="erp", reverse_protection=False, verify_timeout=20, shutdown_timeout=10)
    t.join(timeout=30)
    assert m["result"] == "succeeded" and refused == [409] and len(acked) > 5
    final = m["checkpoint_id"]
    out = tmp_path / "final.img"
    rt.journal.restore_disk("erp", final, "erp-db", "scsi0:0", out)
    image = out.read_bytes()
    last: dict[int, bytes] = {}
    for off, data in acked:
        last[off] = data
    assert all(image[off:off + 4096] == data for off, data in last.items())  # every completed write
    # the source's disk as the guest left it, and the recovered VM's, are that checkpoint
    src = LocalDatastore(rt.config.site("siteA").datastore_mounts).local("[LocalDS_0] erp-db/disk0-flat.vmdk")
    assert src.read_bytes()[:len(image)] == image
    rec = Inventory(rt.client("siteB")).vm("erp-db").disks[0]
    assert LocalDatastore(rt.config.site("siteB").datastore_mounts).local(rec.flat).read_bytes() == image
