"""Pre- and post-recovery scripts: a local command with a timeout.

The command is split like a shell would split it (no shell runs it: for pipes or
redirections write `sh -c '…'`). It gets the environment of vmrep plus
VMREP_VPG, VMREP_OPERATION (test, failover, move), VMREP_OPERATION_ID,
VMREP_CHECKPOINT (id), VMREP_CHECKPOINT_TIME and VMREP_PHASE (pre, post). A non-zero
exit or the timeout fails the step; on timeout the script's whole process group is killed.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from typing import Any

from vmrep.config import Script
from vmrep.errors import VmrepError


def run_script(script: Script, *, vpg: str, operation: str, operation_id: str, checkpoint: str,
               checkpoint_time: str, phase: str, cwd: str | None = None) -> dict[str, Any]:
    what = f"VPG {vpg}: {phase}-recovery script"
    try:
        args = shlex.split(script.command)
    except ValueError as exc:
        raise VmrepError(f"{what}: cannot parse command {script.command!r}: {exc}") from None
    if not args:
        raise VmrepError(f"{what}: empty command")
    env = dict(os.environ, VMREP_VPG=vpg, VMREP_OPERATION=operation, VMREP_OPERATION_ID=operation_id,
               VMREP_CHECKPOINT=checkpoint, VMREP_CHECKPOINT_TIME=checkpoint_time, VMREP_PHASE=phase)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise VmrepError(f"{what}: cannot start {args[0]!r}: {exc.strerror or exc}") from None
    try:
        out, _ = proc.communicate(timeout=script.timeout_seconds)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise VmrepError(f"{what} timed out after {script.timeout_seconds:g}s: {script.command}") from None
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    text = out.decode("utf-8", "replace").strip()
    tail = text.splitlines()[-20:]
    result = {"command": script.command, "exit_code": proc.returncode,
              "seconds": round(time.monotonic() - t0, 3), "output": "\n".join(tail)[-4000:]}
    if proc.returncode != 0:
        last = tail[-1] if tail else "no output"
        raise VmrepError(f"{what} exited with code {proc.returncode}: {last}")
    return result
