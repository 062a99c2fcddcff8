"""COPY a transformed batch into UNLOGGED `orders_staging`, once per batch.

The batch's ledger row in `ingest_batches` is written in the same transaction as its COPY and
its rejects, and taken first with a row lock: two workers that both hold the same batch (a
slow one and the one that reclaimed it) serialise there, and only one of them stages it. The
transaction that first writes the ledger row also archives the batch's raw payloads
(`archive.archive`), so every batch the ledger knows is archived once.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

import polars as pl
import psycopg

from orders_pipeline import contract
from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns.archive import RawBatch, archive
from orders_pipeline.postgres_patterns.partitions import (
    HORIZON_REASON,
    RETENTION_LOCK,
    month_start,
)
from orders_pipeline.transform import REJECT_SCHEMA, rejects_from

STAGING_COLUMNS = ("batch_id", "batch_position", *contract.ORDER_COLUMNS)
_COPY_STAGING = f"COPY orders_staging ({', '.join(STAGING_COLUMNS)}) FROM STDIN (FORMAT csv)"

_CLAIM_LEDGER = """
INSERT INTO ingest_batches (batch_id, status, claimed_rows, staged_rows, rejected_rows,
                            duplicate_rows, shard)
VALUES (%(batch_id)s, 'staged', %(claimed)s, %(staged)s, %(rejected)s, %(duplicates)s,
        %(shard)s)
ON CONFLICT (batch_id) DO UPDATE SET attempts = ingest_batches.attempts + 1
RETURNING status, (xmax = 0) AS inserted
"""

_RESTAGE_LEDGER = """
UPDATE ingest_batches
SET status = 'staged', claimed_rows = %(claimed)s, staged_rows = %(staged)s,
    rejected_rows = %(rejected)s, duplicate_rows = %(duplicates)s, staged_at = now(),
    shard = %(shard)s
WHERE batch_id = %(batch_id)s
"""

_INSERT_REJECTS = """
INSERT INTO orders_rejected (batch_id, batch_position, raw_payload, reason, order_id)
SELECT %s, * FROM unnest(%s::integer[], %s::bytea[], %s::text[], %s::text[])
ON CONFLICT (batch_id, batch_position) DO NOTHING
"""


# The retention lock, shared (see `partitions.RETENTION_LOCK`), and the horizon under it.
_HORIZON = """
SELECT pg_advisory_xact_lock_shared(hashtext(%s)), (SELECT horizon FROM orders_retention)
"""


class StageOutcome(StrEnum):
    STAGED = "staged"
    ALREADY_STAGED = "already_staged"
    ALREADY_PROMOTED = "already_promoted"


@dataclass(frozen=True)
class StagingBatch:
    """A claimed batch ready to stage: its id, how many payloads were claimed, the transformed
    rows, the rejects, the duplicates dropped, the raw payloads to archive, and the queue
    shard it was claimed from (0 … promotion.MAX_SHARD; recorded in the ledger, so that
    `promotion.promote_round(conn, shard=...)` promotes it with its shard)."""
    batch_id: str
    claimed: int
    rows: pl.DataFrame        # columns: STAGING_COLUMNS (batch_id may be absent)
    rejects: pl.DataFrame     # columns: batch_position, raw_payload, reason, order_id
    duplicates: int
    raw: RawBatch | None = None  # the claimed payloads to archive (None: not archived)
    shard: int = 0
    # The claimed payloads by batch position: the raw bytes of rows rejected at staging
    # (dated before the retention horizon). Without them such a row keeps b"" as payload.
    payloads: Sequence[bytes] = ()


def before_horizon(rows: pl.DataFrame, payloads: Sequence[bytes], horizon: date
                   ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split transformed rows (with `batch_position`, `order_id`, `order_timestamp`) at the
    retention horizon: (the rows dated from `horizon` on, reject rows (transform's
    REJECT_SCHEMA: `partitions.HORIZON_REASON`, the raw payload by position from `payloads`
    as `transform.rejects_from` attaches it, b"" where missing) for the rows dated before it,
    whose months retention dropped)."""
    late = pl.col("order_timestamp") < pl.lit(month_start(horizon),
                                              dtype=pl.Datetime("us", "UTC"))
    expired = rows.filter(late)
    if not expired.height:
        return rows, pl.DataFrame(schema=REJECT_SCHEMA)
    reasons = expired.select("batch_position", "order_id", pl.lit(
        HORIZON_REASON.format(horizon=horizon.isoformat())).alias("reason"))
    missing = int(expired["batch_position"].max()) + 1 - len(payloads)
    return rows.filter(~late), rejects_from(reasons, [*payloads, *[b""] * missing])


def rows_to_csv(rows: pl.DataFrame, batch_id: str) -> bytes:
    """Staging rows as CSV in COPY's column order; Polars quotes commas, quotes, newlines."""
    frame = rows.with_columns(pl.lit(batch_id).alias("batch_id")).select(STAGING_COLUMNS)
    return frame.write_csv(include_header=False,
                           datetime_format="%Y-%m-%dT%H:%M:%S%.6f+00:00").encode()


def stage_batch(conn: psycopg.Connection, batch: StagingBatch) -> StageOutcome:
    """Stage a batch's rows and record its rejects, or recognise it as already done.

    Rows dated before the retention horizon (`partitions.apply_retention`) are rejected here,
    with `batch.payloads` as their raw bytes, and the ledger counts them as rejects.

    The ledger row records `batch.shard` (a batch restaged after a crash takes the shard it
    is staged with now)."""
    with conn.transaction():
        # No need to wait for the WAL flush: the batch stays in Redis until promotion, and a
        # staged batch whose ledger row a crash took back is handed to the queue again
        # (pipeline.reconcile_batches), like one whose UNLOGGED rows the crash emptied.
        conn.execute("SET LOCAL synchronous_commit = off")
        horizon = conn.execute(_HORIZON, (RETENTION_LOCK,)).fetchone()[1]
        rows, rejects = batch.rows, batch.rejects
        if horizon is not None:  # the worker checked too, against a horizon read earlier
            rows, late = before_horizon(batch.rows, batch.payloads, horizon)
            if late.height:
                rejects = pl.concat([*([rejects] if rejects.height else []), late])
        params = {"batch_id": batch.batch_id, "claimed": batch.claimed,
                  "staged": rows.height, "rejected": rejects.height,
                  "duplicates": batch.duplicates, "shard": batch.shard}
        status, inserted = conn.execute(_CLAIM_LEDGER, params).fetchone()
        if not inserted:
            if status == "promoted":
                return StageOutcome.ALREADY_PROMOTED
            if status == "staged":
                return StageOutcome.ALREADY_STAGED
            conn.execute(_RESTAGE_LEDGER, params)  # 'lost': a crash emptied staging
        elif batch.raw is not None:
            archive(conn, batch.batch_id, batch.raw)
        if rows.height:
            data = rows_to_csv(rows, batch.batch_id)
            middle = len(data) // 2
            with conn.cursor().copy(_COPY_STAGING) as copy:
                copy.write(data[:middle])
                crash_point("mid_copy")
                copy.write(data[middle:])
        if rejects.height:
            r = rejects
            conn.execute(_INSERT_REJECTS, (
                batch.batch_id, r["batch_position"].to_list(), r["raw_payload"].to_list(),
                r["reason"].to_list(), r["order_id"].to_list()))
    return StageOutcome.STAGED

