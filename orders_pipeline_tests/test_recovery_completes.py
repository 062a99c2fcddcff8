"""Crash recovery completes by itself (issue 8, item 9).

Work that promotion hands back after a crash (`OrderQueue.requeue`) carries its own
completion signal, so the sensor starts the run that stages and promotes it again; and a
drain is not done while a dead worker's batch waits out its lease. Everything runs against
real servers: a throwaway Postgres cluster crashed with `pg_ctl stop -m immediate`, real
worker processes killed with SIGKILL, and the real sensor and ingest job (in process, and
under the real `dagster-daemon`). After a fault, only the sensor and the runs it launches
act: no `process` or `promote` by hand.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import pipeline
from orders_pipeline.connections import close_all, pg_connect
from orders_pipeline.definitions import defs
from orders_pipeline.faults import CRASH_ENV, CRASH_POINTS, PAUSE_ENV, PAUSE_FILE_ENV
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.sensors import completion_signal_sensor
from orders_pipeline.settings import Settings
from orders_pipeline.stats import collect_stats
from orders_pipeline_tests.helpers import (
    REPO,
    assert_exactly_once,
    dagster_env,
    fresh_example,
    pipeline_env,
    push_orders,
    resources_for,
)
from orders_pipeline_tests.servers import PostgresServer, crashable_postgres

CLI = [sys.executable, "-m", "orders_pipeline"]
LEASE_SECONDS = 3
SIGNAL_ORDERS = "orders_pipeline/signal_orders"
# The ingest job's steps: staging (with its rejects), then promotion (with the rollups, which
# refreshes the views' changed months).
STAGING = [dg.AssetKey(k) for k in ("staged_orders", "orders_rejected")]
AFTER_STAGING = [dg.AssetKey(k) for k in
                 ("promoted_orders", "sales_hourly_rollup", "product_daily_rollup")]
# Few by default (each example starts processes and crashes a server); raise it to hunt.
EXAMPLES = int(os.environ.get("ORDERS_RECOVERY_EXAMPLES", "3"))


@pytest.fixture
def crashable(settings: Settings, rconn: redis.Redis) -> Iterator[
        tuple[Settings, PostgresServer]]:
    """The test's settings on a private Postgres cluster it may crash, with short leases."""
    with crashable_postgres(short_leases(settings), rconn) as pair:
        yield pair


def short_leases(settings: Settings) -> Settings:
    return dataclasses.replace(settings, pipeline=dataclasses.replace(
        settings.pipeline, claim_timeout_seconds=LEASE_SECONDS))


def connect(settings: Settings) -> psycopg.Connection:
    conn = pg_connect(settings.postgres)
    conn.autocommit = True
    return conn


def orders_count(settings: Settings) -> int:
    with connect(settings) as pg:
        return int(pg.execute("SELECT count(*) FROM orders").fetchone()[0])


def signals_after(rconn: redis.Redis, keys: RedisKeys, cursor: str | None) -> list[dict]:
    """Bodies of the completion signals recorded after stream id `cursor`."""
    start = f"({cursor}" if cursor else "-"
    return [json.loads(fields[b"data"])
            for _, fields in rconn.xrange(keys.signals_stream, min=start)]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


# --- the sensor and its runs, as the daemon drives them ------------------------------------


class SensorLoop:
    """What `dagster-daemon` does with the sensor, in this process: tick, launch, repeat.

    Each request's job (the code location's own, bound to the test's resources) runs with
    the request's tags and run config. A launched run is a new process under the daemon, so
    no pooled connection of an earlier run (dead after a Postgres crash) is reused
    (`close_all`). A run key is launched at most once, as the daemon does.
    """

    def __init__(self, settings: Settings) -> None:
        self.instance = dg.DagsterInstance.ephemeral()
        self.resources = resources_for(settings)
        self.job = dg.Definitions(
            assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs,
            resources=self.resources, executor=defs.executor).resolve_job_def("ingest_orders")
        self.cursor: str | None = None
        self.run_keys: set[str] = set()

    def tick(self) -> list[dg.RunRequest]:
        """One sensor evaluation; moves the cursor; returns its run requests."""
        context = dg.build_sensor_context(cursor=self.cursor, instance=self.instance,
                                          resources=self.resources)
        result = completion_signal_sensor(context)
        if isinstance(result, dg.SkipReason):
            return []
        if result.cursor is not None:
            self.cursor = result.cursor
        requests = list(result.run_requests or [])
        for request in requests:
            assert request.run_key not in self.run_keys, request.run_key
            self.run_keys.add(str(request.run_key))
        return requests

    def execute(self, request: dg.RunRequest,
                selection: list[dg.AssetKey] | None = None) -> None:
        """Run `request` (only `selection` of its assets, if given); it and its checks pass."""
        close_all()
        result = self.job.execute_in_process(run_config=request.run_config,
                                             instance=self.instance, tags=request.tags,
                                             asset_selection=selection)
        assert result.success
        failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        assert not failed, failed

    def until_idle(self, max_runs: int = 6) -> list[dg.RunRequest]:
        """Tick and run until a tick launches nothing; returns the requests that ran."""
        ran: list[dg.RunRequest] = []
        for _ in range(max_runs):
            requests = self.tick()
            if not requests:
                return ran
            for request in requests:
                self.execute(request)
            ran += requests
        raise AssertionError(f"the sensor still launched runs after {max_runs}")


