"""`orders-pipeline benchmark`: the real pipeline end to end, overlapped, next to its limits.

It runs the way a deployment runs: a producer process pushes chunks while W staging worker
processes drain the queue and a promoter process promotes what is staged and refreshes the
views, all at once; a dashboard process queries the views meanwhile. End to end is from the
first enqueue until the views hold every order. Each stage's rate (rows / time it was busy)
is set beside the raw limit of the same job measured in the same run on the same rows (see
`raw_limits`). Everything runs against a fresh database and key prefix, removed at the end
even when a stage fails, so a benchmark never touches or leaves behind real data.
"""

import importlib.metadata
import multiprocessing as mp
import os
import platform
import queue as queue_module
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any, TypeAlias

import polars as pl
from psycopg import sql
from tqdm import tqdm

from orders_pipeline import generator, pipeline, raw_limits
from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.postgres_patterns.promotion import ORDER_COLUMNS
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.postgres_patterns.views import (
    ROLLUPS,
    VIEWS,
    rebuild_rollups,
    rollup_upsert,
)
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape, unlink_matching
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline.worker import WorkerStats

WORKER_STEPS = ("claim", "parse", "transform", "dedup", "copy", "hand_over")
PRELOAD_CHUNK = 1_000_000
PRELOAD_COPY_ROWS = 250_000
PRELOAD_DAYS = 90
PROMOTER_IDLE_SECONDS = 0.05
GIB_KIB = 1024 * 1024
# (stage in the pipeline, raw limit done well, done naively) for the side-by-side table.
COMPARISONS = (
    ("push", "lpush_variadic", "serialise_lpush_per_order"),
    ("claim", "claim_lua", "claim_lmove"),
    ("dedup", "dedup_lua", "dedup_set_nx"),
    ("parse", "parse_read_ndjson", "parse_json_loop"),
    ("transform", "transform_polars", None),
    ("copy", "copy_large_chunks", "copy_commit_per_batch"),
    ("promote", "promote_insert_select", "promote_row_inserts"),
)
DASHBOARD_QUERIES = {
    "revenue_24h_by_category": """
        SELECT category, sum(revenue_usd) AS revenue_usd, sum(order_count) AS orders
        FROM sales_hourly WHERE hour >= now() - interval '24 hours'
        GROUP BY category ORDER BY revenue_usd DESC""",
    "top10_products_today": """
        SELECT v.product_id, p.name, v.units_sold, v.revenue_usd
        FROM product_performance_daily AS v JOIN products AS p USING (product_id)
        WHERE v.day = (now() AT TIME ZONE 'UTC')::date
        ORDER BY v.revenue_usd DESC LIMIT 10""",
}
TARGETS = {"end_to_end_orders_per_second": 40_000, "stage_ratio": 0.70,
           "peak_rss_kib": GIB_KIB, "fresh_after_batch_seconds": 2.0,
           "fresh_after_batch_min_orders_present": 10_000_000, "dashboard_p99_ms": 50.0}


class BenchmarkFailed(RuntimeError):
    """A process of the benchmark raised or died; the run is void."""


@dataclass(frozen=True)
class BenchmarkOptions:
    total: int
    batch_size: int
    workers: int
    duplicates: float = 0.0
    invalid: float = 0.0
    preload: int = 0
    fresh_batch: int = 0
    raw_sample: int | None = None  # None: min(total, 200,000); 0: skip the raw limits
    raw_repeats: int = 3
    refresh_every: float = 1.0
    dashboard_interval: float = 0.25
    seed: int = 1

    def __post_init__(self) -> None:
        if min(self.total, self.batch_size, self.workers, self.raw_repeats) < 1:
            raise ValueError("--total, --batch-size, --workers and --raw-repeats must be at "
                             "least 1")
        if min(self.preload, self.fresh_batch) < 0 or (
                self.raw_sample is not None and self.raw_sample < 0):
            raise ValueError("--preload, --fresh-batch and --raw-sample cannot be negative")

    @property
    def sample_rows(self) -> int:
        return min(self.total, 200_000) if self.raw_sample is None else self.raw_sample


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


def _stage(stage: str, rows: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "rows": rows, "seconds": round(seconds, 4),
            "rows_per_second": _rate(rows, seconds), **extra}


def _peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def machine_info(settings: Settings) -> dict[str, Any]:
    """What the numbers were measured on, so results from different hosts are comparable."""
    names = ("shared_buffers", "max_wal_size", "synchronous_commit", "autovacuum", "fsync",
             "work_mem", "wal_level", "full_page_writes")
    with pg_connect(settings.postgres) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
        postgres_settings = dict(conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (list(names),)).fetchall())
    client = redis_client(settings.redis)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                            1),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "polars": _version("polars"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "psycopg": _version("psycopg"),
        "postgres_server": server_version,
        "postgres_settings": postgres_settings,
        "redis_server": client.info("server").get("redis_version"),
        "workers_via_pgbouncer": settings.postgres.use_pgbouncer,
    }


