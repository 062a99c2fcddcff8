import dagster as dg

from orders_pipeline.assets.lookup import lookup_cache
from orders_pipeline.assets.orders import promoted_orders, staged_orders
from orders_pipeline.assets.views import product_performance_daily, sales_hourly
from orders_pipeline.conservation import check_conservation
from orders_pipeline.postgres_patterns.promotion import quarantine_totals, quarantined_batches
from orders_pipeline.postgres_patterns.views import view_vs_orders
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.resources import PostgresResource, RedisResource


@dg.asset_check(asset=lookup_cache, description="""
The snapshot is in Redis, has time to live left, and holds exactly the rows of the Postgres
lookup tables.""")
def lookup_cache_fresh(redis: RedisResource, postgres: PostgresResource) -> dg.AssetCheckResult:
    cache = LookupCache(redis.client(), redis.key_space(), redis.lookup_ttl_seconds)
    info = cache.info()
    with postgres.connection() as conn:
        expected = cache.source_counts(conn)
    cached = {name: int(info.get(f"rows:{name}", -1)) for name in expected}
    ttl = info.get("ttl_seconds", -2)
    return dg.AssetCheckResult(
        passed=bool(info) and ttl > 0 and cached == expected,
        metadata={"ttl_seconds_left": ttl, "age_seconds": info.get("age_seconds", -1),
                  **{f"cached_{k}": v for k, v in cached.items()},
                  **{f"postgres_{k}": v for k, v in expected.items()}},
    )


@dg.asset_check(asset=promoted_orders, blocking=True, description="""
`orders_staging` holds no rows of batches that were already promoted: promotion removed
exactly what it moved. Blocking: the views are not refreshed if this fails.""")
def staging_holds_no_promoted_rows(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        leftover, staged_waiting = conn.execute("""
            SELECT count(*) FILTER (WHERE b.status = 'promoted'),
                   count(*) FILTER (WHERE b.status = 'staged')
            FROM orders_staging s JOIN ingest_batches b USING (batch_id)""").fetchone()
    return dg.AssetCheckResult(passed=leftover == 0, metadata={
        "promoted_rows_left_in_staging": leftover, "rows_awaiting_promotion": staged_waiting})


def _view_check(view: dg.AssetsDefinition, name: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=view, name=f"{name}_matches_orders", description=f"""
Order count, units and revenue summed over `{name}` equal those of `orders`, read in one
snapshot: the view answers exactly what a full recompute would.""")
    def check(postgres: PostgresResource) -> dg.AssetCheckResult:
        with postgres.connection() as conn:
            of_view, of_orders = view_vs_orders(conn, name)
        return dg.AssetCheckResult(passed=of_view == of_orders, metadata={
            "view_order_count": of_view.orders, "orders_order_count": of_orders.orders,
            "view_units": of_view.units, "orders_units": of_orders.units,
            "view_revenue_usd": float(of_view.revenue_usd),
            "orders_revenue_usd": float(of_orders.revenue_usd),
        })

    return check


sales_hourly_matches_orders = _view_check(sales_hourly, "sales_hourly")
product_performance_daily_matches_orders = _view_check(product_performance_daily,
                                                       "product_performance_daily")


@dg.asset_check(asset=promoted_orders, description="""
Conservation: every order producers pushed (`accepted`, counted in the same MULTI as the
LPUSH) is in exactly one place: `orders`, a promotion conflict, `orders_rejected`, dropped
as a duplicate, awaiting promotion in staging, quarantined, queued, or in flight. A
difference means an order was lost (positive) or counted twice (negative).""")
def orders_conservation(redis: RedisResource,
                        postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        books = check_conservation(redis.client(), redis.key_space(), conn)
    return dg.AssetCheckResult(passed=books.balanced, metadata={
        name: int(value) for name, value in books.as_dict().items()})


QUARANTINE_LISTED = 100


@dg.asset_check(asset=promoted_orders, description=f"""
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


@dg.asset_check(asset=staged_orders, description=f"""
Warns when more than {REJECTED_RATE_WARN:.0%} of the orders claimed in the last hour were
rejected (read from the batch ledger `ingest_batches`): usually a producer sending a new,
broken format. The rejects themselves are in `orders_rejected` with their reasons.""")
def rejected_rate_below_threshold(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        claimed, rejected = conn.execute(
            "SELECT coalesce(sum(claimed_rows), 0), coalesce(sum(rejected_rows), 0)"
            " FROM ingest_batches WHERE staged_at > now() - interval '1 hour'").fetchone()
    rate = rejected / claimed if claimed else 0.0
    return dg.AssetCheckResult(
        passed=rate <= REJECTED_RATE_WARN, severity=dg.AssetCheckSeverity.WARN,
        metadata={"rejected_rate": float(rate), "claimed_last_hour": int(claimed),
                  "rejected_last_hour": int(rejected), "threshold": REJECTED_RATE_WARN})


@dg.asset_check(asset=staged_orders, description="""
Warns while the ingestion queue `{P}:ingestion` is deeper than `MAX_QUEUE_DEPTH`, i.e.
producers are being held back by backpressure: add workers or look for a stalled run.""")
def queue_depth_within_limit(redis: RedisResource) -> dg.AssetCheckResult:
    depth = OrderQueue(redis.client(), redis.key_space()).depth()
    return dg.AssetCheckResult(
        passed=depth <= redis.max_queue_depth, severity=dg.AssetCheckSeverity.WARN,
        metadata={"queue_depth": depth, "max_queue_depth": redis.max_queue_depth})
