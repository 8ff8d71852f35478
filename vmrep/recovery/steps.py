"""The steps of recovery operations: one retryable, idempotent unit each.

Every step takes plain values, ``(config path, VPG name, operation id, …)``, looks the
runtime up by config path, records itself in the state database (start, end, result,
error, detail; per VM where it is per VM) and finds what an earlier try of it created
instead of creating it twice. `tasks/recovery.py` wraps each in a Prefect task;
`sequence.DirectRunner` calls them without Prefect.

One module of ~510 lines because it is the step table (`STEPS`) and one short function
per key, named as its key; splitting it would put the table away from its steps.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any, Callable

from vmrep.errors import JournalLocked, NotFound, VmrepError
from vmrep.recovery import naming
from vmrep.recovery import vms as vmops
from vmrep.recovery.context import end_operation, operation_context
from vmrep.recovery.disks import compare_disk, write_disk
from vmrep.recovery.plan import Plan, build_plan
from vmrep.recovery.scripts import run_script
from vmrep.runtime import get_runtime
from vmrep.stamps import utcnow

log = logging.getLogger(__name__)


class VerificationFailed(VmrepError):
    """A recovered VM did not pass verification (not retried: it is a finding)."""

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or {}


def _rt(config: str, vpg: str) -> tuple[Any, Any]:
    rt = get_runtime(config)
    return rt, rt.config.vpg(vpg)


def get_plan(rt: Any, operation_id: str) -> Plan:
    """The plan recorded by the operation's 'plan' step (kept in its context)."""
    return operation_context(rt, operation_id).plan(rt.store)


def find_plan(rt: Any, operation_id: str) -> Plan | None:
    try:
        return get_plan(rt, operation_id)
    except VmrepError:
        return None


def catalog(rt: Any, site: str, operation_id: str) -> vmops.Catalog:
    return operation_context(rt, operation_id).catalog(rt, site)


def forget(rt: Any, operation_id: str) -> None:
    end_operation(rt, operation_id)


# --------------------------------------------------------------------------------------
# VPG-wide steps


def make_plan(config: str, vpg: str, op_id: str, operation: str, checkpoint_id: str) -> dict[str, Any]:
    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, None, "plan") as h:
        plan = build_plan(rt, v, operation=operation, operation_id=op_id, checkpoint_id=checkpoint_id)
        catalog(rt, plan.site, op_id).check(plan)
        h.detail.update(plan=plan.to_json(), checkpoint=plan.checkpoint_id, hardware_from=plan.hardware_from)
    operation_context(rt, op_id).set_plan(plan)
    return {"checkpoint": plan.checkpoint_id, "vms": [m.source for m in plan.vms], "folder": plan.folder}


def _candidate_datastores(v: Any) -> set[str]:
    out = {vm.recovery_datastore or v.recovery.datastore for vm in v.vms}
    return {d for d in out if d}


def _pending_live_ops(store: Any, vpg: str) -> set[str]:
    """Live recoveries of `vpg` that reached 'awaiting commit' and were not rolled back."""
    ops = store.operations(vpg)
    done = {(o.params or {}).get("live_operation") for o in ops
            if o.kind == "rollback" and o.result == "succeeded"}
    return {o.id for o in ops if o.kind in ("failover", "move") and o.result == "succeeded" and o.id not in done}


