"""Issue 11, item 2: replay of a time window.

Every claimed batch's raw payloads are archived in Postgres (compressed, one partition per
UTC day, a retention setting), byte for byte; any window of the archive is run through the
pipeline again from those bytes. Replaying a promoted window changes nothing; replaying it
to reprocess after a fix (a corrected currency rate, a product moved to another category)
replaces those orders' stored values and corrects the views exactly as a full recompute from
`orders` makes them. All against the real servers; the crash tests SIGKILL a real process at
the replay's fault points.
"""

import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import zlib
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import pipeline
from orders_pipeline.assets.replay import replayed_orders
from orders_pipeline.conservation import check_conservation
from orders_pipeline.contract import ORDER_COLUMNS
from orders_pipeline.faults import CRASH_ENV, REPLAY_CRASH_POINTS
from orders_pipeline.postgres_patterns import replay
from orders_pipeline.postgres_patterns.archive import ArchiveCorrupt, decode, encode
from orders_pipeline.postgres_patterns.replay import Window
from orders_pipeline.postgres_patterns.views import rebuild_rollups
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import REPLAYED_COUNTER
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import (
    REPO,
    expected_orders,
    fresh_example,
    pipeline_env,
    push_orders,
    resources_for,
)
from orders_pipeline_tests.test_cli import one_usage_line
from orders_pipeline_tests.test_cli import run as cli
from orders_pipeline_tests.test_quarantine import books, cli_env, order, stage, zip_code  # noqa: F401
from orders_pipeline_tests.test_redrive import drain, ingest

EXAMPLES = 20
MOVED_PRODUCT = "P000002"  # moved to another category in the reprocess tests


# --- helpers ----------------------------------------------------------------------------------


def around_now(hours: float = 1) -> Window:
    """A window that holds everything archived in the last `hours` (and nothing later)."""
    now = datetime.now(UTC)
    return Window(now - timedelta(hours=hours), now + timedelta(hours=hours))


def archived(pg: psycopg.Connection) -> dict[str, list[bytes]]:
    """batch_id -> its archived payloads, decoded."""
    return {b: decode(bytes(blob)) for b, blob in pg.execute(
        "SELECT batch_id, payloads FROM raw_batches")}


