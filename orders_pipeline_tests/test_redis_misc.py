"""Lookup cache, completion signals, order-rate window and backpressure, each on its own."""

import json
import threading
import time
from datetime import datetime

import psycopg
import pytest
import redis

from orders_pipeline.connections import pg_connect
from orders_pipeline.generator import References, build_payloads, push_payloads
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import (
    LOOKUP_TABLES,
    LookupCache,
    LookupCacheMissing,
)
from orders_pipeline.redis_patterns.order_window import OrderRateWindow
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.redis_patterns.signals import CompletionSignals
from orders_pipeline.settings import Settings

# --- lookup cache ---------------------------------------------------------------------------


def test_snapshot_counts_match_postgres(loaded_cache: LookupCache, pg: psycopg.Connection,
                                        rconn: redis.Redis, keys: RedisKeys) -> None:
    info = loaded_cache.info()
    for table in ("products", "currencies", "zip_codes"):
        expected = pg.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        assert expected > 0
        assert rconn.hlen(keys.lookup(table)) == expected
        assert info[f"rows:{table}"] == expected
    assert loaded_cache.size() == sum(info[f"rows:{t.name}"] for t in LOOKUP_TABLES)
    assert list(rconn.scan_iter(match=f"{keys.prefix}:lookup:*:loading")) == []


def test_every_lookup_key_has_a_ttl(loaded_cache: LookupCache, rconn: redis.Redis,
                                    keys: RedisKeys, settings: Settings) -> None:
    ttl = settings.pipeline.lookup_ttl_seconds
    lookup_keys = list(rconn.scan_iter(match=f"{keys.prefix}:lookup:*"))
    assert sorted(lookup_keys) == sorted(
        [keys.lookup(t.name).encode() for t in LOOKUP_TABLES] + [keys.lookup_meta.encode()])
    for key in lookup_keys:
        assert 0 < rconn.ttl(key) <= ttl, key


def test_fetch_returns_known_ids_only(loaded_cache: LookupCache, pg: psycopg.Connection) -> None:
    product, category = pg.execute(
        "SELECT product_id, category FROM products ORDER BY product_id LIMIT 1").fetchone()
    zip_code, region, zone = pg.execute(
        "SELECT zip_code, region, shipping_zone FROM zip_codes ORDER BY zip_code LIMIT 1"
    ).fetchone()
    eur = pg.execute("SELECT rate_to_usd::text FROM currencies WHERE currency_code = 'EUR'"
                     ).fetchone()[0]

    frames = loaded_cache.fetch({
        "products": [product, "P-NOPE"],
        "currencies": ["EUR", "USD", "XXX"],
        "zip_codes": ["nope", zip_code],
    })

    assert frames["products"].rows() == [(product, category)]
    assert dict(frames["currencies"].rows()) == {"EUR": eur, "USD": "1.00000000"}
    assert frames["zip_codes"].rows() == [(zip_code, region, str(zone))]
    empty = loaded_cache.fetch({})
    assert all(frame.is_empty() for frame in empty.values())


def test_missing_cache_raises(settings: Settings, rconn: redis.Redis, keys: RedisKeys,
                              pg: psycopg.Connection) -> None:
    cache = LookupCache(rconn, keys, settings.pipeline.lookup_ttl_seconds)
    with pytest.raises(LookupCacheMissing):
        cache.fetch({"products": ["P000001"]})
    cache.load_snapshot(pg)
    assert cache.is_loaded()
    rconn.delete(keys.lookup("zip_codes"))  # one table expired
    with pytest.raises(LookupCacheMissing):
        cache.fetch({"products": ["P000001"]})
    assert cache.ensure_loaded(pg) is not None
    assert cache.ensure_loaded(pg) is None  # already there: no reload
    assert cache.fetch({"products": ["P000001"]})["products"].height == 1


