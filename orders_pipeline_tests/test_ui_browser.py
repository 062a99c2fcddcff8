"""The Dagster UI in a real headless browser: lineage, "Materialize all", a successful run,
the external queue and lookup tables in the lineage, and the queue's observation plots.

Debian's Chromium (`apt-get install chromium`; `.ci/run` installs it) is driven by the
Python `playwright` package with `executable_path`, so no browser is downloaded. The test
also checks in the UI that a password set in the environment shows as the name of its
variable, never as its value. Screenshots land in the test's temporary directory; with
ORDERS_UPDATE_SCREENSHOTS=1 they replace the ones in `orders_pipeline_tests/screenshots/`
that the README shows.
"""

import dataclasses
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from orders_pipeline.settings import Settings
from orders_pipeline_tests.dagit import ASSET_LINEAGE, EXTERNAL_ASSETS, REPLAY_ASSETS, Dagit

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
COMMITTED_SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
TIMEOUT_MS = 60_000
LOCATION = "orders_pipeline.definitions"  # the code location `workspace.yaml` loads
# Partitioned by month, in the group `dashboard_views`; the rest of the lineage is the group
# `orders_pipeline`.
VIEWS = ("sales_hourly", "product_performance_daily")
GROUP_ASSETS = [name for name in ASSET_LINEAGE if name not in VIEWS]
# The shared test Postgres trusts local logins, so any password works; this one must show
# in the UI only as POSTGRES_PASSWORD.
UI_SECRET = "ui-S3cret-never-shown"