def cleanup_leftovers(config: str, vpg: str, op_id: str) -> dict[str, Any]:
    """Remove what earlier runs on this VPG left at the recovery site: test VMs and scratch
    copies, and VMs and disks of live recoveries that failed or crashed. Never touches a
    committed VM, a VM of a recovery awaiting commit, or this operation's own."""
    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, None, "cleanup-leftovers") as h:
        client = rt.client(v.recovery_site)
        names = {vm.name for vm in v.vms}
        pending = _pending_live_ops(rt.store, vpg)
        removed: list[str] = []
        for sv in vmops.site_vms(client):
            if sv.marked_vpg == vpg:
                op = sv.extra.get(naming.MARK_OPERATION)
                if sv.committed or op == op_id or op in pending:
                    continue
            elif sv.marked_vpg is None and naming.source_of_test_name(sv.name) in names:
                pass  # a test VM by its name (markers are written with CreateVM; belt and braces)
            else:
                continue
            vmops.destroy(client, sv)
            removed.append(sv.name)
        dc = vmops.datacenter_ref(client)
        folders: list[str] = []
        stores = _candidate_datastores(v)
        paths = {f"[{ds}] {naming.scratch_folder(vpg)}" for ds in stores}
        horizon = utcnow() - timedelta(days=7)
        failed = [o for o in rt.store.operations(vpg)
                  if o.kind in ("failover", "move") and o.id != op_id and o.id not in pending
                  and o.result in ("failed", "cancelled") and o.started_at >= horizon][:5]
        for o in failed:
            p = find_plan(rt, o.id)
            for ds in (p.datastores if p else stores):
                paths.add(f"[{ds}] {naming.live_folder(vpg, o.id)}")
        for path in sorted(paths):
            if vmops.delete_folder(client, dc, path):
                folders.append(path)
        h.detail.update(removed_vms=removed, removed_folders=folders)
        if not removed and not folders:
            h.skip("nothing left over")
    return {"removed_vms": removed, "removed_folders": folders}


def run_recovery_script(config: str, vpg: str, op_id: str, phase: str) -> dict[str, Any]:
    rt, v = _rt(config, vpg)
    script = v.pre_recovery_script if phase == "pre" else v.post_recovery_script
    plan = get_plan(rt, op_id)
    with rt.store.step(op_id, None, f"{phase}-script") as h:
        if script is None:
            h.skip("no script configured")
            return {}
        cwd = str(rt.config.source.parent) if rt.config.source else None
        out = run_script(script, vpg=vpg, operation=plan.operation, operation_id=op_id,
                         checkpoint=plan.checkpoint_id, checkpoint_time=plan.checkpoint_time, phase=phase, cwd=cwd)
        h.detail.update(out)
        return out


def remove_disks(config: str, vpg: str, op_id: str, of_operation: str) -> dict[str, Any]:
    """Delete the scratch (test) or disk (live) folder of an operation on every datastore it used."""
    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, None, "remove-disks") as h:
        client = rt.client(v.recovery_site)
        plan = find_plan(rt, of_operation)
        if plan is not None:
            folder, stores = plan.folder, set(plan.datastores)
        else:
            op = rt.store.operation(of_operation)
            test = op is not None and op.kind == "test"
            folder = naming.scratch_folder(vpg) if test else naming.live_folder(vpg, of_operation)
            stores = _candidate_datastores(v)
        dc = vmops.datacenter_ref(client)
        removed = [p for p in sorted(f"[{ds}] {folder}" for ds in stores) if vmops.delete_folder(client, dc, p)]
        h.detail.update(removed=removed)
        if not removed:
            h.skip("nothing to remove")
        return {"removed": removed}


def final_checkpoint(config: str, vpg: str, op_id: str, tag: str) -> dict[str, Any]:
    """A last replication cycle after the source is shut down (move)."""
    from vmrep.replication import engine

    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, None, "final-checkpoint") as h:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = engine.run_cycle(rt, v, tag=tag)
                break
            except JournalLocked:
                # a replication cycle still writing: wait for it, it ends by itself
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        h.detail.update(checkpoint=r.checkpoint_id, blocks_changed=r.blocks_changed)
        return {"id": r.checkpoint_id, "time": r.time.isoformat()}


def set_replication_paused(config: str, vpg: str, op_id: str, paused: bool) -> dict[str, Any]:
    """Pause replication for a live recovery (the previous value is recorded for rollback)."""
    rt, _ = _rt(config, vpg)
    with rt.store.step(op_id, None, "pause-replication" if paused else "resume-replication") as h:
        was = bool(rt.store.runtime(vpg).paused)
        if paused:
            # a retry must not record its own first effect as the state before
            for s in rt.store.steps(op_id):
                if s.step == "pause-replication" and s.result == "ok" and s.detail and "was_paused" in s.detail:
                    was = bool(s.detail["was_paused"])
                    break
        rt.store.update_runtime(vpg, paused=paused)
        h.detail.update(was_paused=was)
        return {"was_paused": was}


