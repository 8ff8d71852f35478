"""The names of a VPG's status and sub-status, as Zerto names them.

Their own module (not `health.py`, which re-exports them) so that the state database
and recovery can name a status without importing health, which imports the state.
"""

from __future__ import annotations


class Status:
    INITIALIZING = "Initializing"
    MEETING_SLA = "MeetingSLA"
    NOT_MEETING_SLA = "NotMeetingSLA"
    RPO_NOT_MEETING_SLA = "RpoNotMeetingSLA"
    HISTORY_NOT_MEETING_SLA = "HistoryNotMeetingSLA"
    FAILING_OVER = "FailingOver"
    MOVING = "Moving"
    DELETING = "Deleting"
    RECOVERED = "Recovered"
    PAUSED = "Paused"
    ERROR = "Error"


class Substatus:
    INITIAL_SYNC = "InitialSync"
    DELTA_SYNC = "DeltaSync"
    FAILING_OVER_BEFORE_COMMIT = "FailingOverBeforeCommit"
    FAILING_OVER_COMMITTING = "FailingOverCommitting"
    FAILING_OVER_ROLLING_BACK = "FailingOverRollingBack"
    MOVING_BEFORE_COMMIT = "MovingBeforeCommit"
    NEEDS_CONFIGURATION = "NeedsConfiguration"
