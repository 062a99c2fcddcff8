"""Orders COPYed straight into `orders` (or the flat comparison table) before a measured run.

`preload_orders` builds the rows with Polars, chunk by chunk (PRELOAD_CHUNK orders, in time
order within the chunk's slice of the history), so memory stays bounded by the chunk however
many orders it loads. Order ids are UUIDv7 (what producers send) stamped with the order's
own time, built column-wise (`uuid_strings`), and unique across calls: `first` numbers the
orders of one call after those of the calls before it.

`orders_pipeline` is used as a user would: the rollups are updated from each chunk by the
product's own SQL (`views.rollup_upsert`) and the views refreshed by
`pipeline.refresh_all_views` at the end.
"""

import io
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl
import psycopg
from psycopg import sql
from tqdm import tqdm

from orders_pipeline import pipeline
from orders_pipeline.connections import pg_connect
from orders_pipeline.postgres_patterns.partitions import ensure_months, month_of
from orders_pipeline.postgres_patterns.promotion import ORDER_COLUMNS
from orders_pipeline.postgres_patterns.views import ROLLUPS, rollup_upsert
from orders_pipeline.settings import Settings

PRELOAD_CHUNK = 500_000
PRELOAD_COPY_ROWS = 100_000
PRELOAD_DAYS = 90
ORDERS = "orders"
# The comparison table of `scale-curve --design unpartitioned` (`create_flat_table`).
FLAT_TABLE = "orders_flat"
# The guard table that keeps each order id once across the partitions, and its columns.
GUARD = "order_ids"
GUARD_COLUMNS = ("order_id", "order_timestamp")
# The columns the rollups are computed from, COPYed per chunk into a temporary table.
_ROLLUP_SOURCE = "bench_preload_rollup_rows"
_ROLLUP_COLUMNS = ("order_timestamp", "category", "product_id", "quantity", "total_amount_usd")
_CSV_TIME = "%Y-%m-%dT%H:%M:%S%.3f+00:00"
# Every 4-digit hex string, indexed by its value: `uuid_strings` formats 16 bits at a time.
_HEX4 = pl.Series("hex4", [f"{value:04x}" for value in range(1 << 16)])
_BITS_62 = 1 << 62
_VARIANT = 1 << 63  # the RFC 9562 variant bits 0b10 at the top of the low 64 bits


