"""The protected site's side of the journal service: a journal and a checkpoint writer
that reach the recovery site's journal only over HTTPS (docs/journal-service.md).

`RemoteJournal` offers what the replication engine asks of a local `Journal` during a
cycle (checkpoints, disks, block maps, begin); `RemoteWriter` offers what `sync_disk` and
the engine ask of a `CheckpointWriter` (set_disk_size, put_zero, put_hashed, put_block,
remove_disk, commit, abort). Nothing else crosses: no retention, no GC, no deletion —
the service refuses those to a writer credential anyway.

What crosses the WAN per changed block: its id first (the service says which ids it
lacks), then only the missing blocks, zstd-compressed here when the VPG's
`wan_compression` is on. The service decompresses, re-hashes and stores each one through
the journal's own writer, so every durability rule of docs/journal-format.md holds there.

Batching: the writer queues the changed blocks (a copy of each, at most
BATCH_RAW_BYTES / BATCH_BLOCKS of them) and sends them together: one `missing` request
for the ids of all of them, then one batch with a reference for each block the service
has, the changed extents or the whole block for the others. Two round trips per batch
instead of two per block. The queue is sent when full, by `flush()` (the engine calls it
at the end of each disk that queued a block), before a pre-seed and at the commit; an operation on a disk that has a
queued block it could reorder (a zero block at the same index, a new size, a removal)
sends the queue first, so the service still applies every change in the writer's order.

The wire format of a batch (POST /v1/writers/<sid>/batch) is one frame:

    u32 big-endian  length of the JSON header
    JSON header     {"ops": [["size", vm, disk, n] | ["zero", vm, disk, i] | ["remove", vm, disk]],
                     "blocks": [{"vm", "disk", "index", "id": hex, "codec": 0|1, "rlen", "len"}]}
    payloads        the blocks' bytes, in header order, each `len` bytes
"""

from __future__ import annotations

import bisect
import json
import logging
import struct
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import blake3
import numpy as np
import requests

from vmrep.config import JournalServiceClient
from vmrep.errors import JournalError, JournalLocked, Refused
from vmrep.journal import format as fmt
from vmrep.journal.codec import encode_blob
from vmrep.journal.results import BlockMap, CheckpointInfo, is_zero, parse_time
from vmrep.secrets import resolve_secret
from vmrep.vsphere.connection import PinnedAdapter

log = logging.getLogger(__name__)

API = "/v1"

# A changed block crosses as its changed extents (codec DELTA) when they are at most this
# share of it; above, the whole block costs about the same and needs no base.
DELTA_MAX_SHARE = 0.75
CODEC_REF = -1  # no payload: the service has the block
CODEC_DELTA = -2  # payload: the changed extents, to lay over the base block at the service

# A batch is sent when its queued blocks hold this many bytes (uncompressed, whole blocks:
# each is kept until sent, for the whole-block resend) or this many blocks. 16 MiB keeps a
# request well under the service's MAX_BATCH_BYTES (64 MiB) even incompressible, and is a
# few hundred milliseconds on a 1 Gbit/s WAN, so one batch does not hold a cycle up long.
BATCH_RAW_BYTES = 16 << 20
BATCH_BLOCKS = 256


class DeltaMismatch(JournalError):
    """The service rebuilt a block from the previous block and the extents sent, and it did
    not match the block's id (CBT missed a change): the whole block must be sent.
    `blocks`: the (vm, disk, index) of every such block of the batch (empty: not said)."""

    def __init__(self, message: str, blocks: list[tuple[str, str, int]] | None = None) -> None:
        super().__init__(message)
        self.blocks = blocks or []


@dataclass
class _Queued:
    vm: str
    disk: str
    index: int
    bid: bytes
    data: bytes


# ---- wire format (shared with service.py) -------------------------------------------------


def encode_batch(ops: list[list[Any]], blocks: list[tuple[dict[str, Any], bytes | memoryview]]) -> bytes:
    head = json.dumps({"ops": ops, "blocks": [h for h, _ in blocks]}).encode()
    return b"".join([struct.pack(">I", len(head)), head, *(bytes(p) for _, p in blocks)])


