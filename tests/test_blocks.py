"""The block engine: change detection, CBT ranges, zero blocks, resumable full copies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmrep.errors import JournalError
from vmrep.journal import Journal
from vmrep.replication.blocks import LocalFileSource, ranges_to_blocks, sync_disk

BS = 4096


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def image(path: Path, nblocks: int, *, random_blocks: set[int] = frozenset(), tail: int = 0) -> Path:
    with open(path, "wb") as f:
        for i in range(nblocks):
            f.write(os.urandom(BS) if i in random_blocks else bytes(BS))
        if tail:
            f.write(os.urandom(tail))
    return path


def test_ranges_to_blocks():
    assert ranges_to_blocks([], BS) == []
    assert ranges_to_blocks([(0, 1)], BS) == [0]
    assert ranges_to_blocks([(BS - 1, 2)], BS) == [0, 1]
    assert ranges_to_blocks([(BS, BS)], BS) == [1]
    assert ranges_to_blocks([(3 * BS, 0), (5 * BS + 10, 3 * BS)], BS) == [5, 6, 7, 8]
    assert ranges_to_blocks([(0, BS), (0, 2 * BS)], BS) == [0, 1]


def test_local_source_reads_zeros_past_eof(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(b"abc")
    with LocalFileSource(p, size=2 * BS) as src:
        assert src.size == 2 * BS
        assert src.read(0, 5) == b"abc\0\0"
        buf = bytearray(b"x" * BS)
        src.readinto(BS, memoryview(buf))
        assert buf == bytes(BS)


def test_hash_scan_puts_only_changed_blocks(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    img = image(tmp_path / "d.img", 64, random_blocks=set(range(0, 64, 2)), tail=100)
    with j.begin("g") as w, LocalFileSource(img) as src:
        st = sync_disk(w, "vm", "d", src, previous=None)
        cp1 = w.commit()
    assert st.blocks_read == 65 and st.blocks_zero == 32 and st.blocks_changed == 33
    assert st.bytes_stored >= 32 * BS  # random: stored raw
    prev = j.block_map("g", cp1.id, "vm", "d")
    write_at(img, 3 * BS + 5, b"new")  # a zero block becomes data
    write_at(img, 4 * BS, bytes(BS))  # a data block becomes zero
    write_at(img, 64 * BS + 10, b"tail")  # the short last block
    with j.begin("g") as w, LocalFileSource(img) as src:
        st = sync_disk(w, "vm", "d", src, previous=prev, threads=3)
        cp2 = w.commit()
    assert st.blocks_changed == 3 and cp2.changed_blocks == 3
    assert st.bytes_read == 64 * BS + 100
    out = tmp_path / "out"
    j.restore_disk("g", cp2.id, "vm", "d", out)
    assert out.read_bytes() == img.read_bytes()
    m = j.block_map("g", cp2.id, "vm", "d")
    assert m[4] is None and m[3] is not None and len(m) == 65


def test_changed_ranges_read_only_those_blocks(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    img = image(tmp_path / "d.img", 32, random_blocks=set(range(32)))
    with j.begin("g") as w, LocalFileSource(img) as src:
        sync_disk(w, "vm", "d", src, previous=None)
        cp1 = w.commit()
    write_at(img, 10 * BS + 100, os.urandom(2 * BS))  # touches blocks 10, 11, 12
    ranges = [(10 * BS + 100, 2 * BS)]
    with j.begin("g") as w, LocalFileSource(img) as src:
        st = sync_disk(w, "vm", "d", src, previous=j.block_map("g", cp1.id, "vm", "d"), changed_ranges=ranges)
        cp2 = w.commit()
    assert st.bytes_read == 3 * BS and st.blocks_changed == 3
    assert b"".join(d or bytes(BS) for _, d in j.iter_disk("g", cp2.id, "vm", "d")) == img.read_bytes()


def test_zero_disk_costs_nothing(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    img = tmp_path / "zero.img"
    with open(img, "wb") as f:
        f.truncate(256 * BS)
    with j.begin("g") as w, LocalFileSource(img) as src:
        st = sync_disk(w, "vm", "d", src, previous=None)
        cp = w.commit()
    assert st.bytes_stored == 0 and st.blocks_zero == 256 and st.blocks_changed == 0
    assert st.bytes_read == 0  # a sparse file's holes are not even read
    assert cp.changed_blocks == 0 and cp.added_bytes == 0
    assert list((tmp_path / "j" / "packs").iterdir()) == []
    assert j.usage("g").total_bytes == 0
    out = tmp_path / "out"
    assert j.restore_disk("g", cp.id, "vm", "d", out) == 0
    assert out.stat().st_size == 256 * BS and out.stat().st_blocks == 0  # sparse


class FailingSource(LocalFileSource):
    def __init__(self, path: Path, fail_after: int) -> None:
        super().__init__(path, use_mmap=False)
        self.calls = 0
        self.fail_after = fail_after

    def readinto(self, offset, buf):
        self.calls += 1
        if self.calls > self.fail_after:
            raise OSError("link to the protected site dropped")
        return super().readinto(offset, buf)


def test_interrupted_full_copy_reruns_storing_only_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr("vmrep.replication.blocks.CHUNK_BYTES", 8 * BS)
    monkeypatch.setattr("vmrep.journal.store.PACK_TARGET", 16 * BS)  # several packs
    j = Journal.open(tmp_path / "j", block_size=BS)
    n = 128
    img = image(tmp_path / "d.img", n, random_blocks=set(range(n)))
    with pytest.raises(OSError):
        with j.begin("g") as w:
            sync_disk(w, "vm", "d", FailingSource(img, fail_after=6), previous=None, threads=1)
            w.commit()
    assert j.checkpoints("g") == []
    stored_before = sum(p.stat().st_size for p in (tmp_path / "j" / "packs").iterdir())
    assert stored_before >= 6 * 8 * BS
    # a new process (new Journal object) reruns the full copy
    j2 = Journal.open(tmp_path / "j", block_size=BS)
    with j2.begin("g") as w, LocalFileSource(img) as src:
        st = sync_disk(w, "vm", "d", src, previous=None)
        cp = w.commit()
    assert st.blocks_deduplicated == 6 * 8
    assert st.bytes_stored == (n - 48) * BS
    assert cp.added_bytes == st.bytes_stored
    out = tmp_path / "out"
    j2.restore_disk("g", cp.id, "vm", "d", out)
    assert out.read_bytes() == img.read_bytes()


def test_full_copy_of_existing_disk_records_zeroed_blocks(tmp_path):
    """previous=None on a disk the checkpoint chain already has (CBT reset): zero blocks
    must overwrite old data."""
    j = Journal.open(tmp_path / "j", block_size=BS)
    img = image(tmp_path / "d.img", 8, random_blocks=set(range(8)))
    with j.begin("g") as w, LocalFileSource(img) as src:
        sync_disk(w, "vm", "d", src, previous=None)
        w.commit()
    write_at(img, 2 * BS, bytes(BS))
    with j.begin("g") as w, LocalFileSource(img) as src:
        sync_disk(w, "vm", "d", src, previous=None)
        cp = w.commit()
    assert j.block_map("g", cp.id, "vm", "d")[2] is None
    out = tmp_path / "out"
    j.restore_disk("g", cp.id, "vm", "d", out)
    assert out.read_bytes() == img.read_bytes()


def test_put_block_rejects_oversized_and_needs_size_for_new_disk(tmp_path):
    j = Journal.open(tmp_path / "j", block_size=BS)
    with j.begin("g") as w:
        with pytest.raises(JournalError):
            w.put_block("vm", "d", 0, b"x" * (BS + 1))
        w.put_block("vm", "d", 0, b"x" * BS)
        with pytest.raises(JournalError, match="set_disk_size"):
            w.commit()
    assert j.checkpoints("g") == []


def test_sparse_source_reads_only_data_regions(tmp_path, monkeypatch):
    monkeypatch.setattr("vmrep.replication.blocks.CHUNK_BYTES", 4 * BS)
    img = tmp_path / "thin.img"
    with open(img, "wb") as f:
        f.truncate(1024 * BS)
    data = os.urandom(2 * BS)
    write_at(img, 600 * BS, data)
    j = Journal.open(tmp_path / "j", block_size=BS)
    with j.begin("g") as w, LocalFileSource(img) as src:
        st = sync_disk(w, "vm", "d", src, previous=None)
        cp = w.commit()
    assert st.blocks_changed == 2 and st.bytes_stored == 2 * BS
    assert st.bytes_read < 64 * BS  # file systems allocate in extents; far less than the disk
    prev = j.block_map("g", cp.id, "vm", "d")
    write_at(img, 600 * BS, bytes(BS))  # data block zeroed (stays allocated)
    with j.begin("g") as w, LocalFileSource(img) as src:
        st = sync_disk(w, "vm", "d", src, previous=prev)
        cp2 = w.commit()
    assert st.blocks_changed == 1
    out = tmp_path / "out"
    j.restore_disk("g", cp2.id, "vm", "d", out)
    assert out.read_bytes() == img.read_bytes()


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
import vmrep.journal.store as sm
import vmrep.replication.blocks as bl
from vmrep.journal import Journal
sm.PACK_TARGET = 8 * 4096
bl.CHUNK_BYTES = 4 * 4096

class Slow(bl.LocalFileSource):
    def readinto(self, offset, buf):
        time.sleep(0.02)
        return super().readinto(offset, buf)

j = Journal.open(Path(sys.argv[1]), block_size=4096)
with j.begin("g") as w:
    bl.sync_disk(w, "vm", "d", Slow(sys.argv[2], use_mmap=False), previous=None, threads=1)
    w.commit()
"""


