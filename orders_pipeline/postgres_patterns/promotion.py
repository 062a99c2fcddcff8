"""Promote staged batches into `orders`: idempotent, serialised, crash-aware, poison-proof.

One transaction per round, under an advisory lock so promotions started from anywhere (sensor
runs, schedules, the CLI, other hosts) never interleave. It promotes whole batches whose
ledger says `staged`, inserts with ON CONFLICT DO NOTHING, adds exactly the rows it inserted
to the view rollups and their ids to the fan-out outbox (`promoted_outbox`), deletes exactly
the rows it took (by batch id, so workers can keep staging meanwhile), and marks the batches
`promoted`. A staged batch whose rows are gone (a Postgres crash empties UNLOGGED tables) is
marked `lost` so the caller can hand it back to the queue.

A poison batch never blocks the others: when the round fails with an error that retrying
cannot fix (`is_poison`), its batches are promoted one by one, each in its own savepoint, and
a batch that fails alone is quarantined in the same transaction (ledger status, error text,
time, raw payloads; its staging rows deleted). `orders-pipeline readmit` hands it back.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from orders_pipeline import contract
from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns.replay import reprocess_staged
from orders_pipeline.postgres_patterns.views import PROMOTE_LOCK, ROLLUPS, rollup_upsert

ORDER_COLUMNS = (*contract.ORDER_COLUMNS, "batch_id")
_COLUMNS = ", ".join(ORDER_COLUMNS)
# Insert the batches' rows, fold exactly the rows inserted into the view rollups, and list
# their ids in the fan-out outbox, one row per batch (`postgres_patterns.promoted_outbox`).
_INSERT_ORDERS = f"""
WITH inserted AS (
    INSERT INTO orders ({_COLUMNS})
    SELECT {_COLUMNS} FROM orders_staging WHERE batch_id = ANY(%(batches)s)
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_id, batch_id, order_timestamp, category, product_id, quantity,
              total_amount_usd
), {", ".join(f"add_to_{rollup} AS ({rollup_upsert(rollup, 'inserted')})"
         for rollup in ROLLUPS)}, to_outbox AS (
    INSERT INTO promoted_outbox (batch_id, order_ids)
    SELECT batch_id, array_agg(order_id) FROM inserted GROUP BY batch_id
)
SELECT count(*) FROM inserted
"""


POISON_SQLSTATE_CLASSES = ("22", "23")  # data exception, integrity constraint violation
# Where the raw payloads of a batch come from (the Redis batch list), by batch id.
PayloadSource = Callable[[str], Sequence[bytes]]

_QUARANTINE_LEDGER = """
UPDATE ingest_batches SET status = 'quarantined', quarantine_error = %s, quarantined_at = now()
WHERE batch_id = %s
"""
_KEEP_PAYLOADS = """
INSERT INTO quarantined_payloads (batch_id, batch_position, raw_payload)
SELECT %s, p.n - 1, p.payload FROM unnest(%s::bytea[]) WITH ORDINALITY AS p(payload, n)
ON CONFLICT (batch_id, batch_position) DO NOTHING
"""
_QUARANTINED = """
SELECT b.batch_id, b.staged_rows,
       (SELECT count(*) FROM quarantined_payloads p WHERE p.batch_id = b.batch_id),
       b.quarantine_error, b.quarantined_at
