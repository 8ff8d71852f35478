"""Move against the lab: shutdown, final checkpoint, failover, commit, reverse protection;
failback as a move of the reverse VPG brings changed data home byte for byte."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import yaml

from preseed import stored_from_protected_site
from test_recovery import power_on_sources, recovery_site_state, site_vm_names, source_state, synced
from vmrep.errors import Refused, VmrepError
from vmrep.recovery import operations as ops
from vmrep.recovery import vms as vmops
from vmrep.runtime import forget_runtime
from vmrep.vsphere.datastore import LocalDatastore
from vmrep.vsphere.inventory import Inventory

VMS = ("erp-db", "erp-app", "erp-web")


def disk_files(rt, site: str) -> dict[tuple[str, str], str]:  # type: ignore[no-untyped-def]
    local = LocalDatastore(rt.config.site(site).datastore_mounts)
    inv = Inventory(rt.client(site))
    return {(vm, d.id): str(local.local(d.flat)) for vm in VMS for d in inv.vm(vm).disks}


def digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_move_with_reverse_protection_then_failback_brings_changes_home(fresh_lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lab = fresh_lab
    rt = lab.runtime()
    cfg = str(lab.config_path)
    synced(rt, "erp")
    for s in ("siteA", "siteB"):
        lab.control(s).boot_delay(100)
    power_on_sources(rt, VMS)
    originals = disk_files(rt, "siteA")
    # -- move erp to siteB
    m = ops.run_move(cfg, "erp", confirm="erp", who="erin", verify_timeout=20, shutdown_timeout=10)
    assert m["result"] == "succeeded" and m["kind"] == "move" and m["rto_seconds"] > 0
    final = rt.journal.checkpoint("erp", "latest")
    assert m["checkpoint_id"] == final.id and final.tags == [f"Move at {m['started_at'].isoformat()}"]
    c = m["commit"]
    assert c["kind"] == "commit" and c["result"] == "succeeded"
    rp = c["reverse_protection"]
    assert rp["vpg"] == "erp-reverse" and rp["generated"] is True
    # nothing ran at siteB between the move's baseline and the reverse sync, and the final
    # checkpoint is the pre-seed: nothing to read (docs/recovery.md, "reads less")
    assert rp["bytes_read"] == 0
    generated = yaml.safe_load((lab.config_path.parent / "vmrep.d" / "vpgs" / "erp-reverse.yaml").read_text())
    assert generated["reverse_of"] == "erp"
    assert (generated["vpg"]["protected_site"], generated["vpg"]["recovery_site"]) == ("siteB", "siteA")
    assert generated["vpg"]["vms"][0]["preseed"]["scsi0:0"] == "[LocalDS_0] erp-db/disk0-flat.vmdk"
    # what the pre-seed saved: in a journal of its own, with the original disks as pre-seed
    # nothing has to come from siteB; without, every (non-zero) block does
    seeded = stored_from_protected_site(lab.config_path, tmp_path / "preseed", "erp-reverse", preseed=True)
    plain = stored_from_protected_site(lab.config_path, tmp_path / "preseed", "erp-reverse", preseed=False)
    assert len(seeded["preseeded_disks"]) == len(originals) and plain["preseeded_disks"] == []
    assert seeded["bytes_stored"] == 0 < plain["bytes_stored"]
    # source VMs removed from the inventory, their disks kept; VMs running at siteB
    assert not set(VMS) & set(site_vm_names(rt, "siteA"))
    assert all(os.path.exists(p) for p in originals.values())
    assert {sv.name: sv.power for sv in vmops.site_vms(rt.client("siteB"))} == dict.fromkeys(VMS, "poweredOn")
    assert (rt.store.runtime("erp").status, rt.store.runtime("erp").substatus) == ("Recovered", None)
    rev = rt.store.runtime("erp-reverse")
    assert (rev.status, rev.initial_sync_done, rev.lock_holder) == ("MeetingSLA", True, None)
    # -- the applications change data at siteB
    rng = random.Random(3)
    at_b = disk_files(rt, "siteB")
    for (vm, disk), path in at_b.items():
        for _ in range(5):
            lab.guest_write(vm, disk, rng.randrange(os.path.getsize(path) - 70000), rng.randbytes(65536), site="siteB")
    # -- failback: move the reverse VPG (a new process reads the generated VPG from disk)
    forget_runtime(cfg)
    rt = lab.runtime()
    assert rt.config.vpg("erp-reverse").recovery_site == "siteA"
    fb = ops.run_move(cfg, "erp-reverse", confirm="erp-reverse", verify_timeout=20, shutdown_timeout=10)
    # the final checkpoint was taken after the guests shut down: it holds every change
    want = {k: digest(p) for k, p in at_b.items()}
    assert fb["result"] == "succeeded" and fb["commit"]["result"] == "succeeded"
    home = disk_files(rt, "siteA")
    assert {k: digest(p) for k, p in home.items()} == want
    assert all("vmrep-erp-reverse-" in p for p in home.values())
    # failback's reverse protection is erp itself, protected again
    back = fb["commit"]["reverse_protection"]
    assert back["vpg"] == "erp" and back["generated"] is False
    assert back["bytes_read"] == 0  # the siteB disks pre-seed it, and they hold the final checkpoint
    row = rt.store.runtime("erp")
    assert (row.status, row.initial_sync_done, row.paused) == ("MeetingSLA", True, False)
    assert site_vm_names(rt, "siteB") == []
    assert sorted(set(VMS) & set(site_vm_names(rt, "siteA"))) == sorted(VMS)
    # the disks of the VMs that ran at siteB stay there, unregistered (as the originals stayed at siteA)
    kept = recovery_site_state(rt)
    assert kept[0] == [] and len(kept[1]) == 1 and kept[1][0].startswith("[LocalDS_0] vmrep-erp-")
    # and erp can be tested again
    t = ops.run_test(cfg, "erp", verify_timeout=20)
    assert t["success"] is True and recovery_site_state(rt) == kept


def test_move_rolls_back_when_graceful_shutdown_fails(fresh_lab) -> None:  # type: ignore[no-untyped-def]
    lab = fresh_lab
    rt = lab.runtime()
    cfg = str(lab.config_path)
    synced(rt, "erp")
    lab.control("siteA").boot_delay(100)
    lab.control("siteA").never_boot("erp-app")
    power_on_sources(rt, ["erp-app"], wait_tools=False)
    power_on_sources(rt, ["erp-db", "erp-web"])
    before = source_state(rt)
    checkpoints = [c.id for c in rt.journal.checkpoints("erp")]
    with pytest.raises(VmrepError, match="^VM erp-app: graceful shutdown impossible"):
        ops.run_move(cfg, "erp", confirm="erp", shutdown_timeout=10)
    assert source_state(rt) == before
    assert [c.id for c in rt.journal.checkpoints("erp")] == checkpoints  # no final checkpoint
    assert recovery_site_state(rt) == ([], [])
    row = rt.store.runtime("erp")
    assert (row.status, row.lock_holder, row.paused) == ("MeetingSLA", None, False)
    with pytest.raises(Refused, match="--keep-source-vms needs --no-reverse-protection"):
        ops.run_move(cfg, "erp", confirm="erp", keep_source_vms=True)
    # --keep-source-vms without reverse protection: sources stay registered, VPG needs configuration
    m = ops.run_move(cfg, "erp", confirm="erp", shutdown="force", keep_source_vms=True,
                     reverse_protection=False, verify_timeout=20, shutdown_timeout=0.5)
    assert m["commit"]["result"] == "succeeded" and m["commit"]["reverse_protection"] is None
    assert set(VMS) <= set(site_vm_names(rt, "siteA"))
    assert {n: v["power"] for n, v in source_state(rt).items()} == dict.fromkeys(VMS, "poweredOff")
    row = rt.store.runtime("erp")
    assert (row.status, row.substatus) == ("Recovered", "NeedsConfiguration")
