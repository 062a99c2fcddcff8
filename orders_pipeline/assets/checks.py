"""Data checks of the lookup snapshot, staging and its rejects, promotion and the views.

The queue's own checks are in `assets.queue`, evaluated by its observation sensor.
"""

import dagster as dg

from orders_pipeline.assets.common import rate, seconds
from orders_pipeline.assets.lookup import lookup_cache
from orders_pipeline.assets.orders import ORDERS_REJECTED, PROMOTED_ORDERS
from orders_pipeline.assets.views import product_performance_daily, sales_hourly
from orders_pipeline.conservation import check_conservation
from orders_pipeline.postgres_patterns.promotion import quarantine_totals, quarantined_batches
from orders_pipeline.postgres_patterns.views import view_vs_orders
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.resources import PipelineResource, PostgresResource, RedisResource

MONEY_PLACES = 2


@dg.asset_check(asset=lookup_cache, description="""
The snapshot is in Redis, has time to live left, and holds exactly the rows of the Postgres
lookup tables.""")
def lookup_cache_fresh(redis: RedisResource, postgres: PostgresResource,
                       pipeline: PipelineResource) -> dg.AssetCheckResult:
    cache = LookupCache(redis.client(), redis.key_space(), pipeline.lookup_ttl_seconds)
    info = cache.info()
    with postgres.connection() as conn:
        expected = cache.source_counts(conn)
    cached = {name: int(info.get(f"rows:{name}", -1)) for name in expected}
    ttl = int(info.get("ttl_seconds", -2))
    return dg.AssetCheckResult(
        passed=bool(info) and ttl > 0 and cached == expected,
        metadata={"ttl_seconds_left": ttl, "age_seconds": seconds(info.get("age_seconds", -1)),
                  **{f"cached_{k}": v for k, v in cached.items()},
                  **{f"postgres_{k}": v for k, v in expected.items()}},
    )


