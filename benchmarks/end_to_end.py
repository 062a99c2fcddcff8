"""The real pipeline end to end, overlapped as deployed, next to the raw limit of each stage.

It runs the way a deployment runs: a producer process pushes chunks while W following
staging workers (`pipeline.follow_queue`, what `orders-pipeline process --follow` runs) stage
what arrives and a promoter process promotes what is staged and refreshes the views, all at
once; a dashboard process queries the views meanwhile. The workers are stopped once the
producer is done and the queue is drained. End to end is from the first enqueue until the
views hold every order. Each stage's rate (rows / time it was busy) is set beside the raw
limit of the same job measured in the same run on the same rows (see `raw_limits`).
Everything runs against a fresh database and key prefix, removed at the end even when a
stage fails, so a benchmark never touches or leaves behind real data.
"""

import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any, TypeAlias

from psycopg import sql
from tqdm import tqdm

from benchmarks import raw_limits
from benchmarks.host import ProcessSampler, machine_info
from benchmarks.preload import preload_orders
from benchmarks.scratch import bench_settings, remove_scratch
from orders_pipeline import generator, pipeline
from orders_pipeline.connections import pg_connect, redis_client
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.postgres_patterns.views import ROLLUPS, VIEWS, rollup_upsert
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline.worker import BatchReport, StopRequest, WorkerStats

PROMOTER_IDLE_SECONDS = 0.05
# The benchmark stops its workers only once the queue is drained: nothing is in hand then.
WORKER_GRACE_SECONDS = 60.0
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


def peak_rss_kib() -> int:
    """This process's peak RSS so far, KiB: the kernel's high-water mark of its memory
    (VmHWM). Not `ru_maxrss`, which a spawned process inherits from its parent's at the fork
    (Linux keeps it across exec), so every child would report at least its parent's peak.
    `ru_maxrss` only where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------------- processes
# Each runs in its own spawned process and reports (role, kind, payload) on one queue.

Reports: TypeAlias = "mp.Queue[tuple[str, str, Any]]"


def child_main(role: str, reports: Reports, target: Callable[..., Any],
               args: tuple[Any, ...]) -> None:
    """Body of a benchmark process: run `target(*args)`, then report (role, "done",
    {"result", "peak_rss_kib"}) or (role, "error", text) on `reports` (and re-raise)."""
    try:
        result = target(*args)
    except BaseException as exc:  # reported to the parent, which fails the run
        reports.put((role, "error", f"{type(exc).__name__}: {exc}"))
        raise
    reports.put((role, "done", {"result": result, "peak_rss_kib": peak_rss_kib()}))


def _produce(settings: Settings, options: BenchmarkOptions) -> dict[str, Any]:
    """Build and push `total` orders chunk by chunk (memory bounded by the chunk)."""
    client = redis_client(settings.redis)
    keys = RedisKeys.of(settings.redis)
    queue = OrderQueue(client, keys, settings.pipeline.claim_timeout_seconds)
    backpressure = Backpressure(client, keys, settings.pipeline.max_queue_depth)
    with pg_connect(settings.postgres) as conn:
        refs = generator.References.load(conn)
    build = push = waited = 0.0
    mix = {"unique_valid": 0, "duplicates": 0, "invalid": 0}
    pushed = batches = 0
    first_push_at = 0.0
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


def percentiles(samples: list[float]) -> dict[str, float]:
    """Latency figures of `samples` (seconds): count, p50/p95/p99/max/mean in ms; only the
    count (0) when there are none."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"count": len(ordered), "p50_ms": at(0.50), "p95_ms": at(0.95),
            "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


