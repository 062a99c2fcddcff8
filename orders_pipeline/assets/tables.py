"""Column schemas of the Postgres tables behind the assets, for the Dagster catalog."""

import dagster as dg

from orders_pipeline import contract
from orders_pipeline.assets.catalog import markdown_safe

_ORDER_COLUMNS = [
    *(dg.TableColumn(name, contract.PG_TYPES[name],
                     description=markdown_safe(contract.DESCRIPTIONS[name]))
      for name in contract.ORDER_COLUMNS),
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
    dg.TableColumn("units_sold", "numeric(38,0)"),
    dg.TableColumn("revenue_usd", "numeric(38,2)"),
])
PRODUCT_DAILY_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("day", "date", description="UTC day"),
    dg.TableColumn("product_id", "text"),
    dg.TableColumn("order_count", "bigint"),
    dg.TableColumn("units_sold", "numeric(38,0)"),
    dg.TableColumn("revenue_usd", "numeric(38,2)"),
])
REJECTED_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("batch_id", "text", description="the queue batch it came in"),
    dg.TableColumn("batch_position", "integer", description="its place in that batch"),
    dg.TableColumn("raw_payload", "bytea",
                   description="exactly as received, even when not UTF-8 or JSON"),
    dg.TableColumn("reason", "text", description="why the order contract refused it"),
    dg.TableColumn("order_id", "text", description="when one could be read"),
    dg.TableColumn("rejected_at", "timestamptz"),
])
PRODUCTS_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("product_id", "text", description="primary key"),
    dg.TableColumn("name", "text"),
    dg.TableColumn("category", "text"),
    dg.TableColumn("base_price", "numeric(12,2)"),
])
CURRENCIES_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("currency_code", "char(3)", description="ISO 4217, primary key"),
    dg.TableColumn("name", "text"),
    dg.TableColumn("rate_to_usd", "numeric(12,8)",
                   description="USD value of one unit of the currency"),
])
ZIP_CODES_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("zip_code", "text", description="primary key"),
    dg.TableColumn("city", "text"),
    dg.TableColumn("state", "char(2)"),
    dg.TableColumn("region", "text"),
    dg.TableColumn("shipping_zone", "smallint"),
])
