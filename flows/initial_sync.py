"""Initial sync: validate, copy every disk in full (one retryable task per disk), first
checkpoint: `engine.initial_sync` with its steps as task runs. Resumable after a crash
(blocks already stored are not sent again); while it runs the VPG is
Initializing/InitialSync and no failover may start."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import cancel_handed_over, emitting, flow_run_id, hand_off
from tasks.replication import PrefectRunner
from vmrep.replication import engine
from vmrep.runtime import get_runtime
from vmrep.stamps import started_by


@flow(name="initial-sync", task_runner=ThreadPoolTaskRunner(max_workers=4), on_cancellation=[cancel_handed_over])
def initial_sync(vpg: str, config: str = "vmrep.yaml", who: str | None = None) -> dict[str, Any]:
    """Copy every disk of the VPG into the journal and take its first checkpoint."""
    if (handed := hand_off(config, vpg, "protected")) is not None:  # on the protected site's pool
        return handed
    rt = get_runtime(config)
    with emitting(config):  # Initializing -> MeetingSLA, as events now
        r = engine.initial_sync(rt, rt.config.vpg(vpg), runner=PrefectRunner(),
                                who=started_by(who, fallback="prefect"), flow_run_id=flow_run_id())
    summary = {"vpg": vpg, "checkpoint": r.checkpoint_id, "disks": r.disk_rows(),
               "bytes_read": r.bytes_read, "bytes_stored": r.bytes_stored}
    get_run_logger().info("VPG %s: initial sync done, checkpoint %s, %d bytes stored",
                          vpg, r.checkpoint_id, summary["bytes_stored"])
    return summary
