"""Column schemas of the Postgres tables behind the assets, for the Dagster catalog."""

import dagster as dg

_ORDER_COLUMNS = [
    dg.TableColumn("order_id", "text", description="unique order id (primary key in orders)"),
    dg.TableColumn("customer_id", "bigint"),
    dg.TableColumn("product_id", "text"),
    dg.TableColumn("quantity", "integer", description="> 0"),
    dg.TableColumn("unit_price", "numeric(18,4)", description="in `currency`"),
    dg.TableColumn("currency", "text", description="ISO 4217"),
    dg.TableColumn("zip_code", "text"),
    dg.TableColumn("order_timestamp", "timestamptz", description="UTC"),
    dg.TableColumn("total_amount", "numeric(24,4)", description="unit_price x quantity"),
    dg.TableColumn("total_amount_usd", "numeric(22,2)",
                   description="round(total_amount x rate_to_usd, 2)"),
    dg.TableColumn("category", "text"),
    dg.TableColumn("region", "text"),
    dg.TableColumn("shipping_zone", "smallint"),
    dg.TableColumn("batch_id", "text", description="the queue batch it came in"),
]

STAGING_SCHEMA = dg.TableSchema(columns=[
    *_ORDER_COLUMNS, dg.TableColumn("batch_position", "integer"),
    dg.TableColumn("staged_at", "timestamptz")])
ORDERS_SCHEMA = dg.TableSchema(columns=[*_ORDER_COLUMNS,
                                        dg.TableColumn("promoted_at", "timestamptz")])
SALES_HOURLY_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("hour", "timestamptz", description="UTC hour"),
    dg.TableColumn("category", "text"),
    dg.TableColumn("order_count", "bigint"),
    dg.TableColumn("units_sold", "bigint"),
    dg.TableColumn("revenue_usd", "numeric(22,2)"),
])
PRODUCT_DAILY_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("day", "date", description="UTC day"),
    dg.TableColumn("product_id", "text"),
    dg.TableColumn("order_count", "bigint"),
    dg.TableColumn("units_sold", "bigint"),
    dg.TableColumn("revenue_usd", "numeric(22,2)"),
])
