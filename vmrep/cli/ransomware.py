"""Ransomware commands (docs/ransomware.md):

    vmrep ransomware status VPG [--json]       suspicion per VPG, VM and disk, the last clean checkpoint
    vmrep ransomware dismiss VPG --vm VM [--disk DISK] --reason TEXT [--json]

Quick commands: the engine directly (journal and state database), no Prefect run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, print_json
from vmrep.cli.values import require_text

ransomware_app = typer.Typer(help="Encryption (ransomware) suspicion: status and dismissal.", no_args_is_help=True)
app.add_typer(ransomware_app, name="ransomware")


def _runtime(config: Path | None) -> Any:
    from vmrep.runtime import get_runtime

    return get_runtime(str(config_from(config).source))


@ransomware_app.command("status")
def status(
    vpg: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Suspicion of the VPG, its VMs and disks now, and the last clean checkpoint."""
    from vmrep.ransomware.service import assess_vpg

    rt = _runtime(config)
    v = rt.config.vpg(vpg)
    a = assess_vpg(rt.journal, vpg)
    latest = a.checkpoints[-1] if a.checkpoints else None
    out: dict[str, Any] = {
        "vpg": vpg,
        "suspicion": a.suspicion,
        "vms": [{"vm": s.name, "suspicion": a.vm_suspicion(s.name),
                 "disks": [p.to_json() | {"suspicion": a.disk_suspicion(s.name, p.disk)}
                           for p in (latest.disks if latest else []) if p.vm == s.name]}
                for s in v.vms],
        "incidents": [{"vm": i.vm, "disk": i.disk, "suspicion": i.level, "began_checkpoint": i.began_checkpoint,
                       "began_at": i.began_at.isoformat(), "encrypted_share": round(i.share, 4),
                       "latest_share": round(i.latest_share, 4), "baseline": round(i.baseline, 4)}
                      for i in a.incidents],
        "last_clean": ({"id": a.last_clean.id, "time": a.last_clean.time.isoformat()} if a.last_clean else None),
    }
    if json_out:
        print_json(out)
        return
    console.print(f"VPG {vpg}: suspicion {a.suspicion}", markup=False)
    for i in out["incidents"]:
        console.print(f"  {i['vm']} {i['disk']}: {i['suspicion']} since {i['began_checkpoint']} ({i['began_at']}), "
                      f"{100 * i['encrypted_share']:.0f} % encrypted (baseline {100 * i['baseline']:.0f} %)",
                      markup=False)
    if a.last_clean is not None:
        console.print(f"  last clean checkpoint: {a.last_clean.id} ({a.last_clean.time.isoformat()})", markup=False)


@ransomware_app.command("dismiss")
def dismiss(
    vpg: Annotated[str, typer.Argument()],
    vm: Annotated[str, typer.Option("--vm", help="the VM whose suspicion is a false alarm")],
    reason: Annotated[str, typer.Option("--reason", help="why (kept with who and when)")],
    disk: Annotated[str | None, typer.Option("--disk", help="one disk: id (scsi0:0), index (0) or label; "
                                                            "default every disk of the VM")] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Judge a suspicion a false alarm: clears the alert and the suspect marks, and
    teaches the disk's baseline that such writes are normal."""
    from vmrep.cli.replication import resolve_disk
    from vmrep.ransomware.service import dismiss as do_dismiss
    from vmrep.stamps import started_by

    require_text(reason, "--reason")
    rt = _runtime(config)
    rt.config.vpg(vpg).vm(vm)
    disk_id = None
    if disk is not None:
        cps = rt.journal.checkpoints(vpg)
        disks = sorted(d for (v, d) in rt.journal.disks(vpg, cps[-1].id) if v == vm) if cps else []
        disk_id = resolve_disk(disk, disks, vm)
    d, changes = do_dismiss(rt.store, rt.journal, vpg, vm, disk_id, reason.strip(), who=started_by())
    cleared = [t.text for t in changes if t.kind == "cleared"]
    if json_out:
        print_json({"vpg": vpg, **d.to_json(), "alerts_cleared": cleared})
        return
    what = f"VM {vm} disk {disk_id}" if disk_id else f"VM {vm}"
    console.print(f"VPG {vpg}: suspicion on {what} dismissed by {d.by} through checkpoint "
                  f"{d.through_checkpoint} ({len(cleared)} alert(s) cleared)", markup=False)
