"""Resolve a `SecretRef` (environment variable or Prefect Secret block) to its value.

The value is returned to the caller and nowhere else: it is never logged, never put in an
exception message, never cached. Errors name the reference (`env:VAR`,
`prefect_secret:NAME`), which is what a user has to fix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from vmrep.config import SecretRef, _secret_ref
from vmrep.errors import SecretError

log = logging.getLogger(__name__)

__all__ = ["resolve_secret", "as_secret_ref", "SecretError"]


def as_secret_ref(ref: SecretRef | Mapping[str, Any] | str) -> SecretRef:
    """Accept a SecretRef, its mapping form or its string form ('env:VAR', 'prefect_secret:NAME')."""
    if isinstance(ref, SecretRef):
        return ref
    # The messages below never echo the input: it might be a clear-text password pasted
    # where a reference belongs (pydantic's str(ValidationError) would show it).
    try:
        data = _secret_ref(ref)
    except ValueError as exc:
        raise SecretError(f"not a secret reference: {_first_line(exc)}") from None
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
    name = ref.prefect_secret
    try:
        from prefect.blocks.system import Secret
    except ImportError as exc:  # pragma: no cover - prefect is a dependency
        raise SecretError(f"{label}: prefect is not installed") from exc
    try:
        # _sync=True: this function is synchronous also when called from an async flow.
        block = Secret.load(name, _sync=True)
    except ValueError as exc:
        # Prefect raises ValueError("Unable to find block document named ...").
        raise SecretError(
            f"{label}: no Prefect Secret block named {name!r} ({_first_line(exc)})"
        ) from None
    except Exception as exc:  # API unreachable, wrong block type, ...
        raise SecretError(
            f"{label}: cannot load the Prefect Secret block "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    try:
        value = block.get()
    except Exception as exc:
        raise SecretError(
            f"{label}: cannot read the Prefect Secret block ({type(exc).__name__})"
        ) from None
    if value is None or value == "":
        raise SecretError(f"{label}: the Prefect Secret block is empty")
    if not isinstance(value, str):
        # Secret.get() JSON-decodes; a password such as "1234" comes back as an int.
        value = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    log.debug("resolved %s", label)
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
