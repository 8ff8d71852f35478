"""Reading and checking the values given on the command line, before any work starts.

Each check raises a `UsageError`: one line that names the option and the value as typed,
so a refused command has done nothing (no checkpoint, no snapshot, no file) when it ends.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from vmrep.errors import UsageError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
               "g": 1024**3, "gib": 1024**3, "gb": 1000**3}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# One decimal number: "1.5" or "10", never "1.5.0" (which a character class [\d.]+ let through).
_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"


def parse_size(text: str, what: str) -> float:
    """A size or rate such as 4MiB/s, 512k or 1000; more than zero."""
    m = re.fullmatch(rf"\s*{_NUMBER}\s*([a-zA-Z]*)\s*", text.removesuffix("/s"))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UsageError(f"{what} {text!r}: not a size (try 4MiB/s)")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if value <= 0:
        raise UsageError(f"{what} {text!r}: must be more than zero")
    return value


def parse_duration(text: str, what: str, *, zero_ok: bool = False) -> float:
    """Seconds in a duration such as 60s, 10m, 1.5h, 200ms (a bare number is seconds);
    more than zero unless `zero_ok` (a boot delay may be none, a run time may not)."""
    m = re.fullmatch(rf"\s*{_NUMBER}\s*(ms|s|m|h|d)?\s*", text)
    if not m:
        raise UsageError(f"{what} {text!r}: not a duration (try 60s, 10m, 1h)")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]
    if seconds < 0 or (seconds == 0 and not zero_ok):
        raise UsageError(f"{what} {text!r}: must be longer than zero")
    return seconds


def require_positive(value: float | int | None, what: str) -> None:
    """A count or an interval that only makes sense above zero (0 cycles, a 0 s interval)."""
    if value is not None and value <= 0:
        raise UsageError(f"{what} {value:g}: must be more than zero")


def require_text(value: str, what: str) -> str:
    """A name or tag that must say something: not empty, not only blanks."""
    if not value.strip():
        raise UsageError(f"{what} {value!r}: must not be empty")
    return value


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_file(path: Path, what: str) -> Path:
    """A file this command will create or overwrite: its folder must already exist and be
    writable, and it must not be a folder itself. Checked without creating anything."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{what} {path}: is a folder (give a file name)")
    if not parent.exists():
        raise UsageError(f"{what} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: folder {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{what} {path}: file is not writable")
    return p


def writable_place(path: Path, what: str) -> Path:
    """A folder (or a file in one) that may still be created: whatever part of it exists
    must be folders, the deepest of them writable."""
    p = Path(path).expanduser()
    base = _nearest_existing(p)
    if base != p or p.is_dir():
        if not base.is_dir():
            raise UsageError(f"{what} {path}: {base} is not a folder")
        if not os.access(base, os.W_OK | os.X_OK):
            raise UsageError(f"{what} {path}: folder {base} is not writable")
    elif not os.access(p, os.W_OK):
        raise UsageError(f"{what} {path}: file is not writable")
    return p


def usage_error_line(exc: Any) -> str | None:
    """One line for a command-line parsing error (bad number, unknown choice, missing
    argument) naming the option and the value as typed; None for "show the help"."""
    name = type(exc).__name__
    if name == "NoArgsIsHelpError":
        return None
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    param = getattr(exc, "param", None)
    cause = exc.__cause__
    if param is not None and hasattr(cause, "errors"):
        # Typer converts with pydantic: the failed input is in the validation error.
        errors = cause.errors()
        hint = "/".join(getattr(param, "opts", None) or [str(getattr(param, "name", "value"))])
        if errors and "input" in errors[0]:
            reason = str(errors[0].get("msg", message)).removeprefix("Value error, ")
            return f"{hint} {errors[0]['input']!r}: {reason}"
    return " ".join(message.split())


def reach_sites(rt: Any, *sites: str) -> None:
    """Log in to each site the operation needs before its flow starts, so a site that is
    down or refuses the login is one line here, not a failed flow run with a traceback.
    The runtime keeps the clients, and the flow (in this process) uses them."""
    for name in dict.fromkeys(sites):
        rt.client(name)
