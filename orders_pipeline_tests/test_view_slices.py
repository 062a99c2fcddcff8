"""The dashboard views sliced by UTC month: every month view, and the views over them, equal a
full recompute over `orders`; a refresh touches only the months that changed, keeps marks
added while it ran, never blocks readers; databases with one materialized view migrate.

Orders go through the real pipeline (queue, staging, promotion), so the marks are those the
rollups' triggers write for promotion itself.
"""

import random
import threading
import time
from datetime import UTC, date, datetime, timedelta

import polars as pl
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg import sql

from orders_pipeline import generator, pipeline
from orders_pipeline.connections import pg_connect
from orders_pipeline.postgres_patterns import views
from orders_pipeline.postgres_patterns.schema import apply_schema
from orders_pipeline.postgres_patterns.views import (
    SHAPES,
    VIEWS,
    refresh_all_slices,
    refresh_month,
    refresh_views,
    slices,
    stale_slices,
)
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings

# A full recompute over `orders` of each view, optionally of one UTC month [lo, hi).
RECOMPUTE = {
    "sales_hourly": """
        SELECT date_trunc('hour', order_timestamp, 'UTC'), category, count(*), sum(quantity),
               sum(total_amount_usd)
        FROM orders WHERE order_timestamp >= %(lo)s AND order_timestamp < %(hi)s
        GROUP BY 1, 2 ORDER BY 1, 2""",
    "product_performance_daily": """
        SELECT (order_timestamp AT TIME ZONE 'UTC')::date, product_id, count(*), sum(quantity),
               sum(total_amount_usd)
        FROM orders WHERE order_timestamp >= %(lo)s AND order_timestamp < %(hi)s
        GROUP BY 1, 2 ORDER BY 1, 2""",
}
EVER = {"lo": datetime(1, 1, 1, tzinfo=UTC), "hi": datetime(9999, 1, 1, tzinfo=UTC)}
OFFSETS = [timedelta(hours=h) for h in (-12, -8, -5, -2, 0, 1, 5.5, 9, 14)]


def _utc_month(month: date) -> dict[str, datetime]:
    following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return {"lo": datetime(month.year, month.month, 1, tzinfo=UTC),
            "hi": datetime(following.year, following.month, 1, tzinfo=UTC)}


def _stamp(instant: datetime, offset: timedelta) -> str:
    """ISO 8601 text of `instant` (UTC) as seen at `offset`, e.g. 2026-11-30T21:30:00-02:00."""
    local = (instant + offset).replace(tzinfo=None)
    sign = "+" if offset >= timedelta(0) else "-"
    hours, rest = divmod(abs(offset), timedelta(hours=1))
    return f"{local:%Y-%m-%dT%H:%M:%S}{sign}{hours:02d}:{rest // timedelta(minutes=1):02d}"


def _in_month(month: date, rng: random.Random) -> datetime:
    """A random instant of the UTC month, to the second."""
    bounds = _utc_month(month)
    span = int((bounds["hi"] - bounds["lo"]).total_seconds())
    return bounds["lo"] + timedelta(seconds=rng.randrange(span))


def _contract_stamp(instant: datetime, rng: random.Random) -> str:
    """`instant` at a random UTC offset whose local year the contract accepts (1970-2100)."""
    offsets = [o for o in OFFSETS if 1970 <= (instant + o).year <= 2100]
    return _stamp(instant, rng.choice(offsets))


def _payloads(pg: psycopg.Connection, stamps: list[str], rng: random.Random) -> list[bytes]:
    """Valid orders (fresh ids, random products, currencies, quantities) at these times."""
    orders = generator.valid_orders(generator.References.load(pg), len(stamps), rng)
    return generator.to_payloads(orders.with_columns(pl.Series("order_timestamp", stamps)))


