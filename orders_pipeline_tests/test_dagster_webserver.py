"""The real `dagster dev` (webserver + daemon) on a free port, driven through GraphQL.

Lists the assets and their lineage as the UI does (the external queue and lookup tables
included), sees the daemon observe the queue and evaluate its checks without any run, launches
"Materialize all" as the UI's button does, then publishes orders through the CLI and waits for
the sensor's run.
"""

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from orders_pipeline.settings import Settings
from orders_pipeline_tests.dagit import ASSET_LINEAGE, EXTERNAL_ASSETS, REPLAY_ASSETS, Dagit
from orders_pipeline_tests.helpers import REPO, dagster_env, pipeline_env

VIEWS = ("sales_hourly", "product_performance_daily")  # partitioned by month


@pytest.fixture
def signals_while_daemon_down(settings: Settings, tmp_path: Path) -> int:
    """Orders pushed through the CLI before any daemon runs: their signals must not be lost."""
    env = pipeline_env(settings, BATCH_SIZE="1000")
    for command in (("init-cache",), ("generate", "--count", "2000")):
        result = subprocess.run([sys.executable, "-m", "orders_pipeline", *command], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    return 2


@pytest.fixture
def dagit_settings(settings: Settings, signals_while_daemon_down: int) -> Settings:
    """Dagster starts only after those signals were sent."""
    return settings


def test_ui_lineage_materialize_all_and_sensor_run(dagit: Dagit, settings: Settings,
                                                   pg: psycopg.Connection, tmp_path: Path,
                                                   signals_while_daemon_down: int) -> None:
    nodes = dagit.graphql("{ assetNodes { assetKey { path } dependencyKeys { path }"
                          " groupName repository { name location { name } } } }")["assetNodes"]
    lineage = {"/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]}
               for n in nodes}
    assert lineage == {**ASSET_LINEAGE, **EXTERNAL_ASSETS, **REPLAY_ASSETS}
    assert {n["groupName"] for n in nodes} == {"orders_pipeline", "replay", "dashboard_views"}
    location = nodes[0]["repository"]["location"]["name"]
    instigators = dagit.graphql(
        """query($r: RepositorySelector!) {
             sensorsOrError(repositorySelector: $r) {
               ... on Sensors { results { name sensorState { status } } } }
             schedulesOrError(repositorySelector: $r) {
               ... on Schedules { results { name } } } }""",
        {"r": {"repositoryLocationName": location, "repositoryName": "__repository__"}})
    sensors = instigators["sensorsOrError"]["results"]
    assert {s["name"]: s["sensorState"]["status"] for s in sensors} == {
        "completion_signal_sensor": "RUNNING", "queue_observation_sensor": "RUNNING",
        "promoted_stream_observation_sensor": "RUNNING",
        "lookup_sources_sensor": "RUNNING", "default_automation_condition_sensor": "RUNNING"}
    assert instigators["schedulesOrError"]["results"] == []

    # Before any run: the daemon observes the queue (2,000 orders wait) and checks it.
    depth = dagit.wait_observation("ingestion_queue", "queue_depth")
    assert depth == 2_000
    executions = dagit.graphql(
        """{ assetCheckExecutions(assetKey: {path: ["ingestion_queue"]},
                                  checkName: "orders_wait_within_limit", limit: 1) {
             runId status evaluation { metadataEntries { label } } } }"""
    )["assetCheckExecutions"]
    assert [(e["runId"], e["status"]) for e in executions] == [("", "SUCCEEDED")]  # no run
    assert {"waited_seconds", "verdict"} <= {
        m["label"] for m in executions[0]["evaluation"]["metadataEntries"]}

    # "Materialize all" of the `orders_pipeline` group: the assets' job with every
    # unpartitioned asset selected (the month-partitioned views are in their own group).
    run_id = dagit.client.submit_job_execution(
        "__ASSET_JOB", repository_location_name=location, repository_name="__repository__",
        run_config={}, asset_selection=[a for a in ASSET_LINEAGE if a not in VIEWS])
    assert dagit.wait_run(run_id) == dg.DagsterRunStatus.SUCCESS

    # Producer side through the CLI: the signal reaches the sensor, which runs the ingest job.
    env = dagster_env(settings, tmp_path / "cli-home")
    cli = [sys.executable, "-m", "orders_pipeline"]
    generated = subprocess.run([*cli, "generate", "--count", "2000", "--duplicates", "0.1"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    deadline = time.monotonic() + 120
    runs: list[dict] = []
    expected_signals = signals_while_daemon_down + 2
    while time.monotonic() < deadline:
        runs = dagit.graphql(
            """{ runsOrError(filter: {pipelineName: "ingest_orders"}) {
                 ... on Runs { results { runId status tags { key value } } } } }"""
        )["runsOrError"]["results"]
        covered = sum(int(t["value"]) for r in runs for t in r["tags"]
                      if t["key"] == "orders_pipeline/signals")
        if covered >= expected_signals and all(
                r["status"] in {"SUCCESS", "FAILURE", "CANCELED"} for r in runs):
            break
        time.sleep(2)
    assert runs, "the sensor launched no ingest run"
    assert {r["status"] for r in runs} == {"SUCCESS"}
    # Two batches before the daemon started, two after: each signal in exactly one run.
    assert covered == expected_signals
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 2_000 + 1_800
    assert pg.execute("SELECT sum(order_count) FROM sales_hourly").fetchone()[0] == 3_800

    # Promotion recorded the month it refreshed as each view's partition; a month can also
    # be refreshed on its own, as the UI's "Materialize" of a partition does.
    month = pg.execute("SELECT to_char(max(order_timestamp) AT TIME ZONE 'UTC', 'YYYY-MM')"
                       " FROM orders").fetchone()[0]
    for view in VIEWS:
        assert month in _materialized_partitions(dagit, view)
    run_id = dagit.client.submit_job_execution(
        "__ASSET_JOB", repository_location_name=location, repository_name="__repository__",
        run_config={}, asset_selection=["sales_hourly"], tags={"dagster/partition": month})
    assert dagit.wait_run(run_id) == dg.DagsterRunStatus.SUCCESS
    assert pg.execute("SELECT refreshes FROM view_slices WHERE view_name = 'sales_hourly'"
                      " AND month = to_date(%s, 'YYYY-MM')", (month,)).fetchone()[0] >= 2


def _materialized_partitions(dagit: Dagit, asset: str) -> set[str]:
    """Partition keys of the asset's recorded materializations."""
    data = dagit.graphql(
        """query($key: AssetKeyInput!) { assetOrError(assetKey: $key) {
             ... on Asset { assetMaterializations(limit: 100) { partition } } } }""",
        {"key": {"path": [asset]}})
    return {m["partition"] for m in data["assetOrError"]["assetMaterializations"]}
