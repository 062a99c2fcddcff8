"""`orders` partitioned by month (issue 10, item 1): an order id is stored at most once across
the partitions, however late its copy comes and whatever its timestamp; partitions are made
for exactly the months that have orders; retention drops whole months from `orders`, the id
guard, the rollups and the views consistently; an old unpartitioned table migrates."""

import json
import signal
import threading
import time
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg import sql

from orders_pipeline import pipeline
from orders_pipeline.assets.retention import retention_job
from orders_pipeline.conservation import check_conservation
from orders_pipeline.faults import RETENTION_CRASH_POINTS
from orders_pipeline.postgres_patterns import partitions
from orders_pipeline.postgres_patterns.partitions import (
    HORIZON_REASON,
    RetentionRefused,
    apply_retention,
    month_of,
)
from orders_pipeline.postgres_patterns.promotion import promote_round
from orders_pipeline.postgres_patterns.schema import apply_schema, sql_files
from orders_pipeline.postgres_patterns.views import VIEWS, refresh_views, slices
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import fresh_example, pipeline_env, resources_for
from orders_pipeline_tests.test_cli import run as cli
from orders_pipeline_tests.test_crash_recovery import run_cli
from orders_pipeline_tests.test_parallel_promotion import (
    SHARDS,
    START,
    TABLES,
    Catalog,
    Copy,
    Promoter,
    assert_books_balance,
    assert_first_copies_landed,
    catalog,  # noqa: F401  (fixture)
    connections,  # noqa: F401  (fixture)
    in_parallel,
    stage_all,
    stored,
)
from orders_pipeline_tests.test_view_slices import _month_orders, _promote, _stage, assert_exact

DAY = 24 * 60  # minutes


def partition_months(pg: psycopg.Connection) -> set[date]:
    return {p.month for p in partitions.partitions(pg)}


def partition_name(pg: psycopg.Connection, month: date | datetime) -> str:
    """The partition of `orders` for the UTC month of `month` (sql/015's naming function)."""
    return pg.execute("SELECT orders_partition_name(%s)", (month_of(month),)).fetchone()[0]


def guard(pg: psycopg.Connection) -> dict[str, datetime]:
    return dict(pg.execute("SELECT order_id, order_timestamp FROM order_ids").fetchall())


def assert_guard_matches_orders(pg: psycopg.Connection) -> None:
    """`order_ids` holds exactly the (id, timestamp) of every stored order."""
    rows = dict(pg.execute("SELECT order_id, order_timestamp FROM orders").fetchall())
    assert guard(pg) == rows


def test_late_copy_dated_in_another_month_is_not_stored_again(
        pg: psycopg.Connection, catalog: Catalog) -> None:  # noqa: F811
    stage_all(pg, catalog, [("first", 0, [Copy("o1", 1, 0, 1, 500, 0),
                                          Copy("o2", 2, 1, 2, 700, 10)])])
    assert promote_round(pg).inserted_rows == 2
    # Two months later, copies of o1 (another timestamp) and of o2 (the same one), and o3.
    later = 62 * DAY
    stage_all(pg, catalog, [("late", 0, [Copy("o1", 11, 0, 5, 900, later),
                                         Copy("o2", 12, 1, 2, 700, 10),
                                         Copy("o3", 13, 2, 1, 100, later)])])

    result = promote_round(pg)

    assert (result.staged_rows, result.inserted_rows) == (3, 1)
    assert stored(pg) == {"o1": (1, "first"), "o2": (2, "first"), "o3": (13, "late")}
    assert guard(pg)["o1"] == START
    assert_guard_matches_orders(pg)
    assert month_of(START + timedelta(minutes=later)) in partition_months(pg)
    listed = [r[0] for r in pg.execute("SELECT unnest(order_ids) FROM promoted_outbox")]
    assert sorted(listed) == ["o1", "o2", "o3"]


