"""Retry units against the lab: the number of attempts belongs to the call, a refused
login is tried again for a moment, a silent site fails in one line."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import pytest

from vmrep.errors import ConnectionFailed
from vmrep.vsphere.connection import RetryPolicy, connect
from vmrep.vsphere.datastore import HttpDatastore

FAST = RetryPolicy(attempts=4, initial=0.01, maximum=0.05)
MiB = 1024 * 1024


def _held_stream(gate: threading.Event, started: threading.Event, size: int) -> Iterator[bytes]:
    """A one-shot stream that sends half, waits at the gate, then sends the rest."""
    yield bytes(size // 2)
    started.set()
    assert gate.wait(30), "the test never opened the gate"
    yield bytes(size - size // 2)


def test_streaming_puts_leave_other_threads_their_retries(lab) -> None:  # type: ignore[no-untyped-def]
    """Two overlapping one-shot PUTs (one attempt each) while another thread reads a
    file through two injected 503s: the read is still retried, and afterwards the
    client's shared policy is what it was."""
    ctl = lab.control("siteA")
    with connect(lab.config.sites["siteA"], retry=FAST) as c:
        ds = HttpDatastore(c, "DC0")
        policy = c.retry
        gates = [threading.Event(), threading.Event()]
        started = [threading.Event(), threading.Event()]
        errors: list[BaseException] = []

        def put(i: int) -> None:
            try:
                ds.write(f"[LocalDS_0] retry-units/stream-{i}.bin", _held_stream(gates[i], started[i], MiB), MiB)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        writers = [threading.Thread(target=put, args=(i,)) for i in (0, 1)]
        for w, s in zip(writers, started, strict=True):
            w.start()
            assert s.wait(10)
        # Both streams are in flight: a read that needs three attempts.
        ctl.fault("DatastoreFile.GET", "http503", count=2, match="erp-db")
        retries_before = c.stats.retries
        try:
            size = ds.size("[LocalDS_0] erp-db/disk0-flat.vmdk")
        finally:
            ctl.clear_faults()
        assert size > 0
        assert c.stats.retries - retries_before == 2
        # The first stream ends before the second (the order that left one attempt for good).
        gates[0].set()
        writers[0].join(30)
        gates[1].set()
        writers[1].join(30)
        assert errors == []
        assert c.retry is policy and c.retry.attempts == FAST.attempts
        assert ds.size("[LocalDS_0] retry-units/stream-1.bin") == MiB


def test_a_one_shot_stream_is_not_replayed(lab) -> None:  # type: ignore[no-untyped-def]
    """One attempt for the stream: its first transient failure is raised for its step."""
    from vmrep.errors import TransientError

    ctl = lab.control("siteA")
    with connect(lab.config.sites["siteA"], retry=FAST) as c:
        ds = HttpDatastore(c, "DC0")
        ctl.fault("DatastoreFile.PUT", "http503", count=1)
        try:
            with pytest.raises(TransientError, match="once.bin: HTTP 503"):
                ds.write("[LocalDS_0] retry-units/once.bin", iter([bytes(4096)]), 4096)
            # a list of chunks is sent again
            ctl.fault("DatastoreFile.PUT", "http503", count=1)
            ds.write("[LocalDS_0] retry-units/list.bin", [bytes(4096), bytes(10)], 4106)
        finally:
            ctl.clear_faults()
        assert ds.size("[LocalDS_0] retry-units/list.bin") == 4106


