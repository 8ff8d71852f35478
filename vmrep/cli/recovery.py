"""Recovery commands: test, failover, commit, rollback, move.

    vmrep test VPG [--checkpoint …] [--keep MINUTES] [--notes TEXT] [--json]
    vmrep test start VPG [--checkpoint …] [--notes TEXT]
    vmrep test stop VPG --success yes|no [--notes TEXT]
    vmrep failover VPG --confirm VPG [--checkpoint …] [--shutdown …] [--commit-policy …] [--commit-after MIN]
    vmrep commit VPG [--reverse-protection]
    vmrep rollback VPG
    vmrep move VPG --confirm VPG [--shutdown graceful|force] [--keep-source-vms] [--no-reverse-protection]

Each runs its Prefect flow (so it shows in the UI with a task run per step);
`--direct` runs the same steps in this process without Prefect. The refusals that need
no vSphere call are checked before the flow starts, so they answer at once.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, print_json, who
from vmrep.cli.server import run_flow
from vmrep.cli.values import reach_sites
from vmrep.errors import VmrepError

CheckpointOpt = Annotated[str, typer.Option(
    "--checkpoint", help="latest, latest-tagged, latest-clean, an id or a time (ISO)")]
DirectOpt = Annotated[bool, typer.Option("--direct", help="run in this process without Prefect")]
VerifyOpt = Annotated[float, typer.Option("--verify-timeout", help="seconds to wait for each VM's guest", min=0)]


class Shutdown(str, Enum):
    none = "none"
    graceful = "graceful"
    force = "force"


class MoveShutdown(str, Enum):
    graceful = "graceful"
    force = "force"


class CommitPolicy(str, Enum):
    none = "none"
    commit = "commit"
    rollback = "rollback"


class YesNo(str, Enum):
    yes = "yes"
    no = "no"


def _setup(config: Path | None, vpg: str) -> tuple[str, Any, Any]:
    from vmrep.runtime import get_runtime

    cfg = config_from(config)
    path = str(cfg.source)
    rt = get_runtime(path)
    return path, rt, rt.config.vpg(vpg)


def _fmt_secs(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}s"


def _show(summary: dict[str, Any]) -> None:
    s = summary
    head = f"VPG {s['vpg']}: {s['kind']} {s['operation_id'][:8]} {s['result']}"
    if s.get("checkpoint_id"):
        head += f", checkpoint {s['checkpoint_id']}"
        if s.get("checkpoint_age_seconds") is not None:
            head += f" (age {_fmt_secs(s['checkpoint_age_seconds'])})"
    if s.get("rto_seconds") is not None:
        head += f", RTO {_fmt_secs(s['rto_seconds'])}"
        if s.get("rto_target_seconds") is not None:
            head += f" (target {_fmt_secs(s['rto_target_seconds'])})"
    console.print(head, markup=False)
    for vm, ver in (s.get("verification") or {}).items():
        line = f"  {vm}: verified" if ver["ok"] else f"  {vm}: FAILED {ver.get('error') or ''}"
        console.print(line, markup=False)
    if s["kind"] == "test" and "success" in s:
        console.print(f"  test success: {'yes' if s['success'] else 'no'}, clean-up: "
                      f"{'ok' if s.get('cleanup_ok') else 'FAILED'}", markup=False)
    for w in s.get("warnings") or []:
        console.print(f"  warning: {w}", markup=False)
    if s.get("error") and s["result"] != "succeeded":
        console.print(f"  error: {s['error']}", markup=False)
    rp = s.get("reverse_protection")
    if rp:
        console.print(f"  reverse protection: VPG {rp['vpg']} synced (checkpoint {rp['checkpoint']}, "
                      f"{rp['bytes_stored']} bytes stored of {rp['bytes_read']} read)", markup=False)
    if s.get("rto_met") is False:
        console.print(f"  RTO target {_fmt_secs(s.get('rto_target_seconds'))} missed", markup=False)
    c = s.get("commit")
    if isinstance(c, dict) and c.get("operation_id"):
        _show(c)


def _out(summary: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(summary)
    else:
        _show(summary)


# --------------------------------------------------------------------------------------
# test


@app.command("test", no_args_is_help=True)
def test_cmd(
    first: Annotated[str, typer.Argument(metavar="[start|stop] VPG", help="VPG, or start/stop followed by the VPG")],
    second: Annotated[str | None, typer.Argument(metavar="", hidden=True)] = None,
    checkpoint: CheckpointOpt = "latest",
    keep: Annotated[float, typer.Option("--keep", help="minutes to keep the test VMs before stopping", min=0)] = 0.0,
    notes: Annotated[str | None, typer.Option("--notes", help="notes recorded with the test")] = None,
    success: Annotated[YesNo | None, typer.Option("--success", help="test stop: did the test succeed?")] = None,
    verify_timeout: VerifyOpt = 600.0,
    direct: DirectOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Test failover into the test network: start, verify, keep, stop (or 'test start' / 'test stop')."""
    if first in ("start", "stop") and second is not None:
        action, vpg = first, second
    elif second is not None:
        raise VmrepError(f"unexpected argument {second!r} (usage: vmrep test [start|stop] VPG)")
    else:
        action, vpg = "run", first
    if action == "stop":
        if success is None:
            raise VmrepError(f"VPG {vpg}: test stop needs --success yes or --success no")
        if keep or checkpoint != "latest":
            raise VmrepError("test stop takes only --success and --notes")
    elif success is not None:
        raise VmrepError("--success is for 'vmrep test stop'")
    elif action == "start" and keep:
        raise VmrepError("--keep is for 'vmrep test VPG' (a started test runs until 'vmrep test stop')")
    path, rt, v = _setup(config, vpg)
    from vmrep.recovery import operations as ops

    if action == "stop":
        if ops.running_test(rt.store, vpg) is None:
            raise VmrepError(f"VPG {vpg}: no test is running")
        ok = success == YesNo.yes
        reach_sites(rt, v.recovery_site)  # where the test VMs run
        if direct:
            summary = ops.stop_test(path, vpg, success=ok, notes=notes, who=who())
        else:
            from flows.dr_test import dr_test_stop

            summary = run_flow(dr_test_stop, vpg, ok, path, notes=notes, who=who())
        _out(summary, json_out)
        return
    ops.preflight(rt, v, "test")
    rt.journal.checkpoint(vpg, checkpoint)  # a bad reference is one line, before anything starts
    reach_sites(rt, v.protected_site, v.recovery_site)
    try:
        if action == "start":
            if direct:
                summary = ops.run_test(path, vpg, checkpoint=checkpoint, notes=notes, who=who(), stop=False,
                                       verify_timeout=verify_timeout)
            else:
                from flows.dr_test import dr_test_start

                summary = run_flow(dr_test_start, vpg, path, checkpoint=checkpoint, notes=notes, who=who(),
                                        verify_timeout=verify_timeout)
        elif direct:
            summary = ops.run_test(path, vpg, checkpoint=checkpoint, keep_minutes=keep, notes=notes, who=who(),
                                   verify_timeout=verify_timeout)
            if summary.get("success") is False:
                raise ops.TestFailed(f"VPG {vpg}: test failed ({summary.get('error')}); test VMs removed", summary)
        else:
            from flows.dr_test import dr_test

            summary = run_flow(dr_test, vpg, path, checkpoint=checkpoint, keep_minutes=keep, notes=notes, who=who(),
                              verify_timeout=verify_timeout)
    except ops.TestFailed as exc:
        _out(exc.summary, json_out)
        raise
    _out(summary, json_out)
    if action == "start" and not json_out:
        console.print(f"test VMs are running; end with: vmrep test stop {vpg} --success yes|no", markup=False)


