"""The real `dagster dev` (webserver + daemon) on a free port, for the UI tests.

Shared by the GraphQL test and the browser test so both start Dagster the same way: its own
DAGSTER_HOME, the test's database and key prefix, and a process group that is killed whole.
Both reach it through `dagster_graphql.DagsterGraphQLClient` (see `Dagit`).
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import gql
import pytest
import requests
from dagster_graphql import DagsterGraphQLClient
from gql.transport.exceptions import TransportError
from gql.transport.requests import RequestsHTTPTransport

from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import REPO, dagster_env
from orders_pipeline_tests.servers import free_port

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
                   "zip_codes": set(), "promoted_stream": {"promoted_orders"}}
# Daily-partitioned, in the group `replay`: materialized a day (or a backfill) at a time,
# never by "Materialize all" of the `orders_pipeline` group.
REPLAY_ASSETS = {"replayed_orders": {"staged_orders"}}


# A run in one of these states is over.
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
            dg.DagsterRunStatus.CANCELED}


class Dagit:
    """A running webserver, reached through Dagster's own GraphQL client.

    `client` (`DagsterGraphQLClient`) launches runs and reads their status. Queries it has no
    method for (asset nodes, observations, sensors, run lists) go through `graphql`: a `gql`
    client on the same HTTP transport, the library the Dagster client is built on.
    """

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        transport = RequestsHTTPTransport(url=f"{self.url}/graphql", timeout=30)
        self.client = DagsterGraphQLClient("127.0.0.1", port_number=port, transport=transport)
        self._gql = gql.Client(transport=transport)

    def graphql(self, query: str, variables: dict[str, object] | None = None) -> dict:
        """The `data` of `query` with `variables`; TransportQueryError if it has errors."""
        return self._gql.execute(gql.GraphQLRequest(query, variable_values=variables))

    def wait_ready(self, process: subprocess.Popen, timeout: float = 90) -> None:
        """Until the code location has loaded its assets (the port answers earlier)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, "dagster dev exited early"
            try:
                if self.graphql("{ assetNodes { assetKey { path } } }")["assetNodes"]:
                    return
            except (requests.RequestException, TransportError):
                pass  # not listening yet, or the code location is still loading
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

    def wait_run(self, run_id: str, timeout: float = 180) -> dg.DagsterRunStatus:
        """The run's final status, or its status when `timeout` ran out."""
        deadline = time.monotonic() + timeout
        status = self.client.get_run_status(run_id)
        while status not in FINISHED and time.monotonic() < deadline:
            time.sleep(1)
            status = self.client.get_run_status(run_id)
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