def test_snapshot_swap_is_atomic(loaded_cache: LookupCache, settings: Settings,
                                 pg: psycopg.Connection) -> None:
    """A reader sees the old snapshot or the new one, never a half-written or empty one."""
    versions = ("P-SWAP-A", "P-SWAP-B")
    pg.execute("INSERT INTO products VALUES (%s, 'swap', 'Books', 1.00)", (versions[0],))
    stop = threading.Event()
    reads: list[int] = []
    bad: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                found = loaded_cache.fetch({"products": list(versions)})["products"]
            except LookupCacheMissing as exc:  # a gap between two snapshots
                bad.append(exc)
                continue
            present = found["product_id"].to_list()
            reads.append(len(present))
            if len(present) != 1:
                bad.append(present)

    with pg_connect(settings.postgres) as loader:
        loaded_cache.load_snapshot(loader)
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for n in range(1, 7):
                old, new = versions[(n - 1) % 2], versions[n % 2]
                with pg.transaction():
                    pg.execute("DELETE FROM products WHERE product_id = %s", (old,))
                    pg.execute("INSERT INTO products VALUES (%s, 'swap', 'Books', 1.00)", (new,))
                loaded_cache.load_snapshot(loader)
                found = loaded_cache.fetch({"products": list(versions)})["products"]
                assert found["product_id"].to_list() == [new]  # stale ids vanish
        finally:
            stop.set()
            thread.join(timeout=30)
    assert reads, "the reader never ran"
    assert bad == []


# --- completion signals -----------------------------------------------------------------------


def test_push_records_and_broadcasts_the_signal(rconn: redis.Redis, keys: RedisKeys) -> None:
    pubsub = rconn.pubsub()
    try:
        pubsub.subscribe(keys.signals_channel)
        deadline = time.monotonic() + 5
        while (msg := pubsub.get_message(timeout=0.5)) is None or msg["type"] != "subscribe":
            assert time.monotonic() < deadline, "no subscribe confirmation"

        batch_id = OrderQueue(rconn, keys).push_batch([b"{}"] * 7)

        message = None
        while message is None:
            assert time.monotonic() < deadline, "signal never arrived on pub/sub"
            message = pubsub.get_message(timeout=0.5)
    finally:
        pubsub.close()
    assert message["type"] == "message"
    body = json.loads(message["data"])
    assert body["batch_id"] == batch_id and body["count"] == 7
    assert datetime.fromisoformat(body["published_at"]).utcoffset() is not None
    recorded = CompletionSignals(rconn, keys).read_after(None).signals
    assert [(s.batch_id, s.count, s.published_at) for s in recorded] == [
        (batch_id, 7, body["published_at"])]


