"""Continuous replication: cycles back to back for a bounded time or count, so a
deployment can run it again right after. Each cycle is `engine.run_cycle` with its
steps as task runs; the cycle's wall time is returned next to its slowest transfer, so
the Prefect overhead of each cycle is visible.

Hand-off between the runs of a deployment (no RPO gap across a flow's start): the
deployment lets two runs be active, and its schedule starts the next run while the last
one still cycles. The new run does its start-up (a process of its own, imports, the
runtime), then waits until every earlier run of the deployment has ended; an earlier run
checks right after each cycle whether a later run of its deployment is running, and if
so hands over (`HandOff.hand_due`: the next cycle's due time, in a Prefect variable
naming the successor) and ends. The new run goes on as soon as it reads that hand-over
(or sees no earlier run running) and starts its first cycle at the due time: the
checkpoints keep their interval across the hand-off as long as the hand-over reaches the
new run within an interval minus a cycle, and there are never two writers at once (the journal's per-VPG file lock taken
by each cycle is the backstop). `flows/replicate_site.py` hands over the same way.
Outside a deployment (the CLI, tests) nothing of this applies."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import emitting
from tasks.replication import PrefectRunner
from vmrep.replication import engine, steps
from vmrep.runtime import get_runtime


class HandOff:
    """This run and the other runs of its deployment (see the module's docstring)."""

    def __init__(self, deployment_id: str, run_id: str) -> None:
        self.deployment_id, self.run_id = deployment_id, run_id
        self.started: Any = None
        self.successors: list[str] = []  # the later runs seen, that hand_due hands over to

    @classmethod
    def of_this_run(cls) -> HandOff | None:
        from prefect.runtime import deployment, flow_run

        if not deployment.id or not flow_run.id:
            return None
        return cls(str(deployment.id), str(flow_run.id))

    def _others(self) -> list[Any]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterDeploymentId,
            FlowRunFilterId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        with get_client(sync_client=True) as client:
            if self.started is None:
                self.started = client.read_flow_run(self.run_id).start_time
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[self.deployment_id]),
                id=FlowRunFilterId(not_any_=[self.run_id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))

    def _earlier(self, other: Any) -> bool:
        return other.start_time is not None and self.started is not None and (
            (other.start_time, str(other.id)) < (self.started, self.run_id))

    def later_runs(self) -> list[str]:
        """The runs of this deployment that started after this one and are running."""
        try:
            return [str(r.id) for r in self._others() if not self._earlier(r)]
        except Exception:  # noqa: BLE001 - the API away for a moment: keep replicating
            return []

    def later_run_started(self) -> bool:
        """A run of this deployment started after this one and is running: hand over."""
        self.successors = self.later_runs()
        return bool(self.successors)

    def wait_for_earlier_runs(self, timeout: float, every: float = 0.25) -> float:
        """Until an earlier run has handed over to this one (`hand_due`, written once its
        last cycle has ended: it writes no more, though its end may take seconds to show),
        or no earlier run of this deployment is running (or `timeout`: an earlier run that
        crashed may still show as running; the journal lock still guards). Returns the
        seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if self._handed() is not None:
                    break
                if not any(self._earlier(r) for r in self._others()):
                    break
            except Exception:  # noqa: BLE001 - try again
                pass
            time.sleep(every)
        return time.monotonic() - t0

    # The hand-over itself, from the run that ends to the run that takes over: a Prefect
    # variable per deployment naming the successor(s) and each VPG's next due time. The
    # successor starts as soon as it reads it, instead of waiting until the old run's end
    # shows in the API (Prefect's state propagation: seconds under load), and starts its
    # first cycle when the old one's next was due. Wall-clock times (ISO, UTC): the two
    # runs may be on two machines of one pool.

    @property
    def _variable(self) -> str:
        return f"vmrep-handoff-{self.deployment_id}"

    def hand_due(self, due: dict[str, str]) -> None:
        """Hand over to the later runs seen by `later_run_started`: each VPG's next due
        time (name -> ISO time). Call it only once this run writes nothing more."""
        from prefect.variables import Variable

        try:
            Variable.set(self._variable, {"from": self.run_id, "to": list(self.successors), "due": due},
                         overwrite=True)
        except Exception:  # noqa: BLE001 - the next run then starts once this one's end shows
            pass

    def _handed(self) -> dict[str, Any] | None:
        from prefect.variables import Variable

        v = Variable.get(self._variable, default=None)
        if isinstance(v, dict) and self.run_id in (v.get("to") or []) and isinstance(v.get("due"), dict):
            return v
        return None

    def handed_due(self) -> dict[str, str]:
        """What an earlier run handed over to this one (empty when none did)."""
        try:
            v = self._handed()
        except Exception:  # noqa: BLE001 - nothing handed: start now
            return {}
        return {} if v is None else {str(k): str(t) for k, t in v["due"].items()}


def _wall(mono: float) -> str:
    """A monotonic instant of this process as an ISO wall-clock time (UTC)."""
    return datetime.fromtimestamp(time.time() + (mono - time.monotonic()), timezone.utc).isoformat()


def _seconds_until(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp() - time.time()
    except ValueError:
        return 0.0


def run_cycle(config: str, vpg: str, tag: str | None = None, retention: bool = True) -> dict[str, Any]:
    rt = get_runtime(config)
    return engine.run_cycle(rt, rt.config.vpg(vpg), tag=tag, runner=PrefectRunner(),
                            retention=retention).summary()


@flow(name="replicate", task_runner=ThreadPoolTaskRunner(max_workers=4))
def replicate(vpg: str, config: str = "vmrep.yaml", cycles: int | None = None,
              for_seconds: float | None = None, interval_seconds: float = 10.0) -> list[dict[str, Any]]:
    """Replicate a VPG: cycles every `interval_seconds`, `cycles` times or for `for_seconds`."""
    rt = get_runtime(config)
    v = rt.config.vpg(vpg)
    # Served (a deployment's run, on the protected site's pool), retention is not this
    # run's: the recovery site's `retention/<site>` deployment applies it where the journal
    # is (flows/retention.py). Run in process (tests, one machine) it follows each cycle.
    retention = HandOff.of_this_run() is None
    engine.ensure_replicable(rt, v, retention=retention)
    if cycles is None and for_seconds is None:
        cycles = 1
    log = get_run_logger()
    handoff = HandOff.of_this_run()
    if handoff is not None:
        # Warm up while the previous run still cycles: the vSphere login and the collector's
        # container views, so the first cycle after the take-over is as quick as any other.
        # A read only (no task run: nothing is written), and a failure here is the cycle's.
        try:
            steps.read_vpg_inventory(config, vpg)
        except Exception as exc:  # noqa: BLE001 - the first cycle reports it, with its retries
            log.warning("VPG %s: warm-up read failed (%s); the first cycle will try again", vpg, exc)
        waited = handoff.wait_for_earlier_runs(timeout=max(60.0, 6 * interval_seconds))
        handed = handoff.handed_due().get(vpg)
        ahead = _seconds_until(handed) if handed else 0.0
        log.info("VPG %s: took over replication after %.2fs of waiting for the previous run; its next cycle "
                 "is due in %.2fs", vpg, waited, ahead)
        time.sleep(max(0.0, ahead))  # the cycle the previous run would have started now
    with emitting(config, as_task=False):  # what the cycles recorded (alerts, status), as events at the end
        start = time.monotonic()
        out: list[dict[str, Any]] = []
        while True:
            c0 = time.monotonic()
            out.append(run_cycle(config, vpg, retention=retention))
            log.info("VPG %s: checkpoint %s, %d blocks changed, %.2fs", vpg, out[-1]["checkpoint"],
                     out[-1]["blocks_changed"], out[-1]["seconds"])
            if cycles is not None and len(out) >= cycles:
                break
            if for_seconds is not None and time.monotonic() - start + interval_seconds > for_seconds:
                break
            # Right after a cycle, not before the next: the later run then has the whole
            # interval to see this one end, and starts the next cycle when it is due.
            if handoff is not None and handoff.later_run_started():
                handoff.hand_due({vpg: _wall(c0 + interval_seconds)})
                log.info("VPG %s: a later run takes over; this one ends after %d cycles", vpg, len(out))
                break
            time.sleep(max(0.0, interval_seconds - (time.monotonic() - c0)))
    return out
