"""`scale-curve`: how promotion, freshness, dashboards, sizes and memory change as the
database grows (issue 10, item 3).

One scratch database and Redis key prefix (removed at the end) is grown step by step. At each
size S of `--sizes` (ascending):

1. **preload**: COPY orders (`preload.preload_orders`, in its own process) until S orders
   are present, spread over the `--history-days` days up to an hour ago (the product's month
   partitions created first, ids in the guard `order_ids`, rollups updated, VACUUM ANALYZE,
   CHECKPOINT, views refreshed). Orders the runs of earlier sizes added count as present.
2. **promotion of a run** (a), once per id style: `uuid7` (time-ordered UUIDv7, what
   `generator.build_payloads` makes) and `uuid4` (uniformly random ids, `uuid4_payloads`).
   `--run-orders` orders are built and pushed to the queue (timed: build, push), staged by
   the real workers (`pipeline.stage_queue`, timed apart), a CHECKPOINT taken (untimed, so
   both styles start alike), then `pipeline.promote_staged` timed alone -> orders/s, and the
   views refreshed (`pipeline.refresh_all_views`, timed).
3. **views fresh after a batch** (b): `--fresh-batch` UUIDv7 orders pushed and staged
   (untimed), promoted by one `promotion.promote_round` (timed to its commit), then
   `pipeline.refresh_all_views` timed from that commit until it returns: then both
   dashboard views answer with the batch (checked: for the batch's months each view's order
   count equals its rollup's and grew by the orders promoted).
4. **dashboard** (c): a process runs the dashboard queries of the end-to-end benchmark
   (`end_to_end.poll_dashboard`) from step 2 to the end of step 3; latency p50/p99/max and
   count over all of it and per phase.
5. **sizes** (d): `orders` (sum over its partitions: total, heap, indexes), the number of
   partitions and the largest (`partitions.partitions`), `order_ids`, the rollups, the month
   views (sum over `view_slices.relation_name`), the database; WAL written by the preload,
   by each promotion and over steps 2-3.
6. **memory** (e): Postgres' server processes (sum of RSS, and of PSS from
   /proc/PID/smaps_rollup, which counts shared memory once; `shared_buffers` beside it),
   Redis (INFO memory: used_memory, used_memory_rss; the whole server), and the peak RSS of
   the benchmark's own processes (itself, the preload process, the dashboard process, the
   staging workers).

`--design unpartitioned` measures (a) only, as a raw-insert comparison: the rows go into
FLAT_TABLE, a plain table shaped like the seed's `orders` (order_id text PRIMARY KEY, btree
index on order_timestamp), preloaded the same way; each run's rows are staged by the real
workers and then moved by one `INSERT INTO orders_flat ... SELECT ... FROM orders_staging ON
CONFLICT (order_id) DO NOTHING` (timed), without the rollups, the guard, the outbox or the
ledger of a real promotion.

Before anything it estimates the disk the whole curve needs (bytes per order present by
design, BYTES_PER_ORDER, or the measured bytes per order once there are orders) and refuses
in one line (ScaleCurveRefused) when the Postgres data directory's file system has less free;
it checks again before each size. The figures go to a markdown table, JSON (also written
after each size) and, with `--plot`, a PNG (`plot_curve`, matplotlib: the `bench` extra).
"""

import math
import multiprocessing as mp
import os
import queue as queue_module
import random
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.end_to_end import (
    BenchmarkFailed,
    Reports,
    child_main,
    peak_rss_kib,
    percentiles,
    poll_dashboard,
    run_child,
    wal_bytes,
    wal_lsn,
)
from benchmarks.host import ProcessSampler, machine_info
from benchmarks.preload import (
    FLAT_TABLE,
    GUARD,
    ORDERS,
    create_flat_table,
    preload_orders,
    uuid4_ids,
)
from benchmarks.scratch import bench_settings, remove_scratch
from orders_pipeline import generator, pipeline
from orders_pipeline.connections import pg_connect, redis_client
from orders_pipeline.postgres_patterns.partitions import month_of, partitions
from orders_pipeline.postgres_patterns.promotion import ORDER_COLUMNS, promote_round
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.postgres_patterns.views import ROLLUPS, SHAPES
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings

SIZES = (0, 10_000_000, 50_000_000, 100_000_000)
DESIGNS = ("partitioned", "unpartitioned")
ID_STYLES = ("uuid7", "uuid4")
OUTPUT = Path("benchmarks") / "results" / "scale-curve.json"
# Disk per order present, of what grows with the orders (orders and guard, or the flat
# table), with UUIDv7 ids: measured 432 and 316 bytes at 1M present (runs of 20,000 orders
# included); the estimate uses the figure measured on the way once it is larger.
BYTES_PER_ORDER = {"partitioned": 450, "unpartitioned": 330}
# The estimate x this, plus twice max_wal_size, must be free before a preload.
DISK_HEADROOM = 1.25
GIB = 2**30
DASHBOARD_TIMEOUT_SECONDS = 60


