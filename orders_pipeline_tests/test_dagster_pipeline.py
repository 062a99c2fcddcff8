"""End to end through Dagster: the asset graph on real Redis, PgBouncer and Postgres."""

import dataclasses
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis

from orders_pipeline.assets import checks, lookup, orders, queue, views
from orders_pipeline.connections import pg_connect
from orders_pipeline.definitions import defs
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.sensors import completion_signal_sensor
from orders_pipeline.settings import Settings
from orders_pipeline_tests.dagit import ASSET_LINEAGE, EXTERNAL_ASSETS, REPLAY_ASSETS
from orders_pipeline_tests.helpers import (
    REPO,
    dagster_env,
    expected_orders,
    is_generated_valid,
    push_orders,
    resources_for,
    valid_order_ids,
)

# Everything Dagster materializes, with the checks of those assets.
ALL_ASSETS = [lookup.lookup_cache, orders.staged_orders, orders.promoted_orders,
              views.sales_hourly, views.product_performance_daily,
              *dg.load_asset_checks_from_modules([checks])]
# What one run materializes: the unpartitioned assets and every check, the views' included.
# The views are partitioned by month (a run cannot mix them in): promotion refreshes the
# months it changed and records them as the views' partitions.
INGEST = (dg.AssetSelection.assets(lookup.lookup_cache, orders.staged_orders,
                                   orders.promoted_orders)
          | dg.AssetSelection.all_asset_checks())
VIEWS = ("sales_hourly", "product_performance_daily")


def _materialize(settings: Settings, instance: dg.DagsterInstance | None = None,
                 **kwargs: object) -> dg.ExecuteInProcessResult:
    """`dg.materialize` of INGEST, as "Materialize all" of the `orders_pipeline` group does."""
    return dg.materialize(ALL_ASSETS, selection=INGEST, resources=resources_for(settings),
                          instance=instance or dg.DagsterInstance.ephemeral(), **kwargs)


def _snapshot(pg: psycopg.Connection) -> dict[str, object]:
    return {
        "orders": pg.execute("SELECT count(*), sum(total_amount_usd), md5(string_agg("
                             "order_id || total_amount_usd::text, ',' ORDER BY order_id))"
                             " FROM orders").fetchone(),
        "rejected": pg.execute("SELECT count(*) FROM orders_rejected").fetchone(),
        "sales_hourly": pg.execute("SELECT md5(string_agg(t::text, ',' ORDER BY hour, category))"
                                   " FROM sales_hourly t").fetchone(),
        "product_daily": pg.execute("SELECT md5(string_agg(t::text, ',' ORDER BY day,"
                                    " product_id)) FROM product_performance_daily t").fetchone(),
    }


def test_definitions_load_and_validate(settings: Settings, tmp_path: Path) -> None:
    graph = defs.resolve_asset_graph()
    upstream = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
                for k in graph.get_all_asset_keys()}
    assert upstream == {**ASSET_LINEAGE, **EXTERNAL_ASSETS, **REPLAY_ASSETS}
    assert {k.to_user_string() for k in graph.get_all_asset_keys()
            if not graph.get(k).is_materializable} == set(EXTERNAL_ASSETS)
    repository = defs.get_repository_def()
    assert not repository.schedule_defs  # automation conditions replaced the schedules
    assert {s.name for s in repository.sensor_defs} == {
        "completion_signal_sensor", "queue_observation_sensor", "lookup_sources_sensor",
        "promoted_stream_observation_sensor",
        "default_automation_condition_sensor"}
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING
               for s in repository.sensor_defs)
    assert [j.name for j in repository.get_all_jobs() if not j.name.startswith("__")] == [
        "backup", "ingest_orders", "redrive_rejected", "retention"]
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dagster_env(settings, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_automation_conditions_and_freshness_on_the_assets() -> None:
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    cron = specs["lookup_cache"].automation_condition
    assert cron is not None and cron.get_label() == "on_cron(0 3 * * *, UTC)"
    # The views need no automation: each promotion step refreshes the months it changed.
    assert {k for k, s in specs.items() if s.automation_condition} == {"lookup_cache"}
    graph = defs.resolve_asset_graph()
    for view in VIEWS:
        assert graph.get(dg.AssetKey(view)).partitions_def == views.VIEW_PARTITIONS
        assert specs[view].group_name == views.VIEWS_GROUP
    assert views.VIEW_PARTITIONS.get_first_partition_key() == "1969-12"
    hourly = dg.FreshnessPolicy.time_window(warn_window=timedelta(hours=1),
                                            fail_window=timedelta(hours=24))
    assert {k: s.freshness_policy for k, s in specs.items() if s.freshness_policy} == {
        "promoted_orders": hourly, "sales_hourly": hourly, "product_performance_daily": hourly,
        "lookup_cache": dg.FreshnessPolicy.time_window(warn_window=timedelta(hours=25),
                                                       fail_window=timedelta(hours=49))}
    sensor = defs.get_repository_def().get_sensor_def("completion_signal_sensor")
    assert [j.name for j in sensor.jobs] == ["ingest_orders"]


def _dg(settings: Settings, tmp_path: Path, *command: str, **env: str
        ) -> subprocess.CompletedProcess[str]:
    """`dg` (from the dev extra) as CI runs it: a throwaway DAGSTER_HOME, no telemetry."""
    home = tmp_path / "dg-home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry: {enabled: false}\n")
    return subprocess.run([str(Path(sys.executable).with_name("dg")), *command], cwd=REPO,
                          capture_output=True, text=True, timeout=180,
                          env={**dagster_env(settings, tmp_path / "unused"),
                               "DAGSTER_HOME": str(home), **env})


