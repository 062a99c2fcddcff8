"""Dashboard views: one materialized view per UTC month behind each name, refreshed
CONCURRENTLY (readers never blocked) and only where the data changed.

Shape (sql/030_views.sql, sql/080_view_slices.sql). Promotion, replay and re-drive add orders
to two rollup tables in their own transactions (`rollup_upsert`). Each dashboard name
(`VIEWS`) is a plain view that UNION ALLs the month views of its rollup, e.g.
`sales_hourly_m202611`: a materialized view of one UTC month of `sales_hourly_rollup`,
selected by a range on the rollup's primary key, with the unique index that
`REFRESH MATERIALIZED VIEW CONCURRENTLY` needs and an index on what dashboards filter by.
Statement-level triggers on the rollups record every month a statement changed in
`view_slices_stale` (one row per month and statement, never updated); `view_slices` lists the
month views that exist.

Refreshing (`refresh_views`, `refresh_view`, `refresh_month`, `refresh_all_slices`):
- the changed months of one view are refreshed in one transaction (dashboards see them
  change together), each under an advisory lock of its view and month, taken in month order:
  refreshes from anywhere (promotion's Dagster step, the CLI, the UI, replay) serialise per
  month while different months refresh at the same time;
- the marks cleared are exactly those read under that lock before the refresh: a mark added
  meanwhile (by a promotion that committed after the refresh took its snapshot) survives for
  the next refresh. Clearing "every mark up to the highest id read" would not be safe: ids
  are drawn before commit, so a lower id can commit after a higher one was read;
- a month with changes but no view yet (its first orders) gets one: created from the rollup
  (without blocking anyone), then the dashboard view is re-pointed to include it with
  `CREATE OR REPLACE VIEW`. That one statement needs an ACCESS EXCLUSIVE lock on the
  dashboard view: it waits for the dashboard queries in progress, and queries arriving
  meanwhile wait behind it. It waits at most `REPOINT_LOCK_TIMEOUT` per attempt (then gives
  way and tries again, `REPOINT_ATTEMPTS` times), and holds the lock for a catalog update
  only (milliseconds). Each time it does, the views of the current UTC month and the
  `MONTHS_AHEAD` months after it are created too (empty), so with orders arriving in real
  time the dashboard views change about once a year, plus once per month that first gets
  late or future orders.

Months are the first day of a UTC month (`datetime.date`), years 1 to 9998. Any Postgres
error propagates as `psycopg.Error` (e.g. `psycopg.errors.LockNotAvailable` when the
dashboard view stayed busy through every attempt to re-point it: retry later, nothing is
lost, the marks stay).
"""

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

import psycopg
from psycopg import sql

VIEWS = ("sales_hourly", "product_performance_daily")
_REFRESH_LOCK = "orders_pipeline.refresh_views"
_SLICE_DDL_LOCK = "orders_pipeline.view_slices.ddl"
PROMOTE_LOCK = "orders_pipeline.promote"

# rollup table -> (its key columns, the expressions that compute them from an order row).
# The SQL below is assembled from these constants only, never from input.
ROLLUPS = {
    "sales_hourly_rollup": ("hour, category",
                            "date_trunc('hour', order_timestamp, 'UTC'), category"),
    "product_daily_rollup": ("day, product_id",
                             "(order_timestamp AT TIME ZONE 'UTC')::date, product_id"),
}

# Created with every re-pointing of a dashboard view: the current UTC month and this many after.
MONTHS_AHEAD = 12
# Re-pointing a dashboard view: how long one attempt waits for its lock, and how many are made.
REPOINT_LOCK_TIMEOUT = "200ms"
REPOINT_ATTEMPTS = 50
_REPOINT_PAUSE_SECONDS = 0.1
MIN_MONTH = date(1, 1, 1)
MAX_MONTH = date(9998, 12, 1)


