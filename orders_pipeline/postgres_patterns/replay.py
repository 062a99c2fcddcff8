"""Replay a time window from the raw archive, the Postgres side: select, outbox, reprocess.

A request (`plan`) selects the archived batches (`raw_batches`) of a window [since, until)
of `archived_at` whose ledger says promoted, and, in one transaction under an advisory lock,
records itself in `replays` and writes one replay batch per archived batch into the outbox
`replay_batches` as pending: `<replay_id>-<source batch id>`, the same payloads at the same
positions. The caller pushes each pending batch to Redis while holding its outbox row
(`lock_pending`, which reads and decodes its payloads from the archive) and marks it pushed
(`OUTBOX.mark_pushed`) in the same transaction, exactly as a re-drive batch
(`batch_outbox`; `pipeline.redrive_rejected` explains why that pushes it once). A request
for the same window and mode as one that a crash left with pending batches resumes that one.

A replay batch is staged like any batch but past the dedup window (`is_replay_batch`; of
several copies of an order id in the batch only the first is staged, as the window would):
which copy of an order landed is known to `orders` (its `batch_id`), not to the window,
whose marks may have expired, or been made by another copy of the window replayed first.
Promotion then inserts what is missing (ON CONFLICT DO NOTHING, as always). For a
reprocess request it first replaces the stored values of each order that the replayed batch
(or an earlier replay of it) landed by the values recomputed from that copy's raw bytes with
the current transform and lookup snapshot, and corrects the rollups by exactly the
difference, in the promotion's transaction (`reprocess_staged`).
"""

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

import psycopg

from orders_pipeline import contract
from orders_pipeline.postgres_patterns.archive import decode
from orders_pipeline.postgres_patterns.batch_outbox import Outbox
from orders_pipeline.postgres_patterns.views import ROLLUPS, rollup_upsert
from orders_pipeline.redis_patterns.queue import REPLAYED_COUNTER

REPLAY_LOCK = "orders_pipeline.replay"
# `replay-<16 hex digits>-<source batch id>` (built in `_PICK`).
_REPLAY_BATCH_ID = re.compile(r"replay-[0-9a-f]{16}-.+", re.DOTALL)


class ReplayRefused(ValueError):
    """A request that cannot be made as given; the text says why and what to pass instead."""


class ArchiveMissing(ValueError):
    """A pending replay batch whose archived payloads are gone (a partition dropped by hand)."""


def is_replay_batch(batch_id: str) -> bool:
    """True for the id of a replay batch (its worker stages it past the dedup window)."""
    return _REPLAY_BATCH_ID.fullmatch(batch_id) is not None


@dataclass(frozen=True)
class Window:
    """The archived batches with `since` <= archived_at < `until` (both timezone-aware)."""
    since: datetime
    until: datetime

    def check(self) -> None:
        """Raise ReplayRefused for a naive instant or an empty window."""
        for name, moment in (("start", self.since), ("end", self.until)):
            if moment.utcoffset() is None:
                raise ReplayRefused(f"the window's {name} {moment.isoformat()} has no UTC "
                                    "offset; give one (e.g. 2030-05-01T00:00:00+00:00)")
        if self.since >= self.until:
            raise ReplayRefused(f"the window is empty: its start {self.since.isoformat()} is "
                                f"not before its end {self.until.isoformat()}")


@dataclass(frozen=True)
class WindowContents:
    """The archive in a window: batches and orders, raw and stored bytes, and how many of the
    batches (and their orders) are promoted, so replayable; the rest are still in the
    pipeline (staged, lost or quarantined) and left to it."""
    batches: int
    orders: int
    raw_bytes: int
    stored_bytes: int
    replayable_batches: int
    replayable_orders: int


_PREVIEW = """
SELECT count(*), coalesce(sum(r.orders), 0), coalesce(sum(r.raw_bytes), 0),
       coalesce(sum(pg_column_size(r.payloads)), 0),
       count(*) FILTER (WHERE l.status = 'promoted'),
       coalesce(sum(r.orders) FILTER (WHERE l.status = 'promoted'), 0)
FROM raw_batches r LEFT JOIN ingest_batches l ON l.batch_id = r.batch_id
WHERE r.archived_at >= %s AND r.archived_at < %s
"""


def preview(conn: psycopg.Connection, window: Window) -> WindowContents:
    """What the archive holds in the window; changes nothing."""
    row = conn.execute(_PREVIEW, (window.since, window.until)).fetchone()
    conn.rollback()
    return WindowContents(*(int(value) for value in row))


@dataclass(frozen=True)
class Plan:
    """A committed request (`replay_id` None: nothing to replay), whether it resumes one a
    crash interrupted, and its batches still to push, in archive order."""
    replay_id: str | None
    resumed: bool
    batch_ids: list[str]


