"""The journal service (`vmrep journal serve`), a real server process over HTTPS on the
lab's certificate: replication through it ends with data exact; the protected site's
writer credential is refused everything destructive (403, one line, logged), and
afterwards verify passes and every checkpoint rebuilds as before."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from vmrep.errors import JournalError, Refused
from vmrep.journal import Journal
from vmrep.journal.remote import RemoteJournal, encode_batch
from vmrep.config import JournalServiceClient
from vmrep.replication import engine
from vmrep.runtime import forget_runtime, get_runtime
from vmrep.vsphere.datastore import LocalDatastore

VMREP = str(Path(sys.executable).with_name("vmrep"))
SEED_PATH = "[LocalDS_0] seed/erp-web-flat.vmdk"


class Service:
    def __init__(self, lab: Any, tmp: Path) -> None:
        self.lab = lab
        data = yaml.safe_load(lab.config_path.read_text())
        # The recovery site's config (the lab's has journal.service), with a VPG of
        # another protected site, which siteA's writer must not reach.
        server = yaml.safe_load(lab.config_path.read_text())
        server["vpgs"].append({"name": "other-site", "protected_site": "siteB", "recovery_site": "siteA",
                               "recovery": {"host": "DC0_H0", "datastore": "LocalDS_1"},
                               "vms": [{"name": "elsewhere-01"}]})
        # A VPG pre-seeded from a copy of erp-web's disk at the recovery site (made by the test).
        seeded = {"name": "seeded", "protected_site": "siteA", "recovery_site": "siteB",
                  "recovery": {"host": "DC0_H0", "datastore": "LocalDS_0"},
                  "vms": [{"name": "erp-web", "preseed": {"scsi0:0": SEED_PATH}}]}
        server["vpgs"].append(seeded)
        data["vpgs"].append(seeded)
        # A second writer of siteA: it may not use a checkpoint the first one opened.
        other_token = tmp / "other-writer.token"
        other_token.write_text("other-writer-token-" + "x" * 24)
        server["journal"]["service"]["credentials"].append(
            {"name": "siteA-writer-2", "role": "writer", "site": "siteA", "token": f"file:{other_token}"})
        self.other_token = other_token.read_text()
        self.server_config = tmp / "siteB.yaml"
        self.server_config.write_text(yaml.safe_dump(server, sort_keys=False))
        sd = lab.lab.dir / "journal-service"
        client = yaml.safe_load((sd / "client.yaml").read_text())["journal_service"]
        data["sites"]["siteB"]["journal_service"] = client
        self.client_config = tmp / "siteA.yaml"  # the protected site's workers'
        self.client_config.write_text(yaml.safe_dump(data, sort_keys=False))
        self.url = client["url"]
        self.ca = client["tls"]["ca_file"]
        self.writer_token = (sd / "siteA-writer.token").read_text().strip()
        self.admin_token = (sd / "siteB-admin.token").read_text().strip()
        self.thumbprint = (sd / "thumbprint").read_text().strip()
        self.log = tmp / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([VMREP, "journal", "serve", "--config", str(self.server_config)],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(self.url + "/v1/whoami", verify=self.ca, timeout=2,
                             headers={"Authorization": f"Bearer {self.admin_token}"}).raise_for_status()
                return
            except requests.RequestException:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"journal service did not start:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def call(self, method: str, path: str, token: str, **kw: Any) -> requests.Response:
        return requests.request(method, self.url + path, verify=self.ca, timeout=30,
                                headers={"Authorization": f"Bearer {token}"}, **kw)


@pytest.fixture(scope="module")
def service(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(lab, tmp_path_factory.mktemp("jservice"))
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        forget_runtime(svc.client_config)


def flat_files(rt: Any, vpg: str) -> dict[tuple[str, str], Path]:
    v = rt.config.vpg(vpg)
    local = LocalDatastore(rt.config.site(v.protected_site).datastore_mounts)
    return {(name, d.id): local.local(d.flat) for name, vm in engine.vpg_vms(rt, v).items() for d in vm.disks}


def test_replication_through_the_service_is_exact(lab: Any, service: Service, tmp_path: Path) -> None:
    rt = get_runtime(service.client_config)
    assert engine.is_remote(rt, "erp") and not engine.is_remote(rt, "files")
    files = flat_files(rt, "erp")
    first = engine.initial_sync(rt, rt.config.vpg("erp"))
    saved = {first.checkpoint_id: {k: p.read_bytes() for k, p in files.items()}}
    remote = engine.journal_for(rt, "erp")
    sent0 = remote.bytes_sent
    rng = random.Random(12)
    keys = sorted(files)
    for _ in range(2):
        for vm, disk in keys[:2]:
            size = files[(vm, disk)].stat().st_size
            lab.guest_write(vm, disk, rng.randrange(size - 65536), rng.randbytes(65536))
        r = engine.run_cycle(rt, rt.config.vpg("erp"))
        saved[r.checkpoint_id] = {k: p.read_bytes() for k, p in files.items()}
    # Two 64 KiB writes per cycle: about two 1 MiB blocks per cycle crossed, not the disks.
    assert 0 < remote.bytes_sent - sent0 < 2 * 4 * (1 << 20) + (1 << 20)
    # The protected site never opened the journal directory.
    assert rt._journal is None  # noqa: SLF001
    with Journal.open(lab.config.journal_path, create=False, recover=False) as j:
        cps = [c.id for c in j.checkpoints("erp")]
        assert set(saved) <= set(cps)
        for cp, disks in saved.items():
            for (vm, disk), data in disks.items():
                j.restore_disk("erp", cp, vm, disk, tmp_path / "x.img")
                assert (tmp_path / "x.img").read_bytes() == data, (cp, vm, disk)
        assert j.checkpoints("erp")[-1].meta.get("bytes_sent", 0) > 0


def _rebuilt(journal_path: Path, tmp: Path) -> dict[tuple[str, str, str], bytes]:
    out = {}
    with Journal.open(journal_path, create=False, recover=False) as j:
        for cp in j.checkpoints("erp"):
            for (vm, disk) in j.disks("erp", cp.id):
                j.restore_disk("erp", cp.id, vm, disk, tmp / "r.img")
                out[(cp.id, vm, disk)] = (tmp / "r.img").read_bytes()
    return out


def test_writer_credential_is_append_only(lab: Any, service: Service, tmp_path: Path) -> None:
    rt = get_runtime(service.client_config)
    if not rt.store.runtime("erp").initial_sync_done:
        engine.initial_sync(rt, rt.config.vpg("erp"))
    before = _rebuilt(lab.config.journal_path, tmp_path)
    cps = [k[0] for k in before]
    packs = sorted((lab.config.journal_path / "packs").iterdir())
    w = service.writer_token
    destructive = [
        ("DELETE", f"/v1/packs/{packs[0].stem}", {}),
        ("DELETE", f"/v1/vpgs/erp/checkpoints/{cps[0]}", {}),
        ("PUT", f"/v1/vpgs/erp/checkpoints/{cps[0]}", {"json": {"tags": []}}),
        ("POST", "/v1/vpgs/erp/retention", {"json": {"keep_since": "2100-01-01T00:00:00+00:00"}}),
        ("POST", "/v1/gc", {}),
        ("POST", "/v1/vpgs/erp/verify", {}),
        ("DELETE", "/v1/vpgs/erp", {}),
        # another site's VPG: read, open a checkpoint of, ask for its blocks
        ("GET", "/v1/vpgs/other-site/checkpoints", {}),
        ("POST", "/v1/vpgs/other-site/writers", {}),
        ("POST", "/v1/vpgs/other-site/missing", {"json": {"ids": []}}),
        ("GET", "/v1/vpgs/nosuch/checkpoints", {}),
    ]
    for method, path, kw in destructive:
        r = service.call(method, path, w, **kw)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        msg = r.json()["error"]
        assert "siteA-writer" in msg and "\n" not in msg, msg
    assert "protected at site siteB" in service.call("GET", "/v1/vpgs/other-site/checkpoints", w).json()["error"]
    # Unknown credential and no credential: 403 as well.
    assert service.call("GET", "/v1/vpgs/erp/checkpoints", "wrong").status_code == 403
    assert requests.get(service.url + "/v1/whoami", verify=service.ca, timeout=10).status_code == 403
    # A block whose content does not match its id is refused whole (400), nothing stored.
    sid = service.call("POST", "/v1/vpgs/erp/writers", w).json()["session"]
    body = encode_batch([["size", "erp-db", "scsi0:0", 1 << 20]],
                        [({"vm": "erp-db", "disk": "scsi0:0", "index": 0, "id": "ab" * 32, "codec": 0,
                           "rlen": 4096, "len": 4096}, os.urandom(4096))])
    r = service.call("POST", f"/v1/writers/{sid}/batch", w, data=body)
    assert r.status_code == 400 and "does not match its blake3 id" in r.json()["error"]
    for action in ("batch", "commit", "abort"):
        r = service.call("POST", f"/v1/writers/{sid}/{action}", service.other_token, json={})
        assert r.status_code == 403 and "another credential opened it" in r.json()["error"], r.text
    assert service.call("POST", f"/v1/writers/{sid}/abort", w).status_code == 200
    # Refusals are logged by the service.
    assert "refused DELETE /v1/packs/" in service.log.read_text()
    # Afterwards: verify passes (at the recovery site, on the journal directory) and every
    # checkpoint rebuilds as before.
    v = subprocess.run([VMREP, "verify", "erp", "--config", str(service.server_config)],
                       capture_output=True, text=True, timeout=300)
    assert v.returncode == 0, v.stdout + v.stderr
    assert _rebuilt(lab.config.journal_path, tmp_path) == before
    # The admin credential may run what the writer may not.
    r = service.call("POST", "/v1/vpgs/erp/verify", service.admin_token)
    assert r.status_code == 200 and r.json()["mismatches"] == []


def test_client_tls_pin_and_refusal_messages(service: Service) -> None:
    good = JournalServiceClient.model_validate(
        {"url": service.url, "credential": {"env": "VMREP_T_JS"}, "tls": {"thumbprint": service.thumbprint}})
    os.environ["VMREP_T_JS"] = service.writer_token
    try:
        rj = RemoteJournal(good)
        assert rj.block_size == 1 << 20
        with pytest.raises(Refused, match="siteA-writer"):
            rj.request("POST", "/gc")
        bad = JournalServiceClient.model_validate(
            {"url": service.url, "credential": {"env": "VMREP_T_JS"}, "tls": {"thumbprint": "00" * 32}})
        with pytest.raises(JournalError, match="TLS verification failed"):
            RemoteJournal(bad).checkpoints("erp")
        none = JournalServiceClient.model_validate({"url": service.url, "credential": {"env": "VMREP_T_JS"}})
        with pytest.raises(JournalError, match="TLS verification failed"):
            RemoteJournal(none).checkpoints("erp")
    finally:
        del os.environ["VMREP_T_JS"]


KiB, MiB = 1024, 1024 * 1024


def _wan_cycle(lab: Any, rt: Any, kind: str, seed: int, writes: int = 8) -> dict[str, Any]:
    """`writes` 64 KiB guest writes of `kind` into blocks of erp-db's first disk that hold
    data (not zero), one cycle; returns the checkpoint's meta."""
    from lab.guest import ContentSource

    j = engine.journal_for(rt, "erp")
    last = j.checkpoints("erp")[-1].id
    m = j.block_map("erp", last, "erp-db", "scsi0:0")
    full = [i for i in range(len(m)) if m.get(i) is not None]
    assert len(full) >= writes, "the lab disk has too few non-zero blocks"
    rng = random.Random(seed)
    src = ContentSource(kind, rng)
    for i in rng.sample(full, writes):
        lab.guest_write("erp-db", "scsi0:0", i * MiB + rng.randrange(0, MiB - 64 * KiB, 4 * KiB), src.take(64 * KiB))
    r = engine.run_cycle(rt, rt.config.vpg("erp"))
    return j.checkpoint("erp", r.checkpoint_id).meta