def _month_orders(pg: psycopg.Connection, counts: dict[date, int], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return _payloads(pg, [_contract_stamp(_in_month(month, rng), rng)
                          for month, count in counts.items() for _ in range(count)], rng)


def _promote(settings: Settings, rconn: redis.Redis, payloads: list[bytes]) -> None:
    """Queue, stage and promote `payloads` (all new, valid orders) through the pipeline."""
    _stage(settings, rconn, payloads)
    assert pipeline.promote_staged(settings).inserted_rows == len(payloads)


def _stage(settings: Settings, rconn: redis.Redis, payloads: list[bytes]) -> None:
    keys = RedisKeys.of(settings.redis)
    generator.push_payloads(OrderQueue(rconn, keys), Backpressure(rconn, keys, 10**9),
                            payloads, batch_size=500)
    pipeline.stage_queue(settings, workers=1, batch_size=500)


def _rows(pg: psycopg.Connection, relation: str) -> list[tuple]:
    return pg.execute(sql.SQL("SELECT * FROM {} ORDER BY 1, 2").format(
        sql.Identifier(relation))).fetchall()


def _months_with_orders(pg: psycopg.Connection) -> set[date]:
    return {row[0] for row in pg.execute(
        "SELECT DISTINCT date_trunc('month', order_timestamp AT TIME ZONE 'UTC')::date"
        " FROM orders")}


def assert_exact(pg: psycopg.Connection) -> None:
    """Every month view equals a recompute of its month over `orders`, each month with orders
    has a month view the dashboard view reads, nothing is left marked, and both dashboard
    views equal a full recompute."""
    months = _months_with_orders(pg)
    for view in VIEWS:
        listed = slices(pg, view)
        assert all(s.in_union for s in listed), view
        assert months <= {s.month for s in listed}, view
        for month_view in listed:
            assert _rows(pg, month_view.relation) == pg.execute(
                RECOMPUTE[view], _utc_month(month_view.month)).fetchall(), month_view
        assert _rows(pg, view) == pg.execute(RECOMPUTE[view], EVER).fetchall(), view
    assert stale_slices(pg) == []


def _refreshes(pg: psycopg.Connection) -> dict[tuple[str, date], int]:
    return {(s.view, s.month): s.refreshes for s in slices(pg)}


@pytest.fixture
def cache(loaded_cache: LookupCache) -> LookupCache:
    return loaded_cache


def test_month_views_equal_recompute_and_late_orders_refresh_only_their_month(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        cache: LookupCache) -> None:
    march, july, november = date(2026, 3, 1), date(2026, 7, 1), date(2026, 11, 1)
    _promote(settings, rconn, _month_orders(pg, {march: 300, july: 300, november: 400}, 1))
    assert set(stale_slices(pg)) == {(view, month) for view in VIEWS
                                     for month in _months_with_orders(pg)}
    refresh_views(pg)
    assert_exact(pg)
    assert_contract_types(pg)
    assert {view for view in VIEWS
            if pg.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass",
                          (view,)).fetchone()[0] == "v"} == set(VIEWS)

    # Late orders for March, promoted now: only March is marked, only March is refreshed.
    before = _refreshes(pg)
    _promote(settings, rconn, _month_orders(pg, {march: 150}, 2))
    assert stale_slices(pg) == [(view, march) for view in sorted(VIEWS)]
    refreshed = views.refresh_stale(pg)
    assert [(made.view, made.month, made.created) for made in refreshed] == [
        (view, march, False) for view in sorted(VIEWS)]
    after = _refreshes(pg)
    assert {key for key in after if after[key] != before[key]} == {
        (view, march) for view in VIEWS}
    assert_exact(pg)

    # A month never seen before (late by years) gets its month views; the views read them.
    _promote(settings, rconn, _month_orders(pg, {date(2019, 2, 1): 50}, 3))
    refreshed = views.refresh_stale(pg)
    assert {(made.view, made.month) for made in refreshed if made.created} == {
        (view, date(2019, 2, 1)) for view in VIEWS}
    assert_exact(pg)

    # Orders at the contract's edges fall into 1969-12 and 2101-01 UTC.
    edges = ["1970-01-01T05:00:00+14:00", "2100-12-31T23:30:00-05:00"]
    _promote(settings, rconn, _payloads(pg, edges, random.Random(4)))
    refresh_views(pg)
    assert {date(1969, 12, 1), date(2101, 1, 1)} <= {s.month for s in slices(pg)}
    assert_exact(pg)

    # A month refreshed on request (the Dagster partition), unchanged: refreshed anyway, and
    # a month without orders and without a view stays without one.
    made = refresh_month(pg, "sales_hourly", july)
    assert made is not None and (made.relation, made.created) == ("sales_hourly_m202607", False)
    assert refresh_month(pg, "sales_hourly", date(1999, 1, 1)) is None
    assert all(s.month != date(1999, 1, 1) for s in slices(pg))
    with pytest.raises(ValueError):
        refresh_month(pg, "sales_hourly", date(2026, 7, 2))
    with pytest.raises(ValueError):
        refresh_month(pg, "sales_hourly; DROP TABLE orders", july)

    # `refresh --all`: every month view, changed or not.
    every = refresh_all_slices(pg)
    assert {(made.view, made.month) for made in every} == set(_refreshes(pg))
    assert_exact(pg)


