"""The pipeline on a real Redis Cluster: 3 masters + 3 replicas on loopback ports.

Each test starts its own cluster (`redis_cluster`, servers.py: six `redis-server
--cluster-enabled yes` processes created with `redis-cli --cluster create`), never the shared
Redis, and points the test's settings at it with REDIS_CLUSTER=true, a hash-tagged key prefix
`{optest:<id>}` (one shard: every key in the prefix's slot) and REDIS_HOST:REDIS_PORT at a
node that does NOT serve that slot, so every command starts with a MOVED redirection the
client must follow. Postgres is the test's own database. Workers are real `orders-pipeline`
processes; while they run the test changes the cluster under them (a replica failover, a
migration of the prefix's slot to another master) and they must keep running. Afterwards
every accepted order is in `orders` exactly once (`assert_exactly_once`).
"""

import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import IO

import psycopg
import pytest
import redis
import redis.cluster
from redis.crc import key_slot

from orders_pipeline import connections, generator
from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.fanout import promoted_stream
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.redis_patterns.signals import CompletionSignals, signal_message
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import (
    REPO,
    assert_exactly_once,
    pipeline_env,
    push_orders,
    valid_order_ids,
    wait_for,
)
from orders_pipeline_tests.servers import HOST, RedisCluster, probing

CLI = [sys.executable, "-m", "orders_pipeline"]
BATCH = 500
# Short leases: a batch whose worker lost its claim's reply is taken over within seconds.
LEASE_SECONDS = 5
# The follower's summary line once SIGTERM stopped it (test_follow_worker.SUMMARY).
STOPPED = "stopped after "


def slot_of(settings: Settings) -> int:
    """The cluster slot of the settings' key prefix (its hash tag's)."""
    return key_slot(settings.redis.key_prefix.encode())