@pytest.mark.parametrize("kind,limit", [("text", 0.6), ("random", 1.05)])
def test_wan_bytes_sent_per_cycle(lab: Any, service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  kind: str, limit: float) -> None:
    """§3: with 1 MiB journal blocks, 64 KiB guest writes cross the WAN as their CBT
    extents (compressed), not as the blocks holding them: bytes sent ≤ 0.6 × bytes
    changed on text, ≤ 1.05 × on random data. Whole blocks (the grain switched off) do
    not meet it; the journal still rebuilds exactly."""
    import vmrep.journal.remote as remote

    rt = get_runtime(service.client_config)
    if not rt.store.runtime("erp").initial_sync_done:
        engine.initial_sync(rt, rt.config.vpg("erp"))
        rt.store.update_runtime("erp", initial_sync_done=True)
    engine.run_cycle(rt, rt.config.vpg("erp"))  # nothing left over from another test
    meta = _wan_cycle(lab, rt, kind, seed=21)
    ratio = meta["bytes_sent"] / meta["bytes_changed"]
    print(f"\nWAN {kind}: changed {meta['bytes_changed']} sent {meta['bytes_sent']} ratio {ratio:.3f}")
    assert meta["bytes_changed"] == 8 * 64 * KiB
    assert ratio <= limit
    monkeypatch.setattr(remote, "DELTA_MAX_SHARE", 0.0)  # whole blocks, compressed
    whole = _wan_cycle(lab, rt, kind, seed=22)
    wratio = whole["bytes_sent"] / whole["bytes_changed"]
    print(f"WAN {kind} whole blocks: changed {whole['bytes_changed']} sent {whole['bytes_sent']} ratio {wratio:.3f}")
    assert wratio > limit
    files = flat_files(rt, "erp")
    with Journal.open(lab.config.journal_path, create=False, recover=False) as jl:
        cp = jl.checkpoints("erp")[-1].id
        for (vm, disk), p in files.items():
            jl.restore_disk("erp", cp, vm, disk, tmp_path / "w.img")
            assert (tmp_path / "w.img").read_bytes() == p.read_bytes(), (vm, disk)


