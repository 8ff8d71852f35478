"""The recovery-side journal: content-addressed blocks plus per-VPG checkpoints.

Format: docs/journal-format.md.
"""

from vmrep.journal.format import ZERO_ID
from vmrep.journal.journal import Journal
from vmrep.journal.results import (
    BlockMap,
    CheckpointInfo,
    Mismatch,
    RecoverResult,
    RepairResult,
    RetentionResult,
    Usage,
    is_zero,
)
from vmrep.journal.store import GCStats
from vmrep.journal.writer import CheckpointWriter

__all__ = [
    "BlockMap",
    "CheckpointInfo",
    "CheckpointWriter",
    "GCStats",
    "Journal",
    "Mismatch",
    "RecoverResult",
    "RepairResult",
    "RetentionResult",
    "Usage",
    "ZERO_ID",
    "is_zero",
]
