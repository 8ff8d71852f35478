"""vmrep's own state: VPG status, alerts, samples, operations, tests, email deliveries.

    store = StateStore.open()            # VMREP_DB_URL or sqlite:///<VMREP_HOME>/state.db
    store.set_status("erp", "MeetingSLA")
    df = store.frame("samples", vpg="erp")
"""

from vmrep.state.models import (
    Alert,
    CommitPolicyDeadline,
    EmailDelivery,
    EventOutbox,
    Operation,
    OperationStep,
    Sample,
    StatusHistory,
    TestResult,
    VpgRuntime,
    utcnow,
)
from vmrep.state.store import StateStore, StepHandle, alert_key, default_url, make_engine, migrate

__all__ = [
    "Alert",
    "CommitPolicyDeadline",
    "EmailDelivery",
    "EventOutbox",
    "Operation",
    "OperationStep",
    "Sample",
    "StateStore",
    "StatusHistory",
    "StepHandle",
    "TestResult",
    "VpgRuntime",
    "alert_key",
    "default_url",
    "make_engine",
    "migrate",
    "utcnow",
]
