"""The checkpoint chain of a VPG: which files make up its history, and the caches that
make reading it cheap (decoded checkpoint files, built block maps, usage figures).

"Reading a VPG" in docs/journal-format.md is the normative description of what
`Chains.chain` and `Chains.map_array` compute.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmrep.errors import JournalError
from vmrep.journal import format as fmt
from vmrep.journal._fs import fsync_dir, unlink_quiet
from vmrep.journal.results import CheckpointInfo, info_from_header, parse_time
from vmrep.journal.store import BlockStore


@dataclass
class Chain:
    vpg: str
    dir: Path
    base: Path | None
    base_seq: int
    start_seq: int | None  # seq of the oldest kept checkpoint (None: no checkpoint yet)
    deltas: dict[int, Path]  # every delta file by seq (including hidden ones)
    starts: dict[int, Path]
    max_seq: int

    def visible_seqs(self) -> list[int]:
        if self.start_seq is None:
            return []
        out = [s for s in sorted(self.deltas) if s > self.start_seq]
        return [self.start_seq] + out

    def build_files(self, seq: int) -> list[tuple[int, Path]]:
        """The files whose maps, applied in order, give checkpoint `seq`."""
        files = [(self.base_seq, self.base)] if self.base is not None else []
        files += [(s, p) for s, p in sorted(self.deltas.items()) if self.base_seq < s <= seq]
        return files

    def file_of(self, seq: int) -> Path:
        if self.base is not None and seq == self.base_seq:
            return self.base
        return self.deltas[seq]

    def file_at(self, seq: int) -> Path | None:
        """file_of(seq), or None when the chain has no such file (any more)."""
        if self.base is not None and seq == self.base_seq:
            return self.base
        return self.deltas.get(seq)


def seq_from_name(name: str) -> int | None:
    stem = name.split(".", 1)[0]
    m = fmt.CP_ID_RE.match(stem)
    return int(m.group(1)) if m else None


def drop_tags(d: Path, ids: set[str]) -> int:
    """Delete the tag files of these checkpoint ids in VPG directory `d`; returns how many."""
    n = 0
    try:
        for e in os.scandir(d / "tags"):
            if e.name.endswith(".tag") and e.name.split(".", 1)[0] in ids:
                unlink_quiet(Path(e.path))
                n += 1
    except FileNotFoundError:
        return 0
    if n:
        fsync_dir(d / "tags")
    return n


class Chains:
    """Reads the chains of every VPG of one journal. Thread-safe."""

    def __init__(self, root: Path, block_size: int, store: BlockStore, cache_bytes: int) -> None:
        self.root = root
        self.block_size = block_size
        self.store = store
        self.cache_bytes = cache_bytes
        self._files: OrderedDict[str, fmt.CkptFile] = OrderedDict()
        self._files_bytes = 0
        # (vpg, base file, vm, disk, seq) -> (ids array, size, file it was built up to)
        self._maps: OrderedDict[tuple, tuple[np.ndarray, int, Path | None]] = OrderedDict()
        self._maps_bytes = 0
        self._cache_lock = threading.RLock()
        self._usage_cache: dict[str, tuple] = {}
        self._starts_checked: set[Path] = set()  # start markers read and found readable

    def vpg_dir(self, vpg: str) -> Path:
        return self.root / "vpgs" / fmt.vpg_dirname(vpg)

    def vpgs(self) -> list[str]:
        d = self.root / "vpgs"
        return sorted(fmt.vpg_from_dirname(e.name) for e in os.scandir(d) if e.is_dir())

    def forget(self, vpg: str) -> None:
        """Drop what is cached of a VPG (it was removed)."""
        with self._cache_lock:
            for k in [k for k in self._maps if k[0] == vpg]:
                self._maps_bytes -= self._maps.pop(k)[0].nbytes
        self._usage_cache.pop(vpg, None)

    # ---- files ---------------------------------------------------------------------------
    def read_ckpt(self, path: Path) -> fmt.CkptFile:
        key = str(path)
        with self._cache_lock:
            f = self._files.get(key)
            if f is not None:
                self._files.move_to_end(key)
                return f
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise JournalError(f"{path.name}: checkpoint file vanished (retention ran meanwhile?)") from None
        what = str(path.relative_to(self.root))
        f = fmt.decode_ckpt(data, what)
        if f.header["block_size"] != self.block_size:
            raise JournalError(f"{what}: block size {f.header['block_size']} is not the journal's "
                               f"{self.block_size}")
        with self._cache_lock:
            self._files[key] = f
            self._files_bytes += f.nbytes
            while self._files_bytes > self.cache_bytes and len(self._files) > 1:
                _, old = self._files.popitem(last=False)
                self._files_bytes -= old.nbytes
        return f

    def chain(self, vpg: str) -> Chain:
        d = self.vpg_dir(vpg)

        def scan(sub: str, suffix: str) -> dict[int, Path]:
            out: dict[int, Path] = {}
            try:
                for e in os.scandir(d / sub):
                    if e.name.endswith(suffix):
                        s = seq_from_name(e.name)
                        if s is not None:
                            out[s] = Path(e.path)
            except FileNotFoundError:
                pass
            return out

        deltas = scan("checkpoints", ".ckpt")
        bases = scan("base", ".base")
        starts = scan("start", ".start")
        for p in starts.values():
            self._check_start(p)
        base_seq = max(bases) if bases else 0
        base = bases[base_seq] if bases else None
        cand = [base_seq] if base else []
        cand += [s for s in starts if s in deltas or (base and s == base_seq)]
        start: int | None  # None: no checkpoint yet (Chain.start_seq)
        if cand:
            start = max(cand)
        else:
            start = min(deltas) if deltas else None
        max_seq = max([base_seq, *deltas, *starts]) if (deltas or starts or bases) else 0
        return Chain(vpg, d, base, base_seq, start, deltas, starts, max_seq)

    def _check_start(self, path: Path) -> None:
        """A start marker decides what is kept: one this version cannot read is refused,
        not taken on its name alone. Checked once per file (they are never modified)."""
        if path in self._starts_checked:
            return
        what = str(path.relative_to(self.root))
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            return  # superseded meanwhile; the next scan no longer lists it
        except ValueError as exc:
            raise JournalError(f"{what}: not JSON ({exc})") from None
        fmt.check_json(body, fmt.START_KEYS, what)
        if body["checkpoint"] != path.name[: -len(".start")]:
            raise JournalError(f"{what}: names checkpoint {body['checkpoint']!r}")
        self._starts_checked.add(path)

    def tags(self, chain: Chain) -> dict[str, list[str]]:
        out: dict[str, list[tuple[str, str]]] = {}
        try:
            entries = list(os.scandir(chain.dir / "tags"))
        except FileNotFoundError:
            return {}
        for e in entries:
            if not e.name.endswith(".tag"):
                continue
            try:
                t = json.loads(Path(e.path).read_text())
            except (FileNotFoundError, ValueError):
                continue
            fmt.check_json(t, fmt.TAG_KEYS, f"vpgs/{chain.dir.name}/tags/{e.name}")
            out.setdefault(t["checkpoint"], []).append((t.get("time", ""), t["tag"]))
        return {k: [tag for _, tag in sorted(v)] for k, v in out.items()}

    def infos(self, chain: Chain) -> list[CheckpointInfo]:
        tags = self.tags(chain)
        out = []
        for s in chain.visible_seqs():
            h = self.read_ckpt(chain.file_of(s)).header
            out.append(info_from_header(h, tags.get(h["checkpoint"]["id"], [])))
        return out

    def header_at(self, chain: Chain, seq: int) -> dict[str, Any]:
        return self.read_ckpt(chain.file_of(seq)).header

    def disks_at(self, chain: Chain, seq: int) -> dict[tuple[str, str], int]:
        h = self.header_at(chain, seq)
        return {(d["vm"], d["disk"]): d["size"] for d in h["disks"]}

    # ---- maps ----------------------------------------------------------------------------
    def map_array(self, chain: Chain, seq: int, vm: str, disk: str) -> tuple[np.ndarray, int] | None:
        """(ids array, size) of a disk at checkpoint `seq`, or None if the disk is absent."""
        bs = self.block_size
        base_key = str(chain.base) if chain.base else ""
        ckey = (chain.vpg, base_key, vm, disk)
        best: tuple[int, np.ndarray, int] | None = None
        with self._cache_lock:
            # a cached map is usable if the file it was built up to is still in this chain
            # (a VPG removed and created again reuses sequence numbers, never file names)
            for (v, b, m, dk, s), val in self._maps.items():
                if (v, b, m, dk) == ckey and s <= seq and (best is None or s > best[0]):
                    if val[2] == chain.file_at(s):
                        best = (s, val[0], val[1])
            if best is not None and best[0] == seq:
                self._maps.move_to_end((*ckey, seq))
                return best[1], best[2]
        arr: np.ndarray | None = None
        size = 0
        owned = False
        files = chain.build_files(seq)
        if best is not None and best[0] >= chain.base_seq:
            arr, size = best[1], best[2]
            files = [(s, p) for s, p in files if s > best[0]]
        for _s, path in files:
            f = self.read_ckpt(path)
            d = next((d for d in f.header["disks"] if d["vm"] == vm and d["disk"] == disk), None)
            if d is None:
                arr, owned, size = None, False, 0
                continue
            size = d["size"]
            n = -(-size // bs)
            if arr is None or d.get("reset"):
                arr = np.zeros((n, fmt.ID_LEN), dtype=np.uint8)
                owned = True
            elif len(arr) != n:
                new = np.zeros((n, fmt.ID_LEN), dtype=np.uint8)
                k = min(n, len(arr))
                new[:k] = arr[:k]
                arr, owned = new, True
            ents = f.maps[(vm, disk)]
            if len(ents):
                if not owned:
                    arr = arr.copy()
                    owned = True
                idx = ents["index"]
                ok = idx < n
                if not ok.all():
                    arr[idx[ok].astype(np.intp)] = ents["id"][ok]
                else:
                    arr[idx.astype(np.intp)] = ents["id"]
        if arr is None:
            return None
        arr.flags.writeable = False
        with self._cache_lock:
            self._maps[(*ckey, seq)] = (arr, size, chain.file_at(seq))
            self._maps_bytes += arr.nbytes
            while self._maps_bytes > self.cache_bytes and len(self._maps) > 1:
                _, old = self._maps.popitem(last=False)
                self._maps_bytes -= old[0].nbytes
        return arr, size

    def resolve(self, vpg: str, ref: str) -> tuple[Chain, CheckpointInfo]:
        chain = self.chain(vpg)
        infos = self.infos(chain)
        if not infos:
            raise JournalError(f"VPG {vpg}: no checkpoint in the journal (ref {ref!r})")
        if ref == "latest":
            return chain, infos[-1]
        if ref == "latest-clean":
            # The newest checkpoint before any suspected encryption (docs/ransomware.md);
            # imported here: the rule reads these infos, the journal does not need it otherwise.
            from vmrep.ransomware.baseline import assess
            from vmrep.ransomware.dismissals import load_dir, load_incidents_dir

            a = assess(infos, load_dir(self.vpg_dir(vpg)), recorded=load_incidents_dir(self.vpg_dir(vpg)))
            if a.last_clean is None:
                raise JournalError(f"VPG {vpg}: no clean checkpoint kept (ref 'latest-clean'): encryption is "
                                   "suspected since the oldest kept checkpoint")
            return chain, next(i for i in infos if i.id == a.last_clean.id)
        if ref == "latest-tagged":
            tagged = [i for i in infos if i.tags]
            if not tagged:
                raise JournalError(f"VPG {vpg}: no tagged checkpoint (ref {ref!r})")
            return chain, tagged[-1]
        for i in infos:
            if i.id == ref:
                return chain, i
        if ref.startswith("cp-"):
            hits = [i for i in infos if i.id.startswith(ref)]
            if len(hits) == 1:
                return chain, hits[0]
            raise JournalError(f"VPG {vpg}: no kept checkpoint {ref!r}")
        try:
            t = parse_time(ref)
        except ValueError:
            raise JournalError(f"VPG {vpg}: checkpoint ref {ref!r} is not an id, 'latest', "
                               "'latest-tagged', 'latest-clean' or an ISO time") from None
        before = [i for i in infos if i.time <= t]
        if not before:
            raise JournalError(f"VPG {vpg}: no kept checkpoint at or before {ref!r} "
                               f"(history starts {infos[0].time.isoformat()})")
        return chain, before[-1]

    # ---- accounting ----------------------------------------------------------------------
    def referenced(self, chain: Chain, start_seq: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(base id arrays, history id arrays) referenced if history started at start_seq."""
        base = []
        for (vm, disk) in self.disks_at(chain, start_seq):
            r = self.map_array(chain, start_seq, vm, disk)
            if r is not None:
                base.append(r[0])
        hist = []
        for s in chain.visible_seqs():
            if s > start_seq:
                f = self.read_ckpt(chain.deltas[s])
                hist += [m["id"] for m in f.maps.values() if len(m)]
        return base, hist

    def usage_at(self, chain: Chain, start_seq: int) -> tuple[int, int]:
        """(total, base) stored bytes the VPG would use with history starting at start_seq."""
        base, hist = self.referenced(chain, start_seq)
        empty = np.zeros((0, fmt.ID_LEN), np.uint8)
        b = self.store.bytes_of(np.concatenate(base) if base else empty)
        t = self.store.bytes_of(np.concatenate(base + hist) if base or hist else empty)
        return t, b

    def usage(self, chain: Chain, infos: list[CheckpointInfo]) -> tuple[int, int]:
        """usage_at the chain's start, cached while neither the chain nor the index changes."""
        self.store.refresh()
        key = (chain.vpg, chain.base, tuple(chain.file_of(s) for s in chain.visible_seqs()),
               self.store.generation)
        cached = self._usage_cache.get(chain.vpg)
        if cached is not None and cached[0] == key:
            return cached[1]
        total, base = self.usage_at(chain, infos[0].seq)
        self._usage_cache[chain.vpg] = (key, (total, base))
        return total, base
