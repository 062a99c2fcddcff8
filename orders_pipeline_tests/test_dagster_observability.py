"""A queue you can see: the queue's observations and checks, on their own clock, and the catalog.

The issue's example: with the completion sensor switched off and 10,000 orders queued, the
catalog stayed green. Here the sensor is off (never ticked), the observation sensor is
evaluated as the daemon does, and the wait check fails with the numbers that say why; after a
run drains the queue it passes. How long the oldest order waited is read from the queue's
marks, checked against an independent model over random pushes, claims and clears.
"""

import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from re import compile as re_compile
from urllib.parse import unquote, urlsplit

import dagster as dg
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline.assets import catalog, fanout, lookup, orders, queue, views
from orders_pipeline.assets.tables import ORDERS_SCHEMA, REJECTED_SCHEMA, STAGING_SCHEMA
from orders_pipeline.definitions import defs
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.queue import OrderQueue, QueueGauges
from orders_pipeline.settings import RedisSettings, Settings
from orders_pipeline_tests.helpers import push_orders, resources_for

QUEUE = dg.AssetKey("ingestion_queue")
WAIT = dg.AssetCheckKey(QUEUE, "orders_wait_within_limit")
LIMIT = timedelta(seconds=1)
PAST_LIMIT_SECONDS = 1.2  # how far `age` moves the dates back: past LIMIT, without a sleep


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


# --- how long the oldest queued order has waited ---------------------------------------------


def test_oldest_wait_dates_pushes_and_other_producers(rconn: redis.Redis,
                                                      keys: RedisKeys) -> None:
    q = OrderQueue(rconn, keys)
    assert q.gauges() == QueueGauges(0, 0.0, 0, 0, 0.0, 0)

    q.push_batch([b"{}"] * 5)
    time.sleep(0.3)
    q.push_batch([b"{}"] * 5)
    first = q.gauges()
    assert first.queue_depth == 10 and 0.3 <= first.oldest_queued_wait_seconds < 0.5

    q.claim_batch(5, "w")  # the first push is gone: the second one is the oldest now
    assert q.gauges().oldest_queued_wait_seconds < 0.2
    q.claim_batch(5, "w")
    assert q.gauges() == QueueGauges(0, 0.0, 2, 0, 0.0, 0)

    # A producer that LPUSHes itself leaves no mark: the next reading dates its orders.
    rconn.lpush(keys.ingestion, b"{}", b"{}")
    assert q.gauges().oldest_queued_wait_seconds == 0.0
    time.sleep(0.2)
    assert 0.2 <= q.gauges().oldest_queued_wait_seconds < 0.4

    # The list deleted by hand: its marks no longer date what a producer pushes next.
    rconn.delete(keys.ingestion)
    q.push_batch([b"{}"] * 3)
    assert q.gauges().oldest_queued_wait_seconds < 0.1
    assert rconn.zcard(keys.queue_marks) == 1


@dataclass
class Queued:
    """One order of the model: it entered the list no earlier than `lo` and no later than
    `hi` (ms, Redis clock); `hi` is None until a reading has seen an order LPUSHed by hand."""
    lo: int
    hi: int | None


OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(1, 4)),
    st.tuples(st.just("lpush"), st.integers(1, 4)),
    st.tuples(st.just("claim"), st.integers(1, 6)),
    st.tuples(st.just("clear"), st.just(0)),
    st.tuples(st.just("read"), st.just(0)),
), min_size=1, max_size=14)