class ScaleCurveRefused(RuntimeError):
    """The curve cannot run here as asked (not enough free disk); the text says why."""


@dataclass(frozen=True)
class CurveOptions:
    """Sizes (orders present, ascending), orders per measured run, the fresh batch (0:
    skip), days of history the preload spreads orders over, the design, staging workers and
    batch size, the dashboard's pause between polls (seconds), the generator seed."""
    sizes: tuple[int, ...] = SIZES
    run_orders: int = 1_000_000
    fresh_batch: int = 100_000
    history_days: int = 1095
    design: str = "partitioned"
    workers: int = 2
    batch_size: int = 5_000
    dashboard_interval: float = 0.25
    seed: int = 1

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {', '.join(DESIGNS)}, not {self.design!r}")
        if not self.sizes or list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 0:
            raise ValueError("sizes must be distinct non-negative counts in ascending order")
        if min(self.run_orders, self.history_days, self.workers, self.batch_size) < 1:
            raise ValueError("run orders, history days, workers and batch size must be at "
                             "least 1")
        if self.fresh_batch < 0:
            raise ValueError("the fresh batch cannot be negative")

    @property
    def measures_views(self) -> bool:
        """The partitioned design measures (b)-(c); the unpartitioned one (a) only."""
        return self.design == "partitioned"

    @property
    def table(self) -> str:
        return ORDERS if self.measures_views else FLAT_TABLE

    @property
    def orders_per_size(self) -> int:
        """Orders each size adds beyond its preload (the runs and the fresh batch)."""
        return len(ID_STYLES) * self.run_orders + (
            self.fresh_batch if self.measures_views else 0)


def parse_sizes(text: str) -> tuple[int, ...]:
    """`0,10000000,50_000_000` -> (0, 10000000, 50000000); ValueError unless distinct
    non-negative integers in ascending order."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected integers separated by commas, not {text!r}") from None
    if not sizes or any(size < 0 for size in sizes) or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"expected distinct non-negative integers in ascending order, "
                         f"not {text!r}")
    return sizes


def uuid4_payloads(refs: generator.References, count: int, seed: int) -> list[bytes]:
    """`count` valid order payloads like `generator.build_payloads` makes (contents from
    `seed`), but with uniformly random version-4 UUIDs as order ids (never seen before)."""
    orders = generator.valid_orders(refs, count, random.Random(seed))
    return generator.to_payloads(orders.with_columns(uuid4_ids(count, secrets.randbits(64))))


# ---------------------------------------------------------------------------- disk


def _data_directory(conn: psycopg.Connection) -> Path | None:
    """Postgres' data directory if this host can see it (a local server), else None."""
    try:
        where = Path(conn.execute("SHOW data_directory").fetchone()[0])
    except psycopg.Error:  # only superusers (and pg_read_all_settings) may read it
        return None
    finally:
        conn.rollback()
    return where if where.exists() else None


def disk_check(conn: psycopg.Connection, options: CurveOptions, present: int,
               bytes_per_order: float, sizes: tuple[int, ...]) -> dict[str, Any]:
    """The disk the curve needs to measure at `sizes` (those left) with `present` orders
    present now, against what is free.

    Needed: (orders still to add: up to the last size, plus each size's runs) x
    max(`bytes_per_order`, BYTES_PER_ORDER[design]) x DISK_HEADROOM, plus twice
    `max_wal_size` (WAL may exceed it while a checkpoint runs). Returns the figures
    (free_bytes None when the data directory is not on this host); raises ScaleCurveRefused
    when free disk is short.
    """
    adding = max(0, sizes[-1] - present) + len(sizes) * options.orders_per_size
    per_order = max(bytes_per_order, BYTES_PER_ORDER[options.design])
    max_wal = int(conn.execute(
        "SELECT pg_size_bytes(current_setting('max_wal_size'))").fetchone()[0])
    conn.rollback()
    needed = int(adding * per_order * DISK_HEADROOM) + 2 * max_wal
    where = _data_directory(conn)
    free = shutil.disk_usage(where).free if where is not None else None
    figures = {"orders_to_add": adding, "bytes_per_order": round(per_order, 1),
               "needed_bytes": needed, "free_bytes": free,
               "data_directory": str(where) if where else None}
    if free is not None and free < needed:
        raise ScaleCurveRefused(
            f"not enough free disk for the curve: it needs about {needed / GIB:,.1f} GiB "
            f"({adding:,} more orders x {per_order:,.0f} bytes x {DISK_HEADROOM} + WAL)"
            f", {free / GIB:,.1f} GiB free at {where}")
    return figures


# ---------------------------------------------------------------------------- sizes, memory