class CpuSampler:
    """CPU seconds of every process on the host during a window, grouped by role.

    Samples /proc every `interval` so processes that exit meanwhile (worker processes and
    their Postgres backends) are still counted up to their last sample. Postgres backends
    of `database` count as "postgres", its shared processes (WAL writer, checkpointer...)
    as "postgres_shared", backends of other databases as "other"; Redis and PgBouncer count
    whole (anyone else's commands included), this benchmark's processes by role, the rest
    as "other" (anything else running on the host disturbs the figures; this shows how much).
    """

    SERVERS = {"redis-server": "redis", "pgbouncer": "pgbouncer"}

    def __init__(self, roles: Callable[[], dict[int, str]], database: str,
                 interval: float = 0.5) -> None:
        self.roles = roles
        self.database = f" {database} "
        self._postgres: dict[int, str] = {}
        self.interval = interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.host_first = self._host()
        self.host_last = self.host_first
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._sample(initial=True)
        self._thread.start()

    @staticmethod
    def _host() -> list[int]:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]

    def _sample(self, initial: bool = False) -> None:
        roles = self.roles()
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue
            pid = int(entry)
            comm = text[text.index("(") + 1:text.rindex(")")]
            fields = text[text.rindex(")") + 2:].split()
            used = (int(fields[11]) + int(fields[12])) / self.tick
            if initial:
                self.first[pid] = used
            role = (roles.get(pid) or self.SERVERS.get(comm)
                    or (self._postgres_role(pid) if comm == "postgres" else None)
                    or ("worker" if int(fields[1]) == me else "other"))
            self.last[pid] = (role, used)
        self.host_last = self._host()

    def _postgres_role(self, pid: int) -> str:
        if pid not in self._postgres:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    title = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                title = ""
            self._postgres[pid] = ("postgres" if self.database in title else
                                   "other" if "(" in title or "[local]" in title else
                                   "postgres_shared")
        return self._postgres[pid]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self.started
        by_role: dict[str, float] = {}
        for pid, (role, used) in self.last.items():
            by_role[role] = by_role.get(role, 0.0) + used - self.first.get(pid, 0.0)
        delta = [b - a for a, b in zip(self.host_first, self.host_last, strict=True)]
        total = sum(delta) or 1
        # /proc/stat: user nice system idle iowait irq softirq steal ...
        return {
            "window_seconds": round(self.seconds, 2),
            "cpu_seconds_by_role": {k: round(v, 2) for k, v in
                                    sorted(by_role.items(), key=lambda kv: -kv[1])},
            "host_busy_percent": round(100 * (total - delta[3] - delta[4]) / total, 1),
            "host_iowait_percent": round(100 * delta[4] / total, 1),
            "host_steal_percent": round(100 * delta[7] / total, 1) if len(delta) > 7 else 0,
        }


def _drop_database(settings: Settings) -> None:
    admin = replace(settings.postgres, dbname="postgres")
    with pg_connect(admin) as conn:
        conn.autocommit = True
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(settings.postgres.dbname)))


def bench_settings(settings: Settings) -> Settings:
    """The configured servers with a database and a key prefix of the benchmark's own."""
    token = uuid.uuid4().hex[:10]
    return replace(settings,
                   postgres=replace(settings.postgres, dbname=f"orders_bench_{token}"),
                   redis=replace(settings.redis, key_prefix=f"bench:{token}"))


# ---------------------------------------------------------------------------- processes
# Each runs in its own spawned process and reports (role, kind, payload) on one queue.

Reports: TypeAlias = "mp.Queue[tuple[str, str, Any]]"


def _child_main(role: str, reports: Reports, target: Callable[..., Any],
                args: tuple[Any, ...]) -> None:
    try:
        result = target(*args)
    except BaseException as exc:  # reported to the parent, which fails the run
        reports.put((role, "error", f"{type(exc).__name__}: {exc}"))
        raise
    reports.put((role, "done", {"result": result, "peak_rss_kib": _peak_rss_kib()}))


def _produce(settings: Settings, options: BenchmarkOptions,
             producer_done: Event) -> dict[str, Any]:
    """Build and push `total` orders chunk by chunk (memory bounded by the chunk)."""
    client = redis_client(settings.redis)
    keys = RedisKeys(settings.redis.key_prefix)
    queue = OrderQueue(client, keys, settings.pipeline.claim_timeout_seconds)
    backpressure = Backpressure(client, keys, settings.pipeline.max_queue_depth)
    with pg_connect(settings.postgres) as conn:
        refs = generator.References.load(conn)
    build = push = waited = 0.0
    mix = {"unique_valid": 0, "duplicates": 0, "invalid": 0}
    pushed = batches = 0
    first_push_at = 0.0
    try:
        for number, start in enumerate(range(0, options.total, generator.GENERATE_CHUNK)):
            started = time.perf_counter()
            payloads, chunk_mix = generator.build_payloads(
                refs, min(generator.GENERATE_CHUNK, options.total - start),
                duplicates=options.duplicates, invalid=options.invalid,
                seed=options.seed + number)
            build += time.perf_counter() - started
            first_push_at = first_push_at or time.time()
            started = time.perf_counter()
            chunk_batches, chunk_waited = generator.push_payloads(
                queue, backpressure, payloads, options.batch_size)
            push += time.perf_counter() - started - chunk_waited
            waited += chunk_waited
            batches += chunk_batches
            pushed += len(payloads)
            for name, value in chunk_mix.items():
                mix[name] += value
    finally:
        producer_done.set()  # also on failure, so workers do not wait for more forever
    return {"pushed": pushed, "batches": batches, "build_seconds": build,
            "push_seconds": push, "backpressure_seconds": waited, "mix": mix,
            "first_push_at": first_push_at, "last_push_at": time.time()}


