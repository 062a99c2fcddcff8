"""`orders-pipeline benchmark`: time each stage of the real pipeline on a throwaway setup.

Everything runs against a fresh database and a fresh key prefix, which are removed at the
end even when a stage fails, so a benchmark never touches or leaves behind real data. Stages
run one after another (all orders are pushed before staging starts), so backpressure is off.
"""

import importlib.metadata
import os
import platform
import resource
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from psycopg import sql
from tqdm import tqdm

from orders_pipeline import generator, pipeline
from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape, unlink_matching
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings

STAGES = ("build", "push", "stage", "promote", "refresh")


@dataclass(frozen=True)
class StageTiming:
    stage: str
    rows: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "rows": self.rows, "seconds": round(self.seconds, 4),
                "rows_per_second": round(self.rows_per_second, 1)}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def machine_info(settings: Settings) -> dict[str, Any]:
    """What the numbers were measured on, so results from different hosts are comparable."""
    with pg_connect(settings.postgres) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "polars": _version("polars"),
        "redis_py": _version("redis"),
        "psycopg": _version("psycopg"),
        "postgres_server": server_version,
        "redis_server": redis_client(settings.redis).info("server").get("redis_version"),
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


def _timed(timings: list[StageTiming], stage: str, rows: int,
           action: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = action()
    timings.append(StageTiming(stage, rows, time.perf_counter() - started))
    return result


def _measure(bench: Settings, total: int, batch_size: int, workers: int, duplicates: float,
             invalid: float, progress: tqdm) -> dict[str, Any]:
    ensure_database(bench.postgres)
    client = redis_client(bench.redis)
    keys = RedisKeys(bench.redis.key_prefix)
    with pg_connect(bench.postgres) as conn:
        apply_schema(conn)
        LookupCache(client, keys, bench.pipeline.lookup_ttl_seconds).load_snapshot(conn)
        refs = generator.References.load(conn)
    queue = OrderQueue(client, keys, bench.pipeline.claim_timeout_seconds)
    timings: list[StageTiming] = []

    def step(stage: str, rows: int, action: Callable[[], Any]) -> Any:
        progress.set_postfix_str(stage)
        result = _timed(timings, stage, rows, action)
        progress.update()
        return result

    payloads, mix = step("build", total, lambda: generator.build_payloads(
        refs, total, duplicates=duplicates, invalid=invalid))
    started = time.perf_counter()
    step("push", len(payloads), lambda: generator.push_payloads(
        queue, Backpressure(client, keys, len(payloads) + 1), payloads, batch_size))
    staged = step("stage", len(payloads), lambda: pipeline.stage_queue(
        bench, workers=workers, batch_size=batch_size))
    promoted = step("promote", staged.staged, lambda: pipeline.promote_staged(bench))
    step("refresh", promoted.inserted_rows, lambda: pipeline.refresh_all_views(bench))
    end_to_end = time.perf_counter() - started
    with pg_connect(bench.postgres) as conn:
        orders_rows = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return {
        "stages": [t.as_dict() for t in timings],
        "end_to_end": {"seconds": round(end_to_end, 4),
                       "orders_per_second": round(len(payloads) / end_to_end, 1)},
        "orders": {**mix, "pushed": len(payloads), "staged": staged.staged,
                   "rejected": staged.rejected, "duplicates_dropped": staged.duplicates,
                   "inserted": promoted.inserted_rows, "orders_rows": orders_rows,
                   "verified": orders_rows == mix["unique_valid"]},
        "machine": machine_info(bench),
    }


def run_benchmark(settings: Settings, *, total: int, batch_size: int, workers: int,
                  duplicates: float = 0.0, invalid: float = 0.0,
                  show_progress: bool = False) -> dict[str, Any]:
    """Run every stage once on `total` orders; always removes its database and keys."""
    if total < 1 or batch_size < 1 or workers < 1:
        raise ValueError("--total, --batch-size and --workers must be at least 1")
    bench = bench_settings(settings)
    started_at = datetime.now(UTC).isoformat()
    try:
        with tqdm(total=len(STAGES), desc="benchmark", unit="stage", file=sys.stderr,
                  disable=not show_progress) as progress:
            measured = _measure(bench, total, batch_size, workers, duplicates, invalid,
                                progress)
    finally:
        close_all()  # the pools hold connections to the database about to be dropped
        try:
            unlink_matching(redis_client(bench.redis),
                            f"{glob_escape(bench.redis.key_prefix)}:*")
        finally:
            _drop_database(bench)
    return {
        "started_at": started_at,
        "database": bench.postgres.dbname,
        "key_prefix": bench.redis.key_prefix,
        "total": total, "batch_size": batch_size, "workers": workers,
        "duplicates": duplicates, "invalid": invalid,
        **measured,
        "peak_rss_kib": {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                         "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss},
    }


def render_benchmark(result: dict[str, Any]) -> str:
    """The stage timings and context as an aligned table."""
    lines = [f"{'stage':<10}{'rows':>12}{'seconds':>11}{'rows/s':>14}"]
    lines += [f"{s['stage']:<10}{s['rows']:>12,}{s['seconds']:>11.3f}"
              f"{s['rows_per_second']:>14,.0f}" for s in result["stages"]]
    e2e = result["end_to_end"]
    rss = result["peak_rss_kib"]
    orders = result["orders"]
    machine = result["machine"]
    lines += [
        f"{'end-to-end (push → views fresh)':<33}{e2e['seconds']:>11.3f}"
        f"{e2e['orders_per_second']:>14,.0f} orders/s",
        "",
        f"orders: pushed {orders['pushed']:,}, in orders {orders['orders_rows']:,}, "
        f"rejected {orders['rejected']:,}, duplicates {orders['duplicates_dropped']:,}"
        f" ({'verified' if orders['verified'] else 'MISMATCH'})",
        f"workers {result['workers']}, batch size {result['batch_size']:,}; peak RSS "
        f"{rss['self'] / 1024:,.0f} MiB (this process), {rss['children'] / 1024:,.0f} MiB "
        "(largest child)",
        f"{machine['cpu_count']} CPUs, {machine['platform']}, Python {machine['python']}, "
        f"Polars {machine['polars']}, redis-py {machine['redis_py']}, psycopg "
        f"{machine['psycopg']}, Postgres {machine['postgres_server']}, Redis "
        f"{machine['redis_server']}",
    ]
    return "\n".join(lines)