def poll_dashboard(settings: Settings, stop: Event, interval: float,
                   reports: Reports) -> dict[str, list[tuple[float, float]]]:
    """A dashboard polling the views (DASHBOARD_QUERIES, then a pause of `interval` s) until
    `stop`, one round at least; reports ("dashboard", "ready", None) once connected. Returns
    per query its samples: (wall-clock time it started, as `time.time()`; seconds it took)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in DASHBOARD_QUERIES}
    with pg_connect(settings.postgres) as conn:
        conn.autocommit = True
        reports.put(("dashboard", "ready", None))
        while True:  # one round at least, however soon the run ends
            for name, query in DASHBOARD_QUERIES.items():
                at, started = time.time(), time.perf_counter()
                conn.execute(query).fetchall()
                samples[name].append((at, time.perf_counter() - started))
            if stop.wait(interval):
                break
    return samples


def _dashboard(settings: Settings, stop: Event, interval: float,
               reports: Reports) -> dict[str, Any]:
    """A dashboard polling the views while ingest and refreshes run: query latencies."""
    samples = poll_dashboard(settings, stop, interval, reports)
    return {"interval_seconds": interval,
            "all": percentiles([s for v in samples.values() for _, s in v]),
            **{name: percentiles([s for _, s in v]) for name, v in samples.items()}}


# ---------------------------------------------------------------------------- measurements


def _relation_sizes(settings: Settings) -> dict[str, Any]:
    """Bytes on disk of `orders` (heap, each index), the rollups and the views."""
    names = ["orders", "order_ids", "orders_staging", "orders_rejected", "ingest_batches",
             *ROLLUPS]
    with pg_connect(settings.postgres) as conn:
        # A partitioned table (`orders`) is the sum of its partitions; pg_partition_tree of
        # a plain table is empty, so such a table counts itself.
        relations = {name: {"total_bytes": int(total), "heap_bytes": int(heap),
                            "index_bytes": int(index),
                            "rows": conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                                sql.Identifier(name))).fetchone()[0]}
                     for name, total, heap, index in conn.execute(
            "SELECT c.relname, sum(pg_total_relation_size(p.oid)),"
            " sum(pg_relation_size(p.oid)), sum(pg_indexes_size(p.oid))"
            " FROM pg_class AS c CROSS JOIN LATERAL (SELECT relid FROM pg_partition_tree(c.oid)"
            " WHERE isleaf UNION ALL SELECT c.oid WHERE c.relkind <> 'p') AS p(oid)"
            " WHERE c.relname = ANY(%s) AND c.relkind IN ('r', 'm', 'p') GROUP BY c.relname",
            (names,)).fetchall()}
        # A dashboard view is a plain view over its month materialized views (`view_slices`):
        # it is the sum of those slices.
        for view in VIEWS:
            total, heap, index, slices = conn.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0),"
                " coalesce(sum(pg_relation_size(c.oid)), 0),"
                " coalesce(sum(pg_indexes_size(c.oid)), 0), count(c.oid)"
                " FROM view_slices AS s"
                " JOIN pg_class AS c ON c.oid = to_regclass(quote_ident(s.relation_name))"
                " WHERE s.view_name = %s", (view,)).fetchone()
            relations[view] = {
                "total_bytes": int(total), "heap_bytes": int(heap), "index_bytes": int(index),
                "rows": conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                    sql.Identifier(view))).fetchone()[0],
                "slices": slices}
        indexes = {name: int(size) for name, size in conn.execute(
            "SELECT i.indexrelid::regclass::text, sum(pg_relation_size(t.relid))"
            " FROM pg_index AS i, pg_partition_tree(i.indexrelid) AS t"
            " WHERE i.indrelid = 'orders'::regclass AND t.isleaf GROUP BY 1").fetchall()}
        database = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    orders = relations["orders"]["rows"]
    per_order = relations["orders"]["total_bytes"] / orders if orders else 0.0
    return {"relations": relations, "orders_indexes_bytes": indexes,
            "orders_bytes_per_order": round(per_order, 1), "database_bytes": database}


def wal_lsn(settings: Settings) -> str:
    """The server's current WAL position (`pg_current_wal_lsn()` as text)."""
    with pg_connect(settings.postgres) as conn:
        return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


def wal_bytes(settings: Settings, since: str) -> int:
    """Bytes of WAL the server wrote since the position `since` (`wal_lsn`)."""
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
    keys = RedisKeys.of(settings.redis)
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
            "views_fresh_seconds": round(total, 4)}


