"""Promote staged batches into `orders`: idempotent, serialised, and crash-aware.

One transaction per round, under an advisory lock so promotions started from anywhere (sensor
runs, schedules, the CLI, other hosts) never interleave. It promotes whole batches whose
ledger says `staged`, inserts with ON CONFLICT DO NOTHING, adds exactly the rows it inserted
to the view rollups, deletes exactly the rows it took (by batch id, so workers can keep
staging meanwhile), and marks the batches `promoted`. A
staged batch whose rows are gone (a Postgres crash empties UNLOGGED tables) is marked `lost`
so the caller can hand it back to the queue.
"""

import time
from dataclasses import dataclass, field

import psycopg

from orders_pipeline import contract
from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns.views import PROMOTE_LOCK, ROLLUPS, rollup_upsert

ORDER_COLUMNS = (*contract.ORDER_COLUMNS, "batch_id")
_COLUMNS = ", ".join(ORDER_COLUMNS)
# Insert the batches' rows and fold exactly the rows inserted into the view rollups.
_INSERT_ORDERS = f"""
WITH inserted AS (
    INSERT INTO orders ({_COLUMNS})
    SELECT {_COLUMNS} FROM orders_staging WHERE batch_id = ANY(%(batches)s)
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_timestamp, category, product_id, quantity, total_amount_usd
), {", ".join(f"add_to_{rollup} AS ({rollup_upsert(rollup, 'inserted')})"
         for rollup in ROLLUPS)}
SELECT count(*) FROM inserted
"""


@dataclass
class PromotionResult:
    promoted_batches: list[str] = field(default_factory=list)
    lost_batches: list[str] = field(default_factory=list)
    staged_rows: int = 0
    inserted_rows: int = 0
    seconds: float = 0.0

    @property
    def conflicts(self) -> int:
        """Staged rows whose order id was already in `orders`."""
        return self.staged_rows - self.inserted_rows

    def add(self, other: "PromotionResult") -> None:
        self.promoted_batches += other.promoted_batches
        self.lost_batches += other.lost_batches
        self.staged_rows += other.staged_rows
        self.inserted_rows += other.inserted_rows
        self.seconds += other.seconds


def promote_round(conn: psycopg.Connection, max_batches: int = 400) -> PromotionResult:
    """Promote up to `max_batches` staged batches in one transaction."""
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
            inserted = conn.execute(_INSERT_ORDERS, {"batches": ready}).fetchone()[0]
            crash_point("mid_promotion")
            conn.execute("DELETE FROM orders_staging WHERE batch_id = ANY(%s)", (ready,))
            conn.execute("UPDATE ingest_batches SET status = 'promoted', promoted_at = now()"
                         " WHERE batch_id = ANY(%s)", (ready,))
            result.promoted_batches = ready
            result.staged_rows = sum(ledger[b] for b in ready)
            result.inserted_rows = inserted
            conn.execute("INSERT INTO promotions (batches, staged_rows, inserted_rows)"
                         " VALUES (%s, %s, %s)", (len(ready), result.staged_rows, inserted))
        if result.lost_batches:
            conn.execute("UPDATE ingest_batches SET status = 'lost' WHERE batch_id = ANY(%s)",
                         (result.lost_batches,))
    result.seconds = time.perf_counter() - started
    return result


def batch_statuses(conn: psycopg.Connection, batch_ids: list[str]) -> dict[str, str]:
    """Ledger status of each batch id that has a ledger row."""
    if not batch_ids:
        return {}
    rows = conn.execute("SELECT batch_id, status FROM ingest_batches WHERE batch_id = ANY(%s)",
                        (batch_ids,)).fetchall()
    conn.rollback()
    return dict(rows)