_INTERRUPTED = """
SELECT r.replay_id FROM replays r
WHERE r.window_from = %s AND r.window_to = %s AND r.reprocess = %s AND EXISTS (
    SELECT 1 FROM replay_batches b WHERE b.replay_id = r.replay_id AND b.pushed_at IS NULL)
ORDER BY r.requested_at LIMIT 1
"""
_PICK = """
WITH picked AS (
    INSERT INTO replay_batches (batch_id, replay_id, source_batch_id, source_archived_at,
                                orders)
    SELECT %(replay_id)s || '-' || r.batch_id, %(replay_id)s, r.batch_id, r.archived_at,
           r.orders
    FROM raw_batches r JOIN ingest_batches l ON l.batch_id = r.batch_id
    WHERE r.archived_at >= %(since)s AND r.archived_at < %(until)s AND l.status = 'promoted'
    RETURNING orders
)
SELECT count(*), coalesce(sum(orders), 0) FROM picked
"""


def plan(conn: psycopg.Connection, window: Window, reprocess: bool) -> Plan:
    """Record a request and write its batches to the outbox, in one transaction (committed
    here; `conn` must be idle), or resume the interrupted request for the same window and
    mode. Raises ReplayRefused (see `Window.check`)."""
    window.check()
    replay_id = f"replay-{uuid.uuid4().hex[:16]}"
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (REPLAY_LOCK,))
        interrupted = conn.execute(_INTERRUPTED, (window.since, window.until, reprocess)
                                   ).fetchone()
        if interrupted is not None:
            return Plan(interrupted[0], True, _pending(conn, interrupted[0]))
        conn.execute("INSERT INTO replays (replay_id, window_from, window_to, reprocess,"
                     " batches, orders) VALUES (%s, %s, %s, %s, 0, 0)",
                     (replay_id, window.since, window.until, reprocess))
        batches, orders = conn.execute(_PICK, {"replay_id": replay_id, "since": window.since,
                                               "until": window.until}).fetchone()
        if not batches:
            conn.execute("DELETE FROM replays WHERE replay_id = %s", (replay_id,))
            return Plan(None, False, [])
        conn.execute("UPDATE replays SET batches = %s, orders = %s WHERE replay_id = %s",
                     (batches, orders, replay_id))
        return Plan(replay_id, False, _pending(conn, replay_id))


def _pending(conn: psycopg.Connection, replay_id: str | None) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT batch_id FROM replay_batches WHERE pushed_at IS NULL"
        " AND (%(id)s::text IS NULL OR replay_id = %(id)s)"
        " ORDER BY source_archived_at, batch_id", {"id": replay_id})]


def pending_batches(conn: psycopg.Connection) -> list[str]:
    """Replay batches not pushed yet (of any request), in archive order."""
    batch_ids = _pending(conn, None)
    conn.rollback()
    return batch_ids


def lock_pending(conn: psycopg.Connection, batch_id: str) -> list[bytes] | None:
    """Inside the caller's transaction: lock a pending batch's outbox row and return the
    payloads of the batch it replays, from the archive, byte for byte; None if it is not
    pending (any more). ArchiveMissing if the archive no longer holds them."""
    source = conn.execute(
        "SELECT source_archived_at, source_batch_id FROM replay_batches"
        " WHERE batch_id = %s AND pushed_at IS NULL FOR UPDATE", (batch_id,)).fetchone()
    if source is None:
        return None
    archived = conn.execute("SELECT payloads FROM raw_batches"
                            " WHERE archived_at = %s AND batch_id = %s", source).fetchone()
    if archived is None:
        raise ArchiveMissing(
            f"replay batch {batch_id}: the archive no longer holds batch {source[1]} (archived "
            f"{source[0].isoformat()}), its partition was dropped by hand")
    return decode(bytes(archived[0]))


# The outbox (`mark_pushed`, `pushed_among`) as `pipeline` pushes it.
OUTBOX = Outbox("replay", "replay_batches", REPLAYED_COUNTER, lock_pending, pending_batches)


# ------------------------------------------------------------------------------- reprocess

_VALUES = [c for c in contract.ORDER_COLUMNS if c != "order_id"]
_ROLLUP_INPUTS = "order_timestamp, category, product_id, quantity, total_amount_usd"
_KEPT = ", ".join(("order_id", "batch_id", "promoted_at", *_VALUES))


def _of(alias: str) -> str:
    return ", ".join(f"{alias}.{column}" for column in _VALUES)