def _sizes(conn: psycopg.Connection, options: CurveOptions) -> dict[str, Any]:
    """Bytes on disk (d): the orders table (over its partitions), the guard, the rollups,
    the month views, the database."""
    out: dict[str, Any] = {}
    # The leaves of a partitioned table (pg_partition_tree lists none for a plain table).
    total, heap, indexes, leaves = conn.execute(
        "WITH leaves AS (SELECT relid, level FROM pg_partition_tree(%(t)s::regclass)"
        " WHERE isleaf UNION ALL SELECT %(t)s::regclass, 0"
        " WHERE NOT EXISTS (SELECT FROM pg_partition_tree(%(t)s::regclass)))"
        " SELECT coalesce(sum(pg_total_relation_size(relid)), 0),"
        " coalesce(sum(pg_relation_size(relid)), 0), coalesce(sum(pg_indexes_size(relid)), 0),"
        " count(*) FILTER (WHERE level > 0) FROM leaves", {"t": options.table}).fetchone()
    out["orders"] = {"table": options.table, "total_bytes": int(total),
                     "heap_bytes": int(heap), "index_bytes": int(indexes)}
    if options.measures_views:
        months = partitions(conn)
        largest = max(months, key=lambda p: p.total_bytes, default=None)
        out["partitions"] = {"count": int(leaves), "largest": None if largest is None else {
            "name": largest.name, "total_bytes": largest.total_bytes,
            "estimated_rows": largest.estimated_rows}}
        out["relations"] = {name: int(size) for name, size in conn.execute(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class"
            " WHERE relname = ANY(%s) AND relkind = 'r'", ([GUARD, *ROLLUPS],)).fetchall()}
        guard_heap, guard_indexes = conn.execute(
            "SELECT pg_relation_size(%(t)s::regclass), pg_indexes_size(%(t)s::regclass)",
            {"t": GUARD}).fetchone()
        out["guard"] = {"total_bytes": out["relations"].pop(GUARD),
                        "heap_bytes": int(guard_heap), "index_bytes": int(guard_indexes)}
        count, views = conn.execute(
            "SELECT count(*), coalesce(sum(pg_total_relation_size(to_regclass("
            "quote_ident(relation_name)))), 0) FROM view_slices").fetchone()
        out["view_slices"] = {"count": int(count), "total_bytes": int(views)}
    out["database_bytes"] = int(conn.execute(
        "SELECT pg_database_size(current_database())").fetchone()[0])
    conn.rollback()
    return out


def _proc_kib(path: str, field: str) -> int | None:
    """The value (kB) of `field:` in a /proc file such as status or smaps_rollup."""
    try:
        with open(path) as lines:
            return next((int(line.split()[1]) for line in lines if line.startswith(field)),
                        None)
    except OSError:
        return None


def _postgres_memory(conn: psycopg.Connection) -> dict[str, Any]:
    """RSS and PSS (KiB) summed over the Postgres server's processes (postmaster and its
    children), found from this connection's backend; `available` False when the server does
    not run on this host (or /proc cannot be read)."""
    shared_buffers = conn.execute("SELECT current_setting('shared_buffers')").fetchone()[0]
    backend = conn.info.backend_pid
    conn.rollback()
    out: dict[str, Any] = {"shared_buffers": shared_buffers, "available": False}
    try:
        with open(f"/proc/{backend}/stat") as stat:
            text = stat.read()
        if text[text.index("(") + 1:text.rindex(")")] != "postgres":
            return out
        postmaster = int(text[text.rindex(")") + 2:].split()[1])
    except (OSError, ValueError):
        return out
    server = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == postmaster:
                server.append(int(entry))
    rss = [_proc_kib(f"/proc/{pid}/status", "VmRSS:") for pid in server]
    pss = [_proc_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in server]
    out.update(available=True, processes=len(server),
               rss_kib=sum(v for v in rss if v is not None),
               pss_kib=sum(v for v in pss if v is not None) if any(
                   v is not None for v in pss) else None)
    return out


def _redis_memory(settings: Settings) -> dict[str, int]:
    """Redis INFO memory (bytes; the whole server, other users of it included)."""
    info = redis_client(settings.redis).info("memory")
    return {name: int(info[name]) for name in ("used_memory", "used_memory_rss",
                                               "used_memory_peak")}


# ---------------------------------------------------------------------------- the runs


def _queue(settings: Settings) -> OrderQueue:
    return OrderQueue(redis_client(settings.redis), RedisKeys.of(settings.redis),
                      settings.pipeline.claim_timeout_seconds)


