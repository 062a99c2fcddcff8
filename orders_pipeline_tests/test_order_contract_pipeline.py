"""The order contract end to end, on the real servers: what lands in `orders`, exactly."""

import dataclasses
import json
from decimal import Decimal

import psycopg
import pytest
import redis
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import contract, pipeline
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings


@pytest.fixture
def refs(pg: psycopg.Connection, loaded_cache: LookupCache) -> dict[str, str]:
    product = pg.execute("SELECT product_id FROM products ORDER BY 1 LIMIT 1").fetchone()[0]
    zip_code = pg.execute("SELECT zip_code FROM zip_codes ORDER BY 1 LIMIT 1").fetchone()[0]
    return {"product_id": product, "zip_code": zip_code}


def order(refs: dict[str, str], **changes: object) -> bytes:
    body = {"order_id": "o-1", "customer_id": 7, **refs, "quantity": 1, "unit_price": 10,
            "currency": "USD", "order_timestamp": "2031-03-01T10:00:00Z", **changes}
    return json.dumps(body, ensure_ascii=False).encode()


def run_pipeline(settings: Settings, rconn: redis.Redis, keys: RedisKeys,
                 batches: list[list[bytes]]) -> None:
    queue = OrderQueue(rconn, keys)
    for batch in batches:
        queue.push_batch(batch)
    pipeline.stage_queue(settings, workers=1, batch_size=10_000)
    pipeline.promote_staged(settings)


def test_first_copy_in_queue_order_wins_within_a_batch(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        refs: dict[str, str]) -> None:
    """The issue: the later copy landed when the first took the strict parse path."""
    first = order(refs, order_id="dup-1", quantity=1, note="naïve\nline")  # strict path
    later = order(refs, order_id="dup-1", quantity=2)                      # fast path
    first_b = order(refs, order_id="dup-2", quantity=3)
    later_b = order(refs, order_id="dup-2", quantity=4, note="é")
    run_pipeline(settings, rconn, keys, [[first, later, first_b, later_b]])
    rows = dict(pg.execute("SELECT order_id, quantity FROM orders").fetchall())
    assert rows == {"dup-1": 1, "dup-2": 3}


def test_first_copy_wins_across_batches(settings: Settings, rconn: redis.Redis,
                                        keys: RedisKeys, pg: psycopg.Connection,
                                        refs: dict[str, str]) -> None:
    run_pipeline(settings, rconn, keys, [[order(refs, order_id="x", quantity=5)],
                                         [order(refs, order_id="x", quantity=6, note="é")]])
    assert pg.execute("SELECT quantity FROM orders").fetchall() == [(5,)]


def test_long_ids_land_and_bad_ids_are_rejected_with_reasons(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        refs: dict[str, str]) -> None:
    long_id = "L" * 204  # the issue: rejected by an undocumented 128-character key limit
    longest = "é" * contract.ORDER_ID_MAX_CHARS
    run_pipeline(settings, rconn, keys, [[
        order(refs, order_id=long_id), order(refs, order_id=longest),
        order(refs, order_id="tab\tid"), order(refs, order_id=" lead"),
        order(refs, order_id="x" * 257)]])
    assert {r[0] for r in pg.execute("SELECT order_id FROM orders")} == {long_id, longest}
    reasons = dict(pg.execute("SELECT batch_position, reason FROM orders_rejected").fetchall())
    assert reasons == {2: contract.ORDER_ID_CONTROL, 3: contract.ORDER_ID_WHITESPACE,
                       4: contract.ORDER_ID_TOO_LONG}
    assert all(len(k) < 100 for k in rconn.scan_iter(f"{keys.prefix}:dedup:*"))


def test_overflowing_values_are_rejected_and_never_block_other_batches(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        refs: dict[str, str]) -> None:
    """The issue's example: 80 such orders stalled promotion (numeric field overflow)."""
    poison = [order(refs, order_id=f"big-{i}", quantity=1_000_000,
                    unit_price=999999999999.99, currency="GBP") for i in range(80)]
    good = [order(refs, order_id=f"ok-{i}", quantity=2, unit_price=1.25) for i in range(3)]
    run_pipeline(settings, rconn, keys, [poison, good])
    assert pg.execute("SELECT count(*), sum(total_amount) FROM orders").fetchone() == (
        3, Decimal("7.5"))
    assert pg.execute("SELECT count(*) FROM orders_rejected WHERE reason = %s",
                      (contract.UNIT_PRICE_TOO_LARGE,)).fetchone()[0] == 80


def test_exact_money_is_stored(settings: Settings, rconn: redis.Redis, keys: RedisKeys,
                               pg: psycopg.Connection, refs: dict[str, str]) -> None:
    run_pipeline(settings, rconn, keys, [[
        b'{"order_id":"m-1","customer_id":7,"product_id":"%s","quantity":2,'
        b'"unit_price":0.1234,"currency":"USD","zip_code":"%s",'
        b'"order_timestamp":"2031-03-01T10:00:00Z"}' % (refs["product_id"].encode(),
                                                       refs["zip_code"].encode()),
        order(refs, order_id="m-2", unit_price=0.12345, quantity=2),
        order(refs, order_id="m-3", unit_price=0.00005)]])
    assert pg.execute("SELECT order_id, unit_price, total_amount, total_amount_usd"
                      " FROM orders").fetchall() == [
        ("m-1", Decimal("0.1234"), Decimal("0.2468"), Decimal("0.25"))]
    assert [r[0] for r in pg.execute(
        "SELECT reason FROM orders_rejected ORDER BY batch_position")] == [
        contract.UNIT_PRICE_PLACES, contract.UNIT_PRICE_PLACES]


@st.composite
def copies(draw: st.DrawFn, refs: dict[str, str]) -> list[list[bytes]]:
    """Batches whose payloads share a few ids, some invalid, some on the strict parse path."""
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        batch = []
        for _ in range(draw(st.integers(1, 6))):
            extra = draw(st.sampled_from([{}, {"note": "é"}, {"note": "a\nb"}, {}]))
            batch.append(order(refs, order_id=draw(st.sampled_from(["a", "b", "c"])),
                               quantity=draw(st.integers(0, 3)), **extra))
        batches.append(batch)
    return batches


def test_first_valid_copy_wins_whatever_the_parse_path(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        refs: dict[str, str]) -> None:
    examples = iter(range(1_000_000))

    @hypothesis_settings(max_examples=15, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        batches = data.draw(copies(refs))
        own = dataclasses.replace(settings, redis=dataclasses.replace(
            settings.redis, key_prefix=f"{settings.redis.key_prefix}:{next(examples)}"))
        pg.execute("TRUNCATE orders, order_ids, orders_rejected, ingest_batches, orders_staging,"
                   " sales_hourly_rollup, product_daily_rollup")
        run_pipeline(own, rconn, RedisKeys(own.redis.key_prefix), batches)
        expected: dict[str, int] = {}
        for raw in (p for batch in batches for p in batch):
            body = json.loads(raw)
            if body["quantity"] >= 1:
                expected.setdefault(body["order_id"], body["quantity"])
        assert dict(pg.execute("SELECT order_id, quantity FROM orders").fetchall()) == expected

    check()
