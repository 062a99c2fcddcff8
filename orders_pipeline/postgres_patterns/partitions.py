"""Month partitions of `orders`: created ahead, and dropped by retention (issue 10, item 1).

`orders` is partitioned by the UTC month of `order_timestamp` (sql/015_partitioned_orders.sql,
partitions `orders_pYYYYMM`); `order_ids` keeps each order id stored once across them. The
partitions a promotion needs are created by the promotion itself (`ensure_months`), init-db
creates the current month and the next three, and `ensure_ahead` (called by the
`promoted_orders` asset) keeps PARTITIONS_AHEAD months ready, so the hot path rarely creates
one (creating a partition locks `orders` until its transaction commits).

Retention (`apply_retention`, CLI `orders-pipeline retention`) drops every month before a
horizon: the partitions, the rollup rows and the month views of both dashboard views, and
records the horizon, under which staging rejects orders dated before it (`retention_horizon`,
`staging.stage_batch`). Promotion waits only for two short transactions (recording the horizon;
dropping the months): the dropped orders are counted between them, and their ids are deleted
from `order_ids` after them (`forget_ids_before`: one pass over the whole guard, which has no
index by time), both without the promotion lock. Ids of dropped orders are forgotten with them:
a copy of one that arrives later is rejected if it is dated before the horizon, and stored
again if it is dated after it (until the ids are deleted it is refused as a copy, counted as a
promotion conflict; an interrupted deletion is finished by the next retention).
"""

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import psycopg
from psycopg import sql

from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns.views import (
    PROMOTE_LOCK,
    drop_slices_before,
    validated_month,
)

PARTITIONS_AHEAD = 3
# Retention against staging: staging holds it shared while it checks the horizon, retention
# exclusively while it moves the horizon (so no batch is staged under the old horizon after
# retention looked at staging).
RETENTION_LOCK = "orders_pipeline.retention"
# One retention at a time (a session lock over all its steps; promotion never takes it).
RETENTION_RUN_LOCK = "orders_pipeline.retention.run"
HORIZON_REASON = ("order_timestamp is before the retention horizon {horizon} (months before "
                  "it were dropped by `orders-pipeline retention`)")


class RetentionRefused(ValueError):
    """Retention cannot run now or with these arguments; the text says why and what to do."""


@dataclass(frozen=True)
class Partition:
    """One month partition of `orders`: its relation name, month (first day, UTC), rows
    (planner estimate, from `pg_class.reltuples`; -1 before the first ANALYZE) and bytes
    (heap + indexes + TOAST)."""
    name: str
    month: date
    estimated_rows: int
    total_bytes: int


@dataclass
class RetentionResult:
    """What retention dropped (or, with dry_run, would drop): the horizon in force after it
    (a later one set before is kept), the partitions by name, the orders in them, the ids
    removed from `order_ids` (also those an interrupted retention left), the month views
    dropped, and the seconds promotion was locked out (from the promotion lock taken to the
    drops committed) and the ids took."""
    horizon: date
    dry_run: bool
    partitions: list[str] = field(default_factory=list)
    orders: int = 0
    ids: int = 0
    view_slices: list[str] = field(default_factory=list)
    locked_seconds: float = 0.0
    ids_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {"horizon": self.horizon.isoformat(), "dry_run": self.dry_run,
                "partitions": self.partitions, "orders": self.orders, "ids": self.ids,
                "view_slices": self.view_slices,
                "locked_seconds": round(self.locked_seconds, 3),
                "ids_seconds": round(self.ids_seconds, 3)}


def month_of(instant: datetime | date) -> date:
    """The first day of the UTC month of `instant` (a date stands for itself)."""
    if isinstance(instant, datetime):
        instant = instant.astimezone(UTC).date()
    return date(instant.year, instant.month, 1)


def parse_month(text: str) -> date:
    """`YYYY-MM` (year 0001 to 9999) as the first day of that month; ValueError otherwise.
    The CLI's `--before` and the Dagster job's `before` read it."""
    match = re.fullmatch(r"([0-9]{4})-([0-9]{2})", text.strip())
    if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1:
        raise ValueError(f"{text!r} is not a month as YYYY-MM (e.g. 2024-01)")
    return date(int(match[1]), int(match[2]), 1)


def add_months(month: date, count: int) -> date:
    """The first day of the month `count` months after (before, if negative) `month`'s."""
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def month_start(month: date) -> datetime:
    """The first instant of `month` (any day of it) in UTC: where its partition begins."""
    return datetime(month.year, month.month, 1, tzinfo=UTC)


MAX_KEEP_MONTHS = 1200  # a hundred years