def _promote(settings: Settings, staging_done: Event, refresh_every: float,
             reports: Reports) -> dict[str, Any]:
    """Promote whatever is staged, again and again, refreshing the views as a sensor would.

    Once staging is done (read before the round, so that round sees every staged batch)
    a last round and a refresh make the views fresh: the end of the end-to-end clock.
    """
    promote = refresh = idle = 0.0
    rounds = refreshes = inserted = 0
    pipeline.promote_staged(settings)  # connects: ready before the producer starts
    reports.put(("promoter", "ready", None))
    last_refresh = time.perf_counter()
    refreshed_at_last = 0
    final: dict[str, float] = {}
    while True:
        staged_all = staging_done.is_set()
        started = time.perf_counter()
        result = pipeline.promote_staged(settings)
        seconds = time.perf_counter() - started
        if result.promoted_batches or result.lost_batches:
            promote += seconds
            rounds += 1
            inserted += result.inserted_rows
            reports.put(("promoter", "promoted", result.inserted_rows))
        else:
            idle += seconds
        if staged_all:
            final["promote_seconds"] = seconds
            break
        if inserted > refreshed_at_last and time.perf_counter() - last_refresh >= refresh_every:
            started = time.perf_counter()
            pipeline.refresh_all_views(settings)
            last_refresh = time.perf_counter()
            refresh += last_refresh - started
            refreshes += 1
            refreshed_at_last = inserted
        if not result.promoted_batches:
            time.sleep(PROMOTER_IDLE_SECONDS)
    started = time.perf_counter()
    final["refresh_seconds"] = sum(pipeline.refresh_all_views(settings).values())
    refresh += time.perf_counter() - started
    return {"inserted": inserted, "rounds": rounds, "promote_seconds": promote,
            "idle_seconds": idle, "refreshes": refreshes + 1, "refresh_seconds": refresh,
            "final": final, "views_fresh_at": time.time()}


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"count": len(ordered), "p50_ms": at(0.50), "p95_ms": at(0.95),
            "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


def _dashboard(settings: Settings, stop: Event, interval: float,
               reports: Reports) -> dict[str, Any]:
    """A dashboard polling the views while ingest and refreshes run: query latencies."""
    latencies: dict[str, list[float]] = {name: [] for name in DASHBOARD_QUERIES}
    with pg_connect(settings.postgres) as conn:
        conn.autocommit = True
        reports.put(("dashboard", "ready", None))
        while not stop.is_set():
            for name, query in DASHBOARD_QUERIES.items():
                started = time.perf_counter()
                conn.execute(query).fetchall()
                latencies[name].append(time.perf_counter() - started)
            stop.wait(interval)
    return {"interval_seconds": interval,
            "all": _percentiles([s for v in latencies.values() for s in v]),
            **{name: _percentiles(v) for name, v in latencies.items()}}


# ---------------------------------------------------------------------------- preload


def _preload_frame(refs: dict[str, pl.DataFrame], first: int, count: int,
                   window: tuple[datetime, datetime], seed: int) -> pl.DataFrame:
    """`count` enriched orders in `orders`' columns, in time order within `window`."""
    start, end = window
    products = refs["products"].sample(count, with_replacement=True, seed=seed)
    currencies = refs["currencies"].sample(count, with_replacement=True, seed=seed + 1)
    zips = refs["zip_codes"].sample(count, with_replacement=True, seed=seed + 2)
    span_ms = int((end - start).total_seconds() * 1000)
    numbers = pl.int_range(first, first + count, eager=True)
    offsets = (numbers.hash(seed + 3) % span_ms).cast(pl.Int64).sort()
    quantity = pl.Series([1, 1, 1, 2, 2, 3, 4, 5]).sample(count, with_replacement=True,
                                                         seed=seed + 4)
    frame = pl.concat([products, currencies, zips], how="horizontal").with_columns(
        numbers.alias("n"),
        pl.int_range(1, 200_001, eager=True).sample(count, with_replacement=True,
                                                    seed=seed + 5).alias("customer_id"),
        quantity.alias("quantity"),
        (pl.lit(start) + pl.duration(milliseconds=offsets)).alias("order_timestamp"))
    unit_price = (pl.col("base_price") / pl.col("rate_to_usd")).round(2)
    total = (unit_price * pl.col("quantity")).round(4)
    return frame.select(
        pl.format("pre-{}", pl.col("n").cast(pl.String).str.zfill(10)).alias("order_id"),
        "customer_id", "product_id", "quantity", unit_price.alias("unit_price"),
        "currency", "zip_code", "order_timestamp", total.alias("total_amount"),
        (total * pl.col("rate_to_usd")).round(2).alias("total_amount_usd"),
        "category", "region", "shipping_zone", pl.lit("preload").alias("batch_id"))