def _push(settings: Settings, refs: generator.References, count: int, style: str,
          batch_size: int, seed: int) -> dict[str, Any]:
    """Build `count` payloads with ids of `style` and push them, GENERATE_CHUNK at a time
    (memory bounded by the chunk); the queue takes them all (no backpressure)."""
    client = redis_client(settings.redis)
    backpressure = Backpressure(client, RedisKeys.of(settings.redis), 10**12)
    queue = _queue(settings)
    build = push = 0.0
    for number, start in enumerate(range(0, count, generator.GENERATE_CHUNK)):
        size = min(generator.GENERATE_CHUNK, count - start)
        started = time.perf_counter()
        payloads = (generator.build_payloads(refs, size, seed=seed + number)[0]
                    if style == "uuid7" else uuid4_payloads(refs, size, seed + number))
        build += time.perf_counter() - started
        started = time.perf_counter()
        generator.push_payloads(queue, backpressure, payloads, batch_size)
        push += time.perf_counter() - started
    return {"build_seconds": round(build, 3), "push_seconds": round(push, 3)}


def _stage(settings: Settings, options: CurveOptions, count: int) -> dict[str, Any]:
    """Stage what is queued with the real workers; raises BenchmarkFailed unless all
    `count` orders were staged."""
    started = time.perf_counter()
    staged = pipeline.stage_queue(settings, workers=options.workers,
                                  batch_size=options.batch_size)
    seconds = time.perf_counter() - started
    if staged.staged != count:
        raise BenchmarkFailed(f"the workers staged {staged.staged:,} of {count:,} orders "
                              f"({staged.rejected:,} rejected, {staged.duplicates:,} "
                              "duplicates)")
    return {"stage_seconds": round(seconds, 3),
            "stage_orders_per_second": round(count / seconds, 1) if seconds else 0.0}


def _checkpoint(settings: Settings) -> None:
    with pg_connect(settings.postgres) as conn:
        conn.autocommit = True
        conn.execute("CHECKPOINT")


def _insert_flat(settings: Settings) -> tuple[int, float, int]:
    """The raw insert of the unpartitioned design: staged rows into FLAT_TABLE in one
    statement (committed); then staging, the ledger and the Redis batches are cleared as a
    promotion would. Returns (rows inserted, seconds of the insert and its commit, batches)."""
    columns = sql.SQL(", ").join(map(sql.Identifier, ORDER_COLUMNS))
    statement = sql.SQL(
        "INSERT INTO {flat} ({columns}) SELECT {columns} FROM orders_staging"
        " ON CONFLICT (order_id) DO NOTHING").format(flat=sql.Identifier(FLAT_TABLE),
                                                     columns=columns)
    with pg_connect(settings.postgres) as conn:
        started = time.perf_counter()
        inserted = conn.execute(statement).rowcount
        conn.commit()
        seconds = time.perf_counter() - started
        conn.execute("TRUNCATE orders_staging")
        conn.execute("UPDATE ingest_batches SET status = 'promoted', promoted_at = now()"
                     " WHERE status = 'staged'")
        conn.commit()
    queue = _queue(settings)
    batches = queue.staged_batch_ids()
    queue.release(batches)
    return inserted, seconds, len(batches)


def _run(settings: Settings, options: CurveOptions, refs: generator.References, style: str,
         seed: int, phases: list[tuple[str, float, float]]) -> dict[str, Any]:
    """(a): push, stage, then promotion alone (and, partitioned, the refresh) of one run."""
    count = options.run_orders
    out: dict[str, Any] = {"orders": count, "id_style": style}
    began = time.time()
    out.update(_push(settings, refs, count, style, options.batch_size, seed))
    out.update(_stage(settings, options, count))
    _checkpoint(settings)
    since = wal_lsn(settings)
    if options.measures_views:
        started = time.perf_counter()
        promoted = pipeline.promote_staged(settings)
        seconds = time.perf_counter() - started
        inserted, batches = promoted.inserted_rows, len(promoted.promoted_batches)
    else:
        inserted, seconds, batches = _insert_flat(settings)
    out["promotion_wal_bytes"] = wal_bytes(settings, since)
    if inserted != count:
        raise BenchmarkFailed(f"{style} run: {inserted:,} of {count:,} orders inserted")
    out.update(promote_seconds=round(seconds, 3), promoted_batches=batches,
               promote_orders_per_second=round(count / seconds, 1))
    if options.measures_views:
        began_refresh, started = time.time(), time.perf_counter()
        refreshed = pipeline.refresh_all_views(settings)
        out["refresh_seconds"] = round(time.perf_counter() - started, 3)
        out["refresh_seconds_by_view"] = {view: round(s, 3) for view, s in refreshed.items()}
        phases.append((f"refresh_{style}", began_refresh, time.time()))
    phases.append((f"run_{style}", began, time.time()))
    return out


def _vacuum_after_promotion(settings: Settings) -> None:
    """What `pipeline.promote_staged` does after its rounds: vacuum staging and rollups."""
    with pg_connect(settings.postgres) as conn:
        conn.autocommit = True
        conn.execute(sql.SQL("VACUUM (SKIP_LOCKED) {}").format(sql.SQL(", ").join(
            map(sql.Identifier, ("orders_staging", *ROLLUPS)))))


