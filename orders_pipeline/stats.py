"""Pipeline health in one snapshot: queue, Redis, Postgres, views, and whether orders balance.

Dagster-free so that the CLI (`orders-pipeline stats`) and anything else can call it. The
numbers come from one direct Postgres connection and the pooled Redis client; they are read
one after another, not atomically, so while the pipeline runs the balance may be off by what
moved in between. `collect_stats` gives them as one JSON-ready dict; `render_stats` turns that
into a rich renderable (header, table, sparkline) for people, `throughput_line` adds the rate
between two snapshots for `stats --watch`.
"""

import time
from datetime import UTC, datetime
from typing import Any

from psycopg import sql
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from orders_pipeline.connections import pg_connect, redis_client
from orders_pipeline.conservation import check_conservation
from orders_pipeline.postgres_patterns.promotion import quarantine_totals
from orders_pipeline.postgres_patterns.schema import require_schema
from orders_pipeline.postgres_patterns.views import VIEWS
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.order_window import OrderRateWindow
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.redis_patterns.signals import REFUSED_COUNTER
from orders_pipeline.settings import Settings

CONSERVATION_TERMS = ("orders", "promotion_conflicts", "rejected", "duplicates_dropped",
                      "awaiting_promotion", "quarantined", "queued", "in_flight",
                      "dropped_by_retention")
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
_ROW_COUNTS = {"staging_rows": "orders_staging", "orders_rows": "orders",
               "rejected_rows": "orders_rejected",
               **{f"{view}_rows": view for view in VIEWS}}
def _postgres_numbers(settings: Settings) -> dict[str, int]:
    with pg_connect(settings.postgres) as conn:
        require_schema(conn)
        counts = sql.SQL(", ").join(
            sql.SQL("(SELECT count(*) FROM {})").format(sql.Identifier(table))
            for table in _ROW_COUNTS.values())
        row = conn.execute(sql.SQL("SELECT {}").format(counts)).fetchone()
        duplicates, conflicts = conn.execute(
            "SELECT (SELECT coalesce(sum(duplicate_rows), 0) FROM ingest_batches),"
            " (SELECT coalesce(sum(staged_rows - inserted_rows), 0) FROM promotions)"
        ).fetchone()
        quarantined_batches, quarantined_orders = quarantine_totals(conn)
        conn.rollback()
    return {**dict(zip(_ROW_COUNTS, map(int, row), strict=True)),
            "duplicates_dropped": int(duplicates), "promotion_conflicts": int(conflicts),
            "quarantined_batches": quarantined_batches,
            "quarantined_orders": quarantined_orders}


def collect_stats(settings: Settings) -> dict[str, Any]:
    """A snapshot of the pipeline; raises SchemaMissing before `init-db` was run."""
    postgres = _postgres_numbers(settings)
    client = redis_client(settings.redis)
    keys = RedisKeys.of(settings.redis)
    tuning = settings.pipeline
    now = time.time()
    queue = OrderQueue(client, keys)
    depth_by_shard = [shard.depth() for shard in queue.shards]
    claimed_ids, staged_ids = queue.claimed_batch_ids(), queue.staged_batch_ids()
    claimed_batches, claimed_orders = len(claimed_ids), queue.orders_in(claimed_ids)
    staged_batches, staged_orders = len(staged_ids), queue.orders_in(staged_ids)
    per_minute = OrderRateWindow(client, keys).per_minute(now)
    cache = LookupCache(client, keys, tuning.lookup_ttl_seconds)
    stats: dict[str, Any] = {
        "collected_at": datetime.fromtimestamp(now, UTC).isoformat(),
        "key_prefix": settings.redis.key_prefix,
        "database": settings.postgres.dbname,
        "queue_depth": sum(depth_by_shard),
        "queue_shards": len(queue.shards),
        "queue_depth_by_shard": depth_by_shard,
        "in_flight": claimed_orders + staged_orders,
        "claimed_batches": claimed_batches,
        "claimed_orders": claimed_orders,
        "staged_batches": staged_batches,
        "staged_orders": staged_orders,
        "backpressure_active": Backpressure(client, keys, tuning.max_queue_depth).is_active(),
        "max_queue_depth": tuning.max_queue_depth,
        "accepted": queue.counter("accepted"),
        "backpressure_waits": int(client.hget(keys.counters, "backpressure_waits") or 0),
        "signals_refused": int(client.hget(keys.counters, REFUSED_COUNTER) or 0),
        "dedup_window_size": DedupWindow(client, keys, tuning.dedup_window_seconds).size(),
        "lookup_cache_size": cache.size(),
        "lookup_cache_age_seconds": cache.info().get("age_seconds"),
        "orders_per_minute_last_hour": sum(per_minute.values()),
        "orders_per_minute": [
            {"minute": datetime.fromtimestamp(minute, UTC).isoformat(), "count": count}
            for minute, count in per_minute.items()],
        **postgres,
    }
    with pg_connect(settings.postgres) as conn:
        stats["conservation"] = check_conservation(client, keys, conn).as_dict()
    return stats


