"""The incrementally maintained views answer exactly what a full recompute over `orders` would."""

import random
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import redis

from orders_pipeline import generator, pipeline
from orders_pipeline.postgres_patterns.views import rebuild_rollups
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings

FULL_HOURLY = """
SELECT date_trunc('hour', order_timestamp, 'UTC') AS hour, category, count(*), sum(quantity),
       sum(total_amount_usd)
FROM orders GROUP BY 1, 2 ORDER BY 1, 2"""
FULL_DAILY = """
SELECT (order_timestamp AT TIME ZONE 'UTC')::date, product_id, count(*), sum(quantity),
       sum(total_amount_usd)
FROM orders GROUP BY 1, 2 ORDER BY 1, 2"""


def _spread_orders(pg: psycopg.Connection, count: int, seed: int) -> list[bytes]:
    """Valid orders whose timestamps span three days, in assorted UTC offsets."""
    rng = random.Random(seed)
    orders = generator.valid_orders(generator.References.load(pg), count, rng)
    start = datetime(2026, 11, 19, 22, 30, tzinfo=UTC)
    stamps = []
    for _ in range(count):
        moment = start + timedelta(seconds=rng.randrange(3 * 86400))
        offset = timedelta(hours=rng.choice([-8, -5, 0, 1, 5.5, 9]))
        stamps.append((moment + offset).strftime("%Y-%m-%dT%H:%M:%S")
                      + f"{'+' if offset >= timedelta(0) else '-'}"
                      f"{abs(offset) // timedelta(hours=1):02d}:"
                      f"{abs(offset) % timedelta(hours=1) // timedelta(minutes=1):02d}")
    return generator.to_payloads(orders.with_columns(pl.Series("order_timestamp", stamps)))


def _views(pg: psycopg.Connection) -> tuple[list[tuple], list[tuple]]:
    return (pg.execute("SELECT * FROM sales_hourly ORDER BY 1, 2").fetchall(),
            pg.execute("SELECT * FROM product_performance_daily ORDER BY 1, 2").fetchall())


def test_incremental_views_equal_full_recompute(settings: Settings, rconn: redis.Redis,
                                                keys: RedisKeys, pg: psycopg.Connection,
                                                loaded_cache: LookupCache) -> None:
    queue = OrderQueue(rconn, keys)
    backpressure = Backpressure(rconn, keys, 10**9)
    first = _spread_orders(pg, 6000, seed=1)
    generator.push_payloads(queue, backpressure, first, batch_size=1000)
    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    pipeline.promote_staged(settings, max_batches_per_round=2)  # several promotion rounds
    # The same orders again after the dedup window forgot them: promotion conflicts, which
    # must not count twice in the views.
    DedupWindow(rconn, keys, 3600).clear()
    second = _spread_orders(pg, 3000, seed=2) + first[:1500]
    generator.push_payloads(queue, backpressure, second, batch_size=1000)
    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    result = pipeline.promote_staged(settings)
    assert result.conflicts == 1500
    pipeline.refresh_all_views(settings)

    hourly, daily = _views(pg)
    assert hourly == pg.execute(FULL_HOURLY).fetchall()
    assert daily == pg.execute(FULL_DAILY).fetchall()
    assert len({row[0] for row in hourly}) > 48  # the data really spans days of hours
    assert sum(row[2] for row in hourly) == 9000

    assert rebuild_rollups(pg)
    pipeline.refresh_all_views(settings)
    assert _views(pg) == (hourly, daily)
