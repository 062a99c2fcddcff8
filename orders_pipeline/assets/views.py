"""The views area: the dashboard views, one partition per UTC month.

Each view is a plain Postgres view over one materialized view per UTC month
(`postgres_patterns.views`). The assets are partitioned the same way
(`VIEW_PARTITIONS`): materializing a partition, or backfilling a range of them from the UI,
refreshes those months' views (`refresh_month`, changed or not). What keeps them fresh is the
`promoted_orders` step: right after promotion it refreshes the months that changed and
records one materialization per refreshed view and month here (`view_month_materializations`), so
the catalog shows each month's last refresh.
"""

import warnings
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime

import dagster as dg
from psycopg import sql

from orders_pipeline.assets import OWNERS
from orders_pipeline.assets.common import RETRY, retried_only_if_transient_as, seconds
from orders_pipeline.assets.orders import (
    INGEST_FRESHNESS,
    PRODUCT_DAILY_ROLLUP,
    PROMOTED_ORDERS,
    SALES_HOURLY_ROLLUP,
)
from orders_pipeline.assets.tables import PRODUCT_DAILY_SCHEMA, SALES_HOURLY_SCHEMA
from orders_pipeline.postgres_patterns.views import SliceRefresh, month_relation, refresh_month
from orders_pipeline.resources import PostgresResource

# One partition per UTC month, keys like "2026-11". From December 1969: an order stamped at
# the contract's earliest instant, 1970-01-01T00:00+14:00, is 1969-12-31T10:00 UTC, so every
# month a valid order can fall into is a partition, and any past month can be refreshed or
# backfilled from the UI (about 690 partitions; Dagster computes them, nothing is stored per
# partition until it is materialized). Through the current month (end_offset=1), the one that
# receives orders. Months after it (orders dated ahead, up to 2101-01 UTC by the contract)
# are not partitions until they begin: their month views are still created and refreshed by
# promotion and `orders-pipeline refresh` like any other, and `promoted_orders` lists them in
# its metadata (`view_months_outside_partitions`) instead of recording a materialization.
VIEW_PARTITIONS = dg.MonthlyPartitionsDefinition(start_date="1969-12", fmt="%Y-%m",
                                                 end_offset=1)
# A group of its own: "Materialize all" of the `orders_pipeline` group (unpartitioned) keeps
# working, and refreshes the views anyway through `promoted_orders`.
VIEWS_GROUP = "dashboard_views"

_FRESHNESS = """**Partitioned by UTC month**: one materialized view per month behind the name
(e.g. `{view}_m202611`), each selecting one month of the rollup by a range on its primary key.
Promotion adds every inserted order to the rollup in the same transaction, and triggers on the
rollup mark the months it changed; the `promoted_orders` step then refreshes exactly those
months' views (`REFRESH MATERIALIZED VIEW CONCURRENTLY`, readers never blocked) and records a
materialization of each refreshed month here, so a refresh costs time in proportion to the
months a batch touched, not to the history. Materializing a partition (or backfilling a range)
refreshes those months, changed or not. Months after the current one are refreshed the same
way but are not partitions until they begin. Freshness warns after an hour without any month
refreshed and fails after a day, as `promoted_orders`."""


def partition_month(partition_key: str) -> date:
    """The first day of the UTC month a partition key ("2026-11") names; ValueError if the
    key is not of that form."""
    return datetime.strptime(partition_key, "%Y-%m").date()


def month_partition(month: date) -> str | None:
    """The partition key of a month (its first day), or None if it is outside
    VIEW_PARTITIONS now (before 1969-12, or after the current UTC month)."""
    key = f"{month.year:04d}-{month.month:02d}"
    return key if VIEW_PARTITIONS.has_partition_key(key) else None


def _months(start: datetime, end: datetime) -> list[date]:
    """The months [start, end) of a partition time window (UTC month boundaries)."""
    month, last = date(start.year, start.month, 1), end.astimezone(UTC).date()
    months = []
    while month < last:
        months.append(month)
        month = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return months


def _slice_rows(postgres: PostgresResource, relations: Iterable[str]) -> int:
    """Rows in the given month views (0 for none)."""
    names = list(relations)
    if not names:
        return 0
    counts = sql.SQL(" + ").join(sql.SQL("(SELECT count(*) FROM {})").format(sql.Identifier(n))
                                 for n in names)
    with postgres.connection() as conn:
        return int(conn.execute(sql.SQL("SELECT {}").format(counts)).fetchone()[0])


