"""The views area: the dashboard views, refreshed whenever promotion changed their rollups."""

import dagster as dg

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.assets.common import RETRY, retried_only_if_transient, seconds
from orders_pipeline.assets.orders import (
    INGEST_FRESHNESS,
    PRODUCT_DAILY_ROLLUP,
    PROMOTED_ORDERS,
    SALES_HOURLY_ROLLUP,
    table_rows,
)
from orders_pipeline.assets.tables import PRODUCT_DAILY_SCHEMA, SALES_HOURLY_SCHEMA
from orders_pipeline.postgres_patterns.views import refresh_view
from orders_pipeline.resources import PostgresResource

_FRESHNESS = """Promotion adds every inserted order to the rollup table behind it in the same
transaction, so a refresh costs time in proportion to the rollup, not to `orders`. Refreshed
by every ingest run, and (automation condition `eager`) after any other run that promoted.
Freshness warns after an hour without a refresh and fails after a day, as `promoted_orders`."""
# Refreshed after any update of their upstream that did not refresh them in the same run.
_REFRESHED = dg.AutomationCondition.eager()


def _refresh(context: dg.AssetExecutionContext, postgres: PostgresResource,
             view: str) -> dg.MaterializeResult:
    with postgres.connection() as conn:
        elapsed = refresh_view(conn, view)
    rows = table_rows(postgres, view)
    context.log.info(f"refreshed {view} concurrently in {elapsed:.2f}s ({rows} rows)")
    return dg.MaterializeResult(metadata={"dagster/row_count": rows,
                                          "refresh_seconds": seconds(elapsed)})


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"postgres"},
    deps=[PROMOTED_ORDERS, SALES_HOURLY_ROLLUP],
    retry_policy=RETRY,
    automation_condition=_REFRESHED,
    freshness_policy=INGEST_FRESHNESS,
    description=f"""
**Hourly sales by category**: the materialized view `sales_hourly`
(hour in UTC, category, order_count, units_sold, revenue_usd) of the orders in `orders`,
kept in the rollup table `sales_hourly_rollup`.

Refreshed with `REFRESH MATERIALIZED VIEW CONCURRENTLY` (unique index on hour, category), so
dashboards reading it are never blocked. {_FRESHNESS}
""",
    metadata={"dagster/table_name": "sales_hourly",
              "dagster/column_schema": SALES_HOURLY_SCHEMA},
)
@retried_only_if_transient
def sales_hourly(context: dg.AssetExecutionContext,
                 postgres: PostgresResource) -> dg.MaterializeResult:
    return _refresh(context, postgres, "sales_hourly")


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"postgres"},
    deps=[PROMOTED_ORDERS, PRODUCT_DAILY_ROLLUP],
    retry_policy=RETRY,
    automation_condition=_REFRESHED,
    freshness_policy=INGEST_FRESHNESS,
    description=f"""
**Daily performance per product**: the materialized view `product_performance_daily`
(day in UTC, product_id, order_count, units_sold, revenue_usd) of the orders in `orders`,
kept in the rollup table `product_daily_rollup`.

Refreshed with `REFRESH MATERIALIZED VIEW CONCURRENTLY` (unique index on day, product_id).
{_FRESHNESS}
""",
    metadata={"dagster/table_name": "product_performance_daily",
              "dagster/column_schema": PRODUCT_DAILY_SCHEMA},
)
@retried_only_if_transient
def product_performance_daily(context: dg.AssetExecutionContext,
                              postgres: PostgresResource) -> dg.MaterializeResult:
    return _refresh(context, postgres, "product_performance_daily")