# --- the queue's part: a requeue asks for its own run; a drain waits for leases -------------


def test_requeue_records_one_signal_for_the_orders_it_hands_back(
        rconn: redis.Redis, keys: RedisKeys) -> None:
    queue = OrderQueue(rconn, keys, lease_seconds=30)
    queue.push_batch([b"a", b"b", b"c"])
    queue.push_batch([b"d", b"e"])
    assert queue.seconds_until_lease_expiry() is None  # nothing claimed
    first, second = queue.claim_batch(3, "w"), queue.claim_batch(2, "w")
    assert first is not None and second is not None
    assert 29.0 < (queue.seconds_until_lease_expiry() or 0) <= 30.0
    assert queue.mark_staged(first) and queue.mark_staged(second)
    assert queue.seconds_until_lease_expiry() is None  # staged batches hold no lease

    signal_id = queue.requeue([first.batch_id, second.batch_id])

    assert signal_id is not None and signal_id.startswith("requeue:")
    bodies = signals_after(rconn, keys, None)
    assert [(b["batch_id"], b["count"]) for b in bodies][2:] == [(signal_id, 5)]
    assert rconn.hget(keys.counters, "accepted") == b"5"  # pushed once, counted once
    assert queue.staged_batch_ids() == []
    assert sorted(queue.claimed_batch_ids()) == sorted([first.batch_id, second.batch_id])
    assert queue.seconds_until_lease_expiry() == 0.0  # due at once
    assert sorted(queue.expired_batch_ids()) == sorted([first.batch_id, second.batch_id])
    assert queue.requeue([]) is None
    assert rconn.xlen(keys.signals_stream) == 3  # nothing handed back, nothing signalled


def test_reconcile_requeues_lost_batches_but_leaves_a_live_lease_alone(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache) -> None:
    """A lost batch a live worker already took back is its own; an unclaimed one is signalled."""
    push_orders(settings, rconn, pg, 2000, batch_size=1000)
    assert pipeline.stage_queue(settings, workers=1, batch_size=1000).batches == 2
    pg.execute("TRUNCATE orders_staging")  # what a crash does to the UNLOGGED table
    result = pipeline.promote_staged(settings)
    assert (len(result.promoted_batches), len(result.lost_batches)) == (0, 2)
    queue = OrderQueue(rconn, keys, lease_seconds=30)
    live = queue.reclaim_expired("live-worker")  # restaging it, lease running
    assert live is not None
    cursor = rconn.xrevrange(keys.signals_stream, count=1)[0][0].decode()

    reconciled = pipeline.reconcile_batches(settings)

    assert (reconciled.released, reconciled.requeued) == (0, 1)
    assert rconn.hget(keys.owners, live.batch_id) == b"live-worker"
    assert [b["count"] for b in signals_after(rconn, keys, cursor)] == [1000]