@hypothesis_settings(max_examples=40, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
def test_oldest_wait_matches_a_model_of_the_queue(rconn: redis.Redis, keys: RedisKeys,
                                                  operations: list[tuple[str, int]]) -> None:
    """Whatever mix of pushes, hand LPUSHes, claims and clears: each reading dates the oldest
    queued order within the window in which it entered (a hand LPUSH: by that reading)."""
    own = RedisKeys(f"{keys.prefix}:{uuid.uuid4().hex[:8]}")
    q = OrderQueue(rconn, own)
    model: deque[Queued] = deque()
    for name, n in [*operations, ("read", 0)]:
        before = _now_ms(rconn)
        if name == "push":
            q.push_batch([b"{}"] * n)
            model.extend(Queued(before, _now_ms(rconn)) for _ in range(n))
        elif name == "lpush":
            rconn.lpush(own.ingestion, *[b"{}"] * n)
            model.extend(Queued(before, None) for _ in range(n))
        elif name == "claim":
            claimed = q.claim_batch(n, "w")
            taken = min(n, len(model))
            assert len(claimed.payloads if claimed else []) == taken
            for _ in range(taken):
                model.popleft()
        elif name == "clear":  # what `orders-pipeline clear --queue` removes of the queue
            rconn.unlink(own.ingestion, own.dequeued, own.queue_marks)
            model.clear()
        else:
            gauges = q.gauges()
            after = _now_ms(rconn)
            for order in model:
                order.hi = after if order.hi is None else order.hi
            assert gauges.queue_depth == len(model)
            if not model:
                assert gauges.oldest_queued_wait_seconds == 0.0
                continue
            waited = round(gauges.oldest_queued_wait_seconds * 1000)
            oldest = model[0]
            # The reading's instant is within [before, after]: so is its date of the oldest.
            assert before - waited <= oldest.hi and after - waited >= oldest.lo, (
                oldest, before, after, waited)
        time.sleep(0.002)  # pushes land on distinct milliseconds


# --- the observation sensor and the queue's checks ------------------------------------------


def age(rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection, seconds: float) -> None:
    """Date everything the wait check reads `seconds` earlier, as if that long had passed.

    The queue's marks (member: when, in ms by the Redis clock, '%015d'; score: orders that
    had entered by then), the staged batches' staging times (score, ms) and the promotions'
    `promoted_at` (Postgres): the check sees the same ages as after sleeping `seconds`.
    """
    ms = round(seconds * 1000)
    marks = rconn.zrange(keys.queue_marks, 0, -1, withscores=True)
    staged = rconn.zrange(keys.staged, 0, -1, withscores=True)
    pipe = rconn.pipeline(transaction=True)
    pipe.delete(keys.queue_marks)
    if marks:
        pipe.zadd(keys.queue_marks, {f"{int(when) - ms:015d}": entered
                                     for when, entered in marks})
    if staged:
        pipe.zadd(keys.staged, {batch: at - ms for batch, at in staged}, xx=True)
    pipe.execute()
    pg.execute("UPDATE promotions SET promoted_at = promoted_at - make_interval(secs => %s)",
               [seconds])


def _tick(monitor: queue.QueueMonitor, instance: dg.DagsterInstance,
          settings: Settings) -> tuple[dg.AssetObservation, dict[str, dg.AssetCheckEvaluation]]:
    """One tick of the observation sensor, its events stored as the daemon stores them."""
    context = dg.build_sensor_context(instance=instance, resources=resources_for(settings))
    result = monitor.sensor(context)
    assert not result.run_requests  # it observes; it never launches a run
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    observations = [e for e in result.asset_events if isinstance(e, dg.AssetObservation)]
    evaluations = {e.check_name: e for e in result.asset_events
                   if isinstance(e, dg.AssetCheckEvaluation)}
    assert len(observations) == 1 and set(evaluations) == {"queue_depth_within_limit",
                                                           "orders_wait_within_limit"}
    return observations[0], evaluations


def _values(metadata: dict[str, dg.MetadataValue]) -> dict[str, object]:
    return {name: value.value for name, value in metadata.items()}


def _last_status(instance: dg.DagsterInstance) -> str:
    (record,) = instance.event_log_storage.get_asset_check_execution_history(WAIT, limit=1)
    return record.status.value


def _ingest(settings: Settings, instance: dg.DagsterInstance,
            run_config: dg.RunConfig | None = None) -> None:
    """The run the completion sensor would launch."""
    job = defs.resolve_job_def("ingest_orders")
    result = job.execute_in_process(resources=resources_for(settings), instance=instance,
                                    run_config=run_config)
    assert result.success


def test_stalled_queue_fails_the_wait_check_until_a_run_drains_it(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection) -> None:
    instance = dg.DagsterInstance.ephemeral()
    monitor = queue.queue_monitor(LIMIT)
    # The completion sensor is off: nobody ticks it, and 10,000 orders wait.
    push_orders(settings, rconn, pg, 10_000, batch_size=2_000)
    age(rconn, keys, pg, PAST_LIMIT_SECONDS)

    observed, checks = _tick(monitor, instance, settings)
    seen = _values(observed.metadata)
    assert observed.asset_key == QUEUE
    assert {k: v for k, v in seen.items() if k != "oldest_queued_wait_seconds"} == {
        "queue_depth": 10_000, "claimed_batches": 0, "staged_batches": 0,
        "in_flight_batches": 0, "oldest_staged_wait_seconds": 0.0, "quarantined_batches": 0}
    assert PAST_LIMIT_SECONDS <= seen["oldest_queued_wait_seconds"] < 30

    wait = checks["orders_wait_within_limit"]
    assert not wait.passed and wait.severity == dg.AssetCheckSeverity.ERROR
    found = _values(wait.metadata)
    assert found["verdict"].startswith("stalled: orders wait longer than the limit and nothing "
                                       "was promoted meanwhile")
    assert found["waited_seconds"] == found["oldest_queued_wait_seconds"] == \
        seen["oldest_queued_wait_seconds"]
    assert (found["max_order_wait_seconds"], found["queue_depth"], found["staged_batches"],
            found["promoted_within_limit"]) == (1.0, 10_000, 0, False)
    assert "seconds_since_last_promotion" not in found  # nothing was ever promoted
    assert checks["queue_depth_within_limit"].passed  # deep is not the problem here
    assert _last_status(instance) == "FAILED"
    assert instance.fetch_observations(QUEUE, limit=1).records[0].asset_observation.metadata[
        "queue_depth"] == dg.MetadataValue.int(10_000)
    # The deployed limit (ten minutes) is not reached yet: the verdict depends on the limit.
    assert _tick(queue.MONITOR, instance, settings)[1]["orders_wait_within_limit"].passed

    _ingest(settings, instance)  # the run the sensor would have launched
    observed, checks = _tick(monitor, instance, settings)
    wait = checks["orders_wait_within_limit"]
    assert wait.passed and _last_status(instance) == "SUCCEEDED"
    found = _values(wait.metadata)
    assert (found["waited_seconds"], found["queue_depth"], found["promoted_within_limit"]) == (
        0.0, 0, True)
    assert found["verdict"] == "no order waits longer than the limit"
    assert 0 <= found["seconds_since_last_promotion"] < 1
    assert _values(observed.metadata)["queue_depth"] == 0


def test_lagging_promotion_warns_and_staged_batches_wait_too(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection) -> None:
    instance = dg.DagsterInstance.ephemeral()
    monitor = queue.queue_monitor(LIMIT)
    push_orders(settings, rconn, pg, 6_000, batch_size=2_000)
    age(rconn, keys, pg, PAST_LIMIT_SECONDS)
    # A run that takes one batch: promotion goes on, but the others still wait too long.
    one_batch = dg.RunConfig(ops={"staged_orders": orders.StagingConfig(
        workers=1, batch_size=2_000, max_batches_per_worker=1)})
    _ingest(settings, instance, one_batch)

    wait = _tick(monitor, instance, settings)[1]["orders_wait_within_limit"]
    assert not wait.passed and wait.severity == dg.AssetCheckSeverity.WARN
    found = _values(wait.metadata)
    assert (found["queue_depth"], found["promoted_within_limit"]) == (4_000, True)
    assert found["verdict"].startswith("orders wait longer than the limit while promotions go on")

    # Staged but never promoted (say promotion fails): the staged batches' wait counts.
    staged = dg.materialize(
        [orders.staged_orders], resources=resources_for(settings), instance=instance,
        run_config=dg.RunConfig(ops={"staged_orders": orders.StagingConfig(
            workers=1, batch_size=2_000)}))
    assert staged.success
    age(rconn, keys, pg, PAST_LIMIT_SECONDS)  # the last promotion, too, is that long ago
    observed, checks = _tick(monitor, instance, settings)
    seen, found = _values(observed.metadata), _values(checks["orders_wait_within_limit"].metadata)
    assert (seen["queue_depth"], seen["staged_batches"], seen["in_flight_batches"]) == (0, 2, 2)
    assert found["oldest_queued_wait_seconds"] == 0.0
    assert found["waited_seconds"] == found["oldest_staged_wait_seconds"] >= PAST_LIMIT_SECONDS
    assert checks["orders_wait_within_limit"].severity == dg.AssetCheckSeverity.ERROR


# --- the catalog --------------------------------------------------------------------------


REDIS_ASSETS = {"ingestion_queue": "{P}:ingestion", "lookup_cache": "{P}:lookup:*",
                "promoted_stream": "{P}:promoted"}


def _catalog(settings: RedisSettings) -> dict[str, dg.AssetSpec]:
    assets = [queue.INGESTION_QUEUE, *lookup.LOOKUP_TABLE_SPECS, lookup.lookup_cache,
              orders.staged_orders, orders.promoted_orders, views.sales_hourly,
              views.product_performance_daily, fanout.PROMOTED_STREAM]
    rendered = dg.map_asset_specs(catalog.rendered(settings), assets)
    return {s.key.to_user_string(): s for a in rendered
            for s in ([a] if isinstance(a, dg.AssetSpec) else a.specs)}


def test_catalog_shows_the_prefix_and_redis_uris() -> None:
    remote = RedisSettings(host="redis.internal", port=6380, db=2, ssl=True,
                           key_prefix="{shop7}")
    specs = _catalog(remote)
    assert {k for k, s in specs.items() if "dagster/uri" in s.metadata} == set(REDIS_ASSETS)
    assert specs["ingestion_queue"].metadata["dagster/uri"] == \
        "rediss://redis.internal:6380/2/{shop7}:ingestion"
    assert specs["lookup_cache"].metadata["dagster/uri"] == \
        "rediss://redis.internal:6380/2/{shop7}:lookup:*"
    assert specs["lookup_cache"].metadata["dagster/table_name"] == "redis: {shop7}:lookup:*"
    for key, spec in specs.items():
        assert "{P}" not in (spec.description or ""), key
        assert not any("{P}" in str(v) for v in spec.metadata.values()), key
    assert "the Redis list `{shop7}:ingestion`" in specs["staged_orders"].description
    # Postgres-only assets are left as written.
    assert specs["products"].description == lookup.LOOKUP_TABLE_SPECS[0].description

    # The code location renders with the environment it loaded with.
    env = RedisSettings.from_env()
    loaded = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    for key, redis_key in REDIS_ASSETS.items():
        expected = catalog.redis_uri(env, redis_key.replace("{P}", env.key_prefix))
        assert loaded[key].metadata["dagster/uri"] == expected


@pytest.mark.parametrize("schema", [STAGING_SCHEMA, ORDERS_SCHEMA, REJECTED_SCHEMA])
def test_column_descriptions_read_as_text(schema: dg.TableSchema) -> None:
    for column in schema.columns:
        if column.description:
            assert catalog.markdown_safe(column.description) == column.description


def test_markdown_safe_examples() -> None:
    assert catalog.markdown_safe("> 0") == "\\> 0"
    assert catalog.markdown_safe("  # heading") == "  \\# heading"
    assert catalog.markdown_safe("12. first") == "12\\. first"
    assert catalog.markdown_safe("- item") == "\\- item"
    assert catalog.markdown_safe("unit_price >= 0") == "unit_price >= 0"
    assert catalog.markdown_safe("2^63-1") == "2^63-1"


# Starts a markdown block: indentation, then a quote, heading, bullet, rule or table marker, or
# an ordered list's number and its period or parenthesis.
BLOCK = re_compile(r"\s*([>#*+\-|]|\d+[.)])")


@hypothesis_settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(st.sampled_from(" \t>#*+-|.)0123456789ab\\"), max_size=12))
def test_markdown_safe_escapes_only_a_leading_block_marker(text: str) -> None:
    safe = catalog.markdown_safe(text)
    assert not BLOCK.match(safe)  # nothing left for markdown to read as a block
    assert catalog.markdown_safe(safe) == safe
    if BLOCK.match(text):
        assert safe != text and safe.replace("\\", "", 1) == text  # one backslash added
    else:
        assert safe == text


@hypothesis_settings(max_examples=200, deadline=None, database=None)
@given(prefix=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1,
                      max_size=20),
       db=st.integers(0, 15), ssl=st.booleans())
def test_any_prefix_renders_into_descriptions_and_a_parseable_uri(prefix: str, db: int,
                                                                   ssl: bool) -> None:
    settings = RedisSettings(host="127.0.0.1", port=6379, db=db, ssl=ssl, key_prefix=prefix)
    spec = catalog.rendered(settings)(queue.INGESTION_QUEUE)
    uri = urlsplit(spec.metadata["dagster/uri"])
    assert uri.scheme == ("rediss" if ssl else "redis") and uri.port == 6379
    assert unquote(uri.path) == f"/{db}/{prefix}:ingestion"
    assert not uri.query and not uri.fragment
    assert f"`{prefix}:ingestion`" in spec.description
    assert spec.metadata[catalog.REDIS_KEY] == f"{prefix}:ingestion"
