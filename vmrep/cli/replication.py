"""Replication commands: sync, replicate, checkpoints, verify, restore-disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, print_json
from vmrep.cli.server import run_flow
from vmrep.cli.values import parse_duration, reach_sites, require_positive, require_text, writable_file
from vmrep.errors import UsageError, VmrepError


def _config_path(config: Path | None) -> str:
    cfg = config_from(config)
    return str(cfg.source)


def _progress(total: int, label: str) -> Progress:
    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)


@app.command()
def sync(
    vpg: Annotated[str, typer.Argument(help="VPG to sync")],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Initial sync: validate, copy every disk into the journal, take the first checkpoint."""
    from flows.initial_sync import initial_sync
    from vmrep.replication.engine import disk_bytes, showing_progress, vpg_vms
    from vmrep.runtime import get_runtime

    path = _config_path(config)
    rt = get_runtime(path)
    v = rt.config.vpg(vpg)
    reach_sites(rt, v.protected_site, v.recovery_site)
    total = disk_bytes(vpg_vms(rt, v))
    if json_out:
        summary = run_flow(initial_sync, vpg, path)
        print_json(summary)
        return
    with _progress(total, "sync") as prog:
        bar = prog.add_task(f"initial sync {vpg}", total=total)
        with showing_progress(lambda n: prog.advance(bar, n)):
            summary = run_flow(initial_sync, vpg, path)
    console.print(f"VPG {vpg}: checkpoint {summary['checkpoint']}, read {summary['bytes_read']} bytes, "
                  f"stored {summary['bytes_stored']} bytes", markup=False)


