"""Re-drive rejected orders, the Postgres side: select, mark, outbox, outcomes.

A request (`plan`) selects rows of `orders_rejected` by a `RejectFilter` and, in one
transaction under an advisory lock, records itself in `redrives`, marks every selected row in
`redriven_rows` with the batch and position its payload goes back under (copying the raw
payload there), and writes those batches into the outbox `redrive_batches` as pending. A row
already in `redriven_rows` is never selected again (its primary key): each rejected row is
re-driven at most once. The caller pushes each pending batch to Redis while holding its
outbox row (`lock_pending`, which also returns its payloads byte for byte) and marks it
pushed (`OUTBOX.mark_pushed`) in the same transaction; see `pipeline.redrive_rejected` for why that
makes the push happen exactly once. What became of each row is the view `redrive_outcomes`
(sql/040_redrive.sql), summed by `report`.
"""

from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from orders_pipeline import contract
from orders_pipeline.postgres_patterns.batch_outbox import Outbox
from orders_pipeline.redis_patterns.lookup_cache import LOOKUP_TABLES
from orders_pipeline.redis_patterns.queue import REDRIVEN_COUNTER

REDRIVE_LOCK = "orders_pipeline.redrive"
# The kind of a reason: the text before its first ": " ("unknown product_id: P9" -> "unknown
# product_id"; a reason without one is its own kind).
REASON_KIND = "split_part(r.reason, ': ', 1)"
# Kinds of the rejects for a product, currency or zip code missing from the lookup snapshot.
UNKNOWN_REFERENCE_KINDS = tuple(
    contract.UNKNOWN_REFERENCE.split(": ")[0].format(field=table.id_column)
    for table in LOOKUP_TABLES)
# Widths of the copy and batch numbers in a re-drive batch id (`<redrive_id>-0000-00000000`),
# so that the ids sort in order.
COPY_DIGITS = 4
BATCH_NUMBER_DIGITS = 8


class RedriveRefused(ValueError):
    """A request that cannot be made as given; the text says why and what to pass instead."""


