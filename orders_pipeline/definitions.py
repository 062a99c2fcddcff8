"""The Dagster code location: `dagster dev` and `dagster asset materialize -m` load `defs`."""

import dagster as dg

from orders_pipeline.assets import checks, lookup, orders, views
from orders_pipeline.jobs import ingest_orders_job, refresh_lookup_cache_job, refresh_views_job
from orders_pipeline.resources import resources_from_env
from orders_pipeline.schedules import lookup_cache_daily, views_hourly
from orders_pipeline.sensors import completion_signal_sensor
from orders_pipeline.settings import load_env_file

load_env_file()

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([lookup, orders, views]),
    asset_checks=dg.load_asset_checks_from_modules([checks]),
    jobs=[ingest_orders_job, refresh_lookup_cache_job, refresh_views_job],
    sensors=[completion_signal_sensor],
    schedules=[lookup_cache_daily, views_hourly],
    resources=resources_from_env(),
    # Worker parallelism lives inside `staged_orders` (N processes); one process per run
    # avoids paying Dagster's per-step process start-up on every asset.
    executor=dg.in_process_executor,
)
