"""Postgres patterns on their own (schema, COPY staging, promotion, views), then end to end."""

import json
import threading
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from typing import Any

import polars as pl
import psycopg
import pytest

from orders_pipeline import transform
from orders_pipeline.connections import pg_connect, redis_client
from orders_pipeline.generator import References, build_payloads, push_payloads
from orders_pipeline.pipeline import promote_staged
from orders_pipeline.postgres_patterns.promotion import batch_statuses, promote_round
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.postgres_patterns.staging import StageOutcome, StagingBatch, stage_batch
from orders_pipeline.postgres_patterns.views import VIEWS, rebuild_rollups, refresh_views, slices
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import PostgresSettings, Settings
from orders_pipeline.worker import StagingWorker

AWKWARD_IDS = ["a,b", 'say "hi"', "back\\slash", "line\u2028break", "emoji 🚀", "tab cr",
               "\\N", "\\.", "NULL", ""]
OrderFactory = Callable[..., bytes]


@pytest.fixture
def order(pg: psycopg.Connection) -> OrderFactory:
    """Builds a valid order payload (seed product, zip and EUR) with the given changes."""
    zip_code = pg.execute("SELECT min(zip_code) FROM zip_codes").fetchone()[0]

    def build(order_id: str, **changes: object) -> bytes:
        return json.dumps({
            "order_id": order_id, "customer_id": 7, "product_id": "P000001", "quantity": 2,
            "unit_price": 19.99, "currency": "EUR", "zip_code": zip_code,
            "order_timestamp": "2024-05-01T10:30:00+00:00", **changes,
        }).encode()

    return build


def transformed(cache: LookupCache, batch_id: str, payloads: list[bytes]) -> StagingBatch:
    """The worker's transform of a batch (without dedup), ready for `stage_batch`."""
    parsed = transform.parse_payloads(payloads)
    valid, invalid = transform.validate_values(parsed.rows)
    rows, unknown = transform.enrich(valid, cache.fetch(transform.lookup_ids(valid)))
    rejects = pl.concat([parsed.rejects,
                         transform.rejects_from(pl.concat([invalid, unknown]), payloads)])
    return StagingBatch(batch_id, len(payloads), rows, rejects, 0)


def scalar(pg: psycopg.Connection, query: str, *params: object) -> Any:
    """The single value a query returns."""
    return pg.execute(query, params or None).fetchone()[0]


# --- schema ---------------------------------------------------------------------------------


def schema_snapshot(pg: psycopg.Connection) -> tuple[list[tuple[str, str]], list[int]]:
    objects = pg.execute("SELECT relname::text, relkind::text FROM pg_class"
                         " WHERE relnamespace = 'public'::regnamespace ORDER BY 1").fetchall()
    counts = [scalar(pg, f"SELECT count(*) FROM {t}")
              for t in ("products", "currencies", "zip_codes")]
    return objects, counts


def test_init_db_is_idempotent(settings: Settings, pg: psycopg.Connection) -> None:
    before = schema_snapshot(pg)
    assert ensure_database(settings.postgres) is False  # exists already
    with pg_connect(settings.postgres) as conn:
        apply_schema(conn)
        apply_schema(conn)
    assert schema_snapshot(pg) == before


def test_seed_has_realistic_size(pg: psycopg.Connection) -> None:
    assert scalar(pg, "SELECT count(*) FROM products") >= 1000
    assert scalar(pg, "SELECT count(DISTINCT category) FROM products") >= 10
    assert scalar(pg, "SELECT count(*) FROM currencies") >= 20
    assert scalar(pg, "SELECT count(*) FROM zip_codes") >= 1000
    rates = dict(pg.execute("SELECT currency_code, rate_to_usd FROM currencies").fetchall())
    assert rates["USD"] == 1
    assert Decimal("1.0") < rates["EUR"] < Decimal("1.2")
    assert Decimal("0.005") < rates["JPY"] < Decimal("0.01")


def test_staging_is_unlogged_and_orders_are_keyed(pg: psycopg.Connection) -> None:
    persistence = dict(pg.execute(
        "SELECT relname::text, relpersistence::text FROM pg_class"
        " WHERE relname IN ('orders_staging', 'orders', 'ingest_batches')").fetchall())
    assert persistence == {"orders_staging": "u", "orders": "p", "ingest_batches": "p"}
    # `orders` is partitioned by month of order_timestamp; its key must hold the partition
    # key, and `order_ids` keeps each id once across partitions (sql/015).
    assert pg.execute("SELECT relkind::text FROM pg_class WHERE oid = 'orders'::regclass"
                      ).fetchone()[0] == "p"
    assert pg.execute("SELECT pg_get_partkeydef('orders'::regclass)").fetchone()[0] == (
        "RANGE (order_timestamp)")

    def key_of(table: str) -> list[str]:
        return pg.execute(
            "SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_constraint c,"
            " unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)"
            " JOIN pg_attribute a ON a.attnum = k.attnum"
            " WHERE a.attrelid = c.conrelid AND c.conrelid = %s::regclass AND c.contype = 'p'",
            (table,)).fetchone()[0]

    assert key_of("orders") == ["order_id", "order_timestamp"]
    assert key_of("order_ids") == ["order_id"]
    leading = pg.execute(
        "SELECT a.attname::text FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = 'orders'::regclass").fetchall()
    assert ("order_timestamp",) in leading