def uuid_strings(high: pl.Expr, low: pl.Expr) -> pl.Expr:
    """The 128-bit values `high` * 2**64 + `low` (two UInt64 expressions) as UUID text,
    `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower case; no per-row Python."""
    def quad(value: pl.Expr, shift: int) -> pl.Expr:
        return pl.lit(_HEX4).gather(value // (1 << shift) % (1 << 16))

    dash = pl.lit("-")
    return pl.concat_str([quad(high, 48), quad(high, 32), dash, quad(high, 16), dash,
                          quad(high, 0), dash, quad(low, 48), dash, quad(low, 32),
                          quad(low, 16), quad(low, 0)])


def uuid7_ids(epoch_ms: pl.Expr, number: pl.Expr, seed: int) -> pl.Expr:
    """UUIDv7 text (RFC 9562) with the 48-bit Unix time `epoch_ms` (Int64 milliseconds),
    `rand_a` drawn from a hash of `number` and `rand_b` made of 22 hashed bits above
    `number` (below 2**40): ids of distinct numbers never collide, and sort by time first."""
    hashed = number.cast(pl.UInt64).hash(seed)
    high = epoch_ms.cast(pl.UInt64) * (1 << 16) + 0x7000 + hashed % (1 << 12)
    low = (_VARIANT + hashed // (1 << 12) % (1 << 22) * (1 << 40)
           + number.cast(pl.UInt64) % (1 << 40))
    return uuid_strings(high, low)


def uuid4_ids(count: int, seed: int) -> pl.Series:
    """`count` random (version 4) UUID strings from 122 hashed bits of their row number under
    `seed` (draw the seed at random for ids unseen before: `secrets.randbits(64)`)."""
    numbers = pl.int_range(0, count, eager=True, dtype=pl.UInt64).to_frame("n")
    first, second = pl.col("n").hash(seed), pl.col("n").hash(seed ^ 0x5DEECE66D)
    high = first - first % (1 << 16) + 0x4000 + first % (1 << 12)
    return numbers.select(uuid_strings(high, second % _BITS_62 + _VARIANT)
                          .alias("order_id")).to_series()


def _references(conn: psycopg.Connection) -> dict[str, pl.DataFrame]:
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
    return refs


def _preload_frame(refs: dict[str, pl.DataFrame], first: int, count: int,
                   window: tuple[datetime, datetime], seed: int) -> pl.DataFrame:
    """`count` enriched orders numbered from `first`, in `orders`' columns, in time order
    within `window`."""
    start, end = window
    products = refs["products"].sample(count, with_replacement=True, seed=seed)
    currencies = refs["currencies"].sample(count, with_replacement=True, seed=seed + 1)
    zips = refs["zip_codes"].sample(count, with_replacement=True, seed=seed + 2)
    span_ms = max(1, int((end - start).total_seconds() * 1000))
    numbers = pl.int_range(first, first + count, eager=True)
    offsets = (numbers.hash(seed + 3) % span_ms).cast(pl.Int64).sort()
    quantity = pl.Series([1, 1, 1, 2, 2, 3, 4, 5]).sample(count, with_replacement=True,
                                                         seed=seed + 4)
    start_ms = int(start.timestamp() * 1000)
    frame = pl.concat([products, currencies, zips], how="horizontal").with_columns(
        numbers.alias("n"),
        pl.int_range(1, 200_001, eager=True).sample(count, with_replacement=True,
                                                    seed=seed + 5).alias("customer_id"),
        quantity.alias("quantity"),
        (offsets + start_ms).alias("epoch_ms"))
    unit_price = (pl.col("base_price") / pl.col("rate_to_usd")).round(2)
    total = (unit_price * pl.col("quantity")).round(4)
    return frame.select(
        uuid7_ids(pl.col("epoch_ms"), pl.col("n"), seed + 6).alias("order_id"),
        "customer_id", "product_id", "quantity", unit_price.alias("unit_price"),
        "currency", "zip_code",
        pl.from_epoch("epoch_ms", time_unit="ms").dt.replace_time_zone("UTC")
        .alias("order_timestamp"),
        total.alias("total_amount"),
        (total * pl.col("rate_to_usd")).round(2).alias("total_amount_usd"),
        "category", "region", "shipping_zone", pl.lit("preload").alias("batch_id"))


def _copy(conn: psycopg.Connection, table: str, columns: tuple[str, ...],
          rows: pl.DataFrame) -> None:
    """COPY `columns` of `rows` into `table`, PRELOAD_COPY_ROWS rows per CSV piece."""
    statement = sql.SQL("COPY {table} ({columns}) FROM STDIN (FORMAT csv)").format(
        table=sql.Identifier(table), columns=sql.SQL(", ").join(map(sql.Identifier, columns)))
    with conn.cursor().copy(statement) as copy:
        for piece in rows.select(columns).iter_slices(PRELOAD_COPY_ROWS):
            buffer = io.BytesIO()
            piece.write_csv(buffer, include_header=False, datetime_format=_CSV_TIME)
            copy.write(buffer.getbuffer())


def _months(start: datetime, end: datetime) -> list[date]:
    """First days of the UTC months from `start`'s to `end`'s."""
    months, month = [], month_of(start)
    while month <= month_of(end):
        months.append(month)
        month = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return months


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


def create_flat_table(conn: psycopg.Connection) -> None:
    """FLAT_TABLE: the seed's single-table design beside the partitioned `orders` (same
    columns; order_id text PRIMARY KEY and a btree index on order_timestamp)."""
    conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {flat} ("
        " LIKE {orders} INCLUDING DEFAULTS INCLUDING CONSTRAINTS,"
        " PRIMARY KEY (order_id))").format(flat=sql.Identifier(FLAT_TABLE),
                                           orders=sql.Identifier(ORDERS)))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {index} ON {flat} (order_timestamp)")
                 .format(index=sql.Identifier(f"{FLAT_TABLE}_order_timestamp_idx"),
                         flat=sql.Identifier(FLAT_TABLE)))
    conn.commit()


