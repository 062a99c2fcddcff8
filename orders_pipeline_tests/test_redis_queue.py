"""The ingestion queue on its own: atomic FIFO pushes, leased batch claims, reclaim, release."""

import json
import threading
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline.redis_patterns.keys import RedisKeys, shard_of_batch, shard_of_order
from orders_pipeline.redis_patterns.queue import ClaimedBatch, OrderQueue
from orders_pipeline.redis_patterns.signals import parse_signal
from orders_pipeline_tests.helpers import expire_leases
from orders_pipeline_tests.servers import RedisFactory


def payloads(tag: str, n: int) -> list[bytes]:
    return [json.dumps({"order_id": f"{tag}-{i}"}).encode() for i in range(n)]


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_push_batch_is_fifo_across_batches(rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    first, second = payloads("a", 5), payloads("b", 5)
    queue.push_batch(first)
    queue.push_batch(second)
    assert queue.depth() == 10

    claimed = queue.claim_batch(7, "w1")
    rest = queue.claim_batch(7, "w1")

    assert claimed is not None and rest is not None
    assert claimed.payloads == (first + second)[:7]
    assert rest.payloads == (first + second)[7:]


def test_push_batch_writes_counter_and_signal_with_the_orders(rconn: redis.Redis,
                                                               keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    batch_id = queue.push_batch(payloads("a", 3), batch_id="batch-1")
    queue.push_batch(payloads("b", 2))

    assert batch_id == "batch-1"
    assert int(rconn.hget(keys.counters, "accepted")) == 5
    entries = rconn.xrange(keys.signals_stream)
    bodies = [json.loads(fields[b"data"]) for _, fields in entries]
    assert [b["count"] for b in bodies] == [3, 2]
    assert bodies[0]["batch_id"] == "batch-1"
    assert rconn.exists(keys.signal_seen("batch-1")) == 1


@pytest.fixture
def tiny_redis(redis_servers: RedisFactory) -> redis.Redis:
    """A throwaway redis-server with almost no memory to spare, never the shared one."""
    client = redis_servers().client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 512 * 1024)
    return client


def test_push_batch_is_all_or_nothing_when_redis_is_full(tiny_redis: redis.Redis) -> None:
    keys = RedisKeys("full")
    queue = OrderQueue(tiny_redis, keys)
    batch = [b"x" * 10_000] * 20
    pushed = 0
    with pytest.raises(redis.ResponseError, match="maxmemory"):
        for _ in range(1000):
            queue.push_batch(batch)
            pushed += 1

    assert pushed > 0
    depth = queue.depth()
    assert depth == pushed * len(batch)
    assert int(tiny_redis.hget(keys.counters, "accepted")) == depth
    signalled = sum(json.loads(f[b"data"])["count"]
                    for _, f in tiny_redis.xrange(keys.signals_stream))
    assert signalled == depth


def test_claim_batch_moves_whole_batch_under_a_lease(rconn: redis.Redis,
                                                     keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys, lease_seconds=60)
    items = payloads("a", 4)
    queue.push_batch(items)
    now_ms = redis_now_ms(rconn)

    batch = queue.claim_batch(10, "worker-a")

    assert batch is not None and not batch.reclaimed
    assert batch.owner == "worker-a"
    assert batch.payloads == items
    assert queue.depth() == 0
    assert rconn.lrange(keys.batch(batch.batch_id), 0, -1) == items
    deadline = rconn.zscore(keys.inflight, batch.batch_id)
    assert deadline is not None and now_ms + 55_000 <= deadline <= now_ms + 62_000
    assert rconn.hget(keys.owners, batch.batch_id) == b"worker-a"
    assert queue.claimed_batches() == 1


def test_claim_batch_on_empty_queue_returns_none(rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    assert queue.claim_batch(10, "w") is None
    assert rconn.zcard(keys.inflight) == 0
    assert rconn.hlen(keys.owners) == 0


def test_expired_lease_is_reclaimed_by_another_worker_not_before(rconn: redis.Redis,
                                                                 keys: RedisKeys) -> None:
    worker_a = OrderQueue(rconn, keys, lease_seconds=60)
    worker_b = OrderQueue(rconn, keys, lease_seconds=60)
    worker_a.push_batch(payloads("a", 3))
    claimed = worker_a.claim_batch(10, "a")
    assert claimed is not None

    assert worker_b.reclaim_expired("b") is None  # lease still running

    assert expire_leases(rconn, keys) == 1  # A died a lease ago
    reclaimed = worker_b.reclaim_expired("b")
    assert reclaimed is not None and reclaimed.batch_id == claimed.batch_id
    assert reclaimed.reclaimed and reclaimed.owner == "b"
    assert reclaimed.payloads == claimed.payloads
    assert rconn.hget(keys.owners, claimed.batch_id) == b"b"
    # B's own (long) lease now protects it from a third worker.
    assert worker_b.reclaim_expired("c") is None
    # A lost its lease: its heartbeat and its hand-over are refused.
    assert worker_a.extend_lease(claimed) is False
    assert worker_a.mark_staged(claimed) is False
    assert worker_b.extend_lease(reclaimed) is True


def test_concurrent_reclaimers_never_share_a_batch(rconn: redis.Redis, keys: RedisKeys) -> None:
    dying = OrderQueue(rconn, keys, lease_seconds=60)
    for n in range(30):
        dying.push_batch(payloads(f"b{n}", 2))
    claimed = set()
    while (batch := dying.claim_batch(2, "dead")) is not None:
        claimed.add(batch.batch_id)
    assert len(claimed) == 30
    assert expire_leases(rconn, keys) == 30
    assert rconn.zcount(keys.inflight, "-inf", redis_now_ms(rconn)) == 30

    barrier = threading.Barrier(4)
    taken: list[list[str]] = [[] for _ in range(4)]

    def reclaimer(n: int) -> None:
        pool = redis.ConnectionPool(**rconn.connection_pool.connection_kwargs)
        try:
            queue = OrderQueue(redis.Redis(connection_pool=pool), keys, lease_seconds=60)
            barrier.wait()
            while (batch := queue.reclaim_expired(f"r{n}")) is not None:
                taken[n].append(batch.batch_id)
        finally:
            pool.disconnect()

    threads = [threading.Thread(target=reclaimer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    everything = [b for per_thread in taken for b in per_thread]
    assert sorted(everything) == sorted(claimed)  # each batch exactly once
    owners = {k.decode(): v.decode() for k, v in rconn.hgetall(keys.owners).items()}
    for n, per_thread in enumerate(taken):
        assert all(owners[b] == f"r{n}" for b in per_thread)


def test_mark_staged_only_by_the_owner(rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    queue.push_batch(payloads("a", 3))
    batch = queue.claim_batch(10, "owner")
    assert batch is not None
    impostor = ClaimedBatch(batch.batch_id, "someone-else", batch.payloads)

    assert queue.mark_staged(impostor) is False
    assert rconn.zscore(keys.inflight, batch.batch_id) is not None
    assert queue.staged_batch_ids() == []

    assert queue.mark_staged(batch) is True
    assert rconn.zscore(keys.inflight, batch.batch_id) is None
    assert rconn.hget(keys.owners, batch.batch_id) is None
    assert queue.staged_batch_ids() == [batch.batch_id]
    # Payloads stay in Redis until promotion.
    assert rconn.llen(keys.batch(batch.batch_id)) == 3
    assert queue.mark_staged(batch) is False


def test_release_removes_every_trace(rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    queue.push_batch(payloads("a", 4))
    staged = queue.claim_batch(2, "w")
    inflight = queue.claim_batch(2, "w")
    assert staged is not None and inflight is not None
    queue.mark_staged(staged)

    queue.release([staged.batch_id, inflight.batch_id])

    for batch_id in (staged.batch_id, inflight.batch_id):
        assert rconn.exists(keys.batch(batch_id)) == 0
        assert rconn.zscore(keys.inflight, batch_id) is None
        assert rconn.zscore(keys.staged, batch_id) is None
        assert rconn.hget(keys.owners, batch_id) is None
    assert queue.in_flight_orders() == 0
    queue.release([])  # nothing to do is not an error


def test_requeue_hands_a_staged_batch_back_for_reclaim(rconn: redis.Redis,
                                                       keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys, lease_seconds=60)
    items = payloads("a", 3)
    queue.push_batch(items)
    batch = queue.claim_batch(10, "w1")
    assert batch is not None
    queue.mark_staged(batch)

    queue.requeue([batch.batch_id])

    assert queue.staged_batch_ids() == []
    again = queue.reclaim_expired("w2")  # no waiting: a requeued batch is due at once
    assert again is not None
    assert again.batch_id == batch.batch_id
    assert again.payloads == items
    assert again.reclaimed


def test_in_flight_orders_counts_claimed_and_staged(rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    assert queue.in_flight_orders() == 0
    queue.push_batch(payloads("a", 10))
    first = queue.claim_batch(3, "w")
    second = queue.claim_batch(4, "w")
    assert first is not None and second is not None
    queue.mark_staged(first)

    assert queue.in_flight_orders() == 7
    assert queue.depth() == 3
    queue.release([first.batch_id])
    assert queue.in_flight_orders() == 4


# --- writes sent again: redis-py resends a script whose reply a dropped connection lost, and
# a producer retries; each must have the effect of one call (review of stop 16's push).


def signals_of(client: redis.Redis, keys: RedisKeys, batch_id: str) -> int:
    return sum(parse_signal(entry[b"data"]).batch_id == batch_id
               for _, entry in client.xrange(keys.signals_stream))


@pytest.mark.parametrize("shard", [0, 2])
def test_a_push_sent_again_queues_its_batch_once(rconn: redis.Redis, keys: RedisKeys,
                                                 shard: int) -> None:
    """Shard 0 (signal in the push's slot) and shard 2 of three (signal apart): the same push
    sent three times queues 4 orders, counts 4 accepted and records one signal."""
    sharded = RedisKeys(keys.prefix, 3)
    queue = OrderQueue(rconn, sharded)
    target = queue.shards[shard]
    batch = payloads("p", 4)
    for _ in range(3):
        assert target.push_batch(batch, batch_id="batch-1") == "batch-1"
    assert rconn.lrange(target.keys.ingestion, 0, -1) == batch[::-1]
    assert int(rconn.hget(target.keys.counters, "accepted")) == 4
    assert signals_of(rconn, sharded, "batch-1") == 1
    assert queue.depth() == 4


def test_a_claim_sent_again_answers_the_same_batch(rconn: redis.Redis,
                                                   keys: RedisKeys) -> None:
    """Stop 16's review: a claim script sent again under its batch id popped a second lot into
    the same list and answered only that one; the first lot was deleted with the list at
    release. Now the second call answers the first lot and claims nothing."""
    queue = OrderQueue(rconn, keys)
    queue.push_batch(payloads("c", 10))
    shard = queue.shards[0]
    first = shard.claim_batch(4, "w1", token="a" * 32)
    again = shard.claim_batch(4, "w1", token="a" * 32)
    assert first is not None and again is not None
    assert again.batch_id == first.batch_id and again.payloads == first.payloads
    assert rconn.llen(keys.batch(first.batch_id)) == 4
    assert queue.depth() == 6
    # Sent again once the batch was released (reclaimed, promoted and released by another
    # worker while this one waited for a reply): it claims nothing, the queue keeps its six.
    queue.release([first.batch_id])
    assert shard.claim_batch(4, "w1", token="a" * 32) is None
    assert queue.depth() == 6 and not rconn.exists(keys.batch(first.batch_id))


def test_an_empty_push_is_refused(rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys)
    with pytest.raises(ValueError, match="at least one order"):
        queue.push_batch([])
    assert not rconn.exists(keys.signals_stream, keys.counters)


@hypothesis_settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["push", "claim"]), st.integers(0, 2),
                                st.integers(1, 3), st.integers(1, 6)), min_size=1,
                      max_size=12))
def test_writes_sent_again_have_the_effect_of_one(rconn: redis.Redis, keys: RedisKeys,
                                                  steps: list[tuple[str, int, int, int]]
                                                  ) -> None:
    """The kind: pushes and claims over three shards, each sent 1-3 times under its id: every
    order pushed is in exactly one place (a shard's queue or one batch), `accepted` counts
    each push once, and each push has one signal."""
    sharded = RedisKeys(f"{keys.prefix}:{uuid.uuid4().hex[:8]}", 3)
    queue = OrderQueue(rconn, sharded)
    pushed: list[bytes] = []
    batches: list[str] = []
    claimed: set[str] = set()
    for n, (kind, shard, times, size) in enumerate(steps):
        target = queue.shards[shard]
        if kind == "push":
            batch, batch_id = payloads(f"s{n}", size), f"push-{n}"
            for _ in range(times):
                target.push_batch(batch, batch_id=batch_id)
            pushed += batch
            batches.append(batch_id)
        else:
            token = uuid.uuid4().hex
            answers = [target.claim_batch(size, "w", token=token) for _ in range(times)]
            assert all(a == answers[0] for a in answers)
            if answers[0] is not None:
                claimed.add(answers[0].batch_id)
    held = [p for space in sharded.shard_spaces for p in rconn.lrange(space.ingestion, 0, -1)]
    held += [p for batch_id in claimed for p in rconn.lrange(
        sharded.shard_spaces[shard_of_batch(batch_id)].batch(batch_id), 0, -1)]
    assert sorted(held) == sorted(pushed)
    assert sum(int(rconn.hget(space.counters, "accepted") or 0)
               for space in sharded.shard_spaces) == len(pushed)
    assert all(signals_of(rconn, sharded, batch_id) == 1 for batch_id in batches)


def test_orders_sent_again_under_their_id_are_queued_once_in_every_shard(
        rconn: redis.Redis, keys: RedisKeys) -> None:
    """A producer whose `push_orders` failed part-way (shard 1's part queued, the others
    not) sends the same orders again under the same id: each shard holds its part once, and
    `accepted` counts each order once."""
    sharded = RedisKeys(keys.prefix, 3)
    queue = OrderQueue(rconn, sharded)
    batch = payloads("o", 30)
    ids = [json.loads(p)["order_id"].encode() for p in batch]
    part_1 = [p for p, i in zip(batch, ids, strict=True) if shard_of_order(i, 3) == 1]
    assert 0 < len(part_1) < 30
    queue.shards[1].push_batch(part_1, "send-1.p1")  # what got through before the error
    parts = queue.push_orders(batch, ids, batch_id="send-1")
    assert parts == ["send-1.p0", "send-1.p1", "send-1.p2"]
    assert sorted(p for space in sharded.shard_spaces
                  for p in rconn.lrange(space.ingestion, 0, -1)) == sorted(batch)
    assert sum(int(rconn.hget(space.counters, "accepted")) for space in sharded.shard_spaces
               ) == 30
    assert all(signals_of(rconn, sharded, part) == 1 for part in parts)
