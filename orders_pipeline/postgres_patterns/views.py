"""Dashboard views: refreshed CONCURRENTLY so readers are never blocked."""

import time
from dataclasses import dataclass
from decimal import Decimal

import psycopg
from psycopg import sql

VIEWS = ("sales_hourly", "product_performance_daily")
_REFRESH_LOCK = "orders_pipeline.refresh_views"
PROMOTE_LOCK = "orders_pipeline.promote"

# rollup table -> (its key columns, the expressions that compute them from an order row).
# The SQL below is assembled from these constants only, never from input.
ROLLUPS = {
    "sales_hourly_rollup": ("hour, category",
                            "date_trunc('hour', order_timestamp, 'UTC'), category"),
    "product_daily_rollup": ("day, product_id",
                             "(order_timestamp AT TIME ZONE 'UTC')::date, product_id"),
}


def rollup_upsert(rollup: str, source: str, *, signed: bool = False) -> str:
    """SQL adding the orders of `source` (a table or CTE name) to one rollup table.

    Quantities are summed as bigint, which Postgres adds up as numeric: no sum overflows
    however many orders share a row (the widths are derived in sql/030_views.sql). With
    `signed`, `source` has a column `sign` (1 adds the order, -1 takes it away again).
    """
    key, expressions = ROLLUPS[rollup]
    sums = ("sum(sign), sum(sign * quantity::bigint), sum(sign * total_amount_usd)" if signed
            else "count(*), sum(quantity::bigint), sum(total_amount_usd)")
    return f"""
    INSERT INTO {rollup} AS r
    SELECT {expressions}, {sums}
    FROM {source} GROUP BY 1, 2
    ON CONFLICT ({key}) DO UPDATE SET
        order_count = r.order_count + EXCLUDED.order_count,
        units_sold = r.units_sold + EXCLUDED.units_sold,
        revenue_usd = r.revenue_usd + EXCLUDED.revenue_usd"""


def rebuild_rollups(conn: psycopg.Connection, *, only_if_empty: bool = False) -> bool:
    """Recompute the rollups from `orders`, serialised with promotion; True if it did.

    For a database that had orders before the rollups existed, or after `orders` was
    changed by hand; promotion keeps them current otherwise.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (PROMOTE_LOCK,))
        if only_if_empty and conn.execute(
                "SELECT EXISTS (SELECT 1 FROM sales_hourly_rollup)"
                " OR EXISTS (SELECT 1 FROM product_daily_rollup)"
                " OR NOT EXISTS (SELECT 1 FROM orders)").fetchone()[0]:
            return False
        for rollup in ROLLUPS:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(rollup)))
            conn.execute(rollup_upsert(rollup, "orders"))
    return True


def refresh_view(conn: psycopg.Connection, view: str) -> float:
    """Refresh one view; refreshes from anywhere are serialised by an advisory lock."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}")
    started = time.perf_counter()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{_REFRESH_LOCK}:{view}",))
        conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}")
                     .format(sql.Identifier(view)))
    return time.perf_counter() - started


def refresh_views(conn: psycopg.Connection) -> dict[str, float]:
    return {view: refresh_view(conn, view) for view in VIEWS}


@dataclass(frozen=True)
class Totals:
    orders: int
    units: int
    revenue_usd: Decimal


def view_vs_orders(conn: psycopg.Connection, view: str) -> tuple[Totals, Totals]:
    """Totals of a view and of `orders`, read in one snapshot so they are comparable."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}")
    totals = "SELECT coalesce(sum({n}), 0), coalesce(sum({u}), 0), coalesce(sum({r}), 0) FROM {t}"
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        of_view = conn.execute(sql.SQL(totals).format(
            n=sql.Identifier("order_count"), u=sql.Identifier("units_sold"),
            r=sql.Identifier("revenue_usd"), t=sql.Identifier(view))).fetchone()
        of_orders = conn.execute(
            "SELECT count(*), coalesce(sum(quantity::bigint), 0),"
            " coalesce(sum(total_amount_usd), 0)"
            " FROM orders").fetchone()
    return (Totals(int(of_view[0]), int(of_view[1]), Decimal(of_view[2])),
            Totals(int(of_orders[0]), int(of_orders[1]), Decimal(of_orders[2])))
