"""`vmrep journal serve`: the recovery site's journal over HTTPS, append-only for the
protected sites (docs/journal-service.md).

A small Starlette app over one open `Journal`. Every write goes through the journal's
own `CheckpointWriter` (so every durability rule of docs/journal-format.md holds: packs
and index fsynced before the checkpoint file is renamed into place); the service adds
authentication, the role check, and the verification of each block's blake3 id.

Roles (each credential a bearer token given as a secret reference):
  writer (bound to a protected site S): whoami; read the checkpoints, disks and block maps
      of VPGs protected at S; ask which ids are missing; open a checkpoint of such a VPG,
      add blocks to it, commit or abort it (only its own). Nothing else: every other
      request is an HTTP 403 with one line, logged.
  admin (the recovery site's own): everything a writer may, for every VPG, plus
      retention, garbage collection and verify.
There is no request that deletes a pack or rewrites or removes a checkpoint for anyone:
the journal has no such operation (retention and GC are how data leaves it).

Why one module of ~600 lines: the role check is the service's security boundary, and
every endpoint calls it the same way next to the journal call it guards; keeping the
rules, the endpoints and the server start in one file lets a reviewer check that no
endpoint skips the check by reading it top to bottom.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import blake3
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vmrep.config import Config, JournalServiceSettings, ServiceCredential
from vmrep.errors import JournalError, JournalLocked, NotFound, VmrepError
from vmrep.journal import format as fmt
from vmrep.journal.codec import decode_blob
from vmrep.journal.journal import RETENTION_WAIT_SECONDS, Journal
from vmrep.journal.remote import CODEC_DELTA, CODEC_REF, decode_batch, info_to_json
from vmrep.journal.results import is_zero
from vmrep.journal.writer import CheckpointWriter
from vmrep.secrets import resolve_secret

log = logging.getLogger("vmrep.journal.service")

MAX_BATCH_BYTES = 64 << 20  # a batch larger than this is refused (remote.BATCH_RAW_BYTES keeps writers under it)
MAX_MISSING_IDS = 100_000  # ids per `missing` request


class Denied(Exception):
    """A request the credential may not make: HTTP 403 with this one line."""


class BadRequest(Exception):
    """HTTP 400 with this one line."""


class Unrebuilt(Exception):
    """HTTP 422: a block sent as extents did not rebuild to its id (the client sends it whole).
    `blocks`: every such block of the batch, [vm, disk, index] each, so that the client
    resends only those whole and the others of the batch as they were."""

    def __init__(self, message: str, blocks: list[list[Any]] | None = None) -> None:
        super().__init__(message)
        self.blocks = blocks or []


@dataclass
class Caller:
    name: str
    role: str
    site: str | None


@dataclass
class _Open:
    writer: CheckpointWriter
    vpg: str
    owner: str  # credential name
    used: float


class JournalService:
    """The state behind the app: the journal, the credentials, the open checkpoints."""

    def __init__(self, cfg: Config, journal: Journal, settings: JournalServiceSettings) -> None:
        self.cfg, self.journal, self.settings = cfg, journal, settings
        self._tokens: list[tuple[bytes, ServiceCredential]] = []
        for i, cred in enumerate(settings.credentials):
            tok = resolve_secret(cred.token, f"journal.service.credentials[{cred.name or i}].token")
            self._tokens.append((tok.encode(), cred))
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()
        self._reloaded = 0.0

    # ---- who and what ----------------------------------------------------------------------
    def caller(self, request: Request) -> Caller:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise Denied("no credential given (Authorization: Bearer <token>)")
        given = auth[7:].encode()
        for tok, cred in self._tokens:
            if hmac.compare_digest(tok, given):
                return Caller(cred.name, cred.role, cred.site)
        raise Denied("unknown credential")

    def vpg(self, name: str) -> Any:
        """The VPG's config; the file is read again for a name not known yet (a reverse
        VPG that a commit generated beside it, vmrep.d/, after the service started)."""
        v = next((x for x in self.cfg.vpgs if x.name == name), None)
        if v is None and self.cfg.source is not None and time.monotonic() - self._reloaded > 2.0:
            from vmrep.config import load_config

            self._reloaded = time.monotonic()
            try:
                fresh = load_config(self.cfg.source)
            except VmrepError as exc:
                log.warning("re-reading %s failed: %s", self.cfg.source, exc)
            else:
                self.cfg = fresh  # VPGs only: credentials and TLS stay those it started with
                v = next((x for x in self.cfg.vpgs if x.name == name), None)
        return v

    def may_vpg(self, who: Caller, vpg: str) -> None:
        if who.role == "admin":
            return
        v = self.vpg(vpg)
        if v is None:
            raise Denied(f"credential {who.name} (writer for site {who.site}) may not use VPG {vpg}: "
                         "not a VPG of the config")
        if v.protected_site != who.site:
            raise Denied(f"credential {who.name} (writer for site {who.site}) may not use VPG {vpg}: "
                         f"it is protected at site {v.protected_site}")

    def admin_only(self, who: Caller, what: str) -> None:
        if who.role != "admin":
            raise Denied(f"credential {who.name} (writer for site {who.site}) may not {what}: "
                         "writers only add blocks and commit checkpoints")

    def session(self, who: Caller, sid: str) -> _Open:
        with self._lock:
            o = self._open.get(sid)
        if o is None:
            raise NotFound(f"no open checkpoint {sid} (committed, aborted, or dropped after "
                           f"{self.settings.session_idle_seconds:.0f}s idle)")
        if o.owner != who.name:
            raise Denied(f"credential {who.name} may not use checkpoint {sid}: another credential opened it")
        o.used = time.monotonic()
        return o

    def drop_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [k for k, o in self._open.items() if now - o.used > self.settings.session_idle_seconds]
            dropped = [self._open.pop(k) for k in idle]
        for o in dropped:
            log.warning("VPG %s: open checkpoint of %s idle for over %.0fs; aborted", o.vpg, o.owner,
                        self.settings.session_idle_seconds)
            o.writer.abort()

    def close(self) -> None:
        with self._lock:
            left = list(self._open.values())
            self._open.clear()
        for o in left:
            o.writer.abort()

    # ---- operations (run in a thread: the journal blocks) ---------------------------------
    def begin(self, who: Caller, vpg: str) -> dict[str, Any]:
        self.drop_idle()
        # The recovery site's retention run may hold the VPG a moment: wait for it (not for
        # another writer: that is a 409 at once).
        w = self.journal.begin(vpg, wait=RETENTION_WAIT_SECONDS)
        sid = secrets.token_hex(16)
        with self._lock:
            self._open[sid] = _Open(w, vpg, who.name, time.monotonic())
        prev = [{"vm": vm, "disk": d, "size": n} for (vm, d), n in w._prev_disks.items()]  # noqa: SLF001
        log.info("VPG %s: checkpoint %d opened by %s", vpg, w.seq, who.name)
        return {"session": sid, "seq": w.seq, "block_size": w.block_size, "disks": prev}

    def batch(self, o: _Open, body: bytes) -> dict[str, Any]:
        try:
            ops, blocks = decode_batch(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"not a block batch: {exc}") from None
        w = o.writer
        bs = w.block_size
        # Every block is checked before anything of the batch is applied: a bad batch
        # changes nothing.
        checked: list[tuple[str, str, int, bytes, bytes | None]] = []
        given: set[bytes] = set()  # ids whose content came earlier in this batch (a reference may name them)
        unrebuilt: list[Unrebuilt] = []
        for h, payload in blocks:
            try:
                vm, disk, index, bid = str(h["vm"]), str(h["disk"]), int(h["index"]), bytes.fromhex(h["id"])
                codec, rlen = int(h["codec"]), int(h["rlen"])
            except (KeyError, TypeError, ValueError):
                raise BadRequest("a block of the batch lacks vm, disk, index, id, codec or rlen") from None
            where = f"block {index} of {vm}/{disk}"
            if len(bid) != fmt.ID_LEN or index < 0 or not 0 < rlen <= bs:
                raise BadRequest(f"{where}: bad id, index or length")
            if codec == CODEC_DELTA:
                try:
                    rebuilt = self._rebuild(w, where, h, payload, bid, rlen)
                except Unrebuilt as exc:  # every such block named at once: one resend fixes them all
                    unrebuilt.append(Unrebuilt(str(exc), [[vm, disk, index]]))
                    continue
                checked.append((vm, disk, index, bid, rebuilt))
                if not is_zero(rebuilt):
                    given.add(bid)
                continue
            if codec == CODEC_REF:  # a reference to a block the service has (or this batch gave)
                if not (bid in given or w.has(bid) or self.journal.store.has(bid)):
                    raise BadRequest(f"{where}: block {bid.hex()[:16]}… is not at the service; send its content")
                checked.append((vm, disk, index, bid, None))
                continue
            try:
                data = decode_blob(bytes(payload), codec, rlen)
            except Exception as exc:  # noqa: BLE001 - zstd's errors name nothing of ours
                raise BadRequest(f"{where}: cannot decode ({exc})") from None
            if len(data) != rlen or blake3.blake3(data).digest() != bid:
                log.warning("VPG %s: %s from %s does not match its id; batch refused", o.vpg, where, o.owner)
                raise BadRequest(f"{where}: content does not match its blake3 id; nothing of the batch stored")
            checked.append((vm, disk, index, bid, data))
            if not is_zero(data):
                given.add(bid)
        if unrebuilt:
            raise Unrebuilt(f"{unrebuilt[0]} ({len(unrebuilt)} block(s) of the batch; nothing of it applied)",
                            [b for u in unrebuilt for b in u.blocks])
        for op in ops:
            if not (isinstance(op, list) and op and op[0] in ("size", "zero", "remove")
                    and len(op) == {"size": 4, "zero": 4, "remove": 3}[op[0]]):
                raise BadRequest(f"unknown writer operation {str(op)[:80]}")
        for op in ops:
            if op[0] == "size":
                w.set_disk_size(str(op[1]), str(op[2]), int(op[3]))
            elif op[0] == "zero":
                w.put_zero(str(op[1]), str(op[2]), int(op[3]))
            else:
                w.remove_disk(str(op[1]), str(op[2]))
        stored = 0
        for vm, disk, index, bid, content in checked:
            if content is None:
                w.record(vm, disk, index, bid)
            elif is_zero(content):
                w.put_zero(vm, disk, index)
            else:
                stored += w.put_hashed(vm, disk, index, bid, content)
        return {"stored": stored, "blocks": len(checked), "ops": len(ops)}

    def _rebuild(self, w: CheckpointWriter, where: str, h: dict[str, Any], payload: memoryview,
                 bid: bytes, rlen: int) -> bytes:
        """A block sent as its changed extents: laid over the base block (the previous
        checkpoint's, or zeros), then checked against its id like any block."""
        try:
            base_hex, extents = str(h.get("base", "")), [(int(o), int(n)) for o, n in h["extents"]]
            ecodec, elen = int(h["ecodec"]), int(h["elen"])
            base = bytes.fromhex(base_hex) if base_hex else None
        except (KeyError, TypeError, ValueError):
            raise BadRequest(f"{where}: extents block lacks base, extents, ecodec or elen") from None
        if any(o < 0 or n <= 0 or o + n > rlen for o, n in extents) or sum(n for _, n in extents) != elen \
                or (base is not None and len(base) != fmt.ID_LEN):
            raise BadRequest(f"{where}: extents outside the block or not of the payload's length")
        try:
            raw = decode_blob(bytes(payload), ecodec, elen)
        except Exception as exc:  # noqa: BLE001 - zstd's errors name nothing of ours
            raise BadRequest(f"{where}: cannot decode ({exc})") from None
        if len(raw) != elen:
            raise BadRequest(f"{where}: extents payload of {len(raw)} bytes, header says {elen}")
        buf = bytearray(rlen)
        if base is not None:
            if not w.has(base):
                raise Unrebuilt(f"{where}: base block {base.hex()[:16]}… is not at the service")
            old = self.journal.store.read(base)
            buf[: min(rlen, len(old))] = old[:rlen]
        pos = 0
        for o, n in extents:
            buf[o : o + n] = raw[pos : pos + n]
            pos += n
        if blake3.blake3(buf).digest() != bid:
            raise Unrebuilt(f"{where}: the previous block with the extents sent does not match its id")
        return bytes(buf)

    def preseed(self, who: Caller, o: _Open, body: Any) -> bytes:
        """Hash a pre-seed copy at this site and put its blocks into the open checkpoint;
        returns its map (n x 32-byte ids, the zero id for zero blocks). A writer may name
        only a path the service's config lists as a pre-seed of that VM's disk."""
        try:
            vm, disk, path, size = str(body["vm"]), str(body["disk"]), str(body["path"]), int(body["size"])
        except (KeyError, TypeError, ValueError):
            raise BadRequest("preseed: give {vm, disk, path, size}") from None
        v = self.vpg(o.vpg)
        spec = next((x for x in v.vms if x.name == vm), None) if v is not None else None
        if who.role != "admin" and (spec is None or spec.preseed.get(disk) != path):
            raise Denied(f"credential {who.name} may not read {path}: not the pre-seed of {vm}/{disk} "
                         f"in VPG {o.vpg}'s config at the recovery site")
        if v is None:
            raise BadRequest(f"preseed: VPG {o.vpg} is not in the service's config")
        from vmrep.runtime import get_runtime

        ds = get_runtime(self.cfg.source).datastores(v.recovery_site) if self.cfg.source else None
        if ds is None:
            raise BadRequest("preseed: the service's config has no file (no datastores to read)")
        if ds.size(path) != size:
            raise BadRequest(f"preseed: {path} is not of the disk's size {size}")
        w = o.writer
        bs = w.block_size
        n = -(-size // bs)
        ids = bytearray(n * fmt.ID_LEN)
        chunk = 8 * bs
        for first in range(0, n, 8):
            off = first * bs
            data = ds.read(path, off, min(chunk, size - off))
            for k in range(-(-len(data) // bs)):
                block = data[k * bs:(k + 1) * bs]
                if is_zero(block):
                    continue
                bid = blake3.blake3(block).digest()
                w.put_hashed(vm, disk, first + k, bid, block)
                ids[(first + k) * fmt.ID_LEN:(first + k + 1) * fmt.ID_LEN] = bid
        log.info("VPG %s: pre-seed %s hashed for %s/%s (%d blocks)", o.vpg, path, vm, disk, n)
        return bytes(ids)

    def commit(self, sid: str, o: _Open, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._open.pop(sid, None)
        t = body.get("time")
        try:
            at = datetime.fromisoformat(t) if t else None
        except (TypeError, ValueError):
            o.writer.abort()
            raise BadRequest(f"commit: time {str(t)[:40]!r} is not an ISO time") from None
        meta = body.get("meta") or {}
        if not isinstance(meta, dict):
            o.writer.abort()
            raise BadRequest("commit: meta must be a mapping")
        info = o.writer.commit(time=at, tag=body.get("tag"), meta=meta)
        log.info("VPG %s: checkpoint %s committed by %s", o.vpg, info.id, o.owner)
        # Nothing after the commit: the VPG's retention is the recovery site's
        # `retention/<site>` run (flows/retention.py, engine.apply_retention with the state
        # database), not this process's, which has no state database to raise alerts in.
        return info_to_json(info)

    def abort(self, sid: str, o: _Open) -> dict[str, Any]:
        with self._lock:
            self._open.pop(sid, None)
        o.writer.abort()
        return {"aborted": sid}


# ---- the app -----------------------------------------------------------------------------

Handler = Callable[[Request, "JournalService", Caller], Awaitable[Response]]


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def build_app(svc: JournalService) -> Starlette:
    def endpoint(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            who: Caller | None = None
            try:
                who = svc.caller(request)
                return await fn(request, svc, who)
            except Denied as exc:
                log.warning("refused %s %s from %s: %s", request.method, request.url.path,
                            who.name if who else (request.client.host if request.client else "?"), exc)
                return _error(403, str(exc))
            except BadRequest as exc:
                return _error(400, str(exc))
            except Unrebuilt as exc:
                return JSONResponse({"error": str(exc), "unrebuilt": exc.blocks}, status_code=422)
            except NotFound as exc:
                return _error(404, str(exc))
            except JournalLocked as exc:
                return _error(409, str(exc))
            except (JournalError, VmrepError) as exc:
                return _error(400, str(exc).splitlines()[0])
            except Exception as exc:  # noqa: BLE001 - a client gets one line, the log the trace
                log.exception("%s %s failed", request.method, request.url.path)
                return _error(500, f"internal error ({type(exc).__name__}); see the service's log")
        return run

    j = svc.journal

    async def whoami(request: Request, svc: JournalService, who: Caller) -> Response:
        return _json({"name": who.name, "role": who.role, "site": who.site, "block_size": j.block_size})

    async def checkpoints(request: Request, svc: JournalService, who: Caller) -> Response:
        vpg = request.path_params["vpg"]
        svc.may_vpg(who, vpg)
        infos = await run_in_threadpool(j.checkpoints, vpg)
        return _json([info_to_json(i) for i in infos])

    async def checkpoint(request: Request, svc: JournalService, who: Caller) -> Response:
        vpg = request.path_params["vpg"]
        svc.may_vpg(who, vpg)
        return _json(info_to_json(await run_in_threadpool(j.checkpoint, vpg, request.path_params["ref"])))

    async def disks(request: Request, svc: JournalService, who: Caller) -> Response:
        vpg = request.path_params["vpg"]
        svc.may_vpg(who, vpg)
        d = await run_in_threadpool(j.disks, vpg, request.path_params["ref"])
        return _json([{"vm": vm, "disk": disk, "size": n} for (vm, disk), n in sorted(d.items())])

    async def block_map(request: Request, svc: JournalService, who: Caller) -> Response:
        p = request.path_params
        svc.may_vpg(who, p["vpg"])
        m = await run_in_threadpool(j.block_map, p["vpg"], p["ref"], p["vm"], p["disk"])
        return Response(m.array.tobytes(), media_type="application/octet-stream",
                        headers={"X-Disk-Size": str(m.size), "X-Block-Size": str(m.block_size)})

    async def missing(request: Request, svc: JournalService, who: Caller) -> Response:
        svc.may_vpg(who, request.path_params["vpg"])
        try:
            body = await request.json()
            ids = [bytes.fromhex(h) for h in body["ids"]]
        except (ValueError, KeyError, TypeError):
            raise BadRequest("missing: give {\"ids\": [<hex block id>, ...]}") from None
        if len(ids) > MAX_MISSING_IDS:
            raise BadRequest(f"missing: at most {MAX_MISSING_IDS} ids per request")
        return _json({"missing": [i.hex() for i in ids if not j.store.has(i)]})

    async def begin(request: Request, svc: JournalService, who: Caller) -> Response:
        vpg = request.path_params["vpg"]
        svc.may_vpg(who, vpg)
        return _json(await run_in_threadpool(svc.begin, who, vpg))

    async def batch(request: Request, svc: JournalService, who: Caller) -> Response:
        o = svc.session(who, request.path_params["sid"])
        n = int(request.headers.get("content-length") or 0)
        if n > MAX_BATCH_BYTES:
            raise BadRequest(f"batch of {n} bytes is over the limit of {MAX_BATCH_BYTES}")
        body = await request.body()
        return _json(await run_in_threadpool(svc.batch, o, body))

    async def preseed(request: Request, svc: JournalService, who: Caller) -> Response:
        o = svc.session(who, request.path_params["sid"])
        try:
            body = await request.json()
        except ValueError:
            body = None
        ids = await run_in_threadpool(svc.preseed, who, o, body)
        return Response(ids, media_type="application/octet-stream")

    async def commit(request: Request, svc: JournalService, who: Caller) -> Response:
        sid = request.path_params["sid"]
        o = svc.session(who, sid)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise BadRequest("commit: give a JSON mapping {time, tag, meta}")
        return _json(await run_in_threadpool(svc.commit, sid, o, body))

    async def abort(request: Request, svc: JournalService, who: Caller) -> Response:
        sid = request.path_params["sid"]
        return _json(await run_in_threadpool(svc.abort, sid, svc.session(who, sid)))

    # ---- the recovery site's own (admin) ------------------------------------------------------
    async def retention(request: Request, svc: JournalService, who: Caller) -> Response:
        vpg = request.path_params["vpg"]
        svc.admin_only(who, f"run retention on VPG {vpg}")
        try:
            body = await request.json()
            keep = datetime.fromisoformat(body["keep_since"])
        except (ValueError, KeyError, TypeError):
            raise BadRequest("retention: give {\"keep_since\": <ISO time>, \"hard_limit_bytes\": n|null}") from None
        r = await run_in_threadpool(j.apply_retention, vpg, keep, body.get("hard_limit_bytes"))
        return _json({"vpg": r.vpg, "base": r.base, "promoted": r.promoted, "dropped_by_limit": r.dropped_by_limit,
                      "bytes_before": r.bytes_before, "bytes_after": r.bytes_after})

    async def gc(request: Request, svc: JournalService, who: Caller) -> Response:
        svc.admin_only(who, "run garbage collection")
        st = await run_in_threadpool(j.gc)
        return _json({"busy": st is None, "stats": None if st is None else json.loads(
            json.dumps(getattr(st, "__dict__", {}), default=str))})

    async def verify(request: Request, svc: JournalService, who: Caller) -> Response:
        vpg = request.path_params["vpg"]
        svc.admin_only(who, f"verify VPG {vpg}")
        bad = await run_in_threadpool(j.verify, vpg)
        return _json({"vpg": vpg, "mismatches": [str(m) for m in bad]})

    async def other(request: Request, svc: JournalService, who: Caller) -> Response:
        # Whatever is not above: nobody may delete a pack or rewrite a checkpoint here.
        if who.role != "admin":
            raise Denied(f"credential {who.name} (writer for site {who.site}) may not "
                         f"{request.method} {request.url.path}: writers only add blocks and commit checkpoints")
        return _error(404, f"no such request: {request.method} {request.url.path} (the journal service "
                           "deletes nothing but through retention and GC)")

    E = endpoint
    every = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    routes = [
        Route("/v1/whoami", E(whoami), methods=["GET"]),
        Route("/v1/vpgs/{vpg}/checkpoints", E(checkpoints), methods=["GET"]),
        Route("/v1/vpgs/{vpg}/checkpoints/{ref}", E(checkpoint), methods=["GET"]),
        Route("/v1/vpgs/{vpg}/checkpoints/{ref}/disks", E(disks), methods=["GET"]),
        Route("/v1/vpgs/{vpg}/checkpoints/{ref}/maps/{vm}/{disk}", E(block_map), methods=["GET"]),
        Route("/v1/vpgs/{vpg}/missing", E(missing), methods=["POST"]),
        Route("/v1/vpgs/{vpg}/writers", E(begin), methods=["POST"]),
        Route("/v1/writers/{sid}/batch", E(batch), methods=["POST"]),
        Route("/v1/writers/{sid}/preseed", E(preseed), methods=["POST"]),
        Route("/v1/writers/{sid}/commit", E(commit), methods=["POST"]),
        Route("/v1/writers/{sid}/abort", E(abort), methods=["POST"]),
        Route("/v1/vpgs/{vpg}/retention", E(retention), methods=["POST"]),
        Route("/v1/gc", E(gc), methods=["POST"]),
        Route("/v1/vpgs/{vpg}/verify", E(verify), methods=["POST"]),
        Route("/{rest:path}", E(other), methods=every),
    ]
    app = Starlette(routes=routes)
    # A method a route lacks (DELETE on a checkpoint, PUT to rewrite it) must reach
    # `other` (403 for a writer), not Starlette's 405: routes match by path first.
    app.router.routes = [_MethodStrict(r) if r.path != "/{rest:path}" else r for r in routes]
    return app


class _MethodStrict(Route):
    """A route that does not match at all for a method it lacks, so the catch-all answers."""

    def __init__(self, r: Route) -> None:
        super().__init__(r.path, r.endpoint, methods=list(r.methods or []), name=r.name)

    def matches(self, scope: Any) -> tuple[Any, Any]:
        from starlette.routing import Match

        match, child = super().matches(scope)
        if match == Match.PARTIAL:
            return Match.NONE, {}
        return match, child


def serve(cfg: Config, *, host: str | None = None, port: int | None = None) -> None:
    """Run the service until interrupted (uvicorn, TLS from journal.service)."""
    import uvicorn

    settings = cfg.journal.service
    if settings is None:
        raise VmrepError("journal.service is not configured (listen, cert_file, key_file, credentials); "
                         "see docs/journal-service.md")
    for f, label in ((settings.cert_file, "cert_file"), (settings.key_file, "key_file")):
        if not Path(f).is_file():
            raise VmrepError(f"journal.service.{label}: {f} not found")
    if not settings.credentials:
        raise VmrepError("journal.service.credentials: none given (the service would refuse everyone)")
    h, _, p = settings.listen.rpartition(":")
    host = host or h or "127.0.0.1"
    port = port if port is not None else int(p)
    j = cfg.journal
    journal = Journal.open(cfg.journal_path, block_size=j.block_size, compression_level=j.compression_level)
    svc = JournalService(cfg, journal, settings)
    # A bounded graceful shutdown: a protected site's idle keep-alive connection must
    # not hold SIGTERM up (open checkpoints are aborted below either way).
    server = uvicorn.Server(uvicorn.Config(build_app(svc), host=host, port=port, ssl_certfile=str(settings.cert_file),
                                           ssl_keyfile=str(settings.key_file), log_level="info", access_log=False,
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        svc.close()
        journal.close()


# ---- certificates ------------------------------------------------------------------------


def make_certificate(directory: Path, hosts: list[str]) -> tuple[Path, Path, Path, str]:
    """A CA and a server certificate signed by it, for the service (as the lab makes its
    vCenters'). Returns (ca_file, cert_file, key_file, sha256 thumbprint of the server cert)."""
    import hashlib
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmrep journal service CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=825))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    thumb = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ca_file, cert_file, key_file, thumb
