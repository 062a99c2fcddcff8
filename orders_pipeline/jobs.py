"""The ingest job the completion signal sensor launches."""

import dagster as dg

from orders_pipeline.assets.orders import promoted_orders, staged_orders
from orders_pipeline.assets.views import product_performance_daily, sales_hourly

RUN_KIND_TAG = "orders_pipeline/run"

# Staging (with its rejects), promotion (with the rollups) and the views, in one run: the
# views' `eager` condition sees them refreshed by the run that promoted and adds no run.
ingest_orders_job = dg.define_asset_job(
    "ingest_orders",
    selection=dg.AssetSelection.assets(staged_orders, promoted_orders, sales_hourly,
                                       product_performance_daily),
    description="Drain the queue into staging, promote into `orders`, refresh the views.",
    tags={RUN_KIND_TAG: "ingest"},
)
