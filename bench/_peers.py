"""Helpers for benchmarks that run peer tools (borg, restic, rsync) side by side with vmrep."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

PEER_PACKAGES = {"borg": "borgbackup", "restic": "restic", "rsync": "rsync"}


def ensure_peers(tools: list[str]) -> list[str]:
    """Install missing peers with apt-get (as root); return the ones still missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        pkgs = [PEER_PACKAGES[t] for t in missing]
        print(f"installing {' '.join(pkgs)} ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return [t for t in tools if shutil.which(t) is None]


def peer_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BORG_BASE_DIR=str(work / "borg-home"),
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_PASSPHRASE="",
        RESTIC_PASSWORD="bench",
        RESTIC_CACHE_DIR=str(work / "restic-cache"),
        XDG_CACHE_HOME=str(work / "cache"),
    )
    return env


def run(cmd: list[str], env: dict[str, str], *, cwd: Path | None = None,
        on_start=None, on_end=None) -> tuple[float, str]:
    """Run a command, return (wall seconds, stdout+stderr). Raises on failure.

    Dirty pages left by the previous tool are written out first (`sync`, not timed), so
    no tool pays for another's writeback."""
    os.sync()
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - t0
    if on_end is not None:
        on_end()
    if p.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}")
    return dt, p.stdout


def du(path: Path) -> int:
    """Bytes allocated under a path (like du -s --block-size=1)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def drop_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
