"""The lab as strict as ESXi where replication's correctness lives, through real pyvmomi:
guest I/O through the launcher, snapshots that freeze disks (redo logs), change tracking."""

from __future__ import annotations

import http.cookies
import random
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from lab import manage

MiB = 1024 * 1024
PC = vmodl.query.PropertyCollector


@pytest.fixture(scope="module")
def si(lab) -> Iterator[vim.ServiceInstance]:  # type: ignore[no-untyped-def]
    site = lab.site("siteA")
    host, port = site.host.split(":")
    password = (lab.lab.dir / "password").read_text().strip()
    si = SmartConnect(host=host, port=int(port), user=manage.LAB_USER, pwd=password,
                      sslContext=ssl.create_default_context(cafile=site.ca_file))
    yield si
    Disconnect(si)


def props(si: Any, obj: Any, *paths: str) -> dict[str, Any]:
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=obj)],
                         propSet=[PC.PropertySpec(type=type(obj), pathSet=list(paths))])
    res = si.content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
    return {p.name: p.val for p in res.objects[0].propSet}


def vm_by_name(si: Any, name: str) -> Any:
    c = si.content
    view = c.viewManager.CreateContainerView(c.rootFolder, [vim.VirtualMachine], True)
    try:
        for o in props(si, view, "view")["view"]:
            if props(si, o, "name")["name"] == name:
                return o
    finally:
        view.Destroy()
    raise LookupError(name)


def wait(si: Any, task: Any) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        p = props(si, task, "info.state", "info.error")
        if p["info.state"] == "success":
            return
        if p["info.state"] == "error":
            raise p["info.error"]
        time.sleep(0.02)
    raise AssertionError("task did not finish")


def snapshot(si: Any, vm: Any, name: str) -> Any:
    wait(si, vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False))
    return props(si, vm, "snapshot")["snapshot"].currentSnapshot


def disks(si: Any, obj: Any) -> list[Any]:
    """The disks of a VM (or of a snapshot's config), in device order."""
    return [d for d in props(si, obj, "config.hardware.device")["config.hardware.device"]
            if isinstance(d, vim.vm.device.VirtualDisk)]


def flat(lab: Any, vm: str, disk: int) -> Path:
    return Path(lab.site("siteA").datastores["LocalDS_0"]) / vm / f"disk{disk}-flat.vmdk"


def folder_read(lab: Any, si: Any, vm: str, disk: int, offset: int, length: int) -> bytes:
    cookie = http.cookies.SimpleCookie()
    cookie.load(si._stub.cookie)
    site = lab.site("siteA")
    r = requests.get(f"https://{site.host}/folder/{vm}/disk{disk}-flat.vmdk",
                     params={"dcPath": "DC0", "dsName": "LocalDS_0"}, verify=site.ca_file, timeout=10,
                     cookies={"vmware_soap_session": cookie["vmware_soap_session"].value},
                     headers={"Range": f"bytes={offset}-{offset + length - 1}"})
    assert r.status_code == 206
    return r.content


def read_flat(lab: Any, vm: str, disk: int, offset: int, length: int) -> bytes:
    with open(flat(lab, vm, disk), "rb") as f:
        f.seek(offset)
        return f.read(length)


def deltas(lab: Any, vm: str) -> list[str]:
    return sorted(p.name for p in flat(lab, vm, 0).parent.glob("*-0000*"))


# --------------------------------------------------------------------------------------
# Lab up, guest I/O


def test_lab_up_runs_the_protected_vms(lab, si) -> None:  # type: ignore[no-untyped-def]
    for name in ("erp-db", "erp-app", "erp-web", "files-01"):
        p = props(si, vm_by_name(si, name), "runtime.powerState", "guest.toolsRunningStatus", "guest.ipAddress")
        assert p["runtime.powerState"] == "poweredOn" and p["guest.toolsRunningStatus"] == "guestToolsRunning"
        assert p["guest.ipAddress"] == lab.lab.ips[name]


