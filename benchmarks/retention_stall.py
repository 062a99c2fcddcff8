"""`retention`: how long dropping old months takes, and how long promotion waits meanwhile.

One scratch database and Redis key prefix (removed at the end):

1. **preload**: COPY `--orders` orders spread over the `--history-days` days up to an hour
   ago (`preload.preload_orders`: partitions, the id guard `order_ids`, rollups, VACUUM
   ANALYZE, CHECKPOINT, views refreshed).
2. **retention**: `pipeline.apply_retention` with the horizon of `--keep-months` (the
   product's `partitions.horizon_keeping`), timed from the call to its return.
3. **promotion's wait**, measured beside it: a probe connection takes PROMOTE_LOCK
   exclusively (as a promotion round of every shard does) in a short transaction every
   `PROBE_INTERVAL_SECONDS`, from just before the retention starts until it returns; each
   acquisition's wait is recorded. The longest is how long a promotion round that arrived
   during the retention waited for it.

Reports the orders and ids dropped, partitions and month views dropped, `order_ids` rows and
bytes before and after, the seconds of the retention and the probe's waits (`end_to_end.
percentiles`: count, p50 ... max in ms).
"""

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from benchmarks.end_to_end import percentiles
from benchmarks.host import machine_info
from benchmarks.preload import GUARD, preload_orders
from benchmarks.scratch import bench_settings, remove_scratch
from orders_pipeline import pipeline
from orders_pipeline.connections import pg_connect
from orders_pipeline.postgres_patterns.partitions import horizon_keeping
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.postgres_patterns.views import PROMOTE_LOCK
from orders_pipeline.settings import Settings

PROBE_INTERVAL_SECONDS = 0.05


@dataclass(frozen=True)
class RetentionOptions:
    """What `run_retention` measures: orders preloaded over history_days, months kept."""
    orders: int = 20_000_000
    history_days: int = 360
    keep_months: int = 6
    seed: int = 1


class _LockProbe(threading.Thread):
    """Takes PROMOTE_LOCK exclusively in a short transaction again and again until stopped;
    `waits` holds the seconds each acquisition waited."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="promote-lock-probe", daemon=True)
        self.settings = settings
        self.waits: list[float] = []
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            with pg_connect(self.settings.postgres) as conn:
                self.ready.set()
                while not self._stopping.is_set():
                    asked = time.perf_counter()
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                     (PROMOTE_LOCK,))
                        self.waits.append(time.perf_counter() - asked)
                    self._stopping.wait(PROBE_INTERVAL_SECONDS)
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self.ready.set()

    def stop(self) -> list[float]:
        self._stopping.set()
        self.join(timeout=600)
        if self.error is not None:
            raise self.error
        return self.waits


def _guard_size(settings: Settings) -> dict[str, int]:
    with pg_connect(settings.postgres) as conn:
        rows, size = conn.execute(
            "SELECT count(*), pg_total_relation_size(%s) FROM order_ids", (GUARD,)).fetchone()
    return {"rows": int(rows), "bytes": int(size)}


def run_retention(settings: Settings, options: RetentionOptions) -> dict[str, Any]:
    """Preload, then time one retention and the probe's waits beside it (module docstring);
    the database and key prefix are always removed. Returns the figures as a JSON-able
    dict. Server errors propagate, as does RetentionRefused."""
    bench = bench_settings(settings)
    result: dict[str, Any] = {"benchmark": "retention",
                              "started_at": datetime.now(UTC).isoformat(),
                              "database": bench.postgres.dbname,
                              "key_prefix": bench.redis.key_prefix,
                              "options": options.__dict__}
    try:
        ensure_database(bench.postgres)
        with pg_connect(bench.postgres) as conn:
            apply_schema(conn)
        result["machine"] = machine_info(bench)
        result["preload"] = preload_orders(bench, options.orders, options.seed,
                                           show_progress=False, days=options.history_days)
        result["guard_before"] = _guard_size(bench)
        horizon = horizon_keeping(options.keep_months)
        probe = _LockProbe(bench)
        probe.start()
        probe.ready.wait(60)
        time.sleep(0.5)  # a few uncontended acquisitions first
        started = time.perf_counter()
        dropped = pipeline.apply_retention(bench, horizon)
        seconds = time.perf_counter() - started
        waits = probe.stop()
        result["retention"] = {**dropped.as_dict(), "seconds": round(seconds, 3)}
        result["guard_after"] = _guard_size(bench)
        result["promotion_wait"] = percentiles(waits)  # ms, and the count
    finally:
        remove_scratch(bench)
    return result


def render_retention(result: dict[str, Any]) -> str:
    """A markdown summary of `run_retention`'s figures."""
    options, dropped = result["options"], result["retention"]
    wait, before, after = result["promotion_wait"], result["guard_before"], result["guard_after"]
    return "\n".join([
        f"retention of {options['orders']:,} orders over {options['history_days']} days, "
        f"keeping {options['keep_months']} months (horizon {dropped['horizon']}):",
        "",
        "| dropped | seconds | promotion waited: max / p50 (probes) | order_ids before → after |",
        "|---|---|---|---|",
        f"| {dropped['orders']:,} orders, {dropped['ids']:,} ids, "
        f"{len(dropped['partitions'])} partitions, {len(dropped['view_slices'])} month views "
        f"| {dropped['seconds']:.2f} | {wait['max_ms'] / 1000:.2f} s / "
        f"{wait['p50_ms']:.1f} ms ({wait['count']}) "
        f"| {before['rows']:,} rows, {before['bytes'] / 2**20:,.0f} MiB → {after['rows']:,} "
        f"rows, {after['bytes'] / 2**20:,.0f} MiB |",
    ])
