"""Recovery primitives without a lab: disks as of a checkpoint (local and streamed),
block-by-block verification, a corrupted journal block, scripts, names, process checks.

Also the helpers the lab tests of recovery share (`synced`, `recovery_site_state`, …).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import pytest

from vmrep.config import Script
from vmrep.errors import NotFound, VmrepError
from vmrep.journal import Journal
from vmrep.recovery import naming
from vmrep.recovery.disks import _stream, already_written, compare_disk, descriptor_text, write_disk
from vmrep.recovery.operations import process_gone, process_identity
from vmrep.recovery.scripts import run_script
from vmrep.replication.blocks import LocalFileSource, sync_disk
from vmrep.vsphere.datastore import LocalDatastore

BS = 64 * 1024


# --------------------------------------------------------------------------------------
# Shared helpers of the recovery lab tests


def synced(rt: Any, vpg: str = "erp") -> str:
    """Initial sync through the engine (seconds, no Prefect); the VPG then meets its SLA."""
    from vmrep.replication import engine

    r = engine.initial_sync(rt, rt.config.vpg(vpg))
    rt.store.update_runtime(vpg, initial_sync_done=True)
    rt.store.set_status(vpg, "MeetingSLA", None)
    return r.checkpoint_id


def recovery_site_state(rt: Any, vpg: str = "erp") -> tuple[list[str], list[str]]:
    """(VM names, vmrep folders) at the VPG's recovery site: what a recovery left there."""
    from vmrep.recovery import vms as vmops

    v = rt.config.vpg(vpg)
    names = sorted(sv.name for sv in vmops.site_vms(rt.client(v.recovery_site))
                   if sv.marked_vpg == vpg or sv.name.endswith(naming.TEST_SUFFIX))
    folders = []
    for ds, root in rt.config.site(v.recovery_site).datastore_mounts.items():
        folders += [f"[{ds}] {p.name}" for p in Path(root).iterdir() if p.name.startswith("vmrep-")]
    return names, sorted(folders)


def site_vm_names(rt: Any, site: str) -> list[str]:
    from vmrep.recovery import vms as vmops

    return sorted(sv.name for sv in vmops.site_vms(rt.client(site)))


def source_state(rt: Any, vpg: str = "erp") -> dict[str, Any]:
    """Power, snapshots and disk bytes (hashed) of the VPG's source VMs."""
    import hashlib

    from vmrep.vsphere.inventory import Inventory

    v = rt.config.vpg(vpg)
    inv = Inventory(rt.client(v.protected_site))
    local = LocalDatastore(rt.config.site(v.protected_site).datastore_mounts)
    out = {}
    for spec in v.vms:
        vm = inv.vm(spec.name)
        out[spec.name] = {
            "power": vm.power_state, "snapshots": [n for n, _ in vm.snapshots], "uuid": vm.uuid,
            "disks": {d.id: hashlib.sha256(local.local(d.flat).read_bytes()).hexdigest() for d in vm.disks},
        }
    return out


def power_on_sources(rt: Any, names: Iterable[str], site: str = "siteA", wait_tools: bool = True) -> None:
    import time

    from vmrep.recovery import vms as vmops

    client = rt.client(site)
    refs = {sv.name: sv.ref for sv in vmops.site_vms(client) if sv.marked_vpg is None}
    for n in names:
        vmops.power_on(client, n, refs[n])
    if wait_tools:
        for n in names:
            deadline = time.monotonic() + 10
            while vmops.guest_state(client, refs[n]).tools != "guestToolsRunning":
                assert time.monotonic() < deadline, f"{n}: tools never came up"
                time.sleep(0.05)


# --------------------------------------------------------------------------------------
# A journal and a local "datastore" for the disk primitives


class FakeDatastores:
    """DatastoreAccess over local folders; `http=True` makes every path remote (streamed)."""

    def __init__(self, mounts: dict[str, Path], http: bool = False) -> None:
        self.localds = LocalDatastore(mounts)
        self.http = http
        self.puts = 0

    def is_local(self, path: str) -> bool:
        return not self.http

    def size(self, path: str) -> int:
        return self.localds.size(path)

    def exists(self, path: str) -> bool:
        return self.localds.exists(path)

    def read(self, path: str, offset: int, length: int) -> bytes:
        try:
            return self.localds.read(path, offset, length)
        except FileNotFoundError:
            raise NotFound(f"{path} not found") from None

    def write(self, path: str, chunks: Iterable[bytes], size: int) -> None:
        self.puts += 1
        self.localds.write(path, chunks, size)


