"""Postgres crashes (`pg_ctl stop -m immediate`) at every point; no accepted order is lost.

These tests run their own throwaway cluster (initdb + pg_ctl on a free port) so the shared
server is never disturbed. An immediate stop skips the shutdown checkpoint, so the restart
runs crash recovery, which empties every UNLOGGED table: exactly what happens to
`orders_staging` when a real server dies.
"""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from orders_pipeline import pipeline
from orders_pipeline.connections import close_all, pg_connect
from orders_pipeline.faults import PAUSE_ENV, PAUSE_FILE_ENV
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import (
    REPO,
    assert_exactly_once,
    pipeline_env,
    push_orders,
)
from orders_pipeline_tests.servers import PostgresServer, crashable_postgres


@pytest.fixture
def crashable(settings: Settings, rconn: redis.Redis) -> Iterator[
        tuple[Settings, PostgresServer]]:
    """Settings whose Postgres is a private cluster this test may crash at will."""
    with crashable_postgres(settings, rconn) as pair:
        yield pair


def _connect(settings: Settings) -> psycopg.Connection:
    conn = pg_connect(settings.postgres)
    conn.autocommit = True
    return conn


def _finish(settings: Settings) -> None:
    """What the next run does after the crash: promote (requeues lost batches), restage."""
    close_all()  # the pools' connections died with the server
    for _ in range(5):
        pipeline.promote_staged(settings)
        pipeline.stage_queue(settings, workers=1, batch_size=1000)
        result = pipeline.promote_staged(settings)
        if not (result.promoted_batches or result.lost_batches):
            return


def test_crash_between_staging_and_promotion(crashable: tuple[Settings, PostgresServer],
                                             rconn: redis.Redis) -> None:
    settings, server = crashable
    with _connect(settings) as pg:
        payloads, _ = push_orders(settings, rconn, pg, 5000, batch_size=1000, duplicates=0.05,
                                  invalid=0.02)
    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    with _connect(settings) as pg:
        assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] > 0
    server.crash()
    server.start()
    with _connect(settings) as pg:
        # The crash emptied the UNLOGGED table. The logged ledger remembers the batches whose
        # (asynchronous) commits were flushed; Redis still holds all five.
        assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0
        remembered = pg.execute("SELECT count(*) FROM ingest_batches WHERE status = 'staged'"
                                ).fetchone()[0]
        assert remembered <= 5
    assert rconn.zcard(RedisKeys(settings.redis.key_prefix).staged) == 5
    _finish(settings)
    with _connect(settings) as pg:
        restaged = pg.execute("SELECT count(*) FROM ingest_batches WHERE attempts > 1"
                              ).fetchone()[0]
        assert restaged == remembered  # the ledger's lost batches were staged again
        assert_exactly_once(settings, rconn, pg, payloads)


@pytest.mark.parametrize("point", ["mid_copy", "after_copy", "mid_promotion"])
def test_crash_at_exact_point(crashable: tuple[Settings, PostgresServer],
                              rconn: redis.Redis, tmp_path: Path, point: str) -> None:
    """A worker (or promoter) process is paused at `point`; Postgres dies right there."""
    settings, server = crashable
    with _connect(settings) as pg:
        payloads, _ = push_orders(settings, rconn, pg, 3000, batch_size=1000, duplicates=0.05,
                                  invalid=0.02)
    marker = tmp_path / "paused"
    env = pipeline_env(settings, USE_PGBOUNCER="false",
                       **{PAUSE_ENV: point, PAUSE_FILE_ENV: str(marker)})
    command = ["promote"] if point == "mid_promotion" else ["process", "--workers", "1"]
    if point == "mid_promotion":
        pipeline.stage_queue(settings, workers=1, batch_size=1000)
    process = subprocess.Popen([sys.executable, "-m", "orders_pipeline", *command], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the process never reached the pause point"
        time.sleep(0.05)
    server.crash()
    server.start()
    marker.unlink()  # resume: its connection is gone; it retries or fails, never half-done
    process.communicate(timeout=120)
    _finish(settings)
    with _connect(settings) as pg:
        assert_exactly_once(settings, rconn, pg, payloads)
