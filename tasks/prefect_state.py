"""The flow-run state checker of the control plane: the engine asks it whether the Prefect
flow run recorded with an operation has ended (crashed, cancelled, failed, completed),
on whatever host it ran, to recognise an operation whose owner is gone. The engine
imports no Prefect, so this module registers the checker into
`vmrep.recovery.ownership` on import (`tasks/__init__.py` imports it, as it does the
secret resolver).

Only a Prefect API that is configured is asked (PREFECT_API_URL, or the settings of a
flow run or test harness): without one Prefect would start a temporary server just to
answer, and no server we did not start can know the run.
"""

from __future__ import annotations

import os
import sys

from vmrep.recovery.ownership import register_flow_run_checker

# One short question per VPG per monitor pass: do not let a server that is away hold it.
TIMEOUT_SECONDS = 10.0


def flow_run_state(flow_run_id: str) -> str | None:
    """The state type of the flow run ("RUNNING", "CRASHED", …), None when unknown."""
    if "prefect" not in sys.modules and "PREFECT_API_URL" not in os.environ:
        return None  # no Prefect in this process (a quick CLI command) and none configured
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    try:
        run_id = uuid.UUID(str(flow_run_id))
    except ValueError:
        return None
    with get_client(sync_client=True, httpx_settings={"timeout": TIMEOUT_SECONDS}) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return None
    return run.state.type.value if run.state is not None else None


register_flow_run_checker(flow_run_state)