def _view_counts(conn: psycopg.Connection, months: list[date]) -> dict[str, list[int]]:
    """Per dashboard view, for `months`: [orders in the view, orders in its rollup]."""
    counts = {}
    for view, shape in SHAPES.items():
        inside = sql.SQL(" OR ").join(sql.SQL("({})").format(shape.in_month(m))
                                      for m in months)
        row = conn.execute(sql.SQL(
            "SELECT (SELECT coalesce(sum(order_count), 0) FROM {view} WHERE {inside}),"
            " (SELECT coalesce(sum(order_count), 0) FROM {rollup} WHERE {inside})").format(
                view=sql.Identifier(view), rollup=sql.Identifier(shape.rollup),
                inside=inside)).fetchone()
        counts[view] = [int(row[0]), int(row[1])]
    conn.rollback()
    return counts


def _fresh_batch(settings: Settings, options: CurveOptions, refs: generator.References,
                 seed: int, phases: list[tuple[str, float, float]]) -> dict[str, Any]:
    """(b): a batch pushed and staged (untimed), promoted by one round (timed to its
    commit), then the refresh timed from that commit until both views hold the batch."""
    count = options.fresh_batch
    began = time.time()
    _push(settings, refs, count, "uuid7", options.batch_size, seed)
    _stage(settings, options, count)
    queue = _queue(settings)
    with pg_connect(settings.postgres) as conn:
        first, last = conn.execute(
            "SELECT min(order_timestamp), max(order_timestamp) FROM orders_staging"
        ).fetchone()
        months = sorted({month_of(first), month_of(last)})
        before = _view_counts(conn, months)
        started = time.perf_counter()
        promoted = promote_round(conn, 400, queue.batch_payloads)
        committed = time.perf_counter()
        fresh_from = time.time()
        refreshed = pipeline.refresh_all_views(settings)
        fresh = time.perf_counter() - committed
        phases.append(("fresh_refresh", fresh_from, time.time()))
        after = _view_counts(conn, months)
    queue.release(promoted.promoted_batches)  # what promote_staged does after a round
    _vacuum_after_promotion(settings)
    phases.append(("fresh_batch", began, time.time()))
    answered = all(after[view][0] == after[view][1]
                   and after[view][0] - before[view][0] == promoted.inserted_rows
                   for view in SHAPES)
    if promoted.inserted_rows != count or not answered:
        raise BenchmarkFailed(f"fresh batch: {promoted.inserted_rows:,} of {count:,} orders "
                              f"promoted; view/rollup orders before {before}, after {after}")
    return {"orders": count, "promote_seconds": round(committed - started, 3),
            "promoted_batches": len(promoted.promoted_batches),
            "views_fresh_seconds": round(fresh, 3),
            "refresh_seconds_by_view": {view: round(s, 3) for view, s in refreshed.items()},
            "months": [m.isoformat() for m in months], "views_answer_with_batch": answered}


# ---------------------------------------------------------------------------- dashboard


@dataclass
class _Dashboard:
    process: BaseProcess
    reports: Reports
    stop: Any  # a multiprocessing Event


def _start_dashboard(ctx: Any, settings: Settings, interval: float) -> _Dashboard:
    reports: Reports = ctx.Queue()
    stop = ctx.Event()
    process = ctx.Process(target=child_main, name="dashboard",
                          args=("dashboard", reports, poll_dashboard,
                                (settings, stop, interval, reports)))
    process.start()
    dashboard = _Dashboard(process, reports, stop)
    _await_report(dashboard, "ready")
    return dashboard


def _await_report(dashboard: _Dashboard, kind: str) -> Any:
    deadline = time.monotonic() + DASHBOARD_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            _, got, payload = dashboard.reports.get(timeout=1.0)
        except queue_module.Empty:
            if dashboard.process.exitcode is not None:
                raise BenchmarkFailed(f"dashboard exited with code "
                                      f"{dashboard.process.exitcode}") from None
            continue
        if got == "error":
            raise BenchmarkFailed(f"dashboard: {payload}")
        if got == kind:
            return payload
    raise BenchmarkFailed(f"no {kind!r} report from the dashboard in "
                          f"{DASHBOARD_TIMEOUT_SECONDS} s")


def _stop_dashboard(dashboard: _Dashboard, phases: list[tuple[str, float, float]]
                    ) -> tuple[dict[str, Any], int]:
    """Stop the dashboard: its latencies over all and per phase, and its peak RSS (KiB)."""
    dashboard.stop.set()
    try:
        done = _await_report(dashboard, "done")
    finally:
        dashboard.process.join(timeout=30)
    samples = [sample for per_query in done["result"].values() for sample in per_query]
    by_phase = {name: percentiles([s for at, s in samples if start <= at <= end])
                for name, start, end in phases}
    return ({"all": percentiles([s for _, s in samples]), "by_phase": by_phase},
            done["peak_rss_kib"])