def decode_batch(body: bytes) -> tuple[list[list[Any]], list[tuple[dict[str, Any], memoryview]]]:
    """Split a batch frame; ValueError names what is wrong with it."""
    if len(body) < 4:
        raise ValueError("batch shorter than its header length")
    (n,) = struct.unpack(">I", body[:4])
    if 4 + n > len(body):
        raise ValueError("batch header longer than the body")
    head = json.loads(body[4 : 4 + n])
    if not isinstance(head, dict) or not isinstance(head.get("ops", []), list) \
            or not isinstance(head.get("blocks", []), list):
        raise ValueError("batch header is not {ops: [...], blocks: [...]}")
    view = memoryview(body)
    off = 4 + n
    out = []
    for h in head.get("blocks", []):
        ln = h.get("len") if isinstance(h, dict) else None
        if not isinstance(ln, int) or ln < 0 or off + ln > len(body):
            raise ValueError("batch payloads do not match the lengths of its header")
        out.append((h, view[off : off + ln]))
        off += ln
    if off != len(body):
        raise ValueError("batch has bytes after its last payload")
    return list(head.get("ops", [])), out


def info_to_json(info: CheckpointInfo) -> dict[str, Any]:
    return {"id": info.id, "seq": info.seq, "time": info.time.isoformat(), "tags": info.tags,
            "added_bytes": info.added_bytes, "changed_blocks": info.changed_blocks, "meta": info.meta}