@dataclass(frozen=True)
class RejectFilter:
    """Which rows of `orders_rejected` to re-drive; every given condition must hold.

    `reason`: a Postgres regular expression (`~`, case-sensitive) found in the reason.
    `reason_kinds`: exact kinds (`REASON_KIND`). `since` (inclusive) and `until` (exclusive)
    bound `rejected_at`; both timezone-aware. `order_ids`, `batch_ids`: the row's order id or
    batch id is one of these. `unknown_references`: the preset (rejects for an unknown
    product, currency or zip code since the lookup change the live snapshot picked up),
    resolved by `for_reload` into kinds and a time range. `everything`: no condition at all
    (refused unless asked for explicitly).
    """
    reason: str | None = None
    reason_kinds: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    order_ids: tuple[str, ...] = ()
    batch_ids: tuple[str, ...] = ()
    unknown_references: bool = False
    everything: bool = False

    def check(self) -> None:
        """Raise RedriveRefused for naive times, or for no condition without `everything`."""
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and moment.utcoffset() is None:
                raise RedriveRefused(f"{name} {moment.isoformat()} has no UTC offset; give one "
                                     "(e.g. 2030-05-01T10:00:00+00:00)")
        if self.reason == "":
            raise RedriveRefused("the reason pattern is empty")
        given = (self.reason is not None or self.reason_kinds or self.since or self.until
                 or self.order_ids or self.batch_ids or self.unknown_references)
        if not given and not self.everything:
            raise RedriveRefused("no filter given: pass a reason pattern, a time range, order "
                                 "ids, batch ids or the unknown-references preset, or ask for "
                                 "every rejected row explicitly")

    def for_reload(self, changes_since: datetime, loaded_at: datetime) -> "RejectFilter":
        """The preset resolved: unknown-reference kinds, rejected in [changes_since, loaded_at)
        (after the first lookup change the live snapshot picked up, before it was loaded),
        narrowed further by this filter's own times."""
        since = changes_since if self.since is None else max(self.since, changes_since)
        until = loaded_at if self.until is None else min(self.until, loaded_at)
        return replace(self, reason_kinds=UNKNOWN_REFERENCE_KINDS, since=since, until=until)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready fields (times in ISO 8601), as recorded in `redrives.filters`."""
        fields = asdict(self)
        for name in ("since", "until"):
            if fields[name] is not None:
                fields[name] = fields[name].isoformat()
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in fields.items()}

    def conditions(self) -> tuple[sql.Composable, dict[str, Any]]:
        """The WHERE clause over `orders_rejected r` (rows never re-driven that match every
        condition) and its parameters."""
        parts: list[sql.Composable] = [sql.SQL(
            "NOT EXISTS (SELECT 1 FROM redriven_rows x WHERE x.batch_id = r.batch_id"
            " AND x.batch_position = r.batch_position)")]
        params: dict[str, Any] = {}
        wanted = {
            "reason": (self.reason, "r.reason ~ %(reason)s"),
            "kinds": (list(self.reason_kinds), f"{REASON_KIND} = ANY(%(kinds)s)"),
            "since": (self.since, "r.rejected_at >= %(since)s"),
            "until": (self.until, "r.rejected_at < %(until)s"),
            "order_ids": (list(self.order_ids), "r.order_id = ANY(%(order_ids)s)"),
            "batch_ids": (list(self.batch_ids), "r.batch_id = ANY(%(batch_ids)s)"),
        }
        for name, (value, condition) in wanted.items():
            if value is not None and value != []:
                parts.append(sql.SQL(condition))
                params[name] = value
        return sql.SQL(" AND ").join(parts), params


def preview(conn: psycopg.Connection, selection: RejectFilter) -> dict[str, int]:
    """Rows the filter would select now, by reason kind (largest first); changes nothing."""
    where, params = selection.conditions()
    rows = conn.execute(sql.SQL(
        "SELECT {kind}, count(*) FROM orders_rejected r WHERE {where}"
        " GROUP BY 1 ORDER BY 2 DESC, 1").format(kind=sql.SQL(REASON_KIND), where=where),
        params).fetchall()
    conn.rollback()
    return {kind: int(count) for kind, count in rows}


@dataclass(frozen=True)
class Plan:
    """A committed request: rows selected, by reason kind, and its batches in order."""
    redrive_id: str
    selected: int
    by_reason: dict[str, int]
    batch_ids: list[str]


_MARK = """
WITH picked AS (
    SELECT r.batch_id, r.batch_position, r.rejected_at, r.raw_payload, r.order_id,
           CASE WHEN r.order_id IS NULL THEN 0 ELSE row_number() OVER (
               PARTITION BY r.order_id ORDER BY r.rejected_at, r.batch_id, r.batch_position
           ) - 1 END AS copy
    FROM orders_rejected r WHERE {where}
), numbered AS (
    SELECT batch_id, batch_position, raw_payload, order_id, copy, row_number() OVER (
               PARTITION BY copy ORDER BY rejected_at, batch_id, batch_position) - 1 AS n
    FROM picked
), placed AS (
    SELECT batch_id, batch_position, raw_payload, order_id,
           mod(n, %(size)s)::integer AS position,
           %(redrive_id)s || '-' || {copy} || '-' || {number} AS redrive_batch
    FROM numbered
), marked AS (
    INSERT INTO redriven_rows (batch_id, batch_position, redrive_batch_id, redrive_position,
                               raw_payload, order_id)
    SELECT batch_id, batch_position, redrive_batch, position, raw_payload, order_id
    FROM placed
)
INSERT INTO redrive_batches (batch_id, redrive_id, rows)
SELECT redrive_batch, %(redrive_id)s, count(*) FROM placed GROUP BY redrive_batch
RETURNING batch_id
"""


def _padded(expression: str, digits: int) -> sql.Composable:
    """SQL: the integer `expression` as text, zero-padded to at least `digits` (never cut)."""
    text = f"({expression})::text"
    return sql.SQL(f"lpad({text}, greatest(length({text}), {digits}), '0')")


_BY_REASON = f"""
SELECT {REASON_KIND}, count(*)
FROM redriven_rows x JOIN orders_rejected r
    ON r.batch_id = x.batch_id AND r.batch_position = x.batch_position
