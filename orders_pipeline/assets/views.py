import dagster as dg

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.assets.lookup import RETRY, retried_only_if_transient
from orders_pipeline.assets.orders import promoted_orders, table_rows
from orders_pipeline.assets.tables import PRODUCT_DAILY_SCHEMA, SALES_HOURLY_SCHEMA
from orders_pipeline.postgres_patterns.views import refresh_view
from orders_pipeline.resources import PostgresResource

_FRESHNESS = """Promotion adds every inserted order to the rollup table behind it in the same
transaction, so a refresh costs time in proportion to the rollup, not to `orders`. Refreshed
by every ingest run and hourly by the `views_hourly` schedule."""


def _refresh(context: dg.AssetExecutionContext, postgres: PostgresResource,
             view: str) -> dg.MaterializeResult:
    with postgres.connection() as conn:
        seconds = refresh_view(conn, view)
    rows = table_rows(postgres, view)
    context.log.info(f"refreshed {view} concurrently in {seconds:.2f}s ({rows} rows)")
    return dg.MaterializeResult(metadata={"dagster/row_count": rows, "refresh_seconds": seconds})


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"postgres"},
    deps=[promoted_orders],
    retry_policy=RETRY,
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
    deps=[promoted_orders],
    retry_policy=RETRY,
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