# ---------------------------------------------------------------------------- the curve


def _orders_present(conn: psycopg.Connection, table: str) -> int:
    count = int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        sql.Identifier(table))).fetchone()[0])
    conn.rollback()
    return count


def _bytes_per_order(sizes: dict[str, Any], present: int) -> float:
    """Bytes on disk per order present, of what grows with the orders: the orders table and
    the guard (the rollups and month views grow with the history instead)."""
    grows = sizes["orders"]["total_bytes"] + sizes.get("guard", {}).get("total_bytes", 0)
    return grows / present if present else 0.0


def _point(ctx: Any, bench: Settings, options: CurveOptions, index: int, present: int,
           say: Callable[[str], None], show_progress: bool) -> tuple[dict[str, Any], int]:
    """Grow to size number `index` and measure there; returns the point's figures and the
    orders now present."""
    size = options.sizes[index]
    point: dict[str, Any] = {"size": size}
    with pg_connect(bench.postgres) as conn:
        point["disk"] = disk_check(conn, options, present, _bytes_per_order(
            _sizes(conn, options), present), options.sizes[index:])
    if size > present:
        adding = size - present
        say(f"size {size:,}: preloading {adding:,} orders over {options.history_days} days "
            f"(about {point['disk']['bytes_per_order'] * adding / GIB:,.1f} GiB)")
        since = wal_lsn(bench)
        loaded = run_child(ctx, "preload", preload_orders,
                           (bench, adding, options.seed + 5_000_011 + 7 * index,
                            show_progress, options.history_days, present, options.table))
        point["preload"] = {**loaded["result"], "wal_bytes": wal_bytes(bench, since),
                            "peak_rss_kib": loaded["peak_rss_kib"]}
        present += adding
        say(f"size {size:,}: preloaded in {loaded['result']['copy_seconds']:.1f} s "
            f"({loaded['result']['load_orders_per_second']:,.0f} orders/s)")
    point["orders_present"] = present
    with pg_connect(bench.postgres) as conn:
        refs = generator.References.load(conn)
    phases: list[tuple[str, float, float]] = []
    roles: dict[int, str] = {os.getpid(): "benchmark"}
    dashboard = _start_dashboard(ctx, bench, options.dashboard_interval) if (
        options.measures_views) else None
    if dashboard is not None and dashboard.process.pid is not None:
        roles[dashboard.process.pid] = "dashboard"
    sampler = ProcessSampler(lambda: roles, bench.postgres.dbname)
    redis_before = _redis_memory(bench)
    since = wal_lsn(bench)
    point["runs"] = {}
    try:
        for number, style in enumerate(ID_STYLES):
            say(f"size {size:,}: {style} run of {options.run_orders:,} orders with "
                f"{present:,} present")
            run = _run(bench, options, refs, style,
                       options.seed + 1_000 * index + 100 * number, phases)
            run["orders_present_before"] = present
            present += options.run_orders
            point["runs"][style] = run
            say(f"size {size:,}: {style} promotion {run['promote_orders_per_second']:,.0f} "
                f"orders/s ({run['promote_seconds']:.1f} s)")
        if options.measures_views and options.fresh_batch:
            fresh = _fresh_batch(bench, options, refs, options.seed + 1_000 * index + 900,
                                 phases)
            fresh["orders_present_before"] = present
            present += options.fresh_batch
            point["fresh_batch"] = fresh
            say(f"size {size:,}: views fresh {fresh['views_fresh_seconds']:.2f} s after a "
                f"{options.fresh_batch:,}-order batch (its promotion "
                f"{fresh['promote_seconds']:.2f} s)")
    except BaseException:
        sampler.stop()
        if dashboard is not None:  # a failed point leaves no dashboard behind
            dashboard.process.kill()
            dashboard.process.join(timeout=30)
        raise
    point["cpu"] = sampler.stop()
    dashboard_rss = None
    if dashboard is not None:
        point["dashboard"], dashboard_rss = _stop_dashboard(dashboard, phases)
    point["wal_bytes"] = wal_bytes(bench, since)
    point["orders_present_after"] = present
    with pg_connect(bench.postgres) as conn:
        point["sizes"] = _sizes(conn, options)
        point["memory"] = {"postgres": _postgres_memory(conn)}
    redis_after = _redis_memory(bench)
    point["memory"]["redis"] = {**redis_after, "used_memory_growth": (
        redis_after["used_memory"] - redis_before["used_memory"])}
    # One worker runs inside the benchmark's process (pipeline.stage_queue): no "workers".
    point["memory"]["peak_rss_kib"] = {
        "benchmark": peak_rss_kib(),
        **({"workers": max(sampler.worker_peak_rss_kib.values())}
           if sampler.worker_peak_rss_kib else {}),
        **({"preload": point["preload"]["peak_rss_kib"]} if "preload" in point else {}),
        **({"dashboard": dashboard_rss} if dashboard_rss is not None else {})}
    return point, present