def test_dg_check_and_list_defs_show_the_configured_prefix(settings: Settings,
                                                            tmp_path: Path) -> None:
    checked = _dg(settings, tmp_path, "check", "defs")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully." in checked.stdout

    listed = _dg(settings, tmp_path, "list", "defs", "--json", REDIS_KEY_PREFIX="{shop7}")
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)
    assets = {a["asset_key"]: a for a in found["assets"]}
    assert {k: set(a["dependency_keys"]) for k, a in assets.items()} == {
        **ASSET_LINEAGE, **EXTERNAL_ASSETS, **REPLAY_ASSETS}
    assert {k for k, a in assets.items() if not a["is_executable"]} == set(EXTERNAL_ASSETS)
    assert not any("{P}" in (a["description"] or "") for a in assets.values())
    assert "the Redis list `{shop7}:ingestion`" in assets["ingestion_queue"]["description"]
    assert "`{shop7}:lookup:products`" in assets["lookup_cache"]["description"]
    assert assets["staged_orders"]["description"].rstrip().endswith(
        "Redis keys start with `{shop7}`, the `REDIS_KEY_PREFIX` this code location loaded "
        "with.")
    assert {s["name"] for s in found["sensors"]} == {
        "completion_signal_sensor", "queue_observation_sensor", "lookup_sources_sensor",
        "promoted_stream_observation_sensor",
        "default_automation_condition_sensor"}
    assert found["schedules"] == [] and [j["name"] for j in found["jobs"]] == [
        "backup", "ingest_orders", "redrive_rejected", "retention"]


