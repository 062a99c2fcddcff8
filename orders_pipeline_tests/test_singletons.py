"""Promotion and view refresh started from many places at once serialise safely.

Sensor runs, schedules, the CLI and other hosts may all start `promote` or `refresh` at the
same moment. Both take a transaction-level advisory lock, so they queue instead of
interleaving. These tests hold a gate (a table lock for promotion, the refresh's own advisory
lock for refresh), start real `orders-pipeline` processes and in-process threads until every
one of them is queued on it, then open it so they all race: the outcome must be exactly what
one run would have produced, and readers of the views must never wait.
"""

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import psycopg
import redis

from orders_pipeline import pipeline
from orders_pipeline.connections import pg_connect
from orders_pipeline.postgres_patterns.promotion import PromotionResult
from orders_pipeline.postgres_patterns.views import (
    _REFRESH_LOCK,
    VIEWS,
    view_vs_orders,
)
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import REPO, assert_exactly_once, pipeline_env, push_orders

CLI = [sys.executable, "-m", "orders_pipeline"]
PROMOTED = re.compile(r"promoted ([\d,]+) batches: inserted ([\d,]+) rows")
WAIT_SECONDS = 90


def start_cli(settings: Settings, command: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, command], cwd=REPO, env=pipeline_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass(frozen=True)
class Gate:
    """A lock the test holds while contenders start, and how to count who queues on it."""
    take: str
    waiting: str


def advisory_gate(lock: str) -> Gate:
    """The contenders' own advisory lock: they queue exactly where they serialise."""
    return Gate(f"SELECT pg_advisory_xact_lock(hashtext('{lock}'))",
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                " WHERE l.locktype = 'advisory' AND NOT l.granted"
                " AND d.datname = current_database()")


def table_gate(table: str) -> Gate:
    """A table every contender reads first: the gate works even without the advisory lock."""
    return Gate(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE",
                f"SELECT count(*) FROM pg_locks WHERE NOT granted"
                f" AND relation = '{table}'::regclass")


def open_gate_when_all_wait(settings: Settings, pg: psycopg.Connection, gate: Gate,
                            waiters: int, start: Callable[[], list[subprocess.Popen[str]]]
                            ) -> list[subprocess.Popen[str]]:
    """Hold the gate, start the contenders, and open it once all `waiters` queue on it."""
    with pg_connect(settings.postgres) as holder:
        holder.execute(gate.take)
        processes = start()
        deadline = time.monotonic() + WAIT_SECONDS
        while int(pg.execute(gate.waiting).fetchone()[0]) < waiters:
            failed = [p for p in processes if p.poll() is not None]
            assert not failed, [p.communicate() for p in failed]
            assert time.monotonic() < deadline, "contenders never queued on the gate"
            time.sleep(0.05)
        holder.rollback()  # the gate opens: all contenders race at once
    return processes


def finish(processes: list[subprocess.Popen[str]], timeout: float = WAIT_SECONDS) -> list[str]:
    """Wait for every process; each must succeed. Returns their outputs."""
    outputs = []
    deadline = time.monotonic() + timeout
    for process in processes:
        out, err = process.communicate(timeout=max(deadline - time.monotonic(), 1))
        assert process.returncode == 0, err
        outputs.append(out)
    return outputs


def stage(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, count: int,
          seed: int) -> list[bytes]:
    payloads, _ = push_orders(settings, rconn, pg, count, batch_size=2000, seed=seed,
                              duplicates=0.05, invalid=0.01)
    pipeline.stage_queue(settings, workers=1, batch_size=1000)
    return payloads


