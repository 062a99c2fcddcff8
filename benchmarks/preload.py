"""`--preload M`: M orders COPYed straight into `orders` before the measured run."""

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
from tqdm import tqdm

from orders_pipeline import pipeline
from orders_pipeline.connections import pg_connect
from orders_pipeline.postgres_patterns.promotion import ORDER_COLUMNS
from orders_pipeline.postgres_patterns.views import rebuild_rollups
from orders_pipeline.settings import Settings

PRELOAD_CHUNK = 1_000_000
PRELOAD_COPY_ROWS = 250_000
PRELOAD_DAYS = 90


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
            "copy_orders_per_second": round(count / timings["copy_seconds"], 1),
            **{k: round(v, 2) for k, v in timings.items()}}
