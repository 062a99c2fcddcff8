"""Promote staged batches into `orders`: idempotent, serialised per shard, crash-aware,
poison-proof, and parallel across queue shards.

One transaction per round. A round promotes whole batches whose ledger says `staged`: it
inserts their rows with ON CONFLICT DO NOTHING, adds exactly the rows it inserted to the view
rollups and their ids to the fan-out outbox (`promoted_outbox`), deletes exactly the rows it
took from staging (by batch id, so workers can keep staging meanwhile), and marks the batches
`promoted`. A staged batch whose rows are gone (a Postgres crash empties UNLOGGED tables) is
marked `lost` so the caller can hand it back to the queue.

Shards (issue 12). The ledger records the queue shard of every batch (`ingest_batches.shard`,
sql/070_promotion_shards.sql). `promote_round(conn, shard=s)` promotes shard `s` only, under
two advisory locks: PROMOTE_LOCK in *shared* mode, then the two-key lock
(hashtext(PROMOTE_LOCK), s) exclusively. So rounds of one shard run one at a time, in the
ledger's order (the first copy of an order id in a shard lands, as with one queue), while
rounds of different shards run at the same time. `promote_round(conn)` (shard None) promotes
every shard under PROMOTE_LOCK in *exclusive* mode, exactly as before shards: it waits for the
shard rounds in progress, and shard rounds asked for after it wait for it (Postgres grants
lock requests in arrival order, so neither kind starves the other); `views.rebuild_rollups`,
which takes the same exclusive lock, still excludes every promotion. All-shards and shard
promoters can therefore be mixed freely.

What keeps concurrent shard rounds correct, also when two shards carry the same order id (a
foreign producer pushing to shard 0 ids that belong elsewhere):
- `orders`: the primary key and ON CONFLICT DO NOTHING. A second inserter of an id waits for
  the first one's transaction and then inserts nothing (the id is then not in its RETURNING,
  so its rollups and outbox do not count it) or, if the first rolled back, inserts it. A shard
  round inserts in order_id order (COLLATE "C"), so two rounds that share ids take them in
  the same order and cannot deadlock on them. Which shard's copy lands is whichever commits
  first; within one shard (and one round) the first copy in ledger order lands.
- rollups: each upsert takes its rows in key order (`ORDER BY 1, 2`), after all of its
  round's `orders` rows, so rounds lock rollup rows in one global order (table, then key): no
  deadlock, and the sums stay those of a recompute over `orders`. Rounds that add to the same
  rollup rows (the current hour's categories, today's products) wait for each other from
  that upsert to their commit: the short tail of a round (staging delete, ledger, commit).
- outbox: `fanout.relay` publishes the oldest row and then deletes rows up to its id, so ids
  must become visible in id order. Concurrent rounds draw ids from the sequence in one order
  and may commit in another; so each round, as its last step, takes OUTBOX_ORDER_LOCK and
  gives its outbox rows fresh ids, holding the lock until it commits: ids follow commit order.
- ledger rows, staging rows and quarantine rows belong to one shard's batches.
A deadlock or serialisation failure that still happens (e.g. with a replay's reprocess, or in
the one-batch-at-a-time path below) is transient (`is_transient`), never poison:
`promote_round` rolls the round back and tries it again (up to TRANSIENT_ATTEMPTS) when it
owns the transaction.

A poison batch never blocks the others: when the round fails with an error that retrying
cannot fix (`is_poison`), its batches are promoted one by one, each in its own savepoint, and
a batch that fails alone is quarantined in the same transaction (ledger status, error text,
time, raw payloads; its staging rows deleted). `orders-pipeline readmit` hands it back.
"""

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

import psycopg
from psycopg.pq import TransactionStatus

from orders_pipeline import contract
from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns.partitions import (
    ensure_months,
    missing_months,
    month_of,
)
from orders_pipeline.postgres_patterns.replay import reprocess_staged
from orders_pipeline.postgres_patterns.views import PROMOTE_LOCK, ROLLUPS, rollup_upsert