def test_killed_initial_sync_reruns_storing_only_what_is_missing(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    n = 256
    img = image(tmp_path / "d.img", n, random_blocks=set(range(n)))
    root = tmp_path / "j"
    Journal.open(root, block_size=BS)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(repo=str(repo)))
    p = subprocess.Popen([sys.executable, str(script), str(root), str(img)])
    deadline = time.monotonic() + 30
    while len(list((root / "index").iterdir())) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(list((root / "index").iterdir())) >= 4
    j = Journal.open(root, block_size=BS)  # recover() removes the torn pack
    assert j.checkpoints("g") == []
    with j.begin("g") as w, LocalFileSource(img) as src:
        st = sync_disk(w, "vm", "d", src, previous=None)
        cp = w.commit()
    assert st.blocks_deduplicated >= 4 * 8
    assert st.bytes_stored == (n - st.blocks_deduplicated) * BS < n * BS
    out = tmp_path / "out"
    j.restore_disk("g", cp.id, "vm", "d", out)
    assert out.read_bytes() == img.read_bytes()


def _drop_cache(path: Path) -> None:
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_uncached_chunks_are_read_with_o_direct_and_cached_ones_mapped(tmp_path):
    """A disk not in the page cache is read with O_DIRECT (no page-cache fill, a fraction
    of the CPU of faulting it in through a mapping: bench/README.md), a cached one hashed
    from the cache through mmap; both give the same checkpoint, and a short tail reads
    exactly."""
    from vmrep.replication.blocks import CHUNK_BYTES, resident_fraction

    bs = 1 << 20
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.write(os.urandom(3 * CHUNK_BYTES + 12345))
    j = Journal.open(tmp_path / "j", block_size=bs)
    maps = {}
    for regime in ("cold", "hot"):
        if regime == "cold":
            _drop_cache(img)
            fd = os.open(img, os.O_RDONLY)
            cached = resident_fraction(fd, 0, os.fstat(fd).st_size)
            os.close(fd)
            if cached is None or cached > 0.5:
                pytest.skip("the page cache of this file system cannot be dropped or read")
        else:
            img.read_bytes()
        with j.begin(regime) as w, LocalFileSource(img) as src:
            if src._direct_fd < 0:  # noqa: SLF001 - a file system without O_DIRECT (tmpfs)
                pytest.skip("no O_DIRECT here")
            sync_disk(w, "vm", "d", src, previous=None, threads=2)
            cp = w.commit()
            reads = dict(src.reads)
        maps[regime] = list(j.block_map(regime, cp.id, "vm", "d"))
        if regime == "cold":
            assert reads["direct"] >= 3 and reads["mapped"] == 0, reads
        else:
            assert reads["mapped"] >= 3 and reads["direct"] == 0, reads
    assert maps["cold"] == maps["hot"]
    out = tmp_path / "out.img"
    j.restore_disk("cold", "latest", "vm", "d", out)
    assert out.read_bytes() == img.read_bytes()