def view_month_materializations(
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        refreshed: Sequence[SliceRefresh]
) -> tuple[list[dg.AssetMaterialization], list[SliceRefresh]]:
    """One `AssetMaterialization` of the view's month partition per refreshed month view
    (metadata: its relation, seconds, whether it was created, marks cleared), for a step to
    yield, and the refreshed months that are not partitions (not begun yet), which it logs."""
    events, outside = [], []
    for made in refreshed:
        key = month_partition(made.month)
        if key is None:
            outside.append(made)
            continue
        events.append(dg.AssetMaterialization(
            asset_key=made.view, partition=key, description="refreshed after promotion",
            metadata={"month_view": made.relation, "refresh_seconds": seconds(made.seconds),
                      "created": dg.MetadataValue.bool(made.created),
                      "marks_cleared": made.marks_cleared}))
    if outside:
        context.log.info("month views refreshed outside the partitions (months not begun "
                         "yet): " + ", ".join(made.relation for made in outside))
    return events, outside


def _refresh(context: dg.AssetExecutionContext, postgres: PostgresResource,
             view: str) -> dg.MaterializeResult:
    """Refresh the months of the partition (or backfilled range) of `view`."""
    window = context.partition_time_window
    months = _months(window.start, window.end)
    done: list[SliceRefresh] = []
    absent = []
    with postgres.connection() as conn:
        for month in months:
            refreshed = refresh_month(conn, view, month)
            if refreshed is None:
                absent.append(month)
            else:
                done.append(refreshed)
    rows = _slice_rows(postgres, (made.relation for made in done))
    elapsed = sum((made.seconds for made in done), 0.0)
    context.log.info(
        f"{view} {context.partition_key_range.start}..{context.partition_key_range.end}: "
        f"{len(done)} month views refreshed concurrently in {elapsed:.2f}s ({rows} rows), "
        f"{sum(made.created for made in done)} created; {len(absent)} months without orders")
    metadata: dict[str, object] = {
        "month_views_refreshed": len(done),
        "month_views_created": sum(made.created for made in done),
        "months_without_orders": len(absent),
        "marks_cleared": sum(made.marks_cleared for made in done),
        "refresh_seconds": seconds(elapsed),
        "rows": rows,
    }
    if len(months) == 1:
        metadata["month_view"] = month_relation(view, months[0])
        metadata["dagster/row_count"] = rows
    return dg.MaterializeResult(metadata=metadata)


_SALES_HOURLY = f"""
**Hourly sales by category**: the view `sales_hourly`
(hour in UTC, category, order_count, units_sold, revenue_usd) of the orders in `orders`,
kept in the rollup table `sales_hourly_rollup`.

{_FRESHNESS.format(view="sales_hourly")} Each month view has a unique index on (hour,
category), which a concurrent refresh needs, and one on (category, hour).
"""
_PRODUCT_DAILY = f"""
**Daily performance per product**: the view `product_performance_daily`
(day in UTC, product_id, order_count, units_sold, revenue_usd) of the orders in `orders`,
kept in the rollup table `product_daily_rollup`.

{_FRESHNESS.format(view="product_performance_daily")} Each month view has a unique index on
(day, product_id), which a concurrent refresh needs, and one on (product_id, day).
"""

def _view_asset(view: str, rollup: dg.AssetKey, description: str,
                column_schema: dg.TableSchema) -> dg.AssetsDefinition:
    """The month-partitioned asset of the dashboard view `view`, fed by the rollup table
    `rollup`: materializing a partition or a backfilled range refreshes those month views."""
    with warnings.catch_warnings():
        # `backfill_policy` is beta: a backfill of many months runs as one run (one process
        # start) that refreshes them one after the other, instead of one run per month.
        warnings.simplefilter("ignore", dg.BetaWarning)

        @dg.asset(
            name=view,
            group_name=VIEWS_GROUP,
            owners=OWNERS,
            kinds={"postgres"},
            deps=[PROMOTED_ORDERS, rollup],
            partitions_def=VIEW_PARTITIONS,
            backfill_policy=dg.BackfillPolicy.single_run(),
            retry_policy=RETRY,
            freshness_policy=INGEST_FRESHNESS,
            description=description,
            metadata={"dagster/table_name": view, "dagster/column_schema": column_schema},
        )
        @retried_only_if_transient_as(view)
        def refresh_view_months(context: dg.AssetExecutionContext,
                                postgres: PostgresResource) -> dg.MaterializeResult:
            return _refresh(context, postgres, view)

    return refresh_view_months


sales_hourly = _view_asset("sales_hourly", SALES_HOURLY_ROLLUP, _SALES_HOURLY,
                           SALES_HOURLY_SCHEMA)
product_performance_daily = _view_asset("product_performance_daily", PRODUCT_DAILY_ROLLUP,
                                        _PRODUCT_DAILY, PRODUCT_DAILY_SCHEMA)