ORDER_COLUMNS = (*contract.ORDER_COLUMNS, "batch_id")
_COLUMNS = ", ".join(ORDER_COLUMNS)
# Ids of outbox rows become visible in id order (see the module docstring).
OUTBOX_ORDER_LOCK = "orders_pipeline.promoted_outbox.order"
# Shards are `ingest_batches.shard` (smallint) and the second key of the shard lock (int).
MAX_SHARD = 32767
# Tries of a round that meets a transient error (deadlock, serialisation failure).
TRANSIENT_ATTEMPTS = 5
TRANSIENT_SQLSTATES = ("40001", "40P01", "55P03")  # serialization, deadlock, lock timeout


def _in_key_order(statement: str) -> str:
    """A rollup upsert (`views.rollup_upsert`) that takes its rows in key order, so that
    concurrent rounds lock rollup rows in one global order (unchanged if it already does)."""
    if "ORDER BY 1, 2" in statement:
        return statement
    grouped = "GROUP BY 1, 2"
    if statement.count(grouped) != 1:
        raise RuntimeError(f"rollup upsert without exactly one {grouped!r}: {statement}")
    return statement.replace(grouped, f"{grouped} ORDER BY 1, 2")


def _insert_orders(order_by: str) -> str:
    """Insert the batches' staged rows (in `order_by` order, if any) into `orders` and their
    ids into the guard `order_ids`; fold exactly the rows that landed (inserted, and their id
    new to the guard) into the view rollups in key order, and list their ids in the fan-out
    outbox, one row per batch (`postgres_patterns.promoted_outbox`). Returns the rows that
    landed, the ids of the outbox rows written, and the (order_id, order_timestamp) of the
    rows inserted whose id the guard already held: a copy of a stored order dated
    differently (another key of `orders`), which the caller deletes. Of several copies in one
    statement the first inserted lands. Built from constants only."""
    return f"""
WITH inserted AS (
    INSERT INTO orders ({_COLUMNS})
    SELECT {_COLUMNS} FROM orders_staging WHERE batch_id = ANY(%(batches)s)
    {order_by}
    ON CONFLICT (order_id, order_timestamp) DO NOTHING
    RETURNING order_id, batch_id, order_timestamp, category, product_id, quantity,
              total_amount_usd
), guarded AS (
    INSERT INTO order_ids (order_id, order_timestamp)
    SELECT order_id, order_timestamp FROM inserted
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_id, order_timestamp
), landed AS (
    SELECT i.* FROM inserted i JOIN guarded g USING (order_id, order_timestamp)
), {", ".join(f"add_to_{rollup} AS ({_in_key_order(rollup_upsert(rollup, 'landed'))})"
         for rollup in ROLLUPS)}, to_outbox AS (
    INSERT INTO promoted_outbox (batch_id, order_ids)
    SELECT batch_id, array_agg(order_id) FROM landed GROUP BY batch_id
    RETURNING outbox_id
), refused AS (
    SELECT i.order_id, i.order_timestamp FROM inserted i
    LEFT JOIN guarded g USING (order_id, order_timestamp) WHERE g.order_id IS NULL
)
SELECT (SELECT count(*) FROM landed), ARRAY(SELECT outbox_id FROM to_outbox),
       ARRAY(SELECT order_id FROM refused), ARRAY(SELECT order_timestamp FROM refused)
"""
# Rows a round inserted whose id the guard held already (see above). Found in the statement
# itself, so the guard decides even if it and `orders` were let drift apart by hand (e.g. a
# partition truncated): a later copy is then refused, never doubled, and never blocks.
_DELETE_REFUSED = """
DELETE FROM orders o USING unnest(%s::text[], %s::timestamptz[]) AS r(order_id, order_timestamp)
WHERE o.order_id = r.order_id AND o.order_timestamp = r.order_timestamp
"""
# Sorts and hash aggregates of a round's statement (rollups, outbox, guard join) over up to
# max_batches x batch size rows: 4 MB made them spill to disk, 64 MB kept a 200k-order round
# in memory and took it from 2.4-2.6 s to 2.2 s (side measurement, this machine).
PROMOTION_WORK_MEM = "64MB"


