"""`orders-pipeline process --follow`: a long-running worker that stops without losing work.

Real servers and real processes: the CLI runs as a subprocess (`pipeline_env`), orders are
pushed while it runs, and it is stopped with a real SIGTERM while a batch is in hand (held
there by the `after_claim` pause point of `orders_pipeline.faults`). It must finish that
batch and exit 0, or, past `--grace`, exit 0 leaving the batch leased, to be reclaimed when
its lease runs out (forced here, not slept for). Either way, after a drain and `promote`,
every order is in `orders` exactly once. A hypothesis property runs the same stop in this
process at every pause point a batch passes, with and without the grace period running out.
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import generator, pipeline
from orders_pipeline.faults import PAUSE_ENV, PAUSE_FILE_ENV
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.settings import Settings
from orders_pipeline.worker import StagingWorker, StopRequest
from orders_pipeline_tests.helpers import (
    assert_exactly_once,
    expire_leases,
    fresh_example,
    pipeline_env,
    push_orders,
    wait_for,
)

CLI = [sys.executable, "-m", "orders_pipeline", "process", "--follow"]
BATCH = 1000
# Stopping a worker that holds nothing, or whose batch was just let go, takes well under this.
STOP_SECONDS = 5.0
SUMMARY = re.compile(r"^stopped after [0-9.]+ s with (\d+) worker\(s\): (\d+) batches "
                     r"\((\d+) reclaimed\), claimed ([0-9,]+), duplicates ([0-9,]+), "
                     r"rejected ([0-9,]+), staged ([0-9,]+)(.*)$")


@pytest.fixture
def follower(settings: Settings, loaded_cache: LookupCache, tmp_path: Path
             ) -> Iterator[list[subprocess.Popen[str]]]:
    """Started `process --follow` subprocesses; any still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def start_follower(started: list[subprocess.Popen[str]], settings: Settings, *args: str,
                   **env: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([*CLI, "--batch-size", str(BATCH), *args],
                               env=pipeline_env(settings, **env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    started.append(process)
    return process


def stop(process: subprocess.Popen[str]) -> tuple[float, str, str]:
    """SIGTERM, then wait for the exit: (seconds it took, stdout, stderr); must exit 0."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    return finish(process, sent)


def finish(process: subprocess.Popen[str], since: float) -> tuple[float, str, str]:
    out, err = process.communicate(timeout=60)
    took = time.monotonic() - since
    assert process.returncode == 0, (process.returncode, out, err)
    return took, out, err


def summary(out: str) -> tuple[int, ...]:
    """(workers, batches, reclaimed, claimed, duplicates, rejected, staged) of the one line."""
    (line,) = out.strip().splitlines()
    match = SUMMARY.match(line)
    assert match, line
    return tuple(int(g.replace(",", "")) for g in match.groups()[:7])


def staged_batches(rconn: redis.Redis, keys: RedisKeys) -> int:
    return int(rconn.zcard(keys.staged))


def drain_and_promote(settings: Settings) -> None:
    pipeline.stage_queue(settings, workers=1, batch_size=BATCH)
    pipeline.promote_staged(settings)


def test_follower_stages_orders_pushed_while_it_runs(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        follower: list[subprocess.Popen[str]]) -> None:
    """Orders pushed into a running follower are staged: with signals, and without (a plain
    LPUSH by a foreign producer); SIGTERM while idle ends it at once with the right totals."""
    process = start_follower(follower, settings, "--workers", "1")
    first, _ = push_orders(settings, rconn, pg, 3000, batch_size=BATCH, seed=11,
                           duplicates=0.05, invalid=0.02)
    wait_for(lambda: staged_batches(rconn, keys) == 3, "the first 3 batches staged", 30)
    refs = generator.References.load(pg)
    plain, _ = generator.build_payloads(refs, 700, seed=12, invalid=0.1)
    rconn.lpush(keys.ingestion, *plain)  # no completion signal: found by looking again
    wait_for(lambda: staged_batches(rconn, keys) == 4, "the plain LPUSH staged", 30)
    second, _ = push_orders(settings, rconn, pg, 2000, batch_size=BATCH, seed=13,
                            duplicates=0.1)
    wait_for(lambda: staged_batches(rconn, keys) == 6, "the last 2 batches staged", 30)
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 0  # it never promotes

    took, out, _ = stop(process)
    assert took < STOP_SECONDS
    payloads = first + plain + second
    duplicates = pg.execute("SELECT sum(duplicate_rows) FROM ingest_batches").fetchone()[0]
    rejected = pg.execute("SELECT count(*) FROM orders_rejected").fetchone()[0]
    staged = pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0]
    assert summary(out) == (1, 6, 0, 5700, duplicates, rejected, staged)
    assert (duplicates, rejected) == (150 + 200, 60 + 70)
    assert rconn.zcard(keys.inflight) == 0
    pipeline.promote_staged(settings)
    assert_exactly_once(settings, rconn, pg, payloads)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_with_a_batch_in_hand_finishes_it(
        workers: int, settings: Settings, rconn: redis.Redis, keys: RedisKeys,
        pg: psycopg.Connection, follower: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    """SIGTERM while each worker holds a claimed batch: they finish those, claim nothing
    more, and the command exits 0 promptly; nothing is left leased or lost."""
    payloads, _ = push_orders(settings, rconn, pg, 5000, batch_size=BATCH, seed=21,
                              duplicates=0.05, invalid=0.02)
    marker = tmp_path / "paused"
    process = start_follower(follower, settings, "--workers", str(workers),
                             **{PAUSE_ENV: "after_claim", PAUSE_FILE_ENV: str(marker)})
    wait_for(lambda: marker.exists() and rconn.hlen(keys.owners) == workers,
             f"{workers} batch(es) claimed and paused", 60)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.poll() is None  # still finishing the batches in hand
    assert rconn.zcard(keys.inflight) == workers
    marker.unlink()
    took, out, _ = finish(process, time.monotonic())

    assert took < STOP_SECONDS
    assert summary(out)[:4] == (workers, workers, 0, workers * BATCH)
    assert "left leased" not in out
    assert rconn.zcard(keys.inflight) == 0 and rconn.hlen(keys.owners) == 0
    assert staged_batches(rconn, keys) == workers
    assert rconn.llen(keys.ingestion) == 5000 - workers * BATCH  # nothing claimed after
    drain_and_promote(settings)
    assert_exactly_once(settings, rconn, pg, payloads)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_past_the_grace_period_leaves_the_batch_leased(
        workers: int, settings: Settings, rconn: redis.Redis, keys: RedisKeys,
        pg: psycopg.Connection, follower: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    """A batch that cannot be finished within --grace stays leased under its worker's
    name; the command still exits 0 and says which; once the lease runs out, the next drain
    reclaims it and every order lands exactly once."""
    payloads, _ = push_orders(settings, rconn, pg, 3000, batch_size=BATCH, seed=31,
                              invalid=0.03)
    marker = tmp_path / "paused"
    process = start_follower(follower, settings, "--workers", str(workers), "--grace", "1",
                             **{PAUSE_ENV: "after_claim", PAUSE_FILE_ENV: str(marker)})
    wait_for(lambda: marker.exists() and rconn.hlen(keys.owners) == workers,
             f"{workers} batch(es) claimed and paused", 60)
    held = {b.decode(): o.decode() for b, o in rconn.hgetall(keys.owners).items()}
    took, out, _ = stop(process)

    assert 1.0 <= took < 1.0 + STOP_SECONDS
    assert summary(out)[:4] == (workers, 0, 0, 0)
    assert f"{workers} batch(es) left leased" in out
    assert set(out.strip().rsplit(": ", 1)[1].split()) == set(held)
    assert {b.decode(): o.decode() for b, o in rconn.hgetall(keys.owners).items()} == held
    assert staged_batches(rconn, keys) == 0
    assert pg.execute("SELECT count(*) FROM ingest_batches").fetchone()[0] == 0
    marker.unlink()
    assert expire_leases(rconn, keys) == len(held)
    stats = pipeline.stage_queue(settings, workers=1, batch_size=BATCH)
    assert (stats.batches, stats.reclaimed_batches) == (3, workers)
    pipeline.promote_staged(settings)
    assert_exactly_once(settings, rconn, pg, payloads)


def test_follow_refuses_iterations(settings: Settings) -> None:
    done = subprocess.run([*CLI, "--iterations", "2"], env=pipeline_env(settings),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line == ("orders-pipeline process: error: --iterations and --follow exclude each "
                    "other (see `orders-pipeline process --help`)")


# --- the same stop, in this process, at every point a batch passes ------------------------

STOP_POINTS = ("after_claim", "after_dedup", "mid_copy", "after_copy")


@given(point=st.sampled_from(STOP_POINTS), grace_runs_out=st.booleans(),
       batches=st.integers(1, 3), size=st.integers(1, 400),
       invalid=st.sampled_from([0.0, 0.1]))
@hypothesis_settings(max_examples=12, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_stop_at_any_point_of_a_batch_loses_nothing(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, tmp_path: Path, point: str, grace_runs_out: bool,
        batches: int, size: int, invalid: float) -> None:
    """SIGTERM while the first batch is paused at `point`: finished if the pause ends within
    the grace period, else left leased and reclaimed by the next drain; exactly once."""
    example = fresh_example(settings, rconn, pg)
    example = dataclasses.replace(example, pipeline=dataclasses.replace(
        example.pipeline, batch_size=size))
    keys = RedisKeys(example.redis.key_prefix)
    payloads, _ = push_orders(example, rconn, pg, batches * size, batch_size=size,
                              seed=batches * 1000 + size, invalid=invalid)
    marker = tmp_path / f"paused-{point}-{size}"
    stop = StopRequest(grace_seconds=1.5)
    os.environ.update({PAUSE_ENV: point, PAUSE_FILE_ENV: str(marker)})
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.request())

    def stop_at_the_pause() -> None:
        wait_for(marker.exists, f"the pause at {point}", 60)
        os.kill(os.getpid(), signal.SIGTERM)
        if not grace_runs_out:
            time.sleep(0.1)
            marker.unlink()

    helper = threading.Thread(target=stop_at_the_pause)
    helper.start()
    try:
        stats = StagingWorker(example).follow(size, stop)
    finally:
        helper.join()
        signal.signal(signal.SIGTERM, previous)
        os.environ.pop(PAUSE_ENV, None)
        os.environ.pop(PAUSE_FILE_ENV, None)

    held = [b.decode() for b in rconn.zrange(keys.inflight, 0, -1)]
    if grace_runs_out:
        assert (stats.batches, len(stats.left_in_flight)) == (0, 1)
        assert held == stats.left_in_flight
        marker.unlink()
        assert expire_leases(rconn, keys) == len(held)
    else:
        assert (stats.batches, stats.claimed, stats.left_in_flight) == (1, size, [])
        assert held == []
    assert rconn.llen(keys.ingestion) == (batches - 1) * size
    again = pipeline.stage_queue(example, workers=1, batch_size=size)
    assert again.reclaimed_batches == int(grace_runs_out)
    pipeline.promote_staged(example)
    assert_exactly_once(example, rconn, pg, payloads)
