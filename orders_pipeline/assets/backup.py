"""The `backup` job: the first half of the restore drill, from the launchpad.

It runs `orders_pipeline.backup.backup` (the same as `orders-pipeline backup DIR`) into the
directory of its config (launchpad `ops: write_backup: config: {directory: /backups/2026-12}`),
a new or empty directory on the host that runs the step. The step's output metadata says what
the backup holds (file sizes, Redis keys, queued orders and batches, orders and ledger
batches, the instant of the Redis snapshot, how long staging and promotion waited). Restore it
onto empty servers with `orders-pipeline restore DIR` (README, "Restore drill").
"""

import time
from pathlib import Path

import dagster as dg
from pydantic import Field

from orders_pipeline.assets.common import (
    RETRY,
    permanent_failure,
    retried_only_if_transient,
    seconds,
)
from orders_pipeline.backup import (
    POSTGRES_FILE,
    REDIS_FILE,
    BackupError,
    LedgerBusy,
    Manifest,
    backup,
)
from orders_pipeline.jobs import RUN_KIND_TAG
from orders_pipeline.resources import (
    PipelineResource,
    PostgresResource,
    RedisResource,
    pipeline_settings,
)


class BackupConfig(dg.Config):
    """Where the backup goes."""

    directory: str = Field(
        description="A new or empty directory on the host that runs the step, e.g. "
                    "/backups/orders/2026-12; manifest.json is written into it last")


def backup_metadata(manifest: Manifest, directory: Path
                    ) -> dict[str, dg.MetadataValue | int | str]:
    """What a backup holds, for the step's output metadata."""
    rd, pg = manifest.redis, manifest.postgres
    return {
        "directory": dg.MetadataValue.path(str(directory)),
        "redis_snapshot_at": rd.snapshot_at.isoformat(),
        "postgres_dump_bytes": manifest.files[POSTGRES_FILE].bytes,
        "redis_keys_bytes": manifest.files[REDIS_FILE].bytes,
        "redis_keys": rd.keys,
        "redis_keys_by_family": dg.MetadataValue.json(rd.keys_by_family),
        "queued_orders": rd.queued_orders,
        "claimed_batches": rd.claimed_batches,
        "staged_batches": rd.staged_batches,
        "quarantined_batches": rd.quarantined_batches,
        "batch_orders": rd.batch_orders,
        "accepted": rd.accepted,
        "orders": pg.orders,
        "rejected": pg.rejected,
        "ledger_batches": dg.MetadataValue.json(pg.ledger),
        "ledger_paused_seconds": seconds(pg.ledger_paused_seconds),
        "seconds": seconds(manifest.seconds),
    }


@dg.op(
    name="write_backup",
    out=dg.Out(dg.Nothing),
    retry_policy=RETRY,
    description="""
Backs up Postgres (pg_dump, custom format) and the Redis keys of this deployment's prefix into
the config's directory, Redis first and the database as of that moment, so that a restore
plus reconciliation brings every order accepted before the Redis snapshot into `orders`
exactly once. Staging and promotion wait only while the queue state is copied.
""",
)
@retried_only_if_transient
def backup_op(context: dg.OpExecutionContext, config: BackupConfig, redis: RedisResource,
              postgres: PostgresResource, pipeline: PipelineResource) -> None:
    directory = Path(config.directory)
    started = time.perf_counter()
    try:
        manifest = backup(pipeline_settings(redis, postgres, pipeline), directory)
    except LedgerBusy:
        raise  # a long transaction held the ledger: the RetryPolicy tries again
    except BackupError as exc:
        raise permanent_failure("backup", str(exc), error_type=type(exc).__name__) from exc
    context.log.info(
        f"backed up {manifest.postgres.orders} orders and {manifest.redis.keys} Redis keys "
        f"({manifest.redis.queued_orders} queued orders, {manifest.redis.batch_orders} in "
        f"batches) into {directory} in {time.perf_counter() - started:.2f} s; Redis snapshot "
        f"at {manifest.redis.snapshot_at.isoformat()}: orders pushed after it may be missing")
    context.add_output_metadata(backup_metadata(manifest, directory))


@dg.job(
    name="backup",
    tags={RUN_KIND_TAG: "backup"},
    description="Back up Postgres and this prefix's Redis keys into a new directory (config: "
                "directory); restore with `orders-pipeline restore DIR`.",
)
def backup_job() -> None:
    backup_op()
