"""Issue 12, item 4: promotion by queue shard, rounds of different shards at the same time.

Batches are staged with `stage_batch` on several shards (the ledger records each batch's
shard), then promoted by one thread per shard (`promote_round(conn, shard=s)`, each on its
own connection) and one all-shards promoter (`shard=None`) at once, against the real
Postgres. Whatever the interleaving: every order id is in `orders` once, with the values of
the first copy of its shard (of one of its shards when several carry it), the rollups equal a
recompute over `orders`, the outbox lists every inserted order once, the ledger says
`promoted` (or `lost` / `quarantined` for the batches made so), no round met a deadlock, and
two rounds of one shard never overlap while other shards' rounds go on.
"""

import json
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.pq import TransactionStatus

from benchmarks.cli import main as benchmark_main
from orders_pipeline.connections import pg_connect
from orders_pipeline.faults import PAUSE_ENV, PAUSE_FILE_ENV
from orders_pipeline.postgres_patterns.promotion import (
    MAX_SHARD,
    PromotionResult,
    is_poison,
    is_transient,
    promote_round,
    staged_shards,
)
from orders_pipeline.postgres_patterns.staging import (
    STAGING_COLUMNS,
    StageOutcome,
    StagingBatch,
    stage_batch,
)
from orders_pipeline.postgres_patterns.views import ROLLUPS
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import pipeline_env, wait_for

SHARDS = 4
START = datetime(2030, 3, 1, tzinfo=UTC)
NO_666 = "no_customer_666"
BENCH_DATABASES = "SELECT datname FROM pg_database WHERE datname LIKE 'orders\\_bench\\_%'"
Promoter = int | None  # a shard, or None for the all-shards promoter


# --- building staged batches ------------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """One copy of an order as a batch carries it. `customer_id` is unique to the copy, so
    the row in `orders` tells which copy landed."""
    order_id: str
    customer_id: int
    product: int      # index into the test's products
    quantity: int
    cents: int        # unit price in USD cents
    minutes: int      # after START


@dataclass(frozen=True)
class Catalog:
    """A few seed products (id, category) and one zip code (zip, region, shipping zone)."""
    products: list[tuple[str, str]]
    zip_code: tuple[str, str, int]


@pytest.fixture
def catalog(pg: psycopg.Connection) -> Catalog:
    products = pg.execute("SELECT product_id, category FROM products ORDER BY product_id"
                          " LIMIT 12").fetchall()
    zip_code = pg.execute("SELECT zip_code, region, shipping_zone FROM zip_codes"
                          " ORDER BY zip_code LIMIT 1").fetchone()
    return Catalog(products, zip_code)


def batch_rows(catalog: Catalog, copies: Sequence[Copy]) -> pl.DataFrame:
    """Staging rows (STAGING_COLUMNS but batch_id) of the copies, in batch order, in USD."""
    zip_code, region, zone = catalog.zip_code
    products = [catalog.products[c.product % len(catalog.products)] for c in copies]
    prices = [Decimal(c.cents).scaleb(-2) for c in copies]
    totals = [price * c.quantity for price, c in zip(prices, copies, strict=True)]
    frame = pl.DataFrame({
        "batch_position": pl.Series(range(len(copies)), dtype=pl.Int32),
        "order_id": [c.order_id for c in copies],
        "customer_id": pl.Series([c.customer_id for c in copies], dtype=pl.Int64),
        "product_id": [p for p, _ in products],
        "quantity": pl.Series([c.quantity for c in copies], dtype=pl.Int32),
        "unit_price": pl.Series(prices, dtype=pl.Decimal(18, 4)),
        "currency": ["USD"] * len(copies),
        "zip_code": [zip_code] * len(copies),
        "order_timestamp": pl.Series([START + timedelta(minutes=c.minutes) for c in copies],
                                     dtype=pl.Datetime("us", "UTC")),
        "total_amount": pl.Series(totals, dtype=pl.Decimal(24, 4)),
        "total_amount_usd": pl.Series(totals, dtype=pl.Decimal(22, 2)),
        "category": [c for _, c in products],
        "region": [region] * len(copies),
        "shipping_zone": pl.Series([zone] * len(copies), dtype=pl.Int16),
    })
    return frame.select([c for c in STAGING_COLUMNS if c != "batch_id"])


@dataclass
class Staged:
    """What a test staged: each batch's shard and copies, in staging order."""
    batches: dict[str, tuple[int, list[Copy]]]

    def first_copies(self, skip: set[str] = frozenset()) -> dict[str, dict[int, Copy]]:
        """order id -> {shard: the first copy of that id in that shard's staging order}, over
        the batches not in `skip`."""
        first: dict[str, dict[int, Copy]] = {}
        for batch_id, (shard, copies) in self.batches.items():
            if batch_id in skip:
                continue
            for copy in copies:
                first.setdefault(copy.order_id, {}).setdefault(shard, copy)
        return first