def test_guest_write_read_round_trip(lab) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    data = random.Random(1).randbytes(100_000)
    assert ctl.guest_write("files-01", 1, 3 * MiB + 17, data) == len(data)
    assert ctl.guest_read("files-01", 1, 3 * MiB + 17, len(data)) == data
    # No snapshot: the write is in the flat extent, durably (the answer came after fsync).
    assert read_flat(lab, "files-01", 1, 3 * MiB + 17, len(data)) == data
    # Past the disk's end, and a disk the VM does not have, are refused.
    r = ctl.http.post(f"{ctl.url}/guest/write", params={"vm": "files-01", "disk": 1, "offset": 8 * MiB - 1},
                      data=b"xy", timeout=5)
    assert r.status_code == 416
    r = ctl.http.get(f"{ctl.url}/guest/read", params={"vm": "files-01", "disk": 2, "offset": 0, "length": 1},
                     timeout=5)
    assert r.status_code == 404 and "no disk 2" in r.json()["error"]


def test_write_to_a_powered_off_vm_is_refused(lab, si) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    vm = vm_by_name(si, "erp-web")
    before = read_flat(lab, "erp-web", 0, 0, 4096)
    wait(si, vm.PowerOffVM_Task())
    try:
        r = ctl.http.post(f"{ctl.url}/guest/write", params={"vm": "erp-web", "disk": 0, "offset": 0},
                          data=b"z" * 4096, timeout=5)
        assert r.status_code == 409 and "poweredOff" in r.json()["error"]
        assert read_flat(lab, "erp-web", 0, 0, 4096) == before
        assert ctl.guest_read("erp-web", 0, 0, 4096) == before  # reading a stopped disk is fine
    finally:
        wait(si, vm.PowerOnVM_Task())


# --------------------------------------------------------------------------------------
# Snapshots freeze disks


def test_snapshot_freezes_the_parent_and_removal_consolidates(lab, si) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    vm = vm_by_name(si, "erp-db")
    a, b, c = (random.Random(i).randbytes(256 * 1024) for i in range(3))
    ctl.guest_write("erp-db", 0, 5 * MiB, a)
    snap = snapshot(si, vm, "freeze")
    assert deltas(lab, "erp-db") == ["disk0-000001-delta.vmdk", "disk0-000001.vmdk",
                                     "disk1-000001-delta.vmdk", "disk1-000001.vmdk"]
    ctl.guest_write("erp-db", 0, 5 * MiB, b)
    ctl.guest_write("erp-db", 1, 2 * MiB, c)
    # The guest sees its writes; the parent, locally and through /folder, is as at the snapshot.
    assert ctl.guest_read("erp-db", 0, 5 * MiB, len(b)) == b
    assert read_flat(lab, "erp-db", 0, 5 * MiB, len(a)) == a
    ctl.http.delete(f"{ctl.url}/served", timeout=5).raise_for_status()
    assert folder_read(lab, si, "erp-db", 0, 5 * MiB, len(a)) == a
    assert ctl.http.get(f"{ctl.url}/served", timeout=5).json() == {"DatastoreFile.GET": len(a)}
    assert read_flat(lab, "erp-db", 1, 2 * MiB, len(c)) != c
    wait(si, snap.RemoveSnapshot_Task(removeChildren=False))
    assert read_flat(lab, "erp-db", 0, 5 * MiB, len(b)) == b
    assert read_flat(lab, "erp-db", 1, 2 * MiB, len(c)) == c
    assert deltas(lab, "erp-db") == []