def _waiting_on(pg: psycopg.Connection, relation: str, timeout: float = 30) -> None:
    """Until some session waits for a lock on `relation`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pg.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = %s::regclass"
                      " AND NOT granted)", (relation,)).fetchone()[0]:
            return
        time.sleep(0.05)
    raise TimeoutError(f"nobody waited for {relation}")


def test_marks_added_during_a_refresh_survive(settings: Settings, rconn: redis.Redis,
                                              pg: psycopg.Connection,
                                              cache: LookupCache) -> None:
    month = date(2026, 5, 1)
    _promote(settings, rconn, _month_orders(pg, {month: 200}, 10))
    refresh_views(pg)
    _promote(settings, rconn, _month_orders(pg, {month: 100}, 11))  # marked: to refresh
    _stage(settings, rconn, _month_orders(pg, {month: 100}, 12))  # promoted mid-refresh

    # The refresh of May's `sales_hourly` read its marks and waits for the month view's lock
    # while another promotion of May commits; then it goes on.
    errors: list[BaseException] = []

    def refresh() -> None:
        try:
            with pg_connect(settings.postgres) as conn:
                conn.autocommit = True
                refresh_views(conn)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    with pg_connect(settings.postgres) as locker:
        # LOCK TABLE does not take materialized views; a refresh left uncommitted holds the
        # lock that the next refresh of the same view waits for.
        locker.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY sales_hourly_m202605")
        refresher = threading.Thread(target=refresh)
        refresher.start()
        _waiting_on(pg, "sales_hourly_m202605")
        assert pipeline.promote_staged(settings).inserted_rows == 100
        locker.commit()
        refresher.join(timeout=60)
    assert not refresher.is_alive() and not errors, errors
    # The mark that promotion added meanwhile survived the refresh that was under way (the
    # later product view refresh read it before it refreshed, so covered it).
    assert stale_slices(pg) == [("sales_hourly", month)]
    refresh_views(pg)
    assert_exact(pg)


def test_readers_are_not_blocked_by_a_refresh(settings: Settings, rconn: redis.Redis,
                                             pg: psycopg.Connection,
                                             cache: LookupCache) -> None:
    month = date(2026, 9, 1)
    _promote(settings, rconn, _month_orders(pg, {month: 200}, 20))
    refresh_views(pg)
    total = "SELECT sum(order_count) FROM sales_hourly"
    _promote(settings, rconn, _month_orders(pg, {month: 50}, 21))
    with pg_connect(settings.postgres) as refresher, \
            pg_connect(settings.postgres) as reader:
        reader.autocommit = True
        reader.execute("SET lock_timeout = '2s'")
        refresher.execute("SELECT 1")  # the refresh's transaction, held open below
        refresh_month(refresher, "sales_hourly", month)
        held = {row[0] for row in pg.execute(
            "SELECT mode FROM pg_locks WHERE relation = 'sales_hourly_m202609'::regclass"
            " AND pid = %s AND granted", (refresher.info.backend_pid,))}
        assert "ExclusiveLock" in held  # what REFRESH ... CONCURRENTLY holds until commit
        started = time.perf_counter()
        assert reader.execute(total).fetchone()[0] == 200  # not blocked; the old snapshot
        assert time.perf_counter() - started < 1
        refresher.commit()
        assert reader.execute(total).fetchone()[0] == 250
    refresh_views(pg)  # the product view's month, marked by the same promotion
    assert_exact(pg)


def test_repointing_waits_for_readers_a_bounded_time(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, cache: LookupCache,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _promote(settings, rconn, _month_orders(pg, {date(2026, 1, 1): 100}, 30))
    refresh_views(pg)
    monkeypatch.setattr(views, "REPOINT_ATTEMPTS", 3)
    _promote(settings, rconn, _month_orders(pg, {date(2021, 6, 1): 100}, 31))  # a new month
    latencies: list[float] = []
    with pg_connect(settings.postgres) as holder, pg_connect(settings.postgres) as reader:
        reader.autocommit = True
        holder.execute("SELECT count(*) FROM sales_hourly").fetchone()  # a long transaction
        failed: list[BaseException] = []

        def refresh() -> None:
            try:
                with pg_connect(settings.postgres) as conn:
                    conn.autocommit = True
                    refresh_views(conn)
            except psycopg.errors.LockNotAvailable as exc:
                failed.append(exc)

        refresher = threading.Thread(target=refresh)
        refresher.start()
        while refresher.is_alive():  # dashboards keep reading while it tries
            started = time.perf_counter()
            reader.execute("SELECT count(*) FROM sales_hourly").fetchone()
            latencies.append(time.perf_counter() - started)
        refresher.join()
        holder.rollback()
    assert len(failed) == 1  # gave way each time, then reported it
    # No reader waited much longer than one attempt's lock timeout (200 ms).
    assert latencies and max(latencies) < 1.5, max(latencies)
    # The month view exists and is filled, the view does not read it yet: the next refresh
    # re-points it.
    june = {s.view: s for s in slices(pg) if s.month == date(2021, 6, 1)}
    assert june["sales_hourly"].in_union is False
    refresh_views(pg)
    assert_exact(pg)


@pytest.mark.parametrize("narrow", [False, True], ids=["same-types", "narrow-rollups"])
def test_a_database_with_one_materialized_view_migrates(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, cache: LookupCache,
        narrow: bool) -> None:
    _promote(settings, rconn, _month_orders(pg, {date(2025, 4, 1): 100,
                                                 date(2025, 8, 1): 100}, 40))
    # Back to the layout before month views: one materialized view per name over the rollups
    # (with the narrower sums of older databases, too), no triggers, no slice tables.
    for view in VIEWS:
        pg.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier(view)))
        pg.execute(sql.SQL("DROP MATERIALIZED VIEW {}").format(
            sql.Identifier(f"{view}_legacy")))
    pg.execute("DROP TABLE view_slices, view_slices_stale")
    for rollup in ("sales_hourly_rollup", "product_daily_rollup"):
        for event in ("inserted", "updated", "deleted", "truncated"):
            pg.execute(sql.SQL("DROP TRIGGER {} ON {}").format(
                sql.Identifier(f"{rollup}_slices_{event}"), sql.Identifier(rollup)))
        if narrow:
            pg.execute(sql.SQL("ALTER TABLE {} ALTER units_sold TYPE bigint,"
                               " ALTER revenue_usd TYPE numeric(22, 2)").format(
                                   sql.Identifier(rollup)))
    pg.execute("DROP FUNCTION view_slices_mark()")
    for view, shape in SHAPES.items():
        pg.execute(sql.SQL("CREATE MATERIALIZED VIEW {view} AS SELECT {columns} FROM {rollup}")
                   .format(view=sql.Identifier(view), columns=shape.columns,
                           rollup=sql.Identifier(shape.rollup)))
        pg.execute(sql.SQL("CREATE UNIQUE INDEX ON {} ({}, {})").format(
            sql.Identifier(view), sql.Identifier(shape.time_key),
            sql.Identifier(shape.other_key)))
    _promote(settings, rconn, _month_orders(pg, {date(2025, 8, 1): 50}, 41))  # not refreshed
    old = {view: _rows(pg, view) for view in VIEWS}

    apply_schema(pg)
    for view in VIEWS:
        assert pg.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass",
                          (view,)).fetchone()[0] == "v"
        # Dashboards see what they saw (the old view kept as it was), or, when the rollups
        # had to be widened first, what the rollups hold.
        assert _rows(pg, view) == (pg.execute(RECOMPUTE[view], EVER).fetchall() if narrow
                                   else old[view])
    assert set(stale_slices(pg)) == {(view, month) for view in VIEWS
                                     for month in (date(2025, 4, 1), date(2025, 8, 1))}
    refresh_views(pg)
    assert_exact(pg)
    assert all(pg.execute("SELECT to_regclass(%s)", (f"{view}_legacy",)).fetchone()[0] is None
               for view in VIEWS)

    definitions = {view: pg.execute("SELECT pg_get_viewdef(%s::regclass)", (view,)).fetchone()
                   for view in VIEWS}
    apply_schema(pg)  # again: changes nothing
    assert stale_slices(pg) == []
    assert {view: pg.execute("SELECT pg_get_viewdef(%s::regclass)", (view,)).fetchone()
            for view in VIEWS} == definitions
    assert_exact(pg)


# --- property: random months, late arrivals ------------------------------------------------

MONTHS = st.builds(date, st.integers(1970, 2100), st.integers(1, 12), st.just(1))


@hypothesis_settings(max_examples=25, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])
@given(rounds=st.lists(st.dictionaries(MONTHS, st.integers(1, 12), min_size=1, max_size=4),
                       min_size=1, max_size=3),
       refresh_after=st.lists(st.booleans(), min_size=3, max_size=3),
       seed=st.integers(0, 2**32 - 1))
def test_month_views_equal_recompute_for_random_months_and_late_orders(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection, cache: LookupCache,
        rounds: list[dict[date, int]], refresh_after: list[bool], seed: int) -> None:
    # One database for every example: each adds orders (fresh ids), the invariant covers all.
    for number, counts in enumerate(rounds):  # a later round is late for the months before
        prior = set(stale_slices(pg))
        _promote(settings, rconn, _month_orders(pg, counts, seed + number))
        # Promotion marked exactly the months it added to (every order's instant lies in its
        # month in UTC, whatever offset its text carries).
        assert set(stale_slices(pg)) == prior | {(view, month) for view in VIEWS
                                                 for month in counts}
        if refresh_after[number] or number == len(rounds) - 1:
            refresh_views(pg)
    assert_exact(pg)
    assert_contract_types(pg)


def assert_contract_types(pg: psycopg.Connection) -> None:
    """Both views have the contract's columns, in order, with the rollups' types."""
    types = {view: pg.execute(
        "SELECT array_agg(attname || ' ' || format_type(atttypid, atttypmod) ORDER BY attnum)"
        " FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0", (view,)).fetchone()[0]
        for view in VIEWS}
    assert types == {
        "sales_hourly": ["hour timestamp with time zone", "category text", "order_count bigint",
                         "units_sold numeric(38,0)", "revenue_usd numeric(38,2)"],
        "product_performance_daily": ["day date", "product_id text", "order_count bigint",
                                      "units_sold numeric(38,0)", "revenue_usd numeric(38,2)"]}


def test_a_new_database_has_the_views_empty(pg: psycopg.Connection) -> None:
    assert_contract_types(pg)
    for view in VIEWS:
        assert _rows(pg, view) == []
    assert refresh_views(pg).keys() == set(VIEWS) and slices(pg) == []  # nothing to do
