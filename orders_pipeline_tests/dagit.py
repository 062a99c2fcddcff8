"""The real `dagster dev` (webserver + daemon) on a free port, for the UI tests.

Shared by the GraphQL test and the browser test so both start Dagster the same way: its own
DAGSTER_HOME, the test's database and key prefix, and a process group that is killed whole.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import REPO, dagster_env, free_port

# The assets Dagster materializes, with their upstream assets.
ASSET_LINEAGE = {
    "lookup_cache": {"products", "currencies", "zip_codes"},
    "staged_orders": {"ingestion_queue", "lookup_cache"},
    "orders_rejected": {"ingestion_queue", "lookup_cache"},
    "promoted_orders": {"staged_orders"},
    "sales_hourly_rollup": {"staged_orders"},
    "product_daily_rollup": {"staged_orders"},
    "sales_hourly": {"promoted_orders", "sales_hourly_rollup"},
    "product_performance_daily": {"promoted_orders", "product_daily_rollup"},
}
# External assets: others write them; Dagster shows them in the lineage and observes the queue.
EXTERNAL_ASSETS = {"ingestion_queue": set(), "products": set(), "currencies": set(),
                   "zip_codes": set()}


class Dagit:
    """A running webserver, reached over HTTP and GraphQL."""

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
        """Until the code location has loaded its assets (the port answers earlier)."""
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

    def wait_observation(self, asset: str, label: str, timeout: float = 90) -> int:
        """The integer `label` of the asset's latest observation, once there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.graphql(
                """query($key: AssetKeyInput!) { assetOrError(assetKey: $key) {
                     ... on Asset { assetObservations(limit: 1) { metadataEntries {
                       label ... on IntMetadataEntry { intValue } } } } } }""",
                {"key": {"path": [asset]}})
            observations = data["assetOrError"]["assetObservations"]
            if observations:
                entries = {e["label"]: e.get("intValue")
                           for e in observations[0]["metadataEntries"]}
                return int(entries[label])
            time.sleep(1)
        raise TimeoutError(f"no observation of {asset} within {timeout} s")

    def wait_run(self, run_id: str, timeout: float = 180) -> str:
        """The run's final status, or its status when `timeout` ran out."""
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


@contextmanager
def dagster_dev(settings: Settings, workdir: Path) -> Iterator[Dagit]:
    """`dagster dev` for these settings, logging to `workdir/dagster-dev.log`."""
    port = free_port()
    log = open(workdir / "dagster-dev.log", "w")  # noqa: SIM115 - closed below
    # A new session: `dagster dev` started from a non-interactive shell ignores SIGINT and
    # SIGTERM, so the whole group (webserver, daemon, code server) is killed instead.
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster")), "dev", "-p", str(port),
         "-h", "127.0.0.1", "-w", "workspace.yaml"],
        cwd=REPO, env=dagster_env(settings, workdir / "home"), stdout=log,
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


@pytest.fixture
def dagit_settings(settings: Settings) -> Settings:
    """What `dagster dev` runs with; a test module overrides this to prepare or change it."""
    return settings


@pytest.fixture
def dagit(dagit_settings: Settings, tmp_path: Path) -> Iterator[Dagit]:
    """`dagster dev` on the test's database and key prefix."""
    with dagster_dev(dagit_settings, tmp_path) as client:
        yield client