@dataclass(frozen=True)
class _Shape:
    """How one dashboard view is sliced: its rollup, the rollup's time key (timestamptz
    `hour` or date `day`) and its other key column."""

    rollup: str
    time_key: str
    other_key: str
    timestamped: bool

    @property
    def columns(self) -> sql.Composable:
        return sql.SQL(", ").join(map(sql.Identifier, (
            self.time_key, self.other_key, "order_count", "units_sold", "revenue_usd")))

    def month_of(self) -> sql.Composable:
        """SQL: the UTC month (first day, a date) of the time key (sql/080's function)."""
        return sql.SQL("view_slice_month({})").format(sql.Identifier(self.time_key))

    def _start(self, month: date) -> sql.Composable:
        """SQL literal: the first instant (or day) of `month`, in the time key's type."""
        return sql.Literal(datetime(month.year, month.month, 1, tzinfo=UTC)
                           if self.timestamped else month)

    def in_month(self, month: date) -> sql.Composable:
        """SQL: the time key lies in `month` (a range, so an index on the key serves it)."""
        return sql.SQL("{key} >= {low} AND {key} < {high}").format(
            key=sql.Identifier(self.time_key), low=self._start(month),
            high=self._start(_next_month(month)))

    def before(self, month: date) -> sql.Composable:
        """SQL: the time key lies before `month`."""
        return sql.SQL("{key} < {low}").format(key=sql.Identifier(self.time_key),
                                               low=self._start(month))


SHAPES = {
    "sales_hourly": _Shape("sales_hourly_rollup", "hour", "category", timestamped=True),
    "product_performance_daily": _Shape("product_daily_rollup", "day", "product_id",
                                        timestamped=False),
}


@dataclass(frozen=True)
class SliceRefresh:
    """One month view made fresh.

    `view`: the dashboard name; `month`: first day of the UTC month; `relation`: the month
    view's name; `seconds`: wall time of its refresh (or creation), lock wait included;
    `created`: it did not exist and was built from the rollup; `marks_cleared`: rows of
    `view_slices_stale` it covered and deleted (0 when refreshed on request, unchanged).
    """

    view: str
    month: date
    relation: str
    seconds: float
    created: bool
    marks_cleared: int


@dataclass(frozen=True)
class Slice:
    """A month view listed in `view_slices`.

    `in_union`: the dashboard view reads it (False between its creation and the re-pointing);
    `refreshed_at`: its last refresh or creation (UTC); `refreshes`: how many, creation
    included.
    """

    view: str
    month: date
    relation: str
    in_union: bool
    refreshed_at: datetime | None
    refreshes: int


def rollup_upsert(rollup: str, source: str, *, signed: bool = False) -> str:
    """SQL adding the orders of `source` (a table or CTE name) to one rollup table.

    Quantities are summed as bigint, which Postgres adds up as numeric: no sum overflows
    however many orders share a row (the widths are derived in sql/030_views.sql). With
    `signed`, `source` has a column `sign` (1 adds the order, -1 takes it away again).
    """
    key, expressions = ROLLUPS[rollup]
    sums = ("sum(sign), sum(sign * quantity::bigint), sum(sign * total_amount_usd)" if signed
            else "count(*), sum(quantity::bigint), sum(total_amount_usd)")
    return f"""
    INSERT INTO {rollup} AS r
    SELECT {expressions}, {sums}
    FROM {source} GROUP BY 1, 2
    ON CONFLICT ({key}) DO UPDATE SET
        order_count = r.order_count + EXCLUDED.order_count,
        units_sold = r.units_sold + EXCLUDED.units_sold,
        revenue_usd = r.revenue_usd + EXCLUDED.revenue_usd"""


