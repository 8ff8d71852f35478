"""On-disk byte layouts of the journal (see docs/journal-format.md, which is normative).

All integers are little-endian. Every binary file ends with a blake3-256 checksum (or, for
packs, carries one over its trailer), so a torn or altered file is detected on read.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import blake3
import numpy as np

from vmrep.errors import JournalError

FORMAT_VERSION = 1
ID_LEN = 32
ZERO_ID = bytes(ID_LEN)  # the zero-block marker in checkpoint maps

PACK_MAGIC = b"VMRPACK1"
PACK_END_MAGIC = b"VMRPEND1"
INDEX_MAGIC = b"VMRINDX1"
CKPT_MAGIC = b"VMRCKPT1"

CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = (CODEC_RAW, CODEC_ZSTD)
HASH = "blake3-256"
COMPRESSION = "zstd"

# One blob entry, as in a pack trailer and in an index file: 49 bytes.
ENTRY_DTYPE = np.dtype(
    [("id", "u1", (ID_LEN,)), ("offset", "<u8"), ("slen", "<u4"), ("rlen", "<u4"), ("codec", "u1")]
)
assert ENTRY_DTYPE.itemsize == 49
# One map entry in a checkpoint file: block index, block id: 40 bytes.
MAP_DTYPE = np.dtype([("index", "<u8"), ("id", "u1", (ID_LEN,))])
assert MAP_DTYPE.itemsize == 40

PACK_FOOTER = struct.Struct("<II32s8s")  # entry count, reserved, blake3(trailer), magic
assert PACK_FOOTER.size == 48
U32 = struct.Struct("<I")

CP_ID_RE = re.compile(r"^cp-(\d{8})-([0-9a-f]{6})$")


def checkpoint_id(seq: int, rand: str) -> str:
    return f"cp-{seq:08d}-{rand}"


def vpg_dirname(vpg: str) -> str:
    if not vpg:
        raise JournalError("VPG name is empty")
    name = quote(vpg, safe="-_.@+")
    return "%2E" + name[1:] if name.startswith(".") else name


def vpg_from_dirname(name: str) -> str:
    return unquote(name)


def _checksum(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


# ---- compatibility: a reader refuses what it does not know, it never guesses ------------

# JSON keys of each kind of object: (required, optional). A key outside both, a missing
# required key or a `format` other than FORMAT_VERSION makes the file unreadable here.
REPO_KEYS = ({"format", "kind", "block_size", "hash", "compression"}, {"id", "created"})
INDEX_KEYS = ({"format", "packs"}, {"created"})
INDEX_PACK_KEYS = ({"name", "size", "entries"}, set[str]())
CKPT_KEYS = ({"format", "kind", "vpg", "block_size", "checkpoint", "disks"}, {"written"})
CKPT_INFO_KEYS = ({"id", "seq", "time"},
                  {"tags", "meta", "added_bytes", "changed_blocks", "parent", "time_given"})
CKPT_DISK_KEYS = ({"vm", "disk", "size", "entries"}, {"reset"})
COND_KEYS = ({"format", "epoch", "count"}, {"created"})
TAG_KEYS = ({"format", "checkpoint", "tag"}, {"time"})
START_KEYS = ({"format", "checkpoint", "seq"}, {"written", "dropped"})


def check_keys(obj: Any, keys: tuple[set[str], set[str]], what: str) -> None:
    """`obj` is a JSON object with every required key and no key this version does not know."""
    required, optional = keys
    if not isinstance(obj, dict):
        raise JournalError(f"{what}: not a JSON object")
    missing = required - obj.keys()
    if missing:
        raise JournalError(f"{what}: missing {', '.join(sorted(missing))}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise JournalError(f"{what}: unknown key {', '.join(sorted(unknown))} "
                           f"(written by a newer vmrep? this one reads format {FORMAT_VERSION})")


def check_json(obj: Any, keys: tuple[set[str], set[str]], what: str) -> None:
    """check_keys, and `format` is the version this code reads."""
    if isinstance(obj, dict) and "format" in obj and obj["format"] != FORMAT_VERSION:
        raise JournalError(f"{what}: unsupported format {obj['format']!r} (this vmrep reads "
                           f"format {FORMAT_VERSION})")
    check_keys(obj, keys, what)


def check_repo_config(cfg: Any, what: str) -> None:
    """journal.json: a vmrep journal of this format, with the hash and compression this
    code implements."""
    check_json(cfg, REPO_KEYS, what)
    if cfg["kind"] != "vmrep-journal":
        raise JournalError(f"{what}: kind {cfg['kind']!r} is not a vmrep journal")
    if cfg["hash"] != HASH:
        raise JournalError(f"{what}: unsupported hash {cfg['hash']!r} (this vmrep knows {HASH})")
    if cfg["compression"] != COMPRESSION:
        raise JournalError(f"{what}: unsupported compression {cfg['compression']!r} "
                           f"(this vmrep knows {COMPRESSION})")
    bs = cfg["block_size"]
    if not isinstance(bs, int) or bs < 4096 or bs & (bs - 1):
        raise JournalError(f"{what}: block size {bs!r} is not a power of two >= 4096")


def check_entries(entries: np.ndarray, what: str) -> None:
    """Every blob entry names a codec this code decodes."""
    if len(entries):
        bad = np.setdiff1d(np.unique(entries["codec"]), np.array(CODECS, np.uint8))
        if len(bad):
            raise JournalError(f"{what}: unknown codec {int(bad[0])}")


# ---- packs -----------------------------------------------------------------------------

def pack_trailer(entries: np.ndarray) -> bytes:
    table = entries.astype(ENTRY_DTYPE, copy=False).tobytes()
    return table + PACK_FOOTER.pack(len(entries), 0, _checksum(table), PACK_END_MAGIC)


def parse_pack_trailer(tail: bytes, what: str) -> np.ndarray:
    """`tail` is the end of a pack, at least footer + table long."""
    if len(tail) < PACK_FOOTER.size:
        raise JournalError(f"{what}: too short for a pack footer")
    count, reserved, digest, magic = PACK_FOOTER.unpack(tail[-PACK_FOOTER.size :])
    if magic != PACK_END_MAGIC:
        raise JournalError(f"{what}: no pack footer (torn or not a pack)")
    if reserved != 0:
        raise JournalError(f"{what}: reserved footer field is {reserved}, not 0 (a newer format?)")
    tlen = count * ENTRY_DTYPE.itemsize
    table = tail[-PACK_FOOTER.size - tlen : -PACK_FOOTER.size]
    if len(table) != tlen or _checksum(table) != digest:
        raise JournalError(f"{what}: pack trailer checksum mismatch")
    entries = np.frombuffer(table, dtype=ENTRY_DTYPE).copy()
    check_entries(entries, what)
    return entries


# ---- index files -------------------------------------------------------------------------

def _framed(magic: bytes, header: dict[str, Any], arrays: list[bytes], *, sort_keys: bool = False) -> bytes:
    """The framing of index, checkpoint and condemned-blob files: magic, u32 header
    length, the JSON header, the arrays, and the blake3 checksum of all that."""
    hb = json.dumps(header, separators=(",", ":"), sort_keys=sort_keys).encode()
    body = b"".join([magic, U32.pack(len(hb)), hb, *arrays])
    return body + _checksum(body)


def _unframed(data: bytes, magic: bytes, what: str, kind: str, bad_checksum: str) -> tuple[Any, int]:
    """(header, offset of the arrays) of a `_framed` file, its magic and checksum checked;
    `kind` ("an index file") and `bad_checksum` word the errors."""
    if len(data) < 12 + ID_LEN or data[:8] != magic:
        raise JournalError(f"{what}: not {kind}")
    if _checksum(memoryview(data)[:-ID_LEN]) != data[-ID_LEN:]:
        raise JournalError(f"{what}: {bad_checksum}")
    (hlen,) = U32.unpack_from(data, 8)
    return json.loads(data[12 : 12 + hlen]), 12 + hlen


@dataclass
class IndexPack:
    name: str
    size: int
    entries: np.ndarray  # ENTRY_DTYPE


def encode_index(packs: list[IndexPack], created: str) -> bytes:
    header = {
        "format": FORMAT_VERSION,
        "created": created,
        "packs": [{"name": p.name, "size": p.size, "entries": len(p.entries)} for p in packs],
    }
    return _framed(INDEX_MAGIC, header, [p.entries.astype(ENTRY_DTYPE, copy=False).tobytes() for p in packs])


def decode_index(data: bytes, what: str) -> list[IndexPack]:
    header, pos = _unframed(data, INDEX_MAGIC, what, "an index file", "index checksum mismatch")
    check_json(header, INDEX_KEYS, what)
    out = []
    for p in header["packs"]:
        check_keys(p, INDEX_PACK_KEYS, f"{what}: pack entry")
        n = p["entries"] * ENTRY_DTYPE.itemsize
        if pos + n > len(data) - ID_LEN:
            raise JournalError(f"{what}: index length mismatch")
        ents = np.frombuffer(data, dtype=ENTRY_DTYPE, count=p["entries"], offset=pos)
        check_entries(ents, what)
        out.append(IndexPack(p["name"], p["size"], ents))
        pos += n
    if pos != len(data) - ID_LEN:
        raise JournalError(f"{what}: index length mismatch")
    return out


# ---- checkpoint and base files ----------------------------------------------------------

@dataclass
class CkptFile:
    header: dict[str, Any]
    # (vm, disk) -> MAP_DTYPE array (index ascending)
    maps: dict[tuple[str, str], np.ndarray]
    nbytes: int


def encode_ckpt(header: dict[str, Any], maps: list[np.ndarray]) -> bytes:
    """`header["disks"]` lists the disks; `maps[i]` are the entries of disk i."""
    assert len(maps) == len(header["disks"])
    for d, m in zip(header["disks"], maps, strict=True):
        d["entries"] = int(len(m))
    return _framed(CKPT_MAGIC, header, [m.astype(MAP_DTYPE, copy=False).tobytes() for m in maps], sort_keys=True)


def decode_ckpt(data: bytes, what: str) -> CkptFile:
    header, pos = _unframed(data, CKPT_MAGIC, what, "a checkpoint file", "checkpoint file checksum mismatch")
    check_json(header, CKPT_KEYS, what)
    if header["kind"] not in ("delta", "base"):
        raise JournalError(f"{what}: unknown checkpoint file kind {header['kind']!r}")
    check_keys(header["checkpoint"], CKPT_INFO_KEYS, f"{what}: checkpoint")
    maps = {}
    for d in header["disks"]:
        check_keys(d, CKPT_DISK_KEYS, f"{what}: disk")
        n = d["entries"]
        if pos + n * MAP_DTYPE.itemsize > len(data) - ID_LEN:
            raise JournalError(f"{what}: checkpoint length mismatch")
        maps[(d["vm"], d["disk"])] = np.frombuffer(data, dtype=MAP_DTYPE, count=n, offset=pos)
        pos += n * MAP_DTYPE.itemsize
    if pos != len(data) - ID_LEN:
        raise JournalError(f"{what}: checkpoint length mismatch")
    return CkptFile(header, maps, len(data))


# ---- condemned-blob files (garbage collection) ------------------------------------------

COND_MAGIC = b"VMRCOND1"
# One condemned blob: the pack it is in (16 bytes: the pack name's 32 hex digits) and its id.
COND_DTYPE = np.dtype([("pack", "u1", (16,)), ("id", "u1", (ID_LEN,))])
assert COND_DTYPE.itemsize == 48
COND_RE = re.compile(r"^condemned-(\d{8})\.ids$")


def condemned_name(epoch: int) -> str:
    return f"condemned-{epoch:08d}.ids"


def encode_condemned(epoch: int, pairs: list[tuple[str, bytes]], created: str) -> bytes:
    header = {"format": FORMAT_VERSION, "epoch": epoch, "created": created, "count": len(pairs)}
    arr = np.zeros(len(pairs), dtype=COND_DTYPE)
    if pairs:
        arr["pack"] = np.frombuffer(b"".join(bytes.fromhex(p) for p, _ in pairs), np.uint8).reshape(-1, 16)
        arr["id"] = np.frombuffer(b"".join(i for _, i in pairs), np.uint8).reshape(-1, ID_LEN)
    return _framed(COND_MAGIC, header, [arr.tobytes()])


def decode_condemned(data: bytes, what: str) -> tuple[int, set[tuple[str, bytes]]]:
    header, pos = _unframed(data, COND_MAGIC, what, "a condemned-blob file", "checksum mismatch")
    check_json(header, COND_KEYS, what)
    n = header["count"]
    arr = np.frombuffer(data, dtype=COND_DTYPE, count=n, offset=pos)
    if pos + n * COND_DTYPE.itemsize != len(data) - ID_LEN:
        raise JournalError(f"{what}: length mismatch")
    packs = arr["pack"].tobytes()
    ids = arr["id"].tobytes()
    return header["epoch"], {(packs[k * 16 : k * 16 + 16].hex(), ids[k * 32 : k * 32 + 32]) for k in range(n)}
