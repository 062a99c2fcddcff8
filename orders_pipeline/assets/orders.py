"""The orders area: staging (with its rejects) and promotion (with the view rollups)."""

import time
from datetime import timedelta
from typing import Any

import dagster as dg
import pydantic
from psycopg import sql
from pydantic_core import ErrorDetails

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.assets.common import (
    RETRY,
    per_second,
    permanent_failure,
    rate,
    retried_only_if_transient,
    seconds,
)
from orders_pipeline.assets.lookup import lookup_cache
from orders_pipeline.assets.queue import INGESTION_QUEUE
from orders_pipeline.assets.tables import (
    ORDERS_SCHEMA,
    PRODUCT_DAILY_SCHEMA,
    REJECTED_SCHEMA,
    SALES_HOURLY_SCHEMA,
    STAGING_SCHEMA,
)
from orders_pipeline.pipeline import promote_staged, stage_queue
from orders_pipeline.postgres_patterns.schema import require_schema
from orders_pipeline.redis_patterns.lookup_cache import LookupCache, LookupCacheMissing
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.resources import (
    PipelineResource,
    PostgresResource,
    RedisResource,
    pipeline_settings,
)
from orders_pipeline.settings import BATCH_SIZE, BATCHES_PER_WORKER, WORKERS, Bound
from orders_pipeline.worker import BatchReport


def _bounded(bound: Bound, description: str) -> Any:
    """An optional config field within `bound`; unset (None) means the default `description`
    names, resolved when the run starts, never when this module is imported."""
    return pydantic.Field(default=None, ge=bound.minimum, le=bound.maximum,
                          description=f"{description}. Allowed: {bound.span()}.")


class StagingConfig(dg.Config):
    """How the queue is drained (launchpad: `ops: staged_orders: config:`).

    A value out of range fails the step at once with a `dg.Failure` that names the field, the
    value and the range, and that no retry repeats.
    """

    workers: int | None = _bounded(
        WORKERS, "Staging worker processes; unset: WORKER_COUNT; 1 drains in the step's process")
    batch_size: int | None = _bounded(BATCH_SIZE, "Orders claimed per batch; unset: BATCH_SIZE")
    max_batches_per_worker: int | None = _bounded(
        BATCHES_PER_WORKER, "Batches each worker processes before it stops; unset: until the "
                            "queue is empty")

    @pydantic.model_validator(mode="wrap")
    @classmethod
    def _refused_for_good(cls, data: Any,
                          handler: pydantic.ModelWrapValidatorHandler["StagingConfig"]
                          ) -> "StagingConfig":
        # Dagster builds the config inside the step, where a ValidationError would be retried
        # like any error of the asset's body: refuse it as a permanent failure instead.
        try:
            return handler(data)
        except pydantic.ValidationError as exc:
            raise permanent_failure(
                "staged_orders", "bad config: " + "; ".join(cls._refusal(e) for e in exc.errors()),
                error_type="config") from exc

    @classmethod
    def _refusal(cls, error: ErrorDetails) -> str:
        """One field's refusal, worded like the env vars' and CLI flags' (range included)."""
        name = ".".join(str(part) for part in error["loc"]) or "config"
        field = cls.model_fields.get(name)
        limits = {type(m).__name__: m for m in field.metadata} if field else {}
        if "Ge" in limits and "Le" in limits:
            return Bound(limits["Ge"].ge, limits["Le"].le).refusal(name, error["input"])
        return f"{name}: {error['msg']}, got {error['input']!r}"


def table_rows(postgres: PostgresResource, table: str) -> int:
    """Exact row count of one of the pipeline's own tables (for `dagster/row_count`)."""
    with postgres.connection() as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        return int(row.fetchone()[0])


# Promotion runs for every burst of completion signals; an hour without one is worth a look
# (little traffic, or the queue stalled: `orders_wait_within_limit` tells which), a day is not
# fresh. The views are refreshed with every promotion, so they share the policy.
INGEST_FRESHNESS = dg.FreshnessPolicy.time_window(warn_window=timedelta(hours=1),
                                                  fail_window=timedelta(hours=24))