def test_concurrent_promotions_equal_one_run(settings: Settings, rconn: redis.Redis,
                                             pg: psycopg.Connection) -> None:
    payloads = stage(settings, rconn, pg, 20_000, seed=11)
    staged_batches, staged_rows = pg.execute(
        "SELECT count(*), sum(staged_rows) FROM ingest_batches WHERE status = 'staged'"
    ).fetchone()
    assert staged_batches >= 20

    results: list[PromotionResult] = []
    errors: list[BaseException] = []

    def promote_in_thread() -> None:
        try:  # small rounds, so the threads come back for the lock again and again
            results.append(pipeline.promote_staged(settings, max_batches_per_round=3))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote_in_thread) for _ in range(2)]

    def start_all() -> list[subprocess.Popen[str]]:
        processes = [start_cli(settings, "promote") for _ in range(4)]
        for thread in threads:
            thread.start()
        return processes

    processes = open_gate_when_all_wait(settings, pg, table_gate("ingest_batches"), 6,
                                        start_all)
    outputs = finish(processes)
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
    assert not errors, errors

    # Every batch promoted by exactly one promoter, every row inserted exactly once.
    by_process = [PROMOTED.search(out) for out in outputs]
    assert all(by_process), outputs
    promoted = (sum(int(m[1].replace(",", "")) for m in by_process if m)
                + sum(len(r.promoted_batches) for r in results))
    inserted = (sum(int(m[2].replace(",", "")) for m in by_process if m)
                + sum(r.inserted_rows for r in results))
    orders = pg.execute("SELECT count(*) FROM orders").fetchone()[0]
    assert promoted == staged_batches
    assert inserted == orders == staged_rows
    ledger = pg.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'promoted') FROM ingest_batches"
    ).fetchone()
    assert ledger == (staged_batches, staged_batches)
    log = pg.execute("SELECT sum(batches), sum(staged_rows), sum(inserted_rows),"
                     " count(*) FILTER (WHERE inserted_rows <> staged_rows) FROM promotions"
                     ).fetchone()
    assert log == (staged_batches, staged_rows, orders, 0)
    assert_exactly_once(settings, rconn, pg, payloads)


def test_concurrent_refreshes_never_block_or_tear_reads(settings: Settings, rconn: redis.Redis,
                                                        pg: psycopg.Connection) -> None:
    """Four `refresh` processes at once while a reader polls the view.

    A second connection keeps the views open in a transaction the whole time, as a long
    dashboard query would: a plain REFRESH would queue behind it (and every later reader
    behind the refresh); REFRESH CONCURRENTLY does not. Each read must be the whole old
    view or the whole new one.
    """
    stage(settings, rconn, pg, 8000, seed=21)
    pipeline.promote_staged(settings)
    pipeline.refresh_all_views(settings)
    stage(settings, rconn, pg, 8000, seed=22)
    pipeline.promote_staged(settings)
    total = "SELECT coalesce(sum(order_count), 0) FROM sales_hourly"
    old = pg.execute(total).fetchone()[0]
    new = pg.execute("SELECT count(*) FROM orders").fetchone()[0]
    assert 0 < old < new

    reads: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_loop() -> None:
        try:
            with pg_connect(settings.postgres) as reader:
                reader.autocommit = True
                reader.execute("SET statement_timeout = '5s'")  # blocked = error
                while not stop.is_set():
                    reads.append(int(reader.execute(total).fetchone()[0]))
                    time.sleep(0.005)
        except BaseException as exc:
            errors.append(exc)

    reader_thread = threading.Thread(target=read_loop, daemon=True)
    reader_thread.start()
    try:
        with pg_connect(settings.postgres) as long_reader:
            for view in VIEWS:  # holds AccessShareLock on both views until rollback
                long_reader.execute(f"SELECT count(*) FROM {view}").fetchone()
            processes = open_gate_when_all_wait(
                settings, pg, advisory_gate(f"{_REFRESH_LOCK}:{VIEWS[0]}"), 4,
                lambda: [start_cli(settings, "refresh") for _ in range(4)])
            try:  # a refresh that waits for the open reader never finishes while it is open
                finish(processes, timeout=30)
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
                long_reader.rollback()
        time.sleep(0.1)
    finally:
        stop.set()
        reader_thread.join(timeout=WAIT_SECONDS)

    assert not errors, errors
    assert reads and set(reads) <= {old, new}, sorted(set(reads))
    assert reads[-1] == new
    for view in VIEWS:
        of_view, of_orders = view_vs_orders(pg, view)
        assert of_view == of_orders
        assert of_view.revenue_usd > Decimal(0)
