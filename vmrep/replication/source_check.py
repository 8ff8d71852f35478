"""Verification against the source: a checkpoint compared block by block with the
source disks it was taken from (`vmrep verify --against-source`, and the schedule of
`verify_against_source_hours`), the guard against changes CBT lost.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from vmrep.config import VPG
from vmrep.replication.blocks import verify_disk
from vmrep.replication.changes import SOURCE_MISMATCH
from vmrep.replication.endpoints import VMDiskSource, journal_for
from vmrep.runtime import Runtime
from vmrep.stamps import utcnow
from vmrep.vsphere.inventory import VMInfo

log = logging.getLogger(__name__)


def verify_against_source(rt: Runtime, vpg: VPG, vms: dict[str, VMInfo], checkpoint_id: str) -> dict[str, Any]:
    """Compare checkpoint `checkpoint_id` with the source disks as frozen by the snapshot
    it was taken at (call it while the cycle's consistency points exist). Each differing
    disk opens alert SOURCE_MISMATCH (cleared by the cycle that scanned it again); the
    result is recorded as a `replicate` operation with params verify_against_source, whose
    time the schedule (`verify_against_source_hours`) runs from."""
    store = rt.store
    op = store.start_operation(vpg.name, "replicate", params={"verify_against_source": True,
                                                              "checkpoint": checkpoint_id})
    j = journal_for(rt, vpg.name)
    bs = j.block_size
    rows: list[dict[str, Any]] = []
    try:
        ds = rt.datastores(vpg.protected_site)
        for name, vm in vms.items():
            for disk in vm.disks:
                ids = j.block_map(vpg.name, checkpoint_id, name, disk.id)
                check = verify_disk(VMDiskSource(ds, disk), ids, bs)
                bad = check.differing
                rows.append({"vm": name, "disk": disk.id, "bytes_read": check.bytes_read, "blocks": check.blocks,
                             "blocks_differing": len(bad), "offsets": [i * bs for i in bad[:20]]})
                if bad:
                    log.error("VPG %s: VM %s disk %s: %d block(s) of checkpoint %s differ from the source",
                              vpg.name, name, disk.id, len(bad), checkpoint_id)
                    store.raise_alert(vpg.name, SOURCE_MISMATCH, "error",
                                      f"VPG {vpg.name}: VM {name} disk {disk.id}: {len(bad)} block(s) of "
                                      f"checkpoint {checkpoint_id} differ from the source; the next cycle "
                                      "compares the whole disk", vm=name, subject=disk.id,
                                      data={"checkpoint": checkpoint_id, "blocks": len(bad)})
    except BaseException as exc:
        store.finish_operation(op, "failed", error=str(exc), checkpoint_id=checkpoint_id)
        raise
    differing = sum(r["blocks_differing"] for r in rows)
    store.finish_operation(op, "succeeded" if not differing else "failed",
                           error=f"{differing} block(s) differ from the source" if differing else None,
                           checkpoint_id=checkpoint_id)
    return {"vpg": vpg.name, "checkpoint": checkpoint_id, "ok": not differing,
            "bytes_read": sum(r["bytes_read"] for r in rows), "disks": rows}


def source_verification_due(rt: Runtime, vpg: VPG, now: datetime | None = None) -> bool:
    """Whether `verify_against_source_hours` asks for a verification in this cycle."""
    if vpg.verify_against_source_hours <= 0:
        return False
    now = now or utcnow()
    for op in rt.store.operations(vpg.name, kind="replicate"):
        if (op.params or {}).get("verify_against_source") and op.result in ("succeeded", "failed"):
            started = op.started_at if op.started_at.tzinfo else op.started_at.replace(tzinfo=timezone.utc)
            return now - started >= timedelta(hours=vpg.verify_against_source_hours)
    return True
