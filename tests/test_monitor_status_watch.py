"""`vmrep status --watch` redraws its table in place until Ctrl-C, through a real
terminal (a pty): a status changed in the database while it runs shows up, the redraws
move the cursor back over the table (rich Live) instead of printing one table after
another, and Ctrl-C ends it with exit 0 and no traceback."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

from vmrep.state.store import StateStore

REPO = Path(__file__).resolve().parents[1]
VMREP = REPO / ".venv" / "bin" / "vmrep"


def read_until(fd: int, buf: bytearray, needle: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                buf += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return needle in buf


def test_status_watch_refreshes_in_place_and_ctrl_c_ends_it(lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rt = lab.runtime()
    rt.store.set_status("files", "MeetingSLA")
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm-256color",
           "VMREP_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([str(VMREP), "status", "--watch", "--interval", "0.5", "--config", str(lab.config_path)],
                            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path, start_new_session=True)
    os.close(slave)
    buf = bytearray()
    try:
        assert read_until(master, buf, b"refreshed", 120), buf.decode(errors="replace")
        assert b"Paused" not in buf
        first = len(buf)
        # a change in the database while it watches: shows up at a refresh
        with StateStore.open(rt.config.database_url) as store:
            store.set_status("files", "Paused", detail="test: paused while watching")
        assert read_until(master, buf, b"Paused", 30), buf[first:].decode(errors="replace")
        later = bytes(buf[first:])
        # redrawn in place: Live moves the cursor up over the previous table (CSI n A)
        # and erases lines (CSI 2K), rather than printing the table again below
        assert b"\x1b[1A" in later and b"\x1b[2K" in later, later[:400]
        read_until(master, buf, b"\x00never", 2.5)  # a few more refreshes, over more than a second
        captions = [line for line in buf.decode(errors="replace").splitlines() if "refreshed" in line]
        assert len({c.strip() for c in captions}) >= 2  # the time in the caption moves on
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the terminal sends it to the group
        code = proc.wait(timeout=20)
        read_until(master, buf, b"\x00never", 1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        os.close(master)
        rt.store.set_status("files", "MeetingSLA")
    text = buf.decode(errors="replace")
    assert code == 0, text[-2000:]
    assert "Traceback" not in text and "interrupted" not in text
