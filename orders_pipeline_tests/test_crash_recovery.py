"""Kill real worker processes at every step; after recovery, `orders` is exactly right.

Each test SIGKILLs a real `orders-pipeline` process at a named crash point (set through
ORDERS_PIPELINE_CRASH_AT, see orders_pipeline/faults.py), then recovers the way an operator
or the next scheduled run would: `process` again once the dead worker's lease has expired
(made to expire at once: `expire_leases`), then `promote`. Nothing may be missing and nothing
doubled.
"""

import os
import random
import signal
import subprocess
import sys
import time

import psycopg
import pytest
import redis

from orders_pipeline.faults import CRASH_ENV, CRASH_POINTS
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import (
    REPO,
    assert_exactly_once,
    expire_leases,
    pipeline_env,
    push_orders,
)

CLI = [sys.executable, "-m", "orders_pipeline"]
LEASE_SECONDS = 1


def run_cli(settings: Settings, *args: str, crash_at: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = pipeline_env(settings, CLAIM_TIMEOUT_SECONDS=str(LEASE_SECONDS))
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def recover(settings: Settings, rconn: redis.Redis) -> None:
    """What the next run does once dead leases ran out (forced, not waited for): stage what
    is left, promote, until done."""
    keys = RedisKeys(settings.redis.key_prefix)
    for _ in range(10):
        expire_leases(rconn, keys)
        for command in (("process", "--workers", "1"), ("promote",)):
            result = run_cli(settings, *command)
            assert result.returncode == 0, result.stderr
        if not (rconn.llen(keys.ingestion) or rconn.zcard(keys.inflight)
                or rconn.zcard(keys.staged)):
            return
    raise AssertionError("recovery did not drain the queue")


@pytest.fixture
def cached(settings: Settings) -> Settings:
    assert run_cli(settings, "init-cache").returncode == 0
    return settings


@pytest.mark.parametrize("point", [p for p in CRASH_POINTS if p != "mid_promotion"])
def test_worker_killed_at_each_step(cached: Settings, rconn: redis.Redis,
                                    pg: psycopg.Connection, point: str) -> None:
    payloads, _ = push_orders(cached, rconn, pg, 3000, batch_size=1000, duplicates=0.1,
                              invalid=0.02)
    killed = run_cli(cached, "process", "--workers", "1", "--batch-size", "1000",
                     crash_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    keys = RedisKeys(cached.redis.key_prefix)
    assert rconn.zcard(keys.inflight) == 1  # the dead worker's batch is still held
    recover(cached, rconn)
    assert_exactly_once(cached, rconn, pg, payloads)


def test_promotion_killed_midway(cached: Settings, rconn: redis.Redis,
                                 pg: psycopg.Connection) -> None:
    payloads, _ = push_orders(cached, rconn, pg, 3000, batch_size=1000, duplicates=0.1)
    assert run_cli(cached, "process", "--workers", "2").returncode == 0
    killed = run_cli(cached, "promote", crash_at="mid_promotion")
    assert killed.returncode == -signal.SIGKILL
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 0  # rolled back
    recover(cached, rconn)
    assert_exactly_once(cached, rconn, pg, payloads)


def test_redelivered_batch_is_not_its_own_duplicate(cached: Settings, rconn: redis.Redis,
                                                    pg: psycopg.Connection) -> None:
    """The seed system's bug: ids marked before the crash made the retry look duplicate."""
    payloads, summary = push_orders(cached, rconn, pg, 1000, batch_size=1000)
    killed = run_cli(cached, "process", "--workers", "1", crash_at="after_dedup")
    assert killed.returncode == -signal.SIGKILL
    recover(cached, rconn)
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == summary["unique_valid"]
    assert pg.execute("SELECT sum(duplicate_rows) FROM ingest_batches").fetchone()[0] == 0
    assert_exactly_once(cached, rconn, pg, payloads)


def _soak(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, total: int,
          kills: int) -> None:
    """Rounds of 2 worker processes; in each, one is SIGKILLed at a random moment mid-work."""
    payloads, _ = push_orders(settings, rconn, pg, total, batch_size=5000, duplicates=0.05,
                              invalid=0.01)
    rng = random.Random(2026)
    env = pipeline_env(settings, CLAIM_TIMEOUT_SECONDS=str(LEASE_SECONDS))
    keys = RedisKeys(settings.redis.key_prefix)
    done = 0
    while done < kills and rconn.llen(keys.ingestion):
        claimed_before = rconn.hlen(keys.owners)
        workers = [subprocess.Popen([*CLI, "process", "--workers", "1", "--batch-size", "1000",
                                     "--iterations", "8"],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
                   for _ in range(2)]
        deadline = time.monotonic() + 60
        while rconn.hlen(keys.owners) <= claimed_before and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until the workers are claiming, then strike
        time.sleep(rng.uniform(0.0, 0.3))
        victim = rng.choice(workers)
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            done += 1
        for worker in workers:
            worker.wait(timeout=300)
        if rng.random() < 0.5:
            run_cli(settings, "promote")
    assert done == kills, f"only {done} of {kills} kills landed while a worker was working"
    recover(settings, rconn)
    assert_exactly_once(settings, rconn, pg, payloads)


def test_soak_random_kills_small(cached: Settings, rconn: redis.Redis,
                                 pg: psycopg.Connection) -> None:
    _soak(cached, rconn, pg, total=60_000, kills=4)


@pytest.mark.slow
def test_soak_random_kills_full(cached: Settings, rconn: redis.Redis,
                                pg: psycopg.Connection) -> None:
    """The issue's full size: 200,000 orders, 2 workers, 10 SIGKILLs (run with -m slow)."""
    _soak(cached, rconn, pg, total=200_000, kills=10)