@app.command()
def replicate(
    vpg: Annotated[str, typer.Argument(help="VPG to replicate")],
    duration: Annotated[str | None, typer.Option("--for", help="run for this long, e.g. 10m")] = None,
    cycles: Annotated[int | None, typer.Option(help="run this many cycles")] = None,
    interval: Annotated[float, typer.Option(help="seconds between cycle starts")] = 10.0,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Replicate continuously for a bounded time or number of cycles."""
    from flows.replicate import replicate as flow
    from vmrep.replication.engine import ensure_replicable
    from vmrep.runtime import get_runtime

    if duration is None and cycles is None:
        raise UsageError("give --for DURATION or --cycles N")
    seconds = parse_duration(duration, "--for") if duration is not None else None
    require_positive(cycles, "--cycles")
    require_positive(interval, "--interval")
    # The flow's own refusals would end as a failed run with a traceback: check here first.
    rt = get_runtime(_config_path(config))
    v = rt.config.vpg(vpg)
    ensure_replicable(rt, v)
    reach_sites(rt, v.protected_site, v.recovery_site)
    out = run_flow(flow, vpg, _config_path(config), cycles=cycles, for_seconds=seconds, interval_seconds=interval)
    if json_out:
        print_json(out)
        return
    for c in out:
        console.print(f"{c['time']}  {c['checkpoint']}  changed {c['blocks_changed']} blocks, "
                      f"stored {c['bytes_stored']} bytes, {c['seconds']:.2f}s", markup=False)


@app.command()
def checkpoints(
    vpg: Annotated[str, typer.Argument()],
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the VPG's checkpoints: id, time, tags, size added."""
    from vmrep.runtime import get_runtime

    rt = get_runtime(_config_path(config))
    rt.config.vpg(vpg)
    cps = rt.journal.checkpoints(vpg)
    rows = [checkpoint_row(c) for c in cps]
    from vmrep.ransomware.service import annotate, assess_vpg

    rows = annotate(rows, assess_vpg(rt.journal, vpg, cps))  # suspicion, encrypted_share (also per disk)
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print(f"VPG {vpg}: no checkpoints", markup=False)
    for r in rows:
        mark = f"  suspicion {r['suspicion']}" if r.get("suspicion", "none") != "none" else ""
        console.print(f"{r['id']}  {r['time']}  {r['added_bytes']:>12} B  {', '.join(r['tags'])}{mark}",
                      markup=False)


def checkpoint_row(c: Any) -> dict[str, Any]:
    """One checkpoint of `vmrep checkpoints --json`. The transfer keys come from the
    checkpoint's meta (docs/journal-format.md); a checkpoint written before they existed
    reads as null totals and no disks, never as an error."""
    meta = c.meta if isinstance(c.meta, dict) else {}
    disks = [{"vm": d.get("vm"), "disk": d.get("disk"), "method": d.get("method"), "bytes_read": d.get("bytes_read")}
             for d in meta.get("disks") or [] if isinstance(d, dict)]
    return {"id": c.id, "time": c.time.isoformat(), "tags": list(c.tags), "added_bytes": c.added_bytes,
            "changed_blocks": c.changed_blocks, "bytes_read": meta.get("bytes_read"),
            "bytes_sent": meta.get("bytes_sent"), "bytes_changed": meta.get("bytes_changed"), "disks": disks}


checkpoint_app = typer.Typer(help="Work with one checkpoint.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("tag")
def checkpoint_tag(
    vpg: Annotated[str, typer.Argument()],
    tag: Annotated[str, typer.Argument(help='e.g. "before upgrade"')],
    checkpoint: Annotated[str | None, typer.Option(help="tag this checkpoint instead of taking a new one")] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Tag a checkpoint: by default take a new checkpoint now and tag it (as before an upgrade)."""
    from vmrep.replication import engine
    from vmrep.runtime import get_runtime

    require_text(tag, "tag")  # an empty tag would be dropped, leaving an untagged checkpoint
    rt = get_runtime(_config_path(config))
    v = rt.config.vpg(vpg)
    if checkpoint is not None:
        cp = rt.journal.checkpoint(vpg, checkpoint)
        rt.journal.add_tag(vpg, cp.id, tag)
        cp_id = cp.id
    else:
        engine.ensure_replicable(rt, v)
        cp_id = engine.run_cycle(rt, v, tag=tag).checkpoint_id
    if json_out:
        print_json({"vpg": vpg, "checkpoint": cp_id, "tag": tag})
    else:
        console.print(f"VPG {vpg}: checkpoint {cp_id} tagged {tag!r}", markup=False)


@app.command()
def verify(
    vpg: Annotated[str, typer.Argument()],
    checkpoint: Annotated[str | None, typer.Option(help="only this checkpoint (default: all kept)")] = None,
    against_source: Annotated[bool, typer.Option(
        "--against-source", help="take a checkpoint now and compare it with the source disks block by block")] = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-read and re-hash every block the journal's index references; or, with
    --against-source, compare the latest checkpoint with the protected VMs' disks."""
    from vmrep.runtime import get_runtime

    rt = get_runtime(_config_path(config))
    v = rt.config.vpg(vpg)
    if against_source:
        if checkpoint is not None:
            raise UsageError("--against-source compares a checkpoint taken now: give no --checkpoint")
        _verify_against_source(rt, v, json_out)
        return
    cp = rt.journal.checkpoint(vpg, checkpoint).id if checkpoint is not None else None
    bad = rt.journal.verify(vpg, cp)
    rows = [{"vm": m.vm, "disk": m.disk, "offset": m.offset, "reason": m.reason} for m in bad]
    if json_out:
        print_json({"ok": not bad, "mismatches": rows})
    else:
        for r in rows:
            console.print(f"VM {r['vm']} disk {r['disk']} offset {r['offset']}: {r['reason']}", markup=False)
        if not bad:
            console.print(f"VPG {vpg}: journal verified, no mismatch", markup=False)
    if bad:
        raise VmrepError(f"VPG {vpg}: {len(bad)} block(s) do not match the index")


def _verify_against_source(rt: Any, v: Any, json_out: bool) -> None:
    """A cycle whose checkpoint is compared, while its snapshots still freeze the disks,
    with what the source holds: an older checkpoint cannot be compared with disks that
    moved on since."""
    from vmrep.replication import engine

    engine.ensure_replicable(rt, v)
    reach_sites(rt, v.protected_site, v.recovery_site)
    r = engine.run_cycle(rt, v, verify_source=True)
    out = r.verified or {}
    if json_out:
        print_json(out)
    else:
        for d in out.get("disks", []):
            state = "ok" if not d["blocks_differing"] else f"{d['blocks_differing']} block(s) differ"
            console.print(f"VM {d['vm']} disk {d['disk']}: {d['blocks']} blocks compared, {state}", markup=False)
    if not out.get("ok"):
        bad = sum(d["blocks_differing"] for d in out.get("disks", []))
        raise VmrepError(f"VPG {v.name}: checkpoint {out.get('checkpoint')}: {bad} block(s) differ from the source; "
                         "the next cycle compares those disks block by block")
    if not json_out:
        console.print(f"VPG {v.name}: checkpoint {out['checkpoint']} matches the source", markup=False)


@app.command("restore-disk")
def restore_disk(
    vpg: Annotated[str, typer.Argument()],
    vm: Annotated[str, typer.Argument()],
    disk: Annotated[str, typer.Argument(help="disk id (scsi0:0), index (0) or label (Hard disk 1)")],
    checkpoint: Annotated[str, typer.Option(help="id, latest, latest-tagged, latest-clean or a time")] = "latest",
    out: Annotated[Path, typer.Option(help="file to write (sparse where zero)")] = Path("disk.img"),
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write one disk as of a checkpoint to a local file."""
    from vmrep.runtime import get_runtime

    writable_file(out, "--out")  # before any work: a bad path must not end a restore half-way
    rt = get_runtime(_config_path(config))
    rt.config.vpg(vpg).vm(vm)
    cp = rt.journal.checkpoint(vpg, checkpoint)
    disks = sorted(d for (v, d) in rt.journal.disks(vpg, cp.id) if v == vm)
    disk_id = resolve_disk(disk, disks, vm)
    size = rt.journal.disks(vpg, cp.id)[(vm, disk_id)]
    existed = out.exists()
    try:
        with _progress(size, "restore") as prog:
            bar = prog.add_task(f"{vm} {disk_id}", total=size)
            written = rt.journal.restore_disk(vpg, cp.id, vm, disk_id, out,
                                              progress=lambda n: prog.advance(bar, n))
    except BaseException:
        if not existed:  # a part-written image must not pass for a restored disk
            out.unlink(missing_ok=True)
        raise
    if json_out:
        print_json({"vpg": vpg, "vm": vm, "disk": disk_id, "checkpoint": cp.id, "out": str(out), "bytes": written})
    else:
        console.print(f"{vm} {disk_id} as of {cp.id} ({cp.time.isoformat()}) written to {out}", markup=False)


def resolve_disk(text: str, disks: list[str], vm: str) -> str:
    if text in disks:
        return text
    if text.isdigit() and int(text) < len(disks):
        return disks[int(text)]
    if text.lower().startswith("hard disk ") and text[10:].isdigit() and 0 < int(text[10:]) <= len(disks):
        return disks[int(text[10:]) - 1]
    raise VmrepError(f"VM {vm}: no disk {text!r} in the journal (disks: {', '.join(disks) or 'none'})")


