"""Reverse protection: after a committed failover or move, the recovered VMs are
protected back to the original site, and failback is a move of that reverse VPG.

The reverse VPG of `X` is named `X-reverse` and is written by vmrep as
`<config dir>/vmrep.d/vpgs/X-reverse.yaml` (``{reverse_of, created_at, operation, vpg:
{…}}``); `load_config` adds such files to the VPGs of the config (a VPG of the same
name in the config file wins). The reverse VPG of a generated reverse VPG is the VPG it
was generated from: failing back `X-reverse` with reverse protection protects `X` again.

The reverse VPG's recovery placement is where the original VMs were (host, datastore,
folder, networks, read before the failover), its test network that of the original VPG,
and each disk's pre-seed the original VM's flat file, which stays on its datastore
(reverse protection unregisters the original VMs, it does not delete them): the initial
sync of the reverse VPG stores those blocks first and then sends only the differences.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from vmrep.config import VPG, Config
from vmrep.errors import VmrepError
from vmrep.recovery import naming
from vmrep.recovery.plan import Plan, networks_for, state_dir

log = logging.getLogger(__name__)


def generated_path(config: Config, name: str) -> Path:
    return state_dir(config) / "vpgs" / f"{naming.safe(name)}.yaml"


def generated_meta(config: Config, name: str) -> dict[str, Any] | None:
    p = generated_path(config, name)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) else None


def reverse_target(config: Config, vpg: VPG) -> tuple[str, bool]:
    """(name of the VPG that protects `vpg`'s recovered VMs back, whether it must be generated)."""
    meta = generated_meta(config, vpg.name)
    if meta and meta.get("reverse_of"):
        origin = meta["reverse_of"]
        if any(v.name == origin for v in config.vpgs):
            return origin, False
    return naming.reverse_vpg_name(vpg.name), True


def reverse_definition(vpg: VPG, plan: Plan, name: str) -> dict[str, Any]:
    vms = []
    for v in plan.vms:
        spec = vpg.vm(v.source)
        si = v.source_info or {}
        src_nics = si.get("nics") or []
        tests = networks_for(vpg, v.source, naming.KIND_TEST, len(src_nics))
        nics = []
        for i in range(max(len(src_nics), 0)):
            nic: dict[str, Any] = {}
            if src_nics[i].get("network"):
                nic["live_network"] = src_nics[i]["network"]
            if i < len(tests) and tests[i][0] and tests[i][0] != nic.get("live_network"):
                nic["test_network"] = tests[i][0]
            nics.append(nic)
        entry: dict[str, Any] = {"name": v.source}
        if spec.boot_group:
            entry["boot_group"] = spec.boot_group
        for key, src in (("recovery_host", "host"), ("recovery_datastore", "datastore"),
                         ("recovery_folder", "folder")):
            if si.get(src):
                entry[key] = si[src]
        if nics:
            entry["nics"] = nics
        if si.get("disks"):
            entry["preseed"] = dict(si["disks"])
        vms.append(entry)
    d: dict[str, Any] = {
        "name": name,
        "protected_site": vpg.recovery_site,
        "recovery_site": vpg.protected_site,
        "vms": vms,
        "priority": vpg.priority.value,
        "rpo_target_seconds": vpg.rpo_target_seconds,
        "rto_target_seconds": vpg.rto_target_seconds,
        "journal_history_hours": vpg.journal_history_hours,
        "journal_hard_limit_gb": vpg.journal_hard_limit_gb,
        "journal_warning_percent": vpg.journal_warning_percent,
        "test_interval_months": vpg.test_interval_months,
        "wan_compression": vpg.wan_compression,
        "boot_groups": [g.model_dump() for g in vpg.boot_groups],
        "commit_policy": vpg.commit_policy.model_dump(),
        "shutdown_policy": vpg.shutdown_policy,
        "email_to": list(vpg.email_to),
    }
    if vpg.recovery.test_network:
        d["recovery"] = {"test_network": vpg.recovery.test_network}
    for key in ("pre_recovery_script", "post_recovery_script"):
        s = getattr(vpg, key)
        if s is not None:
            d[key] = s.model_dump()
    return d


def save_generated(config: Config, vpg_dict: dict[str, Any], *, reverse_of: str, operation_id: str) -> VPG:
    """Write the generated VPG beside the config and add it to this process's config."""
    model = VPG.model_validate(vpg_dict)
    for site in (model.protected_site, model.recovery_site):
        if site not in config.sites:
            raise VmrepError(f"reverse VPG {model.name}: site {site!r} is not in the config")
    p = generated_path(config, model.name)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"reverse_of": reverse_of, "created_at": datetime.now(timezone.utc).isoformat(),
           "operation": operation_id, "vpg": vpg_dict}
    tmp = p.with_suffix(".tmp")
    tmp.write_text("# Written by vmrep (reverse protection); see docs/recovery.md.\n"
                   + yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, p)
    config.vpgs = [v for v in config.vpgs if v.name != model.name] + [model]
    return model