WHERE x.redrive_batch_id = ANY(%s)
GROUP BY 1 ORDER BY 2 DESC, 1
"""


def plan(conn: psycopg.Connection, selection: RejectFilter, redrive_id: str,
         batch_size: int) -> Plan:
    """Record a request and mark the rows it selects, in one transaction (committed here).

    Under the advisory lock REDRIVE_LOCK, so two requests never pick the same row. Selected
    rows are ordered by `rejected_at` (then batch, position) and cut into batches of
    `batch_size`, `<redrive_id>-<copy>-<number>`: the first copy of each order id (and every
    row without one) in copy 0000, a second copy of an id in 0001, and so on, so that no
    batch holds an order id twice and the batch that promoted an order names its row
    (`redrive_outcomes`). With nothing selected, nothing is recorded (`batch_ids` empty).
    Raises RedriveRefused (see `RejectFilter.check`), and psycopg's InvalidRegularExpression
    for a reason pattern Postgres cannot compile.
    """
    selection.check()
    where, params = selection.conditions()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (REDRIVE_LOCK,))
        conn.execute("INSERT INTO redrives (redrive_id, filters, selected_rows, batches)"
                     " VALUES (%s, %s, 0, 0)", (redrive_id, Jsonb(selection.as_json())))
        batch_ids = sorted(row[0] for row in conn.execute(
            sql.SQL(_MARK).format(where=where, copy=_padded("copy", COPY_DIGITS),
                                  number=_padded("n / %(size)s", BATCH_NUMBER_DIGITS)),
            {**params, "size": batch_size, "redrive_id": redrive_id}).fetchall())
        by_reason = {kind: int(count) for kind, count in
                     conn.execute(_BY_REASON, (batch_ids,)).fetchall()}
        selected = sum(by_reason.values())
        if selected:
            conn.execute("UPDATE redrives SET selected_rows = %s, batches = %s"
                         " WHERE redrive_id = %s", (selected, len(batch_ids), redrive_id))
        else:
            conn.execute("DELETE FROM redrives WHERE redrive_id = %s", (redrive_id,))
    return Plan(redrive_id, selected, by_reason, batch_ids)


def pending_batches(conn: psycopg.Connection) -> list[str]:
    """Re-drive batches not pushed yet (of any request), in order."""
    rows = conn.execute("SELECT batch_id FROM redrive_batches WHERE pushed_at IS NULL"
                        " ORDER BY batch_id").fetchall()
    conn.rollback()
    return [row[0] for row in rows]


def lock_pending(conn: psycopg.Connection, batch_id: str) -> list[bytes] | None:
    """Inside the caller's transaction: lock a pending batch's outbox row and return its raw
    payloads in position order; None if it is not pending (any more)."""
    if conn.execute("SELECT 1 FROM redrive_batches WHERE batch_id = %s AND pushed_at IS NULL"
                    " FOR UPDATE", (batch_id,)).fetchone() is None:
        return None
    return [bytes(p[0]) for p in conn.execute(
        "SELECT raw_payload FROM redriven_rows WHERE redrive_batch_id = %s"
        " ORDER BY redrive_position", (batch_id,))]


# The outbox (`mark_pushed`, `pushed_among`) as `pipeline` pushes it.
OUTBOX = Outbox("redrive", "redrive_batches", REDRIVEN_COUNTER, lock_pending, pending_batches)


@dataclass(frozen=True)
class RedriveReport:
    """One request as recorded: when, its filters, rows selected, how many rows have each
    outcome (`redrive_outcomes`), and the reason kinds of the rows rejected again."""
    redrive_id: str
    requested_at: datetime
    filters: dict[str, Any]
    selected: int
    outcomes: dict[str, int]
    new_reasons: dict[str, int]


def report(conn: psycopg.Connection, redrive_id: str) -> RedriveReport | None:
    """What became of a request's rows (None for an unknown id)."""
    request = conn.execute("SELECT requested_at, filters, selected_rows FROM redrives"
                           " WHERE redrive_id = %s", (redrive_id,)).fetchone()
    if request is None:
        conn.rollback()
        return None
    outcomes = dict(conn.execute(
        "SELECT outcome, count(*)::integer FROM redrive_outcomes WHERE redrive_id = %s"
        " GROUP BY 1 ORDER BY 1", (redrive_id,)).fetchall())
    new_reasons = dict(conn.execute(
        "SELECT split_part(new_reason, ': ', 1), count(*)::integer FROM redrive_outcomes"
        " WHERE redrive_id = %s AND outcome = 'rejected' GROUP BY 1 ORDER BY 2 DESC, 1",
        (redrive_id,)).fetchall())
    conn.rollback()
    return RedriveReport(redrive_id, request[0], request[1], int(request[2]), outcomes,
                         new_reasons)