class CountingAdapter(requests.adapters.HTTPAdapter):
    """Counts the requests that reach the wire, by route (the session's own adapter, so
    the real service answers each one)."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, int] = {}
        self.batch_bytes: list[int] = []

    def send(self, request: Any, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        path = str(request.path_url).split("?")[0]
        route = "batch" if path.endswith("/batch") else "missing" if path.endswith("/missing") else path
        self.routes[route] = self.routes.get(route, 0) + 1
        if route == "batch":
            self.batch_bytes.append(len(request.body or b""))
        return super().send(request, *args, **kw)


def test_a_cycle_sends_its_changed_blocks_in_batches(lab: Any, service: Service, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Round trips per cycle, counted on the wire: 12 changed blocks (64 KiB writes, sent as
    extents) cost one `missing` and one batch, not two requests per block; whole blocks
    over the batch bound go in bounded batches; the journal rebuilds exactly."""
    import vmrep.journal.remote as remote

    rt = get_runtime(service.client_config)
    if not rt.store.runtime("erp").initial_sync_done:
        engine.initial_sync(rt, rt.config.vpg("erp"))
        rt.store.update_runtime("erp", initial_sync_done=True)
    engine.run_cycle(rt, rt.config.vpg("erp"))  # nothing left over from another test
    rj = engine.journal_for(rt, "erp")
    count = CountingAdapter()
    rj._http.mount("https://", count)  # noqa: SLF001 - the test watches the wire
    try:
        meta = _wan_cycle(lab, rt, "text", seed=51, writes=12)
        print(f"\nround trips, 12 blocks as extents: {count.routes}")
        assert [(d["vm"], d["disk"]) for d in meta["disks"] if d["bytes_changed"]] == [("erp-db", "scsi0:0")]
        # one batch of the blocks, one at the commit with the other disks' sizes (as before)
        assert count.routes["missing"] == 1 and count.routes["batch"] == 2
        assert meta["bytes_sent"] <= 0.6 * meta["bytes_changed"]
        # Whole blocks (the extents switched off) with a batch bound of 4 MiB: 12 random
        # blocks go in 3 or 4 batches, none much over the bound, each after one `missing`.
        count.routes.clear()
        count.batch_bytes.clear()
        monkeypatch.setattr(remote, "DELTA_MAX_SHARE", 0.0)
        monkeypatch.setattr(remote, "BATCH_RAW_BYTES", 4 * MiB)
        m = rj.block_map("erp", rj.checkpoints("erp")[-1].id, "erp-db", "scsi0:0")
        for i in [i for i in range(len(m)) if m.get(i) is not None][:12]:
            lab.guest_write("erp-db", "scsi0:0", i * MiB, random.randbytes(4 * KiB))
        r = engine.run_cycle(rt, rt.config.vpg("erp"))
        print(f"round trips, 12 whole blocks: {count.routes}, batch bodies {count.batch_bytes}")
        assert 3 <= count.routes["missing"] <= 4 and count.routes["batch"] == count.routes["missing"] + 1
        assert max(count.batch_bytes) <= 4 * MiB + 2 * (MiB + 4 * KiB)  # two transfer threads may add one each
    finally:
        rj._http.mount("https://", requests.adapters.HTTPAdapter())  # noqa: SLF001
    files = flat_files(rt, "erp")
    with Journal.open(lab.config.journal_path, create=False, recover=False) as jl:
        for (vm, disk), p in files.items():
            jl.restore_disk("erp", r.checkpoint_id, vm, disk, tmp_path / "b.img")
            assert (tmp_path / "b.img").read_bytes() == p.read_bytes(), (vm, disk)


