"""Replication of every VPG of one protected site by one run: `replicate-site/<site>`.

`replicate/<vpg>` is one flow run (one process, ~200 MB) per VPG, and each cycle is ~10
task runs; 200 VPGs would need 200 processes and more task runs per second than the
Prefect server sustains here (~15-20). This flow cycles all VPGs protected at `site` in
one process:

- each VPG on its own interval (a sixth of its RPO target, 5-60 s, as replicate/<vpg>;
  or `interval_seconds` for all), the most overdue first;
- at most `max_parallel` cycles at once (a bounded pool of threads: the ThreadPoolTaskRunner
  below, and never more submitted than `max_parallel`);
- one coarse task run per VPG cycle (`tasks.replication.vpg_cycle`, retried as a whole on
  transient faults), whose steps run through the engine's direct runner in that thread
  (so ~1 task run per cycle, not ~10);
- a VPG whose cycle fails is logged with its one line by its task and cycled again at its
  next interval; the others go on;
- one writer per VPG: a VPG has at most one cycle in flight in this run, and runs of the
  deployment hand over as below (the journal's per-VPG lock is the backstop).

Hand-off between the runs of the deployment (two may be active, like replicate/<vpg>):
the new run starts up, then waits until every earlier run has ended; the earlier run
notices the later one (looked up every `HANDOFF_POLL_SECONDS`), submits no more cycles,
lets the ones in flight end, hands each VPG's next due time to the new run
(`flows.replicate.HandOff.hand_due`, a Prefect variable) and ends. The new run starts
each VPG's first cycle at that due time, so a renewal leaves no RPO gap beyond the
earlier run's drain."""

from __future__ import annotations

import heapq
import time
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import emitting
from flows.replicate import HandOff
from tasks.replication import vpg_cycle
from vmrep.config import VPG
from vmrep.replication import engine
from vmrep.runtime import get_runtime

HANDOFF_POLL_SECONDS = 2.0  # how often a run asks the API whether a later run has started
MAX_THREADS = 64  # the task runner's pool; `max_parallel` bounds what is submitted to it


def interval_for(rpo_target_seconds: float) -> float:
    """Seconds between checkpoints: a sixth of the RPO target, between 5 s and 60 s."""
    return float(min(60.0, max(5.0, round(rpo_target_seconds / 6.0))))


def site_vpgs(config: Any, site: str) -> list[VPG]:
    """The VPGs protected at `site`, in config order."""
    return [v for v in config.vpgs if v.protected_site == site]


def _wall(mono: float) -> str:
    return datetime.fromtimestamp(time.time() + (mono - time.monotonic()), timezone.utc).isoformat()


def _mono(iso: str) -> float:
    return time.monotonic() + (datetime.fromisoformat(iso).timestamp() - time.time())


@flow(name="replicate-site", task_runner=ThreadPoolTaskRunner(max_workers=MAX_THREADS))
def replicate_site(site: str, config: str = "vmrep.yaml", for_seconds: float | None = None,
                   cycles: int | None = None, interval_seconds: float | None = None,
                   max_parallel: int = 8) -> dict[str, Any]:
    """Replicate every VPG protected at `site`, each on its interval, for `for_seconds`
    (or until each VPG has taken `cycles` checkpoints). Returns per VPG the cycles done
    and failed."""
    log = get_run_logger()
    rt = get_runtime(config)
    if site not in rt.config.sites:
        raise ValueError(f"site {site!r} is not in the config (sites: {', '.join(rt.config.sites)})")
    # Served, retention is the recovery site's `retention/<site>` run's, as for replicate/<vpg>
    retention = HandOff.of_this_run() is None
    vpgs: dict[str, float] = {}
    for v in site_vpgs(rt.config, site):
        try:
            engine.ensure_replicable(rt, v, retention=retention)
        except Exception as exc:  # noqa: BLE001 - one VPG not ready must not stop the site
            log.warning("VPG %s: not replicated by this run: %s", v.name, exc)
            continue
        vpgs[v.name] = interval_seconds or interval_for(v.rpo_target_seconds)
    if not vpgs:
        log.warning("site %s: no VPG to replicate", site)
        return {}
    if cycles is None and for_seconds is None:
        cycles = 1
    max_parallel = max(1, min(max_parallel, MAX_THREADS))
    now = time.monotonic()
    due = dict.fromkeys(vpgs, now)
    handoff = HandOff.of_this_run()
    if handoff is not None:
        waited = handoff.wait_for_earlier_runs(timeout=max(60.0, 6 * max(vpgs.values())))
        handed = handoff.handed_due()
        for name, at in handed.items():
            if name in due:
                due[name] = max(time.monotonic(), _mono(at))
        log.info("site %s: took over %d VPGs after %.2fs of waiting for the previous run (%d due times handed)",
                 site, len(vpgs), waited, len([n for n in handed if n in due]))
    with emitting(config, as_task=False):  # the cycles' alert and status changes, as events at the end
        start = time.monotonic()
        queue = [(t, n) for n, t in due.items()]
        heapq.heapify(queue)
        running: dict[str, tuple[float, Any]] = {}  # VPG -> (monotonic start, future)
        done = {n: {"cycles": 0, "failed": 0, "last_error": None} for n in vpgs}
        stopping, next_poll = False, time.monotonic() + HANDOFF_POLL_SECONDS

        def finished(name: str) -> bool:
            return cycles is not None and done[name]["cycles"] + done[name]["failed"] >= cycles

        while queue or running:
            now = time.monotonic()
            for name, (t0, fut) in list(running.items()):
                if not fut.wrapped_future.done():
                    continue
                del running[name]
                try:
                    s = fut.result()
                    done[name]["cycles"] += 1
                    log.debug("VPG %s: checkpoint %s, %.2fs", name, s["checkpoint"], s["seconds"])
                except Exception as exc:  # noqa: BLE001 - the task logged its line; the VPG goes on
                    done[name]["failed"] += 1
                    done[name]["last_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if not finished(name):
                    heapq.heappush(queue, (max(now, t0 + vpgs[name]), name))
            if handoff is not None and not stopping and now >= next_poll:
                next_poll = now + HANDOFF_POLL_SECONDS
                if handoff.later_run_started():
                    stopping = True
                    log.info("site %s: a later run takes over; ending after the %d cycles in flight",
                             site, len(running))
            if for_seconds is not None and now - start >= for_seconds:
                stopping = True
            if stopping:
                if not running:
                    break
            else:
                while queue and queue[0][0] <= now and len(running) < max_parallel:
                    _, name = heapq.heappop(queue)
                    running[name] = (now, vpg_cycle.submit(config, name, retention))
            if running or stopping:
                time.sleep(0.1)  # a cycle may end any moment: look again soon
            else:
                nearest = queue[0][0] if queue else now + 1.0
                time.sleep(max(0.01, min(nearest, next_poll, now + 1.0) - time.monotonic()))
        if handoff is not None and stopping:
            # The next cycle of each VPG, due as its interval says: the next run starts it then.
            nxt = {n: _wall(t) for t, n in queue}
            handoff.hand_due(nxt)
    log.info("site %s: %d cycles, %d failed, over %.1fs", site, sum(d["cycles"] for d in done.values()),
             sum(d["failed"] for d in done.values()), time.monotonic() - start)
    return done