def preload_orders(settings: Settings, count: int, seed: int,
                   show_progress: bool) -> dict[str, Any]:
    """COPY `count` orders straight into `orders`, spread over the last PRELOAD_DAYS days.

    Then the rollups are rebuilt from them, the table vacuumed and analysed and a
    checkpoint taken, so the measured run starts from a settled table, as in production.
    """
    end = datetime.now(UTC) - timedelta(hours=1)
    start = end - timedelta(days=PRELOAD_DAYS)
    chunks = max(1, -(-count // PRELOAD_CHUNK))
    step = (end - start) / chunks
    copy_sql = f"COPY orders ({', '.join(ORDER_COLUMNS)}) FROM STDIN (FORMAT csv)"
    timings: dict[str, float] = {}
    with pg_connect(settings.postgres) as conn:
        refs = {
            "products": pl.DataFrame(conn.execute(
                "SELECT product_id, category, base_price::float8 FROM products").fetchall(),
                schema=["product_id", "category", "base_price"], orient="row"),
            "currencies": pl.DataFrame(conn.execute(
                "SELECT currency_code::text, rate_to_usd::float8 FROM currencies").fetchall(),
                schema=["currency", "rate_to_usd"], orient="row"),
            "zip_codes": pl.DataFrame(conn.execute(
                "SELECT zip_code, region, shipping_zone FROM zip_codes").fetchall(),
                schema=["zip_code", "region", "shipping_zone"], orient="row"),
        }
        conn.commit()
        started = time.perf_counter()
        with tqdm(total=count, desc="preload", unit="order", file=sys.stderr,
                  disable=not show_progress) as bar:
            for number in range(chunks):
                first = number * PRELOAD_CHUNK
                rows = _preload_frame(refs, first, min(PRELOAD_CHUNK, count - first),
                                      (start + step * number, start + step * (number + 1)),
                                      seed + 7919 * number)
                with conn.transaction():
                    conn.execute("SET LOCAL synchronous_commit = off")
                    for piece in rows.iter_slices(PRELOAD_COPY_ROWS):
                        data = piece.write_csv(include_header=False, datetime_format=(
                            "%Y-%m-%dT%H:%M:%S%.3f+00:00")).encode()
                        with conn.cursor().copy(copy_sql) as copy:
                            copy.write(data)
                        bar.update(piece.height)
        timings["copy_seconds"] = time.perf_counter() - started
        steps: list[tuple[str, Callable[[], object]]] = [
            ("rollup_seconds", lambda: rebuild_rollups(conn)),
            ("vacuum_analyze_seconds", lambda: conn.execute("VACUUM ANALYZE orders")),
            ("checkpoint_seconds", lambda: conn.execute("CHECKPOINT")),
            ("refresh_seconds", lambda: pipeline.refresh_all_views(settings)),
        ]
        conn.autocommit = True  # VACUUM runs outside a transaction
        for name, action in steps:
            started = time.perf_counter()
            action()
            timings[name] = time.perf_counter() - started
    return {"orders": count, "days": PRELOAD_DAYS,
            "copy_orders_per_second": _rate(count, timings["copy_seconds"]),
            **{k: round(v, 2) for k, v in timings.items()}}


# ---------------------------------------------------------------------------- measurements


def _relation_sizes(settings: Settings) -> dict[str, Any]:
    """Bytes on disk of `orders` (heap, each index), the rollups and the views."""
    names = ["orders", "orders_staging", "orders_rejected", "ingest_batches", *ROLLUPS, *VIEWS]
    with pg_connect(settings.postgres) as conn:
        relations = {name: {"total_bytes": total, "heap_bytes": heap, "index_bytes": index,
                            "rows": conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                                sql.Identifier(name))).fetchone()[0]}
                     for name, total, heap, index in conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid), pg_relation_size(c.oid),"
            " pg_indexes_size(c.oid) FROM pg_class AS c"
            " WHERE c.relname = ANY(%s) AND c.relkind IN ('r', 'm')", (names,)).fetchall()}
        indexes = dict(conn.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index"
            " WHERE indrelid = 'orders'::regclass").fetchall())
        database = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    orders = relations["orders"]["rows"]
    per_order = relations["orders"]["total_bytes"] / orders if orders else 0.0
    return {"relations": relations, "orders_indexes_bytes": indexes,
            "orders_bytes_per_order": round(per_order, 1), "database_bytes": database}


def _wal_lsn(settings: Settings) -> str:
    with pg_connect(settings.postgres) as conn:
        return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


def _wal_bytes(settings: Settings, since: str) -> int:
    with pg_connect(settings.postgres) as conn:
        return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                                (since,)).fetchone()[0])


def _redis_used_memory(settings: Settings) -> int:
    """Bytes Redis holds (the whole server: other users of it show up here too)."""
    return int(redis_client(settings.redis).info("memory")["used_memory"])


def _redis_command_usec(settings: Settings) -> dict[str, int]:
    stats = redis_client(settings.redis).info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in stats.items()}


def _redis_command_seconds(settings: Settings, before: dict[str, int]) -> dict[str, float]:
    """Server time per command since `before` (a script's inner commands count twice:
    under EVALSHA and under their own name); whole server, like the Redis CPU figure."""
    after = _redis_command_usec(settings)
    spent = {name: (usec - before.get(name, 0)) / 1e6 for name, usec in after.items()}
    return {name: round(sec, 2) for name, sec in
            sorted(spent.items(), key=lambda kv: -kv[1])[:8] if sec >= 0.01}