# --------------------------------------------------------------------------------------
# failover, commit, rollback, move


@app.command()
def failover(
    vpg: Annotated[str, typer.Argument(help="VPG to fail over")],
    confirm: Annotated[str | None, typer.Option("--confirm", help="the VPG's name again")] = None,
    checkpoint: CheckpointOpt = "latest",
    shutdown: Annotated[Shutdown | None, typer.Option("--shutdown", help="source VMs (default: the VPG's)")] = None,
    commit_policy: Annotated[CommitPolicy | None, typer.Option("--commit-policy",
                                                               help="at the timeout (default: the VPG's)")] = None,
    commit_after: Annotated[float | None, typer.Option("--commit-after", help="minutes before the policy acts",
                                                       min=0)] = None,
    verify_timeout: VerifyOpt = 600.0,
    direct: DirectOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Live failover onto the production network, then commit or roll back."""
    path, rt, v = _setup(config, vpg)
    from vmrep.recovery import operations as ops

    ops.preflight(rt, v, "failover", confirm=confirm)
    rt.journal.checkpoint(vpg, checkpoint)
    # Only the recovery site: a failover is for when the protected site may be gone.
    reach_sites(rt, v.recovery_site)
    kw: dict[str, Any] = dict(checkpoint=checkpoint, shutdown=shutdown.value if shutdown else None,
              commit_policy=commit_policy.value if commit_policy else None, commit_after_minutes=commit_after,
              verify_timeout=verify_timeout)
    if direct:
        summary = ops.run_failover(path, vpg, confirm=confirm, who=who(), **kw)
    else:
        from flows.failover import failover as flow

        summary = run_flow(flow, vpg, confirm or "", path, who=who(), **kw)
    _out(summary, json_out)
    if json_out or summary.get("commit"):
        return
    # The command returns here; the policy is the control plane's (the monitor pass, every minute).
    cp = summary.get("commit_policy")
    if cp:
        console.print(f"VPG {vpg}: awaiting commit; the commit policy will {cp['policy']} at "
                      f"{cp['due_at']:%Y-%m-%d %H:%M:%S} UTC (applied by the monitor) unless you run "
                      f"'vmrep commit {vpg}' or 'vmrep rollback {vpg}' first", markup=False)
    else:
        console.print(f"awaiting commit: vmrep commit {vpg} [--reverse-protection]  or  vmrep rollback {vpg}",
                      markup=False)


@app.command()
def commit(
    vpg: Annotated[str, typer.Argument(help="VPG whose failover or move to commit")],
    reverse_protection: Annotated[bool, typer.Option(
        "--reverse-protection", help="protect the recovered VMs back to the original site")] = False,
    direct: DirectOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Commit the failover awaiting commit: the recovered VMs stay."""
    path, rt, v = _setup(config, vpg)
    from vmrep.recovery import operations as ops

    if not reverse_protection:  # with it, also a commit made while the protected site was gone
        ops.awaiting_commit(rt, v, "commit")
    # Before a flow starts: reverse protection needs the protected site (one line if gone).
    ops.refuse_commit_without_source(rt, v, reverse_protection)
    if direct:
        summary = ops.commit(path, vpg, reverse_protection=reverse_protection, who=who())
    else:
        from flows.failover import commit as flow

        summary = run_flow(flow, vpg, path, reverse_protection=reverse_protection, who=who())
    _out(summary, json_out)


@app.command()
def rollback(
    vpg: Annotated[str, typer.Argument(help="VPG whose failover or move to roll back")],
    direct: DirectOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Roll back the failover awaiting commit: recovered VMs removed, source as before."""
    path, rt, v = _setup(config, vpg)
    from vmrep.recovery import operations as ops

    ops.awaiting_commit(rt, v, "rollback")
    if direct:
        summary = ops.rollback(path, vpg, who=who())
    else:
        from flows.failover import rollback as flow

        summary = run_flow(flow, vpg, path, who=who())
    _out(summary, json_out)


@app.command()
def move(
    vpg: Annotated[str, typer.Argument(help="VPG to move to its recovery site")],
    confirm: Annotated[str | None, typer.Option("--confirm", help="the VPG's name again")] = None,
    shutdown: Annotated[MoveShutdown, typer.Option("--shutdown", help="how the source VMs are shut down")]
    = MoveShutdown.graceful,
    keep_source_vms: Annotated[bool, typer.Option("--keep-source-vms",
                                                  help="leave the source VMs registered (needs "
                                                       "--no-reverse-protection)")] = False,
    reverse_protection: Annotated[bool, typer.Option("--reverse-protection/--no-reverse-protection",
                                                     help="protect the moved VMs back")] = True,
    verify_timeout: VerifyOpt = 600.0,
    direct: DirectOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Planned move: shut down, final checkpoint, fail over, commit, reverse protection."""
    path, rt, v = _setup(config, vpg)
    from vmrep.recovery import operations as ops

    ops.preflight(rt, v, "move", confirm=confirm)
    if reverse_protection and keep_source_vms:
        raise VmrepError(f"VPG {vpg}: move refused: --keep-source-vms needs --no-reverse-protection "
                         "(reverse protection pre-seeds from the source VMs' disks)")
    ops.refuse_move_without_source(rt, v)  # one line naming the reason, bounded by the connect timeout
    reach_sites(rt, v.protected_site, v.recovery_site)  # a planned move needs both
    kw: dict[str, Any] = dict(shutdown=shutdown.value, reverse_protection=reverse_protection,
                              keep_source_vms=keep_source_vms,
                              verify_timeout=verify_timeout)
    if direct:
        summary = ops.run_move(path, vpg, confirm=confirm, who=who(), **kw)
    else:
        from flows.move import move as flow

        summary = run_flow(flow, vpg, confirm or "", path, who=who(), **kw)
    _out(summary, json_out)