def test_drain_waits_for_a_dead_workers_lease(settings: Settings, rconn: redis.Redis,
                                              keys: RedisKeys, pg: psycopg.Connection,
                                              loaded_cache: LookupCache) -> None:
    """A `process` worker dies holding a batch; the next drain takes it over before it ends."""
    settings = short_leases(settings)
    payloads, summary = push_orders(settings, rconn, pg, 3000, batch_size=1000,
                                    duplicates=0.05, invalid=0.02)
    killed = subprocess.run([*CLI, "process", "--workers", "1", "--batch-size", "1000"],
                            cwd=REPO, env=pipeline_env(settings, **{CRASH_ENV: "after_claim"}),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    queue = OrderQueue(rconn, keys)
    assert (queue.depth(), queue.claimed_batches()) == (2000, 1)
    lease_left = queue.seconds_until_lease_expiry()
    assert lease_left is not None and lease_left > 1.0  # the queue empties before it ends

    started = time.monotonic()
    stats = pipeline.stage_queue(settings, workers=1, batch_size=1000)
    took = time.monotonic() - started

    assert (stats.batches, stats.reclaimed_batches, stats.claimed) == (3, 1, 3000)
    assert took >= lease_left - 0.05
    books = collect_stats(settings)
    assert (books["queue_depth"], books["claimed_batches"], books["claimed_orders"]) \
        == (0, 0, 0)
    assert (books["staged_batches"], books["staged_orders"]) == (3, 3000)
    pipeline.promote_staged(settings)
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == summary["unique_valid"]
    assert collect_stats(settings)["in_flight"] == 0
    assert_exactly_once(settings, rconn, pg, payloads)


def test_workers_finish_a_killed_siblings_batch(settings: Settings, rconn: redis.Redis,
                                                keys: RedisKeys, pg: psycopg.Connection,
                                                loaded_cache: LookupCache, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Of two worker processes, one is SIGKILLed holding a batch: the other stages it too."""
    settings = short_leases(settings)
    payloads, summary = push_orders(settings, rconn, pg, 4000, batch_size=1000)
    marker = tmp_path / "paused"
    monkeypatch.setenv(PAUSE_ENV, "after_claim")  # inherited by the spawned workers
    monkeypatch.setenv(PAUSE_FILE_ENV, str(marker))
    outcome: list[BaseException | None] = []

    def stage() -> None:
        try:
            pipeline.stage_queue(settings, workers=2, batch_size=1000)
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=stage)
    thread.start()
    wait_for(lambda: marker.exists() and rconn.hlen(keys.owners) == 2, "two paused claims")
    # Owner tokens are host:pid:nonce; both workers hold one batch, paused right after claiming.
    victim = rconn.hvals(keys.owners)[0].decode()
    os.kill(int(victim.rsplit(":", 2)[1]), signal.SIGKILL)
    marker.unlink()
    thread.join(timeout=120)

    assert not thread.is_alive()
    (error,) = outcome
    assert isinstance(error, pipeline.WorkerFailed)
    assert f"exited with code {-signal.SIGKILL}" in str(error)
    queue = OrderQueue(rconn, keys)
    assert (queue.depth(), queue.claimed_batches(), len(queue.staged_batch_ids())) \
        == (0, 0, 4)
    pipeline.promote_staged(settings)
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == summary["unique_valid"]
    assert_exactly_once(settings, rconn, pg, payloads)


# --- a Postgres crash between staging and promotion, recovered by the sensor alone ----------


def test_postgres_crash_between_staging_and_promotion_recovers_by_itself(
        crashable: tuple[Settings, PostgresServer], rconn: redis.Redis) -> None:
    settings, server = crashable
    keys = RedisKeys(settings.redis.key_prefix)
    with connect(settings) as pg:
        payloads, summary = push_orders(settings, rconn, pg, 5000, batch_size=1000,
                                        duplicates=0.05, invalid=0.02)
    loop = SensorLoop(settings)
    (run,) = loop.tick()  # the producer's five signals: one run
    assert run.tags[SIGNAL_ORDERS] == "5000"
    producer_cursor = loop.cursor

    loop.execute(run, STAGING)  # the run stages the queue ...
    batches = rconn.zcard(keys.staged)
    assert rconn.llen(keys.ingestion) == 0 and batches > 0
    server.crash()  # ... Postgres dies before its promotion step, which is retried later
    server.start()
    loop.execute(run, AFTER_STAGING)

    # That run found every staged row gone and handed every batch back, with signals.
    assert orders_count(settings) == 0
    assert (rconn.zcard(keys.inflight), rconn.zcard(keys.staged)) == (batches, 0)
    recovery = signals_after(rconn, keys, producer_cursor)
    assert recovery and all(b["batch_id"].startswith("requeue:") for b in recovery)
    assert sum(b["count"] for b in recovery) == 5000

    ran = loop.until_idle()  # no producer traffic from here on

    assert [r.tags[SIGNAL_ORDERS] for r in ran] == ["5000"]
    assert orders_count(settings) == summary["unique_valid"]
    with connect(settings) as pg:
        assert_exactly_once(settings, rconn, pg, payloads)


@pytest.mark.slow
def test_dagster_daemon_recovers_without_new_traffic(
        crashable: tuple[Settings, PostgresServer], rconn: redis.Redis, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's test with the real `dagster-daemon`: its sensor and runs, nothing else.

    Orders are staged, Postgres crashes and restarts, then the daemon starts. The run for the
    producer's signals finds the staged rows gone and hands the batches back; the signal that
    comes with them makes the daemon start the run that lands them.
    """
    settings, server = crashable
    keys = RedisKeys(settings.redis.key_prefix)
    with connect(settings) as pg:
        payloads, summary = push_orders(settings, rconn, pg, 3000, batch_size=1000)
    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    server.crash()
    server.start()
    close_all()
    home = tmp_path / "home"
    env = dagster_env(settings, home)
    log = open(tmp_path / "daemon.log", "w")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", "workspace.yaml"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: orders_count(settings) == summary["unique_valid"]
                 and rconn.zcard(keys.inflight) + rconn.zcard(keys.staged) == 0,
                 "the daemon's runs to land every order", timeout=240, interval=1)
        for name in ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD",
                     "POSTGRES_DB"):  # where dagster.yaml puts Dagster's own storage
            monkeypatch.setenv(name, env[name])
        with dg.DagsterInstance.from_config(str(home)) as instance:
            def finished() -> bool:
                runs = instance.get_runs(dg.RunsFilter(job_name="ingest_orders"))
                return all(r.is_finished for r in runs)
            wait_for(finished, "the runs to finish", timeout=120, interval=1)
            runs = list(reversed(instance.get_runs(dg.RunsFilter(job_name="ingest_orders"))))
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        log.close()
    assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
    # First the producer's three signals, then the recovery signals for all three batches
    # (one run, or two if a tick fell between the two hand-backs of that promotion).
    orders_per_run = [int(r.tags[SIGNAL_ORDERS]) for r in runs]
    assert orders_per_run[0] == 3000 and sum(orders_per_run[1:]) == 3000, orders_per_run
    with connect(settings) as pg:
        assert_exactly_once(settings, rconn, pg, payloads)