def _fresh_after_batch(settings: Settings, options: BenchmarkOptions) -> dict[str, Any]:
    """Views fresh after one batch of `fresh_batch` orders: its promotion plus the refresh.

    The orders are pushed and staged first (untimed); then one promotion (which updates
    the rollups) and one refresh are timed. The rollup update alone is timed on a copy of
    the same rows in a transaction that is rolled back.
    """
    client = redis_client(settings.redis)
    keys = RedisKeys(settings.redis.key_prefix)
    queue = OrderQueue(client, keys, settings.pipeline.claim_timeout_seconds)
    with pg_connect(settings.postgres) as conn:
        refs = generator.References.load(conn)
        present = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    summary = generator.generate(queue, Backpressure(client, keys, 10**12), refs,
                                 options.fresh_batch, batch_size=options.batch_size,
                                 seed=options.seed + 1_000_003)
    staged = pipeline.stage_queue(settings, workers=options.workers,
                                  batch_size=options.batch_size)
    with pg_connect(settings.postgres) as conn:
        conn.execute("CREATE UNLOGGED TABLE bench_fresh_batch AS TABLE orders_staging")
        conn.commit()
    try:
        started = time.perf_counter()
        promoted = pipeline.promote_staged(settings)
        promote_seconds = time.perf_counter() - started
        refreshed = pipeline.refresh_all_views(settings)
        total = time.perf_counter() - started
        with pg_connect(settings.postgres) as conn:
            started = time.perf_counter()
            for rollup in ROLLUPS:
                conn.execute(rollup_upsert(rollup, "bench_fresh_batch"))
            rollup_seconds = time.perf_counter() - started
            conn.rollback()
    finally:
        with pg_connect(settings.postgres) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_fresh_batch")
            conn.commit()
    return {"orders": options.fresh_batch, "orders_present_before": present,
            "unique_valid": summary.unique_valid, "staged": staged.staged,
            "inserted": promoted.inserted_rows,
            "promote_seconds": round(promote_seconds, 4),
            "rollup_update_seconds": round(rollup_seconds, 4),
            "refresh_seconds": {view: round(s, 4) for view, s in refreshed.items()},
            "views_fresh_seconds": round(total, 4),
            "worker_peak_rss_kib": staged.peak_rss_kib}


def _run_child(ctx: Any, role: str, target: Callable[..., Any], args: tuple[Any, ...],
               ) -> dict[str, Any]:
    """Run `target(*args)` in its own process; its result and its peak RSS."""
    reports: Reports = ctx.Queue()
    process = ctx.Process(target=_child_main, name=role, args=(role, reports, target, args))
    process.start()
    try:
        while True:
            try:
                _, kind, payload = reports.get(timeout=1.0)
            except queue_module.Empty:
                if process.exitcode is not None:
                    raise BenchmarkFailed(f"{role} process exited with code {process.exitcode}"
                                       ) from None
                continue
            if kind == "error":
                raise BenchmarkFailed(f"{role}: {payload}")
            return payload
    finally:
        process.join(timeout=30)


@dataclass
class _Run:
    """Shared state of the overlapped run, filled in by the parent's threads."""
    processes: dict[str, BaseProcess] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    staging: WorkerStats | None = None
    staging_error: BaseException | None = None
    first_batch_at: float = 0.0

    def roles(self) -> dict[int, str]:
        started = list(self.processes.items())  # read from the sampler's thread
        return {p.pid: role for role, p in started if p.pid is not None} | {
            os.getpid(): "benchmark"}


