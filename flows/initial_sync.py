"""Initial sync: validate, copy every disk in full (one retryable task per disk), first
checkpoint. Resumable after a crash (blocks already stored are not sent again); while
it runs the VPG is Initializing/InitialSync and no failover may start."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import flow_run_id, problem_lines, started_by, wait_all
from tasks import replication as t
from tasks.common import step_options
from vmrep.errors import Refused
from vmrep.replication import engine
from vmrep.runtime import get_runtime


@task(name="validate-vpg", **step_options())
def validate_vpg(config: str, vpg: str) -> None:
    from vmrep.validate import validate

    rt = get_runtime(config)
    problems = validate(rt.config, [vpg])
    if problems:
        raise problem_lines(problems)


@flow(name="initial-sync", task_runner=ThreadPoolTaskRunner(max_workers=4))
def initial_sync(vpg: str, config: str = "vmrep.yaml", who: str | None = None) -> dict[str, Any]:
    """Copy every disk of the VPG into the journal and take its first checkpoint."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    store = rt.store
    validate_vpg(config, vpg)
    op = store.start_operation(vpg, "initial_sync", started_by(who), {"vpg": vpg}, flow_run_id())
    if not store.try_lock(vpg, op, "initial_sync"):
        holder = store.runtime(vpg)
        store.finish_operation(op, "failed", error="VPG is held by another operation")
        raise Refused(f"VPG {vpg}: another operation ({holder.lock_kind}) holds it")
    result = "failed"
    try:
        store.update_runtime(vpg, initial_sync_done=False)
        store.set_status(vpg, "Initializing", "InitialSync")
        vms = t.read_vpg_inventory(config, vpg)
        engine.close_writer(rt, vpg, commit=False)  # an open checkpoint of a crashed run in this process
        futures = [
            t.transfer_disk.submit(config, vpg, vm, disk, None, v.vm(name).preseed.get(disk.id))
            for name, vm in vms.items() for disk in vm.disks
        ]
        stats = wait_all(futures)
        cp = t.commit_checkpoint(config, vpg, engine.utcnow(), "initial sync", {"kind": "initial_sync"})
        store.update_runtime(vpg, initial_sync_done=True)
        store.set_status(vpg, "MeetingSLA", "DeltaSync")
        result = "succeeded"
        summary = {"vpg": vpg, "checkpoint": cp["id"], "disks": stats,
                   "bytes_read": sum(s["bytes_read"] for s in stats),
                   "bytes_stored": sum(s["bytes_stored"] for s in stats)}
        get_run_logger().info("VPG %s: initial sync done, checkpoint %s, %d bytes stored",
                              vpg, cp["id"], summary["bytes_stored"])
        return summary
    except BaseException as exc:
        engine.close_writer(rt, vpg, commit=False)
        store.set_status(vpg, "Initializing", "InitialSync", detail=f"initial sync failed: {exc}")
        store.finish_operation(op, "cancelled" if not isinstance(exc, Exception) else "failed", error=str(exc))
        raise
    finally:
        if result == "succeeded":
            store.finish_operation(op, "succeeded")
        store.unlock(vpg, op)
