"""The pipeline through Redis Sentinel: a master, one replica and two Sentinels on loopback.

Each test starts its own group (`redis_sentinel_groups`, servers.py), never the shared Redis,
and points the test's settings at the Sentinels only: REDIS_SENTINEL_HOSTS and
REDIS_SENTINEL_MASTER set, REDIS_HOST:REDIS_PORT at a port where nothing listens (they are
not used). The client asks the Sentinels for the master on every new connection.

A Sentinel failover is not coordinated with the old master, and loses acknowledged writes
two ways:

- the old master goes on taking writes until the Sentinels demote it, about 10 s later, and
  they vanish when it resynchronises from the new master
  (`test_without_min_replicas_a_failover_loses_acknowledged_writes`). With
  `min-replicas-to-write 1` on every data node (NO_LOSS) the old master refuses writes
  (NOREPLICAS) the moment its replica is promoted, and the new master until the old one has
  become its replica: writes pause for those seconds instead. The client turns NOREPLICAS,
  like READONLY, into a reconnection through the Sentinels.
- the replica is promoted without catching up: what the old master acknowledged but had not
  sent yet is lost (a few milliseconds of writes: here, under load, a claim or a push in
  about one failover in ten). So the pipeline acts on a write (a claim it stages, dedup
  marks, a push it acknowledges) only once the replica holds it
  (`connections.await_replication`, WAIT), and the producer pushes each batch exactly once
  (`QueueShard.push_batch_once`: `test_a_push_no_replica_confirmed_lands_once`).

With both, the workers ride the pause out and every accepted order lands exactly once
(`test_sentinel_failover_mid_run`).
"""

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import wait_for
from orders_pipeline_tests.servers import (
    HOST,
    RedisSentinelGroup,
    RedisServer,
    SentinelGroupFactory,
    free_port,
    probing,
)
from orders_pipeline_tests.test_redis_cluster import (
    counting_push_retries,
    run_through_change,
    transient_warnings,
)

# What every data node of a group that must not lose acknowledged writes is started with.
NO_LOSS = ("--min-replicas-to-write", "1")


def through_sentinels(settings: Settings, group: RedisSentinelGroup) -> Settings:
    """The test's settings (own database and prefix) on `group`, through its Sentinels only."""
    return replace(settings, redis=replace(
        settings.redis, host=HOST, port=free_port(), sentinel_hosts=group.sentinel_hosts,
        sentinel_master=group.master_name))


@pytest.fixture
def no_loss_group(redis_sentinel_groups: SentinelGroupFactory) -> RedisSentinelGroup:
    return redis_sentinel_groups(*NO_LOSS)


@pytest.fixture
def on_sentinel(settings: Settings, no_loss_group: RedisSentinelGroup) -> Iterator[Settings]:
    """The test's settings through the Sentinels of `no_loss_group`, lookup snapshot loaded,
    short leases (a batch whose worker gave up during the pause is taken over soon)."""
    local = through_sentinels(settings, no_loss_group)
    local = replace(local, pipeline=replace(local.pipeline, claim_timeout_seconds=5))
    with pg_connect(local.postgres) as conn:
        LookupCache(redis_client(local.redis), RedisKeys.of(local.redis),
                    local.pipeline.lookup_ttl_seconds).load_snapshot(conn)
    try:
        yield local
    finally:
        close_all()


def test_sentinel_failover_mid_run(on_sentinel: Settings, no_loss_group: RedisSentinelGroup,
                                   pg: psycopg.Connection) -> None:
    """SENTINEL FAILOVER while two following workers stage batches and a producer pushes:
    the workers keep running through the pause of writes and reach the new master by asking
    the Sentinels, and every accepted order lands exactly once (claims, dedup marks and
    pushes are acted on only once the replica holds them)."""
    old = no_loss_group.current_master()
    promoted: list[int] = []

    def failover() -> None:
        promoted.append(no_loss_group.failover().port)

    # Pushes meet ConnectionError: a refusal (NOREPLICAS, READONLY: nothing applied) or a push
    # no replica confirmed (NotReplicated); `push_batch_once` sends it again under its id, which
    # queues nothing twice.
    output, refused = run_through_change(on_sentinel, pg, failover)
    print(f"\npushes refused during the failover: {refused}; worker warnings:\n"
          + "\n".join(transient_warnings(output)[-20:]))
    assert promoted and promoted[0] != old.port
    assert no_loss_group.current_master().port == promoted[0]
    assert refused > 0  # writes did pause