def sparkline(values: list[int]) -> str:
    """One block per value, scaled to the largest; a blank for zero so gaps stay visible."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    last = len(SPARK_BLOCKS) - 1
    return "".join(" " if v <= 0 else SPARK_BLOCKS[max(0, round(v / top * last))]
                   for v in values)


def _minute_series(stats: dict[str, Any]) -> list[int]:
    """Orders per minute for each of the last 61 minutes (the window's span), oldest first."""
    now = int(datetime.fromisoformat(stats["collected_at"]).timestamp())
    first = (now - 3600) // 60 * 60
    counts = {int(datetime.fromisoformat(m["minute"]).timestamp()): m["count"]
              for m in stats["orders_per_minute"]}
    return [counts.get(minute, 0) for minute in range(first, now // 60 * 60 + 1, 60)]


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _sections(stats: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The snapshot's numbers grouped for people: [(section title, [(label, value), ...])]."""
    balance = stats["conservation"]
    age = stats["lookup_cache_age_seconds"]
    return [
        ("Queue", [
            ("queue depth", stats["queue_depth"]),
            ("max queue depth", stats["max_queue_depth"]),
            ("backpressure active", stats["backpressure_active"]),
            ("in flight (orders)", stats["in_flight"]),
            ("claimed batches", stats["claimed_batches"]),
            ("staged batches", stats["staged_batches"]),
        ]),
        ("Redis", [
            ("accepted (all time)", stats["accepted"]),
            ("malformed signals refused", stats["signals_refused"]),
            ("dedup window size", stats["dedup_window_size"]),
            ("lookup cache size", stats["lookup_cache_size"]),
            ("lookup cache age", "not loaded" if age is None else f"{age:,.0f} s"),
            ("orders last hour", stats["orders_per_minute_last_hour"]),
        ]),
        ("Postgres", [
            ("staging rows", stats["staging_rows"]),
            ("orders rows", stats["orders_rows"]),
            ("rejected rows", stats["rejected_rows"]),
            ("duplicates dropped", stats["duplicates_dropped"]),
            ("promotion conflicts", stats["promotion_conflicts"]),
            ("quarantined batches", stats["quarantined_batches"]),
            ("quarantined orders", stats["quarantined_orders"]),
        ]),
        ("Views", [(f"{view} rows", stats[f"{view}_rows"]) for view in VIEWS]),
        ("Conservation", [
            *((f"  {name.replace('_', ' ')}", balance[name]) for name in CONSERVATION_TERMS),
            ("accounted", balance["accounted"]),
            ("accepted", balance["accepted"]),
            ("re-driven", balance["redriven"]),
            ("replayed", balance["replayed"]),
            ("balanced", Text("yes") if balance["balanced"] else
             Text(f"NO (difference {balance['difference']:+,})", style="bold red")),
        ]),
    ]


def stats_table(stats: dict[str, Any]) -> Table:
    """The numbers as a rich table: section | measure | value, a blank line between sections."""
    table = Table(box=box.SIMPLE, show_header=False, show_edge=False, pad_edge=False)
    table.add_column("section", style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for title, rows in _sections(stats):
        for index, (label, value) in enumerate(rows):
            table.add_row(title if index == 0 else "", label,
                          value if isinstance(value, Text) else _number(value),
                          end_section=index == len(rows) - 1)
    return table


def render_stats(stats: dict[str, Any], throughput: str | None = None) -> Group:
    """The snapshot for people (print it with a rich `Console`): a header line, `throughput`
    if given (`stats --watch`; right under the header, where a short terminal never crops
    it), the `stats_table`, orders per minute over the last hour as a sparkline and, while
    batches are quarantined, how to list them."""
    header = Text(f"orders_pipeline stats  {stats['collected_at']}  (prefix "
                  f"{stats['key_prefix']!r}, database {stats['database']!r})", style="bold")
    series = _minute_series(stats)
    parts: list[RenderableType] = [header, *([Text(throughput)] if throughput else []), "",
                                   stats_table(stats), "",
                                   Text("Orders per minute, last hour (by order time)", "bold"),
                                   Text(f"  │{sparkline(series)}│ peak "
                                        f"{max(series, default=0):,}/min")]
    if stats["quarantined_batches"]:
        parts += ["", Text(f"{stats['quarantined_batches']:,} quarantined batches hold "
                           f"{stats['quarantined_orders']:,} orders: `orders-pipeline readmit "
                           "--all --dry-run` lists them with their errors", style="yellow")]
    return Group(*parts)


def throughput_line(stats: dict[str, Any], previous: tuple[float, int] | None,
                    now: float) -> str:
    """For `stats --watch`: orders/s into `orders` since the last snapshot, and the lag.

    The lag is how long the orders not yet in `orders` (queued, in flight, awaiting
    promotion) take to get there at that rate.
    """
    if previous is None or now <= previous[0]:
        return "throughput: measuring…"
    rate = (stats["orders_rows"] - previous[1]) / (now - previous[0])
    behind = stats["queue_depth"] + stats["in_flight"]
    if behind == 0:
        lag = "lag: none (all caught up)"
    elif rate > 0:
        lag = f"lag: ~{behind / rate:,.0f} s for {behind:,} orders"
    else:
        lag = f"lag: {behind:,} orders waiting, none promoted since the last look"
    pressure = "backpressure ON" if stats["backpressure_active"] else "backpressure off"
    return f"throughput: {rate:,.0f} orders/s into orders | {lag} | {pressure}"