STAGED_ORDERS = dg.AssetSpec(
    "staged_orders",
    group_name=GROUP,
    owners=OWNERS,
    kinds={"redis", "polars", "postgres"},
    deps=[INGESTION_QUEUE, lookup_cache],
    description="""
**Orders staged in Postgres**: the Redis list `{P}:ingestion` drained into the UNLOGGED
table `orders_staging` by N worker processes.

Each worker claims whole batches under a lease, parses and validates them with Polars,
enriches them from the `lookup_cache` snapshot, drops duplicates seen within
`DEDUP_WINDOW_SECONDS`, and COPYs the rest into staging; bad payloads go to
`orders_rejected` with a reason. A batch stays in Redis until promotion. Materialized by the
`completion_signal_sensor` for every completion signal, or by hand. Its row count is the
number of rows this run staged: promotion empties the table again.
""",
    metadata={"dagster/table_name": "orders_staging", "dagster/column_schema": STAGING_SCHEMA},
)
ORDERS_REJECTED = dg.AssetSpec(
    "orders_rejected",
    group_name=GROUP,
    owners=OWNERS,
    kinds={"postgres"},
    deps=[INGESTION_QUEUE, lookup_cache],
    description="""
**Rejected orders**: every payload the order contract refused (bad JSON, a missing or
mistyped field, an unknown product, currency or zip code, a value out of range), one row each
in the table `orders_rejected` with the raw payload exactly as received and the reason.
Written by the same step as `staged_orders`, in the same transaction as the batch's staged
rows. Rejects are never retried by the pipeline: fix the producer and send them again.
""",
    metadata={"dagster/table_name": "orders_rejected",
              "dagster/column_schema": REJECTED_SCHEMA},
)


@dg.multi_asset(
    name="staged_orders",
    specs=[STAGED_ORDERS, ORDERS_REJECTED],
    retry_policy=RETRY,
    pool="orders_staging",
)
@retried_only_if_transient
def staged_orders(context: dg.AssetExecutionContext, config: StagingConfig,
                  redis: RedisResource, postgres: PostgresResource, pipeline: PipelineResource
                  ) -> tuple[dg.MaterializeResult, dg.MaterializeResult]:
    settings = pipeline_settings(redis, postgres, pipeline, batch_size=config.batch_size,
                                 worker_count=config.workers)
    workers, batch_size = settings.pipeline.worker_count, settings.pipeline.batch_size
    # What no worker could get past fails here, once, before any worker starts.
    cache = LookupCache(redis.client(), redis.key_space(), settings.pipeline.lookup_ttl_seconds)
    with postgres.connection() as conn:
        require_schema(conn)
        cache.ensure_loaded(conn)
    if not cache.is_loaded():
        raise LookupCacheMissing("a lookup table is empty in Postgres, so the snapshot cannot be "
                                 "loaded; seed products, currencies and zip_codes")
    queue = OrderQueue(redis.client(), redis.key_space())
    depth_before = queue.depth()
    context.log.info(f"draining {depth_before} queued orders with {workers} worker(s), "
                     f"batches of {batch_size}")

    def log_batch(report: BatchReport) -> None:
        context.log.info(report.line())

    stats = stage_queue(settings, workers=workers, batch_size=batch_size,
                        max_batches=config.max_batches_per_worker, on_batch=log_batch)
    depth_after = queue.depth()
    if depth_before and not stats.claimed and depth_after >= depth_before:
        raise permanent_failure(
            "staged_orders", f"claimed nothing while {depth_after} orders wait (workers={workers}, "
            f"batch_size={batch_size}, max_batches_per_worker={config.max_batches_per_worker})",
            queue_depth=depth_after)
    rejected_rate = rate(stats.rejected / stats.claimed if stats.claimed else 0.0)
    return (
        dg.MaterializeResult(asset_key=STAGED_ORDERS.key, metadata={
            "dagster/row_count": stats.staged,
            "rows_claimed": stats.claimed,
            "rows_staged": stats.staged,
            "duplicates_dropped": stats.duplicates,
            "rows_rejected": stats.rejected,
            "rejected_rate": rejected_rate,
            "batches": stats.batches,
            "batches_reclaimed": stats.reclaimed_batches,
            "workers": workers,
            "seconds": seconds(stats.seconds),
            "rows_per_second": per_second(stats.claimed, stats.seconds),
            "queue_depth_before": depth_before,
            "queue_depth_after": depth_after,
        }),
        dg.MaterializeResult(asset_key=ORDERS_REJECTED.key, metadata={
            "dagster/row_count": table_rows(postgres, "orders_rejected"),
            "rows_rejected": stats.rejected,
            "rejected_rate": rejected_rate,
        }),
    )


