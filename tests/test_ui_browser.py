"""The Prefect UI driven in a real browser (Debian's Chromium under Playwright), as an
operator uses it, against a real Prefect server serving every deployment on the lab:

* Deployments › dr-test › Run › Custom run, pick the VPG, Submit, follow the toast to the
  flow run, wait until it shows Completed, open its report artifact and follow the link;
* a live failover of a VPG with `approval: required` waits Paused; the Resume form refuses
  another VPG's name (the run stays paused) and accepts the right one; the record says who
  requested and who approved.

Screenshots of every step are kept in build/test-output/ui/*.png. Every wait is on a
condition (a locator, a run state), never a fixed sleep; the timeouts only bound a failure.
If a deployment hands its run to another (per-site) deployment, the test follows the child.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID

import pytest
import yaml

from serving import forget_prefect_workers
from browser import launch_chromium, served_deployments, wait_for
from test_recovery import synced
from vmrep.recovery import operations as ops

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "build" / "test-output" / "ui"
# Bounds for a failure only: on a loaded 2-core machine a run's process alone can take 20 s.
RUN_TIMEOUT = 240.0
UI_TIMEOUT_MS = 60_000


def approval_config(lab: Any, work: Path, vpg: str = "erp") -> Path:
    """The lab's vmrep.yaml with `approval: required` on `vpg`, next to the original."""
    cfg = yaml.safe_load(lab.config_path.read_text())
    for v in cfg["vpgs"]:
        if v["name"] == vpg:
            v["approval"] = "required"
    path = lab.config_path.with_name("vmrep-approval.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(lab, tmp_path_factory) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """erp synced (through the engine: seconds), a Prefect server, `serve` of every deployment."""
    synced(lab.runtime(), "erp")
    work = tmp_path_factory.mktemp("ui")
    config = approval_config(lab, work)
    with served_deployments(config, work) as st:
        st["config"] = config
        yield st


@pytest.fixture(scope="module")
def client(stack):  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack["srv"].api_url}), get_client(sync_client=True) as c:
        def registered() -> Any:
            assert stack["proc"].poll() is None, f"serve exited:\n{stack['log'].read_text()[-3000:]}"
            try:
                return c.read_deployment_by_name("failover/live-failover")
            except Exception:  # noqa: BLE001 - not registered yet
                return None

        wait_for("the deployments", registered, 180)
        yield c
    forget_prefect_workers()  # whatever ran in this process under this module's server


@pytest.fixture
def page(stack) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(UI_TIMEOUT_MS)
            yield pg
        finally:
            browser.close()


def shot(pg: Any, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    pg.screenshot(path=str(path))
    return path


def children(client: Any, run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return list(client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))))


def the_run(client: Any, run_id: UUID) -> Any:
    """The run doing the work: the submitted one, or the run it handed over to (a child
    run of another deployment), followed down."""
    run = client.read_flow_run(run_id)
    while kids := children(client, run.id):
        run = max(kids, key=lambda r: r.created)
    return run


def finished(client: Any, run_id: UUID) -> Any:
    """Wait until the submitted run and the run doing the work are both final."""
    def done() -> Any:
        top = client.read_flow_run(run_id)
        work = the_run(client, run_id)
        return top.state.is_final() and work.state.is_final() and work
    return wait_for("the run to finish", done, RUN_TIMEOUT)


def state_badge(pg: Any, name: str) -> Any:
    return pg.locator(".state-badge").filter(has_text=re.compile(rf"^\s*{name}\s*$")).first


def schema_field(scope: Any, pg: Any, label: str) -> Any:
    """The schema form's property whose label starts with `label`."""
    return scope.locator(".schema-form-property").filter(
        has=pg.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)}"))).first


def run_id_of(pg: Any) -> UUID:
    m = re.search(r"/runs/flow-run/([0-9a-f-]{36})", pg.url)
    assert m, f"not on a flow run page: {pg.url}"
    return UUID(m.group(1))


