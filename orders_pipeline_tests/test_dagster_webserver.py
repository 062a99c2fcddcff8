"""The real `dagster dev` (webserver + daemon) on a free port, driven through GraphQL.

Lists the five assets and their lineage as the UI does, launches "Materialize all" as the
UI's button does, then publishes orders through the CLI and waits for the sensor's run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import REPO, dagster_env, pipeline_env

ASSET_LINEAGE = {
    "lookup_cache": set(),
    "staged_orders": {"lookup_cache"},
    "promoted_orders": {"staged_orders"},
    "sales_hourly": {"promoted_orders"},
    "product_performance_daily": {"promoted_orders"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Dagit:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def graphql(self, query: str, variables: dict[str, object] | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.loads(response.read())
        assert "errors" not in payload, payload
        return payload["data"]

    def wait_ready(self, process: subprocess.Popen, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, "dagster dev exited early"
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=2):
                    pass
                data = self.graphql("{ assetNodes { assetKey { path } } }")
                if data["assetNodes"]:
                    return
            except (OSError, AssertionError):
                pass
            time.sleep(1)
        raise TimeoutError("dagster dev did not answer")

    def wait_run(self, run_id: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        status = "UNKNOWN"
        while time.monotonic() < deadline:
            data = self.graphql("query($id: ID!) { runOrError(runId: $id) {"
                                " ... on Run { status } } }", {"id": run_id})
            status = data["runOrError"]["status"]
            if status in {"SUCCESS", "FAILURE", "CANCELED"}:
                return status
            time.sleep(1)
        return status


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
def dagit(settings: Settings, tmp_path: Path, signals_while_daemon_down: int
          ) -> Iterator[Dagit]:
    port = _free_port()
    log = open(tmp_path / "dagster-dev.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster")), "dev", "-p", str(port),
         "-h", "127.0.0.1", "-w", "workspace.yaml"],
        cwd=REPO, env=dagster_env(settings, tmp_path / "home"), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = Dagit(port)
        client.wait_ready(process)
        yield client
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_ui_lineage_materialize_all_and_sensor_run(dagit: Dagit, settings: Settings,
                                                   pg: psycopg.Connection, tmp_path: Path,
                                                   signals_while_daemon_down: int) -> None:
    nodes = dagit.graphql("{ assetNodes { assetKey { path } dependencyKeys { path }"
                          " groupName repository { name location { name } } } }")["assetNodes"]
    lineage = {"/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]}
               for n in nodes}
    assert lineage == ASSET_LINEAGE
    assert {n["groupName"] for n in nodes} == {"orders_pipeline"}
    location = nodes[0]["repository"]["location"]["name"]

    launched = dagit.graphql(
        """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
             __typename ... on LaunchRunSuccess { run { runId } }
             ... on PythonError { message } } }""",
        {"params": {"selector": {
            "repositoryLocationName": location, "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [k]} for k in ASSET_LINEAGE]},
            "runConfigData": {}}})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    assert dagit.wait_run(launched["run"]["runId"]) == "SUCCESS"

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
