"""Keep the lookup snapshot and the dashboard views fresh without any signal."""

import dagster as dg

from orders_pipeline.jobs import refresh_lookup_cache_job, refresh_views_job

lookup_cache_daily = dg.ScheduleDefinition(
    name="lookup_cache_daily",
    job=refresh_lookup_cache_job,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Reload products, currency rates and zip codes into Redis every day at 03:00.",
)

views_hourly = dg.ScheduleDefinition(
    name="views_hourly",
    job=refresh_views_job,
    cron_schedule="5 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Refresh `sales_hourly` and `product_performance_daily` every hour.",
)