def rebuild_rollups(conn: psycopg.Connection, *, only_if_empty: bool = False) -> bool:
    """Recompute the rollups from `orders`, serialised with promotion; True if it did.

    For a database that had orders before the rollups existed, or after `orders` was
    changed by hand; promotion keeps them current otherwise. The rollups' triggers mark every
    month (TRUNCATE marks every month view, the insert every month with orders), so the next
    refresh brings the views along.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (PROMOTE_LOCK,))
        if only_if_empty and conn.execute(
                "SELECT EXISTS (SELECT 1 FROM sales_hourly_rollup)"
                " OR EXISTS (SELECT 1 FROM product_daily_rollup)"
                " OR NOT EXISTS (SELECT 1 FROM orders)").fetchone()[0]:
            return False
        for rollup in ROLLUPS:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(rollup)))
            conn.execute(rollup_upsert(rollup, "orders"))
    return True


# --- month views --------------------------------------------------------------------------


def _view(view: str) -> _Shape:
    if view not in SHAPES:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    return SHAPES[view]


def validated_month(month: date) -> date:
    """`month` if it is a `datetime.date` (not a datetime) on the first of a month of the
    years 1 to 9998; ValueError otherwise."""
    if not isinstance(month, date) or isinstance(month, datetime):
        raise ValueError(f"month must be a datetime.date, got {type(month).__name__}")
    if month.day != 1 or not MIN_MONTH <= month <= MAX_MONTH:
        raise ValueError(f"month must be the first day of a month from {MIN_MONTH} to "
                         f"{MAX_MONTH}, got {month}")
    return month


def _next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def month_relation(view: str, month: date) -> str:
    """Name of the month view of `view` for `month`, e.g. `sales_hourly_m202611`.

    Raises ValueError for an unknown view or a month `validated_month` refuses.
    """
    _view(view)
    month = validated_month(month)
    return f"{view}_m{month.year:04d}{month.month:02d}"


def _month_key(month: date) -> int:
    """Second key of a month view's advisory lock: months since year 0 (fits int4)."""
    return month.year * 12 + month.month - 1


def slices(conn: psycopg.Connection, view: str | None = None) -> list[Slice]:
    """The month views (of `view`, or of both), by view and month."""
    rows = conn.execute(
        "SELECT view_name, month, relation_name, in_union, refreshed_at, refreshes"
        " FROM view_slices WHERE %(view)s::text IS NULL OR view_name = %(view)s"
        " ORDER BY view_name, month", {"view": view}).fetchall()
    return [Slice(*row) for row in rows]


def stale_slices(conn: psycopg.Connection, views: Iterable[str] = VIEWS
                 ) -> list[tuple[str, date]]:
    """(view, month) pairs with changes not yet refreshed (a month view may not exist yet),
    in view and month order."""
    wanted = [view for view in views if _view(view)]
    return [(view, month) for view, month in conn.execute(
        "SELECT DISTINCT view_name, month FROM view_slices_stale"
        " WHERE view_name = ANY(%s) ORDER BY 1, 2", (wanted,))]


def _marks(conn: psycopg.Connection, view: str, month: date) -> list[int]:
    return conn.execute(
        "SELECT coalesce(array_agg(marked_seq), '{}') FROM view_slices_stale"
        " WHERE view_name = %s AND month = %s", (view, month)).fetchone()[0]


def _clear(conn: psycopg.Connection, marks: Sequence[int]) -> None:
    if marks:
        conn.execute("DELETE FROM view_slices_stale WHERE marked_seq = ANY(%s)", (list(marks),))


def _registered(conn: psycopg.Connection, view: str) -> dict[date, bool]:
    """Month -> in_union, for the month views of `view`."""
    return dict(conn.execute("SELECT month, in_union FROM view_slices WHERE view_name = %s",
                             (view,)).fetchall())