# A shard round inserts in order_id order, so that rounds beside it that share ids lock them
# in the same order (no deadlock); of several copies of an id the first in ledger order
# (staging rows carry their batch's ledger `staged_at`: one transaction writes both), then by
# batch position, is tried first and lands. The sort made one round 5-14 % slower than heap
# order in side measurements (BENCHMARKS.md "Promotion scale-out"), so an all-shards round,
# which runs alone, keeps heap order (staging order), as before shards.
_INSERT_IN_ID_ORDER = _insert_orders(
    'ORDER BY order_id COLLATE "C", staged_at, batch_id, batch_position')
_INSERT_IN_HEAP_ORDER = _insert_orders("")
_RENUMBER_OUTBOX = """
UPDATE promoted_outbox
SET outbox_id = nextval(pg_get_serial_sequence('promoted_outbox', 'outbox_id'))
WHERE outbox_id = ANY(%s)
"""
_LEDGER_ALL = """
SELECT batch_id, staged_rows FROM ingest_batches WHERE status = 'staged'
ORDER BY staged_at, batch_id LIMIT %s FOR UPDATE
"""
_LEDGER_OF_SHARD = """
SELECT batch_id, staged_rows FROM ingest_batches WHERE status = 'staged' AND shard = %s
ORDER BY staged_at, batch_id LIMIT %s FOR UPDATE
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


def is_transient(exc: psycopg.Error) -> bool:
    """True if the same work may well succeed when tried again: a serialisation failure
    (40001), a deadlock that Postgres broke by aborting this transaction (40P01) or a lock
    timeout (55P03). Never poison (`is_poison`); `promote_round` retries these itself."""
    return (exc.sqlstate or "") in TRANSIENT_SQLSTATES


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
    quarantined, staged rows of the promoted batches and rows they inserted, seconds (of the
    last try); the entries the relay published to `{P}:promoted` after them
    (`fanout.relay`); and how often a round was tried again after a transient error."""
    promoted_batches: list[str] = field(default_factory=list)
    lost_batches: list[str] = field(default_factory=list)
    quarantined: list[QuarantinedBatch] = field(default_factory=list)
    staged_rows: int = 0
    inserted_rows: int = 0
    seconds: float = 0.0
    entries_published: int = 0
    retries: int = 0

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
        self.retries += other.retries


def _promote(conn: psycopg.Connection, batches: list[str], in_id_order: bool
             ) -> tuple[int, list[int]]:
    """Move the batches' staged rows into `orders`, the rollups and the outbox; returns the
    rows inserted and the ids of the outbox rows written. Rows of replay batches of a
    reprocess first replace the stored orders they recompute. `in_id_order`: insert in
    order_id order (a shard round, beside others)."""
    reprocess_staged(conn, batches)
    landed, outbox_ids, refused_ids, refused_stamps = conn.execute(
        _INSERT_IN_ID_ORDER if in_id_order else _INSERT_IN_HEAP_ORDER,
        {"batches": batches}).fetchone()
    if refused_ids:
        conn.execute(_DELETE_REFUSED, (refused_ids, refused_stamps))
    crash_point("mid_promotion")
    conn.execute("DELETE FROM orders_staging WHERE batch_id = ANY(%s)", (batches,))
    conn.execute("UPDATE ingest_batches SET status = 'promoted', promoted_at = now()"
                 " WHERE batch_id = ANY(%s)", (batches,))
    return int(landed), list(outbox_ids)