@pytest.fixture
def on_cluster(settings: Settings, redis_cluster: RedisCluster) -> Iterator[Settings]:
    """The test's settings on the throwaway cluster, through a node that does not serve the
    prefix's slot: REDIS_CLUSTER=true, prefix `{optest:<id>}`, lookup snapshot loaded."""
    prefix = "{" + settings.redis.key_prefix + "}"
    entry = redis_cluster.non_owner(key_slot(prefix.encode()))
    local = replace(settings,
                    redis=replace(settings.redis, host=HOST, port=entry.port, cluster=True,
                                  key_prefix=prefix),
                    pipeline=replace(settings.pipeline, claim_timeout_seconds=LEASE_SECONDS))
    with pg_connect(local.postgres) as conn:
        LookupCache(redis_client(local.redis), RedisKeys.of(local.redis),
                    local.pipeline.lookup_ttl_seconds).load_snapshot(conn)
    try:
        yield local
    finally:
        close_all()


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """One `orders-pipeline` command with the settings' environment; must exit 0."""
    done = subprocess.run([*CLI, *args], cwd=REPO, env=pipeline_env(settings),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


class Follower:
    """`orders-pipeline process --follow` with `workers` worker processes, its stdout and
    stderr in `output` (a pipe nobody reads while it runs could fill up)."""

    def __init__(self, settings: Settings, output: IO[bytes], workers: int = 2) -> None:
        self.output = output
        self.process = subprocess.Popen(
            [*CLI, "process", "--follow", "--workers", str(workers), "--batch-size",
             str(BATCH)], cwd=REPO, env=pipeline_env(settings), stdout=self.output,
            stderr=subprocess.STDOUT)

    def text(self) -> str:
        self.output.seek(0)
        return self.output.read().decode(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> str:
        """SIGTERM the follower, which must still be running; it must exit 0 with its summary
        line and no traceback. Returns what it wrote (batch lines, the warnings of transient
        errors it rode out, the summary)."""
        assert self.running(), self.text()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        text = self.text()
        assert self.process.returncode == 0, text
        assert any(line.startswith(STOPPED) for line in text.splitlines()), text
        assert "Traceback" not in text, text
        return text

    def kill(self) -> None:
        """SIGKILL it if it still runs (cleanup after a failure)."""
        if self.running():
            self.process.kill()
            self.process.wait(timeout=60)


@contextlib.contextmanager
def following(settings: Settings, workers: int = 2) -> Iterator[Follower]:
    """A started Follower, killed at the end of the block if it still runs."""
    with tempfile.TemporaryFile() as output:
        follower = Follower(settings, output, workers)
        try:
            yield follower
        finally:
            follower.kill()


def staged_batches(client: redis.cluster.RedisCluster, keys: RedisKeys) -> int:
    return int(client.zcard(keys.staged))


def drained(client: redis.cluster.RedisCluster, keys: RedisKeys) -> bool:
    """Nothing queued and nothing claimed: every order pushed so far is staged."""
    return client.llen(keys.ingestion) == 0 and client.zcard(keys.inflight) == 0


class PushRetries(logging.Handler):
    """Counts the warnings `connections.retry_transient` logs for pushes in this process: each
    is a push that met a transient error (a refusal, or a push no replica confirmed) and was
    looked at again (`QueueShard.push_batch_once`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("push "):
            self.count += 1


@contextlib.contextmanager
def counting_push_retries() -> Iterator[PushRetries]:
    handler = PushRetries()
    logger = logging.getLogger(connections.__name__)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class Producer(threading.Thread):
    """Pushes a batch of BATCH fresh orders every `pause` seconds until `stop()`, through the
    settings' client and the product's producer call (`OrderQueue.push_batch`: each batch
    exactly once, however the servers change)."""

    def __init__(self, settings: Settings, pg: psycopg.Connection, pause: float = 0.05) -> None:
        super().__init__(name="producer", daemon=True)
        self.queue = OrderQueue(redis_client(settings.redis), RedisKeys.of(settings.redis))
        self.refs = generator.References.load(pg)
        self.pause = pause
        self.pushed: list[bytes] = []
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                payloads, _ = generator.build_payloads(self.refs, BATCH, duplicates=0.05,
                                                       invalid=0.02)
                self.queue.push_batch(payloads)
                self.pushed += payloads
                self._stopping.wait(self.pause)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def halt(self) -> None:
        """Stop pushing and wait for the thread."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=60)

    def stop(self) -> list[bytes]:
        """Stop pushing; returns every payload pushed (re-raises what stopped it early)."""
        self.halt()
        if self.error is not None:
            raise self.error
        return self.pushed


def run_through_change(settings: Settings, pg: psycopg.Connection,
                       change: Callable[[], object]) -> tuple[str, int]:
    """Push orders, let two following workers stage a few batches, then run `change` (which
    reconfigures the servers) while they go on and a producer thread keeps pushing; push more
    after it, wait until everything is staged, stop the workers, promote, check `orders`.

    The workers must still be running after the change and stop cleanly on SIGTERM.
    Returns what the workers wrote and how many times the producer's pushes met a transient
    error and were looked at again during the change.
    """
    client = redis_client(settings.redis)
    keys = RedisKeys.of(settings.redis)
    before, _ = push_orders(settings, client, pg, 10_000, batch_size=BATCH, seed=31,
                            duplicates=0.05, invalid=0.02)
    producer = Producer(settings, pg)
    with following(settings) as follower, counting_push_retries() as retries:
        try:
            wait_for(lambda: staged_batches(client, keys) >= 4, "4 batches staged", 60)
            producer.start()
            change()
            during = producer.stop()
            assert follower.running(), follower.text()
            after, _ = push_orders(settings, client, pg, 3000, batch_size=BATCH, seed=32,
                                   duplicates=0.05, invalid=0.02)
            wait_for(lambda: drained(client, keys), "every order staged", 60, interval=0.2)
            output = follower.stop()
        finally:
            producer.halt()
    run_cli(settings, "promote")
    assert_exactly_once(settings, client, pg, before + during + after)
    return output, retries.count


def transient_warnings(output: str) -> list[str]:
    """The workers' lines about transient errors they rode out: all but the batch reports,
    the first line and the summary."""
    return [line for line in output.splitlines()
            if " batch " not in line and not line.startswith(("following ", STOPPED))]


def test_pipeline_through_a_node_that_does_not_serve_the_slot(
        on_cluster: Settings, redis_cluster: RedisCluster, pg: psycopg.Connection) -> None:
    """REDIS_HOST:REDIS_PORT name a master that does not serve the prefix's slot (a plain
    client gets MOVED there): push, `process --workers 2`, `promote`, `stats` all work, every
    order lands exactly once, a consumer group reads each from the fan-out stream, signals
    published by a foreign producer are bridged, and with one shard every key sits on the
    slot's master."""
    slot = slot_of(on_cluster)
    entry = redis_cluster.node(on_cluster.redis.port)
    assert redis_cluster.owner(slot) is not entry
    with probing(entry) as plain, pytest.raises(redis.exceptions.MovedError):
        plain.llen(RedisKeys.of(on_cluster.redis).ingestion)

    client = redis_client(on_cluster.redis)
    assert isinstance(client, redis.cluster.RedisCluster)
    stream = promoted_stream(on_cluster)
    assert stream.ensure_group("audit")
    payloads, _ = push_orders(on_cluster, client, pg, 6000, batch_size=1000, seed=21,
                              duplicates=0.05, invalid=0.02)
    run_cli(on_cluster, "process", "--workers", "2", "--batch-size", "1000")
    run_cli(on_cluster, "promote")
    assert '"balanced": true' in run_cli(on_cluster, "stats", "--json").stdout
    assert_exactly_once(on_cluster, client, pg, payloads)

    # The fan-out stream (MULTI of XADDs, XREADGROUP, XAUTOCLAIM, the trim script) ...
    delivered: set[str] = set()
    stream.consume("audit", "reader", lambda entry: delivered.add(entry.key), drain=True)
    assert delivered == valid_order_ids(payloads)
    assert stream.length() == 0  # trimmed once acknowledged
    # ... and the pub/sub bridge of signals published by a foreign producer.
    signals = CompletionSignals(client, RedisKeys.of(on_cluster.redis))
    done = threading.Event()
    bridge = threading.Thread(target=signals.bridge_published, args=(done.is_set,))
    bridge.start()
    try:
        message = signal_message("foreign-batch", 5)
        wait_for(lambda: client.publish(signals.keys.signals_channel, message) >= 0 and any(
            s.batch_id == "foreign-batch" for s in signals.read_after(None).signals),
            "the bridged signal", 30, interval=0.2)
    finally:
        done.set()
        bridge.join(timeout=30)

    owner = redis_cluster.owner(slot)
    with probing(owner) as plain:  # the run id a producer notes is that of the slot's master
        assert OrderQueue(client, RedisKeys.of(on_cluster.redis)).server_run_id() == str(
            plain.info("server")["run_id"])
    spread = redis_cluster.keys_per_master()
    assert spread[owner.port] > 0
    assert all(count == 0 for port, count in spread.items() if port != owner.port), spread


def test_replica_failover_mid_run(on_cluster: Settings, redis_cluster: RedisCluster,
                                  pg: psycopg.Connection) -> None:
    """CLUSTER FAILOVER to a replica of the slot's master while two following workers stage
    batches: the old master answers MOVED from then on, the workers follow it without
    exiting (nor REDIS_PORT edited), and every order lands exactly once."""
    slot = slot_of(on_cluster)
    old = redis_cluster.owner(slot)
    promoted: list[int] = []

    def failover() -> None:
        promoted.append(redis_cluster.failover(slot).port)

    output, refused = run_through_change(on_cluster, pg, failover)
    print(f"\npushes refused during the failover: {refused}; worker warnings:\n"
          + "\n".join(transient_warnings(output)[-20:]))
    assert promoted and redis_cluster.owner(slot).port == promoted[0] != old.port
    assert redis_cluster.role(old) == ("slave", promoted[0])
    assert redis_cluster.redirections().get("MOVED", 0) > 0  # clients were sent on


def test_slot_migration_mid_run(on_cluster: Settings, redis_cluster: RedisCluster,
                                pg: psycopg.Connection) -> None:
    """The prefix's slot migrates to another master while two following workers stage
    batches, a few keys at a time: single-key commands meet ASK, the claim and dedup scripts
    (several keys, some moved, some not) meet TRYAGAIN until the slot has moved. The workers
    ride it out as transient errors, none exits, and every order lands exactly once."""
    slot = slot_of(on_cluster)
    target = redis_cluster.non_owner(slot)
    moved: list[int] = []

    def migrate() -> None:
        started = time.monotonic()
        moved.append(redis_cluster.migrate_slot(slot, target, keys_per_step=100,
                                                pause_seconds=0.1))
        print(f"\nthe migration took {time.monotonic() - started:.1f} s")

    output, refused = run_through_change(on_cluster, pg, migrate)
    assert redis_cluster.owner(slot) is target
    assert moved and moved[0] > 500  # the queue, the batches and the dedup window moved
    redirections = redis_cluster.redirections()
    print(f"\nmigrated {moved[0]} keys; the nodes answered {redirections}; pushes refused "
          f"meanwhile: {refused}; worker warnings:\n" + "\n".join(transient_warnings(output)[-20:]))
    assert redirections.get("ASK", 0) + redirections.get("TRYAGAIN", 0) > 0


def one_error_line(settings: Settings, *command: str, **env: str) -> str:
    """Run a CLI command that must fail: non-zero exit, nothing on stdout, one stderr line
    (no traceback); returns that line."""
    done = subprocess.run([*CLI, *command], cwd=REPO, env=pipeline_env(settings, **env),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stdout == "", (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orders-pipeline: error: "), done.stderr
    return lines[0]


def test_untagged_prefix_is_refused_in_one_line(settings: Settings) -> None:
    """REDIS_CLUSTER=true with a prefix without a hash tag: every command exits non-zero
    with one line naming the variable and a tagged example, before it reaches any server."""
    for command in (["stats"], ["process", "--workers", "1"], ["generate", "--count", "10"]):
        line = one_error_line(settings, *command, REDIS_CLUSTER="true",
                              REDIS_KEY_PREFIX="orders:eu", REDIS_PORT="1")
        assert line == ("orders-pipeline: error: bad configuration: REDIS_KEY_PREFIX "
                        "'orders:eu' has no hash tag, so its keys would fall in different "
                        "cluster slots: use e.g. {orders:eu}")


def test_cluster_client_startup_errors_are_one_line(settings: Settings) -> None:
    """REDIS_CLUSTER=true pointed at a Redis that is not a cluster node (the shared one), or
    at a port nobody listens on: one line each, saying which."""
    tagged = {"REDIS_CLUSTER": "true", "REDIS_KEY_PREFIX": "{" + settings.redis.key_prefix + "}"}
    endpoint = f"{settings.redis.host}:{settings.redis.port}"
    assert one_error_line(settings, "stats", **tagged) == (
        f"orders-pipeline: error: bad configuration: REDIS_CLUSTER is true but the Redis at "
        f"{endpoint} is not a cluster node (cluster mode is not enabled on it): unset "
        "REDIS_CLUSTER, or point REDIS_HOST/REDIS_PORT at a node of the cluster")
    line = one_error_line(settings, "stats", **tagged, REDIS_PORT="1")
    assert line.startswith(f"orders-pipeline: error: cannot reach Redis at "
                           f"{settings.redis.host}:1 ("), line


def test_shards_spread_the_queue_over_every_master(
        on_cluster: Settings, redis_cluster: RedisCluster, pg: psycopg.Connection) -> None:
    """Issue 12 item 1: with REDIS_SHARDS=3 on 3 masters, the queue and the dedup window of
    each shard sit on a different master, so all three hold and serve orders; the sharded
    pipeline still lands every order once and drops every copy."""
    sharded = replace(on_cluster, redis=replace(on_cluster.redis, shards=3))
    client = redis_client(sharded.redis)
    keys = RedisKeys.of(sharded.redis)
    owners = {redis_cluster.owner(key_slot(space.ingestion.encode())).port
              for space in keys.shard_spaces}
    assert len(owners) == 3  # one shard per master
    payloads, summary = push_orders(sharded, client, pg, 6000, batch_size=1000, seed=5,
                                    duplicates=0.1, invalid=0.02)
    queued = {port: 0 for port in owners}
    for space in keys.shard_spaces:
        queued[redis_cluster.owner(key_slot(space.ingestion.encode())).port] += int(
            client.llen(space.ingestion))
    assert all(queued.values()) and sum(queued.values()) == 6000, queued
    run_cli(sharded, "process", "--workers", "2", "--batch-size", "500")
    run_cli(sharded, "promote", "--shard", "0", "--shard", "1", "--shard", "2")
    assert_exactly_once(sharded, client, pg, payloads)
    dropped = pg.execute("SELECT sum(duplicate_rows) FROM ingest_batches").fetchone()[0]
    assert dropped == summary["duplicates"]
    assert all(count > 0 for count in redis_cluster.keys_per_master().values())