def _create_slice(conn: psycopg.Connection, view: str, month: date) -> SliceRefresh | None:
    """Build the month view of `view` for `month` from its rollup, in one transaction, and
    clear the marks read before; None if it exists already (someone else built it)."""
    shape = _view(view)
    relation = month_relation(view, month)
    started = time.perf_counter()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_SLICE_DDL_LOCK,))
        if conn.execute("SELECT 1 FROM view_slices WHERE view_name = %s AND month = %s",
                        (view, month)).fetchone():
            return None
        marks = _marks(conn, view, month)
        conn.execute(sql.SQL(
            "CREATE MATERIALIZED VIEW {relation} AS SELECT {columns} FROM {rollup}"
            " WHERE {in_month}").format(
                relation=sql.Identifier(relation), columns=shape.columns,
                rollup=sql.Identifier(shape.rollup), in_month=shape.in_month(month)))
        time_key, other_key = sql.Identifier(shape.time_key), sql.Identifier(shape.other_key)
        # The unique index REFRESH ... CONCURRENTLY needs (also what time ranges use), and
        # one for dashboards that filter by category or product first.
        conn.execute(sql.SQL("CREATE UNIQUE INDEX {name} ON {relation} ({time}, {other})").format(
            name=sql.Identifier(f"{relation}_key"), relation=sql.Identifier(relation),
            time=time_key, other=other_key))
        conn.execute(sql.SQL("CREATE INDEX {name} ON {relation} ({other}, {time})").format(
            name=sql.Identifier(f"{relation}_by_{shape.other_key}"),
            relation=sql.Identifier(relation), time=time_key, other=other_key))
        # Statistics at once (the planner would otherwise guess, e.g. a parallel plan over
        # every month for a query that needs one); autovacuum keeps them up after refreshes.
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(relation)))
        conn.execute(
            "INSERT INTO view_slices (view_name, month, relation_name, refreshed_at, refreshes)"
            " VALUES (%s, %s, %s, clock_timestamp(), 1)", (view, month, relation))
        _clear(conn, marks)
    return SliceRefresh(view, month, relation, time.perf_counter() - started, True, len(marks))


def _repoint(conn: psycopg.Connection, view: str, *, emptied: bool = False) -> None:
    """Point the dashboard view `view` at every month view listed for it (and drop the
    whole-history view a migration left, which they now replace). With none listed, nothing
    changes, unless `emptied` (retention dropped every month): then the view reads no rows.

    Each attempt waits at most REPOINT_LOCK_TIMEOUT for the view's lock; raises
    `psycopg.errors.LockNotAvailable` after REPOINT_ATTEMPTS attempts.
    """
    shape = _view(view)
    for attempt in range(1, REPOINT_ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_SLICE_DDL_LOCK,))
                months = [row[0] for row in conn.execute(
                    "SELECT month FROM view_slices WHERE view_name = %s ORDER BY month",
                    (view,))]
                if not months and not emptied:
                    return
                # No month left (retention dropped them all): the view reads no rows.
                branches = sql.SQL(" UNION ALL ").join(
                    sql.SQL("SELECT {columns} FROM {relation}").format(
                        columns=shape.columns,
                        relation=sql.Identifier(month_relation(view, month)))
                    for month in months) if months else sql.SQL(
                        "SELECT {columns} FROM {rollup} WHERE false").format(
                            columns=shape.columns, rollup=sql.Identifier(shape.rollup))
                previous = conn.execute(
                    "SELECT current_setting('lock_timeout'),"
                    " set_config('lock_timeout', %s, true)", (REPOINT_LOCK_TIMEOUT,)).fetchone()[0]
                conn.execute(sql.SQL("CREATE OR REPLACE VIEW {view} AS {branches}").format(
                    view=sql.Identifier(view), branches=branches))
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous,))
                conn.execute(sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}").format(
                    sql.Identifier(f"{view}_legacy")))
                conn.execute("UPDATE view_slices SET in_union = true"
                             " WHERE view_name = %s AND month = ANY(%s)", (view, months))
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == REPOINT_ATTEMPTS:
                raise
            time.sleep(_REPOINT_PAUSE_SECONDS * attempt ** 0.5)


def drop_slices_before(conn: psycopg.Connection, horizon: date) -> list[str]:
    """Inside the caller's transaction (retention, `postgres_patterns.partitions`): forget
    every month before `horizon` (a validated first of a month) in both views: their month
    views are taken out of the dashboard views and dropped, their rollup rows deleted and
    their stale marks cleared. Returns the month views dropped, by view and month.

    The caller holds PROMOTE_LOCK exclusively (no promotion adds to those rollup rows
    meanwhile); this takes each view's refresh lock exclusively (no refresh of a month being
    dropped)."""
    horizon = validated_month(horizon)
    dropped: list[str] = []
    for view in VIEWS:
        shape = _view(view)
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{_REFRESH_LOCK}:{view}",))
        conn.execute(sql.SQL("DELETE FROM {rollup} WHERE {before}").format(
            rollup=sql.Identifier(shape.rollup), before=shape.before(horizon)))
        conn.execute("DELETE FROM view_slices_stale WHERE view_name = %s AND month < %s",
                     (view, horizon))
        relations = [row[0] for row in conn.execute(
            "WITH gone AS (DELETE FROM view_slices WHERE view_name = %s AND month < %s"
            " RETURNING relation_name, month) SELECT relation_name FROM gone ORDER BY month",
            (view, horizon))]
        if relations:
            _repoint(conn, view, emptied=True)
            for relation in relations:
                conn.execute(sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}").format(
                    sql.Identifier(relation)))
        dropped += relations
    return dropped