def info_from_json(d: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(id=d["id"], seq=d["seq"], time=parse_time(d["time"]), tags=list(d.get("tags", [])),
                          added_bytes=d.get("added_bytes", 0), changed_blocks=d.get("changed_blocks", 0),
                          meta=d.get("meta", {}))


# ---- client ----------------------------------------------------------------------------


class RemoteJournal:
    """A recovery site's journal as its service serves it to one protected site."""

    def __init__(self, settings: JournalServiceClient, *, where: str = "journal_service") -> None:
        self.settings = settings
        self.url = settings.url
        self._token = resolve_secret(settings.credential, f"{where}.credential")
        self._http = requests.Session()
        tls = settings.tls
        if tls.thumbprint:
            self._http.mount("https://", PinnedAdapter(tls.thumbprint))
            self._verify: bool | str = False  # the adapter checks the pin
        elif tls.insecure:
            self._verify = False
        else:
            self._verify = str(tls.ca_file) if tls.ca_file else True
        self._http.headers["Authorization"] = f"Bearer {self._token}"
        self._lock = threading.Lock()
        self.bytes_sent = 0  # request bodies of block batches: what crossed the WAN for data
        self._bs: int | None = None

    def close(self) -> None:
        self._http.close()

    # ---- HTTP ------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                expect: str = "json") -> Any:
        try:
            r = self._http.request(method, self.url + API + path, json=json_body, data=data,
                                   verify=self._verify, timeout=self.settings.timeout_seconds,
                                   headers={"Content-Type": "application/octet-stream"} if data is not None else None)
        except requests.exceptions.SSLError as exc:
            raise JournalError(f"journal service {self.url}: TLS verification failed ({_first(exc)}); "
                               "check journal_service.tls (ca_file or thumbprint)") from None
        except requests.exceptions.RequestException as exc:
            raise JournalError(f"journal service {self.url}: unreachable ({_first(exc)})") from None
        if r.status_code >= 400:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text.strip().splitlines()[0] if r.text.strip() else r.reason
            text = f"journal service {self.url}: {msg}"
            if r.status_code == 403:
                raise Refused(text)
            if r.status_code == 409:
                raise JournalLocked(text)
            if r.status_code == 422:
                try:
                    named = [(str(b[0]), str(b[1]), int(b[2])) for b in r.json().get("unrebuilt", [])]
                except (ValueError, TypeError, IndexError, AttributeError):
                    named = []
                raise DeltaMismatch(text, named)
            raise JournalError(text)
        if expect == "bytes":
            return r
        return r.json()

    # ---- what the engine reads ----------------------------------------------------------------
    @property
    def block_size(self) -> int:
        if self._bs is None:
            self._bs = int(self.request("GET", "/whoami")["block_size"])
        return self._bs

    def checkpoints(self, vpg: str) -> list[CheckpointInfo]:
        return [info_from_json(d) for d in self.request("GET", f"/vpgs/{vpg}/checkpoints")]

    def checkpoint(self, vpg: str, ref: str) -> CheckpointInfo:
        return info_from_json(self.request("GET", f"/vpgs/{vpg}/checkpoints/{ref}"))

    def disks(self, vpg: str, checkpoint_id: str) -> dict[tuple[str, str], int]:
        rows = self.request("GET", f"/vpgs/{vpg}/checkpoints/{checkpoint_id}/disks")
        return {(r["vm"], r["disk"]): int(r["size"]) for r in rows}

    def block_map(self, vpg: str, checkpoint_id: str, vm: str, disk: str) -> BlockMap:
        r = self.request("GET", f"/vpgs/{vpg}/checkpoints/{checkpoint_id}/maps/{vm}/{disk}", expect="bytes")
        ids = np.frombuffer(r.content, dtype=np.uint8).reshape(-1, fmt.ID_LEN)
        return BlockMap(ids, int(r.headers["X-Block-Size"]), int(r.headers["X-Disk-Size"]))

    def missing(self, vpg: str, ids: list[bytes]) -> set[bytes]:
        """Which of `ids` the service lacks: one request per 100,000 ids (the service's bound)."""
        out: set[bytes] = set()
        for k in range(0, len(ids), 100_000):
            got = self.request("POST", f"/vpgs/{vpg}/missing",
                               json_body={"ids": [i.hex() for i in ids[k:k + 100_000]]})
            out |= {bytes.fromhex(h) for h in got["missing"]}
        return out

    def begin(self, vpg: str, *, compress: bool = True, compression_level: int = 1) -> "RemoteWriter":
        d = self.request("POST", f"/vpgs/{vpg}/writers")
        prev = {(x["vm"], x["disk"]) for x in d["disks"]}
        return RemoteWriter(self, vpg, d["session"], int(d["block_size"]), prev,
                            compression_level if compress else 0)


class RemoteWriter:
    """One checkpoint of one VPG, written through the journal service. Thread-safe like
    CheckpointWriter. Changed blocks are queued and sent in batches (module docstring);
    zero blocks, sizes and removals are queued too and go, in order, with the next batch
    (or the commit), so that the service applies every change in the order the writer was
    given it.

    `put_hashed` returns 0 (the block is queued, what it costs is known once it went):
    after `flush()`, `sent_for` and `stored_for` give each disk's bytes sent, bytes stored
    and blocks the service had already."""

    def __init__(self, journal: RemoteJournal, vpg: str, sid: str, block_size: int,
                 prev_disks: set[tuple[str, str]], level: int) -> None:
        self.journal, self.vpg, self.sid = journal, vpg, sid
        self.block_size = block_size
        self._prev = prev_disks
        self._reset: set[tuple[str, str]] = set()
        self._removed: set[tuple[str, str]] = set()
        self._level = level
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ops: list[list[Any]] = []
        self._queue_blocks: list[_Queued] = []  # changed blocks not sent yet, in the order given
        self._queued_raw = 0
        self._queued_at: set[tuple[str, str, int]] = set()
        self._queued_disks: dict[tuple[str, str], int] = {}
        self._present: set[bytes] = set()  # ids the service said it has (or we sent)
        self.bytes_sent = 0  # block batch bodies sent for this checkpoint
        self.added_bytes = 0
        self.batches = 0  # block batches sent (each one request, after one `missing` for its new ids)
        self._sent: dict[tuple[str, str], int] = {}
        self._stored: dict[tuple[str, str], list[int]] = {}  # per disk: [payload bytes, blocks it had]
        # per disk: CBT's changed areas (sorted starts, areas) and the previous block map
        self._hints: dict[tuple[str, str], tuple[list[int], list[tuple[int, int]], Any]] = {}
        self.deltas = 0  # blocks sent as extents
        self.delta_fallbacks = 0  # of those, rebuilt wrong at the service and sent whole
        self._closed = False

    def __enter__(self) -> "RemoteWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.abort()

    def _check(self) -> None:
        if self._closed:
            raise JournalError(f"VPG {self.vpg}: checkpoint writer already closed")

    def _queue(self, op: list[Any], vm: str, disk: str, index: int | None = None) -> None:
        """Queue a writer operation. Ops go before the blocks of the batch they travel in,
        so one that a queued block of the same disk (of the same index, for a zero block)
        would be reordered around sends the queued blocks first."""
        with self._lock:
            clash = (vm, disk, index) in self._queued_at if index is not None \
                else self._queued_disks.get((vm, disk), 0) > 0
        if clash:
            self.flush(ops=False)
        with self._lock:
            self._ops.append(op)

    def hint_extents(self, vm: str, disk: str, ranges: list[tuple[int, int]], previous: Any) -> None:
        """CBT's changed areas of a disk since `previous` (its block map): a changed block
        whose areas cover little of it crosses as those areas only, rebuilt at the service
        on the previous block and verified by the block's id."""
        if previous is None:
            return
        areas = sorted((int(o), int(n)) for o, n in ranges if n > 0)
        with self._lock:
            self._hints[(vm, disk)] = ([o for o, _ in areas], areas, previous)

    def preseed(self, vm: str, disk: str, path: str, size: int) -> BlockMap:
        """Have the service hash the pre-seed copy `path` at the recovery site (next to
        it: no block of it crosses) and put its blocks into this checkpoint; returns its
        block map, against which the source's blocks are compared here, so that only the
        blocks that differ are sent."""
        self._check()
        self.flush()  # the disk's size (and anything queued) reaches the service first
        r = self.journal.request("POST", f"/writers/{self.sid}/preseed", expect="bytes",
                                 json_body={"vm": vm, "disk": disk, "path": path, "size": size})
        ids = np.frombuffer(r.content, dtype=np.uint8).reshape(-1, fmt.ID_LEN)
        return BlockMap(ids, self.block_size, size)

    def sent_for(self, vm: str, disk: str) -> int:
        """Bytes of the batches that carried this disk's blocks (what crossed the WAN), as
        far as they are sent (`flush()` first)."""
        with self._lock:
            return self._sent.get((vm, disk), 0)

    def stored_for(self, vm: str, disk: str) -> tuple[int, int]:
        """(payload bytes sent, blocks the service had: only their reference went) for
        this disk's blocks sent so far (`flush()` first)."""
        with self._lock:
            got = self._stored.get((vm, disk), [0, 0])
            return got[0], got[1]

    def _extents(self, vm: str, disk: str, index: int, rlen: int) -> tuple[bytes | None, list[list[int]]] | None:
        """(base id or None for a zero block, extents relative to the block) from the hint."""
        with self._lock:
            h = self._hints.get((vm, disk))
        if h is None:
            return None
        starts, areas, prev = h
        lo, hi = index * self.block_size, index * self.block_size + rlen
        out: list[list[int]] = []
        k = max(0, bisect.bisect_right(starts, lo) - 1)
        while k < len(areas) and areas[k][0] < hi:
            a, n = areas[k]
            s, e = max(a, lo), min(a + n, hi)
            if s < e:
                if out and out[-1][0] + out[-1][1] == s - lo:
                    out[-1][1] += e - s
                else:
                    out.append([s - lo, e - s])
            k += 1
        if not out:
            return None
        return prev.get(index), out

    def _post(self, blocks: list[tuple[dict[str, Any], bytes | memoryview]]) -> int:
        """One batch request with the queued ops (kept for the next batch if it fails).
        Called under _send_lock. Returns the body's length."""
        with self._lock:
            ops, self._ops = self._ops, []
        body = encode_batch(ops, blocks)
        try:
            self.journal.request("POST", f"/writers/{self.sid}/batch", data=body)
        except BaseException:
            with self._lock:  # not applied: keep them for the next batch (or the abort)
                self._ops[:0] = ops
            raise
        # What crossed, per disk: each block's payload and header entry; the frame's own
        # bytes (length, ops) to the disk of its first block.
        share: dict[tuple[str, str], int] = {}
        for h, payload in blocks:
            key = (h["vm"], h["disk"])
            share[key] = share.get(key, 0) + len(payload) + len(json.dumps(h)) + 2
        if blocks:
            first = (blocks[0][0]["vm"], blocks[0][0]["disk"])
            share[first] = share.get(first, 0) + len(body) - sum(share.values())
        with self._lock:
            self.bytes_sent += len(body)
            self.journal.bytes_sent += len(body)
            self.batches += 1 if blocks else 0
            for key, n in share.items():
                self._sent[key] = self._sent.get(key, 0) + n
        return len(body)

    def _encode(self, q: _Queued, whole: bool) -> tuple[dict[str, Any], bytes | memoryview, bool]:
        """A missing block's header and payload: its changed extents when CBT gave them and
        they are a small share of it (and not `whole`), else the whole block compressed.
        The bool: sent as extents."""
        ref = {"vm": q.vm, "disk": q.disk, "index": q.index, "id": q.bid.hex()}
        ext = None if whole else self._extents(q.vm, q.disk, q.index, len(q.data))
        if ext is not None and sum(n for _, n in ext[1]) <= DELTA_MAX_SHARE * len(q.data):
            base, extents = ext
            raw = b"".join(q.data[o:o + n] for o, n in extents)
            eblob, ecodec = encode_blob(raw, self._level)
            return ({**ref, "codec": CODEC_DELTA, "rlen": len(q.data), "len": len(eblob),
                     "base": base.hex() if base else "", "extents": extents, "ecodec": ecodec,
                     "elen": len(raw)}, eblob, True)
        blob, codec = encode_blob(q.data, self._level)
        return {**ref, "codec": codec, "rlen": len(q.data), "len": len(blob)}, blob, False

    def flush(self, vm: str | None = None, disk: str | None = None, *, ops: bool = True) -> None:
        """Send every queued block (and op): one `missing` request for the ids not known
        to be at the service, then one batch. A batch whose extents the service could not
        rebuild into their blocks (CBT missed a change; nothing of it applied) is sent
        again with those blocks whole.

        With `vm` and `disk` (the end of that disk's transfer): only if that disk has a
        queued block, and after any batch in flight has gone, so that its counts are
        complete; its ops alone wait for the next batch or the commit. `ops` False: queued
        ops alone are not worth a request either (the queue was sent by another thread
        meanwhile)."""
        with self._send_lock:  # one batch at a time: ops queued before a block reach the service before it
            with self._lock:
                if vm is not None and not self._queued_disks.get((vm, str(disk))):
                    return
                queued, self._queue_blocks = self._queue_blocks, []
                self._queued_raw = 0
                self._queued_at.clear()
                self._queued_disks.clear()
                unknown = list(dict.fromkeys(q.bid for q in queued if q.bid not in self._present))
                pending_ops = bool(self._ops)
            if not queued:
                if pending_ops and ops:
                    self._post([])
                return
            lacking = self.journal.missing(self.vpg, unknown) if unknown else set()
            whole: set[tuple[str, str, int]] = set()
            while True:
                blocks: list[tuple[dict[str, Any], bytes | memoryview]] = []
                given: set[bytes] = set()
                deltas = 0
                stored: dict[tuple[str, str], list[int]] = {}
                for q in queued:
                    acc = stored.setdefault((q.vm, q.disk), [0, 0])
                    if q.bid not in lacking or q.bid in given:
                        # the service has it, or this batch gives it earlier: only the reference
                        blocks.append(({"vm": q.vm, "disk": q.disk, "index": q.index, "id": q.bid.hex(),
                                        "codec": CODEC_REF, "rlen": len(q.data), "len": 0}, b""))
                        acc[1] += 1
                        continue
                    head, payload, as_delta = self._encode(q, (q.vm, q.disk, q.index) in whole)
                    blocks.append((head, payload))
                    given.add(q.bid)
                    deltas += as_delta
                    acc[0] += len(payload)
                try:
                    self._post(blocks)
                except DeltaMismatch as exc:
                    named = {b for b in exc.blocks} or {(q.vm, q.disk, q.index) for q in queued}
                    if named <= whole:
                        raise  # sent whole and still refused: not a CBT miss
                    log.warning("VPG %s: %s; sending %d block(s) whole", self.vpg, exc, len(named - whole))
                    with self._lock:
                        self.delta_fallbacks += len(named - whole)
                    whole |= named
                    continue
                except BaseException:
                    with self._lock:  # not sent: queued again in front (a retry of the caller sends them)
                        self._queue_blocks[:0] = queued
                        self._queued_raw += sum(len(q.data) for q in queued)
                        for q in queued:
                            self._queued_at.add((q.vm, q.disk, q.index))
                            self._queued_disks[(q.vm, q.disk)] = self._queued_disks.get((q.vm, q.disk), 0) + 1
                    raise
                break
            with self._lock:
                self._present.update(q.bid for q in queued)
                self.added_bytes += sum(len(p) for h, p in blocks if h["codec"] != CODEC_REF)
                self.deltas += deltas
                for key, (nbytes, had) in stored.items():
                    acc = self._stored.setdefault(key, [0, 0])
                    acc[0] += nbytes
                    acc[1] += had

    # ---- the CheckpointWriter interface --------------------------------------------------------
    def set_disk_size(self, vm: str, disk: str, size: int) -> None:
        self._check()
        if size < 0:
            raise JournalError(f"{vm}/{disk}: negative size")
        key = (vm, disk)
        with self._lock:
            if key in self._removed:
                self._removed.discard(key)
                self._reset.add(key)
        self._queue(["size", vm, disk, size], vm, disk)

    def remove_disk(self, vm: str, disk: str) -> None:
        self._check()
        with self._lock:
            self._removed.add((vm, disk))
            self._reset.discard((vm, disk))
        self._queue(["remove", vm, disk], vm, disk)

    def put_zero(self, vm: str, disk: str, index: int) -> bool:
        """As CheckpointWriter.put_zero (the answer is known here: which disks the previous
        checkpoint had came with the session)."""
        self._check()
        self._queue(["zero", vm, disk, index], vm, disk, index)
        key = (vm, disk)
        return key in self._prev and key not in self._reset

    def put_block(self, vm: str, disk: str, index: int, data: bytes | bytearray | memoryview) -> int:
        self._check()
        n = len(data)
        if index < 0 or n == 0 or n > self.block_size:
            raise JournalError(f"{vm}/{disk}: bad block {index} of {n} bytes (block size {self.block_size})")
        if is_zero(data):
            self.put_zero(vm, disk, index)
            return 0
        return self.put_hashed(vm, disk, index, blake3.blake3(data).digest(), data)

    def put_hashed(self, vm: str, disk: str, index: int, bid: bytes,
                   data: bytes | bytearray | memoryview) -> int:
        """Queue the block (a copy: the caller reuses its buffer); the queue is sent when it
        holds BATCH_RAW_BYTES or BATCH_BLOCKS. Returns 0: what the block cost is known
        once it went (`stored_for`)."""
        self._check()
        q = _Queued(vm, disk, index, bid, bytes(data))
        with self._lock:
            if (vm, disk, index) in self._queued_at:
                clash = True
            else:
                clash = False
                self._queue_blocks.append(q)
                self._queued_raw += len(q.data)
                self._queued_at.add((vm, disk, index))
                self._queued_disks[(vm, disk)] = self._queued_disks.get((vm, disk), 0) + 1
            full = self._queued_raw >= BATCH_RAW_BYTES or len(self._queue_blocks) >= BATCH_BLOCKS
        if clash:  # the same index again before the first went: the first goes first
            self.flush(ops=False)
            return self.put_hashed(vm, disk, index, bid, data)
        if full:
            self.flush(ops=False)
        return 0

    def commit(self, *, time: datetime | None = None, tag: str | None = None,
               meta: dict[str, Any] | None = None) -> CheckpointInfo:
        self._check()
        try:
            self.flush()
            body = {"time": time.isoformat() if time is not None else None, "tag": tag,
                    "meta": {**(meta or {}), "bytes_sent": self.bytes_sent}}
            d = self.journal.request("POST", f"/writers/{self.sid}/commit", json_body=body)
            self._closed = True
            return info_from_json(d)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._queue_blocks.clear()
        try:
            self.journal.request("POST", f"/writers/{self.sid}/abort")
        except Exception as exc:  # noqa: BLE001 - the service aborts an idle session itself
            log.warning("VPG %s: aborting remote checkpoint %s failed (%s); the service drops it when idle",
                        self.vpg, self.sid, exc)


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