def horizon_keeping(months: int, now: datetime | None = None) -> date:
    """The retention horizon that keeps the current UTC month (of `now`, default now) and the
    `months` - 1 before it; ValueError unless 1 <= `months` <= MAX_KEEP_MONTHS."""
    if not 1 <= months <= MAX_KEEP_MONTHS:
        raise ValueError(f"months to keep must be 1 to {MAX_KEEP_MONTHS}, not {months}")
    return add_months(month_of(now or datetime.now(UTC)), 1 - months)


def ensure_months(conn: psycopg.Connection, months: list[date]) -> int:
    """Create the partitions missing for `months` (any day stands for its month; months
    before the retention horizon are skipped), inside the caller's transaction or its own;
    returns how many were created."""
    if not months:
        return 0
    return int(conn.execute("SELECT orders_ensure_months(%s::date[])",
                            (sorted(set(months)),)).fetchone()[0])


def missing_months(conn: psycopg.Connection, months: list[date]) -> list[date]:
    """Of `months` (firsts of months), those without a partition and not before the
    retention horizon, ascending (the SQL function `orders_missing_months`, which
    `orders_ensure_months` creates from); takes no lock."""
    if not months:
        return []
    return [row[0] for row in conn.execute("SELECT orders_missing_months(%s::date[])",
                                           (sorted(set(months)),))]


def ensure_ahead(conn: psycopg.Connection, months_ahead: int = PARTITIONS_AHEAD) -> int:
    """Create the partitions of this UTC month and the `months_ahead` after it; committed
    here. Returns how many were created."""
    this = month_of(datetime.now(UTC))
    months = [add_months(this, n) for n in range(months_ahead + 1)]
    with conn.transaction():
        return ensure_months(conn, months)


def partitions(conn: psycopg.Connection) -> list[Partition]:
    """The month partitions of `orders`, oldest first."""
    rows = conn.execute(
        "SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid)"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'orders'::regclass ORDER BY c.relname").fetchall()
    return [Partition(name, date(int(name[-6:-2]), int(name[-2:]), 1), int(estimate),
                      int(size)) for name, estimate, size in rows]


def retention_horizon(conn: psycopg.Connection) -> date | None:
    """The retention horizon (first day of a UTC month), or None if retention never ran."""
    row = conn.execute("SELECT horizon FROM orders_retention").fetchone()
    return None if row is None else row[0]


def apply_retention(conn: psycopg.Connection, horizon: date, *,
                    dry_run: bool = False) -> RetentionResult:
    """Drop every month before `horizon` (the first day of a month) from `orders`, the
    rollups and the dashboard views, then their ids from `order_ids`, in transactions
    committed here; with `dry_run`, report what it would drop and change nothing.

    Four steps, so that promotion waits only for two short ones (`locked_seconds`):
    1. under PROMOTE_LOCK and RETENTION_LOCK (exclusive): refuse if staged orders dated before
       the horizon wait; record the horizon (the later of it and the one in force), from
       which on staging rejects orders dated before it;
    2. without the locks: count the orders of each partition before the horizon in force
       (exact, a term of conservation; nothing enters those months any more);
    3. under both locks again: drop those partitions, the rollup rows and month views before
       the horizon, and add the counted orders to `orders_retention.dropped_orders`;
    4. without the locks: `forget_ids_before` the horizon in force.
    A retention that died after step 1 or 3 is finished by the next one (given any horizon).
    A dry run does steps 1-3 in one transaction it rolls back (holding the locks while it
    counts) and counts the ids of step 4.

    Raises RetentionRefused if `horizon` is not the first of a month, lies after the current
    UTC month (it would drop orders still arriving), or staged orders dated before it wait
    for promotion (promote them first: they would land in a month being dropped). ValueError
    if `conn` has a transaction open (the steps would become savepoints of it, committed by
    no one here).
    """
    try:
        horizon = validated_month(horizon)
    except ValueError as exc:
        raise RetentionRefused(f"retention horizon {horizon}: {exc}") from None
    if horizon > month_of(datetime.now(UTC)):
        raise RetentionRefused(
            f"retention horizon {horizon} lies after the current month: it would drop orders "
            "still arriving; give this month or an earlier one")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("apply_retention commits its own transactions: call it on a "
                         "connection with none open (commit or roll back first)")
    result = RetentionResult(horizon, dry_run)
    with _one_retention_at_a_time(conn):
        return _apply_retention(conn, result)


@contextlib.contextmanager
def _one_retention_at_a_time(conn: psycopg.Connection) -> Iterator[None]:
    """Hold RETENTION_RUN_LOCK (a session lock, not promotion's) for the block: a second
    retention waits, so none counts a partition another is dropping."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (RETENTION_RUN_LOCK,))
    try:
        yield
    finally:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (RETENTION_RUN_LOCK,))


def _apply_retention(conn: psycopg.Connection, result: RetentionResult) -> RetentionResult:
    """The steps of `apply_retention`, whose arguments are checked."""
    dry_run = result.dry_run
    if dry_run:
        with conn.transaction():
            _set_horizon(conn, result)
            _drop_months(conn, result, _count_months(conn, result.horizon))
            raise psycopg.Rollback()  # leaves the block, rolled back; nothing raised
        started = time.perf_counter()
        with conn.transaction():
            result.ids = int(conn.execute(
                "SELECT count(*) FROM order_ids WHERE order_timestamp < %s",
                (month_start(result.horizon),)).fetchone()[0])
        result.ids_seconds = time.perf_counter() - started
        return result
    with conn.transaction():
        _set_horizon(conn, result)
    crash_point("retention_after_horizon")
    with conn.transaction():
        counts = _count_months(conn, result.horizon)
    with conn.transaction():
        _drop_months(conn, result, counts)
    crash_point("retention_after_drops")
    started = time.perf_counter()
    result.ids = forget_ids_before(conn, result.horizon)
    result.ids_seconds = time.perf_counter() - started
    return result


def _lock_out_promotion(conn: psycopg.Connection) -> float:
    """Take PROMOTE_LOCK and RETENTION_LOCK exclusively for the transaction; returns the
    `time.perf_counter()` at which promotion was locked out."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (PROMOTE_LOCK,))
    locked = time.perf_counter()
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (RETENTION_LOCK,))
    return locked


