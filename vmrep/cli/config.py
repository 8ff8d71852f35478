"""`vmrep validate`: the file, then every name in it against the live sites."""

from __future__ import annotations

from typing import Annotated

import typer

from vmrep.cli.common import ConfigOpt, JsonOpt, app, config_from, console, console_err, print_json
from vmrep.errors import VmrepError


@app.command()
def validate(
    vpg: Annotated[list[str] | None, typer.Argument(help="VPGs to check (default: all)")] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the configuration file and, against the live sites, every VM, host, datastore,
    network and folder it names, and that no VM is of a kind that may not be protected."""
    from vmrep.validate import setting_warnings
    from vmrep.validate import validate as run

    cfg = config_from(config)
    warnings = setting_warnings(cfg, vpg or None)
    problems = run(cfg, vpg or None)
    if json_out:
        print_json({"ok": not problems, "problems": [p.__dict__ | {"line": p.line()} for p in problems],
                    "warnings": [w.__dict__ | {"line": w.line()} for w in warnings]})
    else:
        for w in warnings:
            console_err.print(f"warning: {w.line()}", markup=False, highlight=False)
        for p in problems:
            console.print(p.line(), markup=False, highlight=False)
        if not problems:
            names = ", ".join(v.name for v in cfg.vpgs) or "no VPGs"
            console.print(f"ok: {names}", markup=False)
    if problems:
        # The one line on stderr names what is wrong (the details are on stdout above).
        where = ", ".join(dict.fromkeys((f"VPG {p.vpg}: " if p.vpg else "") + p.subject for p in problems))
        raise VmrepError(f"{len(problems)} problem(s) found in {where}")