# --- many faults of the kind: random kills and crashes, then the sensor alone ---------------

POSTGRES_CRASH_POINTS = ("between_staging_and_promotion", "mid_copy", "after_copy",
                         "mid_promotion")
FAULTS = [("kill", p) for p in CRASH_POINTS] + [("postgres", p) for p in POSTGRES_CRASH_POINTS]


def _cli(settings: Settings, command: list[str], batch_size: int, **env: str
         ) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *command, *(["--workers", "1", "--batch-size", str(batch_size)]
                           if command == ["process"] else [])],
        cwd=REPO, env=pipeline_env(settings, **env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


def inject(settings: Settings, server: PostgresServer, fault: tuple[str, str],
           batch_size: int, marker: Path) -> None:
    """Process the queue by hand until `fault` strikes: a SIGKILL or a Postgres crash."""
    kind, point = fault
    at_promotion = point in ("mid_promotion", "between_staging_and_promotion")
    if at_promotion:
        pipeline.stage_queue(settings, workers=1, batch_size=batch_size)
    command = ["promote"] if at_promotion else ["process"]
    if kind == "kill":
        process = _cli(settings, command, batch_size, **{CRASH_ENV: point})
        process.communicate(timeout=120)
        assert process.returncode == -signal.SIGKILL
        return
    if point == "between_staging_and_promotion":
        server.crash()
        server.start()
        return
    process = _cli(settings, command, batch_size,
                   **{PAUSE_ENV: point, PAUSE_FILE_ENV: str(marker)})
    wait_for(lambda: marker.exists() or process.poll() is not None, f"pause at {point}")
    assert process.poll() is None, process.communicate()
    server.crash()
    server.start()
    marker.unlink()
    process.communicate(timeout=120)  # it carries on or fails; either way it ends


@hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])
@given(fault=st.sampled_from(FAULTS), count=st.integers(200, 1500),
       push_size=st.integers(100, 700), claim_size=st.integers(100, 700),
       duplicates=st.sampled_from([0.0, 0.1]), invalid=st.sampled_from([0.0, 0.03]))
def test_any_kill_or_crash_is_recovered_by_the_sensor_alone(
        crashable: tuple[Settings, PostgresServer], rconn: redis.Redis, tmp_path: Path,
        fault: tuple[str, str], count: int, push_size: int, claim_size: int,
        duplicates: float, invalid: float) -> None:
    base, server = crashable
    close_all()
    with connect(base) as pg:
        settings = fresh_example(base, rconn, pg)
        payloads, summary = push_orders(settings, rconn, pg, count, batch_size=push_size,
                                        duplicates=duplicates, invalid=invalid)
    marker = tmp_path / f"paused-{os.urandom(4).hex()}"

    inject(settings, server, fault, claim_size, marker)
    SensorLoop(settings).until_idle()

    assert orders_count(settings) == summary["unique_valid"]
    with connect(settings) as pg:
        assert_exactly_once(settings, rconn, pg, payloads)
