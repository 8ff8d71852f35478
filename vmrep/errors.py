"""Errors users see: each renders as one line that names the field or object."""

from __future__ import annotations


class VmrepError(Exception):
    """Base of every error the CLI prints as a single line (exit code 1 or 2)."""

    exit_code = 1

    def __init__(self, message: str, *, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.lines = lines or [message]


class ConfigError(VmrepError):
    exit_code = 2


class UsageError(VmrepError):
    """A value given on the command line that cannot be used (malformed, out of range,
    a path that cannot be written); raised before the command does anything."""

    exit_code = 2


class SecretError(VmrepError):
    exit_code = 2


class ConnectionFailed(VmrepError):
    """The site could not be reached or refused the login."""


class VSphereError(VmrepError):
    """A permanent fault from vSphere, with the object's name in the message."""

    def __init__(self, message: str, *, fault: str | None = None) -> None:
        super().__init__(message)
        self.fault = fault


class TransientError(VmrepError):
    """A fault worth retrying (dropped connection, 503, NotAuthenticated, TaskInProgress)."""


class NotFound(VSphereError):
    pass


class Refused(VmrepError):
    """An operation refused before it started (lock held, initial sync, no confirmation)."""


class JournalError(VmrepError):
    pass


class JournalLocked(JournalError):
    """The VPG's journal is held by another writer (a replication cycle, retention, a
    removal): waiting for it may help, unlike any other JournalError."""