def test_chained_snapshots_and_revert(lab, si) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    vm = vm_by_name(si, "erp-web")
    x0, x1, x2, x3 = (bytes([i]) * 8192 for i in range(1, 5))
    off = 9 * MiB
    ctl.guest_write("erp-web", 0, off, x0)
    s1 = snapshot(si, vm, "s1")
    ctl.guest_write("erp-web", 0, off, x1)
    s2 = snapshot(si, vm, "s2")
    ctl.guest_write("erp-web", 0, off, x2)
    assert ctl.guest_read("erp-web", 0, off, 8192) == x2
    assert read_flat(lab, "erp-web", 0, off, 8192) == x0
    # Revert to s2: the writes since are discarded.
    wait(si, s2.RevertToSnapshot_Task())
    assert ctl.guest_read("erp-web", 0, off, 8192) == x1
    # Revert to s1, then write: a branch; s2 still holds its state.
    wait(si, s1.RevertToSnapshot_Task())
    assert ctl.guest_read("erp-web", 0, off, 8192) == x0
    ctl.guest_write("erp-web", 0, off, x3)
    wait(si, s2.RevertToSnapshot_Task())
    assert ctl.guest_read("erp-web", 0, off, 8192) == x1
    # Removing the oldest consolidates the delta frozen by s2 into the parent: the parent is
    # now the disk as at s2, the guest's view unchanged.
    wait(si, s1.RemoveSnapshot_Task(removeChildren=False))
    assert read_flat(lab, "erp-web", 0, off, 8192) == x1
    assert ctl.guest_read("erp-web", 0, off, 8192) == x1
    ctl.guest_write("erp-web", 0, off, x2)
    wait(si, s2.RemoveSnapshot_Task(removeChildren=False))
    assert read_flat(lab, "erp-web", 0, off, 8192) == x2
    assert deltas(lab, "erp-web") == []


