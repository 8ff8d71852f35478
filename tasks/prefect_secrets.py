"""The Prefect Secret resolver of the control plane: `prefect_secret:NAME` references
are read from Prefect Secret blocks. The engine imports no Prefect (vmrep.secrets only
resolves env: and file: references itself), so this module registers the resolver into
it on import; `tasks/__init__.py` imports it, hence every task and flow module and the
`vmrep` command do.

Prefect is imported when a block is first read, not here: the CLI's quick commands
import this module and must stay quick.
"""

from __future__ import annotations

import json

from vmrep.errors import SecretError
from vmrep.secrets import first_line, register_resolver


def prefect_secret(name: str, label: str) -> str:
    """The value of the Prefect Secret block `name`; SecretError starting with `label`
    (which names the setting and the reference) when it is missing or unreadable."""
    try:
        from prefect.blocks.system import Secret
    except ImportError as exc:  # pragma: no cover - prefect is a dependency
        raise SecretError(f"{label}: prefect is not installed") from exc
    try:
        # _sync=True: this function is synchronous also when called from an async flow.
        block = Secret.load(name, _sync=True)
    except ValueError as exc:
        # Prefect raises ValueError("Unable to find block document named ...").
        raise SecretError(f"{label}: no Prefect Secret block named {name!r} ({first_line(exc)})") from None
    except Exception as exc:  # API unreachable, wrong block type, ...
        raise SecretError(
            f"{label}: cannot load the Prefect Secret block ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    try:
        value = block.get()
    except Exception as exc:
        raise SecretError(f"{label}: cannot read the Prefect Secret block ({type(exc).__name__})") from None
    if value is None or value == "":
        raise SecretError(f"{label}: the Prefect Secret block is empty")
    if not isinstance(value, str):
        # Secret.get() JSON-decodes; a password such as "1234" comes back as an int.
        value = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return value


register_resolver("prefect", prefect_secret)
