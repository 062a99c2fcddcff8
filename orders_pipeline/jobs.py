"""Asset jobs launched by the sensor and the schedules."""

import dagster as dg

from orders_pipeline.assets.lookup import lookup_cache
from orders_pipeline.assets.orders import promoted_orders, staged_orders
from orders_pipeline.assets.views import product_performance_daily, sales_hourly

RUN_KIND_TAG = "orders_pipeline/run"

ingest_orders_job = dg.define_asset_job(
    "ingest_orders",
    selection=dg.AssetSelection.assets(staged_orders, promoted_orders, sales_hourly,
                                       product_performance_daily),
    description="Drain the queue into staging, promote into `orders`, refresh the views.",
    tags={RUN_KIND_TAG: "ingest"},
)

refresh_lookup_cache_job = dg.define_asset_job(
    "refresh_lookup_cache",
    selection=dg.AssetSelection.assets(lookup_cache),
    description="Reload the lookup snapshot from Postgres into Redis.",
)

refresh_views_job = dg.define_asset_job(
    "refresh_views",
    selection=dg.AssetSelection.assets(sales_hourly, product_performance_daily),
    description="Refresh the dashboard views concurrently.",
)