class _Forwarder:
    """A TCP port that forwards to the lab's site once opened (closed until then)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server: socket.socket | None = None

    def open(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.server is not None
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_a_refused_login_is_tried_again_until_the_port_opens(lab) -> None:  # type: ignore[no-untyped-def]
    site = lab.config.sites["siteA"]
    host, port = site.host.rsplit(":", 1)
    fwd = _Forwarder((host, int(port)))
    moved = site.model_copy(update={"host": f"127.0.0.1:{fwd.port}"})
    timer = threading.Timer(1.5, fwd.open)
    t0 = time.monotonic()
    timer.start()
    try:
        with connect(moved, retry=FAST) as c:
            assert c.content.about.name
        assert time.monotonic() - t0 >= 1.5
    finally:
        timer.cancel()
        fwd.close()


def test_a_port_that_stays_closed_fails_in_one_line(lab) -> None:  # type: ignore[no-untyped-def]
    site = lab.config.sites["siteA"]
    fwd = _Forwarder(("127.0.0.1", 1))  # never opened
    closed = site.model_copy(update={"host": f"127.0.0.1:{fwd.port}"})
    t0 = time.monotonic()
    with pytest.raises(ConnectionFailed) as e:
        connect(closed, retry=FAST, refused_window=1.0)
    assert time.monotonic() - t0 < 5
    assert str(e.value) == (f"site siteA (127.0.0.1:{fwd.port}): cannot connect: connection refused "
                            "(still refused after 1 s)")


def test_a_site_that_does_not_answer_fails_after_its_connect_timeout(lab) -> None:  # type: ignore[no-untyped-def]
    """A listener whose queue is full drops new connections: no answer, as from a site gone."""
    site = lab.config.sites["siteA"]
    silent = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = silent.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue (never accepted)
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        time.sleep(0.2)
        gone = site.model_copy(update={"host": f"127.0.0.1:{port}", "connect_timeout_seconds": 1.0})
        t0 = time.monotonic()
        with pytest.raises(ConnectionFailed) as e:
            connect(gone, retry=FAST)
        took = time.monotonic() - t0
        assert str(e.value) == f"site siteA (127.0.0.1:{port}): cannot connect: no answer within 1 s"
        assert took < 4
    finally:
        for f in fillers:
            f.close()
        silent.close()


# --------------------------------------------------------------------------------------
# commit-checkpoint: a retry after its first side effect finishes with one checkpoint


def _synced(rt, vpg: str) -> None:  # type: ignore[no-untyped-def]
    from vmrep.replication import engine

    if not rt.store.runtime(vpg).initial_sync_done:
        engine.initial_sync(rt, rt.config.vpg(vpg), validate=False)


def _flaky_note(monkeypatch: pytest.MonkeyPatch, store) -> list:  # type: ignore[no-untyped-def,type-arg]
    """note_checkpoint (the commit's second side effect) fails once, transiently."""
    from vmrep.errors import TransientError

    real, calls = store.note_checkpoint, []

    def flaky(vpg: str, at):  # type: ignore[no-untyped-def]
        calls.append(at)
        if len(calls) == 1:
            raise TransientError(f"VPG {vpg}: state database connection lost (injected)")
        return real(vpg, at)

    monkeypatch.setattr(store, "note_checkpoint", flaky)
    return calls


def test_commit_retried_after_its_publication_leaves_one_checkpoint(lab, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from vmrep.replication import engine
    from vmrep.replication.steps import STEPS
    from vmrep.runner import DirectRunner

    rt = lab.runtime()
    _synced(rt, "files")
    before = [c.id for c in rt.journal.checkpoints("files")]
    calls = _flaky_note(monkeypatch, rt.store)
    r = engine.run_cycle(rt, rt.config.vpg("files"), runner=DirectRunner(STEPS, delays=[0.01]))
    assert [c.id for c in rt.journal.checkpoints("files")] == before + [r.checkpoint_id]
    assert len(calls) == 2  # the retry noted the checkpoint its first try published
    assert rt.store.runtime("files").last_checkpoint_at == r.time


def test_commit_task_retried_in_the_flow_leaves_one_checkpoint(lab, prefect_harness, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from flows.replicate import replicate

    rt = lab.runtime()
    _synced(rt, "files")
    before = [c.id for c in rt.journal.checkpoints("files")]
    calls = _flaky_note(monkeypatch, rt.store)
    [cycle] = replicate("files", str(lab.config_path), cycles=1, interval_seconds=0)
    assert [c.id for c in rt.journal.checkpoints("files")] == before + [cycle["checkpoint"]]
    assert len(calls) == 2


def test_a_commit_that_finds_no_open_checkpoint_says_so_in_one_line(lab) -> None:  # type: ignore[no-untyped-def]
    from vmrep.errors import JournalError
    from vmrep.replication.steps import commit_checkpoint

    with pytest.raises(JournalError) as e:
        commit_checkpoint(str(lab.config_path), "files", "c0ffee", None, None, {"kind": "cycle"})
    assert str(e.value) == ("VPG files: no open checkpoint of cycle c0ffee in this process and none published "
                            "(its commit failed, or its steps ran in another process); the next cycle takes it again")