def test_two_copies_in_one_round_in_different_months_store_the_first(
        pg: psycopg.Connection, catalog: Catalog) -> None:  # noqa: F811
    stage_all(pg, catalog, [("a", 0, [Copy("x", 1, 0, 1, 500, 40 * DAY)]),
                            ("b", 0, [Copy("x", 2, 0, 1, 500, 0), Copy("y", 3, 0, 1, 5, 0)])])
    result = promote_round(pg)
    assert (result.staged_rows, result.inserted_rows) == (3, 2)
    assert stored(pg) == {"x": (1, "a"), "y": (3, "b")}
    assert_guard_matches_orders(pg)


def test_partitions_are_made_for_the_months_with_orders_only(
        pg: psycopg.Connection, catalog: Catalog) -> None:  # noqa: F811
    ahead = partition_months(pg)  # init-db: this month and three after it
    this = month_of(datetime.now(UTC))
    assert this in ahead and len(ahead) == 4
    far = 3 * 365 * DAY  # one stray order three years later in the same batch
    stage_all(pg, catalog, [("b", 0, [Copy("o1", 1, 0, 1, 500, 0),
                                      Copy("o2", 2, 0, 1, 500, far)])])
    assert promote_round(pg).inserted_rows == 2
    made = partition_months(pg) - ahead
    assert made == {month_of(START), month_of(START + timedelta(minutes=far))} - ahead


@hypothesis_settings(max_examples=25, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(example=st.tuples(
    st.lists(st.tuples(st.integers(0, SHARDS - 1),
                       st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 400)),
                                min_size=1, max_size=6)),
             min_size=1, max_size=6),
    st.integers(1, 3)))
def test_any_copies_over_any_months_store_each_id_once(
        pg: psycopg.Connection, catalog: Catalog,  # noqa: F811
        connections: dict[Promoter, psycopg.Connection],  # noqa: F811
        example: tuple[list[tuple[int, list[tuple[str, int]]]], int]) -> None:
    """Copies of a few ids dated over 400 days, in batches of random shards, promoted by
    parallel shard promoters and an all-shards one: every id stored once, with the values
    of the first copy of one shard that carries it; guard, rollups and outbox agree."""
    batches, max_batches = example
    pg.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, TABLES))))
    customer = iter(range(1, 10_000))
    staged = stage_all(pg, catalog, [
        (f"b{n}.s{shard}", shard, [Copy(i, next(customer), 0, 1, 100, days * DAY)
                                   for i, days in copies])
        for n, (shard, copies) in enumerate(batches)])

    results = in_parallel(connections, max_batches)

    assert_first_copies_landed(pg, staged)
    assert_books_balance(pg, staged, list(results.values()))
    assert_guard_matches_orders(pg)


# --- retention ----------------------------------------------------------------------------