def stored(pg: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Every row of `orders`, every column."""
    return pg.execute("SELECT * FROM orders ORDER BY order_id").fetchall()


def views(pg: psycopg.Connection) -> dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]:
    """The rows of both views and both rollups: key -> (order_count, units_sold, revenue)."""
    queries = {
        "sales_hourly": "SELECT hour, category, order_count, units_sold, revenue_usd"
                        " FROM sales_hourly",
        "sales_hourly_rollup": "SELECT hour, category, order_count, units_sold, revenue_usd"
                               " FROM sales_hourly_rollup",
        "product_performance_daily": "SELECT day, product_id, order_count, units_sold,"
                                     " revenue_usd FROM product_performance_daily",
        "product_daily_rollup": "SELECT day, product_id, order_count, units_sold, revenue_usd"
                                " FROM product_daily_rollup",
    }
    return {name: {(a, b): (n, u, r) for a, b, n, u, r in pg.execute(query)}
            for name, query in queries.items()}


def recomputed(pg: psycopg.Connection) -> dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]:
    """Both views (and their rollups) computed independently, in Python, from `orders`."""
    hourly: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, Decimal(0)])
    daily: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, Decimal(0)])
    for at, category, product, quantity, usd in pg.execute(
            "SELECT order_timestamp, category, product_id, quantity, total_amount_usd"
            " FROM orders"):
        utc = at.astimezone(UTC)
        for cell in (hourly[(utc.replace(minute=0, second=0, microsecond=0), category)],
                     daily[(utc.date(), product)]):
            cell[0] += 1
            cell[1] += quantity
            cell[2] += usd
    by_hour = {key: tuple(cell) for key, cell in hourly.items()}
    by_day = {key: tuple(cell) for key, cell in daily.items()}
    return {"sales_hourly": by_hour, "sales_hourly_rollup": by_hour,
            "product_performance_daily": by_day, "product_daily_rollup": by_day}


def expected(batches: list[list[bytes]], pg: psycopg.Connection,
             order_ids: set[str]) -> dict[str, tuple[Any, ...]]:
    """The stored values of each of `order_ids` computed independently from its first copy
    in queue order and the lookup tables as they are now: (quantity, total_amount,
    total_amount_usd, category, region, shipping_zone)."""
    first: dict[str, bytes] = {}
    for raw in (raw for batch in batches for raw in batch):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            first.setdefault(json.loads(raw)["order_id"], raw)
    totals = expected_orders([first[i] for i in order_ids], pg)
    categories = dict(pg.execute("SELECT product_id, category FROM products"))
    zips = {z: (region, zone) for z, region, zone in pg.execute(
        "SELECT zip_code, region, shipping_zone FROM zip_codes")}
    copies = {i: json.loads(first[i]) for i in order_ids}
    return {i: (copy["quantity"], *totals[i], categories[copy["product_id"]],
                *zips[copy["zip_code"]]) for i, copy in copies.items()}


def derived(pg: psycopg.Connection) -> dict[str, tuple[Any, ...]]:
    return {r[0]: tuple(r[1:]) for r in pg.execute(
        "SELECT order_id, quantity, total_amount, total_amount_usd, category, region,"
        " shipping_zone FROM orders")}


def replayed_counter(rconn: redis.Redis, keys: RedisKeys) -> int:
    return int(rconn.hget(keys.counters, REPLAYED_COUNTER) or 0)


def fix_lookups(pg: psycopg.Connection, cache: LookupCache) -> None:
    """The fixes of the issue: a corrected currency rate, and a product moved to a category of
    its own; the snapshot reloaded."""
    pg.execute("UPDATE currencies SET rate_to_usd = rate_to_usd * 1.1 WHERE currency_code = 'EUR'")
    pg.execute("UPDATE products SET category = 'Reclassified' WHERE product_id = %s",
               (MOVED_PRODUCT,))
    cache.load_snapshot(pg)


def back_date(pg: psycopg.Connection, batch_id: str, days: int) -> None:
    """Move a batch's archive row `days` days back (into that day's partition)."""
    day = datetime.now(UTC).date() - timedelta(days=days)
    pg.execute("SELECT raw_batches_add_partition(%s)", (day,))
    pg.execute("UPDATE raw_batches SET archived_at = archived_at - make_interval(days => %s)"
               " WHERE batch_id = %s", (days, batch_id))


# --- the archive ------------------------------------------------------------------------------

PAYLOADS = st.lists(st.one_of(st.binary(max_size=200),
                              st.sampled_from([b"", b"\n", b"a\nb\r\n", b"\x00", b"\xff\xfe",
                                               b'{"order_id": "x\n"}', "é\u2028".encode()])),
                    min_size=1, max_size=40)


@given(payloads=PAYLOADS)
def test_framing_round_trips_any_bytes(payloads: list[bytes]) -> None:
    assert decode(encode(payloads)) == payloads


def test_a_corrupt_blob_is_refused() -> None:
    with pytest.raises(ArchiveCorrupt, match="do not decompress"):
        decode(encode([b"abc", b"de"])[:-3])
    with pytest.raises(ArchiveCorrupt, match="cut short"):
        decode(zlib.compress(b"\x00\x00\x00\x09abc"))
    with pytest.raises(ArchiveCorrupt, match="inside a length prefix"):
        decode(zlib.compress(b"\x00\x00\x00\x01a\x00\x00"))


@hypothesis_settings(max_examples=EXAMPLES, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])
@given(payloads=PAYLOADS, valid=st.integers(min_value=0, max_value=3))
def test_every_claimed_batch_is_archived_byte_for_byte(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, payloads: list[bytes],  # noqa: F811
        valid: int) -> None:
    example = fresh_example(settings, rconn, pg)
    batch = [*payloads, *(order(zip_code, f"ok-{i}") for i in range(valid))]
    [batch_id] = stage(example, [batch])
    assert archived(pg)[batch_id] == batch  # whatever the bytes
    assert pg.execute("SELECT count(*), sum(orders), sum(raw_bytes) FROM raw_batches"
                      " WHERE batch_id = %s", (batch_id,)).fetchone() == (
        1, len(batch), sum(map(len, batch)))


def partitions(pg: psycopg.Connection) -> set[str]:
    return {r[0] for r in pg.execute(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'raw_batches'::regclass")}


def partition(day: date) -> str:
    return f"raw_batches_{day:%Y%m%d}"


def test_a_batch_is_archived_once_however_often_it_is_staged(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str) -> None:  # noqa: F811
    batch = [order(zip_code, f"o{i}") for i in range(3)]
    [batch_id] = stage(settings, [batch])
    pg.execute("TRUNCATE orders_staging")  # what a Postgres crash does to UNLOGGED staging
    assert pipeline.promote_staged(settings).lost_batches == [batch_id]
    drain(settings)  # staged again under its ledger row: not archived again
    assert archived(pg) == {batch_id: batch}
    today = datetime.now(UTC).date()
    assert partitions(pg) == {partition(today), partition(today + timedelta(days=1))}
    books(settings, rconn, pg)


# --- replay: a promoted window changes nothing ---------------------------------------------


def values(pg: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Every order's contract columns (not batch_id, promoted_at)."""
    return pg.execute(f"SELECT {', '.join(ORDER_COLUMNS)} FROM orders ORDER BY order_id"
                      ).fetchall()


