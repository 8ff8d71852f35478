"""Resolve a `SecretRef` (environment variable, file or Prefect Secret block) to its value.

The value is returned to the caller and nowhere else: it is never logged, never put in an
exception message, never cached. Errors name the reference (`env:VAR`,
`prefect_secret:NAME`), which is what a user has to fix.

Environment variables and files are resolved here. The engine imports no Prefect, so a
`prefect_secret:` reference goes to the resolver the control plane registers:

    register_resolver("prefect", fn)     # fn(name, label) -> value, raising SecretError

`tasks.prefect_secrets` registers it when the control plane is imported (any task or
flow module, and the `vmrep` command).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from vmrep.config import SecretRef, _secret_ref
from vmrep.errors import SecretError

log = logging.getLogger(__name__)

__all__ = ["resolve_secret", "as_secret_ref", "register_resolver", "Resolver", "SecretError"]

# A resolver gets the reference's name (the block name for "prefect") and the label to put
# in front of any error message; it returns the value or raises SecretError.
Resolver = Callable[[str, str], str]
_resolvers: dict[str, Resolver] = {}


def register_resolver(kind: str, fn: Resolver) -> None:
    """Let `fn` resolve references of `kind` (today only "prefect", for prefect_secret:).
    Registering again replaces the previous resolver."""
    _resolvers[kind] = fn


def as_secret_ref(ref: SecretRef | Mapping[str, Any] | str) -> SecretRef:
    """Accept a SecretRef, its mapping form or its string form ('env:VAR', 'prefect_secret:NAME')."""
    if isinstance(ref, SecretRef):
        return ref
    # The messages below never echo the input: it might be a clear-text password pasted
    # where a reference belongs (pydantic's str(ValidationError) would show it).
    try:
        data = _secret_ref(ref)
    except ValueError as exc:
        raise SecretError(f"not a secret reference: {first_line(exc)}") from None
    try:
        return SecretRef.model_validate(data)
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise SecretError(f"not a secret reference: {msgs}") from None


def resolve_secret(
    ref: SecretRef | Mapping[str, Any] | str,
    where: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Return the secret's value; raise SecretError naming the reference if it is missing.

    `where` names the setting that holds the reference (e.g. "sites.lab.password") so the
    message points at the line of the config file to fix.
    """
    try:
        ref = as_secret_ref(ref)
    except SecretError as exc:
        raise SecretError(f"{where}: {exc}" if where else str(exc)) from None
    label = f"{where} ({ref.describe()})" if where else f"secret {ref.describe()}"
    if ref.env is not None:
        env = os.environ if environ is None else environ
        value = env.get(ref.env)
        if value is None or value == "":
            raise SecretError(f"{label}: environment variable {ref.env} is not set")
        log.debug("resolved %s", label)
        return value
    if ref.file is not None:
        try:
            value = ref.file.read_text().strip()
        except OSError as exc:
            raise SecretError(f"{label}: cannot read the file ({exc.strerror})") from None
        if not value:
            raise SecretError(f"{label}: the file is empty")
        return value
    assert ref.prefect_secret is not None
    return _prefect_secret(ref, label)


def _prefect_secret(ref: SecretRef, label: str) -> str:
    assert ref.prefect_secret is not None
    fn = _resolvers.get("prefect")
    if fn is None:
        # The engine alone (a script, a test) has no Prefect: say so, naming the reference.
        raise SecretError(f"{label}: Prefect Secret blocks are read by the control plane "
                          "(import tasks.prefect_secrets, or run it from a flow or the vmrep command)")
    value = fn(ref.prefect_secret, label)
    log.debug("resolved %s", label)
    return value


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (what an error of ours quotes of it)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
