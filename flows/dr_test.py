"""Test failover (named dr_test: pytest would collect a flows/test_failover.py).

`dr_test` runs start -> verify -> keep -> stop; `dr_test_start` leaves the test running
for people to look at and `dr_test_stop` ends it. Every step is a task run; clean-up is
in the engine's exception path, in the cancel/crash hooks below, and redone by the next
operation on the VPG (its first step removes leftovers)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import cancel_handed_over, drain_events, emitting, flow_run_id, hand_off
from flows.reports import dr_test_report
from tasks.recovery import PrefectRunner
from vmrep.recovery import operations as ops
from vmrep.stamps import started_by


def interrupted(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation / on_crashed: clean up what this run's operation left (the next
    operation on the VPG would find it too); a cancelled UI entry cancels the run it
    handed over to."""
    params = flow_run.parameters or {}
    config = params.get("config", "vmrep.yaml")
    if state.is_cancelling() or state.is_cancelled():
        cancel_handed_over(flow, flow_run, state)  # a UI entry: the run it handed over to, too
    try:
        ops.after_flow_interrupted(config, params["vpg"], str(flow_run.id), f"flow run {state.name}")
    finally:
        drain_events(config)  # what the run and its clean-up recorded, as events now


def _raise_if_failed(summary: dict[str, Any]) -> dict[str, Any]:
    if summary.get("success") is False:
        reason = summary.get("error") or "not successful"
        raise ops.TestFailed(f"VPG {summary['vpg']}: test failed ({reason}); test VMs removed", summary)
    return summary


@flow(name="dr-test", task_runner=ThreadPoolTaskRunner(max_workers=8),
      on_cancellation=[interrupted], on_crashed=[interrupted])
def dr_test(vpg: str, config: str = "vmrep.yaml", checkpoint: str = "latest", keep_minutes: float = 0.0,
            notes: str | None = None, who: str | None = None, verify_timeout: float = 600.0) -> dict[str, Any]:
    """Test failover of a VPG into its test network: start, verify, keep, stop."""
    if (handed := hand_off(config, vpg, "recovery")) is not None:  # on the recovery site's pool
        return handed
    summary: dict[str, Any] = {}
    try:
        with emitting(config):  # e.g. TEST_OVERDUE cleared, TEST_CLEANUP_FAILED raised
            summary = ops.run_test(config, vpg, checkpoint=checkpoint, keep_minutes=keep_minutes, notes=notes,
                                   who=started_by(who, fallback="prefect"), flow_run_id=flow_run_id(),
                                   runner=PrefectRunner(), verify_timeout=verify_timeout)
        return _raise_if_failed(summary)
    finally:
        # Reports (flows/reports.py): after every test, passed or failed, write the DR-test
        # report, publish it as Prefect artifacts and email it. Never raises.
        dr_test_report(config, summary.get("operation_id"))


@flow(name="dr-test-start", task_runner=ThreadPoolTaskRunner(max_workers=8),
      on_cancellation=[interrupted], on_crashed=[interrupted])
def dr_test_start(vpg: str, config: str = "vmrep.yaml", checkpoint: str = "latest", notes: str | None = None,
                  who: str | None = None, verify_timeout: float = 600.0) -> dict[str, Any]:
    """Start a test and leave it running (stop it with dr-test-stop)."""
    if (handed := hand_off(config, vpg, "recovery")) is not None:  # on the recovery site's pool
        return handed
    with emitting(config):
        return ops.run_test(config, vpg, checkpoint=checkpoint, notes=notes, who=started_by(who, fallback="prefect"),
                            flow_run_id=flow_run_id(), runner=PrefectRunner(), stop=False,
                            verify_timeout=verify_timeout)


@flow(name="dr-test-stop", task_runner=ThreadPoolTaskRunner(max_workers=8), on_cancellation=[cancel_handed_over])
def dr_test_stop(vpg: str, success: bool, config: str = "vmrep.yaml", notes: str | None = None,
                 who: str | None = None) -> dict[str, Any]:
    """Stop the VPG's running test: record success and notes, remove test VMs and scratch copies."""
    if (handed := hand_off(config, vpg, "recovery")) is not None:  # on the recovery site's pool
        return handed
    summary: dict[str, Any] = {}
    try:
        with emitting(config):
            summary = ops.stop_test(config, vpg, success=success, notes=notes,
                                    who=started_by(who, fallback="prefect"), runner=PrefectRunner())
        return summary
    finally:
        # Reports (flows/reports.py): the test ends here, so its report is sent now. Never raises.
        dr_test_report(config, summary.get("operation_id"), vpg=vpg)