def stage_all(pg: psycopg.Connection, catalog: Catalog,
              batches: Sequence[tuple[str, int, list[Copy]]],
              staged: Staged | None = None) -> Staged:
    """Stage the batches (id, shard, copies) one after another, each in its transaction;
    they are added to `staged` (default: a new record)."""
    staged = Staged({}) if staged is None else staged
    for batch_id, shard, copies in batches:
        outcome = stage_batch(pg, StagingBatch(batch_id, len(copies), batch_rows(catalog, copies),
                                               pl.DataFrame(), 0, shard=shard))
        assert outcome is StageOutcome.STAGED
        staged.batches[batch_id] = (shard, copies)
    return staged


# --- promoting in parallel --------------------------------------------------------------------


def promote_until_done(conn: psycopg.Connection, promoter: Promoter, max_batches: int,
                       payloads_of: Callable[[str], Sequence[bytes]] | None = None
                       ) -> PromotionResult:
    """Rounds of one promoter until one finds nothing of its shard(s) to do."""
    total = PromotionResult()
    while True:
        result = promote_round(conn, max_batches, payloads_of, shard=promoter)
        total.add(result)
        if not (result.promoted_batches or result.lost_batches or result.quarantined):
            return total


def in_parallel(connections: dict[Promoter, psycopg.Connection], max_batches: int,
                payloads_of: Callable[[str], Sequence[bytes]] | None = None
                ) -> dict[Promoter, PromotionResult]:
    """Every promoter on its own connection and thread, started together; their totals.
    Re-raises the first error a promoter met."""
    start = threading.Barrier(len(connections))
    results: dict[Promoter, PromotionResult] = {}
    errors: list[BaseException] = []

    def run(promoter: Promoter) -> None:
        try:
            start.wait(timeout=30)
            results[promoter] = promote_until_done(connections[promoter], promoter, max_batches,
                                                   payloads_of)
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,), name=f"promoter-{p}")
               for p in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), f"{thread.name} did not finish"
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def connections(settings: Settings) -> Iterator[dict[Promoter, psycopg.Connection]]:
    """One connection per promoter: shards 0 … SHARDS-1 and the all-shards one (None)."""
    conns: dict[Promoter, psycopg.Connection] = {
        p: pg_connect(settings.postgres) for p in [*range(SHARDS), None]}
    try:
        yield conns
    finally:
        for conn in conns.values():
            conn.close()


# --- invariants -------------------------------------------------------------------------------


def stored(pg: psycopg.Connection) -> dict[str, tuple[int, str]]:
    """order id -> (customer_id, batch_id) of every row of `orders`; fails on a repeated id."""
    rows = pg.execute("SELECT order_id, customer_id, batch_id FROM orders").fetchall()
    found = {order_id: (customer, batch) for order_id, customer, batch in rows}
    assert len(found) == len(rows), "an order id is stored twice"
    return found


