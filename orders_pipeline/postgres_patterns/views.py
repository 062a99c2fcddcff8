"""Dashboard views: refreshed CONCURRENTLY so readers are never blocked."""

import time

import psycopg
from psycopg import sql

VIEWS = ("sales_hourly", "product_performance_daily")
_REFRESH_LOCK = "orders_pipeline.refresh_views"


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


def view_totals(conn: psycopg.Connection, view: str) -> tuple[int, int, float]:
    """(rows, sum of order_count, sum of revenue_usd) of a view."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}")
    row = conn.execute(
        sql.SQL("SELECT count(*), coalesce(sum(order_count), 0), coalesce(sum(revenue_usd), 0)"
                " FROM {}").format(sql.Identifier(view))).fetchone()
    conn.rollback()
    return int(row[0]), int(row[1]), float(row[2])
