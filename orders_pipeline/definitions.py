"""The Dagster code location that `dagster dev`, `dg` and `dagster asset materialize -m` load.

One module per area under `orders_pipeline.assets`; the sensors that launch runs are in
`orders_pipeline.sensors`. Descriptions and Redis URIs show the key prefix of this environment.
"""

import dagster as dg

from orders_pipeline.assets import checks, fanout, lookup, orders, queue, replay, views
from orders_pipeline.assets.backup import backup_job
from orders_pipeline.assets.catalog import rendered
from orders_pipeline.assets.redrive import redrive_rejected_job
from orders_pipeline.assets.retention import retention_job
from orders_pipeline.executors import executor_from_env
from orders_pipeline.jobs import ingest_orders_job
from orders_pipeline.resources import resources_from_env
from orders_pipeline.sensors import (
    automation_condition_sensor,
    completion_signal_sensor,
    lookup_sources_sensor,
)
from orders_pipeline.settings import RedisSettings, load_env_file

load_env_file()

defs = dg.Definitions(
    assets=dg.map_asset_specs(rendered(RedisSettings.from_env()), [
        queue.INGESTION_QUEUE,  # external: producers fill it
        *lookup.LOOKUP_TABLE_SPECS, lookup.lookup_cache,  # external tables, their Redis snapshot
        orders.staged_orders, orders.promoted_orders,  # with orders_rejected and the rollups
        views.sales_hourly, views.product_performance_daily,
        replay.replayed_orders,  # a day of the raw archive run through again
        fanout.PROMOTED_STREAM,  # external: the relay writes it, consumer groups read it
    ]),
    asset_checks=[queue.MONITOR.checks, fanout.promoted_orders_relayed,
                  *dg.load_asset_checks_from_modules([checks])],
    jobs=[ingest_orders_job, redrive_rejected_job, backup_job, retention_job],
    sensors=[completion_signal_sensor, queue.MONITOR.sensor, lookup_sources_sensor,
             automation_condition_sensor, fanout.promoted_stream_observation_sensor],
    resources=resources_from_env(),
    # DAGSTER_EXECUTOR: in_process (default; one process per run, no per-step start-up, and
    # `staged_orders` starts its N worker processes in one drain step), multiprocess, or
    # celery (one drain step per worker, placed on any Celery worker): see `executors`.
    executor=executor_from_env(),
)
