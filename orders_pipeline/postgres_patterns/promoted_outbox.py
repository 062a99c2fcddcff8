"""The fan-out outbox (`promoted_outbox`, sql/060_outbox.sql): the Postgres side of the relay.

Promotion lists the ids of the orders each batch inserted in one outbox row, in the
transaction that inserts them (`promotion._INSERT_ORDERS`). The relay (`fanout.relay`) takes
the oldest row under an advisory lock (`lock_relay`, `oldest`), reads its orders from
`orders` (`order_documents`) and deletes the row once their entries are in Redis
(`delete_through`); `backlog` says how much waits.
"""

from dataclasses import dataclass

import psycopg

RELAY_LOCK = "orders_pipeline.relay"


@dataclass(frozen=True)
class OutboxRow:
    """The oldest outbox row: its id, its batch, how many order ids it lists, and the id of
    the newest row at the time it was read."""
    outbox_id: int
    batch_id: str
    orders: int
    newest_id: int


@dataclass(frozen=True)
class Backlog:
    """Outbox rows not relayed yet, the order ids they list, and how long the oldest has
    waited (seconds; 0.0 with none)."""
    rows: int
    orders: int
    oldest_seconds: float


def lock_relay(conn: psycopg.Connection) -> None:
    """Inside the caller's transaction: one relay at a time."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (RELAY_LOCK,))


def oldest(conn: psycopg.Connection) -> OutboxRow | None:
    """The oldest outbox row (None when the outbox is empty)."""
    row = conn.execute(
        "SELECT outbox_id, batch_id, cardinality(order_ids),"
        " (SELECT max(outbox_id) FROM promoted_outbox)"
        " FROM promoted_outbox ORDER BY outbox_id LIMIT 1").fetchone()
    return None if row is None else OutboxRow(int(row[0]), row[1], int(row[2]), int(row[3]))


def delete_through(conn: psycopg.Connection, outbox_id: int) -> tuple[int, int]:
    """Delete the rows up to `outbox_id`; returns (rows deleted, order ids they listed)."""
    rows, orders = conn.execute(
        "WITH gone AS (DELETE FROM promoted_outbox WHERE outbox_id <= %s"
        " RETURNING cardinality(order_ids) AS orders)"
        " SELECT count(*), coalesce(sum(orders), 0) FROM gone", (outbox_id,)).fetchone()
    return int(rows), int(orders)


def order_documents(conn: psycopg.Connection, outbox_id: int) -> list[tuple[str, str]]:
    """The orders a row lists that are still in `orders`, in its order: (order_id, the row
    as JSON text)."""
    return [(order_id, document) for order_id, document in conn.execute(
        "SELECT o.order_id, row_to_json(o)::text"
        " FROM promoted_outbox x"
        " CROSS JOIN LATERAL unnest(x.order_ids) WITH ORDINALITY AS i(order_id, n)"
        " JOIN orders o ON o.order_id = i.order_id"
        " WHERE x.outbox_id = %s ORDER BY i.n", (outbox_id,))]


def backlog(conn: psycopg.Connection) -> Backlog:
    """What waits in the outbox."""
    rows, orders, waited = conn.execute(
        "SELECT count(*), coalesce(sum(cardinality(order_ids)), 0),"
        " coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8"
        " FROM promoted_outbox").fetchone()
    conn.rollback()
    return Backlog(int(rows), int(orders), float(waited))