def _months_ahead() -> list[date]:
    today = datetime.now(UTC).date()
    month = date(today.year, today.month, 1)
    ahead = [month]
    for _ in range(MONTHS_AHEAD):
        month = _next_month(month)
        if month > MAX_MONTH:
            break
        ahead.append(month)
    return ahead


def _ensure_slices(conn: psycopg.Connection, view: str,
                   months: Iterable[date] = ()) -> list[SliceRefresh]:
    """Create the month views that `view` lacks for its marked months and for `months`
    (plus, then, the current month and MONTHS_AHEAD after it), and re-point `view` if any
    month view is not in it yet. Returns the month views created."""
    with conn.transaction():
        registered = _registered(conn, view)
        needed = {month for stale_view, month in stale_slices(conn, [view])
                  if month not in registered}
    needed |= {validated_month(month) for month in months if month not in registered}
    if needed:
        needed |= {month for month in _months_ahead() if month not in registered}
    created = [made for month in sorted(needed)
               if (made := _create_slice(conn, view, validated_month(month))) is not None]
    with conn.transaction():
        behind = not all(_registered(conn, view).values())
    if behind:
        _repoint(conn, view)
    return created


def _refresh_slices(conn: psycopg.Connection, view: str, months: Iterable[date], *,
                    only_if_stale: bool) -> list[SliceRefresh]:
    """REFRESH CONCURRENTLY month views of `view`, in one transaction (dashboards see them
    change together, at its commit), each under its month's advisory lock, clearing the marks
    read under that lock. Months without a month view, and (`only_if_stale`) months no mark
    is left for (another refresh covered them), are skipped.

    Locks: the view's lock in shared mode (whoever takes it exclusively waits for, and holds
    off, every refresh of the view), then the months' locks exclusively, in month order (so
    two refreshes of overlapping months cannot deadlock).
    """
    done = []
    view_lock = f"{_REFRESH_LOCK}:{view}"
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s))", (view_lock,))
        for month in sorted(set(months)):
            started = time.perf_counter()
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)",
                         (view_lock, _month_key(month)))
            found = conn.execute("SELECT relation_name FROM view_slices"
                                 " WHERE view_name = %s AND month = %s", (view, month)).fetchone()
            if found is None:
                continue
            marks = _marks(conn, view, month)
            if only_if_stale and not marks:
                continue
            conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(
                sql.Identifier(found[0])))
            _clear(conn, marks)
            conn.execute("UPDATE view_slices SET refreshed_at = clock_timestamp(),"
                         " refreshes = refreshes + 1 WHERE view_name = %s AND month = %s",
                         (view, month))
            done.append(SliceRefresh(view, month, found[0], time.perf_counter() - started,
                                     False, len(marks)))
    return done


def refresh_stale(conn: psycopg.Connection, views: Iterable[str] = VIEWS
                  ) -> list[SliceRefresh]:
    """Make every marked month of `views` fresh: create the month views missing (and
    re-point), then refresh the marked ones CONCURRENTLY, one transaction per view.

    Returns what it created or refreshed, by view and month. A month marked while this runs
    may be left for the next call. Raises ValueError for an unknown view.
    """
    wanted = [view for view in views if _view(view)]
    done = [made for view in wanted for made in _ensure_slices(conn, view)]
    created = {(made.view, made.month) for made in done}
    with conn.transaction():
        stale = stale_slices(conn, wanted)
    for view in wanted:
        done += _refresh_slices(conn, view, [month for of_view, month in stale
                                             if of_view == view
                                             and (view, month) not in created],
                                only_if_stale=True)
    return sorted(done, key=lambda made: (made.view, made.month))


