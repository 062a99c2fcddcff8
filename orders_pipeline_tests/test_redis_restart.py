"""What a Redis crash does to the queue, under each persistence setting, on a throwaway server.

Each test starts its own `redis-server` (`redis_servers`: free port, its own --dir under
tmp_path, never the shared one), SIGKILLs it and starts it again on the same port and
directory; a dead worker's lease is made to run out at once (`expire_leases`). Postgres stays
the test's own database. With `appendfsync always` nothing acknowledged is lost; with
`everysec` a crash keeps a prefix of whole batches (MULTI is all or nothing in the AOF too);
without persistence everything is gone and the producer must be able to tell; and when
`noeviction` memory runs out pushes fail loudly while every acknowledged batch stays whole.
"""

import json
import random
import threading
from dataclasses import replace

import psycopg
import pytest
import redis

from orders_pipeline import generator, pipeline
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import assert_exactly_once, expire_leases
from orders_pipeline_tests.servers import RedisFactory, RedisServer


def on_server(settings: Settings, server: RedisServer) -> Settings:
    """The test's settings (own database, own prefix) pointed at the throwaway Redis."""
    return replace(settings, redis=replace(settings.redis, port=server.port))


def queue_state(client: redis.Redis, keys: RedisKeys) -> dict[str, object]:
    """Everything the queue keeps: list, leases, owners, batches, counters, signal log."""
    inflight = client.zrange(keys.inflight, 0, -1, withscores=True)
    seen = [keys.signal_seen(json.loads(fields[b"data"])["batch_id"])
            for _, fields in client.xrange(keys.signals_stream)]
    return {
        "ingestion": client.lrange(keys.ingestion, 0, -1),
        "inflight": inflight,
        "owners": client.hgetall(keys.owners),
        "batches": {b: client.lrange(keys.batch(b.decode()), 0, -1) for b, _ in inflight},
        "counters": client.hgetall(keys.counters),
        "signals": client.xrange(keys.signals_stream),
        "seen_markers_with_ttl": [client.pttl(k) > 0 for k in seen],
    }


def build_orders(pg: psycopg.Connection, count: int, seed: int, **mix: float) -> list[bytes]:
    payloads, _ = generator.build_payloads(generator.References.load(pg), count, seed=seed,
                                           **mix)
    return payloads


def chunks(payloads: list[bytes], size: int) -> list[list[bytes]]:
    return [payloads[i:i + size] for i in range(0, len(payloads), size)]


def drain_and_promote(settings: Settings, client: redis.Redis) -> int:
    """The real workers and promotion, once dead workers' leases have run out (forced).

    Returns how many batches the workers took over from a dead one."""
    expire_leases(client, RedisKeys(settings.redis.key_prefix))
    stats = pipeline.stage_queue(settings, workers=1, batch_size=1000)
    pipeline.promote_staged(settings)
    return stats.reclaimed_batches


def test_appendfsync_always_keeps_everything_acknowledged(
        settings: Settings, pg: psycopg.Connection, redis_servers: RedisFactory) -> None:
    """Every key the queue keeps comes back exactly, and the pipeline carries on from it."""
    server = redis_servers("--appendonly", "yes", "--appendfsync", "always")
    local = on_server(settings, server)
    keys = RedisKeys(local.redis.key_prefix)
    client = server.client()
    queue = OrderQueue(client, keys)
    payloads = build_orders(pg, 5000, seed=3, duplicates=0.05, invalid=0.02)
    for batch in chunks(payloads, 1000):
        queue.push_batch(batch)
    claimed = [queue.claim_batch(800, "worker-that-dies") for _ in range(2)]
    assert all(claimed)
    before = queue_state(client, keys)

    server.restart()

    client = server.client()
    assert queue_state(client, keys) == before
    assert OrderQueue(client, keys).depth() == 5000 - 2 * 800
    assert int(client.hget(keys.counters, "accepted")) == 5000
    assert client.xlen(keys.signals_stream) == 5
    assert before["seen_markers_with_ttl"] == [True] * 5
    assert drain_and_promote(local, client) == 2  # the batches the dead worker held
    assert_exactly_once(local, client, pg, payloads)


def push_until_killed(queue: OrderQueue, server: RedisServer, rng: random.Random, first: int
                      ) -> tuple[list[tuple[str, list[bytes]]], int]:
    """Push batches flat out until the server is SIGKILLed at a random moment.

    Returns the batches attempted, in order, and how many of them were acknowledged.
    """
    attempted: list[tuple[str, list[bytes]]] = []
    acknowledged = 0
    killer = threading.Timer(rng.uniform(0.2, 0.8), server.kill)
    killer.start()
    try:
        with pytest.raises(redis.ConnectionError):
            for n in range(first, first + 1_000_000):
                batch = [json.dumps({"order_id": f"{n}-{i}", "pad": "x" * 80}).encode()
                         for i in range(rng.randint(1, 2000))]
                attempted.append((f"batch-{n:07d}", batch))
                # One attempt (`push_batch_once` would ride out the outage): the kill
                # ends the loop.
                queue.shards[0].push_batch(batch, batch_id=attempted[-1][0])
                acknowledged += 1
    finally:
        killer.join()
    return attempted, acknowledged


