"""Shared helpers: resources, subprocess environments and independent expectations."""

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import psycopg
import redis
from psycopg import sql

from orders_pipeline import generator
from orders_pipeline.postgres_patterns.views import ROLLUPS
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape
from orders_pipeline.redis_patterns.lookup_cache import LOOKUP_TABLES
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.resources import resources_for  # noqa: F401  (re-exported for tests)
from orders_pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60,
             interval: float = 0.05) -> None:
    """Return once `predicate()` is true; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def pipeline_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """Environment for a CLI or worker subprocess: every setting of `settings` (the test's own
    database and prefix), rendered by the settings model itself."""
    return {**os.environ, **settings.to_env(), **overrides}


def dagster_env(settings: Settings, home: Path) -> dict[str, str]:
    """Environment for a Dagster subprocess: the test's database/prefix, its own home."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    return pipeline_env(settings, DAGSTER_HOME=str(home))


def expected_orders(payloads: list[bytes], pg: psycopg.Connection
                    ) -> dict[str, tuple[Decimal, Decimal]]:
    """order_id -> (total_amount, total_amount_usd) computed independently with Decimal."""
    rates = dict(pg.execute("SELECT currency_code::text, rate_to_usd FROM currencies"))
    out: dict[str, tuple[Decimal, Decimal]] = {}
    for raw in payloads:
        try:
            order = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(order, dict) or "unit_price" not in order:
            continue
        price = Decimal(str(order["unit_price"])).quantize(Decimal("0.0001"))
        quantity = order["quantity"]
        if not isinstance(quantity, int) or quantity <= 0:
            continue
        total = price * quantity
        rate = rates.get(order.get("currency"))
        if rate is None:
            continue
        usd = (total * rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        out[order["order_id"]] = (total, usd)
    return out


def push_orders(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, count: int,
                *, batch_size: int = 2000, seed: int = 7, **mix: float
                ) -> tuple[list[bytes], dict[str, int]]:
    """Generate `count` payloads (duplicates/invalid fractions in `mix`) and enqueue them."""
    refs = generator.References.load(pg)
    payloads, summary = generator.build_payloads(refs, count, seed=seed, **mix)
    keys = RedisKeys.of(settings.redis)
    generator.push_payloads(OrderQueue(rconn, keys), Backpressure(rconn, keys, 10**9),
                            payloads, batch_size=batch_size)
    return payloads, summary


def is_generated_valid(payload: bytes) -> bool:
    """True for the generator's valid orders: compact JSON (Polars' `write_ndjson`) with a
    UUIDv7 id; its invalid ones are `json.dumps` text (`{"order_id": "bad-…`) or not JSON."""
    return payload.startswith(b'{"order_id":"')


def valid_order_ids(payloads: list[bytes]) -> set[str]:
    """Ids of the generator's valid orders."""
    return {json.loads(p)["order_id"] for p in payloads if is_generated_valid(p)}


def expire_leases(client: redis.Redis, keys: RedisKeys) -> int:
    """Make every claimed batch's lease run out now, instead of sleeping until it does.

    Sets each deadline in `{P}:inflight` to 0 (ms, Redis clock), as `OrderQueue.requeue`
    does, so the next `reclaim_expired` or drain takes the batches over at once, as if
    their workers had died a lease ago. Batches released meanwhile are not re-added (XX).
    Returns how many leases ran out (in every shard of `keys`).
    """
    expired = 0
    for space in keys.shard_spaces:
        batch_ids = client.zrange(space.inflight, 0, -1)
        if batch_ids:
            client.zadd(space.inflight, dict.fromkeys(batch_ids, 0), xx=True)
        expired += len(batch_ids)
    return expired


def assert_exactly_once(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
                        payloads: list[bytes]) -> None:
    """Every valid order in `orders` once, every invalid one rejected once, nothing left."""
    expected = valid_order_ids(payloads)
    ids = [r[0] for r in pg.execute("SELECT order_id FROM orders")]
    assert len(ids) == len(set(ids))
    assert set(ids) == expected, (len(ids), len(expected))
    invalid = sorted(p for p in payloads if not is_generated_valid(p))
    rejected = sorted(bytes(r[0]) for r in pg.execute("SELECT raw_payload FROM orders_rejected"))
    assert rejected == invalid
    assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0
    duplicates = pg.execute("SELECT coalesce(sum(duplicate_rows), 0) FROM ingest_batches"
                            " WHERE status = 'promoted'").fetchone()[0]
    assert len(ids) + len(rejected) + duplicates == len(payloads)
    for keys in RedisKeys.of(settings.redis).shard_spaces:
        assert rconn.llen(keys.ingestion) == 0
        assert rconn.zcard(keys.inflight) == 0 and rconn.zcard(keys.staged) == 0
        assert not list(rconn.scan_iter(match=f"{glob_escape(keys.prefix)}:batch:*",
                                        count=10_000))


def fresh_example(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection) -> Settings:
    """Empty tables and a new key prefix (under the test's) with a copy of the lookup cache.

    For one example of a property test: the orders tables, the ledger and the view rollups
    are emptied. A new prefix instead of deleting keys: SCAN over a busy shared Redis is
    slow, and the test's own prefix, with everything under it, is removed by the fixture at
    the end.
    """
    tables = ("orders", "order_ids", "orders_staging", "orders_rejected", "ingest_batches",
              "promotions",
              *ROLLUPS)
    pg.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, tables))))
    base = RedisKeys(settings.redis.key_prefix)
    prefix = f"{base.prefix}:{uuid.uuid4().hex[:8]}"
    fresh = RedisKeys(prefix)
    for table in LOOKUP_TABLES:
        assert rconn.copy(base.lookup(table.name), fresh.lookup(table.name))
    assert rconn.copy(base.lookup_meta, fresh.lookup_meta)
    return dataclasses.replace(settings, redis=dataclasses.replace(settings.redis,
                                                                   key_prefix=prefix))