def make_journal(tmp_path: Path, blocks: int = 40, seed: int = 1) -> tuple[Journal, str, bytes]:
    rng = random.Random(seed)
    size = blocks * BS - 4096  # a short last block
    data = bytearray(size)
    for i in range(0, blocks, 3):
        data[i * BS: i * BS + BS] = rng.randbytes(BS)[: len(data[i * BS: i * BS + BS])]
    img = tmp_path / "src.img"
    img.write_bytes(bytes(data))
    j = Journal.open(tmp_path / "journal", block_size=BS)
    with j.begin("g") as w:
        with LocalFileSource(img) as src:
            sync_disk(w, "vm", "scsi0:0", src, previous=None)
        cp = w.commit()
    return j, cp.id, bytes(data)


@pytest.mark.parametrize("http", [False, True], ids=["local", "streamed"])
def test_write_disk_as_of_checkpoint_and_verify(tmp_path: Path, http: bool) -> None:
    j, cp, data = make_journal(tmp_path)
    ds = FakeDatastores({"ds1": tmp_path / "ds1"}, http=http)
    desc = naming.disk_descriptor("ds1", naming.scratch_folder("g"), "vm", "scsi0:0")
    assert desc == "[ds1] vmrep-test-g/vm/scsi0-0.vmdk"
    r = write_disk(j, ds, "g", cp, "vm", "scsi0:0", desc)
    flat = tmp_path / "ds1" / "vmrep-test-g" / "vm" / "scsi0-0-flat.vmdk"
    assert flat.read_bytes() == data and not r.skipped and not r.bad_blocks
    text = (tmp_path / "ds1" / "vmrep-test-g" / "vm" / "scsi0-0.vmdk").read_text()
    assert f'RW {-(-len(data) // 512)} VMFS "scsi0-0-flat.vmdk"' in text and f"checkpoint {cp}" in text
    if not http:  # zero blocks stay holes
        assert os.stat(flat).st_blocks * 512 < len(data)
    # A retried step finds the complete copy and writes nothing.
    puts = ds.puts
    assert write_disk(j, ds, "g", cp, "vm", "scsi0:0", desc).skipped and ds.puts == puts
    c = compare_disk(j, ds, "g", cp, "vm", "scsi0:0", desc[:-5] + "-flat.vmdk")
    assert c.ok and c.blocks == 40
    # One changed byte in a data block, one in a zero block (a hole locally): both found.
    with open(flat, "r+b") as f:
        f.seek(3 * BS + 100)
        f.write(b"\x01")
        f.seek(4 * BS + 7)
        f.write(b"\x01")
    c = compare_disk(j, ds, "g", cp, "vm", "scsi0:0", desc[:-5] + "-flat.vmdk")
    assert c.mismatches == [3, 4] and not c.ok


def test_descriptor_of_another_checkpoint_is_rewritten(tmp_path: Path) -> None:
    j, cp, data = make_journal(tmp_path)
    ds = FakeDatastores({"ds1": tmp_path / "ds1"})
    desc = "[ds1] f/vm/scsi0-0.vmdk"
    p = tmp_path / "ds1" / "f" / "vm"
    p.mkdir(parents=True)
    (p / "scsi0-0.vmdk").write_text(descriptor_text("scsi0-0-flat.vmdk", len(data), "cp-00000000-other"))
    (p / "scsi0-0-flat.vmdk").write_bytes(bytes(len(data)))
    assert not already_written(ds, desc, len(data), cp)
    assert not write_disk(j, ds, "g", cp, "vm", "scsi0:0", desc).skipped
    assert (p / "scsi0-0-flat.vmdk").read_bytes() == data


def corrupt_block(journal: Journal, block_id: bytes) -> tuple[Path, int, bytes]:
    """Flip bytes of one stored block inside its pack; returns what to put back."""
    loc = journal.store.locate(block_id)
    pack = journal.store.pack_path(loc[0])
    off = loc[1] + loc[2] // 2
    with open(pack, "r+b") as f:
        f.seek(off)
        old = f.read(8)
        f.seek(off)
        f.write(bytes(b ^ 0xFF for b in old))
    return pack, off, old