@pytest.mark.parametrize("dedup", ["remembered", "forgotten"])
def test_replaying_a_promoted_window_changes_nothing(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, dedup: str) -> None:
    payloads, _ = push_orders(settings, rconn, pg, 3000, batch_size=1000, duplicates=0.1,
                              invalid=0.05)
    drain(settings)
    pipeline.refresh_all_views(settings)
    before = (stored(pg), views(pg))
    assert before[1] == recomputed(pg)
    sources = archived(pg)
    assert sorted(p for batch in sources.values() for p in batch) == sorted(payloads)
    rejects = sorted(bytes(r[0]) for r in pg.execute("SELECT raw_payload FROM orders_rejected"))
    if dedup == "forgotten":  # a window older than DEDUP_WINDOW_SECONDS
        DedupWindow(rconn, keys, 3600).clear()

    done = pipeline.replay_window(settings, around_now())

    assert not done.dry_run and done.replay_id and not done.resumed_request
    assert (done.contents.batches, done.contents.orders) == (3, 3000)
    assert done.contents.replayable_batches == 3
    outcome = done.outcome
    assert outcome is not None and (outcome.batches, outcome.orders) == (3, 3000)
    assert (outcome.promoted_batches, outcome.quarantined_batches, outcome.changed) == (3, 0, 0)
    assert outcome.rejected == len(rejects)  # the same verdicts on the same bytes
    assert (stored(pg), views(pg)) == before
    assert archived(pg) == sources  # a replay batch is not archived again
    assert sorted(bytes(r[0]) for r in pg.execute(
        "SELECT raw_payload FROM orders_rejected WHERE batch_id LIKE 'replay-%'")) == rejects
    balance = books(settings, rconn, pg)
    assert balance.replayed == replayed_counter(rconn, keys) == 3000

    again = pipeline.replay_window(settings, around_now())  # and again: still nothing
    assert again.replay_id != done.replay_id and again.outcome.promoted_batches == 3
    assert (stored(pg), views(pg)) == before
    assert books(settings, rconn, pg).replayed == 6000


def test_a_replay_brings_back_orders_missing_from_orders(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str) -> None:  # noqa: F811
    """`orders` lost rows (restored from an older backup, say): the raw bytes bring them back,
    the first copy in queue order as when they first landed."""
    ingest(settings, [order(zip_code, "kept"), order(zip_code, "lost", quantity=3),
                      order(zip_code, "lost", quantity=9)])
    before = values(pg)
    pg.execute("DELETE FROM orders WHERE order_id = 'lost'")
    rebuild_rollups(pg)

    done = pipeline.replay_window(settings, around_now())

    assert values(pg) == before
    [(batch_id,)] = pg.execute("SELECT batch_id FROM orders WHERE order_id = 'lost'")
    assert batch_id.startswith(f"{done.replay_id}-")
    assert views(pg) == recomputed(pg)
    # The books count outcomes: the row deleted by hand stays one outcome short of them.
    assert check_conservation(rconn, keys, pg).difference == 1


# --- reprocess: equal to a full recompute --------------------------------------------------