def test_without_min_replicas_a_failover_loses_acknowledged_writes(
        settings: Settings, redis_sentinel_groups: SentinelGroupFactory) -> None:
    """Documents why NO_LOSS is required: without it, after SENTINEL FAILOVER the client's
    pooled connections keep writing to the old master, which acknowledges every write until
    the Sentinels demote it, and those writes are gone once it resynchronises."""
    group = redis_sentinel_groups()
    local = through_sentinels(settings, group)
    client = redis_client(local.redis)
    key = f"{local.redis.key_prefix}:counted"
    acknowledged: list[int] = []
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            try:
                client.rpush(key, n)
                acknowledged.append(n)
            except redis.ConnectionError:
                pass
            n += 1
            time.sleep(0.005)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        time.sleep(0.5)
        old = group.current_master()
        new = group.failover()
        wait_for(lambda: group.role(old) == ("slave", new.port, "up"),
                 "the Sentinels demoting the old master", 60, interval=0.1)
    finally:
        stop.set()
        writer.join(timeout=30)
    with probing(new) as plain:
        kept = {int(n) for n in plain.lrange(key, 0, -1)}
    lost = sorted(set(acknowledged) - kept)
    print(f"\n{len(acknowledged)} writes acknowledged, {len(lost)} lost "
          f"(old master {old.port}, new {new.port})")
    assert lost, "the old master took no write after the failover"
    assert group.master_port() == new.port != old.port


def stalled_replica_push(client: redis.Redis, keys: RedisKeys, replica: RedisServer,
                         stall: float, size: int) -> tuple[str, list[bytes], int]:
    """Stop `replica` (SIGSTOP), push a batch of `size` orders through the product's producer
    call, let the replica go on after `stall` seconds. Returns the batch id, its payloads and
    the push retries logged."""
    payloads = [json.dumps({"order_id": uuid.uuid4().hex, "n": i}).encode()
                for i in range(size)]
    assert replica.process is not None
    pid = replica.process.pid
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(stall, os.kill, (pid, signal.SIGCONT))
    resume.start()
    try:
        with counting_push_retries() as retries:
            batch_id = OrderQueue(client, keys).push_batch(payloads)
    finally:
        resume.cancel()
        os.kill(pid, signal.SIGCONT)
    return batch_id, payloads, retries.count


def assert_queued_once(client: redis.Redis, keys: RedisKeys, batch_id: str,
                       payloads: list[bytes]) -> None:
    """The batch's orders are in the queue once each, counted once, with one signal."""
    queued = client.lrange(keys.ingestion, 0, -1)
    assert sorted(p for p in queued if p in set(payloads)) == sorted(payloads)
    signals = [entry for _, entry in client.xrange(keys.signals_stream)
               if batch_id.encode() in entry[b"data"]]
    assert len(signals) == 1


@pytest.fixture
def sentinel_queue(settings: Settings, redis_sentinel_groups: SentinelGroupFactory
                   ) -> Iterator[tuple[redis.Redis, RedisKeys, RedisServer]]:
    """A client of a Sentinel group without NO_LOSS (its master takes writes while the replica
    stalls), the test's keys, and the replica."""
    group = redis_sentinel_groups()
    local = through_sentinels(settings, group)
    try:
        yield redis_client(local.redis), RedisKeys.of(local.redis), group.replicas[0]
    finally:
        close_all()


def test_a_push_no_replica_confirmed_lands_once(
        sentinel_queue: tuple[redis.Redis, RedisKeys, RedisServer]) -> None:
    """Stop 16's gap: a push the replica did not confirm within WAIT_TIMEOUT_MS raised
    NotReplicated and `generate` gave up, though the orders were on the master. Now the
    push is sent again under its id, finds its marker there and queues nothing, and waits
    for the replica again: the 300 orders are queued once, `accepted` is 300, one signal."""
    client, keys, replica = sentinel_queue
    batch_id, payloads, retries = stalled_replica_push(client, keys, replica, 3.0, 300)
    assert retries >= 1  # WAIT timed out (2 s) while the replica was stopped
    assert_queued_once(client, keys, batch_id, payloads)
    assert client.llen(keys.ingestion) == 300
    assert int(client.hget(keys.counters, "accepted")) == 300


@hypothesis_settings(max_examples=5, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stalls=st.lists(st.floats(min_value=0.0, max_value=4.5), min_size=1, max_size=3),
       size=st.integers(min_value=1, max_value=400))
def test_pushes_land_once_however_long_the_replica_stalls(
        sentinel_queue: tuple[redis.Redis, RedisKeys, RedisServer], stalls: list[float],
        size: int) -> None:
    """The kind: a push whose outcome is unknown (the replica stalled 0-4.5 s, past WAIT's 2 s
    or not, once or again on the next batch) ends with each batch queued exactly once and
    `accepted` grown by exactly what was pushed."""
    client, keys, replica = sentinel_queue
    accepted = int(client.hget(keys.counters, "accepted") or 0)
    depth = client.llen(keys.ingestion)
    for stall in stalls:
        batch_id, payloads, retries = stalled_replica_push(client, keys, replica, stall, size)
        assert_queued_once(client, keys, batch_id, payloads)
        if stall < 1.0:
            assert retries == 0
    assert client.llen(keys.ingestion) == depth + size * len(stalls)
    assert int(client.hget(keys.counters, "accepted")) == accepted + size * len(stalls)