def refresh_view(conn: psycopg.Connection, view: str) -> float:
    """Refresh the changed months of one view (`refresh_stale`); returns seconds taken.

    Raises ValueError for an unknown view."""
    _view(view)
    started = time.perf_counter()
    refresh_stale(conn, [view])
    return time.perf_counter() - started


def refresh_views(conn: psycopg.Connection) -> dict[str, float]:
    """Refresh the changed months of both views; returns view name -> seconds taken."""
    return {view: refresh_view(conn, view) for view in VIEWS}


def refresh_month(conn: psycopg.Connection, view: str, month: date) -> SliceRefresh | None:
    """Refresh one month view CONCURRENTLY, changed or not, clearing its marks.

    A month without a view gets one if its rollup has rows there (or it is marked), which
    re-points the dashboard view; a month without data and without a view is left alone
    (None). Raises ValueError for an unknown view or a month `validated_month` refuses.
    """
    shape = _view(view)
    month = validated_month(month)
    with conn.transaction():
        exists = month in _registered(conn, view)
        has_data = exists or bool(_marks(conn, view, month)) or conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {rollup} WHERE {in_month})").format(
                rollup=sql.Identifier(shape.rollup), in_month=shape.in_month(month))
        ).fetchone()[0]
    if not has_data:
        return None
    # Creates the month view if missing (and any other marked month's), and re-points the
    # dashboard view if it does not read every month view yet.
    for made in _ensure_slices(conn, view, [] if exists else [month]):
        if made.month == month:
            return made
    refreshed = _refresh_slices(conn, view, [month], only_if_stale=False)
    return refreshed[0] if refreshed else None


def refresh_all_slices(conn: psycopg.Connection) -> list[SliceRefresh]:
    """Refresh every month view of both views CONCURRENTLY, changed or not, after creating
    one for every month the rollups hold (a full rebuild, one transaction per view: what
    `refresh --all` is for, e.g. after the rollups were changed with their triggers off).

    Reads both rollups in full to find their months. Returns what it created or refreshed;
    raises as `refresh_stale`.
    """
    done: list[SliceRefresh] = []
    for view, shape in SHAPES.items():
        with conn.transaction():
            months = [row[0] for row in conn.execute(sql.SQL(
                "SELECT DISTINCT {month} FROM {rollup}").format(
                    month=shape.month_of(), rollup=sql.Identifier(shape.rollup)))]
        done += _ensure_slices(conn, view, months)
    created = {(made.view, made.month) for made in done}
    with conn.transaction():
        every = [(s.view, s.month) for s in slices(conn)]
    for view in SHAPES:
        done += _refresh_slices(conn, view, [month for of_view, month in every
                                             if of_view == view
                                             and (view, month) not in created],
                                only_if_stale=False)
    return sorted(done, key=lambda made: (made.view, made.month))


# --- checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    orders: int
    units: int
    revenue_usd: Decimal


def view_vs_orders(conn: psycopg.Connection, view: str) -> tuple[Totals, Totals]:
    """Totals of a view and of `orders`, read in one snapshot so they are comparable."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}")
    totals = "SELECT coalesce(sum({n}), 0), coalesce(sum({u}), 0), coalesce(sum({r}), 0) FROM {t}"
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        of_view = conn.execute(sql.SQL(totals).format(
            n=sql.Identifier("order_count"), u=sql.Identifier("units_sold"),
            r=sql.Identifier("revenue_usd"), t=sql.Identifier(view))).fetchone()
        of_orders = conn.execute(
            "SELECT count(*), coalesce(sum(quantity::bigint), 0),"
            " coalesce(sum(total_amount_usd), 0)"
            " FROM orders").fetchone()
    return (Totals(int(of_view[0]), int(of_view[1]), Decimal(of_view[2])),
            Totals(int(of_orders[0]), int(of_orders[1]), Decimal(of_orders[2])))