def with_current_source_info(rt: Any, vpg: VPG, plan: Plan) -> Plan:
    """The plan, with each VM's `source_info` (placement, disks to pre-seed from) read from
    the protected site now where the recovery could not read it: a failover while the
    site was gone, with no hardware cached, planned from defaults. Called before the
    source VMs are removed, once the site is back (the commit refuses earlier otherwise)."""
    import copy

    from vmrep.recovery.plan import capture_hardware

    if all((m.source_info or {}).get("disks") for m in plan.vms):
        return plan
    hw = capture_hardware(rt, vpg)
    fresh = copy.deepcopy(plan)
    for m in fresh.vms:
        if not (m.source_info or {}).get("disks") and m.source in hw:
            h = hw[m.source]
            m.source_info = {k: h.get(k) for k in ("host", "folder", "datastore", "disks", "uuid", "nics")}
    return fresh


def failover_baselines(store: Any, vpg: str, operation_id: str, checkpoint_id: str) -> dict[str, dict[str, Any]]:
    """VM -> disk id -> baseline ({vpg, checkpoint, change_id, key}, or {fallback}) as
    the failover or move `operation_id` recorded them (its change-baseline steps)."""
    out: dict[str, dict[str, Any]] = {}
    for s in store.steps(operation_id):
        if s.step != "change-baseline" or s.result != "ok" or not s.vm:
            continue
        d = s.detail or {}
        if d.get("checkpoint") != checkpoint_id:
            continue
        disks = {k: {"vpg": vpg, "checkpoint": checkpoint_id, "vm": s.vm, **v}
                 for k, v in (d.get("disks") or {}).items()}
        if d.get("fallback"):
            disks["*"] = {"fallback": d["fallback"]}
        out[s.vm] = disks
    return out


