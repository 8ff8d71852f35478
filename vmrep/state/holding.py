"""Operations that hold a VPG: start, take the lock (else record the refusal and raise),
and on the way out end the operation and let the VPG go.

Every operation that holds a VPG (initial sync, test, failover, move, commit, rollback,
reverse protection) begins with `holding_vpg`, so the preamble is written once, over one
`StateStore.begin_operation` call (the record and the lock in one transaction).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from vmrep.errors import Refused
from vmrep.state.models import VpgRuntime
from vmrep.state.store import StateStore
from vmrep.stamps import started_by


def who_started(who: str | None = None) -> str:
    """Who an operation is recorded as started by: given, else the environment's user."""
    return started_by(who)


@contextmanager
def holding_vpg(store: StateStore, vpg: str, kind: str, *, who: str | None, params: dict[str, Any],
                flow_run_id: str | None, refusal: Callable[[VpgRuntime], str],
                take_from: tuple[str, str] | None = None, keep: bool = False) -> Iterator[str]:
    """Start operation `kind` on `vpg` holding its lock; yields the operation id.

    Refused (another operation holds the VPG): the operation is recorded as refused and
    `Refused(refusal(runtime row))` is raised. `take_from` = (operation id, kind) hands
    the lock over from that operation instead (a commit or rollback taking it from its
    failover), and back to it when the block fails.

    When the block raises, the operation is ended (failed, or cancelled on a
    cancellation) unless the block ended it itself, and the lock released or handed
    back. When it returns, the lock is released, unless `keep` (a failover awaiting
    commit, a test left running); ending the operation with its result is the block's.
    """
    op, held = store.begin_operation(vpg, kind, who_started(who), params, flow_run_id,
                                     take_from=take_from[0] if take_from else None)
    if held is not None:
        raise Refused(refusal(held))
    try:
        yield op
    except BaseException as exc:
        result = "failed" if isinstance(exc, Exception) else "cancelled"
        store.finish_running(op, result, error=str(exc) or type(exc).__name__)
        if take_from is not None:
            store.hand_over_lock(vpg, op, *take_from)
        else:
            store.unlock(vpg, op)
        raise
    if not keep:
        store.unlock(vpg, op)
