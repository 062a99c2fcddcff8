"""The replay area: a day of archived batches run through the pipeline again.

`replayed_orders` is partitioned by UTC day. Materializing a partition, or backfilling a
range of them, replays the promoted batches archived that day from their raw bytes
(`pipeline.replay_window`, as `orders-pipeline replay --from <day> --to <next day>`): staged,
promoted and the views refreshed, in the step. Launchpad config `reprocess: true` recomputes
the stored values of that day's orders with the current transform and lookup snapshot.
"""

import time

import dagster as dg
from pydantic import Field

from orders_pipeline.assets import OWNERS
from orders_pipeline.assets.common import (
    RETRY,
    permanent_failure,
    retried_only_if_transient,
    seconds,
)
from orders_pipeline.assets.orders import STAGED_ORDERS
from orders_pipeline.pipeline import replay_window
from orders_pipeline.postgres_patterns.replay import ArchiveMissing, ReplayRefused, Window
from orders_pipeline.resources import (
    PipelineResource,
    PostgresResource,
    RedisResource,
    pipeline_settings,
)

# One partition per UTC day, today's included (a replay of the day so far); days before the
# archive began, or dropped by RAW_RETENTION_DAYS, replay nothing.
REPLAY_PARTITIONS = dg.DailyPartitionsDefinition(start_date="2025-01-01", end_offset=1)
# A group of its own: "Materialize all" of the `orders_pipeline` group never replays days.
REPLAY_GROUP = "replay"


class ReplayConfig(dg.Config):
    """How the day is replayed (launchpad: `ops: replayed_orders: config:`)."""

    reprocess: bool = Field(
        default=False,
        description="Recompute the day's orders from their raw bytes with the current "
                    "transform and lookup snapshot (after a fix: a transform bug, a corrected "
                    "currency rate), replacing their stored values and correcting the views. "
                    "False: a plain replay, which changes nothing already in `orders`.")


@dg.asset(
    name="replayed_orders",
    group_name=REPLAY_GROUP,
    owners=OWNERS,
    kinds={"postgres", "redis"},
    deps=[STAGED_ORDERS],
    partitions_def=REPLAY_PARTITIONS,
    retry_policy=RETRY,
    pool="orders_staging",
    description="""
**A day of orders replayed from the raw archive**: every claimed batch's raw payloads are
kept in the table `raw_batches` (compressed, one partition per UTC day, RAW_RETENTION_DAYS),
written by `staged_orders` in its staging transaction. Materializing a day (or backfilling a
range of days) runs that day's promoted batches through the pipeline again, byte for byte,
under replay batch ids of their own: staged, promoted into `orders` and the rollups, views
refreshed. A plain replay changes nothing already stored and brings in what is missing;
config `reprocess: true` replaces the stored values of the day's orders by those recomputed
with the current transform and lookup snapshot, and moves the rollups by exactly the
difference (`reprocessed_orders` keeps the values replaced). A run that died is resumed by
materializing the day again.
""",
    metadata={"dagster/table_name": "raw_batches"},
)
@retried_only_if_transient
def replayed_orders(context: dg.AssetExecutionContext, config: ReplayConfig,
                    redis: RedisResource, postgres: PostgresResource,
                    pipeline: PipelineResource) -> dg.MaterializeResult:
    day = context.partition_time_window
    started = time.perf_counter()
    try:
        result = replay_window(pipeline_settings(redis, postgres, pipeline),
                               Window(day.start, day.end), reprocess=config.reprocess)
    except (ReplayRefused, ArchiveMissing) as exc:
        raise permanent_failure("replayed_orders", str(exc),
                                error_type=type(exc).__name__) from exc
    elapsed = time.perf_counter() - started
    found, done = result.contents, result.outcome
    context.log.info(
        f"{context.partition_key}: {found.batches} batches archived ({found.orders} orders), "
        f"{found.replayable_batches} promoted; "
        + (f"{'reprocessed' if config.reprocess else 'replayed'} as {result.replay_id}: "
           f"{done.promoted_batches} batches promoted, {done.changed} order rows changed"
           if done else "nothing to replay")
        + (f"; finished {len(result.resumed)} pending batches of an interrupted replay"
           if result.resumed else ""))
    return dg.MaterializeResult(metadata={
        "replay_id": result.replay_id or "-",
        "reprocess": dg.MetadataValue.bool(config.reprocess),
        "resumed_request": dg.MetadataValue.bool(result.resumed_request),
        "archived_batches": found.batches,
        "archived_orders": found.orders,
        "archived_bytes": found.stored_bytes,
        "raw_bytes": found.raw_bytes,
        "batches": done.batches if done else 0,
        "orders": done.orders if done else 0,
        "batches_promoted": done.promoted_batches if done else 0,
        "batches_quarantined": done.quarantined_batches if done else 0,
        "reprocessed": done.promoted_orders if done and done.reprocess else 0,
        "changed_rows": done.changed if done else 0,
        "rejected": done.rejected if done else 0,
        "resumed_batches": len(result.resumed),
        "seconds": seconds(elapsed),
    })