def _promote_apart(conn: psycopg.Connection, batches: list[str], in_id_order: bool
                   ) -> tuple[list[str], int, list[int], dict[str, str]]:
    """Promote the batches together, or, if that meets poison, each alone in a savepoint.

    Returns the batches promoted, the rows inserted, the outbox row ids written, and the
    error text of each batch that failed alone with a poison error. Any other error
    propagates.
    """
    try:
        with conn.transaction():
            inserted, outbox_ids = _promote(conn, batches, in_id_order)
            return batches, inserted, outbox_ids, {}
    except psycopg.Error as exc:
        if not is_poison(exc):
            raise
        if len(batches) == 1:
            return [], 0, [], {batches[0]: error_text(exc)}
    promoted: list[str] = []
    inserted = 0
    outbox_ids: list[int] = []
    failed: dict[str, str] = {}
    for batch_id in batches:
        try:
            with conn.transaction():
                rows, ids = _promote(conn, [batch_id], in_id_order)
        except psycopg.Error as exc:
            if not is_poison(exc):
                raise
            failed[batch_id] = error_text(exc)
        else:
            promoted.append(batch_id)
            inserted += rows
            outbox_ids += ids
    return promoted, inserted, outbox_ids, failed


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


# Staged rows per batch, with the UTC months of their earliest and latest order.
_PRESENT = """
SELECT batch_id, count(*), min(order_timestamp), max(order_timestamp)
FROM orders_staging WHERE batch_id = ANY(%s) GROUP BY batch_id
"""
_MONTHS_OF = """
SELECT DISTINCT date_trunc('month', order_timestamp AT TIME ZONE 'UTC')::date
FROM orders_staging WHERE batch_id = ANY(%s)
"""


class _PartitionsMissing(Exception):
    """The round's rows need month partitions that do not exist yet (`months`)."""

    def __init__(self, months: list[date]) -> None:
        super().__init__(f"partitions missing for {months}")
        self.months = months


def _ensure_partitions(conn: psycopg.Connection, batches: list[str],
                       spans: list[tuple[datetime, datetime]], own_transaction: bool) -> None:
    """Make sure the month partitions of `orders` that the batches' rows need exist (usually
    they do: they are created ahead). A batch whose orders span two months or more is asked
    for its months exactly, so a stray date needs its own month only, never those between.

    Creating a partition locks `orders` until its transaction commits, which would hold up
    every other round for the length of this one: so when the round owns its transaction it
    raises _PartitionsMissing instead, and `promote_round` creates them in a short
    transaction of their own and runs the round again; inside a caller's transaction they
    are created in place."""
    months = {month_of(first) for first, last in spans if month_of(first) == month_of(last)}
    spanning = [b for b, (first, last) in zip(batches, spans, strict=True)
                if month_of(first) != month_of(last)]
    if spanning:
        months |= {row[0] for row in conn.execute(_MONTHS_OF, (spanning,))}
    missing = missing_months(conn, sorted(months))
    if missing and own_transaction:
        raise _PartitionsMissing(missing)
    ensure_months(conn, missing)


def _lock_promotion(conn: psycopg.Connection, shard: int | None) -> None:
    """Inside the round's transaction: PROMOTE_LOCK exclusively (all shards), or shared and
    then the shard's own two-key lock exclusively (see the module docstring)."""
    if shard is None:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (PROMOTE_LOCK,))
        return
    conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s))", (PROMOTE_LOCK,))
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", (PROMOTE_LOCK, shard))