def assert_rollups_exact(pg: psycopg.Connection) -> None:
    """Each rollup equals a recompute over `orders`, row for row (no empty rows either)."""
    for rollup, (_, expressions) in ROLLUPS.items():
        kept = pg.execute(sql.SQL(
            "SELECT * FROM {} ORDER BY 1, 2").format(sql.Identifier(rollup))).fetchall()
        recomputed = pg.execute(
            f"SELECT {expressions}, count(*), sum(quantity::bigint), sum(total_amount_usd)"
            " FROM orders GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        assert kept == recomputed, rollup


def assert_books_balance(pg: psycopg.Connection, staged: Staged,
                         results: Sequence[PromotionResult]) -> None:
    """Rollups exact; the outbox lists every stored order once; `promotions` and the rounds'
    results add up to `orders`; staging is empty; no batch was promoted twice."""
    assert_rollups_exact(pg)
    listed = [r[0] for r in pg.execute("SELECT unnest(order_ids) FROM promoted_outbox")]
    ids = sorted(stored(pg))
    assert sorted(listed) == ids
    assert pg.execute("SELECT coalesce(sum(inserted_rows), 0) FROM promotions"
                      ).fetchone()[0] == len(ids)
    assert sum(r.inserted_rows for r in results) == len(ids)
    assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0
    promoted = {b for r in results for b in r.promoted_batches}
    assert len(promoted) == sum(len(r.promoted_batches) for r in results), "promoted twice"
    assert sum(r.staged_rows for r in results) == sum(
        len(staged.batches[b][1]) for b in promoted)


def assert_first_copies_landed(pg: psycopg.Connection, staged: Staged,
                               skip: set[str] = frozenset()) -> None:
    """Every id of the batches not in `skip` is stored once, with the values of the first
    copy of one of the shards that carry it (the first copy of the only one, if one)."""
    first = staged.first_copies(skip)
    rows = stored(pg)
    assert set(rows) == set(first)
    for order_id, (customer, _) in rows.items():
        assert customer in {c.customer_id for c in first[order_id].values()}, order_id


def ledger(pg: psycopg.Connection) -> dict[str, tuple[str, int]]:
    return {b: (status, shard) for b, status, shard in pg.execute(
        "SELECT batch_id, status, shard FROM ingest_batches")}


# --- tests ------------------------------------------------------------------------------------


def test_shards_promote_in_parallel_each_id_once_rollups_exact(
        pg: psycopg.Connection, catalog: Catalog,
        connections: dict[Promoter, psycopg.Connection]) -> None:
    rng = random.Random(12)
    tags = iter(range(10_000, 10**9))  # customer ids; 666 is the poison below

    def copy(order_id: str) -> Copy:
        return Copy(order_id, next(tags), rng.randrange(12), rng.randint(1, 5),
                    rng.randint(1, 99_999), rng.randrange(3 * 24 * 60))

    # Phase 1, promoted before the parallel run: ids whose late copies come back later.
    early = [copy(f"early-{n}") for n in range(300)]
    staged = stage_all(pg, catalog, [("early", 1, early)])
    first_round = promote_round(pg)
    assert first_round.promoted_batches == ["early"]

    # Phase 2: 4 shards x 4 batches of 400. `shared` ids are carried by shards 0 and 3 (in
    # opposite orders, the deadlock-prone case), `late` ones twice in shard 2, and shard 1
    # repeats phase 1's ids. One batch of shard 2 is poison, one of shard 3 loses its rows.
    shared = [f"shared-{n}" for n in range(400)]
    poison, lost = "b2.s2", "b1.s3"
    batches: list[tuple[str, int, list[Copy]]] = []
    for number in range(4):
        for shard in range(SHARDS):
            ids = [f"s{shard}-b{number}-{n}" for n in range(400)]
            if number == 0 and shard == 0:
                ids[:200] = shared[:200]
            if number == 0 and shard == 3:
                ids[:200] = shared[199::-1]
            if number == 1 and shard in (0, 3):
                ids[200:] = shared[200:] if shard == 0 else shared[:199:-1]
            if number == 3 and shard == 2:
                ids[:100] = [f"s2-b0-{n}" for n in range(100)]  # late copies in one shard
            if number == 2 and shard == 1:
                ids[:300] = [c.order_id for c in early]  # long after the first copy landed
            copies = [copy(i) for i in ids]
            if f"b{number}.s{shard}" == poison:
                copies[5] = Copy("poison-666", 666, 0, 1, 100, 10)
            batches.append((f"b{number}.s{shard}", shard, copies))
    stage_all(pg, catalog, batches, staged)
    pg.execute("DELETE FROM orders_staging WHERE batch_id = %s", (lost,))  # as a crash does
    pg.execute(f"ALTER TABLE orders ADD CONSTRAINT {NO_666} CHECK (customer_id <> 666)")
    assert staged_shards(pg) == [0, 1, 2, 3]
    assert staged_shards(connections[0]) == [0, 1, 2, 3]  # not autocommit: left idle
    assert connections[0].info.transaction_status == TransactionStatus.IDLE

    results = in_parallel(connections, max_batches=2,
                          payloads_of=lambda b: [f"raw of {b}".encode()])

    assert staged_shards(pg) == []
    everything = list(results.values())
    assert [r.retries for r in everything] == [0] * len(everything), "a round met a deadlock"
    assert [b for r in everything for b in r.lost_batches] == [lost]
    [quarantined] = [q for r in everything for q in r.quarantined]
    assert quarantined.batch_id == poison and quarantined.payloads == 1
    assert quarantined.error.startswith("SQLSTATE 23514")
    statuses = ledger(pg)
    assert statuses.pop(lost) == ("lost", 3) and statuses.pop(poison) == ("quarantined", 2)
    assert statuses == {b: ("promoted", shard) for b, (shard, _) in staged.batches.items()
                        if b not in (lost, poison)}
    assert_first_copies_landed(pg, staged, skip={lost, poison})
    rows = stored(pg)
    assert all(rows[c.order_id] == (c.customer_id, "early") for c in early)  # first wins
    assert all(rows[f"s2-b0-{n}"][1] == "b0.s2" for n in range(100))
    assert {rows[i][1] for i in shared} <= {"b0.s0", "b1.s0", "b0.s3"}
    assert promote_round(pg).promoted_batches == []
    assert_books_balance(pg, staged, [first_round, *everything])


def test_rounds_of_one_shard_serialise_other_shards_proceed(
        pg: psycopg.Connection, catalog: Catalog,
        connections: dict[Promoter, psycopg.Connection], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """A round of shard 0 paused inside its transaction (the `mid_promotion` fault point: its
    orders inserted, its locks held): a second round of shard 0 waits for it, a round of
    shard 1 runs to its commit meanwhile, and an all-shards round waits for both shard-0
    rounds. Shard 1's orders fall in other rollup rows (another hour and day): rounds that
    add to the same rollup rows wait for each other from that upsert to their commit,
    whatever their shards."""
    def copies(prefix: str, minutes: int, product: int) -> list[Copy]:
        return [Copy(f"{prefix}-{n}", 1000 + n, product, 1, 250, minutes) for n in range(50)]

    staged = stage_all(pg, catalog, [("first.s0", 0, copies("a", 10, 0)),
                                     ("second.s0", 0, copies("b", 20, 0)),
                                     ("only.s1", 1, copies("c", 2 * 24 * 60, 1))])
    marker = tmp_path / "paused"
    monkeypatch.setenv(PAUSE_ENV, "mid_promotion")  # the first round to get there pauses
    monkeypatch.setenv(PAUSE_FILE_ENV, str(marker))
    results: dict[str, PromotionResult] = {}

    def promote(name: str, promoter: Promoter, conn: psycopg.Connection) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(
            name, promote_round(conn, 1, shard=promoter)), name=name)
        thread.start()
        return thread

    def waiting_for_lock(conn: psycopg.Connection) -> bool:
        """The connection waits for an advisory lock (a promotion lock: before its round
        reads or locks anything of the ledger)."""
        return pg.execute("SELECT wait_event_type = 'Lock' AND wait_event = 'advisory'"
                          " FROM pg_stat_activity WHERE pid = %s",
                          (conn.info.backend_pid,)).fetchone()[0]

    first = promote("first", 0, connections[0])
    wait_for(marker.exists, "the first round of shard 0 to pause inside its transaction")
    second = promote("second", 0, connections[1])
    wait_for(lambda: waiting_for_lock(connections[1]), "the second round of shard 0 to wait")

    other = promote("other", 1, connections[2])
    other.join(timeout=30)
    assert results["other"].promoted_batches == ["only.s1"]  # while shard 0 is held
    # An all-shards round waits for every shard round (and shard rounds that start after it
    # wait behind it: Postgres queues lock requests in order).
    every = promote("every", None, connections[None])
    wait_for(lambda: waiting_for_lock(connections[None]), "the all-shards round to wait")
    assert first.is_alive() and second.is_alive() and waiting_for_lock(connections[1])

    marker.unlink()
    for thread in (first, second, every):
        thread.join(timeout=30)
        assert not thread.is_alive(), thread.name
    assert results["first"].promoted_batches == ["first.s0"]
    assert results["second"].promoted_batches == ["second.s0"]
    assert results["every"].promoted_batches == []
    # Outbox ids follow commit order, though the paused round drew its id from the sequence
    # before shard 1's round did.
    order = [r[0] for r in pg.execute("SELECT batch_id FROM promoted_outbox ORDER BY outbox_id")]
    assert order == ["only.s1", "first.s0", "second.s0"]
    assert_first_copies_landed(pg, staged)
    assert_books_balance(pg, staged, list(results.values()))


@pytest.mark.parametrize("attempt", range(3))
def test_shards_sharing_ids_in_opposite_orders_do_not_deadlock(
        pg: psycopg.Connection, catalog: Catalog,
        connections: dict[Promoter, psycopg.Connection], attempt: int) -> None:
    """Two shards carry the same 4,000 ids, one in ascending and one in descending order, and
    are promoted at the same instant: inserted in id order, neither round waits for the
    other in a cycle (unsorted, they deadlock and one is tried again)."""
    ids = [f"same-{n:05d}" for n in range(4000)]
    staged = stage_all(pg, catalog, [
        ("up.s0", 0, [Copy(i, n + 1, n % 12, 1 + n % 5, 500, n % 600)
                      for n, i in enumerate(ids)]),
        ("down.s3", 3, [Copy(i, 10_000 + n, n % 7, 1, 300, n % 900)
                        for n, i in enumerate(reversed(ids))])])

    results = in_parallel({p: connections[p] for p in (0, 3)}, max_batches=1)

    assert [results[p].retries for p in (0, 3)] == [0, 0], "a round met a deadlock"
    assert sorted(results[0].promoted_batches + results[3].promoted_batches) == [
        "down.s3", "up.s0"]
    assert results[0].inserted_rows + results[3].inserted_rows == len(ids)
    assert_first_copies_landed(pg, staged)
    assert_books_balance(pg, staged, list(results.values()))


def test_first_copy_in_ledger_order_lands_within_one_round(
        pg: psycopg.Connection, catalog: Catalog) -> None:
    """Copies of an id in one round: the one of the batch staged first lands, and of copies
    in one batch the first by position (rows are inserted in id order, ties in ledger and
    batch order)."""
    staged = stage_all(pg, catalog, [
        ("older.s1", 1, [Copy("x", 1, 0, 1, 100, 0), Copy("y", 2, 0, 1, 100, 0),
                         Copy("y", 3, 0, 1, 100, 0)]),
        ("newer.s1", 1, [Copy("y", 4, 0, 1, 100, 0), Copy("x", 5, 0, 1, 100, 0),
                         Copy("z", 6, 0, 1, 100, 0), Copy("z", 7, 0, 1, 100, 0)])])

    result = promote_round(pg, shard=1)

    assert result.promoted_batches == ["older.s1", "newer.s1"] and result.inserted_rows == 3
    assert stored(pg) == {"x": (1, "older.s1"), "y": (2, "older.s1"), "z": (6, "newer.s1")}
    assert_books_balance(pg, staged, [result])


def test_shard_bounds_transient_and_poison_errors() -> None:
    with pytest.raises(ValueError, match="shard must be 0 to 32767"):
        promote_round(None, shard=-1)  # type: ignore[arg-type]  # refused before any query
    with pytest.raises(ValueError, match="shard must be 0 to 32767"):
        promote_round(None, shard=MAX_SHARD + 1)  # type: ignore[arg-type]
    deadlock = psycopg.errors.DeadlockDetected()
    serialization = psycopg.errors.SerializationFailure()
    check = psycopg.errors.CheckViolation()
    assert is_transient(deadlock) and is_transient(serialization) and not is_transient(check)
    assert not is_poison(deadlock) and not is_poison(serialization) and is_poison(check)


def test_a_deadlock_is_retried_not_quarantined(
        pg: psycopg.Connection, catalog: Catalog, settings: Settings) -> None:
    """A round that Postgres aborts as a deadlock victim is rolled back and tried again by
    `promote_round` itself; nothing is quarantined. The cycle is made by hand: a transaction
    inserts the rollup row the round will add to, and once the round waits for it, asks for
    the round's shard lock. Postgres looks for a cycle once per wait, deadlock_timeout after
    it began, and aborts the session that finds one: the round's check comes 3 s into its
    wait (the other transaction closes the cycle well before), the other's would come after
    60 s. The round's retry then waits for the other transaction, which now holds the shard
    lock, to commit."""
    staged = stage_all(pg, catalog, [("only.s2", 2, [Copy("d-1", 1, 0, 1, 100, 5)])])
    results: list[PromotionResult] = []
    with pg_connect(settings.postgres) as other, pg_connect(settings.postgres) as conn:
        conn.execute("SET deadlock_timeout = '3s'")
        conn.commit()  # promote_round retries only in a transaction of its own
        other.execute("SET deadlock_timeout = '60s'")
        other.execute("INSERT INTO sales_hourly_rollup VALUES (%s, %s, 0, 0, 0)",
                      (START, catalog.products[0][1]))  # uncommitted: the round must wait
        thread = threading.Thread(target=lambda: results.append(promote_round(conn, shard=2)))
        thread.start()
        wait_for(lambda: pg.execute(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
            (conn.info.backend_pid,)).fetchone()[0], "the round to wait for the rollup row")
        other.execute("SELECT pg_advisory_xact_lock(hashtext('orders_pipeline.promote'), 2)")
        other.commit()
        thread.join(timeout=30)
    [result] = results
    assert result.retries == 1
    assert result.promoted_batches == ["only.s2"] and result.quarantined == []
    assert_first_copies_landed(pg, staged)
    assert_books_balance(pg, staged, [result])


@st.composite
def assignments(draw: st.DrawFn) -> tuple[list[tuple[str, int, list[Copy]]], int]:
    """Batches (id, shard, copies) in staging order, with ids repeated within a batch, within
    a shard and across shards; and the batches a round may take."""
    ids = draw(st.integers(1, 40))
    copies = draw(st.lists(st.tuples(st.integers(0, ids - 1), st.integers(0, SHARDS - 1),
                                     st.integers(0, 2), st.integers(0, 3 * 24 * 60 - 1),
                                     st.integers(0, 11), st.integers(1, 5)),
                           min_size=1, max_size=120))
    grouped: dict[tuple[int, int], list[Copy]] = {}
    for tag, (order, shard, batch, minutes, product, quantity) in enumerate(copies, start=1):
        grouped.setdefault((batch, shard), []).append(
            Copy(f"o{order}", tag, product, quantity, 100 + 7 * tag, minutes))
    keys = draw(st.permutations(sorted(grouped)))
    return ([(f"b{batch}.s{shard}", shard, grouped[(batch, shard)]) for batch, shard in keys],
            draw(st.integers(1, 4)))


TABLES = ("orders", "order_ids", "orders_staging", "orders_rejected", "ingest_batches",
          "promotions", "promoted_outbox", *ROLLUPS)


@hypothesis_settings(max_examples=40, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(example=assignments())
def test_any_assignment_of_ids_to_shards_promotes_each_id_once(
        pg: psycopg.Connection, catalog: Catalog,
        connections: dict[Promoter, psycopg.Connection],
        example: tuple[list[tuple[str, int, list[Copy]]], int]) -> None:
    batches, max_batches = example
    pg.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(map(sql.Identifier, TABLES))))
    staged = stage_all(pg, catalog, batches)

    results = in_parallel(connections, max_batches)

    assert ledger(pg) == {b: ("promoted", shard) for b, shard, _ in batches}
    assert [r.retries for r in results.values()] == [0] * len(results)
    assert_first_copies_landed(pg, staged)
    assert_books_balance(pg, staged, list(results.values()))


