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

from vmrep.cli.common import app, console_err
from vmrep.errors import VmrepError

# The command is part of the control plane: it reads prefect_secret: references (site
# passwords, the SMTP password) through the resolver the tasks package registers.
import tasks  # noqa: F401,E402

# Importing the command modules registers their commands.
from vmrep.cli import lab as _lab  # noqa: F401,E402
from vmrep.cli import config as _config  # noqa: F401,E402

for _optional in ("replication", "recovery", "monitor", "report", "journal", "exporter"):
    try:
        __import__(f"vmrep.cli.{_optional}")
    except ModuleNotFoundError as _exc:  # a module not written yet must not break the others
        if _exc.name != f"vmrep.cli.{_optional}":
            raise


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, prog_name="vmrep", standalone_mode=False)
        return 0
    except VmrepError as exc:
        for line in exc.lines:
            console_err.print(f"error: {line}", markup=False, highlight=False)
        return exc.exit_code
    except SystemExit as exc:  # typer exits for --help and usage errors
        return int(exc.code or 0)
    except KeyboardInterrupt:
        console_err.print("interrupted", markup=False)
        return 130
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            return _usage_error(exc)
        if isinstance(exc, click.exceptions.Abort):
            return 1
        try:  # typer >= 0.2x raises its own vendored click's exceptions
            from typer._click.exceptions import ClickException as TyperClickException
        except ImportError:  # pragma: no cover - older typer uses click itself
            TyperClickException = ()  # type: ignore[assignment,misc]
        if TyperClickException and isinstance(exc, TyperClickException):
            return _usage_error(exc)
        raise


def _usage_error(exc: Exception) -> int:
    """A parsing error as one line naming the option and value (click's own rendering is
    four lines of usage); a bare command with no arguments still shows its help."""
    from vmrep.cli.values import usage_error_line

    line = usage_error_line(exc)
    if line is None:
        exc.show()  # type: ignore[attr-defined]
    else:
        console_err.print(f"error: {line}", markup=False, highlight=False)
    return int(getattr(exc, "exit_code", 2))


def entry() -> None:
    sys.exit(main())
