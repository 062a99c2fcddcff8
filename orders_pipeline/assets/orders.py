import time

import dagster as dg
from psycopg import sql

from orders_pipeline import pipeline
from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.assets.lookup import RETRY, lookup_cache
from orders_pipeline.assets.tables import ORDERS_SCHEMA, STAGING_SCHEMA
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.resources import PostgresResource, RedisResource, pipeline_settings
from orders_pipeline.settings import PipelineSettings
from orders_pipeline.worker import BatchReport


class StagingConfig(dg.Config):
    """How the queue is drained; defaults come from WORKER_COUNT and BATCH_SIZE."""

    workers: int = PipelineSettings.from_env().worker_count
    batch_size: int = PipelineSettings.from_env().batch_size
    max_batches_per_worker: int | None = None


def table_rows(postgres: PostgresResource, table: str) -> int:
    """Exact row count of one of the pipeline's own tables (for `dagster/row_count`)."""
    with postgres.connection() as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        return int(row.fetchone()[0])


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"redis", "polars", "postgres"},
    deps=[lookup_cache],
    retry_policy=RETRY,
    pool="orders_staging",
    description="""
**Orders staged in Postgres**: the Redis list `{P}:ingestion` drained into the UNLOGGED
table `orders_staging` by N worker processes.

Each worker claims whole batches under a lease, parses and validates them with Polars,
enriches them from the `lookup_cache` snapshot, drops duplicates seen within
`DEDUP_WINDOW_SECONDS`, and COPYs the rest into staging; bad payloads go to
`orders_rejected` with a reason. A batch stays in Redis until promotion. Materialized by the
`completion_signal_sensor` for every completion signal, or by hand.
""",
    metadata={"dagster/table_name": "orders_staging", "dagster/column_schema": STAGING_SCHEMA},
)
def staged_orders(context: dg.AssetExecutionContext, config: StagingConfig,
                  redis: RedisResource, postgres: PostgresResource) -> dg.MaterializeResult:
    settings = pipeline_settings(redis, postgres, batch_size=config.batch_size,
                                 worker_count=config.workers)
    queue = OrderQueue(redis.client(), redis.key_space())
    depth_before = queue.depth()
    context.log.info(f"draining {depth_before} queued orders with {config.workers} worker(s), "
                     f"batches of {config.batch_size}")

    def log_batch(report: BatchReport) -> None:
        context.log.info(report.line())

    stats = pipeline.stage_queue(settings, workers=config.workers, batch_size=config.batch_size,
                                 max_batches=config.max_batches_per_worker, on_batch=log_batch)
    claimed = stats.claimed or 1
    return dg.MaterializeResult(metadata={
        "rows_claimed": stats.claimed,
        "rows_staged": stats.staged,
        "duplicates_dropped": stats.duplicates,
        "rows_rejected": stats.rejected,
        "rejected_rate": stats.rejected / claimed,
        "batches": stats.batches,
        "batches_reclaimed": stats.reclaimed_batches,
        "workers": config.workers,
        "seconds": stats.seconds,
        "rows_per_second": stats.rows_per_second,
        "queue_depth_before": depth_before,
        "queue_depth_after": queue.depth(),
        "dagster/row_count": table_rows(postgres, "orders_staging"),
    })


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"postgres", "redis"},
    deps=[staged_orders],
    retry_policy=RETRY,
    description="""
**Orders**: `orders_staging` validated and promoted into the table `orders` (primary key
`order_id`, indexed by `order_timestamp`).

Whole batches move in one transaction under an advisory lock, with
`ON CONFLICT (order_id) DO NOTHING`, deleting exactly the staging rows they took; then the
batches are released from Redis. Batches whose staged rows a Postgres crash erased are sent
back to the queue. Re-running it changes nothing already done.
""",
    metadata={"dagster/table_name": "orders", "dagster/column_schema": ORDERS_SCHEMA},
)
def promoted_orders(context: dg.AssetExecutionContext, redis: RedisResource,
                    postgres: PostgresResource) -> dg.MaterializeResult:
    settings = pipeline_settings(redis, postgres)
    started = time.perf_counter()
    result = pipeline.promote_staged(settings)
    seconds = time.perf_counter() - started
    context.log.info(
        f"promoted {len(result.promoted_batches)} batches: {result.inserted_rows} rows inserted, "
        f"{result.conflicts} already present, {len(result.lost_batches)} lost batches requeued")
    return dg.MaterializeResult(metadata={
        "rows_promoted": result.inserted_rows,
        "rows_staged_in": result.staged_rows,
        "conflicts": result.conflicts,
        "batches_promoted": len(result.promoted_batches),
        "batches_requeued": len(result.lost_batches),
        "seconds": seconds,
        "rows_per_second": result.inserted_rows / seconds if seconds else 0.0,
        "queue_depth_after": OrderQueue(redis.client(), redis.key_space()).depth(),
        "dagster/row_count": table_rows(postgres, "orders"),
    })