# --------------------------------------------------------------------------------------
# Per-VM steps at the recovery site


def write_disks(config: str, vpg: str, op_id: str, vm: str, threads: int = 2) -> dict[str, Any]:
    rt, _ = _rt(config, vpg)
    plan = get_plan(rt, op_id)
    v = plan.vm(vm)
    with rt.store.step(op_id, vm, "write-disks") as h:
        ds = rt.datastores(plan.site)
        out = []
        for d in v.disks:
            adapter = "lsilogic"
            ctrl = v.controllers.get(str(d.bus), "")
            if "BusLogic" in ctrl:
                adapter = "buslogic"
            elif "Sas" in ctrl or "ParaVirtual" in ctrl:
                adapter = "lsilogic"
            r = write_disk(rt.journal, ds, vpg, plan.checkpoint_id, vm, d.id, d.descriptor, threads=threads,
                           adapter=adapter)
            out.append(r.as_dict())
        h.detail.update(disks=out, bytes_written=sum(x["bytes_written"] for x in out))
        if out and all(x["skipped"] for x in out):
            h.skip("written by an earlier try")
        return {"vm": vm, "disks": out}


def create_vm(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    rt, _ = _rt(config, vpg)
    plan = get_plan(rt, op_id)
    v = plan.vm(vm)
    with rt.store.step(op_id, vm, "create-vm") as h:
        client = rt.client(plan.site)
        ref, created = vmops.create_vm(client, plan, v, catalog(rt, plan.site, op_id))
        h.detail.update(name=v.name, moref=ref._moId, created=created)
        if not created:
            h.skip("created by an earlier try")
        return {"vm": vm, "name": v.name, "moref": ref._moId, "created": created}


def _the_vm(rt: Any, plan: Plan, vm: str) -> vmops.SiteVM:
    found = vmops.find_recovered(rt.client(plan.site), plan.vpg, operation_id=plan.operation_id, source=vm)
    if not found:
        raise NotFound(f"VPG {plan.vpg}: recovered VM {plan.vm(vm).name} not found at site {plan.site}")
    return found[0]


def customize_vm(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    rt, _ = _rt(config, vpg)
    plan = get_plan(rt, op_id)
    v = plan.vm(vm)
    with rt.store.step(op_id, vm, "customize") as h:
        if not v.customize:
            h.skip("no static IP configured: the guest keeps its own settings")
            return {"vm": vm, "customized": False}
        sv = _the_vm(rt, plan, vm)
        done = vmops.customize(rt.client(plan.site), v, sv.ref)
        h.detail.update(ips=v.expected_ips)
        if not done:
            h.skip("powered on already")
        return {"vm": vm, "customized": done, "ips": v.expected_ips}


def change_baseline(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    """Before the recovered VM first powers on (its disks hold the checkpoint exactly):
    change tracking on, and per disk the change id from which reverse protection later
    asks what the guest changed (docs/recovery.md, "Reverse protection reads less").
    Recorded in this step's detail: {checkpoint, disks: {disk id: {key, change_id}}},
    or why there is no baseline (the reverse sync then reads those disks in full)."""
    from vmrep.vsphere import cbt
    from vmrep.vsphere.inventory import parse_devices
    from vmrep.vsphere.property import retrieve_one

    rt, _ = _rt(config, vpg)
    plan = get_plan(rt, op_id)
    v = plan.vm(vm)
    with rt.store.step(op_id, vm, "change-baseline") as h:
        client = rt.client(plan.site)
        sv = _the_vm(rt, plan, vm)
        h.detail.update(checkpoint=plan.checkpoint_id)
        if vmops.power_state(client, sv.ref) == "poweredOn":
            # a retry after the power-on: the guest may have written already, no baseline
            h.skip("powered on already")
            return {"vm": vm, "disks": {}, "fallback": "the VM was powered on before its baseline"}
        ids, why = cbt.baseline_change_ids(client, sv.ref, v.name)
        devices = retrieve_one(client, sv.ref, ["config.hardware.device"]).get("config.hardware.device") or []
        disks = {d.id: {"key": d.key, "change_id": ids[d.key]} for d in parse_devices(devices)[0] if d.key in ids}
        h.detail.update(disks=disks, **({"fallback": why} if why else {}))
        return {"vm": vm, "disks": disks, "fallback": why}


def power_on(config: str, vpg: str, op_id: str, vm: str) -> dict[str, Any]:
    rt, _ = _rt(config, vpg)
    plan = get_plan(rt, op_id)
    v = plan.vm(vm)
    with rt.store.step(op_id, vm, "power-on") as h:
        sv = _the_vm(rt, plan, vm)
        done = vmops.power_on(rt.client(plan.site), v.name, sv.ref)
        h.detail.update(group=v.group)
        if not done:
            h.skip("powered on already")
        return {"vm": vm, "powered_on": done, "at": utcnow().isoformat()}


def verify_vm(config: str, vpg: str, op_id: str, vm: str, timeout: float = 600.0, threads: int = 2) -> dict[str, Any]:
    """Powered on, tools running, heartbeat green, the expected IP, every disk block equal
    to the checkpoint's (read back from the files the VM actually has attached)."""
    rt, _ = _rt(config, vpg)
    plan = get_plan(rt, op_id)
    v = plan.vm(vm)
    with rt.store.step(op_id, vm, "verify") as h:
        client = rt.client(plan.site)
        sv = _the_vm(rt, plan, vm)
        guest, problems = vmops.wait_guest(client, sv.ref, v.expected_ips, timeout)
        attached = _attached_disks(client, sv.ref)
        ds = rt.datastores(plan.site)
        disks = []
        for d in v.disks:
            path = attached.get((d.bus, d.unit))
            if path is None:
                problems.append(f"disk {d.id} not attached")
                continue
            flat = path[:-5] + "-flat.vmdk" if path.endswith(".vmdk") else path
            c = compare_disk(rt.journal, ds, vpg, plan.checkpoint_id, vm, d.id, flat, threads=threads)
            disks.append(c.as_dict())
            if not c.size_ok:
                problems.append(f"disk {d.id}: size differs from the checkpoint's")
            if c.mismatches:
                bs = rt.journal.block_size
                problems.append(f"disk {d.id}: {len(c.mismatches)} block(s) differ from checkpoint "
                                f"{plan.checkpoint_id} (first at offset {c.mismatches[0] * bs})")
        detail = {"guest": guest.as_dict(), "expected_ips": v.expected_ips, "disks": disks,
                  "problems": problems, "ok": not problems}
        h.detail.update(detail)
        if problems:
            raise VerificationFailed(f"VM {v.name}: {'; '.join(problems)}", detail=detail)
        return {"vm": vm, **detail}


def _attached_disks(client: Any, ref: Any) -> dict[tuple[int, int], str]:
    from pyVmomi import vim

    from vmrep.vsphere.property import retrieve_one

    devices = retrieve_one(client, ref, ["config.hardware.device"]).get("config.hardware.device") or []
    ctrls = {d.key: d.busNumber for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    out = {}
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualDisk):
            out[(ctrls.get(d.controllerKey, 0), d.unitNumber)] = getattr(d.backing, "fileName", "")
    return out


def remove_vm(config: str, vpg: str, op_id: str, vm: str, of_operation: str) -> dict[str, Any]:
    """Power off and destroy the VM(s) recovered for `vm` by operation `of_operation`."""
    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, vm, "remove-vm") as h:
        client = rt.client(v.recovery_site)
        found = [sv for sv in vmops.find_recovered(client, vpg, operation_id=of_operation, source=vm)
                 if not sv.committed]
        op = rt.store.operation(of_operation)
        if op is not None and op.kind == "test":
            name = naming.test_vm_name(vm)
            found += [sv for sv in vmops.site_vms(client) if sv.name == name and sv.marked_vpg is None]
        for sv in found:
            vmops.destroy(client, sv)
        h.detail.update(removed=[sv.name for sv in found])
        if not found:
            h.skip("not there")
        return {"vm": vm, "removed": len(found)}


def mark_committed(config: str, vpg: str, op_id: str, vm: str, of_operation: str) -> dict[str, Any]:
    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, vm, "mark-committed") as h:
        client = rt.client(v.recovery_site)
        found = vmops.find_recovered(client, vpg, operation_id=of_operation, source=vm)
        if not found:
            raise NotFound(f"VPG {vpg}: recovered VM {vm} of operation {of_operation[:8]} not found")
        todo = [sv for sv in found if not sv.committed]
        for sv in todo:
            vmops.mark(client, sv.name, sv.ref, {naming.MARK_STATE: naming.STATE_COMMITTED})
        if not todo:
            h.skip("committed already")
        return {"vm": vm, "marked": len(todo)}


# --------------------------------------------------------------------------------------
# Source VMs (protected site)


def _protected_client(rt: Any, v: Any) -> Any | None:
    from vmrep.errors import ConnectionFailed, TransientError

    try:
        c = rt.client(v.protected_site)
        c.call("session", lambda: c.content.sessionManager.currentSession, method_name="CurrentSession")
        return c
    except (ConnectionFailed, TransientError) as exc:
        log.warning("VPG %s: protected site %s unreachable: %s", v.name, v.protected_site, exc)
        return None


def shutdown_source(config: str, vpg: str, op_id: str, vm: str, policy: str, timeout: float = 300.0) -> dict[str, Any]:
    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, vm, "shutdown-source") as h:
        if policy == "none":
            h.skip("shutdown policy none")
            return {"vm": vm, "powered_off": False}
        client = _protected_client(rt, v)
        if client is None:
            h.skip(f"protected site {v.protected_site} unreachable")
            return {"vm": vm, "powered_off": False, "unreachable": True}
        sv = vmops.source_vm(client, vpg, vm)
        if sv is None:
            h.skip(f"VM not found at protected site {v.protected_site}")
            return {"vm": vm, "powered_off": False}
        # A retry after the power-off went through: the first try's record says what it did.
        for s in rt.store.steps(op_id):
            if s.step == "shutdown-source" and s.vm == vm and s.result == "ok" and (s.detail or {}).get("powered_off"):
                h.skip("shut down by an earlier try")
                return dict(s.detail)
        detail = vmops.shutdown(client, sv, policy, timeout)
        h.detail.update(detail)
        if not detail["powered_off"]:
            h.skip(f"was {detail['was']}")
        return {"vm": vm, **detail}


