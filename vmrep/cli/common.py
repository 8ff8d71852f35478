"""Shared pieces of the CLI: the Typer app, the --config option, JSON output."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from vmrep.config import Config, load_config
from vmrep.stamps import started_by

app = typer.Typer(
    name="vmrep",
    help="Continuous replication, DR tests and failover of vSphere VMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)
console_err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="vmrep.yaml to use (default: $VMREP_CONFIG or ./vmrep.yaml)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def config_from(path: Path | None) -> Config:
    cfg = load_config(path)
    # The config's `home` is where its state lives (vmrep.runtime does the same when it
    # opens the state store); the CLI's local Prefect server lives there too.
    if cfg.home and "VMREP_HOME" not in os.environ:
        os.environ["VMREP_HOME"] = str(cfg.resolve(cfg.home))
    return cfg


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=_default))


def who() -> str:
    """Who runs this command ($VMREP_USER, else $USER): recorded as the operation's starter."""
    return started_by()