def _overlapped(bench: Settings, options: BenchmarkOptions, ctx: Any,
                show_progress: bool) -> tuple[_Run, dict[str, Any]]:
    """Producer, W workers, promoter and dashboard at once; returns when views are fresh."""
    reports: Reports = ctx.Queue()
    producer_done, staging_done, stop_dashboard = ctx.Event(), ctx.Event(), ctx.Event()
    run = _Run()

    def note_batch(_: object) -> None:
        run.first_batch_at = run.first_batch_at or time.time()

    def stage() -> None:
        try:
            run.staging = pipeline.stage_queue(
                bench, workers=options.workers, batch_size=options.batch_size,
                on_batch=note_batch, producer_done=producer_done)
        except BaseException as exc:  # re-raised by the parent
            run.staging_error = exc
        finally:
            staging_done.set()

    def start(role: str, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
        run.processes[role] = ctx.Process(target=_child_main, name=role,
                                          args=(role, reports, target, args))
        run.processes[role].start()

    sampler = CpuSampler(run.roles, bench.postgres.dbname)
    staging = threading.Thread(target=stage, name="staging", daemon=True)
    try:
        staging.start()
        start("promoter", _promote, (bench, staging_done, options.refresh_every, reports))
        start("dashboard", _dashboard,
              (bench, stop_dashboard, options.dashboard_interval, reports))
        with tqdm(total=options.total, desc="promoted", unit="order", file=sys.stderr,
                  disable=not show_progress) as bar:
            ready: set[str] = set()
            while "promoter" not in run.results or "dashboard" not in run.results:
                if "promoter" in run.results:
                    stop_dashboard.set()
                try:
                    role, kind, payload = reports.get(timeout=0.5)
                except queue_module.Empty:
                    dead = [f"{r} exited with code {p.exitcode}" for r, p in
                            run.processes.items() if p.exitcode not in (None, 0)]
                    if dead:
                        raise BenchmarkFailed("; ".join(dead)) from None
                    continue
                if kind == "ready":
                    ready.add(role)
                    if ready == {"promoter", "dashboard"}:  # workers started first
                        start("producer", _produce, (bench, options, producer_done))
                elif kind == "promoted":
                    bar.update(payload)
                elif kind == "done":
                    run.results[role] = payload
                elif kind == "error":
                    raise BenchmarkFailed(f"{role}: {payload}")
    finally:
        producer_done.set()
        stop_dashboard.set()
        staging.join()
        cpu = sampler.stop()
        for process in run.processes.values():
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    if run.staging_error is not None:
        raise run.staging_error
    return run, cpu


def _summarise(options: BenchmarkOptions, run: _Run) -> dict[str, Any]:
    producer = run.results["producer"]["result"]
    promoter = run.results["promoter"]["result"]
    staging = run.staging
    assert staging is not None
    e2e = promoter["views_fresh_at"] - producer["first_push_at"]
    stages = [
        _stage("build", producer["pushed"], producer["build_seconds"]),
        _stage("push", producer["pushed"], producer["push_seconds"],
               backpressure_seconds=round(producer["backpressure_seconds"], 3)),
        _stage("stage", staging.claimed, staging.busy_seconds, processes=options.workers,
               wall_seconds=round(max(staging.per_worker_seconds, default=0.0), 3)),
        _stage("promote", promoter["inserted"], promoter["promote_seconds"],
               rounds=promoter["rounds"]),
        _stage("refresh", promoter["inserted"], promoter["refresh_seconds"],
               refreshes=promoter["refreshes"]),
    ]
    steps = [_stage(step, staging.claimed, staging.step_seconds.get(step, 0.0))
             for step in WORKER_STEPS]
    return {
        "stages": stages,
        "worker_steps": steps,
        "end_to_end": {"seconds": round(e2e, 4),
                       "orders_per_second": _rate(producer["pushed"], e2e),
                       "producer_seconds": round(producer["last_push_at"]
                                                 - producer["first_push_at"], 3),
                       "first_batch_staged_after_seconds": round(
                           run.first_batch_at - producer["first_push_at"], 3),
                       "last_push_to_views_fresh_seconds": round(
                           promoter["views_fresh_at"] - producer["last_push_at"], 3),
                       "final_promote_seconds": round(promoter["final"]["promote_seconds"], 4),
                       "final_refresh_seconds": round(promoter["final"]["refresh_seconds"], 4)},
        "orders": {**producer["mix"], "pushed": producer["pushed"],
                   "staged": staging.staged, "rejected": staging.rejected,
                   "duplicates_dropped": staging.duplicates,
                   "inserted": promoter["inserted"]},
        "dashboard": run.results["dashboard"]["result"],
    }


def _ratio(rate: float, limit: float) -> float | None:
    return round(rate / limit, 3) if limit else None


def _comparisons(summary: dict[str, Any], raw: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each stage's rate, in the overlapped run and alone, beside its raw limit (done well).

    `ratio` is the stage alone (the real code, one stage at a time, like the limit) over
    the limit; `overlapped_ratio` is the stage in the end-to-end run, where it shared the
    CPU with every other stage, over the same limit.
    """
    if raw is None:
        return []
    measured = {s["stage"]: s for s in summary["stages"] + summary["worker_steps"]}
    limits = raw["limits"]
    alone = raw["pipeline_alone"]
    rows = []
    for stage, well, naive in COMPARISONS:
        limit = limits[well]["rows_per_second"]
        overlapped = measured[stage]["rows_per_second"]
        rows.append({"stage": stage, "raw_limit": well, "raw_rows_per_second": limit,
                     "alone_rows_per_second": alone[stage]["rows_per_second"],
                     "ratio": _ratio(alone[stage]["rows_per_second"], limit),
                     "overlapped_rows_per_second": overlapped,
                     "overlapped_ratio": _ratio(overlapped, limit),
                     "naive": naive,
                     "naive_rows_per_second": limits[naive]["rows_per_second"] if naive else None})
    return rows


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    e2e = result["end_to_end"]["orders_per_second"]
    ratios = {c["stage"]: c["ratio"] for c in result["comparisons"]}
    overlapped = {c["stage"]: c["overlapped_ratio"] for c in result["comparisons"]}
    rss = max(_all_rss(result["peak_rss_kib"]))
    p99 = result["dashboard"]["all"].get("p99_ms")
    out = [
        {"target": "end-to-end >= 40,000 orders/s", "measured": e2e,
         "met": e2e >= TARGETS["end_to_end_orders_per_second"]},
        {"target": "every stage >= 70 % of its raw limit (stage alone)", "measured": ratios,
         "met": _all_at_least(ratios, TARGETS["stage_ratio"])},
        {"target": "every stage >= 70 % of its raw limit (in the overlapped run)",
         "measured": overlapped, "met": _all_at_least(overlapped, TARGETS["stage_ratio"])},
        {"target": "peak RSS of any process <= 1 GiB", "measured": rss,
         "met": rss <= TARGETS["peak_rss_kib"]},
        {"target": "dashboard p99 <= 50 ms during ingest and refreshes", "measured": p99,
         "met": p99 is not None and p99 <= TARGETS["dashboard_p99_ms"]},
    ]
    fresh = result.get("fresh_after_batch")
    if fresh:
        applies = (fresh["orders_present_before"]
                   >= TARGETS["fresh_after_batch_min_orders_present"]
                   and fresh["orders"] >= 100_000)
        out.append({"target": "views fresh <= 2 s after a 100,000-order batch with 10M "
                              "orders present", "measured": fresh["views_fresh_seconds"],
                    "met": applies and fresh["views_fresh_seconds"]
                    <= TARGETS["fresh_after_batch_seconds"],
                    "conditions_met": applies})
    return out


def _all_at_least(ratios: dict[str, float | None], least: float) -> bool:
    return bool(ratios) and all(r is not None and r >= least for r in ratios.values())


def _all_rss(rss: dict[str, Any]) -> list[int]:
    return [v for value in rss.values()
            for v in (value if isinstance(value, list) else [value])]


def _measure(bench: Settings, options: BenchmarkOptions,
             show_progress: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ensure_database(bench.postgres)
    with pg_connect(bench.postgres) as conn:
        apply_schema(conn)
        LookupCache(redis_client(bench.redis), RedisKeys(bench.redis.key_prefix),
                    bench.pipeline.lookup_ttl_seconds).load_snapshot(conn)
    machine = machine_info(bench)
    rss: dict[str, Any] = {}
    out: dict[str, Any] = {}
    if options.preload:
        loaded = _run_child(ctx, "preload", preload_orders,
                            (bench, options.preload, options.seed + 5_000_011, show_progress))
        out["preload"] = loaded["result"]
        rss["preload"] = loaded["peak_rss_kib"]
    wal_before = _wal_lsn(bench)
    redis_before = _redis_used_memory(bench)
    commands_before = _redis_command_usec(bench)
    run, cpu = _overlapped(bench, options, ctx, show_progress)
    out.update(_summarise(options, run))
    out["end_to_end"]["wal_bytes"] = _wal_bytes(bench, wal_before)
    out["end_to_end"]["redis_memory_growth_bytes"] = _redis_used_memory(bench) - redis_before
    cpu["redis_command_seconds"] = _redis_command_seconds(bench, commands_before)
    out["cpu"] = cpu
    rss.update({role: run.results[role]["peak_rss_kib"]
                for role in ("producer", "promoter", "dashboard")})
    rss["workers"] = run.staging.peak_rss_kib if run.staging else []
    if options.fresh_batch:
        out["fresh_after_batch"] = _fresh_after_batch(bench, options)
        rss["fresh_batch_workers"] = out["fresh_after_batch"].pop("worker_peak_rss_kib")
    if options.sample_rows:
        measured = _run_child(ctx, "raw_limits", raw_limits.measure,
                              (bench, options.sample_rows, options.batch_size,
                               options.raw_repeats, options.seed))
        out["raw_limits"] = measured["result"]
        rss["raw_limits"] = measured["peak_rss_kib"]
    out["comparisons"] = _comparisons(out, out.get("raw_limits"))
    out["sizes"] = _relation_sizes(bench)
    orders_rows = out["sizes"]["relations"]["orders"]["rows"]
    expected = (options.preload + out["orders"]["unique_valid"]
                + out.get("fresh_after_batch", {}).get("unique_valid", 0))
    out["orders"].update(orders_rows=orders_rows, expected_rows=expected,
                         verified=orders_rows == expected)
    machine["load_average_after"] = os.getloadavg()
    out["machine"] = machine
    out["peak_rss_kib"] = {"self": _peak_rss_kib(), **rss}
    out["targets"] = _targets(out)
    return out


def run_benchmark(settings: Settings, options: BenchmarkOptions,
                  show_progress: bool = False) -> dict[str, Any]:
    """Run the benchmark once; always removes its database and keys."""
    bench = bench_settings(settings)
    started_at = datetime.now(UTC).isoformat()
    try:
        measured = _measure(bench, options, show_progress)
    finally:
        close_all()  # the pools hold connections to the database about to be dropped
        try:
            unlink_matching(redis_client(bench.redis),
                            f"{glob_escape(bench.redis.key_prefix)}:*")
        finally:
            _drop_database(bench)
    return {"started_at": started_at, "database": bench.postgres.dbname,
            "key_prefix": bench.redis.key_prefix,
            "options": {k: v for k, v in options.__dict__.items()},
            "total": options.total, "batch_size": options.batch_size,
            "workers": options.workers, **measured}


# ---------------------------------------------------------------------------- rendering


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def render_benchmark(result: dict[str, Any]) -> str:
    """The figures as aligned tables: stages, limits and ratios, latency, memory, targets."""
    e2e = result["end_to_end"]
    orders = result["orders"]
    lines = [f"{result['total']:,} orders, {result['workers']} workers, batch "
             f"{result['batch_size']:,}"
             + (f", {result['preload']['orders']:,} preloaded" if "preload" in result else ""),
             "",
             f"{'stage':<12}{'rows':>12}{'busy s':>10}{'rows/s':>12}"]
    lines += [f"{s['stage']:<12}{s['rows']:>12,}{s['seconds']:>10.2f}"
              f"{s['rows_per_second']:>12,.0f}" for s in result["stages"]]
    lines += [f"  {s['stage']:<10}{s['rows']:>12,}{s['seconds']:>10.2f}"
              f"{s['rows_per_second']:>12,.0f}" for s in result["worker_steps"]]
    lines += ["(stage and its steps: busy seconds summed over the worker processes)",
              "",
              f"end-to-end (first enqueue → views fresh): {e2e['seconds']:.2f} s = "
              f"{e2e['orders_per_second']:,.0f} orders/s; last push → views fresh "
              f"{e2e['last_push_to_views_fresh_seconds']:.2f} s (final promote "
              f"{e2e['final_promote_seconds']:.2f} s + refresh "
              f"{e2e['final_refresh_seconds']:.2f} s)"]
    if result["comparisons"]:
        lines += ["", f"{'stage':<11}{'alone/s':>11}{'overlapped/s':>14}{'raw limit/s':>13}"
                      f"{'alone':>7}{'overl.':>8}{'naive/s':>11}  raw limit (done well)"]
        for c in result["comparisons"]:
            naive = (f"{c['naive_rows_per_second']:>11,.0f}"
                     if c["naive_rows_per_second"] is not None else f"{'—':>11}")
            lines.append(f"{c['stage']:<11}{c['alone_rows_per_second']:>11,.0f}"
                         f"{c['overlapped_rows_per_second']:>14,.0f}"
                         f"{c['raw_rows_per_second']:>13,.0f}{c['ratio']:>7.0%}"
                         f"{c['overlapped_ratio']:>8.0%}{naive}  {c['raw_limit']}")
        lines.append("(alone: the real code one stage at a time on the raw sample; "
                     "overlapped: the same stage in the end-to-end run)")
        limits = result["raw_limits"]["limits"]
        lines.append(
            f"refresh both views at {limits['refresh_full_group_by']['rows']:,} orders: "
            f"incremental {limits['refresh_incremental']['seconds']:.3f} s, full GROUP BY "
            f"over orders {limits['refresh_full_group_by']['seconds']:.3f} s (views match "
            f"full recompute: {limits['views_match_full_recompute']['value']})")
        lines.append(f"serialise + LPUSH variadic (issue's row 1): "
                     f"{limits['serialise_lpush_variadic']['rows_per_second']:,.0f}/s; "
                     f"raw sample {result['raw_limits']['sample_rows']:,} rows, median of "
                     f"{result['raw_limits']['repeats']}")
    dash = result["dashboard"]["all"]
    if dash.get("count"):
        lines += ["", f"dashboard queries during the run: {dash['count']:,}, p50 "
                      f"{dash['p50_ms']:.1f} ms, p95 {dash['p95_ms']:.1f} ms, p99 "
                      f"{dash['p99_ms']:.1f} ms, max {dash['max_ms']:.1f} ms"]
    fresh = result.get("fresh_after_batch")
    if fresh:
        lines.append(f"views fresh after a {fresh['orders']:,}-order batch with "
                     f"{fresh['orders_present_before']:,} present: "
                     f"{fresh['views_fresh_seconds']:.2f} s (promote "
                     f"{fresh['promote_seconds']:.2f} s, of which rollups "
                     f"{fresh['rollup_update_seconds']:.2f} s; refresh "
                     f"{sum(fresh['refresh_seconds'].values()):.2f} s)")
    rss = result["peak_rss_kib"]
    lines += ["", "peak RSS: " + ", ".join(
        f"{role} {', '.join(_mib(v) for v in value) if isinstance(value, list) else _mib(value)}"
        for role, value in rss.items())]
    cpu = result["cpu"]
    lines.append(f"CPU seconds in the run ({cpu['window_seconds']:.1f} s window, host "
                 f"{cpu['host_busy_percent']:.0f} % busy, steal "
                 f"{cpu['host_steal_percent']:.0f} %): " + ", ".join(
                     f"{role} {s:.1f}" for role, s in cpu["cpu_seconds_by_role"].items()))
    sizes = result["sizes"]
    relation = sizes["relations"]["orders"]
    lines.append(f"orders: {relation['rows']:,} rows, {relation['total_bytes'] / 2**20:,.0f} "
                 f"MiB with indexes ({sizes['orders_bytes_per_order']:.0f} bytes/order); "
                 f"WAL in the run {e2e['wal_bytes'] / 2**20:,.0f} MiB; Redis grew "
                 f"{e2e['redis_memory_growth_bytes'] / 2**20:,.0f} MiB (dedup window)")
    lines.append(f"orders: pushed {orders['pushed']:,}, in orders {orders['orders_rows']:,} "
                 f"(expected {orders['expected_rows']:,}), rejected {orders['rejected']:,}, "
                 f"duplicates {orders['duplicates_dropped']:,} "
                 f"({'verified' if orders['verified'] else 'MISMATCH'})")
    lines += ["", "targets:"] + [
        f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['measured']}"
        for t in result["targets"]]
    machine = result["machine"]
    lines += ["", f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), "
                  f"{machine['memory_gib']} GiB, {machine['platform']}, Python "
                  f"{machine['python']}, Polars {machine['polars']}, redis-py "
                  f"{machine['redis_py']}, psycopg {machine['psycopg']}, Postgres "
                  f"{machine['postgres_server']}, Redis {machine['redis_server']}; load "
                  f"{machine['load_average'][0]:.2f} before, "
                  f"{machine['load_average_after'][0]:.2f} after"]
    return "\n".join(lines)