@pytest.fixture
def dagit_settings(settings: Settings) -> Settings:
    """The test's settings with a Postgres password in Dagster's environment."""
    if settings.postgres.password:
        return settings
    return dataclasses.replace(settings, postgres=dataclasses.replace(
        settings.postgres, password=UI_SECRET))


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """A headless Chromium page; the last thing it showed is kept as tmp_path/last-page.png."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install chromium` as root "
                    "(.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)  # the UI polls; runs take seconds
            yield page
            page.screenshot(path=tmp_path / "last-page.png")
        finally:
            browser.close()


def _configured_values(dagit: Dagit, resource: str) -> dict[str, tuple[str, str]]:
    """What the resource page shows: key -> (value, VALUE or ENV_VAR)."""
    data = dagit.graphql("""query($s: ResourceSelector!) {
        topLevelResourceDetailsOrError(resourceSelector: $s) {
            ... on ResourceDetails { configuredValues { key value type } } } }""",
                         {"s": {"repositoryLocationName": LOCATION,
                                "repositoryName": "__repository__", "resourceName": resource}})
    values = data["topLevelResourceDetailsOrError"]["configuredValues"]
    return {v["key"]: (v["value"], v["type"]) for v in values}


def _run_log_messages(dagit: Dagit, run_id: str) -> str:
    data = dagit.graphql("""query($id: ID!) { logsForRun(runId: $id) {
        ... on EventConnection { events { ... on MessageEvent { message } } } } }""",
                         {"id": run_id})
    return "\n".join(e.get("message") or "" for e in data["logsForRun"]["events"])


def test_materialize_all_from_the_lineage_page(dagit: Dagit, dagit_settings: Settings,
                                               page: Page, tmp_path: Path) -> None:
    assert dagit_settings.postgres.password is not None
    secret = dagit_settings.postgres.password.get_secret_value()
    update = os.environ.get("ORDERS_UPDATE_SCREENSHOTS") == "1"
    screenshots = COMMITTED_SCREENSHOTS if update else tmp_path
    screenshots.mkdir(exist_ok=True)

    page.goto(f"{dagit.url}/asset-groups")  # the global asset lineage: a box per group
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    for group in ("orders_pipeline", "replay", "dashboard_views"):
        expect(page.get_by_text(group, exact=True).first).to_be_visible()

    # The pipeline's group: its lineage, and "Materialize all" runs it at once (the group
    # `replay`, partitioned by day, is materialized a day or a backfill at a time, and the
    # group `dashboard_views`, partitioned by month, a month or a range of months at a time;
    # promotion refreshes the months it changed).
    group_page = f"{dagit.url}/locations/{LOCATION}/asset-groups/orders_pipeline"
    page.goto(group_page)
    page.get_by_role("button", name="panel_show_left").click()  # the list of its assets
    assert set(VIEWS) <= set(ASSET_LINEAGE)
    for name in [*GROUP_ASSETS, *EXTERNAL_ASSETS]:
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    assert not set(REPLAY_ASSETS) & set(ASSET_LINEAGE)
    page.get_by_role("button", name=re.compile(r"Materialize all( \(\d+\))?$")).click()
    launched = page.get_by_role("link", name="View", exact=True)  # the "Launched run" toast
    expect(launched).to_have_attribute("href", re.compile(r"^/runs/[0-9a-f-]{36}$"))
    run_id = launched.get_attribute("href").rsplit("/", 1)[-1]
    assert dagit.wait_run(run_id) == dg.DagsterRunStatus.SUCCESS

    page.goto(f"{dagit.url}/runs/{run_id}")
    expect(page.get_by_text("RUN_SUCCESS", exact=True)).to_be_visible()  # its event log
    page.screenshot(path=screenshots / "run-success.png")

    page.goto(f"{dagit.url}/runs")
    # The runs list is a virtualized table: one `data-index` div per row.
    row = page.locator("[data-index]").filter(has=page.get_by_role("link", name=run_id[:8]))
    expect(row).to_contain_text("Success")

    # Back on the lineage page every asset is marked with a successful materialization.
    page.goto(group_page)
    page.get_by_role("button", name="panel_show_left").click()
    for name in GROUP_ASSETS:
        marked = re.compile(rf"^run_success {re.escape(name)}( |$)")  # not `{name}_rollup`
        expect(page.get_by_role("button", name=marked)).to_be_visible()
    page.goto(group_page)  # the graph alone, for the README
    expect(page.get_by_text("staged_orders", exact=True)).to_be_visible()
    page.screenshot(path=screenshots / "asset-lineage.png")

    # A view's months: one partition per UTC month, the current one included.
    month = datetime.now(UTC).strftime("%Y-%m")
    page.goto(f"{dagit.url}/assets/sales_hourly?view=partitions")
    expect(page.get_by_text(month, exact=True).first).to_be_visible()

    # The queue, observed by the daemon without any run: its plots and its checks.
    assert dagit.wait_observation("ingestion_queue", "queue_depth") == 0
    page.goto(f"{dagit.url}/assets/ingestion_queue?view=overview")
    expect(page.get_by_text("External Asset", exact=True)).to_be_visible()
    expect(page.get_by_text(f"the Redis list {dagit_settings.redis.key_prefix}:ingestion",
                            exact=False)).to_be_visible()
    page.get_by_role("button", name="Plots").click()  # Metadata: Table | Plots
    plotted = ("queue_depth", "oldest_queued_wait_seconds", "claimed_batches", "staged_batches",
               "in_flight_batches", "oldest_staged_wait_seconds", "quarantined_batches")
    for label in plotted:
        expect(page.get_by_text(label, exact=True).first).to_be_visible()
    expect(page.locator("canvas")).to_have_count(len(plotted))
    page.get_by_role("button", name="Plots").scroll_into_view_if_needed()
    page.mouse.wheel(0, 300)  # the plots, below the Table | Plots switch
    page.screenshot(path=screenshots / "queue-plots.png")
    page.goto(f"{dagit.url}/assets/ingestion_queue?view=checks")
    expect(page.get_by_text("orders_wait_within_limit").first).to_be_visible()
    expect(page.get_by_text("queue_depth_within_limit").first).to_be_visible()

    # The resource page lists the password as its environment variable, never its value.
    shown = _configured_values(dagit, "postgres")
    assert shown["password"] == ("POSTGRES_PASSWORD", "ENV_VAR")
    assert secret not in str(shown)
    page.goto(f"{dagit.url}/locations/{LOCATION}/resources/postgres")
    expect(page.get_by_text("Env var").first).to_be_visible()
    assert secret not in page.content()
    assert secret not in _run_log_messages(dagit, run_id)