def test_a_write_racing_a_snapshot_lands_wholly_before_or_after(lab, si) -> None:  # type: ignore[no-untyped-def]
    """A guest writes numbered 64 KiB records one after another while a snapshot is taken:
    the frozen parent holds exactly a prefix of the records, each one whole."""
    ctl = lab.control("siteA")
    vm = vm_by_name(si, "files-01")
    rec = 64 * 1024
    base = 12 * MiB
    stop = threading.Event()
    done: list[int] = []

    def guest() -> None:
        http = requests.Session()
        i = 0
        while not stop.is_set() and i < 100:
            data = i.to_bytes(4, "big") * (rec // 4)
            r = http.post(f"{ctl.url}/guest/write", params={"vm": "files-01", "disk": 0, "offset": base + i * rec},
                          data=data, timeout=10)
            r.raise_for_status()
            done.append(i)
            i += 1

    t = threading.Thread(target=guest)
    t.start()
    import time

    deadline = time.monotonic() + 10
    while len(done) < 5:
        assert t.is_alive() and time.monotonic() < deadline
        time.sleep(0.001)
    snap = snapshot(si, vm, "race")
    stop.set()
    t.join()
    parent = read_flat(lab, "files-01", 0, base, 100 * rec)
    found = []
    for i in range(100):
        chunk = parent[i * rec:(i + 1) * rec]
        if chunk == i.to_bytes(4, "big") * (rec // 4):
            found.append(i)
        else:
            assert chunk != bytes(rec) or i >= len(found)  # never a part of a record
            assert i.to_bytes(4, "big") * 16 not in chunk
    assert found == list(range(len(found))) and 5 <= len(found) <= len(done)
    wait(si, snap.RemoveSnapshot_Task(removeChildren=False))
    assert read_flat(lab, "files-01", 0, base, len(done) * rec) == b"".join(
        i.to_bytes(4, "big") * (rec // 4) for i in range(len(done)))


# --------------------------------------------------------------------------------------
# Change tracking


def changed(si: Any, vm: Any, snap: Any, key: int, change_id: str, start: int = 0) -> vim.VirtualMachine.DiskChangeInfo:
    return vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=start, changeId=change_id)


def all_areas(si: Any, vm: Any, snap: Any, key: int, change_id: str,
              capacity: int) -> tuple[list[tuple[int, int]], int]:
    """Every area, following the answers' pagination as a backup tool must; and the calls made."""
    out, start, calls = [], 0, 0
    while start < capacity:
        info = changed(si, vm, snap, key, change_id, start)
        calls += 1
        assert isinstance(info, vim.VirtualMachine.DiskChangeInfo) and info.startOffset == start
        out += [(a.start, a.length) for a in info.changedArea or []]
        start = info.startOffset + info.length
    return out, calls


def change_id(si: Any, snap: Any, key: int) -> str:
    return next(d.backing.changeId for d in disks(si, snap) if d.key == key)


def test_change_tracking(lab, si) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    vm = vm_by_name(si, "erp-app")
    key = disks(si, vm)[0].key
    capacity = 24 * MiB
    s0 = snapshot(si, vm, "no-cbt")
    with pytest.raises(vim.fault.FileFault):
        changed(si, vm, s0, key, "*")
    wait(si, s0.RemoveSnapshot_Task(removeChildren=False))

    wait(si, vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert props(si, vm, "config.changeTrackingEnabled")["config.changeTrackingEnabled"] is True
    s1 = snapshot(si, vm, "cbt-1")
    id1 = change_id(si, s1, key)
    assert id1 and id1 == next(d.backing.changeId for d in disks(si, vm) if d.key == key)
    # "*": the allocated areas, here what seeding uploaded (zeros stayed holes).
    areas, _ = all_areas(si, vm, s1, key, "*", capacity)
    assert areas == [(0, 6 * MiB), (12 * MiB, 2 * MiB), (23 * MiB, MiB)]
    wait(si, s1.RemoveSnapshot_Task(removeChildren=False))

    writes = [(1 * MiB + 512, 4096), (7 * MiB, 65536), (7 * MiB + 65536, 1000), (20 * MiB, 3 * 512)]
    for off, n in writes:
        ctl.guest_write("erp-app", 0, off, random.Random(off).randbytes(n))
    s2 = snapshot(si, vm, "cbt-2")
    id2 = change_id(si, s2, key)
    assert id2 != id1
    areas, _ = all_areas(si, vm, s2, key, id1, capacity)
    assert areas == [(1 * MiB + 512, 4096), (7 * MiB, 65536 + 1000), (20 * MiB, 1536)]
    # Writes made while s2 exists are not in s2's answer, and are in the next one's.
    ctl.guest_write("erp-app", 0, 10 * MiB, b"\x07" * 4096)
    assert all_areas(si, vm, s2, key, id2, capacity)[0] == []
    wait(si, s2.RemoveSnapshot_Task(removeChildren=False))

    # Pagination: at most N areas per answer, the caller continues at startOffset + length.
    for i in range(9):
        ctl.guest_write("erp-app", 0, 15 * MiB + i * 8192, b"\x01" * 512)
    ctl.cbt_max_areas(2)
    try:
        s3 = snapshot(si, vm, "cbt-3")
        info = changed(si, vm, s3, key, id2)
        assert len(info.changedArea) == 2 and info.length == 15 * MiB + 512 - info.startOffset
        areas, calls = all_areas(si, vm, s3, key, id2, capacity)
        assert areas == [(10 * MiB, 4096)] + [(15 * MiB + i * 8192, 512) for i in range(9)] and calls == 5
    finally:
        ctl.cbt_max_areas(64)
    id3 = change_id(si, s3, key)
    wait(si, s3.RemoveSnapshot_Task(removeChildren=False))

    # A tracking reset: the old id is refused with a FileFault; "*" still answers.
    ctl.cbt_reset("erp-app", 0)
    s4 = snapshot(si, vm, "cbt-4")
    with pytest.raises(vim.fault.FileFault):
        changed(si, vm, s4, key, id3)
    assert all_areas(si, vm, s4, key, "*", capacity)[0]
    id4 = change_id(si, s4, key)
    wait(si, s4.RemoveSnapshot_Task(removeChildren=False))

    # A resize through ReconfigVM_Task invalidates the ids handed out before it.
    disk = disks(si, vm)[0]
    disk.capacityInKB = 32 * 1024
    disk.capacityInBytes = 32 * MiB
    wait(si, vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])))
    s5 = snapshot(si, vm, "cbt-5")
    with pytest.raises(vim.fault.FileFault):
        changed(si, vm, s5, key, id4)
    wait(si, s5.RemoveSnapshot_Task(removeChildren=False))

    # Tracking off: no answers any more.
    wait(si, vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    s6 = snapshot(si, vm, "cbt-6")
    with pytest.raises(vim.fault.FileFault):
        changed(si, vm, s6, key, "*")
    wait(si, s6.RemoveSnapshot_Task(removeChildren=False))


def test_a_vm_that_cannot_have_change_tracking(lab, si) -> None:  # type: ignore[no-untyped-def]
    vm = vm_by_name(si, "files-01")
    wait(si, vm.ReconfigVM_Task(vim.vm.ConfigSpec(
        extraConfig=[vim.option.OptionValue(key="vmrep.lab.noChangeTracking", value="TRUE")])))
    wait(si, vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert props(si, vm, "config.changeTrackingEnabled")["config.changeTrackingEnabled"] is False
    s = snapshot(si, vm, "no-cbt")
    try:
        assert not change_id(si, s, disks(si, vm)[0].key)
        with pytest.raises(vim.fault.FileFault):
            changed(si, vm, s, disks(si, vm)[0].key, "*")
    finally:
        wait(si, s.RemoveSnapshot_Task(removeChildren=False))


def test_remove_all_snapshots_and_revert_to_current(lab, si) -> None:  # type: ignore[no-untyped-def]
    ctl = lab.control("siteA")
    vm = vm_by_name(si, "erp-db")
    off = 14 * MiB
    ctl.guest_write("erp-db", 1, off, b"\x0a" * 4096)
    snapshot(si, vm, "a")
    ctl.guest_write("erp-db", 1, off, b"\x0b" * 4096)
    snapshot(si, vm, "b")
    ctl.guest_write("erp-db", 1, off, b"\x0c" * 4096)
    wait(si, vm.RevertToCurrentSnapshot_Task())
    assert ctl.guest_read("erp-db", 1, off, 4096) == b"\x0b" * 4096
    assert read_flat(lab, "erp-db", 1, off, 4096) == b"\x0a" * 4096
    wait(si, vm.RemoveAllSnapshots_Task())
    assert read_flat(lab, "erp-db", 1, off, 4096) == b"\x0b" * 4096
    # 0.24.2 deleted a disk's -flat.vmdk here (its snapshot layout keys collide): kept.
    assert flat(lab, "erp-db", 0).stat().st_size == 32 * MiB
    assert deltas(lab, "erp-db") == []


# --------------------------------------------------------------------------------------
# vmrep lab write


def test_lab_write_goes_through_the_guest(lab, si, capsys) -> None:  # type: ignore[no-untyped-def]
    """`vmrep lab write` writes as the guest: with a snapshot held, the frozen parent does
    not change while the guest's view does."""
    import json

    from vmrep.cli import main

    vm = vm_by_name(si, "erp-app")
    ctl = lab.control("siteA")
    before = flat(lab, "erp-app", 0).read_bytes()
    s = snapshot(si, vm, "hold")
    try:
        assert main(["lab", "write", "erp-app", "--disk", "0", "--rate", "2MiB/s", "--for", "1s", "--seed", "3",
                     "--json", "-c", str(lab.config_path)]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert stats[0]["disk"] == "scsi0:0" and stats[0]["bytes"] >= 1 * MiB
        assert flat(lab, "erp-app", 0).read_bytes() == before
        assert ctl.guest_read("erp-app", 0, 0, len(before)) != before
    finally:
        wait(si, s.RemoveSnapshot_Task(removeChildren=False))
    assert main(["lab", "write", "erp-app", "--content", "bogus", "-c", str(lab.config_path)]) != 0
    assert "--content 'bogus'" in capsys.readouterr().err


def test_content_kinds() -> None:
    import zstandard

    from lab.guest import ContentSource

    text = ContentSource("text", random.Random(1))
    blocks = [text.take(MiB) for _ in range(8)]
    ratio = sum(map(len, blocks)) / sum(len(zstandard.ZstdCompressor(level=1).compress(b)) for b in blocks)
    assert 2 <= ratio <= 4 and all(b.count(b"\n") > 1000 for b in blocks)
    assert ContentSource("zeros", random.Random(1)).take(4096) == bytes(4096)
    rnd = ContentSource("random", random.Random(1)).take(MiB)
    assert len(zstandard.ZstdCompressor(level=1).compress(rnd)) > MiB * 0.99