FROM ingest_batches b
WHERE b.status = 'quarantined' AND (%(ids)s::text[] IS NULL OR b.batch_id = ANY(%(ids)s))
ORDER BY b.quarantined_at, b.batch_id
LIMIT %(limit)s
"""


class NotQuarantined(ValueError):
    """Batches asked for by id that are not quarantined; the text names them and their status."""


def is_poison(exc: psycopg.Error) -> bool:
    """True if retrying cannot fix `exc`: a data exception (SQLSTATE class 22, e.g. 22003
    numeric value out of range) or an integrity constraint violation (class 23, e.g. 23514
    check violation), both caused by the rows promoted. Connection and server failures,
    lock and serialisation failures, missing tables or columns, privileges: not poison.
    """
    return (exc.sqlstate or "")[:2] in POISON_SQLSTATE_CLASSES


def error_text(exc: psycopg.Error) -> str:
    """`SQLSTATE <code>: <primary message>` on one line (the detail, which may quote a whole
    row, is left out)."""
    message = exc.diag.message_primary or str(exc)
    return f"SQLSTATE {exc.sqlstate}: {' '.join(message.split())}"


@dataclass(frozen=True)
class QuarantinedBatch:
    """A batch set aside by promotion: `orders` staged rows held back, `payloads` raw payloads
    kept in `quarantined_payloads`, the `error` that promoting it alone raised, and when."""
    batch_id: str
    orders: int
    payloads: int
    error: str
    quarantined_at: datetime | None = None

    def as_dict(self) -> dict[str, str | int | None]:
        """JSON-ready fields (quarantined_at in ISO 8601)."""
        return {"batch_id": self.batch_id, "orders": self.orders, "payloads": self.payloads,
                "error": self.error, "quarantined_at":
                    self.quarantined_at.isoformat() if self.quarantined_at else None}


@dataclass
class PromotionResult:
    """What one or more promotion rounds did: batches promoted, lost (to requeue) and
    quarantined, staged rows of the promoted batches and rows they inserted, seconds; and
    the entries the relay published to `{P}:promoted` after them (`fanout.relay`)."""
    promoted_batches: list[str] = field(default_factory=list)
    lost_batches: list[str] = field(default_factory=list)
    quarantined: list[QuarantinedBatch] = field(default_factory=list)
    staged_rows: int = 0
    inserted_rows: int = 0
    seconds: float = 0.0
    entries_published: int = 0

    @property
    def conflicts(self) -> int:
        """Staged rows whose order id was already in `orders`."""
        return self.staged_rows - self.inserted_rows

    @property
    def quarantined_batches(self) -> list[str]:
        return [batch.batch_id for batch in self.quarantined]

    def add(self, other: "PromotionResult") -> None:
        self.promoted_batches += other.promoted_batches
        self.lost_batches += other.lost_batches
        self.quarantined += other.quarantined
        self.staged_rows += other.staged_rows
        self.inserted_rows += other.inserted_rows
        self.seconds += other.seconds
        self.entries_published += other.entries_published


def _promote(conn: psycopg.Connection, batches: list[str]) -> int:
    """Move the batches' staged rows into `orders` and the rollups; rows inserted. Rows of
    replay batches of a reprocess first replace the stored orders they recompute."""
    reprocess_staged(conn, batches)
    inserted = conn.execute(_INSERT_ORDERS, {"batches": batches}).fetchone()[0]
    crash_point("mid_promotion")
    conn.execute("DELETE FROM orders_staging WHERE batch_id = ANY(%s)", (batches,))
    conn.execute("UPDATE ingest_batches SET status = 'promoted', promoted_at = now()"
                 " WHERE batch_id = ANY(%s)", (batches,))
    return int(inserted)


def _promote_apart(conn: psycopg.Connection, batches: list[str]
                   ) -> tuple[list[str], int, dict[str, str]]:
    """Promote the batches together, or, if that meets poison, each alone in a savepoint.

    Returns the batches promoted, the rows inserted, and the error text of each batch that
    failed alone with a poison error. Any other error propagates.
    """
    try:
        with conn.transaction():
            return batches, _promote(conn, batches), {}
    except psycopg.Error as exc:
        if not is_poison(exc):
            raise
        if len(batches) == 1:
            return [], 0, {batches[0]: error_text(exc)}
    promoted: list[str] = []
    inserted = 0
    failed: dict[str, str] = {}
    for batch_id in batches:
        try:
            with conn.transaction():
                inserted += _promote(conn, [batch_id])
        except psycopg.Error as exc:
            if not is_poison(exc):
                raise
            failed[batch_id] = error_text(exc)
        else:
            promoted.append(batch_id)
    return promoted, inserted, failed


def _quarantine(conn: psycopg.Connection, batch_id: str, orders: int, error: str,
                payloads_of: PayloadSource | None) -> QuarantinedBatch:
    """Set one batch aside: ledger status and error, raw payloads kept, staging rows deleted."""
    payloads = list(payloads_of(batch_id)) if payloads_of is not None else []
    if not payloads:
        error += "; its raw payloads were not available to keep (batch list gone from Redis)"
    conn.execute(_QUARANTINE_LEDGER, (error, batch_id))
    conn.execute("DELETE FROM orders_staging WHERE batch_id = %s", (batch_id,))
    if payloads:
        conn.execute(_KEEP_PAYLOADS, (batch_id, payloads))
    return QuarantinedBatch(batch_id, orders, len(payloads), error)


def promote_round(conn: psycopg.Connection, max_batches: int = 400,
                  payloads_of: PayloadSource | None = None) -> PromotionResult:
    """Promote up to `max_batches` staged batches in one transaction.

    Batches whose staged rows are incomplete are marked `lost` (`lost_batches`). A batch that
    cannot be promoted even alone, for a reason retrying cannot fix (`is_poison`), is
    quarantined (`quarantined`) in the same transaction, and the others are promoted:
    `payloads_of(batch_id)` gives its raw payloads to keep in `quarantined_payloads` (without
    it, none are kept). Any other error propagates and nothing of the round is committed.
    """
    started = time.perf_counter()
    result = PromotionResult()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (PROMOTE_LOCK,))
        ledger = dict(conn.execute(
            "SELECT batch_id, staged_rows FROM ingest_batches WHERE status = 'staged'"
            " ORDER BY staged_at, batch_id LIMIT %s FOR UPDATE", (max_batches,)).fetchall())
        if not ledger:
            return result
        present = dict(conn.execute(
            "SELECT batch_id, count(*) FROM orders_staging WHERE batch_id = ANY(%s)"
            " GROUP BY batch_id", (list(ledger),)).fetchall())
        ready = [b for b, rows in ledger.items() if present.get(b, 0) == rows]
        result.lost_batches = [b for b in ledger if b not in set(ready)]
        if ready:
            promoted, inserted, failed = _promote_apart(conn, ready)
            result.promoted_batches = promoted
            result.staged_rows = sum(ledger[b] for b in promoted)
            result.inserted_rows = inserted
            if promoted:
                conn.execute("INSERT INTO promotions (batches, staged_rows, inserted_rows)"
                             " VALUES (%s, %s, %s)", (len(promoted), result.staged_rows,
                                                      inserted))
            result.quarantined = [_quarantine(conn, b, ledger[b], error, payloads_of)
                                  for b, error in failed.items()]
        if result.lost_batches:
            conn.execute("UPDATE ingest_batches SET status = 'lost' WHERE batch_id = ANY(%s)",
                         (result.lost_batches,))
    result.seconds = time.perf_counter() - started
    return result


def quarantined_batches(conn: psycopg.Connection, batch_ids: Sequence[str] | None = None, *,
                        limit: int | None = None, lock: bool = False) -> list[QuarantinedBatch]:
    """Quarantined batches, oldest first: all of them, or those of `batch_ids`.

    With `batch_ids`, raises NotQuarantined if any of them is not quarantined. With `lock`
    (inside the caller's transaction) their ledger rows are locked FOR UPDATE.
    """
    ids = None if batch_ids is None else list(dict.fromkeys(batch_ids))
    query = _QUARANTINED + (" FOR UPDATE OF b" if lock else "")
    rows = conn.execute(query, {"ids": ids, "limit": limit}).fetchall()
    found = [QuarantinedBatch(b, orders, payloads, error, at)
             for b, orders, payloads, error, at in rows]
    if ids is not None and len(found) < len(ids):
        statuses = dict(conn.execute(
            "SELECT batch_id, status FROM ingest_batches WHERE batch_id = ANY(%s)",
            (ids,)).fetchall())
        missing = [f"{b} ({statuses.get(b, 'no such batch')})"
                   for b in ids if b not in {q.batch_id for q in found}]
        raise NotQuarantined(f"not quarantined: {', '.join(missing)}; `orders-pipeline readmit "
                             "--all --dry-run` lists the quarantined batches")
    return found


def quarantine_totals(conn: psycopg.Connection) -> tuple[int, int]:
    """(quarantined batches, orders they hold back), from the ledger."""
    batches, orders = conn.execute(
        "SELECT count(*), coalesce(sum(staged_rows), 0) FROM ingest_batches"
        " WHERE status = 'quarantined'").fetchone()
    return int(batches), int(orders)


def kept_payloads(conn: psycopg.Connection, batch_id: str) -> list[bytes]:
    """The raw payloads kept for a quarantined batch, in batch order."""
    return [bytes(row[0]) for row in conn.execute(
        "SELECT raw_payload FROM quarantined_payloads WHERE batch_id = %s"
        " ORDER BY batch_position", (batch_id,))]


def mark_readmitted(conn: psycopg.Connection, batch_ids: list[str]) -> None:
    """Ledger: quarantined batches go back to `lost`, so that the next staging of each (under
    its own id) restages it; their kept payloads are deleted (Redis holds them again)."""
    conn.execute("UPDATE ingest_batches SET status = 'lost'"
                 " WHERE batch_id = ANY(%s) AND status = 'quarantined'", (batch_ids,))
    conn.execute("DELETE FROM quarantined_payloads WHERE batch_id = ANY(%s)", (batch_ids,))


def batch_statuses(conn: psycopg.Connection, batch_ids: list[str]) -> dict[str, str]:
    """Ledger status of each batch id that has a ledger row."""
    if not batch_ids:
        return {}
    rows = conn.execute("SELECT batch_id, status FROM ingest_batches WHERE batch_id = ANY(%s)",
                        (batch_ids,)).fetchall()
    conn.rollback()
    return dict(rows)
