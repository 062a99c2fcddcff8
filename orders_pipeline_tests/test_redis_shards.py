"""Issue 12 item 1: the queue and the dedup window sharded over K hash tags (REDIS_SHARDS).

Each shard's keys share one cluster slot (so its claim and dedup stay single Lua calls), the
shards of a hash-tagged prefix fall in K different slot ranges (so a cluster of masters with
equal ranges spreads them), a batch id names its shard, producers route every copy of an id to
one shard (so the dedup window still drops every copy), and a sharded pipeline delivers every
accepted order exactly once, also when a worker dies between dedup and staging.
"""

import dataclasses
import json
import signal
import subprocess
from collections import defaultdict

import psycopg
import pytest
import redis
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from orders_pipeline import pipeline
from orders_pipeline.conservation import check_conservation
from orders_pipeline.redis_patterns.keys import (
    RedisKeys,
    batch_id_in,
    shard_of_batch,
    shard_of_order,
    shard_prefixes,
)
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import (
    REPO,
    assert_exactly_once,
    expire_leases,
    pipeline_env,
    push_orders,
    valid_order_ids,
)
from orders_pipeline_tests.test_crash_recovery import CLI, run_cli

SHARDS = 4


def sharded(settings: Settings, shards: int = SHARDS) -> Settings:
    return dataclasses.replace(settings, redis=dataclasses.replace(settings.redis,
                                                                   shards=shards))


def shard_key_names(keys: RedisKeys) -> list[str]:
    """Every per-shard key of one shard: queue, leases, batch lists, dedup window, counters."""
    return [keys.ingestion, keys.dequeued, keys.queue_marks, keys.inflight, keys.owners,
            keys.staged, keys.quarantined, keys.redriven, keys.counters, keys.batch("b" * 32),
            keys.dedup_generation(3600, 480_000), f"{keys.dedup_level(3600, 480_000, 10)}3ff",
            keys.dedup_count(29_000_000)]


def slot_range(slot: int, shards: int) -> int:
    return slot * shards // REDIS_CLUSTER_HASH_SLOTS


brace_free = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",),
                                   exclude_characters="{}"), max_size=12)


@hypothesis_settings(max_examples=150, deadline=None)
@given(head=brace_free, tag=brace_free.filter(bool), tail=st.text(max_size=8),
       shards=st.integers(1, 48))
def test_tagged_shards_each_hold_one_slot_and_spread_over_the_ranges(
        head: str, tag: str, tail: str, shards: int) -> None:
    prefix = f"{head}{{{tag}}}{tail}"
    spaces = RedisKeys(prefix, shards).shard_spaces
    assert [s.prefix for s in spaces] == list(shard_prefixes(prefix, shards))
    assert spaces[0].prefix == prefix and len({s.prefix for s in spaces}) == shards
    slots = []
    for space in spaces:
        names = {key_slot(name.encode()) for name in shard_key_names(space)}
        assert len(names) == 1, (space.prefix, names)
        slots.append(names.pop())
    assert len({slot_range(slot, shards) for slot in slots}) == shards


@hypothesis_settings(max_examples=100, deadline=None)
@given(prefix=brace_free.filter(bool), shards=st.integers(2, 32))
def test_untagged_prefix_shards_extend_the_prefix_and_hold_one_slot_each(
        prefix: str, shards: int) -> None:
    for space in RedisKeys(prefix, shards).shard_spaces[1:]:
        assert space.prefix.startswith(f"{prefix}:")  # cleared with the prefix's keys
        assert len({key_slot(n.encode()) for n in shard_key_names(space)}) == 1


@given(shard=st.integers(0, 255), token=st.text("0123456789abcdef", min_size=32,
                                                 max_size=32), other=st.text(max_size=60))
def test_a_batch_id_names_its_shard(shard: int, token: str, other: str) -> None:
    assert shard_of_batch(batch_id_in(shard, token)) == shard
    assert batch_id_in(0, token) == token
    if not other.endswith(tuple(f".s{n}" for n in range(256))):
        assert shard_of_batch(other) == 0  # re-drive, replay and foreign ids: shard 0


@given(order_id=st.binary(min_size=1, max_size=64), shards=st.integers(1, 64))
def test_routing_is_a_function_of_the_id(order_id: bytes, shards: int) -> None:
    first = shard_of_order(order_id, shards)
    assert 0 <= first < shards and shard_of_order(bytes(order_id), shards) == first