@pytest.mark.parametrize("dedup", ["remembered", "forgotten"])
def test_reprocess_after_a_fix_equals_a_full_recompute(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, dedup: str) -> None:  # noqa: F811
    moved = {"product_id": MOVED_PRODUCT, "currency": "USD"}
    hand = [
        # The only orders of their hour: after the move its (hour, old category) row is empty.
        [order(zip_code, "solo-1", order_timestamp="2030-05-01T03:10:00+00:00", **moved),
         order(zip_code, "solo-2", order_timestamp="2030-05-01T03:50:00+00:00", **moved),
         order(zip_code, "dup", quantity=2), order(zip_code, "eur"), b"not json",
         order(zip_code, "twice", quantity=4), order(zip_code, "twice", quantity=5)],
        # A later copy of `dup` with other values: a duplicate, it must not win now either.
        [order(zip_code, "dup", quantity=9), order(zip_code, "jpy", currency="JPY")],
        [order(zip_code, "old-eur", quantity=3)],  # archived yesterday: outside the window
    ]
    first, second, old = ingest(settings, *hand)
    back_date(pg, old, 1)
    payloads, _ = push_orders(settings, rconn, pg, 2000, batch_size=1000, duplicates=0.05,
                              invalid=0.02)
    drain(settings)
    pipeline.refresh_all_views(settings)
    assert views(pg) == recomputed(pg)
    before = {r[0]: r for r in pg.execute(
        f"SELECT {', '.join(ORDER_COLUMNS)} FROM orders")}
    old_category = before["solo-1"][ORDER_COLUMNS.index("category")]
    derived_before = derived(pg)
    fix_lookups(pg, loaded_cache)
    if dedup == "forgotten":
        DedupWindow(rconn, keys, 3600).clear()

    done = pipeline.replay_window(settings, around_now(), reprocess=True)

    now = derived(pg)
    assert set(now) == set(before)  # nothing gained, nothing lost
    assert now == {**expected([*hand, payloads], pg, set(now) - {"old-eur"}),
                   "old-eur": derived_before["old-eur"]}  # not in the window: as it was
    assert now["dup"][0] == 2 and now["twice"][0] == 4
    assert views(pg) == recomputed(pg)  # views and rollups: exactly a full recompute
    assert (datetime(2030, 5, 1, 3, tzinfo=UTC), old_category) not in views(pg)["sales_hourly"]
    changed = {r[0]: r for r in pg.execute(
        f"SELECT {', '.join(ORDER_COLUMNS)} FROM reprocessed_orders")}
    after = {r[0]: r for r in pg.execute(f"SELECT {', '.join(ORDER_COLUMNS)} FROM orders")}
    assert changed == {i: row for i, row in before.items() if after[i] != row}  # old values
    assert done.outcome is not None and done.outcome.changed == len(changed) > 0
    assert done.outcome.promoted_batches == done.contents.batches == 4
    balance = books(settings, rconn, pg)
    assert balance.replayed == done.contents.orders == sum(map(len, hand[:2])) + 2000

    settled = pipeline.replay_window(settings, around_now(), reprocess=True)
    assert settled.outcome is not None and settled.outcome.changed == 0  # nothing left to fix
    assert derived(pg) == now and views(pg) == recomputed(pg)


# --- a replay killed at each step ------------------------------------------------------------

_REPLAY_SCRIPT = """
import sys
from datetime import datetime
from orders_pipeline import pipeline
from orders_pipeline.postgres_patterns.replay import Window
from orders_pipeline.settings import Settings
window = Window(datetime.fromisoformat(sys.argv[1]), datetime.fromisoformat(sys.argv[2]))
pipeline.replay_window(Settings.from_env(), window, reprocess=True, chunk_batches=1)
"""


