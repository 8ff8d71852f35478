"""The CLI's own overhead on a no-op replication cycle: the local Prefect server warm
against Prefect's ephemeral mode (a server started inside every command).

    .venv/bin/python bench/bench_cli.py [--repeat 3] [--out bench/out]

In a temporary VMREP_HOME: the two-site lab, `vmrep sync erp` (the first operation: it
starts the local server), then `--repeat` times each, timed from the outside as a user
sees it (process start to exit):

- warm: `vmrep replicate erp --cycles 1` against the running local server;
- ephemeral: the same with VMREP_LOCAL_SERVER=off (Prefect's ephemeral mode, what every
  operation paid before the local server; after one untimed run, so its database is
  already migrated and only its per-command start is measured);
- import floor: `python -c "import vmrep.cli, flows.replicate"` (Python, Prefect and vmrep
  loaded, nothing run): the part of a command that no server can save.

Nothing changes on the idle VPG, so the cycle itself is a fraction of a second (its own
time is printed by the command and shown as "cycle"); the rest is overhead. Prints the
medians and the ratio ephemeral / warm. Not part of pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab import manage  # noqa: E402

CLI = [sys.executable, "-c", "from vmrep.cli import entry; entry()"]


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def server_cpu(home: Path) -> float:
    """CPU seconds of the local server's process tree so far (0 when there is none)."""
    import psutil

    from deployments import server as srvmod

    srv = srvmod.current(home / "prefect")
    if srv is None:
        return 0.0
    total = 0.0
    root = psutil.Process(srv.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (the command and what it waited for, e.g. an ephemeral
    server; plus the local server's share while it ran), its output."""
    home = Path(env["VMREP_HOME"])
    c0, s0 = children_cpu(), server_cpu(home)
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    cpu = children_cpu() - c0 + max(0.0, server_cpu(home) - s0)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args[3:])} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return took, cpu, r.stdout


def cycle_seconds(out: str) -> float:
    m = re.search(r"stored \d+ bytes, ([0-9.]+)s", out)
    return float(m.group(1)) if m else float("nan")


def series(args: list[str], env: dict[str, str], repeat: int) -> dict[str, Any]:
    walls, cpus, cycles = [], [], []
    for _ in range(repeat):
        took, cpu, out = run(args, env)
        walls.append(took)
        cpus.append(cpu)
        cycles.append(cycle_seconds(out))
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "cycle": statistics.median(cycles),
            "samples": walls}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmrep-bench-cli-"))
    home = work / "home"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VMREP_"))}
    base.update(VMREP_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    warm_env = {**base, "PREFECT_HOME": str(work / "client")}
    # Prefect's own 20 s limit is what a fresh ephemeral database fails on; the untimed
    # first run gets time to migrate it.
    eph_env = {**base, "PREFECT_HOME": str(work / "ephemeral"), "VMREP_LOCAL_SERVER": "off",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    lab = manage.up(base=work / "lab", config_path=work / "vmrep.yaml")
    cfg = ["-c", str(lab.config_path)]
    replicate = [*CLI, "replicate", "erp", "--cycles", "1", *cfg]
    try:
        first, first_cpu, _ = run([*CLI, "sync", "erp", *cfg], warm_env)
        warm = series(replicate, warm_env, a.repeat)
        run(replicate, eph_env)  # untimed: migrates the ephemeral database
        eph = series(replicate, eph_env, a.repeat)
        floor = series([sys.executable, "-c", "import vmrep.cli, flows.replicate"], base, a.repeat)
    finally:
        subprocess.run([*CLI, "server", "stop"], cwd=REPO, env=warm_env, capture_output=True, timeout=120)
        manage.down(base=work / "lab")
    ratio = eph["wall"] / warm["wall"]
    rows = [
        ("first operation (vmrep sync, local server started)", first, first_cpu, None),
        ("no-op cycle, local server warm", warm["wall"], warm["cpu"], warm["cycle"]),
        ("no-op cycle, Prefect ephemeral mode", eph["wall"], eph["cpu"], eph["cycle"]),
        ("import floor (Python + Prefect + vmrep)", floor["wall"], floor["cpu"], None),
    ]
    load = os.getloadavg()[0]
    print(f"\nCLI overhead, `vmrep replicate erp --cycles 1` on an idle VPG (median of {a.repeat}; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs)")
    print(f"  {'':<52} {'wall s':>7} {'CPU s':>7}")
    for name, wall, cpu, cyc in rows:
        print(f"  {name:<52} {wall:7.2f} {cpu:7.2f}" + (f"   (cycle {cyc:.2f} s)" if cyc is not None else ""))
    print(f"  ephemeral / warm: {ratio:.1f}x wall, {eph['cpu'] / warm['cpu']:.1f}x CPU; "
          f"warm target < 3 s: {'met' if warm['wall'] < 3 else 'NOT met'}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cli.json").write_text(json.dumps({"first": first, "warm": warm, "ephemeral": eph, "floor": floor,
                                                "ratio": ratio, "load": load, "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
