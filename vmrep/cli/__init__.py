"""The `vmrep` command. Each group of commands lives in its own module and registers
itself on `app`; errors the user can act on print as one line and exit non-zero."""

from __future__ import annotations

import os
import sys

# Before Prefect is imported anywhere: no telemetry (no internet here, and none wanted),
# and the CLI's own output is what the user reads, not Prefect's INFO lines.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from vmrep.cli import signals
from vmrep.cli.common import app, console_err
from vmrep.errors import VmrepError

# The command is part of the control plane: it reads prefect_secret: references (site
# passwords, the SMTP password) through the resolver the tasks package registers.
import tasks  # noqa: F401,E402  # after the env defaults; registers the secret resolver

# Importing the command modules registers their commands.
from vmrep.cli import lab as _lab  # noqa: F401,E402  # registers its commands
from vmrep.cli import config as _config  # noqa: F401,E402  # registers its commands
from vmrep.cli import server as _server  # noqa: F401,E402  # registers its commands

for _optional in ("replication", "recovery", "monitor", "report", "journal", "exporter", "ransomware"):
    try:
        __import__(f"vmrep.cli.{_optional}")
    except ModuleNotFoundError as _exc:  # a module not written yet must not break the others
        if _exc.name != f"vmrep.cli.{_optional}":
            raise


def main(argv: list[str] | None = None) -> int:
    with signals.handled():
        try:
            rv = app(args=argv, prog_name="vmrep", standalone_mode=False)
        except BaseException as exc:  # noqa: BLE001 - each kind is told apart below
            if signals.stopping() or isinstance(exc, KeyboardInterrupt):
                # whatever the stop broke off (a cancelled transfer, Prefect's own
                # termination signal, a KeyboardInterrupt): one line, not its story
                console_err.print("interrupted", markup=False)
                return 130
            return _error_code(exc)
        if signals.stopping():  # typer turns a KeyboardInterrupt into exit code 130
            console_err.print("interrupted", markup=False)
            return 130
        return rv if isinstance(rv, int) else 0


def _error_code(exc: BaseException) -> int:
    """The exit code of an error the user can act on, printed as one line; anything
    else is a bug and is raised with its traceback."""
    if isinstance(exc, VmrepError):
        for line in exc.lines:
            console_err.print(f"error: {line}", markup=False, highlight=False)
        return exc.exit_code
    if isinstance(exc, SystemExit):  # typer exits for --help and usage errors
        return int(exc.code or 0)
    import click

    if isinstance(exc, click.exceptions.ClickException):
        return _usage_error(exc)
    if isinstance(exc, click.exceptions.Abort):
        return 1
    try:  # typer >= 0.2x raises its own vendored click's exceptions
        from typer._click.exceptions import ClickException as TyperClickException
    except ImportError:  # pragma: no cover - older typer uses click itself
        TyperClickException = ()  # type: ignore[assignment,misc]  # an empty tuple: isinstance is False
    if isinstance(exc, TyperClickException):  # an empty tuple (older typer) matches nothing
        return _usage_error(exc)
    raise exc


def _usage_error(exc: Exception) -> int:
    """A parsing error as one line naming the option and value (click's own rendering is
    four lines of usage); a bare command with no arguments still shows its help."""
    from vmrep.cli.values import usage_error_line

    line = usage_error_line(exc)
    if line is None:
        exc.show()  # type: ignore[attr-defined]  # click's and typer's exceptions both have it
    else:
        console_err.print(f"error: {line}", markup=False, highlight=False)
    return int(getattr(exc, "exit_code", 2))


def entry() -> None:
    signals.own_process = True
    sys.exit(main())