@pytest.mark.parametrize("resume", ["same_window", "another_window"])
@pytest.mark.parametrize("point", REPLAY_CRASH_POINTS)
def test_replay_killed_at_each_step_pushes_each_batch_once(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, point: str,  # noqa: F811
        resume: str) -> None:
    batches = [[order(zip_code, f"b{b}-{i}") for i in range(3)] for b in range(4)]
    ingest(settings, *batches)
    fix_lookups(pg, loaded_cache)
    window = around_now()

    killed = subprocess.run(
        [sys.executable, "-c", _REPLAY_SCRIPT, window.since.isoformat(),
         window.until.isoformat()], cwd=REPO, env={**pipeline_env(settings), CRASH_ENV: point},
        capture_output=True, text=True, timeout=120)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [(replay_id, planned)] = pg.execute("SELECT replay_id, batches FROM replays")
    assert planned == 4
    pending = {"after_replay_plan": 4, "after_replay_push": 4, "after_replay_chunk": 3}[point]
    assert pg.execute("SELECT count(*) FROM replay_batches WHERE pushed_at IS NULL"
                      ).fetchone()[0] == pending
    assert replayed_counter(rconn, keys) == (0 if point == "after_replay_plan" else 3)
    assert rconn.hlen(keys.redriven) == (1 if point == "after_replay_push" else 0)
    books(settings, rconn, pg)

    if resume == "same_window":  # the command run again resumes the request
        done = pipeline.replay_window(settings, window, reprocess=True)
        assert done.resumed_request and done.replay_id == replay_id and not done.resumed
    else:  # any later replay finishes it first
        later = Window(window.until, window.until + timedelta(hours=1))
        done = pipeline.replay_window(settings, later, reprocess=True)
        assert done.replay_id is None and len(done.resumed) == pending

    assert pg.execute("SELECT count(*), count(pushed_at) FROM replay_batches").fetchone() == (
        4, 4)
    assert pg.execute("SELECT count(*) FROM replays").fetchone()[0] == 1
    assert pg.execute("SELECT status, count(*) FROM ingest_batches WHERE batch_id LIKE"
                      " 'replay-%' GROUP BY 1").fetchall() == [("promoted", 4)]
    assert replayed_counter(rconn, keys) == 12 and rconn.hlen(keys.redriven) == 0
    ids = {f"b{b}-{i}" for b in range(4) for i in range(3)}
    assert derived(pg) == expected(batches, pg, ids)  # every order once, recomputed
    assert views(pg) == recomputed(pg)
    outcome = replay.outcome(pg, replay_id)
    assert outcome is not None and outcome.promoted_batches == 4 and outcome.changed == 12
    assert books(settings, rconn, pg).replayed == 12


# --- retention --------------------------------------------------------------------------------