def _ids_by_shard(rconn: redis.Redis, keys: RedisKeys) -> dict[str, set[int]]:
    shards_of: dict[str, set[int]] = defaultdict(set)
    for n, space in enumerate(keys.shard_spaces):
        for payload in rconn.lrange(space.ingestion, 0, -1):
            try:
                shards_of[json.loads(payload)["order_id"]].add(n)
            except (ValueError, KeyError, TypeError):
                continue
    return shards_of


def test_sharded_pipeline_drops_every_copy_and_lands_each_order_once(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache) -> None:
    own = sharded(settings)
    keys = RedisKeys.of(own.redis)
    payloads, summary = push_orders(own, rconn, pg, 6000, batch_size=1000, duplicates=0.15,
                                    invalid=0.05)
    depths = [rconn.llen(space.ingestion) for space in keys.shard_spaces]
    assert all(depths) and sum(depths) == 6000 == OrderQueue(rconn, keys).depth()
    assert all(len(shards) == 1 for shards in _ids_by_shard(rconn, keys).values())

    pipeline.stage_queue(own, workers=2, batch_size=500)
    result = pipeline.promote_staged(own)

    assert_exactly_once(own, rconn, pg, payloads)
    assert result.inserted_rows == len(valid_order_ids(payloads)) == summary["unique_valid"]
    dropped = pg.execute("SELECT sum(duplicate_rows) FROM ingest_batches").fetchone()[0]
    assert dropped == summary["duplicates"]  # every copy met its original in one window
    books = check_conservation(rconn, keys, pg)
    assert books.balanced and books.accepted == 6000, books
    claimed = pg.execute("SELECT batch_id FROM ingest_batches").fetchall()
    assert {shard_of_batch(b) for (b,) in claimed} == set(range(SHARDS))


@pytest.mark.parametrize("point", ["after_dedup", "after_copy"])
def test_a_batch_redelivered_within_its_shard_is_not_its_own_duplicate(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, point: str) -> None:
    own = sharded(settings, 3)
    assert run_cli(own, "init-cache").returncode == 0
    keys = RedisKeys.of(own.redis)
    payloads, summary = push_orders(own, rconn, pg, 3000, batch_size=1000)
    killed = run_cli(own, "process", "--workers", "1", "--batch-size", "1000", crash_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    queue = OrderQueue(rconn, keys)
    assert len(queue.claimed_batch_ids()) == 1  # the dead worker's batch, in its shard
    for _ in range(5):
        expire_leases(rconn, keys)
        for command in (("process", "--workers", "1"), ("promote",)):
            result = run_cli(own, *command)
            assert result.returncode == 0, result.stderr
        if not (queue.depth() or queue.claimed_batch_ids() or queue.staged_batch_ids()):
            break
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == summary["unique_valid"]
    assert pg.execute("SELECT sum(duplicate_rows) FROM ingest_batches").fetchone()[0] == 0
    assert_exactly_once(own, rconn, pg, payloads)


def test_promoters_of_disjoint_shards_run_side_by_side(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache) -> None:
    """Issue 12 item 4 from the CLI: `promote --shard` processes, one per pair of shards, at
    the same time; then an out-of-range shard is one line."""
    own = sharded(settings)
    payloads, _ = push_orders(own, rconn, pg, 8000, batch_size=1000, duplicates=0.1,
                              invalid=0.02)
    pipeline.stage_queue(own, workers=2, batch_size=500)
    shards_staged = {n for (n,) in pg.execute(
        "SELECT DISTINCT shard FROM ingest_batches WHERE status = 'staged'")}
    assert shards_staged == set(range(SHARDS))
    env = pipeline_env(own)
    promoters = [subprocess.Popen([*CLI, "promote", "--shard", str(a), "--shard", str(b)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for a, b in ((0, 2), (1, 3))]
    outputs = [p.communicate(timeout=120) for p in promoters]
    assert [p.returncode for p in promoters] == [0, 0], outputs
    assert_exactly_once(own, rconn, pg, payloads)
    assert pg.execute("SELECT count(*) FROM ingest_batches WHERE status <> 'promoted'"
                      ).fetchone()[0] == 0
    refused = run_cli(own, "promote", "--shard", str(SHARDS))
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert f"REDIS_SHARDS is {SHARDS}" in refused.stderr
