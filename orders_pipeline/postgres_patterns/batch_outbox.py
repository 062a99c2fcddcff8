"""Outboxes of batches that go from Postgres to Redis exactly once: re-drives and replays.

A request writes its batches into an outbox table (`batch_id` primary key, `pushed_at` NULL
while pending) in the transaction that records it. Each batch is then pushed holding its
locked outbox row (`lock_pending`: its payloads, or None once it is not pending), with a
marker, in one Redis MULTI that does nothing if the marker is there
(`OrderQueue.push_redriven`, raising the `counter` of its deliveries), and marked pushed
(`mark_pushed`) in the same transaction, before the marker is dropped; `pipeline`
(`redrive_rejected`) says why that pushes each batch once whatever dies when.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql


@dataclass(frozen=True)
class Outbox:
    """One kind of outbox: `name` (a crash after a push is the point `after_<name>_push`),
    its `table`, the `{P}:counters` field its pushes raise, and the owner's
    `lock_pending(conn, batch_id)` and `pending_batches(conn)` (where payloads come from,
    in which order batches go)."""
    name: str
    table: str
    counter: str
    lock_pending: Callable[[psycopg.Connection, str], list[bytes] | None]
    pending_batches: Callable[[psycopg.Connection], list[str]]

    def mark_pushed(self, conn: psycopg.Connection, batch_id: str) -> None:
        """Inside the caller's transaction: the batch is in Redis."""
        conn.execute(sql.SQL("UPDATE {} SET pushed_at = now() WHERE batch_id = %s").format(
            sql.Identifier(self.table)), (batch_id,))

    def pushed_among(self, conn: psycopg.Connection, batch_ids: Sequence[str]) -> list[str]:
        """Those of the given batches that this outbox records as pushed."""
        rows = conn.execute(sql.SQL(
            "SELECT batch_id FROM {} WHERE batch_id = ANY(%s) AND pushed_at IS NOT NULL"
        ).format(sql.Identifier(self.table)), (list(batch_ids),)).fetchall()
        conn.rollback()
        return [row[0] for row in rows]