def test_promotion_scaling_benchmark_runs_small(
        settings: Settings, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m benchmarks promotion-scaling` at a CI size: every run verified, its
    JSON written, its scratch database gone."""
    for name, value in pipeline_env(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    before = {r[0] for r in pg.execute(BENCH_DATABASES)}

    code = benchmark_main(["promotion-scaling", "--total", "6000", "--batch-size", "500",
                           "--promoters", "1,2"])

    out = capsys.readouterr().out
    output = tmp_path / "benchmarks" / "results" / "promotion-scaling.json"
    assert code == 0 and f"results written to {output.relative_to(tmp_path)}" in out
    result = json.loads(output.read_text())
    assert [run["promoters"] for run in result["runs"]] == ["all", "1", "2"]
    assert [run["processes"] for run in result["runs"]] == [1, 1, 2]
    assert all(run["verified"] and run["orders_rows"] == 6000 and run["retries"] == 0
               and run["orders_per_second"] > 0 for run in result["runs"])
    assert sorted(p["shards"] for p in result["runs"][2]["per_promoter"]) == [[0, 2], [1, 3]]
    assert result["runs"][0]["per_promoter"][0]["shards"] == [None]
    after = {r[0] for r in pg.execute(BENCH_DATABASES)}
    assert result["database"] not in after and after <= before