def run_child(ctx: Any, role: str, target: Callable[..., Any], args: tuple[Any, ...],
              ) -> dict[str, Any]:
    """Run `target(*args)` in its own process (of multiprocessing context `ctx`); returns
    {"result": its result, "peak_rss_kib": its peak RSS}. Raises BenchmarkFailed if it
    raised or died."""
    reports: Reports = ctx.Queue()
    process = ctx.Process(target=child_main, name=role, args=(role, reports, target, args))
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
    # Seconds the workers spent on batches (claim to hand-over), summed over workers.
    busy_seconds: float = 0.0

    def roles(self) -> dict[int, str]:
        started = list(self.processes.items())  # read from the sampler's thread
        return {p.pid: role for role, p in started if p.pid is not None} | {
            os.getpid(): "benchmark"}


def _overlapped(bench: Settings, options: BenchmarkOptions, ctx: Any,
                show_progress: bool) -> tuple[_Run, dict[str, Any], dict[int, int]]:
    """Producer, W following workers, promoter and dashboard at once.

    Returns when the views are fresh, with the CPU figures and the workers' peak RSS (KiB
    by pid). The workers are stopped (`StopRequest`, as SIGTERM stops `process --follow`)
    once the producer is done and nothing is queued or claimed: checked when the producer
    reports and after every batch, so the last batch's report stops them at once.
    """
    reports: Reports = ctx.Queue()
    staging_done, stop_dashboard = ctx.Event(), ctx.Event()
    produced = threading.Event()
    stop = StopRequest(WORKER_GRACE_SECONDS)
    queue = OrderQueue(redis_client(bench.redis), RedisKeys.of(bench.redis))
    run = _Run()

    def stop_when_drained() -> None:
        if produced.is_set() and not stop.requested and not (
                queue.depth() or queue.claimed_batches()):
            stop.request()

    def note_batch(report: BatchReport) -> None:
        run.first_batch_at = run.first_batch_at or time.time()
        run.busy_seconds += report.seconds
        stop_when_drained()

    def stage() -> None:
        try:
            run.staging = pipeline.follow_queue(
                bench, workers=options.workers, batch_size=options.batch_size, stop=stop,
                on_batch=note_batch)
        except BaseException as exc:  # re-raised by the parent
            run.staging_error = exc
        finally:
            staging_done.set()

    def start(role: str, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
        run.processes[role] = ctx.Process(target=child_main, name=role,
                                          args=(role, reports, target, args))
        run.processes[role].start()

    sampler = ProcessSampler(run.roles, bench.postgres.dbname)
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
                    stop_when_drained()
                    continue
                if kind == "ready":
                    ready.add(role)
                    if ready == {"promoter", "dashboard"}:  # workers started first
                        start("producer", _produce, (bench, options))
                elif kind == "promoted":
                    bar.update(payload)
                elif kind == "done":
                    run.results[role] = payload
                    if role == "producer":
                        produced.set()
                        stop_when_drained()
                elif kind == "error":
                    raise BenchmarkFailed(f"{role}: {payload}")
    finally:
        stop.request()
        stop_dashboard.set()
        staging.join()
        cpu = sampler.stop()
        for process in run.processes.values():
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    if run.staging_error is not None:
        raise run.staging_error
    return run, cpu, sampler.worker_peak_rss_kib


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
        _stage("stage", staging.claimed, run.busy_seconds, processes=options.workers,
               wall_seconds=round(staging.seconds, 3)),
        _stage("promote", promoter["inserted"], promoter["promote_seconds"],
               rounds=promoter["rounds"]),
        _stage("refresh", promoter["inserted"], promoter["refresh_seconds"],
               refreshes=promoter["refreshes"]),
    ]
    return {
        "stages": stages,
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


def _ratio(rate: float | None, limit: float) -> float | None:
    return round(rate / limit, 3) if limit and rate is not None else None


def _comparisons(summary: dict[str, Any], raw: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each stage's rate, alone and (where the run measures it) overlapped, beside its raw
    limit (done well) and the naive way.

    `ratio` is the stage alone (the product's own code, one stage at a time, like the limit)
    over the limit; `overlapped_ratio` is the stage in the end-to-end run, where it shared
    the CPU with every other stage, over the same limit: for push and promote, whose rates
    the run measures (the workers' steps are timed only alone: a worker reports whole
    batches).
    """
    if raw is None:
        return []
    measured = {s["stage"]: s["rows_per_second"] for s in summary["stages"]}
    limits = raw["limits"]
    alone = raw["pipeline_alone"]
    rows = []
    for stage, well, naive in COMPARISONS:
        limit = limits[well]["rows_per_second"]
        overlapped = measured.get(stage)
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
    overlapped = {c["stage"]: c["overlapped_ratio"] for c in result["comparisons"]
                  if c["overlapped_ratio"] is not None}
    rss = max(_all_rss(result["peak_rss_kib"]))
    p99 = result["dashboard"]["all"].get("p99_ms")
    out = [
        {"target": "end-to-end >= 40,000 orders/s", "measured": e2e,
         "met": e2e >= TARGETS["end_to_end_orders_per_second"]},
        {"target": "every stage >= 70 % of its raw limit (stage alone)", "measured": ratios,
         "met": _all_at_least(ratios, TARGETS["stage_ratio"])},
        {"target": "push and promote >= 70 % of their raw limits (in the overlapped run)",
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
        LookupCache(redis_client(bench.redis), RedisKeys.of(bench.redis),
                    bench.pipeline.lookup_ttl_seconds).load_snapshot(conn)
    machine = machine_info(bench)
    rss: dict[str, Any] = {}
    out: dict[str, Any] = {}
    if options.preload:
        loaded = run_child(ctx, "preload", preload_orders,
                            (bench, options.preload, options.seed + 5_000_011, show_progress))
        out["preload"] = loaded["result"]
        rss["preload"] = loaded["peak_rss_kib"]
    wal_before = wal_lsn(bench)
    redis_before = _redis_used_memory(bench)
    commands_before = _redis_command_usec(bench)
    run, cpu, worker_rss = _overlapped(bench, options, ctx, show_progress)
    out.update(_summarise(options, run))
    out["end_to_end"]["wal_bytes"] = wal_bytes(bench, wal_before)
    out["end_to_end"]["redis_memory_growth_bytes"] = _redis_used_memory(bench) - redis_before
    cpu["redis_command_seconds"] = _redis_command_seconds(bench, commands_before)
    out["cpu"] = cpu
    rss.update({role: run.results[role]["peak_rss_kib"]
                for role in ("producer", "promoter", "dashboard")})
    rss["workers"] = sorted(worker_rss.values())  # none when the one worker ran in here
    if options.fresh_batch:
        out["fresh_after_batch"] = _fresh_after_batch(bench, options)
    if options.sample_rows:
        measured = run_child(ctx, "raw_limits", raw_limits.measure,
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
    out["peak_rss_kib"] = {"self": peak_rss_kib(), **rss}
    out["targets"] = _targets(out)
    return out


def run_benchmark(settings: Settings, options: BenchmarkOptions,
                  show_progress: bool = False) -> dict[str, Any]:
    """Run the benchmark once on a scratch database and key prefix, which it always removes.

    Returns the figures as one JSON-able dict (see BENCHMARKS.md); raises BenchmarkFailed if
    one of its processes raised or died, and lets server errors through.
    """
    bench = bench_settings(settings)
    started_at = datetime.now(UTC).isoformat()
    try:
        measured = _measure(bench, options, show_progress)
    finally:
        remove_scratch(bench)
    return {"started_at": started_at, "database": bench.postgres.dbname,
            "key_prefix": bench.redis.key_prefix,
            "options": dict(options.__dict__),
            "total": options.total, "batch_size": options.batch_size,
            "workers": options.workers, **measured}