def test_appendfsync_everysec_keeps_whole_batches(
        settings: Settings, redis_servers: RedisFactory) -> None:
    """SIGKILL the server at random moments while a producer pushes as fast as it can.

    After each restart what survives is the earlier survivors plus a prefix of the batches
    pushed since, each one whole: queue, `accepted` counter and signal log agree exactly.
    Acknowledged pushes can be lost only from the tail (everysec fsyncs once a second; a
    killed *process* still leaves its writes in the page cache, so usually nothing is lost
    here, while a power cut could lose about a second). The losses are printed, not
    asserted: they depend on timing.
    """
    server = redis_servers("--appendonly", "yes", "--appendfsync", "everysec")
    keys = RedisKeys(settings.redis.key_prefix)
    rng = random.Random()
    kept: list[tuple[str, list[bytes]]] = []
    for round_no in range(3):
        attempted, acknowledged = push_until_killed(
            OrderQueue(server.client(), keys), server, rng, first=round_no * 1_000_000)
        server.start()

        client = server.client()
        survived = [json.loads(fields[b"data"])["batch_id"]
                    for _, fields in client.xrange(keys.signals_stream)]
        now_kept = len(survived) - len(kept)
        assert 0 <= now_kept <= len(attempted)
        kept += attempted[:now_kept]
        assert survived == [batch_id for batch_id, _ in kept]  # a prefix, in push order
        orders = [p for _, batch in kept for p in batch]
        assert client.lrange(keys.ingestion, 0, -1) == orders[::-1]  # whole batches only
        assert int(client.hget(keys.counters, "accepted") or 0) == len(orders)
        lost = attempted[now_kept:acknowledged]
        in_flight = "survived" if now_kept > acknowledged else "was lost"
        print(f"\neverysec + SIGKILL: {acknowledged} batches acknowledged, {now_kept} "
              f"survived; lost {len(lost)} acknowledged batches "
              f"({sum(len(b) for _, b in lost)} orders); the unacknowledged one {in_flight}")
        client.close()


def test_without_persistence_a_restart_loses_everything_and_says_so(
        settings: Settings, redis_servers: RedisFactory) -> None:
    """Documents what a Redis without persistence (`--appendonly no --save ""`) loses.

    A restart empties it: orders queued but not yet claimed, in-flight batches (claimed,
    staged but not promoted) with their leases, the dedup window (a re-sent order is no
    longer recognised there; `orders`' primary key still keeps it out), the signal log the
    sensor reads from, and the counters. `push_batch` returning means "in memory" only.
    The producer learns of the restart from `OrderQueue.server_run_id()`, which changes with
    every start (as does INFO's uptime); it must then replay what it pushed since.
    """
    server = redis_servers("--appendonly", "no")
    keys = RedisKeys(settings.redis.key_prefix)
    client = server.client()
    queue = OrderQueue(client, keys)
    for n in range(3):
        queue.push_batch([json.dumps({"order_id": f"{n}-{i}"}).encode() for i in range(100)])
    assert queue.claim_batch(50, "worker") is not None
    dedup = DedupWindow(client, keys, 3600)
    assert dedup.check_and_mark(["a", "b"], ["t:0", "t:1"]) == [True, True]
    run_id = queue.server_run_id()
    assert queue.server_run_id() == run_id  # stable while the server lives
    assert client.dbsize() > 0

    server.restart()

    client = server.client()
    queue = OrderQueue(client, keys)
    assert queue.server_run_id() != run_id
    assert int(client.info("server")["uptime_in_seconds"]) < 30
    assert client.dbsize() == 0
    assert queue.depth() == 0 and queue.claimed_batches() == 0
    assert client.hgetall(keys.counters) == {}
    assert client.xlen(keys.signals_stream) == 0
    dedup = DedupWindow(client, keys, 3600)
    assert dedup.check_and_mark(["a", "b"], ["u:0", "u:1"]) == [True, True]  # forgotten


def test_full_redis_refuses_loudly_and_keeps_every_acknowledged_batch(
        settings: Settings, pg: psycopg.Connection, redis_servers: RedisFactory) -> None:
    """`--maxmemory 2mb`, noeviction, AOF always.

    Pushing until full raises (never a silent drop) and the refused batch leaves no trace,
    not even in the AOF: after a SIGKILL and restart exactly the acknowledged batches are
    back. Workers cannot drain a full Redis either (their dedup marks and lookup snapshot
    need memory): they fail loudly and lose nothing. Once an operator adds memory the
    producer re-sends the refused batch and every order lands exactly once.
    """
    server = redis_servers("--appendonly", "yes", "--appendfsync", "always",
                          "--maxmemory", "2mb")
    local = on_server(settings, server)
    keys = RedisKeys(local.redis.key_prefix)
    client = server.client()
    queue = OrderQueue(client, keys)
    batches = chunks(build_orders(pg, 40_000, seed=5), 250)
    acknowledged: list[list[bytes]] = []
    with pytest.raises(redis.ResponseError, match="maxmemory"):
        for batch in batches:
            queue.push_batch(batch)
            acknowledged.append(batch)
    refused = batches[len(acknowledged)]
    assert acknowledged

    def assert_exactly_the_acknowledged() -> None:
        orders = [p for batch in acknowledged for p in batch]
        assert client.lrange(keys.ingestion, 0, -1) == orders[::-1]
        assert int(client.hget(keys.counters, "accepted")) == len(orders)
        counts = [json.loads(f[b"data"])["count"] for _, f in client.xrange(keys.signals_stream)]
        assert counts == [len(batch) for batch in acknowledged]

    assert_exactly_the_acknowledged()
    server.restart()
    client = server.client()
    assert_exactly_the_acknowledged()

    with pytest.raises(redis.ResponseError, match="maxmemory"):
        pipeline.stage_queue(local, workers=1, batch_size=1000)
    assert client.ping()  # the server is up; only memory is short
    client.config_set("maxmemory", "64mb")  # the operator adds memory
    OrderQueue(client, keys).push_batch(refused)
    assert drain_and_promote(local, client) == 1  # the batch the failed worker had claimed
    assert_exactly_once(local, client, pg, [p for b in [*acknowledged, refused] for p in b])