# The staged rows of reprocess batches that recompute a stored order: the copy from the batch
# that landed it (or from an earlier replay of that batch; a replay batch stages the first
# copy of each id), the latest staged should two replays of it meet in a round. Then the
# stored rows where a value differs, kept as they were, the new values written, and the
# rollups moved by the difference: -1 per old row, +1 per new one, in one upsert per rollup
# (two would touch the same row twice). A recomputed timestamp moves the row to its month's
# partition (created by the round, which ensures the months of every staged row); a trigger
# of `orders` moves its id guard along (sql/015_partitioned_orders.sql).
_REPROCESS = f"""
WITH source AS (
    SELECT DISTINCT ON (s.order_id) s.*
    FROM orders_staging s
    JOIN replay_batches b ON b.batch_id = s.batch_id
    JOIN orders o ON o.order_id = s.order_id
    WHERE s.batch_id = ANY(%(batches)s)
      -- A stored order dated before the retention horizon is in a month being dropped: never
      -- moved out of it (retention counted that month's orders without a lock).
      AND o.order_timestamp >= coalesce(
          (SELECT horizon::timestamp AT TIME ZONE 'UTC' FROM orders_retention), '-infinity')
      AND (o.batch_id = b.source_batch_id OR EXISTS (
              SELECT 1 FROM replay_batches x
              WHERE x.batch_id = o.batch_id AND x.source_batch_id = b.source_batch_id))
    ORDER BY s.order_id, s.staged_at DESC, s.batch_id
), old AS (
    SELECT s.batch_id AS replay_batch_id, o.order_id, o.batch_id, o.promoted_at, {_of('o')}
    FROM source s JOIN orders o ON o.order_id = s.order_id
    WHERE ({_of('o')}) IS DISTINCT FROM ({_of('s')})
), kept AS (
    INSERT INTO reprocessed_orders (replay_batch_id, {_KEPT})
    SELECT replay_batch_id, {_KEPT} FROM old
), updated AS (
    UPDATE orders o SET ({', '.join(_VALUES)}) = ({_of('s')})
    FROM old d JOIN source s ON s.order_id = d.order_id
    WHERE o.order_id = d.order_id
    RETURNING {', '.join(f'o.{c}' for c in _ROLLUP_INPUTS.split(', '))}
), delta AS (
    SELECT {_ROLLUP_INPUTS}, 1 AS sign FROM updated
    UNION ALL
    SELECT {_ROLLUP_INPUTS}, -1 FROM old
), {", ".join(f"move_{rollup} AS ({rollup_upsert(rollup, 'delta', signed=True)})"
              for rollup in ROLLUPS)}
SELECT count(*) FROM updated
"""
# Rollup rows whose last order a reprocess moved to another key (order_count 0): a recompute
# from `orders` has no such row.
_DROP_EMPTIED = [f"""
DELETE FROM {rollup} WHERE order_count = 0 AND ({key}) IN (
    SELECT {expressions} FROM reprocessed_orders WHERE replay_batch_id = ANY(%(batches)s))"""
                 for rollup, (key, expressions) in ROLLUPS.items()]


def reprocess_staged(conn: psycopg.Connection, batches: list[str]) -> int:
    """Inside a promotion's transaction, before its insert: for the reprocess batches among
    `batches`, replace the stored values of the orders they recompute and correct the rollups
    by the difference; returns the order rows changed. Free for other batches (no query
    unless a batch is a replay batch)."""
    if not any(map(is_replay_batch, batches)):
        return 0
    reprocessing = [row[0] for row in conn.execute(
        "SELECT b.batch_id FROM replay_batches b JOIN replays r ON r.replay_id = b.replay_id"
        " WHERE b.batch_id = ANY(%s) AND r.reprocess", (batches,))]
    if not reprocessing:
        return 0
    changed = int(conn.execute(_REPROCESS, {"batches": reprocessing}).fetchone()[0])
    if changed:
        for statement in _DROP_EMPTIED:
            conn.execute(statement, {"batches": reprocessing})
    return changed


# ------------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class ReplayOutcome:
    """What became of a request's batches: how many, their orders; batches promoted and
    quarantined (the rest are still in the pipeline); of the promoted ones the orders that
    reached promotion (inserted if missing, else a promotion conflict, recomputed by a
    reprocess) and those rejected; and the order rows a reprocess changed."""
    replay_id: str
    reprocess: bool
    batches: int
    orders: int
    promoted_batches: int
    quarantined_batches: int
    promoted_orders: int
    rejected: int
    changed: int


_OUTCOME = """
SELECT q.reprocess, count(b.batch_id), coalesce(sum(b.orders), 0),
       count(*) FILTER (WHERE l.status = 'promoted'),
       count(*) FILTER (WHERE l.status = 'quarantined'),
       coalesce(sum(l.staged_rows) FILTER (WHERE l.status = 'promoted'), 0),
       coalesce(sum(l.rejected_rows) FILTER (WHERE l.status = 'promoted'), 0),
       (SELECT count(*) FROM reprocessed_orders x JOIN replay_batches y
            ON y.batch_id = x.replay_batch_id WHERE y.replay_id = q.replay_id)
FROM replays q
JOIN replay_batches b ON b.replay_id = q.replay_id
LEFT JOIN ingest_batches l ON l.batch_id = b.batch_id
WHERE q.replay_id = %s
GROUP BY q.replay_id, q.reprocess
"""


def outcome(conn: psycopg.Connection, replay_id: str) -> ReplayOutcome | None:
    """What became of one request (None for an unknown id)."""
    row = conn.execute(_OUTCOME, (replay_id,)).fetchone()
    conn.rollback()
    if row is None:
        return None
    return ReplayOutcome(replay_id, bool(row[0]), *(int(value) for value in row[1:]))