@dg.asset_check(asset=PROMOTED_ORDERS.key, blocking=True, description="""
`orders_staging` holds no rows of batches that were already promoted: promotion removed
exactly what it moved. Blocking: assets downstream of `promoted_orders` in the same run are
not materialized if this fails (the promotion step itself refreshes the views' changed months
before checks run).""")
def staging_holds_no_promoted_rows(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        leftover, staged_waiting = conn.execute("""
            SELECT count(*) FILTER (WHERE b.status = 'promoted'),
                   count(*) FILTER (WHERE b.status = 'staged')
            FROM orders_staging s JOIN ingest_batches b USING (batch_id)""").fetchone()
    return dg.AssetCheckResult(passed=leftover == 0, metadata={
        "promoted_rows_left_in_staging": leftover, "rows_awaiting_promotion": staged_waiting})


def _view_check(view: dg.AssetsDefinition, name: str) -> dg.AssetChecksDefinition:
    # After promotion (which refreshes the changed months) when both run: the ingest job
    # holds this check but not the monthly-partitioned view itself.
    @dg.asset_check(asset=view, name=f"{name}_matches_orders",
                    additional_deps=[PROMOTED_ORDERS.key], description=f"""
Order count, units and revenue summed over `{name}` (every month view behind it) equal those
of `orders`, read in one snapshot: the view answers exactly what a full recompute would.
Runs after each ingest run's promotion and refresh, and with any materialization of a month.""")
    def check(postgres: PostgresResource) -> dg.AssetCheckResult:
        with postgres.connection() as conn:
            of_view, of_orders = view_vs_orders(conn, name)
        return dg.AssetCheckResult(passed=of_view == of_orders, metadata={
            "view_order_count": of_view.orders, "orders_order_count": of_orders.orders,
            "view_units": of_view.units, "orders_units": of_orders.units,
            "view_revenue_usd": round(float(of_view.revenue_usd), MONEY_PLACES),
            "orders_revenue_usd": round(float(of_orders.revenue_usd), MONEY_PLACES),
        })

    return check


sales_hourly_matches_orders = _view_check(sales_hourly, "sales_hourly")
product_performance_daily_matches_orders = _view_check(product_performance_daily,
                                                       "product_performance_daily")


@dg.asset_check(asset=PROMOTED_ORDERS.key, description="""
Conservation: every order producers pushed (`accepted`, counted in the same MULTI as the
LPUSH) is in exactly one place: `orders`, a promotion conflict, `orders_rejected`, dropped
as a duplicate, awaiting promotion in staging, quarantined, queued, or in flight. A
difference means an order was lost (positive) or counted twice (negative).""")
def orders_conservation(redis: RedisResource,
                        postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        books = check_conservation(redis.client(), redis.key_space(), conn)
    return dg.AssetCheckResult(passed=books.balanced, metadata={
        name: dg.MetadataValue.bool(value) if isinstance(value, bool) else int(value)
        for name, value in books.as_dict().items()})


QUARANTINE_LISTED = 100


@dg.asset_check(asset=PROMOTED_ORDERS.key, description=f"""
No batch is quarantined. A poison batch (one whose promotion fails for a reason retrying
cannot fix: a value Postgres cannot store or sum, a violated constraint) is set aside with its
error and raw payloads so that it never blocks the others; this check fails while any is, and
lists the oldest {QUARANTINE_LISTED} with their order counts and errors. Fix the cause, then
`orders-pipeline readmit BATCH_ID...` (or `--all`). Not blocking: the views stay fresh.""")
def no_quarantined_batches(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn, conn.transaction():
        batches, orders = quarantine_totals(conn)
        listed = quarantined_batches(conn, limit=QUARANTINE_LISTED)
    ids = " ".join(b.batch_id for b in listed)
    return dg.AssetCheckResult(passed=batches == 0, metadata={
        "quarantined_batches": batches,
        "quarantined_orders": orders,
        "batches": dg.MetadataValue.json([b.as_dict() for b in listed]),
        "readmit_command": dg.MetadataValue.text(
            f"orders-pipeline readmit {ids if batches <= QUARANTINE_LISTED else '--all'}"
            if batches else "nothing to re-admit"),
    })


REJECTED_RATE_WARN = 0.05


@dg.asset_check(asset=ORDERS_REJECTED.key, description=f"""
Warns when more than {REJECTED_RATE_WARN:.0%} of the orders claimed in the last hour were
rejected (read from the batch ledger `ingest_batches`): usually a producer sending a new,
broken format. The rejects themselves are in `orders_rejected` with their reasons.""")
def rejected_rate_below_threshold(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        claimed, rejected = conn.execute(
            "SELECT coalesce(sum(claimed_rows), 0), coalesce(sum(rejected_rows), 0)"
            " FROM ingest_batches WHERE staged_at > now() - interval '1 hour'").fetchone()
    share = rejected / claimed if claimed else 0.0
    return dg.AssetCheckResult(
        passed=share <= REJECTED_RATE_WARN, severity=dg.AssetCheckSeverity.WARN,
        metadata={"rejected_rate": rate(float(share)),
                  "claimed_last_hour": int(claimed), "rejected_last_hour": int(rejected),
                  "threshold": REJECTED_RATE_WARN})


MISMATCHES_LISTED = 20


@dg.asset_check(asset=ORDERS_REJECTED.key, description=f"""
Every reject the batch ledger counted is stored, once: for each batch staged in the last day
(and not lost to a Postgres crash), `orders_rejected` holds as many rows as the ledger's
`rejected_rows`. Lists up to {MISMATCHES_LISTED} batches that differ.""")
def rejects_match_ledger(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        rows = conn.execute("""
            SELECT b.batch_id, b.rejected_rows, count(r.batch_id)
            FROM ingest_batches b LEFT JOIN orders_rejected r USING (batch_id)
            WHERE b.status <> 'lost' AND b.staged_at > now() - interval '1 day'
            GROUP BY b.batch_id, b.rejected_rows
            HAVING count(r.batch_id) <> b.rejected_rows
            ORDER BY b.batch_id""").fetchall()
    return dg.AssetCheckResult(passed=not rows, metadata={
        "batches_differing": len(rows),
        "differences": dg.MetadataValue.json([
            {"batch_id": batch, "ledger_rejected_rows": counted, "stored_rows": stored}
            for batch, counted, stored in rows[:MISMATCHES_LISTED]]),
    })