def submit_the_form(pg: Any, client: Any, run_name: str) -> None:
    """Submit, as the operator clicks it. The app returns to the deployment's runs with a
    toast naming the new run (followed by its name in the list: the toast's own button
    races the app's navigation). In the full suite the first click has twice met the
    app's "Oops. Something went wrong." toast, the form still there (alone, never); an
    operator clicks again. So: if the server has no run of that name, the click is
    repeated once (a second click can never make a second DR test); the page and the
    requests that failed are kept (05-submit-failed.png / .txt)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    failed: list[str] = []
    pg.on("response", lambda r: failed.append(f"{r.status} {r.request.method} {r.url}") if r.status >= 400 else None)
    pg.on("pageerror", lambda e: failed.append(f"page error: {e}"))
    toast = pg.get_by_text(f"{run_name} scheduled", exact=False).first
    oops = pg.get_by_text("Something went wrong", exact=False).first
    submit = pg.get_by_role("button", name="Submit", exact=True)
    submit.click()
    toast.or_(oops).wait_for(timeout=60_000)
    if toast.is_visible():
        return
    shot(pg, "05-submit-failed")
    (SHOTS / "05-submit-failed.txt").write_text("\n".join(failed) + "\n")
    if client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]))):
        pg.go_back()  # submitted after all: on to the deployment's runs, as the app would go
        return
    submit.click()  # the error toast may stay up: only the new run's toast counts now
    try:
        toast.wait_for(timeout=60_000)
    except Exception as exc:  # noqa: BLE001 - playwright's TimeoutError, with what failed
        raise AssertionError(f"Submit made no run {run_name!r} in two clicks; failed requests: {failed}") from exc


@pytest.mark.timeout(600)
def test_dr_test_from_the_ui_completes_and_shows_its_report_artifact(stack, client, page) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    pg, ui = page, stack["srv"].ui_url
    pg.goto(f"{ui}/deployments")
    pg.get_by_placeholder("Search deployments").fill("dr-test")
    # the deployment's link (the row also links the flow, of the same name)
    link = pg.locator("a[href*='/deployments/deployment/']").filter(has_text=re.compile(r"^\s*dr-test\s*$")).first
    link.wait_for()
    shot(pg, "01-deployments")
    link.click()

    run_button = pg.get_by_role("button", name="Run", exact=True)
    run_button.click()
    custom = pg.get_by_text("Custom run", exact=True)
    custom.wait_for()
    shot(pg, "02-deployment-run-menu")
    custom.click()

    # The VPG drop-down lists the configured VPGs (the parameter schema's enum).
    vpg = schema_field(pg, pg, "VPG").locator(".p-select-button__control")
    vpg.wait_for()
    shot(pg, "03-custom-run-form")
    vpg.focus()
    pg.keyboard.press("ArrowDown")  # opens the list (a click toggles it before the app is ready)
    options = pg.get_by_role("option")
    options.first.wait_for()
    assert sorted(o.strip() for o in options.all_inner_texts()) == ["erp", "files"]
    pg.get_by_role("option", name="erp", exact=True).click()
    expect(vpg).to_have_text(re.compile(r"^\s*erp\s*$"), timeout=15_000)  # the app re-renders on its next tick
    shot(pg, "04-vpg-picked")

    run_name = pg.locator(".p-label").filter(has_text="Run Name").locator("input").first.input_value()
    assert run_name
    submit_the_form(pg, client, run_name)
    pg.wait_for_url(re.compile(r"/deployments/deployment/[^/?]+(\?.*)?$"))
    new_run = pg.get_by_role("link", name=run_name, exact=True).first
    new_run.wait_for()  # the deployment's page lists it (the URL changes before the page does)
    shot(pg, "05-submitted")
    new_run.click()
    pg.wait_for_url(re.compile(r"/runs/flow-run/"))
    submitted = run_id_of(pg)
    params = client.read_flow_run(submitted).parameters
    assert params["vpg"] == "erp"

    work = finished(client, submitted)
    assert work.state.is_completed(), f"{work.name}: {work.state.type} {work.state.message}"
    if work.id != submitted:  # handed over: the report is on the run that did the work
        pg.goto(f"{ui}/runs/flow-run/{work.id}")
    state_badge(pg, "Completed").wait_for()  # the page follows the run's state by itself
    shot(pg, "06-completed")

    pg.get_by_role("tab", name="Artifacts").or_(pg.get_by_text("Artifacts", exact=True)).first.click()
    card = pg.get_by_text("dr-test-erp-html", exact=True)
    card.wait_for()
    assert pg.get_by_text("dr-test-erp", exact=True).count() >= 1  # the table of key figures
    shot(pg, "07-artifacts")
    card.click()
    report = pg.locator("a[href^='file://']").first
    report.wait_for()
    shot(pg, "08-report-link")
    html = Path(report.get_attribute("href").removeprefix("file://"))
    assert html.parent == stack["reports"] and html.name.startswith("dr-test-erp-"), html
    assert "erp" in html.read_text() and "PASS" in html.read_text()


@pytest.mark.timeout(600)
def test_live_failover_waits_for_approval_in_the_resume_form(lab, stack, client, page) -> None:  # type: ignore[no-untyped-def]
    from prefect.client.schemas.objects import StateType

    pg, ui = page, stack["srv"].ui_url
    dep = client.read_deployment_by_name("failover/live-failover")
    fr = client.create_flow_run_from_deployment(dep.id, parameters={
        "vpg": "erp", "confirm": "erp", "commit_policy": "none", "who": "anna-requester"})
    paused = wait_for("the failover to pause for approval",
                      lambda: (r := the_run(client, fr.id)).state.is_paused() and r, RUN_TIMEOUT)
    assert paused.state.is_paused()
    rt = lab.runtime()
    assert rt.store.runtime("erp").lock_holder is None  # nothing held or changed while it waits

    pg.goto(f"{ui}/runs/flow-run/{paused.id}")
    state_badge(pg, "Paused").wait_for()
    shot(pg, "10-failover-paused")
    pg.get_by_role("button", name="Resume").click()
    dialog = pg.get_by_role("dialog")

    def fill(approver: str, vpg: str, reason: str) -> None:
        for label, value in (("Approver", approver), ("VPG", vpg), ("Reason", reason)):
            schema_field(dialog, pg, label).locator("textarea, input").first.fill(value)

    fill("bob-approver", "files", "INC-4711 site A lost")
    shot(pg, "11-resume-form-wrong-vpg")
    dialog.get_by_role("button", name="Submit").click()
    refusal = pg.get_by_text(re.compile(r"'files' does not match")).first
    refusal.wait_for()
    shot(pg, "12-resume-refused")
    assert client.read_flow_run(paused.id).state.type == StateType.PAUSED

    def resumed() -> bool:
        return not client.read_flow_run(paused.id).state.is_paused()

    fill("bob-approver", "erp", "INC-4711 site A lost")
    dialog.get_by_role("button", name="Submit").click()
    try:
        wait_for("the approval to resume the run", resumed, 30)
    except AssertionError:
        # Seen once in six runs on the loaded machine: the dialog stayed open with the run
        # still paused after the second Submit (cause not found in the UI's code). Kept as
        # a picture, and submitted once more as a person would.
        shot(pg, "12b-second-submit-not-taken")
        fill("bob-approver", "erp", "INC-4711 site A lost")
        dialog.get_by_role("button", name="Submit").click()
        wait_for("the approval to resume the run", resumed, 60)
    dialog.wait_for(state="hidden")  # the UI closes the form once the server accepted it
    work = finished(client, fr.id)
    assert work.state.is_completed(), f"{work.state.type} {work.state.message}"
    state_badge(pg, "Completed").wait_for()
    shot(pg, "13-approved-completed")

    op = next(o for o in rt.store.operations("erp") if o.kind == "failover")
    summary = ops.operation_summary(rt.store, op.id)
    assert summary["flow_run_id"] == str(paused.id) and summary["result"] == "succeeded"
    approval = summary["approval"]
    assert approval["requested_by"] == "anna-requester" == summary["started_by"]
    assert approval["approved_by"] == "bob-approver" and approval["reason"] == "INC-4711 site A lost"
    requested, approved = (datetime.fromisoformat(approval[k]) for k in ("requested_at", "approved_at"))
    started = op.started_at if op.started_at.tzinfo else op.started_at.replace(tzinfo=timezone.utc)
    assert requested < approved <= started  # approved before anything started
    ops.rollback(str(stack["config"]), "erp", who="ui-test clean-up")
