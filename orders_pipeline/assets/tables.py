"""Column schemas of the Postgres tables behind the assets, for the Dagster catalog."""

import dagster as dg

from orders_pipeline import contract

_ORDER_COLUMNS = [
    *(dg.TableColumn(name, contract.PG_TYPES[name], description=contract.DESCRIPTIONS[name])
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
