"""End to end through Dagster: the asset graph on real Redis, PgBouncer and Postgres."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis

from orders_pipeline.assets import checks, lookup, orders, views
from orders_pipeline.connections import pg_connect
from orders_pipeline.definitions import defs
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.sensors import completion_signal_sensor
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import (
    REPO,
    dagster_env,
    expected_orders,
    push_orders,
    resources_for,
    valid_order_ids,
)

ALL_ASSETS = [*dg.load_assets_from_modules([lookup, orders, views]),
              *dg.load_asset_checks_from_modules([checks])]


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
    assert {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} == {
        "lookup_cache", "staged_orders", "promoted_orders", "sales_hourly",
        "product_performance_daily"}
    graph = defs.resolve_asset_graph()
    upstream = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
                for k in graph.get_all_asset_keys()}
    assert upstream == {"lookup_cache": set(), "staged_orders": {"lookup_cache"},
                        "promoted_orders": {"staged_orders"},
                        "sales_hourly": {"promoted_orders"},
                        "product_performance_daily": {"promoted_orders"}}
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dagster_env(settings, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_end_to_end_materialize(settings: Settings, rconn: redis.Redis,
                                pg: psycopg.Connection) -> None:
    payloads, summary = push_orders(settings, rconn, pg, 20_000, duplicates=0.05, invalid=0.01)
    assert summary == {"unique_valid": 18_800, "duplicates": 1_000, "invalid": 200}
    resources = resources_for(settings)
    instance = dg.DagsterInstance.ephemeral()

    result = dg.materialize(ALL_ASSETS, resources=resources, instance=instance)
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
    bad_payloads = sorted(p for p in payloads if not p.startswith(b'{"order_id":"ord-'))
    assert sorted(bytes(r[0]) for r in rejected) == bad_payloads
    assert all(r[1] for r in rejected)

    counts = pg.execute("SELECT (SELECT count(*) FROM orders_staging),"
                        " (SELECT sum(duplicate_rows) FROM ingest_batches)").fetchone()
    assert counts == (0, 1_000)
    keys = RedisKeys(settings.redis.key_prefix)
    assert rconn.llen(keys.ingestion) == 0
    assert rconn.zcard(keys.inflight) == 0 and rconn.zcard(keys.staged) == 0
    assert not list(rconn.scan_iter(match=f"{keys.prefix}:batch:*"))

    for view in ("sales_hourly", "product_performance_daily"):
        assert pg.execute(f"SELECT sum(order_count), sum(revenue_usd) FROM {view}").fetchone() \
            == pg.execute("SELECT count(*), sum(total_amount_usd) FROM orders").fetchone()
    staged_meta = result.asset_materializations_for_node("staged_orders")[0].metadata
    assert staged_meta["rows_staged"].value == 18_800
    assert staged_meta["duplicates_dropped"].value == 1_000
    assert staged_meta["rows_rejected"].value == 200

    before = _snapshot(pg)
    again = dg.materialize(ALL_ASSETS, resources=resources, instance=instance)
    assert again.success
    assert _snapshot(pg) == before


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


@pytest.mark.parametrize("workers", [1, 2])
def test_staging_config_workers(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
                                workers: int) -> None:
    push_orders(settings, rconn, pg, 4_000)
    result = dg.materialize(
        ALL_ASSETS, resources=resources_for(settings), instance=dg.DagsterInstance.ephemeral(),
        run_config=dg.RunConfig(ops={"staged_orders": orders.StagingConfig(
            workers=workers, batch_size=500)}))
    assert result.success
    meta = result.asset_materializations_for_node("staged_orders")[0].metadata
    assert meta["workers"].value == workers
    assert meta["batches"].value == 8
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 4_000


def test_warning_checks_flag_rejects_and_deep_queue(settings: Settings, rconn: redis.Redis,
                                                    pg: psycopg.Connection) -> None:
    push_orders(settings, rconn, pg, 2_000, invalid=0.2)
    result = dg.materialize(ALL_ASSETS, resources=resources_for(settings),
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success  # warnings never fail the run
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    rejected = evaluations["rejected_rate_below_threshold"]
    assert not rejected.passed and rejected.severity == dg.AssetCheckSeverity.WARN
    assert rejected.metadata["rejected_rate"].value == pytest.approx(0.2)
    assert evaluations["queue_depth_within_limit"].passed

    push_orders(settings, rconn, pg, 50, batch_size=50)
    shallow = resources_for(dataclasses.replace(settings, pipeline=dataclasses.replace(
        settings.pipeline, max_queue_depth=10)))["redis"]
    deep = checks.queue_depth_within_limit(redis=shallow)
    assert not deep.passed and deep.metadata["queue_depth"].value == 50