def _set_horizon(conn: psycopg.Connection, result: RetentionResult) -> None:
    """Step 1 of `apply_retention`, inside the caller's transaction; sets `result.horizon` to
    the horizon in force. Raises RetentionRefused when staged orders dated before it wait."""
    locked = _lock_out_promotion(conn)
    waiting = conn.execute("SELECT count(*) FROM orders_staging WHERE order_timestamp < %s",
                           (month_start(result.horizon),)).fetchone()[0]
    if waiting:
        raise RetentionRefused(
            f"{waiting} staged orders are dated before {result.horizon} and wait for "
            "promotion; run `orders-pipeline promote`, then retention again")
    result.horizon = conn.execute(
        "INSERT INTO orders_retention (horizon, dropped_orders) VALUES (%s, 0)"
        " ON CONFLICT (singleton) DO UPDATE SET"
        " horizon = greatest(orders_retention.horizon, EXCLUDED.horizon), applied_at = now()"
        " RETURNING horizon", (result.horizon,)).fetchone()[0]
    result.locked_seconds += time.perf_counter() - locked


def _orders_in(conn: psycopg.Connection, partition: str) -> int:
    """The orders in one partition of `orders`, counted exactly (a scan)."""
    return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        sql.Identifier(partition))).fetchone()[0])


def _count_months(conn: psycopg.Connection, horizon: date) -> dict[str, int]:
    """Step 2: the orders in each partition before `horizon`, by partition name."""
    return {p.name: _orders_in(conn, p.name) for p in partitions(conn) if p.month < horizon}


def _drop_months(conn: psycopg.Connection, result: RetentionResult,
                 counts: dict[str, int]) -> None:
    """Step 3, inside the caller's transaction: drop the partitions before `result.horizon`
    (their orders as `counts` says; one it lacks is counted now), the rollup rows and month
    views; add the orders to `orders_retention.dropped_orders`."""
    locked = _lock_out_promotion(conn)
    for partition in partitions(conn):
        if partition.month >= result.horizon:
            continue
        orders = counts.get(partition.name)
        if orders is None:
            orders = _orders_in(conn, partition.name)
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition.name)))
        result.orders += orders
        result.partitions.append(partition.name)
    result.view_slices = drop_slices_before(conn, result.horizon)
    conn.execute("UPDATE orders_retention SET dropped_orders = dropped_orders + %s",
                 (result.orders,))
    result.locked_seconds += time.perf_counter() - locked


def forget_ids_before(conn: psycopg.Connection, horizon: date) -> int:
    """Delete from `order_ids` every id dated before `horizon` (first day of a month), also
    one whose partition went by hand, in one transaction committed here, without the
    promotion lock (row locks on the deleted ids only: a promotion inserting one of them
    waits for this and then stores it). Returns how many went."""
    with conn.transaction():
        return conn.execute("DELETE FROM order_ids WHERE order_timestamp < %s",
                            (month_start(horizon),)).rowcount