class _SeedRecorder:
    """A checkpoint writer as `sync_disk` sees it, noting the id of each block put: the
    pre-seed's block map, made in the one pass that stores the pre-seed's blocks."""

    def __init__(self, writer: Any, size: int) -> None:
        import numpy as np

        self.writer = writer
        self.block_size = writer.block_size
        self.ids = np.zeros((-(-size // self.block_size), 32), dtype=np.uint8)
        self.size = size

    def set_disk_size(self, vm: str, disk: str, size: int) -> None:
        self.writer.set_disk_size(vm, disk, size)

    def put_zero(self, vm: str, disk: str, index: int) -> bool:
        return bool(self.writer.put_zero(vm, disk, index))

    def put_hashed(self, vm: str, disk: str, index: int, bid: bytes, data: Any) -> int:
        import numpy as np

        self.ids[index] = np.frombuffer(bid, dtype=np.uint8)
        return int(self.writer.put_hashed(vm, disk, index, bid, data))

    def block_map(self) -> Any:
        from vmrep.journal import BlockMap

        return BlockMap(self.ids, self.block_size, self.size)


def sync_from_baseline(rt: Any, tv: VPG, info: Any, writer: Any, seeds: dict[str, Any],
                       baselines: dict[str, Any], *, threads: int = 2) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The reverse VPG's initial sync of one recovered VM: per disk the pre-seed's blocks
    stored (hashed where they lie), then only the blocks `changes.baseline_plan` cannot
    know read from the recovered disk, at a replication snapshot of the VM (consistent,
    and its change ids are the base of the reverse VPG's first cycle). Returns the
    VMTransfer (each disk's method and fallback) and per disk what the baseline spared."""
    from vmrep.replication import engine
    from vmrep.replication.blocks import sync_disk
    from vmrep.replication.changes import baseline_plan
    from vmrep.vsphere import cbt

    client = rt.client(tv.protected_site)
    out = engine.VMTransfer(info.name)
    notes: dict[str, dict[str, Any]] = {}
    engine.create_consistency_point(rt, tv, info)
    try:
        snap = engine.find_snapshot(rt, tv, info)
        ids = cbt.snapshot_change_ids(client, snap) if snap is not None else {}
        src_ds = rt.datastores(tv.protected_site)
        for disk in info.disks:
            writer.set_disk_size(info.name, disk.id, disk.capacity)
            seed = seeds.get(disk.id)
            seed_map = None
            if seed is not None:
                remote_seed = getattr(writer, "preseed", None)
                if remote_seed is not None:  # through the journal service: hashed next to it
                    seed_map = remote_seed(info.name, disk.id, seed.path, seed.size)
                else:
                    rec = _SeedRecorder(writer, disk.capacity)
                    sync_disk(rec, info.name, disk.id, seed, previous=None, threads=threads)  # type: ignore[arg-type]
                    seed_map = rec.block_map()
            base = baselines.get(disk.id) or baselines.get("*")
            plan, note = baseline_plan(rt, tv, info, disk, snap, ids.get(disk.key), base, seed_map)
            if plan.fallback is not None:
                log.warning("VPG %s: VM %s disk %s: reverse sync reads the whole disk: %s", tv.name, info.name,
                            disk.id, plan.fallback)
            st = sync_disk(writer, info.name, disk.id, engine.VMDiskSource(src_ds, disk), previous=plan.previous,
                           changed_ranges=plan.ranges, threads=threads)
            sent_for = getattr(writer, "sent_for", None)
            if sent_for is not None:
                st.bytes_sent = sent_for(info.name, disk.id)
            st.method, st.change_id, st.fallback = plan.method, plan.change_id, plan.fallback
            st.bytes_changed = min(st.blocks_changed * writer.block_size, disk.capacity)
            out.disks[disk.id] = st
            notes[disk.id] = note
    finally:
        engine.remove_consistency_points(rt, tv, {info.name: info})
    return out, notes


def reverse_sync_meta(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The reverse checkpoint's transfer record (docs/journal-format.md, "Checkpoint
    meta") from the reverse-sync steps' results, each disk with its baseline note."""
    from dataclasses import fields

    from vmrep.replication import engine
    from vmrep.replication.blocks import DiskSyncStats

    names = {f.name for f in fields(DiskSyncStats)}
    transfers: dict[str, Any] = {}
    notes: dict[tuple[str, str], Any] = {}
    for r in results:
        t = transfers.setdefault(r["vm"], engine.VMTransfer(r["vm"]))
        for d, st in (r.get("disks") or {}).items():
            t.disks[d] = DiskSyncStats(**{k: v for k, v in st.items() if k in names})
            if st.get("baseline"):
                notes[(r["vm"], d)] = st["baseline"]
    meta = engine.checkpoint_meta(transfers)
    for row in meta["disks"]:
        if (row["vm"], row["disk"]) in notes:
            row["baseline"] = notes[(row["vm"], row["disk"])]
    return meta
