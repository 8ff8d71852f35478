"""`vmrep lab ...`: the two-site simulator lab for the demo, the tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, print_json
from vmrep.cli.values import parse_duration, parse_size, writable_file
from vmrep.errors import UsageError

__all__ = ["lab_app", "parse_duration", "parse_size"]  # the parsers moved to values; kept importable here

lab_app = typer.Typer(help="Start, inspect and stop the two-site vSphere lab.", no_args_is_help=True)
app.add_typer(lab_app, name="lab")

@lab_app.command("up")
def lab_up(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="where to write the lab's vmrep.yaml")
    ] = Path("vmrep.yaml"),
    boot_delay: Annotated[str, typer.Option(help="how long a simulated guest takes to boot")] = "1s",
) -> None:
    """Start a protected and a recovery site, seed VMs with real disk bytes and power them on,
    write vmrep.yaml."""
    from lab import manage

    # Both are checked before a site starts: a lab half up is worse than none.
    delay_ms = round(parse_duration(boot_delay, "--boot-delay", zero_ok=True) * 1000)
    writable_file(config, "--config")
    lab = manage.up(config_path=config, boot_delay=f"{delay_ms}ms")
    for name, s in lab.sites.items():
        console.print(f"{name}: {s.url} (pid {s.pid})", markup=False)
    for vm, ip in lab.ips.items():
        console.print(f"  {vm}: running, tools ok, IP {ip}", markup=False)
    console.print(f"config written to {lab.config_path}", markup=False)


@lab_app.command("down")
def lab_down() -> None:
    """Stop what 'lab up' started and remove its folders."""
    from lab import manage

    stopped = manage.down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "no lab running", markup=False)


@lab_app.command("status")
def lab_status(json_out: JsonOpt = False) -> None:
    """Show whether the lab's sites are running."""
    from lab import manage

    st = manage.status()
    if json_out:
        print_json(st)
        return
    if not st["sites"]:
        console.print("no lab running", markup=False)
    for name, s in st["sites"].items():
        what = "stopped"
        if s["running"]:
            what = {"up": "running", "down": "running, site down (connections refused)",
                    "hang": "running, site hanging (connections never answered)"}.get(s.get("state") or "",
                                                                                    "running, control not answering")
        console.print(f"{name}: {what} {s['url']} (pid {s['pid']})", markup=False)


def _switch_site(site: str, state: str, json_out: bool) -> None:
    from lab import manage

    out = manage.set_site_state(site, state)
    if json_out:
        print_json(out)
        return
    text = {"down": "down (its vCenter port refuses connections)",
            "hang": "hanging (its vCenter port accepts connections and never answers)",
            "up": "up (same port, inventory, disks and power states)"}[state]
    console.print(f"{site}: {text} {out['host']}", markup=False)


@lab_app.command("site-down")
def lab_site_down(
    site: Annotated[str, typer.Argument(help="lab site to take off the network, e.g. siteA")],
    hang: Annotated[bool, typer.Option("--hang", help="accept connections and never answer (a connect that "
                                                      "times out) instead of refusing them")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Take a lab site off the network: its vCenter port stops answering (the process, its
    inventory and disks stay, for 'lab site-up')."""
    _switch_site(site, "hang" if hang else "down", json_out)


@lab_app.command("site-up")
def lab_site_up(
    site: Annotated[str, typer.Argument(help="lab site to bring back, e.g. siteA")],
    json_out: JsonOpt = False,
) -> None:
    """Bring a lab site back as it was: same port, inventory, disks, VMs powered as they were."""
    _switch_site(site, "up", json_out)


@lab_app.command("write")
def lab_write(
    vm: Annotated[str, typer.Argument(help="lab VM whose guest writes")],
    disk: Annotated[int | None, typer.Option(help="disk index (default: all disks)")] = None,
    rate: Annotated[str, typer.Option(help="bytes per second, e.g. 4MiB/s")] = "4MiB/s",
    duration: Annotated[str, typer.Option("--for", help="how long, e.g. 60s")] = "10s",
    seed: Annotated[int | None, typer.Option(help="random seed, for repeatable writes")] = None,
    content: Annotated[str, typer.Option(help="what the guest writes: random, text (compressible) or zeros")] = "text",
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write into a running lab VM's disk as its guest would (through the lab's guest I/O)."""
    from lab.guest import CONTENT_KINDS, find_guest, guest_write

    if content not in CONTENT_KINDS:
        raise UsageError(f"--content {content!r}: not one of {', '.join(CONTENT_KINDS)}")
    bytes_per_second = parse_size(rate, "--rate")
    seconds = parse_duration(duration, "--for")
    cfg = config_from(config)
    if disk is not None:
        n = len(find_guest(cfg, vm).disks())
        if not 0 <= disk < n:
            raise UsageError(f"--disk {disk}: VM {vm} has disks 0 to {n - 1}")
    stats = guest_write(cfg, vm, disk=disk, rate=bytes_per_second, seconds=seconds, seed=seed, content=content)
    if json_out:
        print_json([s.__dict__ for s in stats])
    else:
        for s in stats:
            console.print(f"{s.vm} {s.disk}: {s.writes} writes, {s.bytes} bytes in {s.seconds:.1f}s", markup=False)