def _verify(bench: Settings, options: CurveOptions, present: int) -> dict[str, Any]:
    """Every order counted: the table (and, partitioned, the guard) hold `present` rows."""
    with pg_connect(bench.postgres) as conn:
        counted = {options.table: _orders_present(conn, options.table)}
        if options.measures_views:
            counted[GUARD] = _orders_present(conn, GUARD)
    return {"expected": present, "counted": counted,
            "verified": all(count == present for count in counted.values())}


def run_curve(settings: Settings, options: CurveOptions,
              progress: Callable[[str], None] | None = None, show_progress: bool = False,
              on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Grow one scratch database through `options.sizes` and measure at each size; the
    database and key prefix are always removed. Returns the figures as one JSON-able dict
    (module docstring; `complete` True). After each size `on_point` gets the figures so far
    (`complete` False, no `verified`), e.g. to save them in case a later size fails. Raises
    ScaleCurveRefused when free disk is short, BenchmarkFailed when a step failed or lost
    orders; server errors propagate."""
    say = progress or (lambda _: None)
    bench = bench_settings(settings)
    ctx = mp.get_context("spawn")
    result: dict[str, Any] = {
        "benchmark": "scale_curve", "complete": False,
        "started_at": datetime.now(UTC).isoformat(), "database": bench.postgres.dbname,
        "key_prefix": bench.redis.key_prefix,
        "options": {**options.__dict__, "sizes": list(options.sizes)},
        "load_average_before": os.getloadavg(), "points": []}
    try:
        ensure_database(bench.postgres)
        with pg_connect(bench.postgres) as conn:
            disk = result["disk"] = disk_check(conn, options, 0, 0, options.sizes)
            say(f"disk: the curve needs about {disk['needed_bytes'] / GIB:,.1f} GiB; "
                + (f"{disk['free_bytes'] / GIB:,.1f} GiB free" if disk["free_bytes"] is not None
                   else "free disk unknown (the Postgres data directory is not on this host)"))
            apply_schema(conn)
            if not options.measures_views:
                create_flat_table(conn)
            LookupCache(redis_client(bench.redis), RedisKeys.of(bench.redis),
                        bench.pipeline.lookup_ttl_seconds).load_snapshot(conn)
        result["machine"] = machine_info(bench)
        present = 0
        for index in range(len(options.sizes)):
            point, present = _point(ctx, bench, options, index, present, say, show_progress)
            result["points"].append(point)
            result["load_average_after"] = os.getloadavg()
            if on_point is not None:
                on_point(result)
        verified = result["verified"] = _verify(bench, options, present)
        if not verified["verified"]:
            raise BenchmarkFailed(f"orders counted {verified['counted']}, expected "
                                  f"{present:,}")
    finally:
        remove_scratch(bench)
    result.update(complete=True, load_average_after=os.getloadavg())
    return result


# ---------------------------------------------------------------------------- output


def _cell(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:{spec}}")


def render_curve(result: dict[str, Any]) -> str:
    """The curve as a markdown table, one row per size, with a legend."""
    options = result["options"]
    views = options["design"] == "partitioned"
    head = ["orders present", "preload s (orders/s)", "promote UUIDv7/s", "promote UUIDv4/s"]
    if views:
        head += ["fresh s (batch promote s)", "dashboard p50 / p99 / max ms (n)"]
    head += ["orders GiB (heap/idx)"]
    if views:
        head += ["order_ids GiB", "partitions (largest MiB)", "view slices MiB"]
    head += ["WAL GiB", "Postgres PSS / RSS MiB", "Redis used / rss MiB", "peak RSS MiB"]
    lines = [f"scale curve, {options['design']} design: runs of {options['run_orders']:,} "
             f"orders, history {options['history_days']} days, {options['workers']} workers, "
             f"batch {options['batch_size']:,}"
             + (f", fresh batch {options['fresh_batch']:,}" if views else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for point in result["points"]:
        preload = point.get("preload")
        runs = point["runs"]
        row = [f"{point['orders_present']:,}",
               "—" if preload is None else (
                   f"{preload['copy_seconds'] + preload.get('rollup_seconds', 0):,.1f} "
                   f"({preload['load_orders_per_second']:,.0f})"),
               _cell(runs["uuid7"]["promote_orders_per_second"]),
               _cell(runs["uuid4"]["promote_orders_per_second"])]
        sizes = point["sizes"]
        if views:
            fresh = point.get("fresh_batch")
            dash = point.get("dashboard", {}).get("all", {})
            row += ["—" if fresh is None else
                    f"{fresh['views_fresh_seconds']:.2f} ({fresh['promote_seconds']:.2f})",
                    f"{_cell(dash.get('p50_ms'), '.1f')} / {_cell(dash.get('p99_ms'), '.1f')}"
                    f" / {_cell(dash.get('max_ms'), '.1f')} ({dash.get('count', 0):,})"]
        orders = sizes["orders"]
        row.append(f"{orders['total_bytes'] / GIB:,.2f} ({orders['heap_bytes'] / GIB:,.2f}/"
                   f"{orders['index_bytes'] / GIB:,.2f})")
        if views:
            largest = sizes["partitions"]["largest"]
            row += [f"{sizes['guard']['total_bytes'] / GIB:,.2f}",
                    f"{sizes['partitions']['count']} ("
                    + ("—" if largest is None else f"{largest['total_bytes'] / 2**20:,.0f}")
                    + ")",
                    f"{sizes['view_slices']['total_bytes'] / 2**20:,.1f}"]
        memory = point["memory"]
        postgres = memory["postgres"]
        redis_memory = memory["redis"]
        rss = [v for v in memory["peak_rss_kib"].values() if v is not None]
        pss = postgres.get("pss_kib")
        row += [f"{point['wal_bytes'] / GIB:,.2f}",
                f"{_cell(None if pss is None else pss / 1024)} / "
                f"{postgres['rss_kib'] / 1024:,.0f}" if postgres["available"] else "—",
                f"{redis_memory['used_memory'] / 2**20:,.0f} / "
                f"{redis_memory['used_memory_rss'] / 2**20:,.0f}",
                f"{max(rss) / 1024:,.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    first = result["points"][0]
    lines += ["",
              "(promote: the promotion alone of a run of the real workers' staged rows, "
              + ("pipeline.promote_staged; fresh: from the batch's promotion commit until both "
                 "views answer with it; dashboard: during the runs and refreshes"
                 if views else f"a raw-insert comparison: INSERT ... SELECT ... ON CONFLICT "
                 f"(order_id) DO NOTHING into {FLAT_TABLE}, no rollups, guard or ledger")
              + "; WAL: over the runs; Postgres: all of the server's processes; Redis: the "
              "whole server; peak RSS: the largest of the benchmark's processes; "
              f"shared_buffers {first['memory']['postgres']['shared_buffers']})",
              f"orders counted at the end: {result['verified']['counted']} "
              f"({'verified' if result['verified']['verified'] else 'MISMATCH'})"]
    return "\n".join(lines)


def plot_curve(result: dict[str, Any], path: Path) -> None:
    """Draw the curve into `path` (PNG): promotion orders/s by id style, fresh seconds,
    dashboard p99 and sizes, each against the orders present. Needs matplotlib (the `bench`
    extra); raises ModuleNotFoundError without it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    present = [p["orders_present"] / 1e6 for p in points]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    rates, fresh, latency, sizes = axes.flat
    for style in ID_STYLES:
        rates.plot(present, [p["runs"][style]["promote_orders_per_second"] for p in points],
                   marker="o", label=style)
    rates.set(title="promotion of a run (orders/s)", ylim=(0, None))
    rates.legend()
    if all("fresh_batch" in p for p in points):
        fresh.plot(present, [p["fresh_batch"]["views_fresh_seconds"] for p in points],
                   marker="o", label="views fresh after the batch")
        fresh.plot(present, [p["fresh_batch"]["promote_seconds"] for p in points],
                   marker="o", label="the batch's promotion")
        fresh.legend()
    fresh.set(title="fresh batch (s)", ylim=(0, None))
    if all("dashboard" in p for p in points):
        for name in ("p99_ms", "p50_ms"):
            latency.plot(present, [p["dashboard"]["all"].get(name) for p in points],
                         marker="o", label=name.removesuffix("_ms"))
        latency.legend()
    latency.set(title="dashboard query latency (ms)", ylim=(0, None))
    sizes.plot(present, [p["sizes"]["orders"]["total_bytes"] / GIB for p in points],
               marker="o", label=points[0]["sizes"]["orders"]["table"])
    if all("guard" in p["sizes"] for p in points):
        sizes.plot(present, [p["sizes"]["guard"]["total_bytes"] / GIB for p in points],
                   marker="o", label="order_ids")
        sizes.plot(present, [p["sizes"]["view_slices"]["total_bytes"] / GIB for p in points],
                   marker="o", label="view slices")
    sizes.plot(present, [p["sizes"]["database_bytes"] / GIB for p in points], marker="o",
               label="database")
    sizes.set(title="size on disk (GiB)", ylim=(0, None))
    sizes.legend()
    for axis in axes.flat:
        axis.set_xlabel("orders present (millions)")
        axis.grid(True, alpha=0.3)
    figure.suptitle(f"scale curve ({result['options']['design']}), runs of "
                    f"{result['options']['run_orders']:,} orders")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def require_matplotlib() -> None:
    """Raise ModuleNotFoundError (with the fix) if matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "--plot needs matplotlib: pip install -e '.[bench]'") from exc