def test_read_after_is_exclusive_of_the_cursor(rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    ids = [queue.push_batch([b"{}"] * n, batch_id=f"b{n}") for n in (1, 2, 3)]
    signals = CompletionSignals(rconn, keys)

    everything = signals.read_after(None).signals
    assert [s.batch_id for s in everything] == ids
    assert [s.count for s in everything] == [1, 2, 3]
    after_first = signals.read_after(everything[0].stream_id).signals
    assert [s.batch_id for s in after_first] == ids[1:]
    assert signals.read_after(everything[-1].stream_id).signals == []
    assert [s.batch_id for s in signals.read_after(None, limit=2).signals] == ids[:2]


def test_append_records_a_published_only_signal_once(rconn: redis.Redis,
                                                     keys: RedisKeys) -> None:
    signals = CompletionSignals(rconn, keys)
    OrderQueue(rconn, keys).push_batch([b"{}"], batch_id="ours")
    upstream = json.dumps({"batch_id": "upstream-1", "count": 5,
                           "published_at": "2024-05-01T10:00:00+00:00"}).encode()

    stream_id = signals.append(upstream)
    assert stream_id is not None
    assert signals.append(upstream) is None  # heard twice, recorded once
    assert signals.append(json.dumps({"batch_id": "ours", "count": 1,
                                      "published_at": "2024-05-01T10:00:00Z"}).encode()) is None
    for garbage in (b"not json", b"\xff\xfe", b"[1, 2]", b'{"count": 3}',
                    b'{"batch_id": 42}', b""):
        assert signals.append(garbage) is None, garbage

    recorded = signals.read_after(None).signals
    assert [(s.batch_id, s.count) for s in recorded] == [("ours", 1), ("upstream-1", 5)]
    assert recorded[1].stream_id == stream_id


# --- order-rate window ------------------------------------------------------------------------


def test_window_counts_orders_per_minute(rconn: redis.Redis, keys: RedisKeys) -> None:
    window = OrderRateWindow(rconn, keys)
    now = time.time()
    minute = int(now) // 60 * 60
    window.add_counts("b1", {minute: 5, minute - 60: 3})
    window.add_counts("b2", {minute: 2})

    assert window.per_minute(now) == {minute - 60: 3, minute: 7}
    window.add_counts("b1", {minute: 5, minute - 60: 3})  # a retried batch
    assert window.per_minute(now) == {minute - 60: 3, minute: 7}
    assert window.total(now) == 10
    assert 0 < rconn.ttl(keys.order_window) <= 2 * window.window_seconds


def test_window_trims_minutes_that_slid_out(rconn: redis.Redis, keys: RedisKeys) -> None:
    window = OrderRateWindow(rconn, keys)
    now = time.time()
    minute = int(now) // 60 * 60
    two_hours_ago = minute - 7200
    rconn.zadd(keys.order_window, {f"{two_hours_ago}:old:4": two_hours_ago})
    assert window.per_minute(now) == {}  # outside the window even before trimming

    window.add_counts("b1", {minute: 1, two_hours_ago: 9})

    members = [m.decode() for m in rconn.zrange(keys.order_window, 0, -1)]
    assert members == [f"{minute}:b1:1"]
    assert window.per_minute(now) == {minute: 1}


# --- backpressure -----------------------------------------------------------------------------


def test_wait_for_room_blocks_until_drained(rconn: redis.Redis, keys: RedisKeys) -> None:
    rconn.lpush(keys.ingestion, *[b"{}"] * 15)
    backpressure = Backpressure(rconn, keys, max_queue_depth=10, poll_seconds=0.05)
    assert backpressure.is_active()
    draining = threading.Event()

    def drainer() -> None:
        deadline = time.monotonic() + 10
        while rconn.hget(keys.counters, "backpressure_waits") is None:  # producer is waiting
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        time.sleep(1)
        draining.set()
        rconn.rpop(keys.ingestion, 10)

    thread = threading.Thread(target=drainer)
    thread.start()
    seen: list[int] = []
    try:
        waited = backpressure.wait_for_room(on_wait=seen.append, timeout_seconds=30)
    finally:
        thread.join(timeout=30)

    assert draining.is_set()  # it returned only because the queue was drained
    assert waited > 0
    assert seen == [15]
    assert int(rconn.hget(keys.counters, "backpressure_waits")) == 1
    assert not backpressure.is_active()


def test_wait_for_room_passes_when_there_is_room(rconn: redis.Redis, keys: RedisKeys) -> None:
    rconn.lpush(keys.ingestion, *[b"{}"] * 9)
    seen: list[int] = []
    Backpressure(rconn, keys, max_queue_depth=10).wait_for_room(on_wait=seen.append)
    assert seen == []
    assert rconn.hget(keys.counters, "backpressure_waits") is None


def test_wait_for_room_times_out_loudly(rconn: redis.Redis, keys: RedisKeys) -> None:
    rconn.lpush(keys.ingestion, b"{}")
    backpressure = Backpressure(rconn, keys, max_queue_depth=1, poll_seconds=0.05)
    with pytest.raises(TimeoutError, match="MAX_QUEUE_DEPTH=1"):
        backpressure.wait_for_room(timeout_seconds=0.3)
    assert rconn.llen(keys.ingestion) == 1


def test_producer_under_backpressure_never_drops(rconn: redis.Redis, keys: RedisKeys,
                                                 pg: psycopg.Connection) -> None:
    payloads, _ = build_payloads(References.load(pg), 400, duplicates=0.1, invalid=0.1,
                                 seed=11)
    queue = OrderQueue(rconn, keys)
    backpressure = Backpressure(rconn, keys, max_queue_depth=30, poll_seconds=0.02)
    produced = threading.Event()
    received: list[bytes] = []

    def drainer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            batch = queue.claim_batch(5, "drainer")
            if batch is None:
                if produced.is_set():
                    return
            else:
                received.extend(batch.payloads)
                queue.release([batch.batch_id])
            time.sleep(0.01)

    thread = threading.Thread(target=drainer)
    thread.start()
    try:
        batches, _ = push_payloads(queue, backpressure, payloads, batch_size=10)
    finally:
        produced.set()
        thread.join(timeout=60)

    assert batches == 40
    assert received == payloads
    assert int(rconn.hget(keys.counters, "accepted")) == 400
    assert int(rconn.hget(keys.counters, "backpressure_waits")) >= 1