def power_on_source(config: str, vpg: str, op_id: str, vm: str, of_operation: str) -> dict[str, Any]:
    """Power a source VM back on if (and only if) operation `of_operation` powered it off."""
    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, vm, "power-on-source") as h:
        did = any(s.step == "shutdown-source" and s.vm == vm and s.result == "ok"
                  and (s.detail or {}).get("powered_off") for s in rt.store.steps(of_operation))
        if not did:
            h.skip("was not powered off by the recovery")
            return {"vm": vm, "powered_on": False}
        client = _protected_client(rt, v)
        if client is None:
            raise VmrepError(f"VPG {vpg}: protected site {v.protected_site} unreachable: "
                             f"VM {vm} cannot be powered back on")
        sv = vmops.source_vm(client, vpg, vm)
        if sv is None:
            raise NotFound(f"VPG {vpg}: VM {vm} not found at protected site {v.protected_site}")
        done = vmops.power_on(client, vm, sv.ref)
        if not done:
            h.skip("powered on already")
        return {"vm": vm, "powered_on": done}


def remove_source_vm(config: str, vpg: str, op_id: str, vm: str, of_operation: str) -> dict[str, Any]:
    """Unregister the source VM (its files stay: they pre-seed reverse protection)."""
    rt, v = _rt(config, vpg)
    with rt.store.step(op_id, vm, "remove-source-vm") as h:
        client = _protected_client(rt, v)
        if client is None:
            raise VmrepError(f"VPG {vpg}: protected site {v.protected_site} unreachable: "
                             f"source VM {vm} cannot be removed")
        plan = find_plan(rt, of_operation)
        uuid = (plan.vm(vm).source_info or {}).get("uuid") if plan else None
        sv = vmops.source_vm(client, vpg, vm, uuid)
        if sv is None:
            # "Removed already" must be proven, or a source VM stays registered beside its
            # committed twin: once (in a full test run, with the other VMs' unregisters
            # running in parallel) the session's cached container view missed a VM that
            # was still there. Ask again through a view of its own before skipping.
            sv = vmops.source_vm(client, vpg, vm, uuid, fresh_view=True)
        if sv is None:
            h.skip("not registered (removed already)")
            return {"vm": vm, "removed": False}
        vmops.unregister(client, sv)
        h.detail.update(uuid=sv.uuid)
        return {"vm": vm, "removed": True}