def test_extents_that_do_not_rebuild_the_block_fall_back_to_the_whole_block(lab: Any, service: Service) -> None:
    """CBT missed a change: the block rebuilt from the previous block and the extents sent
    does not match its id; the service refuses it (422, nothing stored) and the writer
    sends the whole block instead."""
    import blake3

    rt = get_runtime(service.client_config)
    if not rt.store.runtime("erp").initial_sync_done:
        engine.initial_sync(rt, rt.config.vpg("erp"))
        rt.store.update_runtime("erp", initial_sync_done=True)
    rj = engine.journal_for(rt, "erp")
    last = rj.checkpoints("erp")[-1].id
    m = rj.block_map("erp", last, "erp-db", "scsi0:0")
    i = next(k for k in range(len(m)) if m.get(k) is not None)
    with Journal.open(lab.config.journal_path, create=False, recover=False) as jl:
        old = jl.read_block(m.get(i))
    new = bytearray(old)
    new[0:4096] = os.urandom(4096)  # the change CBT reported
    new[8192:8200] = b"missed!!"  # and one it did not
    w = rj.begin("erp")
    try:
        w.hint_extents("erp-db", "scsi0:0", [(i * MiB, 4096)], m)
        w.put_block("erp-db", "scsi0:0", i, bytes(new))
        w.flush()
        assert w.delta_fallbacks == 1 and w.deltas == 0
        sent, _ = w.stored_for("erp-db", "scsi0:0")
        assert sent > 64 * KiB  # the whole (random, incompressible) block went
        # An honest extent goes as the extent.
        new2 = bytearray(old)
        new2[0:4096] = os.urandom(4096)
        w.put_block("erp-db", "scsi0:0", i, bytes(new2))
        w.flush()
        assert w.stored_for("erp-db", "scsi0:0")[0] - sent < 8 * KiB
        assert w.deltas == 1
        # In one batch, an honest block and a dishonest one: only the dishonest one is
        # resent whole (the 422 names it), the other still crosses as its extent.
        j2 = next(k for k in range(i + 1, len(m)) if m.get(k) is not None)
        with Journal.open(lab.config.journal_path, create=False, recover=False) as jl:
            old2 = jl.read_block(m.get(j2))
        honest, dishonest = bytearray(old), bytearray(old2)
        honest[0:4096] = os.urandom(4096)
        dishonest[0:4096] = os.urandom(4096)
        dishonest[9000:9008] = b"missed!!"
        w.hint_extents("erp-db", "scsi0:0", [(i * MiB, 4096), (j2 * MiB, 4096)], m)
        before = w.stored_for("erp-db", "scsi0:0")[0]
        batches = w.batches
        w.put_block("erp-db", "scsi0:0", i, bytes(honest))
        w.put_block("erp-db", "scsi0:0", j2, bytes(dishonest))
        # and a copy of the honest block at a third index: the batch gives it once, then refers to it
        w.put_block("erp-db", "scsi0:1", 0, bytes(honest))
        w.flush()
        assert (w.delta_fallbacks, w.deltas, w.batches - batches) == (2, 2, 1)
        assert 64 * KiB < w.stored_for("erp-db", "scsi0:0")[0] - before < MiB + 16 * KiB
        assert w.stored_for("erp-db", "scsi0:1") == (0, 1)  # its reference only
    finally:
        w.abort()
    # The service's own check, straight: a wrong rebuild is a 422 naming the block.
    sid = service.call("POST", "/v1/vpgs/erp/writers", service.writer_token).json()["session"]
    try:
        body = encode_batch([], [({"vm": "erp-db", "disk": "scsi0:0", "index": i,
                                   "id": blake3.blake3(bytes(new)).hexdigest(), "codec": -2, "rlen": len(new),
                                   "len": 4096, "base": m.get(i).hex(), "extents": [[0, 4096]], "ecodec": 0,
                                   "elen": 4096}, bytes(new[0:4096]))])
        r = service.call("POST", f"/v1/writers/{sid}/batch", service.writer_token, data=body)
        assert r.status_code == 422 and f"block {i} of erp-db/scsi0:0" in r.json()["error"]
    finally:
        service.call("POST", f"/v1/writers/{sid}/abort", service.writer_token)