def insert_order(pg: psycopg.Connection, order_id: str, stamp: str, usd: str) -> None:
    """An order written by hand, as promotion would store it (its month's partition first)."""
    pg.execute("SELECT orders_ensure_months(ARRAY[(%s::timestamptz AT TIME ZONE 'UTC')::date])",
               (stamp,))
    pg.execute("INSERT INTO order_ids (order_id, order_timestamp) VALUES (%s, %s)",
               (order_id, stamp))
    pg.execute(
        "INSERT INTO orders (order_id, customer_id, product_id, quantity, unit_price, currency,"
        " zip_code, order_timestamp, total_amount, total_amount_usd, category, region,"
        " shipping_zone, batch_id) VALUES (%s, 1, 'P000001', 2, 1, 'USD', '00501', %s, 2, %s,"
        " 'Books', 'Northeast', 1, 'manual')", (order_id, stamp, usd))


def test_views_refresh_concurrently_without_blocking_readers(
        settings: Settings, pg: psycopg.Connection) -> None:
    insert_order(pg, "o1", "2024-05-01T10:59:59+00:00", "3.50")
    insert_order(pg, "o3", "2024-05-01T23:30:00-02:00", "2.00")  # next UTC day
    assert rebuild_rollups(pg)  # rows written behind promotion's back: recompute the rollups
    refresh_views(pg)  # May 2024 gets its month views, and the views read them
    for view in VIEWS:
        assert scalar(pg, "SELECT relkind FROM pg_class WHERE oid = %s::regclass", view) == "v"
    month_views = slices(pg)
    assert {(s.view, s.month) for s in month_views} >= {
        (view, date(2024, 5, 1)) for view in VIEWS}
    for month_view in month_views:  # what REFRESH ... CONCURRENTLY needs, on each of them
        unique = scalar(pg, "SELECT count(*) FROM pg_index"
                           " WHERE indrelid = %s::regclass AND indisunique", month_view.relation)
        assert unique == 1, month_view
    insert_order(pg, "o2", "2024-05-01T12:30:00+02:00", "1.25")  # 10:30 UTC, same hour
    assert rebuild_rollups(pg)

    with pg_connect(settings.postgres) as reader, pg_connect(settings.postgres) as refresher:
        reader.execute("SELECT count(*) FROM sales_hourly").fetchone()  # holds its locks
        refresher.execute("SET lock_timeout = '5s'")
        refresh_views(refresher)  # a plain REFRESH would wait for the reader and time out
        refresher.commit()
        reader.rollback()

    hourly = pg.execute("SELECT hour AT TIME ZONE 'UTC', category, order_count, units_sold,"
                        " revenue_usd FROM sales_hourly ORDER BY 1").fetchall()
    assert [(str(h), c, n, u, r) for h, c, n, u, r in hourly] == [
        ("2024-05-01 10:00:00", "Books", 2, 4, Decimal("4.75")),
        ("2024-05-02 01:00:00", "Books", 1, 2, Decimal("2.00")),
    ]
    daily = pg.execute("SELECT day::text, order_count FROM product_performance_daily"
                       " ORDER BY 1").fetchall()
    assert daily == [("2024-05-01", 2), ("2024-05-02", 1)]


# --- staging ----------------------------------------------------------------------------------