def _rollup(name: str, view: str, schema: dg.TableSchema, grain: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        name, group_name=GROUP, owners=OWNERS, kinds={"postgres"},
        deps=[STAGED_ORDERS],
        description=f"""
**Rollup of `orders` by {grain}**: the table `{name}` that promotion adds every inserted
order to, in the same transaction as the insert, so it is never behind `orders`. The
materialized view `{view}` reads it; refreshing the view costs time in proportion to the
rollup, not to `orders`.
""",
        metadata={"dagster/table_name": name, "dagster/column_schema": schema})


PROMOTED_ORDERS = dg.AssetSpec(
    "promoted_orders",
    group_name=GROUP,
    owners=OWNERS,
    kinds={"postgres", "redis"},
    deps=[STAGED_ORDERS],
    freshness_policy=INGEST_FRESHNESS,
    description="""
**Orders**: `orders_staging` validated and promoted into the table `orders` (primary key
`order_id`, indexed by `order_timestamp`).

Whole batches move in one transaction under an advisory lock, with
`ON CONFLICT (order_id) DO NOTHING`, deleting exactly the staging rows they took and adding
the inserted orders to the rollups; then the batches are released from Redis. Batches whose
staged rows a Postgres crash erased are sent back to the queue. A poison batch (its promotion
fails for a reason retrying cannot fix) is quarantined with its error and raw payloads, and
the others are promoted: see the check `no_quarantined_batches` and `orders-pipeline
readmit`. Re-running it changes nothing already done. Freshness warns after an hour without a
promotion and fails after a day. Last, the relay publishes the promoted orders (listed in the
outbox `promoted_outbox` by the same transaction) to the stream `promoted_stream` for the
consumer groups (metadata `entries_published`).
""",
    metadata={"dagster/table_name": "orders", "dagster/column_schema": ORDERS_SCHEMA},
)
SALES_HOURLY_ROLLUP = _rollup("sales_hourly_rollup", "sales_hourly", SALES_HOURLY_SCHEMA,
                              "hour and category")
PRODUCT_DAILY_ROLLUP = _rollup("product_daily_rollup", "product_performance_daily",
                               PRODUCT_DAILY_SCHEMA, "day and product")


@dg.multi_asset(
    name="promoted_orders",
    specs=[PROMOTED_ORDERS, SALES_HOURLY_ROLLUP, PRODUCT_DAILY_ROLLUP],
    retry_policy=RETRY,
)
@retried_only_if_transient
def promoted_orders(context: dg.AssetExecutionContext, redis: RedisResource,
                    postgres: PostgresResource, pipeline: PipelineResource
                    ) -> tuple[dg.MaterializeResult, dg.MaterializeResult, dg.MaterializeResult]:
    settings = pipeline_settings(redis, postgres, pipeline)
    started = time.perf_counter()
    result = promote_staged(settings)
    elapsed = time.perf_counter() - started
    context.log.info(
        f"promoted {len(result.promoted_batches)} batches: {result.inserted_rows} rows inserted, "
        f"{result.conflicts} already present, {len(result.lost_batches)} lost batches requeued, "
        f"{len(result.quarantined)} batches quarantined")
    for batch in result.quarantined:
        context.log.warning(
            f"batch {batch.batch_id} quarantined with {batch.orders} orders "
            f"({batch.payloads} raw payloads kept): {batch.error}; fix the cause, then run "
            f"`orders-pipeline readmit {batch.batch_id}`")
    return (
        dg.MaterializeResult(asset_key=PROMOTED_ORDERS.key, metadata={
            "dagster/row_count": table_rows(postgres, "orders"),
            "rows_promoted": result.inserted_rows,
            "rows_staged_in": result.staged_rows,
            "conflicts": result.conflicts,
            "batches_promoted": len(result.promoted_batches),
            "batches_requeued": len(result.lost_batches),
            "batches_quarantined": len(result.quarantined),
            "rows_quarantined": sum(batch.orders for batch in result.quarantined),
            "seconds": seconds(elapsed),
            "rows_per_second": per_second(result.inserted_rows, elapsed),
            "queue_depth_after": OrderQueue(redis.client(), redis.key_space()).depth(),
            "entries_published": result.entries_published,
        }),
        _rollup_rows(postgres, SALES_HOURLY_ROLLUP),
        _rollup_rows(postgres, PRODUCT_DAILY_ROLLUP),
    )


def _rollup_rows(postgres: PostgresResource, rollup: dg.AssetSpec) -> dg.MaterializeResult:
    return dg.MaterializeResult(asset_key=rollup.key, metadata={
        "dagster/row_count": table_rows(postgres, rollup.key.to_user_string())})