def preload_orders(settings: Settings, count: int, seed: int, show_progress: bool,
                   days: int = PRELOAD_DAYS, first: int = 0, table: str = ORDERS
                   ) -> dict[str, Any]:
    """COPY `count` orders straight into `table`, spread over the `days` days up to an hour
    ago; ids numbered from `first` (pass the orders preloaded before, so ids stay unique).

    Into `orders` (the product's table): its month partitions are created first (the
    product's `partitions.ensure_months`), each chunk goes into `orders` and its ids into the
    guard `order_ids`, and the rollups are updated from it in the same transaction (the
    product's upsert); then the table is vacuumed and analysed, a checkpoint
    taken and the views refreshed, so the measured run starts from a settled database, as in
    production. Into FLAT_TABLE: COPY, VACUUM ANALYZE and the checkpoint only. Returns the
    orders loaded, the seconds of each step (`copy_seconds`: building the rows and COPY;
    `rollup_seconds`: the rollup update) and orders/s of COPY alone and of the whole load
    (`load_orders_per_second`: COPY and rollups). Raises ValueError for an unknown table or
    days < 1; server errors propagate.
    """
    if table not in (ORDERS, FLAT_TABLE):
        raise ValueError(f"preload into {ORDERS} or {FLAT_TABLE}, not {table!r}")
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    end = datetime.now(UTC) - timedelta(hours=1)
    start = end - timedelta(days=days)
    chunks = max(1, -(-count // PRELOAD_CHUNK))
    step = (end - start) / chunks
    product = table == ORDERS
    timings: dict[str, float] = {"copy_seconds": 0.0}
    if product:
        timings["rollup_seconds"] = 0.0
    with pg_connect(settings.postgres) as conn:
        refs = _references(conn)
        if product:
            with conn.transaction():
                timings["partitions_created"] = ensure_months(conn, _months(start, end))
            conn.execute(sql.SQL(
                "CREATE TEMPORARY TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                sql.Identifier(_ROLLUP_SOURCE),
                sql.SQL(", ").join(map(sql.Identifier, _ROLLUP_COLUMNS)),
                sql.Identifier(ORDERS)))
            conn.commit()
        with tqdm(total=count, desc="preload", unit="order", file=sys.stderr,
                  disable=not show_progress) as bar:
            for number in range(chunks):
                offset = number * PRELOAD_CHUNK
                size = min(PRELOAD_CHUNK, count - offset)
                if size <= 0:
                    break
                started = time.perf_counter()
                rows = _preload_frame(refs, first + offset, size,
                                      (start + step * number, start + step * (number + 1)),
                                      seed + 7919 * number)
                with conn.transaction():
                    conn.execute("SET LOCAL synchronous_commit = off")
                    _copy(conn, table, ORDER_COLUMNS, rows)
                    if product:
                        _copy(conn, GUARD, GUARD_COLUMNS, rows)
                    timings["copy_seconds"] += time.perf_counter() - started
                    if product:
                        started = time.perf_counter()
                        _copy(conn, _ROLLUP_SOURCE, _ROLLUP_COLUMNS, rows)
                        for rollup in ROLLUPS:
                            conn.execute(rollup_upsert(rollup, _ROLLUP_SOURCE))
                        conn.execute(sql.SQL("TRUNCATE {}").format(
                            sql.Identifier(_ROLLUP_SOURCE)))
                        timings["rollup_seconds"] += time.perf_counter() - started
                del rows
                bar.update(size)
        steps: list[tuple[str, Callable[[], object]]] = [
            ("vacuum_analyze_seconds", lambda: conn.execute(
                sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))),
            ("checkpoint_seconds", lambda: conn.execute("CHECKPOINT")),
        ]
        if product:
            steps.append(("refresh_seconds", lambda: pipeline.refresh_all_views(settings)))
        conn.autocommit = True  # VACUUM runs outside a transaction
        for name, action in steps:
            started = time.perf_counter()
            action()
            timings[name] = time.perf_counter() - started
    loading = timings["copy_seconds"] + timings.get("rollup_seconds", 0.0)
    return {"orders": count, "days": days, "table": table,
            "copy_orders_per_second": _rate(count, timings["copy_seconds"]),
            "load_orders_per_second": _rate(count, loading),
            **{k: round(v, 2) for k, v in timings.items()}}