def test_end_to_end_materialize(settings: Settings, rconn: redis.Redis,
                                pg: psycopg.Connection) -> None:
    payloads, summary = push_orders(settings, rconn, pg, 20_000, duplicates=0.05, invalid=0.01)
    assert summary == {"unique_valid": 18_800, "duplicates": 1_000, "invalid": 200}
    instance = dg.DagsterInstance.ephemeral()

    result = _materialize(settings, instance)
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())

    valid_ids = valid_order_ids(payloads)
    assert len(valid_ids) == 18_800
    stored = {r[0]: (r[1], r[2]) for r in pg.execute(
        "SELECT order_id, total_amount, total_amount_usd FROM orders")}
    assert set(stored) == valid_ids
    expected = expected_orders(payloads, pg)
    assert stored == {oid: expected[oid] for oid in valid_ids}

    rejected = pg.execute("SELECT raw_payload, reason FROM orders_rejected").fetchall()
    bad_payloads = sorted(p for p in payloads if not is_generated_valid(p))
    assert sorted(bytes(r[0]) for r in rejected) == bad_payloads
    assert all(r[1] for r in rejected)

    counts = pg.execute("SELECT (SELECT count(*) FROM orders_staging),"
                        " (SELECT sum(duplicate_rows) FROM ingest_batches)").fetchone()
    assert counts == (0, 1_000)
    keys = RedisKeys(settings.redis.key_prefix)
    assert rconn.llen(keys.ingestion) == 0
    assert rconn.zcard(keys.inflight) == 0 and rconn.zcard(keys.staged) == 0
    assert not list(rconn.scan_iter(match=f"{keys.prefix}:batch:*"))

    for view in VIEWS:
        assert pg.execute(f"SELECT sum(order_count), sum(revenue_usd) FROM {view}").fetchone() \
            == pg.execute("SELECT count(*), sum(total_amount_usd) FROM orders").fetchone()
    # Promotion refreshed the months of the orders and recorded each as its view's partition.
    months = {row[0] for row in pg.execute(
        "SELECT DISTINCT to_char(order_timestamp AT TIME ZONE 'UTC', 'YYYY-MM') FROM orders")}
    assert _view_partitions(result) == {(view, month) for view in VIEWS for month in months}
    metadata = _materialized(result)
    staged = metadata["staged_orders"]
    assert staged["rows_staged"].value == 18_800
    assert staged["duplicates_dropped"].value == 1_000
    assert staged["rows_rejected"].value == 200
    # The row count says what this run staged, although promotion emptied the table since.
    assert staged["dagster/row_count"].value == 18_800
    assert metadata["orders_rejected"]["dagster/row_count"].value == 200
    assert metadata["orders_rejected"]["rejected_rate"].value == 0.01  # 200 of 20,000 claimed
    assert metadata["promoted_orders"]["dagster/row_count"].value == 18_800
    # Every month view was created by this run: the orders' months, and the months ahead.
    assert metadata["promoted_orders"]["view_months_refreshed"].value == pg.execute(
        "SELECT count(*) FROM view_slices").fetchone()[0] > 2 * len(months)
    for rollup in ("sales_hourly_rollup", "product_daily_rollup"):
        assert metadata[rollup]["dagster/row_count"].value == pg.execute(
            f"SELECT count(*) FROM {rollup}").fetchone()[0] > 0
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    books = evaluations["orders_conservation"].metadata
    assert books["balanced"] == dg.MetadataValue.bool(True)
    assert books["difference"] == dg.MetadataValue.int(0)
    assert evaluations["rejects_match_ledger"].metadata["batches_differing"].value == 0
    _assert_rounded(result)

    before = _snapshot(pg)
    again = _materialize(settings, instance)
    assert again.success
    assert _snapshot(pg) == before
    assert _materialized(again)["staged_orders"]["dagster/row_count"].value == 0
    assert _view_partitions(again) == set()  # nothing changed, nothing refreshed

    # A month from the UI: materializing one partition refreshes that month's view.
    month = sorted(months)[0]
    for view in (views.sales_hourly, views.product_performance_daily):
        one = dg.materialize([view, *ALL_ASSETS[:3]], selection=[view], partition_key=month,
                             resources=resources_for(settings), instance=instance)
        assert one.success
        shown = one.asset_materializations_for_node(view.key.to_user_string())[0].metadata
        assert shown["month_view"].value == f"{view.key.to_user_string()}_m{month[:4]}{month[5:]}"
        assert shown["month_views_refreshed"].value == 1
        assert shown["dagster/row_count"].value == pg.execute(
            f"SELECT count(*) FROM {shown['month_view'].value}").fetchone()[0] > 0
    assert _snapshot(pg) == before


def _view_partitions(result: dg.ExecuteInProcessResult) -> set[tuple[str, str]]:
    """(view, partition key) of every view materialization `result` recorded."""
    return {(e.asset_key.to_user_string(), e.partition)
            for e in result.get_asset_materialization_events()
            if e.asset_key.to_user_string() in VIEWS}


def _materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, object]]:
    """Asset key -> the metadata of its (one) materialization in `result`."""
    materializations = [e.step_materialization_data.materialization
                        for e in result.get_asset_materialization_events()]
    return {m.asset_key.to_user_string(): m.metadata for m in materializations}


def _assert_rounded(result: dg.ExecuteInProcessResult) -> None:
    """Every float the catalog shows has at most four decimals (no 1.1209652920001645)."""
    shown = [*(m.step_materialization_data.materialization.metadata.items()
               for m in result.get_asset_materialization_events()),
             *(e.metadata.items() for e in result.get_asset_check_evaluations())]
    floats = {name: value.value for items in shown for name, value in items
              if isinstance(value, dg.FloatMetadataValue)}
    assert floats and all(round(v, 4) == v for v in floats.values()), floats