def _round(conn: psycopg.Connection, max_batches: int, payloads_of: PayloadSource | None,
           shard: int | None, own_transaction: bool) -> PromotionResult:
    """One round in one transaction (see `promote_round`)."""
    started = time.perf_counter()
    result = PromotionResult()
    with conn.transaction():
        conn.execute("SELECT set_config('work_mem', %s, true)", (PROMOTION_WORK_MEM,))
        _lock_promotion(conn, shard)
        ledger = dict(conn.execute(_LEDGER_ALL, (max_batches,)).fetchall() if shard is None
                      else conn.execute(_LEDGER_OF_SHARD, (shard, max_batches)).fetchall())
        if not ledger:
            return result
        present = {batch: (rows, first, last) for batch, rows, first, last in conn.execute(
            _PRESENT, (list(ledger),)).fetchall()}
        ready = [b for b, rows in ledger.items() if present.get(b, (0,))[0] == rows]
        with_rows = [b for b in ready if b in present]
        _ensure_partitions(conn, with_rows, [present[b][1:] for b in with_rows],
                           own_transaction)
        result.lost_batches = [b for b in ledger if b not in set(ready)]
        outbox_ids: list[int] = []
        if ready:
            promoted, inserted, outbox_ids, failed = _promote_apart(conn, ready,
                                                                    shard is not None)
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
        if outbox_ids:  # last: held from here to the commit
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (OUTBOX_ORDER_LOCK,))
            conn.execute(_RENUMBER_OUTBOX, (outbox_ids,))
    result.seconds = time.perf_counter() - started
    return result


def promote_round(conn: psycopg.Connection, max_batches: int = 400,
                  payloads_of: PayloadSource | None = None, *,
                  shard: int | None = None) -> PromotionResult:
    """Promote up to `max_batches` staged batches in one transaction, oldest first.

    `shard` None: batches of every shard, one such round at a time and none beside a shard
    round. `shard` s (0 … MAX_SHARD): batches of shard s only, one round of s at a time,
    beside rounds of other shards (module docstring; `staged_shards` lists the shards with
    work). Batches whose staged rows are incomplete are marked `lost` (`lost_batches`). A
    batch that cannot be promoted even alone, for a reason retrying cannot fix
    (`is_poison`), is quarantined (`quarantined`) in the same transaction, and the others are
    promoted: `payloads_of(batch_id)` gives its raw payloads to keep in
    `quarantined_payloads` (without it, none are kept). A transient error (`is_transient`:
    deadlock, serialisation failure, lock timeout) rolls the round back and, when `conn` had
    no transaction open, the round is tried again after a short random pause, up to
    TRANSIENT_ATTEMPTS times in all (`retries` counts the extra tries); then, or inside the
    caller's transaction, it propagates. Any other error propagates and nothing of the round
    is committed. Month partitions of `orders` that the rows need are created first, in a
    transaction of their own when `conn` had none open. Raises ValueError for a shard out of
    range.
    """
    if shard is not None and not 0 <= shard <= MAX_SHARD:
        raise ValueError(f"shard must be 0 to {MAX_SHARD}, not {shard}")
    owns_transaction = conn.info.transaction_status == TransactionStatus.IDLE
    attempt = 1
    created_partitions = False
    while True:
        try:
            result = _round(conn, max_batches, payloads_of, shard,
                            owns_transaction and not created_partitions)
        except _PartitionsMissing as missing:  # once; a second time creates in the round
            with conn.transaction():
                ensure_months(conn, missing.months)
            created_partitions = True
            continue
        except psycopg.Error as exc:
            if (not is_transient(exc) or not owns_transaction
                    or attempt >= TRANSIENT_ATTEMPTS):
                raise
            time.sleep(random.uniform(0.01, 0.05) * 2 ** attempt)
            attempt += 1
            continue
        result.retries = attempt - 1
        return result


def staged_shards(conn: psycopg.Connection) -> list[int]:
    """The shards that have staged batches, ascending (one query on a partial index).

    A connection without a transaction open is left without one (so that the next
    `promote_round` on it runs, commits and retries in a transaction of its own); inside the
    caller's transaction the query is simply part of it.
    """
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    shards = [int(row[0]) for row in conn.execute(
        "SELECT DISTINCT shard FROM ingest_batches WHERE status = 'staged' ORDER BY 1")]
    if idle and not conn.autocommit:
        conn.rollback()
    return shards


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