def test_preseeded_sync_sends_only_the_differing_blocks(lab: Any, service: Service) -> None:
    """The pre-seed copy is hashed at the recovery site by the service, the source at the
    protected site; only the blocks that differ cross, and the checkpoint is the source."""
    import shutil

    from vmrep.journal.codec import encode_blob

    rt = get_runtime(service.client_config)
    src = flat_files(rt, "seeded")[("erp-web", "scsi0:0")]
    mounts = rt.config.site("siteB").datastore_mounts
    copy = Path(mounts["LocalDS_0"]) / "seed" / "erp-web-flat.vmdk"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, copy)
    rng = random.Random(31)
    size = src.stat().st_size
    for blk in rng.sample(range(size // MiB), 3):
        lab.guest_write("erp-web", "scsi0:0", blk * MiB + 8 * KiB, rng.randbytes(16 * KiB))
    a, b = src.read_bytes(), copy.read_bytes()
    differing = [i for i in range(-(-size // MiB)) if a[i * MiB:(i + 1) * MiB] != b[i * MiB:(i + 1) * MiB]]
    assert len(differing) == 3
    r = engine.initial_sync(rt, rt.config.vpg("seeded"))
    st = r.vms["erp-web"].disks["scsi0:0"]
    assert st.blocks_changed == len(differing)
    payload = sum(len(encode_blob(a[i * MiB:(i + 1) * MiB], 1)[0]) for i in differing)
    print(f"\npre-seed: {len(differing)} differing blocks, payload {payload}, sent {st.bytes_sent}, "
          f"disk {size}")
    # What crossed is those blocks' (compressed) content and a header each, nothing else.
    assert st.bytes_sent is not None and payload <= st.bytes_sent <= payload + len(differing) * 1024 + 1024
    with Journal.open(lab.config.journal_path, create=False, recover=False) as jl:
        out = Path(str(copy) + ".restored")
        jl.restore_disk("seeded", r.checkpoint_id, "erp-web", "scsi0:0", out)
        assert out.read_bytes() == a
    # A writer may not have the service read any other file of the recovery site.
    sid = service.call("POST", "/v1/vpgs/seeded/writers", service.writer_token).json()["session"]
    try:
        rr = service.call("POST", f"/v1/writers/{sid}/preseed", service.writer_token,
                          json={"vm": "erp-web", "disk": "scsi0:0", "path": "[LocalDS_0] other-flat.vmdk",
                                "size": size})
        assert rr.status_code == 403 and "not the pre-seed" in rr.json()["error"]
    finally:
        service.call("POST", f"/v1/writers/{sid}/abort", service.writer_token)


def test_wan_compression_off_sends_uncompressed_through_the_service(lab: Any, service: Service) -> None:
    """Through the service `wan_compression` acts: off, text extents cross raw (about 1x
    the bytes changed instead of 0.3x), and `vmrep validate` no longer calls it inert."""
    from vmrep.config import load_config
    from vmrep.validate import setting_warnings

    rt = get_runtime(service.client_config)
    if not rt.store.runtime("erp").initial_sync_done:
        engine.initial_sync(rt, rt.config.vpg("erp"))
        rt.store.update_runtime("erp", initial_sync_done=True)
    engine.run_cycle(rt, rt.config.vpg("erp"))
    v = rt.config.vpg("erp")
    v.wan_compression = False
    try:
        meta = _wan_cycle(lab, rt, "text", seed=41)
    finally:
        v.wan_compression = True
    ratio = meta["bytes_sent"] / meta["bytes_changed"]
    assert 1.0 <= ratio <= 1.05, ratio
    cfg = load_config(service.client_config)
    cfg.vpg("erp").wan_compression = False
    cfg.vpg("files").wan_compression = False  # both sites the same: no WAN link, still inert
    assert [(p.vpg, p.subject) for p in setting_warnings(cfg)] == [("files", "wan_compression")]


def test_reverse_protection_through_a_service_sends_only_the_differing_blocks(fresh_lab: Any) -> None:
    """After a failover to siteB and its commit with reverse protection, the reverse VPG
    (siteB -> siteA) syncs through siteA's journal service: the original disks at siteA
    are hashed there, the recovered ones at siteB here, and only the blocks that differ
    (those the recovered VMs wrote) cross. Counted block by block from the files."""
    import socket

    from vmrep.journal.codec import encode_blob
    from vmrep.recovery import operations as ops

    lab = fresh_lab
    d = lab.lab.dir
    sd = d / "journal-service"
    data = yaml.safe_load(lab.config_path.read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tok = sd / "siteB-writer.token"
    tok.write_text("siteB-writer-" + "y" * 32)
    # siteA's service (the reverse VPG's recovery site), on the lab's one journal directory,
    # beside the lab's config so that the generated reverse VPG (vmrep.d/) is part of it
    server = yaml.safe_load(lab.config_path.read_text())
    server["journal"]["service"]["listen"] = f"127.0.0.1:{port}"
    server["journal"]["service"]["credentials"].append(
        {"name": "siteB-writer", "role": "writer", "site": "siteB", "token": f"file:{tok}"})
    server_cfg = lab.config_path.with_name("siteA-service.yaml")
    server_cfg.write_text(yaml.safe_dump(server, sort_keys=False))
    data["sites"]["siteA"]["journal_service"] = {"url": f"https://127.0.0.1:{port}", "credential": f"file:{tok}",
                                                 "tls": {"ca_file": str(sd / "ca.pem")}}
    client_cfg = lab.config_path.with_name("siteB-workers.yaml")
    client_cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    log = d / "siteA-service.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([VMREP, "journal", "serve", "--config", str(server_cfg)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"https://127.0.0.1:{port}/v1/whoami", verify=str(sd / "ca.pem"), timeout=2,
                             headers={"Authorization": f"Bearer {tok.read_text()}"}).raise_for_status()
                break
            except requests.RequestException:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        rt = get_runtime(client_cfg)
        cfg = str(client_cfg)
        assert not engine.is_remote(rt, "erp")  # forward: siteB has no service here
        engine.initial_sync(rt, rt.config.vpg("erp"))
        rt.store.update_runtime("erp", initial_sync_done=True)
        lab.control("siteB").boot_delay(100)
        ops.run_failover(cfg, "erp", confirm="erp", checkpoint="latest-tagged", shutdown="none",
                         commit_policy="none", verify_timeout=20, notify=lambda _: None)
        # the recovered VMs write at siteB before the commit: what the reverse sync must send
        rng = random.Random(5)
        lab.guest_write("erp-db", "scsi0:0", 2 * MiB + 4 * KiB, rng.randbytes(64 * KiB), site="siteB")
        lab.guest_write("erp-web", "scsi0:0", 5 * MiB, rng.randbytes(8 * KiB), site="siteB")
        c = ops.commit(cfg, "erp", reverse_protection=True, who="gina")
        assert c["result"] == "succeeded", c
        forget_runtime(client_cfg)
        rt = get_runtime(client_cfg)
        rv = rt.config.vpg("erp-reverse")
        assert engine.is_remote(rt, "erp-reverse")
        seeds = {(vm.name, disk): path for vm in rv.vms for disk, path in vm.preseed.items()}
        assert seeds, "the reverse VPG has no pre-seed"
        recovered = flat_files(rt, "erp-reverse")  # the recovered disks at siteB
        originals = LocalDatastore(rt.config.site("siteA").datastore_mounts)
        differing, payload = 0, 0
        for key, p in recovered.items():
            a = p.read_bytes()
            b = originals.local(seeds[key]).read_bytes() if key in seeds else b""
            for i in range(-(-len(a) // MiB)):
                blk = a[i * MiB:(i + 1) * MiB]
                if blk != b[i * MiB:(i + 1) * MiB]:
                    differing += 1
                    if blk.strip(b"\0"):
                        payload += len(encode_blob(blk, 1)[0])
        with Journal.open(lab.config.journal_path, create=False, recover=False) as jl:
            cp = jl.checkpoints("erp-reverse")[-1]
            sent = cp.meta["bytes_sent"]
            print(f"\nreverse: {differing} differing blocks, payload {payload}, sent {sent}")
            assert differing == 2
            assert payload <= sent <= payload + differing * 1024 + 4096
            for key, p in recovered.items():
                jl.restore_disk("erp-reverse", cp.id, key[0], key[1], d / "rev.img")
                assert (d / "rev.img").read_bytes() == p.read_bytes(), key
        (d / "rev.img").unlink()
    finally:
        forget_runtime(client_cfg)
        proc.terminate()
        proc.wait(timeout=20)
