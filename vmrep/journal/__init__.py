"""The recovery-side journal: content-addressed blocks plus per-VPG checkpoints.

Format: docs/journal-format.md.
"""

from vmrep.journal.format import ZERO_ID
from vmrep.journal.journal import (
    BlockMap,
    CheckpointInfo,
    CheckpointWriter,
    Journal,
    Mismatch,
    RecoverResult,
    RetentionResult,
    Usage,
    is_zero,
)
from vmrep.journal.store import GCStats

__all__ = [
    "BlockMap",
    "CheckpointInfo",
    "CheckpointWriter",
    "GCStats",
    "Journal",
    "Mismatch",
    "RecoverResult",
    "RetentionResult",
    "Usage",
    "ZERO_ID",
    "is_zero",
]