def test_sensor_one_run_per_signal_and_none_twice(settings: Settings, rconn: redis.Redis,
                                                  pg: psycopg.Connection) -> None:
    resources = resources_for(settings)
    instance = dg.DagsterInstance.ephemeral()
    context = dg.build_sensor_context(instance=instance, resources=resources)
    assert isinstance(completion_signal_sensor(context), dg.SkipReason)

    push_orders(settings, rconn, pg, 1_500)  # one batch, one signal
    context = dg.build_sensor_context(instance=instance, resources=resources)
    result = completion_signal_sensor(context)
    assert len(result.run_requests) == 1
    cursor = result.cursor
    assert result.run_requests[0].run_key.endswith(cursor)

    again = dg.build_sensor_context(cursor=cursor, instance=instance, resources=resources)
    assert isinstance(completion_signal_sensor(again), dg.SkipReason)

    # Signals recorded while no tick ran (three batches) are all picked up, in one run.
    push_orders(settings, rconn, pg, 5_000)
    later = dg.build_sensor_context(cursor=cursor, instance=instance, resources=resources)
    burst = completion_signal_sensor(later)
    assert len(burst.run_requests) == 1
    assert burst.run_requests[0].tags["orders_pipeline/signals"] == "3"
    assert burst.run_requests[0].tags["orders_pipeline/signal_orders"] == "5000"
    assert burst.run_requests[0].run_key != result.run_requests[0].run_key


def test_ingest_job_runs_from_sensor_request(settings: Settings, rconn: redis.Redis,
                                             pg: psycopg.Connection) -> None:
    """The sensor's job (staged -> promoted -> views) does the whole ingest on its own."""
    push_orders(settings, rconn, pg, 3_000, duplicates=0.1)
    resources = resources_for(settings)
    with pg_connect(settings.postgres) as conn:
        LookupCache(rconn, RedisKeys(settings.redis.key_prefix), 600).load_snapshot(conn)
    job = defs.resolve_job_def("ingest_orders")
    result = job.execute_in_process(resources=resources, instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 2_700
    assert pg.execute("SELECT sum(order_count) FROM sales_hourly").fetchone()[0] == 2_700
    # The views' checks ran in the ingest job, after promotion refreshed the months.
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations["sales_hourly_matches_orders"]
    assert evaluations["product_performance_daily_matches_orders"]
    assert {view for view, _ in _view_partitions(result)} == set(VIEWS)


@pytest.mark.parametrize("workers", [1, 2])
def test_staging_config_workers(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
                                workers: int) -> None:
    push_orders(settings, rconn, pg, 4_000)
    result = _materialize(settings, run_config=dg.RunConfig(ops={
        "staged_orders": orders.StagingConfig(workers=workers, batch_size=500)}))
    assert result.success
    meta = result.asset_materializations_for_node("staged_orders")[0].metadata
    assert meta["workers"].value == workers
    assert meta["batches"].value == 8
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 4_000


def test_warning_checks_flag_rejects_and_deep_queue(settings: Settings, rconn: redis.Redis,
                                                    pg: psycopg.Connection) -> None:
    push_orders(settings, rconn, pg, 2_000, invalid=0.2)
    result = _materialize(settings)
    assert result.success  # warnings never fail the run
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    rejected = evaluations["rejected_rate_below_threshold"]
    assert not rejected.passed and rejected.severity == dg.AssetCheckSeverity.WARN
    assert rejected.asset_key == dg.AssetKey("orders_rejected")
    assert rejected.metadata["rejected_rate"].value == 0.2

    # The queue's checks, run from the UI's "Execute" on `ingestion_queue`: the same checks
    # the observation sensor evaluates every minute.
    push_orders(settings, rconn, pg, 50, batch_size=50)
    shallow = resources_for(dataclasses.replace(settings, pipeline=dataclasses.replace(
        settings.pipeline, max_queue_depth=10)))
    job = dg.define_asset_job("queue_checks",
                              selection=dg.AssetSelection.checks(queue.MONITOR.checks))
    run = dg.Definitions(assets=[queue.INGESTION_QUEUE], asset_checks=[queue.MONITOR.checks],
                         jobs=[job], resources=shallow).resolve_job_def("queue_checks")
    queue_result = run.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert queue_result.success
    on_queue = {e.check_name: e for e in queue_result.get_asset_check_evaluations()}
    deep = on_queue["queue_depth_within_limit"]
    assert not deep.passed and deep.severity == dg.AssetCheckSeverity.WARN
    assert (deep.metadata["queue_depth"].value, deep.metadata["max_queue_depth"].value) == (50, 10)
    assert on_queue["orders_wait_within_limit"].passed  # pushed a moment ago
