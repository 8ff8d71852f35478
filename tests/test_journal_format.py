"""The journal format as others will read it: the checked-in fixture journal (test vectors
for a second reader, tests/data/journal-v1/), read by vmrep and by a small independent
reader written from docs/journal-format.md alone; and the compatibility rule that a reader
refuses an unknown format, key, codec, hash or compression instead of guessing."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path
from urllib.parse import quote

import blake3
import numpy as np
import pytest
import zstandard

from vmrep.errors import JournalError
from vmrep.journal import Journal
from vmrep.journal import format as fmt

DATA = Path(__file__).resolve().parent / "data"
FIXTURE = DATA / "journal-v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
BS = EXPECTED["block_size"]

sys.path.insert(0, str(DATA))
from make_journal_v1 import disk_bytes  # noqa: E402  (the recipes of expected.json)


@pytest.fixture
def fixture_root(tmp_path: Path) -> Path:
    """A copy: opening a journal runs recover() and makes its empty directories."""
    root = tmp_path / "journal"
    shutil.copytree(FIXTURE / "journal", root)
    return root


def expected_disks():
    for cp in EXPECTED["checkpoints"]:
        for d in cp["disks"]:
            yield cp, d, disk_bytes(d["size"], d["blocks"])


def test_recipes_match_the_recorded_hashes():
    for _cp, d, data in expected_disks():
        assert blake3.blake3(data).hexdigest() == d["blake3"]


def test_vmrep_reads_the_fixture_journal(fixture_root):
    j = Journal.open(fixture_root, block_size=1 << 20, create=False)  # journal.json's block size wins
    assert j.block_size == BS
    vpg = EXPECTED["vpg"]
    assert j.vpgs() == [vpg]
    cps = j.checkpoints(vpg)
    assert [(c.id, c.seq, c.time.isoformat(), c.tags) for c in cps] == [
        (c["id"], c["seq"], c["time"], c["tags"]) for c in EXPECTED["checkpoints"]]
    for cp, d, data in expected_disks():
        assert j.disks(vpg, cp["id"])[(d["vm"], d["disk"])] == d["size"]
        got = bytearray(d["size"])
        for off, block in j.iter_disk(vpg, cp["id"], d["vm"], d["disk"]):
            if block is not None:
                got[off : off + len(block)] = block
        assert bytes(got) == data, (cp["id"], d["vm"], d["disk"])
    assert {len(c["disks"]) for c in EXPECTED["checkpoints"]} == {1, 2}  # vm-2 removed in cp 2
    assert j.verify(vpg) == []
    codecs = {int(c) for p in j.store.packs.values() for c in p.entries["codec"]}
    assert codecs == {fmt.CODEC_RAW, fmt.CODEC_ZSTD}  # the fixture has a blob of each
    j.close()


# ---- a second reader, from the document only (no vmrep code below) ------------------------

def read_index(root: Path) -> dict[bytes, tuple[str, int, int, int, int]]:
    out = {}
    for p in sorted((root / "index").glob("*.idx")):
        data = p.read_bytes()
        assert data[:8] == b"VMRINDX1" and blake3.blake3(data[:-32]).digest() == data[-32:]
        (h,) = struct.unpack_from("<I", data, 8)
        header = json.loads(data[12 : 12 + h])
        assert header["format"] == 1
        pos = 12 + h
        for pack in header["packs"]:
            for _ in range(pack["entries"]):
                bid = data[pos : pos + 32]
                off, slen, rlen, codec = struct.unpack_from("<QIIB", data, pos + 32)
                out[bid] = (pack["name"], off, slen, rlen, codec)
                pos += 49
        assert pos == len(data) - 32
    return out


def read_ckpt(path: Path) -> tuple[dict, list[list[tuple[int, bytes]]]]:
    data = path.read_bytes()
    assert data[:8] == b"VMRCKPT1" and blake3.blake3(data[:-32]).digest() == data[-32:]
    (h,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + h])
    assert header["format"] == 1
    pos, maps = 12 + h, []
    for d in header["disks"]:
        ents = []
        for _ in range(d["entries"]):
            (i,) = struct.unpack_from("<Q", data, pos)
            ents.append((i, data[pos + 8 : pos + 40]))
            pos += 40
        maps.append(ents)
    return header, maps


def test_an_independent_reader_rebuilds_every_disk(fixture_root):
    root = fixture_root
    cfg = json.loads((root / "journal.json").read_text())
    assert (cfg["format"], cfg["kind"], cfg["hash"], cfg["compression"]) == (1, "vmrep-journal", "blake3-256", "zstd")
    bs = cfg["block_size"]
    index = read_index(root)
    vdir = root / "vpgs" / quote(EXPECTED["vpg"], safe="-_.@+")
    assert not list(vdir.glob("base/*.base")) and not list(vdir.glob("start/*.start"))  # no retention ran
    files = sorted(vdir.glob("checkpoints/*.ckpt"))  # no base, no start marker: every delta is kept
    state: dict[tuple[str, str], tuple[int, list[bytes]]] = {}
    zero = bytes(32)

    def block(bid: bytes) -> bytes:
        pack, off, slen, rlen, codec = index[bid]
        with open(root / "packs" / f"{pack}.pack", "rb") as f:
            f.seek(off)
            blob = f.read(slen)
        data = blob if codec == 0 else zstandard.ZstdDecompressor().decompress(blob)
        assert codec in (0, 1) and len(data) == rlen and blake3.blake3(data).digest() == bid
        return data

    for path, cp in zip(files, EXPECTED["checkpoints"], strict=True):
        header, maps = read_ckpt(path)
        assert header["checkpoint"]["id"] == cp["id"] == path.name[:-5]
        new = {}
        for d, ents in zip(header["disks"], maps, strict=True):
            key = (d["vm"], d["disk"])
            n = -(-d["size"] // bs)
            ids = [zero] * n if d["reset"] or key not in state else (state[key][1] + [zero] * n)[:n]
            for i, bid in ents:
                if i < n:
                    ids[i] = bid
            new[key] = (d["size"], ids)
        state = new  # a disk absent from "disks" was removed
        tagged = [json.loads(t.read_text())["tag"] for t in vdir.glob(f"tags/{cp['id']}.*.tag")]
        assert header["checkpoint"]["tags"] + tagged == cp["tags"]
        assert sorted(state) == sorted((d["vm"], d["disk"]) for d in cp["disks"])
        for d in cp["disks"]:
            size, ids = state[(d["vm"], d["disk"])]
            got = b"".join(bytes(min(bs, size - i * bs)) if bid == zero else block(bid) for i, bid in enumerate(ids))
            assert got == disk_bytes(d["size"], d["blocks"])
    assert any(b == zero for _, ents in [read_ckpt(files[1])] for m in ents for _, b in m)  # a zero marker


# ---- compatibility: refuse, never guess ---------------------------------------------------

def rewrite_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("change, message", [
    ({"format": 2}, "unsupported format 2"),
    ({"hash": "sha256"}, "unsupported hash 'sha256'"),
    ({"compression": "lz4"}, "unsupported compression 'lz4'"),
    ({"encryption": "aes"}, "unknown key encryption"),
    ({"kind": "restic"}, "not a vmrep journal"),
])
def test_journal_json_unknown_format_hash_compression_or_key_is_refused(fixture_root, change, message):
    rewrite_json(fixture_root / "journal.json", **change)
    with pytest.raises(JournalError, match=message):
        Journal.open(fixture_root, block_size=BS)


def reseal(data: bytes, header_change) -> bytes:
    """The same file with its JSON header changed and its checksum redone."""
    (h,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + h])
    header_change(header)
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    body = data[:8] + struct.pack("<I", len(hb)) + hb + data[12 + h : -32]
    return body + blake3.blake3(body).digest()


@pytest.mark.parametrize("change, message", [
    (lambda h: h.update(format=2), "unsupported format 2"),
    (lambda h: h.update(compressed_maps=True), "unknown key compressed_maps"),
    (lambda h: h["checkpoint"].update(signature="x"), "unknown key signature"),
    (lambda h: h["disks"][0].update(encoding="rle"), "unknown key encoding"),
    (lambda h: h.update(kind="snapshot"), "unknown checkpoint file kind"),
])
def test_checkpoint_file_with_unknown_format_or_key_is_refused(fixture_root, change, message):
    path = sorted(fixture_root.glob("vpgs/*/checkpoints/*.ckpt"))[-1]
    path.write_bytes(reseal(path.read_bytes(), change))
    j = Journal.open(fixture_root, block_size=BS)
    with pytest.raises(JournalError, match=message):
        j.checkpoints(EXPECTED["vpg"])


def test_index_with_an_unknown_codec_or_key_is_refused(fixture_root):
    path = sorted(fixture_root.glob("index/*.idx"))[0]
    data = path.read_bytes()
    with pytest.raises(JournalError, match="unknown key shards"):
        fmt.decode_index(reseal(data, lambda h: h.update(shards=4)), "index")
    (h,) = struct.unpack_from("<I", data, 8)
    body = bytearray(data[:-32])
    body[12 + h + 48] = 7  # the first entry's codec
    with pytest.raises(JournalError, match="unknown codec 7"):
        fmt.decode_index(bytes(body) + blake3.blake3(bytes(body)).digest(), "index")
    # in place, the index file is unusable: its blocks are unavailable, and recover() keeps
    # every pack (the file might list them) and reports it
    path.write_bytes(bytes(body) + blake3.blake3(bytes(body)).digest())
    j = Journal.open(fixture_root, block_size=BS)
    assert j.verify(EXPECTED["vpg"]) != []
    res = j.recover()
    assert res.packs_removed == 0 and any(path.name in p for p in res.problems)


def test_pack_trailer_with_an_unknown_codec_is_refused(fixture_root):
    path = sorted(fixture_root.glob("packs/*.pack"))[0]
    data = bytearray(path.read_bytes())
    count = struct.unpack_from("<I", data, len(data) - 48)[0]
    table = len(data) - 48 - 49 * count
    data[table + 48] = 9
    data[-40:-8] = blake3.blake3(bytes(data[table : len(data) - 48])).digest()
    with pytest.raises(JournalError, match="unknown codec 9"):
        fmt.parse_pack_trailer(bytes(data), "pack")


def test_tag_and_start_marker_of_a_newer_format_are_refused(fixture_root):
    vpg = EXPECTED["vpg"]
    tag = next(fixture_root.glob("vpgs/*/tags/*.tag"))
    rewrite_json(tag, format=2)
    j = Journal.open(fixture_root, block_size=BS)
    with pytest.raises(JournalError, match="unsupported format 2"):
        j.checkpoints(vpg)
    rewrite_json(tag, format=1)
    cp2 = EXPECTED["checkpoints"][1]["id"]
    start = next(fixture_root.glob("vpgs/*")) / "start" / f"{cp2}.start"
    start.parent.mkdir(exist_ok=True)
    start.write_text(json.dumps({"format": 1, "checkpoint": cp2, "seq": 2, "until": "later"}))
    with pytest.raises(JournalError, match="unknown key until"):
        j.checkpoints(vpg)


def test_what_vmrep_writes_passes_its_own_checks(tmp_path):
    """Every key a writer puts in a file is one the reader knows (retention, base, tags)."""
    j = Journal.open(tmp_path / "j", block_size=BS)
    j.compact_min_bytes = 0
    from datetime import datetime, timedelta, timezone
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ids = []
    for k in range(3):
        with j.begin("g") as w:
            w.set_disk_size("vm", "d", 2 * BS)
            w.put_block("vm", "d", k % 2, os.urandom(BS))
            ids.append(w.commit(time=t0 + timedelta(minutes=k), tag="t", meta={"k": k}).id)
    j.add_tag("g", ids[-1], "later")
    res = j.apply_retention("g", t0 + timedelta(minutes=1))
    assert res.compacted and res.gc is not None
    fresh = Journal.open(tmp_path / "j", block_size=BS)
    assert [c.id for c in fresh.checkpoints("g")] == ids[1:]
    assert fresh.verify("g") == []
    for p in (tmp_path / "j" / "gc").glob("*.ids"):
        fmt.decode_condemned(p.read_bytes(), p.name)
    assert np.all([fmt.decode_index(p.read_bytes(), p.name) is not None for p in (tmp_path / "j" / "index").iterdir()])
