"""The ingest job the completion signal sensor launches."""

import dagster as dg

from orders_pipeline.assets.checks import (
    product_performance_daily_matches_orders,
    sales_hourly_matches_orders,
)
from orders_pipeline.assets.orders import promoted_orders, staged_orders

RUN_KIND_TAG = "orders_pipeline/run"

# Staging (with its rejects) and promotion (with the rollups), in one run. The views are
# partitioned by month and a job cannot mix partitioned and unpartitioned assets, so they are
# not in it: the promotion step refreshes the months it changed and records each as a
# partition of its view. The views' checks run last, on what that refresh left.
ingest_orders_job = dg.define_asset_job(
    "ingest_orders",
    selection=dg.AssetSelection.assets(staged_orders, promoted_orders)
    | dg.AssetSelection.checks(sales_hourly_matches_orders,
                               product_performance_daily_matches_orders),
    description="Drain the queue into staging, promote into `orders`, refresh the months of "
                "the views it changed.",
    tags={RUN_KIND_TAG: "ingest"},
)