# --------------------------------------------------------------------------------------
# Reverse protection (steps on the reverse VPG)


def reverse_sync_vm(config: str, target: str, op_id: str, vm: str, preseed: dict[str, str],
                    baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Initial sync of one VM of the reverse VPG, pre-seeded from the original disks and
    reading only what the failover's change-tracking baseline (`baselines`: disk id ->
    {vpg, checkpoint, change_id, key}) cannot tell (`reverse.sync_from_baseline`)."""
    from dataclasses import asdict

    from vmrep.recovery.reverse import sync_from_baseline
    from vmrep.replication import engine

    rt, tv = _rt(config, target)
    with rt.store.step(op_id, vm, "reverse-sync") as h:
        info = engine.vpg_vms(rt, tv)[vm]
        writer = engine.open_writer(rt, target)
        seeds = {}
        for d in info.disks:
            path = preseed.get(d.id)
            if path:
                s = engine.preseed_source(rt, tv, path, d.capacity)
                if s is not None:
                    seeds[d.id] = s
        t, notes = sync_from_baseline(rt, tv, info, writer, seeds, baselines or {})
        out = {"vm": vm, "bytes_read": t.bytes_read, "bytes_stored": t.bytes_stored,
               "blocks_changed": t.blocks_changed, "preseeded_disks": sorted(seeds),
               "fallbacks": {d: st.fallback for d, st in t.disks.items() if st.fallback}}
        h.detail.update(out)
        return {**out, "disks": {d: {**asdict(st), "baseline": notes.get(d) or None} for d, st in t.disks.items()}}


def reverse_checkpoint(config: str, target: str, op_id: str, reverse_of: str,
                       meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Commit the reverse VPG's first checkpoint; `meta`: its transfer record (what the
    reverse sync read, sent and found changed, per disk)."""
    from vmrep.replication import engine

    rt, _ = _rt(config, target)
    with rt.store.step(op_id, None, "reverse-checkpoint") as h:
        cp = engine.close_writer(rt, target, commit=True, at=utcnow(), tag="reverse protection",
                                 meta={"kind": "initial_sync", "reverse_of": reverse_of, **(meta or {})})
        if cp is None:
            raise VmrepError(f"VPG {target}: no open checkpoint to commit (the sync ran in another process?)")
        rt.store.note_checkpoint(target, cp.time)
        h.detail.update(checkpoint=cp.id)
        return {"id": cp.id, "time": cp.time.isoformat()}


STEPS: dict[str, Callable[..., Any]] = {
    "plan": make_plan,
    "cleanup-leftovers": cleanup_leftovers,
    "run-script": run_recovery_script,
    "remove-disks": remove_disks,
    "final-checkpoint": final_checkpoint,
    "pause-replication": set_replication_paused,
    "write-disks": write_disks,
    "create-vm": create_vm,
    "customize": customize_vm,
    "change-baseline": change_baseline,
    "power-on": power_on,
    "verify": verify_vm,
    "remove-vm": remove_vm,
    "mark-committed": mark_committed,
    "shutdown-source": shutdown_source,
    "power-on-source": power_on_source,
    "remove-source-vm": remove_source_vm,
    "reverse-sync": reverse_sync_vm,
    "reverse-checkpoint": reverse_checkpoint,
}