def test_retention_drops_whole_old_days_only(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, cli_env: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    today = datetime.now(UTC).date()
    ids = ingest(settings, *([order(zip_code, f"r{i}")] for i in range(4)))
    for batch_id, age in zip(ids, (9, 5, 3), strict=False):  # the last stays today
        back_date(pg, batch_id, age)
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
    five_days_ago = Window(midnight - timedelta(days=5), midnight - timedelta(days=4))
    planned = replay.plan(pg, five_days_ago, False)  # a replay that still has to read day -5
    assert len(planned.batch_ids) == 1
    keep_3 = dataclasses.replace(settings, pipeline=dataclasses.replace(
        settings.pipeline, raw_retention_days=3))

    assert pipeline.prune_archive(keep_3) == [partition(today - timedelta(days=9))]

    assert set(archived(pg)) == set(ids[1:])
    assert pipeline.replay_window(keep_3, five_days_ago).replay_id == planned.replay_id
    code, out, err = cli(capsys, "replay", "--prune")
    assert code == 0 and err == ""
    assert out == ("dropped 0 day partitions of raw_batches older than RAW_RETENTION_DAYS=30 "
                   "days\n")
    monkeypatch.setenv("RAW_RETENTION_DAYS", "3")
    code, out, err = cli(capsys, "replay", "--prune")
    assert code == 0 and err == ""
    assert out == ("dropped 1 day partitions of raw_batches older than RAW_RETENTION_DAYS=3 "
                   f"days: {partition(today - timedelta(days=5))}\n")
    assert set(archived(pg)) == set(ids[2:])  # day -3 is the oldest kept
    assert partition(today - timedelta(days=3)) in partitions(pg)

    # Staging prunes by itself: the first batch of a day, which finds no partition for
    # tomorrow, creates it and drops what is past the retention.
    pg.execute(f"DROP TABLE {partition(today + timedelta(days=1))}")
    pg.execute("SELECT raw_batches_add_partition(%s)", (today - timedelta(days=40),))
    [fresh] = stage(keep_3, [[order(zip_code, "r-new")]])
    assert partitions(pg) == {partition(today - timedelta(days=3)), partition(today),
                              partition(today + timedelta(days=1))}
    assert set(archived(pg)) == {ids[2], ids[3], fresh}
    books(settings, rconn, pg)


# --- the Dagster asset --------------------------------------------------------------------------


def test_daily_asset_replays_its_day_and_reports_it(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str) -> None:  # noqa: F811
    batches = [[order(zip_code, "d1"), order(zip_code, "d2", currency="USD"), b"{"],
               [order(zip_code, "d3")]]
    ingest(settings, *batches)
    fix_lookups(pg, loaded_cache)
    today = datetime.now(UTC).date()

    def materialize(day: date, **config: bool) -> dict[str, Any]:
        result = dg.materialize(
            [replayed_orders], partition_key=day.isoformat(),
            run_config={"ops": {"replayed_orders": {"config": config}}},
            resources=resources_for(settings), instance=dg.DagsterInstance.ephemeral())
        assert result.success
        [materialization] = result.asset_materializations_for_node("replayed_orders")
        assert materialization.partition == day.isoformat()
        return {k: v.value for k, v in materialization.metadata.items()}

    reprocessed = materialize(today, reprocess=True)

    assert {k: reprocessed[k] for k in (
        "reprocess", "archived_batches", "archived_orders", "batches", "orders",
        "batches_promoted", "batches_quarantined", "reprocessed", "changed_rows",
        "rejected")} == {
        "reprocess": True, "archived_batches": 2, "archived_orders": 4, "batches": 2,
        "orders": 4, "batches_promoted": 2, "batches_quarantined": 0, "reprocessed": 3,
        "changed_rows": 2, "rejected": 1}  # d2 is in USD: recomputed, unchanged
    assert str(reprocessed["replay_id"]).startswith("replay-")
    assert reprocessed["archived_bytes"] > 0 and reprocessed["raw_bytes"] > 0
    assert derived(pg) == expected(batches, pg, {"d1", "d2", "d3"})
    assert views(pg) == recomputed(pg)

    plain = materialize(today)  # a backfill run again without reprocess: nothing changes
    assert (plain["reprocess"], plain["batches"], plain["changed_rows"]) == (False, 2, 0)
    empty = materialize(today - timedelta(days=1))  # nothing was archived that day
    assert (empty["replay_id"], empty["batches"], empty["archived_batches"]) == ("-", 0, 0)
    assert books(settings, rconn, pg).replayed == 8


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_replay_refuses_bad_usage_counts_and_reprocesses(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, cli_env: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    ingest(settings, [order(zip_code, "c1"), b"bad"])
    window = around_now()
    since, until = window.since.isoformat(), window.until.isoformat()
    for args, refusal in [
            (["--from", since], "give both --from and --to"),
            ([], "give the window to replay with --from and --to (or --prune alone)"),
            (["--prune", "--reprocess"], "give the window to replay"),
            (["--from", until, "--to", since], "the window is empty"),
            (["--from", "2030-05-01T00:00:00", "--to", until], "has no UTC offset"),
            (["--from", "yesterday", "--to", until], "is not an ISO 8601 instant"),
            (["--prune", "--dry-run"], "--prune changes the archive")]:
        code, _, err = cli(capsys, "replay", *args)
        assert code == 2 and refusal in one_usage_line(err, "replay"), (args, err)

    code, out, err = cli(capsys, "replay", "--from", since, "--to", until, "--dry-run")
    assert code == 0 and err == ""
    assert ": 1 batches, 2 orders (" in out and "1 promoted (2 orders), 0 still" in out
    assert out.endswith("run without --dry-run to replay the 1 promoted batches\n")
    assert pg.execute("SELECT count(*) FROM replays").fetchone()[0] == 0

    fix_lookups(pg, loaded_cache)
    code, out, err = cli(capsys, "replay", "--from", since, "--to", until, "--reprocess")
    assert code == 0 and err == ""
    [_, line] = out.splitlines()
    assert line.startswith("reprocessed 1 batches (2 orders) as replay-")
    assert line.endswith(": 1 promoted, 0 quarantined; 1 orders reached promotion, 1 rejected; "
                         "1 order rows changed; views refreshed")
    assert derived(pg) == expected([[order(zip_code, "c1")]], pg, {"c1"})
    books(settings, rconn, pg)
