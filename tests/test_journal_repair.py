"""Rebuilding the index from the pack trailers (Journal.repair_index, `vmrep journal
repair-index`): after index files are deleted or damaged, every checkpoint reads back bit
for bit and verify passes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from vmrep.cli import main
from vmrep.errors import JournalError
from vmrep.journal import Journal

BS = 4096


def snapshot(j: Journal) -> dict[tuple[str, str, str, str], bytes]:
    """Every disk of every kept checkpoint of every VPG, as bytes."""
    out = {}
    for vpg in j.vpgs():
        for cp in j.checkpoints(vpg):
            for (vm, disk), size in j.disks(vpg, cp.id).items():
                buf = bytearray(size)
                for off, data in j.iter_disk(vpg, cp.id, vm, disk):
                    if data is not None:
                        buf[off : off + len(data)] = data
                out[(vpg, cp.id, vm, disk)] = bytes(buf)
    return out


def build(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Two VPGs, three checkpoints each, several packs and index files, shared blocks."""
    monkeypatch.setattr("vmrep.journal.store.PACK_TARGET", 6 * BS)  # several packs per commit
    j = Journal.open(root, block_size=BS)
    shared = os.urandom(BS)
    for vpg in ("erp", "crm"):
        for c in range(3):
            with j.begin(vpg) as w:
                w.set_disk_size("vm1", "d0", 20 * BS + 100)  # a short last block too
                for i in range(c, 20, 2):
                    w.put_block("vm1", "d0", i, os.urandom(BS) if i % 3 else b"z" * BS)
                w.put_block("vm1", "d0", 20, os.urandom(100))
                w.put_block("vm1", "d0", 1, shared)
                if c == 1:
                    w.put_zero("vm1", "d0", 4)
                w.commit(tag=f"c{c}")
    snap = snapshot(j)
    j.close()
    assert len(list((root / "packs").iterdir())) > 4
    return snap


def reopen_and_check(root: Path, snap: dict) -> None:
    j = Journal.open(root, block_size=BS)
    assert snapshot(j) == snap
    for vpg in j.vpgs():
        assert j.verify(vpg) == []
    j.close()


def test_repair_after_every_index_file_is_deleted(tmp_path, monkeypatch):
    root = tmp_path / "j"
    snap = build(root, monkeypatch)
    packs = sorted(p.name for p in (root / "packs").iterdir())
    old = sorted((root / "index").iterdir())
    for p in old:
        p.unlink()
    j = Journal.open(root, block_size=BS, recover=False)  # recover() would delete the packs
    with pytest.raises(JournalError, match="not in the journal's index"):
        snapshot(j)
    res = j.repair_index()
    assert res.packs_indexed == len(packs) and res.bad_packs == [] and res.index_files_replaced == 0
    assert sorted(p.name for p in (root / "index").iterdir()) == [res.index_file]
    assert snapshot(j) == snap  # the open journal sees the new index at once
    j.close()
    reopen_and_check(root, snap)
    assert sorted(p.name for p in (root / "packs").iterdir()) == packs  # recover kept them all


def test_opening_a_journal_whose_index_files_are_lost_keeps_the_packs(tmp_path, monkeypatch):
    """recover() (run by every open) deletes unindexed packs a crash left, but not those
    holding blocks that kept checkpoints use: their index file was lost, repair relists them."""
    root = tmp_path / "j"
    snap = build(root, monkeypatch)
    packs = sorted(p.name for p in (root / "packs").iterdir())
    for p in (root / "index").iterdir():
        p.unlink()
    j = Journal.open(root, block_size=BS)
    res = j.recover()
    assert res.packs_removed == 0
    assert sum("repair-index" in p for p in res.problems) == len(packs)
    assert sorted(p.name for p in (root / "packs").iterdir()) == packs
    assert j.repair_index().packs_indexed == len(packs)
    j.close()
    reopen_and_check(root, snap)


def test_repair_after_damaged_and_missing_index_files(tmp_path, monkeypatch):
    root = tmp_path / "j"
    snap = build(root, monkeypatch)
    idx = sorted((root / "index").iterdir())
    assert len(idx) >= 2
    data = bytearray(idx[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    idx[0].write_bytes(bytes(data))  # fails its checksum
    idx[1].unlink()
    j = Journal.open(root, block_size=BS, recover=False)
    assert any(j.verify(vpg) for vpg in j.vpgs())  # blocks are unavailable before the repair
    res = j.repair_index()
    assert res.index_files_replaced == len(idx) - 1 and res.bad_packs == []
    j.close()
    reopen_and_check(root, snap)


def test_a_pack_with_a_damaged_trailer_keeps_what_an_index_said(tmp_path, monkeypatch):
    root = tmp_path / "j"
    snap = build(root, monkeypatch)
    pack = sorted((root / "packs").iterdir())[0]
    data = bytearray(pack.read_bytes())
    data[-60] ^= 0xFF  # inside the entry table: the trailer checksum fails
    pack.write_bytes(bytes(data))
    j = Journal.open(root, block_size=BS, recover=False)
    res = j.repair_index()
    assert len(res.bad_packs) == 1 and pack.stem in res.bad_packs[0]
    assert "kept the entries an index file lists" in res.bad_packs[0]
    j.close()
    reopen_and_check(root, snap)


def test_cli_repair_index(tmp_path, monkeypatch, capsys):
    root = tmp_path / "j"
    snap = build(root, monkeypatch)
    for p in (root / "index").iterdir():
        p.unlink()
    monkeypatch.setenv("VMREP_TEST_VC_PW", "x")
    cfg = tmp_path / "vmrep.yaml"
    cfg.write_text(yaml.safe_dump({
        "sites": {"prod": {"host": "vc-prod.example.com", "password": "env:VMREP_TEST_VC_PW"}},
        "journal": {"path": str(root), "block_size": BS},
    }))
    assert main(["journal", "repair-index", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "indexed" in out and "packs" in out
    reopen_and_check(root, snap)
    # no journal there: one line naming the path, non-zero exit, no traceback
    cfg.write_text(yaml.safe_dump({
        "sites": {"prod": {"host": "vc-prod.example.com", "password": "env:VMREP_TEST_VC_PW"}},
        "journal": {"path": str(tmp_path / "nowhere"), "block_size": BS},
    }))
    assert main(["journal", "repair-index", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "nowhere" in err and "Traceback" not in err
