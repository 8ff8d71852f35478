"""Ctrl-C and SIGTERM end a command within seconds, cleaned up, with one line.

The transfer steps of a flow run in worker threads, which a KeyboardInterrupt in the
main thread never reaches; left alone they would go on copying a whole disk while the
process waits for them. So a stop signal does two things:

- it asks every transfer of the process to stop (vmrep.replication.blocks.request_stop:
  each raises TransferCancelled within one chunk);
- it raises KeyboardInterrupt in the main thread, which ends a wait or a sleep at once,
  so the flow's own `finally`/`except` clauses abort the open checkpoint and remove the
  replication snapshots.

While a flow runs, Prefect replaces the SIGTERM handler with its own (it raises its
TerminationSignal in the main thread instead, and re-sends SIGTERM to the process after
its teardown). The stop request must not depend on whose handler runs: a wakeup fd
(written by the C-level handler for any signal that has a Python handler) is watched by
a thread of ours, which requests the stop whichever handler is installed.

Prefect's crash and task-failure reports of the interrupted run are not for the user:
logging is switched off once stopping, and the CLI prints one line, "interrupted". If the
clean-up itself hangs, the process ends anyway after GRACE_SECONDS.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

GRACE_SECONDS = 20.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()
_stopping = False
_raised = False
_deadline: threading.Timer | None = None
# True in a `vmrep` process of its own (entry()): the deadline then also covers the
# interpreter's exit (Prefect flushes its logs and events there). False when main() is
# called in a process that goes on (tests): the deadline ends with the command.
own_process = False
# Set by a command whose normal end is a stop signal (a service such as `vmrep exporter`):
# its stop is then a success, not "interrupted".
_stop_is_success = False


def stopping() -> bool:
    """A stop signal arrived during this command, and the command did not expect it."""
    return _stopping and not _stop_is_success


def stop_ends_successfully() -> None:
    """The running command is a service: Ctrl-C or SIGTERM is how it ends, exit 0."""
    global _stop_is_success
    _stop_is_success = True


def _begin_stop() -> None:
    """Idempotent; callable from any thread (the watcher) and from the handler."""
    global _stopping, _deadline
    from vmrep.replication import blocks

    blocks.request_stop()
    with _lock:
        first = not _stopping
        _stopping = True
    if first:
        logging.disable(logging.CRITICAL)
        _deadline = threading.Timer(GRACE_SECONDS, _hard_exit)
        _deadline.daemon = True
        _deadline.start()


def _hard_exit() -> None:
    try:
        os.write(2, f"interrupted (clean-up did not end within {GRACE_SECONDS:.0f}s)\n".encode())
    finally:
        os._exit(130)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _raised
    _begin_stop()
    if not _raised:  # once: a second Ctrl-C must not break off the clean-up the first one started
        _raised = True
        raise KeyboardInterrupt


def _watch(fd: int) -> None:
    try:
        while data := os.read(fd, 64):  # EOF when handled() ends
            if any(b in (int(s) for s in STOP_SIGNALS) for b in data):
                _begin_stop()
    except OSError:
        pass
    finally:
        os.close(fd)


def _reset() -> None:
    global _stopping, _raised, _stop_is_success
    with _lock:
        was = _stopping
        _stopping = _raised = _stop_is_success = False
    # Only where the block engine is loaded already: a quick command need not load it.
    blocks = sys.modules.get("vmrep.replication.blocks")
    if blocks is not None:
        blocks.reset_stop()
    if was:
        logging.disable(logging.NOTSET)


@contextmanager
def handled() -> Iterator[None]:
    """Stop signals handled as above for the duration of one command. Only in the main
    thread (signals can only be handled there); elsewhere (a test runner's thread) the
    block runs with whatever handlers are in place."""
    _reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # pragma: no cover - not the main thread after all
        old_fd = None
    for s in STOP_SIGNALS:
        signal.signal(s, _on_signal)
    threading.Thread(target=_watch, args=(r,), name="vmrep-signals", daemon=True).start()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if old_fd is not None:
            signal.set_wakeup_fd(old_fd)
        os.close(w)  # the watcher reads EOF and ends
        if _deadline is not None and not own_process:
            _deadline.cancel()