def restore_block(saved: tuple[Path, int, bytes]) -> None:
    pack, off, old = saved
    with open(pack, "r+b") as f:
        f.seek(off)
        f.write(old)


@pytest.mark.parametrize("http", [False, True], ids=["local", "streamed"])
def test_corrupted_journal_block_is_written_as_zeros_and_caught(tmp_path: Path, http: bool) -> None:
    j, cp, data = make_journal(tmp_path)
    bmap = j.block_map("g", cp, "vm", "scsi0:0")
    corrupt_block(j, bmap[6])
    ds = FakeDatastores({"ds1": tmp_path / "ds1"}, http=http)
    r = write_disk(j, ds, "g", cp, "vm", "scsi0:0", "[ds1] f/vm/d.vmdk")
    assert r.bad_blocks == [6]
    c = compare_disk(j, ds, "g", cp, "vm", "scsi0:0", "[ds1] f/vm/d-flat.vmdk")
    assert c.mismatches == [6]


def test_stream_yields_the_disk_in_order(tmp_path: Path) -> None:
    j, cp, data = make_journal(tmp_path, blocks=37)
    bmap = j.block_map("g", cp, "vm", "scsi0:0")
    bad: list[int] = []
    assert b"".join(_stream(j, bmap, len(data), 3, bad)) == data and not bad


def test_scripts_get_the_operation_and_fail_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    script = Script(command=f"{sys.executable} -c \"import os,sys; open(sys.argv[1],'w').write("
                            f"' '.join(os.environ[k] for k in ('VMREP_VPG','VMREP_OPERATION','VMREP_CHECKPOINT',"
                            f"'VMREP_PHASE')))\" {out}")
    r = run_script(script, vpg="erp", operation="test", operation_id="op1", checkpoint="cp-1",
                   checkpoint_time="t", phase="pre")
    assert r["exit_code"] == 0 and out.read_text() == "erp test cp-1 pre"
    with pytest.raises(VmrepError, match=r"^VPG erp: post-recovery script exited with code 3: boom$"):
        run_script(Script(command=f"{sys.executable} -c \"print('boom'); raise SystemExit(3)\""), vpg="erp",
                   operation="failover", operation_id="o", checkpoint="c", checkpoint_time="t", phase="post")
    with pytest.raises(VmrepError, match="timed out after 0.3s"):
        run_script(Script(command="sleep 30", timeout_seconds=0.3), vpg="erp", operation="test",
                   operation_id="o", checkpoint="c", checkpoint_time="t", phase="pre")
    with pytest.raises(VmrepError, match="cannot start"):
        run_script(Script(command="/nonexistent/x"), vpg="erp", operation="test", operation_id="o",
                   checkpoint="c", checkpoint_time="t", phase="pre")


def test_names() -> None:
    assert naming.test_vm_name("erp-db") == "erp-db - testing recovery"
    assert naming.source_of_test_name("erp-db - testing recovery") == "erp-db"
    assert naming.source_of_test_name("erp-db") is None
    assert naming.live_folder("my vpg", "0123456789abcdef") == "vmrep-my_vpg-01234567"
    assert naming.hostname("files 01_x") == "files-01-x"


def test_a_dead_process_is_recognised(tmp_path: Path) -> None:
    me = process_identity()
    assert not process_gone(me)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert process_gone({**me, "pid": p.pid, "start": "1"})
    assert not process_gone({**me, "host": "elsewhere", "pid": p.pid})


def test_operation_context_lives_with_its_runtime() -> None:
    """An operation's plan and catalogs are kept by the Runtime, not by module globals:
    two runtimes never share one, forget() drops it, closing the runtime drops them all."""
    from vmrep.config import Config
    from vmrep.recovery import steps
    from vmrep.recovery.context import operation_context
    from vmrep.runtime import Runtime

    rt1, rt2 = Runtime(Config.model_construct()), Runtime(Config.model_construct())
    ctx = operation_context(rt1, "op-1")
    assert operation_context(rt1, "op-1") is ctx
    assert operation_context(rt2, "op-1") is not ctx
    steps.forget(rt1, "op-1")
    assert operation_context(rt1, "op-1") is not ctx
    operation_context(rt1, "op-2")
    rt1.close()
    assert rt1.operations == {}