def test_stage_batch_copies_rows_exactly(
        loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    payloads = [order(order_id) for order_id in AWKWARD_IDS]
    batch = transformed(loaded_cache, "b1", payloads)
    assert batch.rows.height == len(AWKWARD_IDS) - 1  # "" is rejected as empty

    assert stage_batch(pg, batch) is StageOutcome.STAGED

    staged = pg.execute("SELECT order_id, total_amount, total_amount_usd, order_timestamp,"
                        " batch_position FROM orders_staging WHERE batch_id = 'b1'"
                        " ORDER BY batch_position").fetchall()
    assert [r[0] for r in staged] == [i for i in AWKWARD_IDS if i]
    expected_usd = scalar(pg, "SELECT round(39.98 * rate_to_usd, 2) FROM currencies"
                             " WHERE currency_code = 'EUR'")
    for _, total, usd, stamp, _ in staged:
        assert total == Decimal("39.98") and usd == expected_usd
        assert stamp.isoformat() == "2024-05-01T10:30:00+00:00"
    ledger = pg.execute("SELECT status, claimed_rows, staged_rows, rejected_rows"
                        " FROM ingest_batches WHERE batch_id = 'b1'").fetchone()
    assert ledger == ("staged", len(AWKWARD_IDS), len(AWKWARD_IDS) - 1, 1)


def test_stage_batch_twice_stages_once(
        loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    batch = transformed(loaded_cache, "b1", [order("o1"), order("o2"), b"junk"])
    assert stage_batch(pg, batch) is StageOutcome.STAGED
    assert stage_batch(pg, batch) is StageOutcome.ALREADY_STAGED
    assert scalar(pg, "SELECT count(*) FROM orders_staging") == 2
    assert scalar(pg, "SELECT count(*) FROM orders_rejected") == 1
    assert scalar(pg, "SELECT attempts FROM ingest_batches WHERE batch_id = 'b1'") == 2


def test_concurrent_stagers_of_one_batch_stage_it_once(
        settings: Settings, loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    """A slow worker and the one that reclaimed its batch serialise on the ledger row."""
    batch = transformed(loaded_cache, "b1", [order(f"o{i}") for i in range(200)])
    outcomes: list[StageOutcome] = []
    barrier = threading.Barrier(4)

    def stager() -> None:
        with pg_connect(settings.postgres) as conn:
            conn.autocommit = True
            barrier.wait()
            outcomes.append(stage_batch(conn, batch))

    threads = [threading.Thread(target=stager) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(outcomes) == sorted([StageOutcome.STAGED] + [StageOutcome.ALREADY_STAGED] * 3)
    assert scalar(pg, "SELECT count(*) FROM orders_staging") == 200


def test_rejects_keep_raw_bytes_exactly(
        loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    raw = [b"\xff\xfe not utf-8 \x80", b'{"order_id": "x"', b"[1]", order("neg", quantity=-1),
           order("nul\x00id", quantity=-1), order("o1", currency="XXX"), b"",
           b"\x00\x01\x02", order("lone \udc80 surrogate"), order("ok")]
    batch = transformed(loaded_cache, "b1", raw)

    assert stage_batch(pg, batch) is StageOutcome.STAGED

    stored = pg.execute("SELECT batch_position, raw_payload, reason, order_id"
                        " FROM orders_rejected WHERE batch_id = 'b1'"
                        " ORDER BY batch_position").fetchall()
    assert [(p, bytes(b)) for p, b, _, _ in stored] == list(enumerate(raw[:-1]))
    reasons = {p: r for p, _, r, _ in stored}
    assert "not valid UTF-8" in reasons[0]
    assert reasons[5] == "unknown currency: XXX"
    order_ids = {p: o for p, _, _, o in stored}
    assert order_ids[3] == "neg"
    assert order_ids[4] == "nul\ufffdid"  # text cannot hold NUL; raw_payload has it exactly
    assert "unpaired surrogate" in reasons[8]
    assert scalar(pg, "SELECT count(*) FROM orders_staging") == 1


def test_restaging_a_lost_batch_writes_rejects_once(
        loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    batch = transformed(loaded_cache, "b1", [order("o1"), b"junk", order("o2")])
    stage_batch(pg, batch)
    pg.execute("TRUNCATE orders_staging")  # what a crash does to an UNLOGGED table
    assert promote_round(pg).lost_batches == ["b1"]

    assert stage_batch(pg, batch) is StageOutcome.STAGED

    assert scalar(pg, "SELECT count(*) FROM orders_rejected") == 1
    assert scalar(pg, "SELECT count(*) FROM orders_staging") == 2


# --- promotion --------------------------------------------------------------------------------


def test_promote_round_promotes_once(
        loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    stage_batch(pg, transformed(loaded_cache, "b1", [order("o1"), order("o2")]))
    stage_batch(pg, transformed(loaded_cache, "b2", [order("o3")]))

    first = promote_round(pg)
    second = promote_round(pg)

    assert sorted(first.promoted_batches) == ["b1", "b2"]
    assert (first.staged_rows, first.inserted_rows, first.conflicts) == (3, 3, 0)
    assert second.promoted_batches == [] and second.inserted_rows == 0
    assert scalar(pg, "SELECT count(*) FROM orders") == 3
    assert scalar(pg, "SELECT count(*) FROM orders_staging") == 0
    assert scalar(pg, "SELECT count(*) FROM promotions") == 1
    assert batch_statuses(pg, ["b1", "b2", "nope"]) == {"b1": "promoted", "b2": "promoted"}
    assert stage_batch(pg, transformed(loaded_cache, "b1", [order("o1"), order("o2")])) \
        is StageOutcome.ALREADY_PROMOTED


def test_promote_removes_only_the_promoted_batches(
        loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    stage_batch(pg, transformed(loaded_cache, "early", [order("o1"), order("o2")]))
    stage_batch(pg, transformed(loaded_cache, "later", [order("o3"), order("o4")]))

    result = promote_round(pg, max_batches=1)

    assert result.promoted_batches == ["early"]
    left = pg.execute("SELECT batch_id, order_id FROM orders_staging ORDER BY 2").fetchall()
    assert left == [("later", "o3"), ("later", "o4")]
    assert [r[0] for r in pg.execute("SELECT order_id FROM orders ORDER BY 1")] == ["o1", "o2"]
    assert promote_round(pg).promoted_batches == ["later"]


def test_batch_whose_staging_rows_vanished_is_lost_then_restaged(
        loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    batch = transformed(loaded_cache, "b1", [order("o1"), order("o2")])
    stage_batch(pg, batch)
    pg.execute("TRUNCATE orders_staging")

    lost = promote_round(pg)

    assert lost.lost_batches == ["b1"] and lost.promoted_batches == []
    assert batch_statuses(pg, ["b1"]) == {"b1": "lost"}
    assert scalar(pg, "SELECT count(*) FROM orders") == 0

    assert stage_batch(pg, batch) is StageOutcome.STAGED
    again = promote_round(pg)
    assert again.promoted_batches == ["b1"] and again.inserted_rows == 2
    assert scalar(pg, "SELECT count(*) FROM orders") == 2


def test_order_already_in_orders_is_a_conflict(
        loaded_cache: LookupCache, pg: psycopg.Connection,
        order: OrderFactory) -> None:
    stage_batch(pg, transformed(loaded_cache, "b1", [order("dup"), order("o1")]))
    promote_round(pg)
    stage_batch(pg, transformed(loaded_cache, "b2", [order("dup", quantity=9), order("o2")]))

    result = promote_round(pg)

    assert (result.staged_rows, result.inserted_rows, result.conflicts) == (2, 1, 1)
    assert scalar(pg, "SELECT count(*) FROM orders") == 3
    assert scalar(pg, "SELECT quantity FROM orders WHERE order_id = 'dup'") == 2  # first wins


# --- end to end through PgBouncer -------------------------------------------------------------


def bouncer_clients(settings: PostgresSettings) -> list[tuple[str, str]]:
    """(database, application_name) of PgBouncer's clients, from its admin console."""
    admin = PostgresSettings(**{**settings.__dict__, "dbname": "pgbouncer"})
    with psycopg.connect(**admin.conninfo(via_pgbouncer=True), autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("SHOW CLIENTS", prepare=False)
        names = [d.name for d in cur.description]
        return [(r[names.index("database")], r[names.index("application_name")])
                for r in cur.fetchall()]


def test_worker_end_to_end_through_pgbouncer(settings: Settings, pg: psycopg.Connection) -> None:
    if not settings.postgres.use_pgbouncer:
        pytest.fail("PgBouncer is not running: start it with `bash .ci/services`")
    keys = RedisKeys(settings.redis.key_prefix)
    client = redis_client(settings.redis)
    queue = OrderQueue(client, keys)
    payloads, mix = build_payloads(References.load(pg), 3000, duplicates=0.05, invalid=0.03,
                                   seed=3)
    push_payloads(queue, Backpressure(client, keys, 1_000_000), payloads, 500)

    worker = StagingWorker(settings, name="e2e")
    stats = worker.drain(batch_size=700)

    assert (settings.postgres.dbname, "orders_pipeline") in bouncer_clients(settings.postgres)
    assert stats.batches == 5 and stats.claimed == 3000
    assert stats.staged == mix["unique_valid"]
    assert stats.duplicates == mix["duplicates"]
    assert stats.rejected == mix["invalid"]
    assert worker.drain(batch_size=700).batches == 0

    promoted = promote_staged(settings)

    assert promoted.inserted_rows == mix["unique_valid"] and promoted.conflicts == 0
    assert scalar(pg, "SELECT count(*) FROM orders") == mix["unique_valid"]
    assert scalar(pg, "SELECT count(DISTINCT order_id) FROM orders") == mix["unique_valid"]
    assert scalar(pg, "SELECT count(*) FROM orders_rejected") == mix["invalid"]
    assert scalar(pg, "SELECT count(*) FROM orders_staging") == 0
    assert queue.depth() == 0 and queue.in_flight_orders() == 0
    assert queue.staged_batch_ids() == []
    mismatched = scalar(pg, "SELECT count(*) FROM orders o JOIN currencies c"
                           " ON c.currency_code = o.currency"
                           " WHERE o.total_amount_usd <> round(o.total_amount * c.rate_to_usd, 2)"
                           "    OR o.total_amount <> o.unit_price * o.quantity")
    assert mismatched == 0
    assert promote_staged(settings).inserted_rows == 0  # re-running changes nothing