def _months_back(n: int) -> date:
    this = month_of(datetime.now(UTC))
    months = this.year * 12 + this.month - 1 - n
    return date(months // 12, months % 12 + 1, 1)


def test_retention_drops_whole_months_everywhere_and_rejects_later_copies(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    months = [_months_back(n) for n in (5, 4, 3, 1, 0)]
    payloads = _month_orders(pg, dict.fromkeys(months, 30), seed=7)
    _promote(settings, rconn, payloads)
    refresh_views(pg)
    horizon = months[3]
    dropped_ids = {json.loads(p)["order_id"] for p in payloads[:90]}  # the three old months
    before = pg.execute("SELECT count(*) FROM orders").fetchone()[0]

    preview = apply_retention(pg, horizon, dry_run=True)
    assert (preview.orders, preview.ids, preview.dry_run) == (90, 90, True)
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == before
    assert partitions.retention_horizon(pg) is None

    for name, value in pipeline_env(settings).items():
        monkeypatch.setenv(name, value)
    code, out, _ = cli(capsys, "retention", "--before", f"{horizon:%Y-%m}")
    assert code == 0, out
    assert out.startswith(f"retention before {horizon:%Y-%m}: dropped 3 month partitions "
                          "(90 orders, 90 ids) and 6 month views")

    assert partitions.retention_horizon(pg) == horizon
    assert min(partition_months(pg)) == horizon
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == before - 90
    assert not dropped_ids & set(guard(pg))
    assert_guard_matches_orders(pg)
    assert all(s.month >= horizon for view in VIEWS for s in slices(pg, view))
    assert_exact(pg)

    # A late copy of a dropped order dated before the horizon is rejected with the reason,
    # byte for byte, before the dedup window marks its id; a copy dated after the horizon is
    # then a new order again (its id was forgotten). The window, which would drop the late
    # copy as a copy of the original, is cleared first.
    old = json.loads(payloads[0])
    late = json.dumps(old).encode()
    again = json.dumps({**old, "order_timestamp": f"{horizon:%Y-%m}-02T00:00:00Z"}).encode()
    dedup = DedupWindow(rconn, RedisKeys.of(settings.redis), 3600)
    dedup.clear()
    _stage(settings, rconn, [late])
    reason = HORIZON_REASON.format(horizon=horizon.isoformat())
    assert pg.execute("SELECT batch_position, raw_payload, order_id FROM orders_rejected"
                      " WHERE reason = %s", (reason,)).fetchall() == [(0, late, old["order_id"])]
    _stage(settings, rconn, [again])  # not dropped as a copy of the rejected one
    assert pipeline.promote_staged(settings).inserted_rows == 1
    assert guard(pg)[old["order_id"]] == datetime(horizon.year, horizon.month, 2, tzinfo=UTC)
    assert_guard_matches_orders(pg)
    refresh_views(pg)
    assert_exact(pg)
    books = check_conservation(rconn, RedisKeys.of(settings.redis), pg)
    assert books.dropped_by_retention == 90 and books.balanced, books.as_dict()


def test_retention_refuses_while_older_orders_wait_and_for_a_future_horizon(
        settings: Settings, pg: psycopg.Connection, catalog: Catalog,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    stage_all(pg, catalog, [("waiting", 0, [Copy("o1", 1, 0, 1, 500, 0)])])  # START: 2030
    with pytest.raises(RetentionRefused, match="lies after the current month"):
        apply_retention(pg, date(2099, 1, 1))
    horizon = month_of(datetime.now(UTC))
    pg.execute("UPDATE orders_staging SET order_timestamp = %s",
               (datetime(horizon.year, horizon.month, 1, tzinfo=UTC) - timedelta(days=40),))
    pg.commit()
    with pytest.raises(RetentionRefused, match="1 staged orders are dated before"):
        apply_retention(pg, horizon)
    assert partitions.retention_horizon(pg) is None

    for name, value in pipeline_env(settings).items():
        monkeypatch.setenv(name, value)
    for argv, fragment in [
            (["retention"], "give exactly one of --before YYYY-MM and --keep-months N"),
            (["retention", "--before", "2024-13"], "is not a month as YYYY-MM"),
            (["retention", "--keep-months", "0"], "0 is not in the range 1<=x<=1200"),
            (["retention", "--keep-months", "99999999999999999999"], "not in the range"),
            (["retention", "--keep-months", "1"], "1 staged orders are dated before")]:
        code, _, err = cli(capsys, *argv)
        [line] = err.strip().splitlines()  # usage errors name the subcommand
        assert code != 0 and line.startswith("orders-pipeline") and fragment in line, argv


def test_an_unpartitioned_orders_table_migrates_with_its_ids(
        pg: psycopg.Connection) -> None:
    """A database from before issue 10: `orders` a plain table keyed by order_id."""
    pg.execute("DROP TABLE orders, order_ids CASCADE")  # and the view over orders
    pg.execute("""
        CREATE TABLE orders (
            order_id text PRIMARY KEY, customer_id bigint NOT NULL, product_id text NOT NULL,
            quantity integer NOT NULL, unit_price numeric(18, 4) NOT NULL,
            currency text NOT NULL, zip_code text NOT NULL,
            order_timestamp timestamptz NOT NULL, total_amount numeric(24, 4) NOT NULL,
            total_amount_usd numeric(22, 2) NOT NULL, category text NOT NULL,
            region text NOT NULL, shipping_zone smallint NOT NULL, batch_id text NOT NULL,
            promoted_at timestamptz NOT NULL DEFAULT now())""")
    pg.execute("CREATE INDEX orders_order_timestamp_idx ON orders (order_timestamp)")
    [redrive_ddl] = [f for f in sql_files() if f.name == "040_redrive.sql"]
    pg.execute(redrive_ddl.read_text(encoding="utf-8"))  # its view over the old table
    stamps = [datetime(2021, 1, 5, tzinfo=UTC), datetime(2021, 1, 31, 23, 59, tzinfo=UTC),
              datetime(2024, 7, 1, tzinfo=UTC)]
    for n, stamp in enumerate(stamps):
        pg.execute("INSERT INTO orders VALUES (%s, 1, 'P000001', 1, 1, 'USD', '00501', %s, 1,"
                   " 1, 'Books', 'Northeast', 1, 'old')", (f"o{n}", stamp))
    pg.commit()

    apply_schema(pg)
    apply_schema(pg)  # and again: nothing changes

    assert pg.execute("SELECT relkind::text FROM pg_class WHERE oid = 'orders'::regclass"
                      ).fetchone()[0] == "p"
    assert guard(pg) == {f"o{n}": stamp for n, stamp in enumerate(stamps)}
    assert_guard_matches_orders(pg)
    assert {date(2021, 1, 1), date(2024, 7, 1)} <= partition_months(pg)
    assert pg.execute("SELECT to_regclass('orders_unpartitioned')").fetchone()[0] is None


def test_retention_job_reports_and_refuses_without_retries(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache) -> None:
    months = [_months_back(n) for n in (2, 0)]
    _promote(settings, rconn, _month_orders(pg, dict.fromkeys(months, 20), seed=3))

    def run(config: dict[str, object]) -> dg.ExecuteInProcessResult:
        return retention_job.execute_in_process(
            run_config={"ops": {"drop_months": {"config": config}}},
            resources=resources_for(settings), instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False)

    done = run({"keep_months": 2})
    assert done.success
    [output] = [e for e in done.events_for_node("drop_months") if e.is_successful_output]
    metadata = {k: v.value for k, v in output.step_output_data.metadata.items()}
    assert (metadata["horizon"], metadata["orders"], metadata["ids"], metadata["dry_run"]) == (
        _months_back(1).isoformat(), 20, 20, False)
    assert metadata["partitions"] == [partition_name(pg, months[0])]
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 20

    for config, fragment in [({"before": "2999-01"}, "lies after the current month"),
                             ({}, "give exactly one of keep_months and before")]:
        refused = run(config)
        assert not refused.success
        [failure] = [e for e in refused.all_events if e.is_step_failure]
        assert fragment in failure.step_failure_data.error.message
        assert not [e for e in refused.all_events if e.is_step_up_for_retry]


def test_guard_follows_deletes_and_truncate_and_a_stale_guard_never_blocks(
        pg: psycopg.Connection, catalog: Catalog) -> None:  # noqa: F811
    stage_all(pg, catalog, [("one", 0, [Copy("a", 1, 0, 1, 500, 0), Copy("b", 2, 0, 1, 500, 0),
                                        Copy("c", 3, 0, 1, 500, 40 * DAY)])])
    assert promote_round(pg).inserted_rows == 3
    pg.execute("DELETE FROM orders WHERE order_id = 'a'")  # by hand: its id is free again
    assert set(guard(pg)) == {"b", "c"}
    # A partition emptied by hand (no trigger fires) leaves its ids in the guard: a copy of
    # "c" is then refused, never doubled, and the batch beside it is promoted.
    pg.execute(sql.SQL("TRUNCATE {}").format(
        sql.Identifier(partition_name(pg, START + timedelta(days=40)))))
    stage_all(pg, catalog, [("two", 0, [Copy("a", 11, 0, 1, 500, 5), Copy("c", 13, 0, 1, 500,
                                                                           40 * DAY)])])
    result = promote_round(pg)
    assert (result.promoted_batches, result.inserted_rows) == (["two"], 1)
    assert stored(pg) == {"a": (11, "two"), "b": (2, "one")}
    pg.execute("TRUNCATE orders")
    assert guard(pg) == {}
    pg.commit()


def test_promotion_goes_on_while_retention_deletes_the_ids(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache) -> None:
    """Only the drops hold the promotion lock: with the ids' deletion held up (another
    transaction locks one id it must delete), a batch is staged and promoted meanwhile, and
    the deletion then finishes with every id of the dropped months."""
    months = [_months_back(n) for n in (4, 3, 0)]
    payloads = _month_orders(pg, dict.fromkeys(months, 20), seed=11)
    _promote(settings, rconn, payloads)
    horizon = months[2]
    pg.commit()
    results: list[partitions.RetentionResult] = []
    with psycopg.connect(**settings.postgres.conninfo(via_pgbouncer=False)) as blocker:
        blocker.execute("SELECT 1 FROM order_ids WHERE order_timestamp < %s LIMIT 1 FOR UPDATE",
                        (partitions.month_start(horizon),))
        retention = threading.Thread(
            target=lambda: results.append(pipeline.apply_retention(settings, horizon)))
        retention.start()
        deadline = time.monotonic() + 30
        while partitions.retention_horizon(pg) != horizon:  # the drops committed
            pg.commit()
            assert time.monotonic() < deadline, "retention did not commit its drops"
            time.sleep(0.05)
        late = _month_orders(pg, {months[2]: 15}, seed=12)
        pg.commit()
        promoted: list[bool] = []
        promoter = threading.Thread(target=lambda: promoted.append(
            _promote(settings, rconn, late) is None))
        promoter.start()
        promoter.join(timeout=60)  # with the ids deleted under the lock, it waited for them
        promoted_meanwhile, still_deleting = promoted == [True], retention.is_alive()
        blocker.rollback()
    promoter.join(timeout=60)
    retention.join(timeout=60)
    assert promoted_meanwhile and still_deleting, (promoted, still_deleting)
    [result] = results
    assert (result.orders, result.ids, len(result.partitions)) == (40, 40, 2)
    assert result.ids_seconds > result.locked_seconds  # the ids waited out the promotion
    pg.commit()
    assert_guard_matches_orders(pg)
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 35
    books = check_conservation(rconn, RedisKeys.of(settings.redis), pg)
    assert books.dropped_by_retention == 40 and books.balanced, books.as_dict()


@hypothesis_settings(max_examples=12, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(counts=st.lists(st.integers(0, 6), min_size=7, max_size=7),
       keep=st.integers(1, 7), leftover=st.integers(0, 3), again=st.booleans())
def test_any_retention_drops_what_its_preview_said_and_forgets_every_id(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, counts: list[int], keep: int, leftover: int,
        again: bool) -> None:
    """Orders in any of the last seven months, any horizon: the dry run reports exactly what
    the retention then drops (partitions, orders, ids); afterwards the guard holds exactly the
    ids of `orders`, the views equal a recompute, and the books balance. Ids a deletion left
    behind (an interrupted retention: inserted here by hand) are deleted by the next one,
    whatever horizon it is given."""
    local = fresh_example(settings, rconn, pg)
    pg.execute("DELETE FROM orders_retention")
    pg.commit()
    by_month = {_months_back(n): count for n, count in enumerate(counts) if count}
    payloads = _month_orders(pg, by_month, seed=sum(counts) + keep) if by_month else []
    if payloads:
        _promote(local, rconn, payloads)
    refresh_views(pg)
    horizon = partitions.horizon_keeping(keep)
    doomed = sum(count for month, count in by_month.items() if month < horizon)
    pg.commit()

    preview = apply_retention(pg, horizon, dry_run=True)
    pg.commit()
    result = apply_retention(pg, horizon)
    pg.commit()
    assert (preview.orders, preview.ids) == (result.orders, result.ids) == (doomed, doomed)
    assert preview.partitions == result.partitions
    assert all(partitions.parse_month(name[-6:-2] + "-" + name[-2:]) < horizon
               for name in result.partitions)
    assert min(partition_months(pg)) >= horizon
    if leftover:
        before = partitions.month_start(horizon) - timedelta(days=3)
        pg.cursor().executemany(
            "INSERT INTO order_ids (order_id, order_timestamp) VALUES (%s, %s)",
            [(f"left-{i}", before) for i in range(leftover)])
        pg.commit()
        earlier = partitions.add_months(horizon, -1) if again else horizon
        assert apply_retention(pg, earlier).ids == leftover
        pg.commit()
    assert_guard_matches_orders(pg)
    assert_exact(pg)
    books = check_conservation(rconn, RedisKeys.of(local.redis), pg)
    assert books.dropped_by_retention == doomed and books.balanced, books.as_dict()


@pytest.mark.parametrize("point", RETENTION_CRASH_POINTS)
def test_a_retention_killed_half_way_is_finished_by_the_next(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, point: str) -> None:
    """`orders-pipeline retention` SIGKILLed after it recorded the horizon, or after it
    dropped the months: the books balance at once (the orders are still there, or counted as
    dropped), and the next retention, even one given an earlier horizon, drops what is left
    and deletes the ids: the same end as a retention that never died."""
    months = [_months_back(n) for n in (3, 2, 0)]
    payloads = _month_orders(pg, dict.fromkeys(months, 25), seed=21)
    _promote(settings, rconn, payloads)
    horizon = months[2]
    keys = RedisKeys.of(settings.redis)
    pg.commit()

    killed = run_cli(settings, "retention", "--before", f"{horizon:%Y-%m}", crash_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert partitions.retention_horizon(pg) == horizon
    books = check_conservation(rconn, keys, pg)
    assert books.balanced, books.as_dict()
    assert books.dropped_by_retention == (0 if point == "retention_after_horizon" else 50)
    pg.commit()

    earlier = partitions.add_months(months[0], -1)
    finished = run_cli(settings, "retention", "--before", f"{earlier:%Y-%m}")
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(f"retention before {horizon:%Y-%m}: dropped ")
    assert min(partition_months(pg)) >= horizon
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 25
    assert_guard_matches_orders(pg)
    refresh_views(pg)
    assert_exact(pg)
    books = check_conservation(rconn, keys, pg)
    assert books.dropped_by_retention == 50 and books.balanced, books.as_dict()


def test_retentions_run_one_at_a_time(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache) -> None:
    """A retention waits while another runs (its session lock over every step), so none
    counts a partition the other drops; then it finds nothing left to drop."""
    months = [_months_back(n) for n in (2, 0)]
    _promote(settings, rconn, _month_orders(pg, dict.fromkeys(months, 10), seed=31))
    pg.commit()
    results: list[partitions.RetentionResult] = []
    with psycopg.connect(**settings.postgres.conninfo(via_pgbouncer=False),
                         autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext(%s))",
                      (partitions.RETENTION_RUN_LOCK,))
        waiting = threading.Thread(
            target=lambda: results.append(pipeline.apply_retention(settings, months[1])))
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive() and partitions.retention_horizon(pg) is None
        pg.commit()
        other.execute("SELECT pg_advisory_unlock(hashtext(%s))",
                      (partitions.RETENTION_RUN_LOCK,))
    waiting.join(timeout=60)
    [result] = results
    assert (result.orders, result.ids) == (10, 10)
    again = apply_retention(pg, months[1])
    assert (again.orders, again.ids, again.partitions) == (0, 0, [])
