"""Issue 8, item 1: one bad batch never stops the pipeline.

A poison batch (its promotion fails for a reason retrying cannot fix) is quarantined with its
error and raw payloads while the batches beside it are promoted; `stats`, conservation, the
asset check and the run log show it; `readmit` brings it back under its own id after a fix.
View rows hold the sum of the worst-case orders of one hour and one day. All against the real
servers; poison is made as users make it: a constraint added to `orders`, a trigger, or rows
an older release staged.
"""

import json
import logging
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg import sql

from orders_pipeline import pipeline
from orders_pipeline.assets import checks, orders
from orders_pipeline.assets.tables import PRODUCT_DAILY_SCHEMA, SALES_HOURLY_SCHEMA
from orders_pipeline.cli import main
from orders_pipeline.connections import pg_connect
from orders_pipeline.conservation import Conservation, check_conservation
from orders_pipeline.postgres_patterns.schema import apply_schema
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline.worker import StagingWorker
from orders_pipeline_tests.helpers import fresh_example, pipeline_env, resources_for
from orders_pipeline_tests.test_cli import one_error_line
from orders_pipeline_tests.test_cli import run as cli

NO_666 = "no_customer_666"
# The orders of these tests fall in May 2030: Postgres names the partition the row went to.
CHECK_666 = (f'SQLSTATE 23514: new row for relation "orders_p203005" violates check constraint'
             f' "{NO_666}"')
EXAMPLES = 20


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def zip_code(pg: psycopg.Connection) -> str:
    return str(pg.execute("SELECT min(zip_code) FROM zip_codes").fetchone()[0])


def order(zip_code: str, order_id: str, customer_id: int = 7, **changes: object) -> bytes:
    """A valid order payload (seed product, EUR) with the given changes."""
    return json.dumps({
        "order_id": order_id, "customer_id": customer_id, "product_id": "P000001",
        "quantity": 2, "unit_price": 19.99, "currency": "EUR", "zip_code": zip_code,
        "order_timestamp": "2030-05-01T10:30:00+00:00", **changes,
    }).encode()


def stage(settings: Settings, batches: list[list[bytes]]) -> list[str]:
    """Push each batch and stage it through the worker path as one claimed batch of its own;
    returns the claimed batch ids in order."""
    worker = StagingWorker(settings)
    ids = []
    for payloads in batches:
        worker.queue.push_batch(payloads)
        claimed = worker.next_batch(len(payloads))
        assert claimed is not None and claimed.payloads == payloads
        worker.process(claimed)
        ids.append(claimed.batch_id)
    return ids


def books(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection) -> Conservation:
    balance = check_conservation(rconn, RedisKeys(settings.redis.key_prefix), pg)
    assert balance.balanced, balance
    return balance


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The CLI pointed at the test's database and prefix, run from a directory without `.env`."""
    for name, value in pipeline_env(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def orders_ids(pg: psycopg.Connection) -> list[str]:
    return [r[0] for r in pg.execute("SELECT order_id FROM orders ORDER BY order_id")]


def kept(pg: psycopg.Connection, batch_id: str) -> list[bytes]:
    return [bytes(r[0]) for r in pg.execute(
        "SELECT raw_payload FROM quarantined_payloads WHERE batch_id = %s"
        " ORDER BY batch_position", (batch_id,))]


# --- the example of the issue -------------------------------------------------------------


def test_poison_batch_is_quarantined_the_rest_promoted_and_readmitted_after_a_fix(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, cli_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    poison_payloads = [order(zip_code, "p1", customer_id=666), order(zip_code, "p2"),
                       b"not json", order(zip_code, "p3", customer_id=666),
                       order(zip_code, "p4")]
    good_payloads = [order(zip_code, f"g{i}") for i in range(1, 4)]
    poison, good = stage(settings, [poison_payloads, good_payloads])
    # A constraint a user adds to `orders` after the batch was staged, which its rows violate.
    pg.execute(f"ALTER TABLE orders ADD CONSTRAINT {NO_666} CHECK (customer_id <> 666)")

    code, out, err = cli(capsys, "promote")

    assert code == 0
    assert "promoted 1 batches: inserted 3 rows" in out and "1 batches quarantined" in out
    assert err == (f"orders-pipeline: warning: batch {poison} quarantined with 4 orders (5 raw "
                   f"payloads kept): {CHECK_666}; fix the cause, then run `orders-pipeline "
                   f"readmit {poison}`\n")
    assert orders_ids(pg) == ["g1", "g2", "g3"]
    ledger = pg.execute("SELECT status, quarantine_error, quarantined_at IS NOT NULL"
                        " FROM ingest_batches WHERE batch_id = %s", (poison,)).fetchone()
    assert ledger == ("quarantined", CHECK_666, True)
    assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0
    assert kept(pg, poison) == poison_payloads
    assert rconn.smembers(keys.quarantined) == {poison.encode()}
    assert rconn.zcard(keys.staged) == 0 and rconn.zcard(keys.inflight) == 0
    assert rconn.lrange(keys.batch(poison), 0, -1) == poison_payloads
    assert not rconn.exists(keys.batch(good))

    balance = books(settings, rconn, pg)
    assert (balance.orders, balance.quarantined, balance.rejected) == (3, 4, 1)
    code, out, _ = cli(capsys, "stats", "--json")
    stats = json.loads(out)
    assert code == 0
    assert (stats["quarantined_batches"], stats["quarantined_orders"]) == (1, 4)
    assert stats["conservation"]["quarantined"] == 4 and stats["conservation"]["balanced"]
    code, out, _ = cli(capsys, "stats")
    assert code == 0 and "quarantined orders" in out and "readmit --all --dry-run" in out

    check = checks.no_quarantined_batches(postgres=resources_for(settings)["postgres"])
    assert not check.passed
    assert check.metadata["quarantined_batches"].value == 1
    assert check.metadata["quarantined_orders"].value == 4
    [listed] = check.metadata["batches"].value
    assert {k: listed[k] for k in ("batch_id", "orders", "payloads", "error")} == {
        "batch_id": poison, "orders": 4, "payloads": 5, "error": CHECK_666}
    assert check.metadata["readmit_command"].value == f"orders-pipeline readmit {poison}"

    # Promoting again changes nothing; re-admitting before the fix quarantines it again.
    code, out, err = cli(capsys, "promote")
    assert code == 0 and "promoted 0 batches" in out and err == ""
    code, out, _ = cli(capsys, "readmit", "--all", "--dry-run")
    assert code == 0 and f"would re-admit batch {poison}: 4 orders, 5 raw payloads" in out
    assert rconn.smembers(keys.quarantined) == {poison.encode()}  # a dry run moved nothing
    assert cli(capsys, "readmit", poison)[0] == 0
    assert pipeline.stage_queue(settings, workers=1, batch_size=100).staged == 4
    again = pipeline.promote_staged(settings)
    assert again.quarantined_batches == [poison] and again.quarantined[0].error == CHECK_666
    assert kept(pg, poison) == poison_payloads
    assert books(settings, rconn, pg).quarantined == 4

    # The fix, then re-admission under the same id: every order in exactly once.
    pg.execute(f"ALTER TABLE orders DROP CONSTRAINT {NO_666}")
    code, out, _ = cli(capsys, "readmit", poison)
    assert code == 0 and f"re-admitted batch {poison}: 4 orders" in out
    assert rconn.scard(keys.quarantined) == 0
    assert pg.execute("SELECT count(*) FROM quarantined_payloads").fetchone()[0] == 0
    assert books(settings, rconn, pg).in_flight == 5
    assert cli(capsys, "process", "--workers", "1")[0] == 0
    code, out, err = cli(capsys, "promote")
    assert code == 0 and "inserted 4 rows" in out and err == ""

    assert orders_ids(pg) == ["g1", "g2", "g3", "p1", "p2", "p3", "p4"]
    assert pg.execute("SELECT batch_id, count(*) FROM orders GROUP BY 1 ORDER BY 2"
                      ).fetchall() == [(good, 3), (poison, 4)]
    assert pg.execute("SELECT count(*) FROM orders_rejected").fetchone()[0] == 1
    assert pg.execute("SELECT status FROM ingest_batches WHERE batch_id = %s",
                      (poison,)).fetchone()[0] == "promoted"
    done = books(settings, rconn, pg)
    assert (done.orders, done.quarantined, done.rejected, done.in_flight) == (7, 0, 1, 0)
    assert not list(rconn.scan_iter(match=f"{keys.prefix}:batch:*"))
    assert checks.no_quarantined_batches(postgres=resources_for(settings)["postgres"]).passed
    code, out, _ = cli(capsys, "readmit", "--all")
    assert code == 0 and "no quarantined batches" in out


def test_batch_an_older_release_staged_is_quarantined_and_readmitted_as_rejects(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str) -> None:
    """Rows with quantity 0 in staging (an older release's validation let them through): the
    `orders` CHECK refuses them at promotion; re-admitted, today's validation rejects them."""
    old = "older-release-batch"
    payloads = [order(zip_code, "q0-a", quantity=0), order(zip_code, "ok-1"),
                order(zip_code, "q0-b", quantity=0)]
    queue = OrderQueue(rconn, keys)
    pipe = rconn.pipeline(transaction=True)  # what the older release left in Redis
    pipe.hincrby(keys.counters, "accepted", len(payloads))
    pipe.rpush(keys.batch(old), *payloads)
    pipe.zadd(keys.staged, {old: 1})
    pipe.execute()
    with pg.transaction():  # ... and in Postgres: staged rows and their ledger row
        for position, (order_id, quantity) in enumerate([("q0-a", 0), ("ok-1", 2),
                                                         ("q0-b", 0)]):
            pg.execute(
                "INSERT INTO orders_staging (batch_id, batch_position, order_id, customer_id,"
                " product_id, quantity, unit_price, currency, zip_code, order_timestamp,"
                " total_amount, total_amount_usd, category, region, shipping_zone)"
                " SELECT %s, %s, %s, 7, 'P000001', %s, 19.99, 'EUR', z.zip_code,"
                " '2030-05-01T10:30:00Z', 19.99 * %s, round(19.99 * %s * 1.08, 2),"
                " p.category, z.region, z.shipping_zone"
                " FROM products p, zip_codes z WHERE p.product_id = 'P000001'"
                " AND z.zip_code = %s",
                (old, position, order_id, quantity, quantity, quantity, zip_code))
        pg.execute("INSERT INTO ingest_batches (batch_id, status, claimed_rows, staged_rows,"
                   " rejected_rows, duplicate_rows) VALUES (%s, 'staged', 3, 3, 0, 0)", (old,))
    [good] = stage(settings, [[order(zip_code, f"g{i}") for i in range(1, 4)]])

    result = pipeline.promote_staged(settings)

    assert result.promoted_batches == [good] and result.inserted_rows == 3
    [poison] = result.quarantined
    assert (poison.batch_id, poison.orders, poison.payloads) == (old, 3, 3)
    assert poison.error == ('SQLSTATE 23514: new row for relation "orders_p203005" violates'
                            ' check constraint "orders_quantity_check"')
    assert kept(pg, old) == payloads
    assert books(settings, rconn, pg).quarantined == 3

    # The fix is today's validation: re-admitted, the batch is staged again under its id.
    rconn.delete(keys.batch(old))  # Redis lost the list meanwhile: restored from Postgres
    readmission = pipeline.readmit_quarantined(settings, [old])
    assert [b.batch_id for b in readmission.readmitted] == [old]
    assert readmission.unrecoverable == []
    assert queue.batch_payloads(old) == payloads
    pipeline.stage_queue(settings, workers=1, batch_size=100)
    assert pipeline.promote_staged(settings).promoted_batches == [old]

    assert orders_ids(pg) == ["g1", "g2", "g3", "ok-1"]
    rejected = pg.execute("SELECT batch_id, batch_position, raw_payload, reason"
                          " FROM orders_rejected ORDER BY 2").fetchall()
    assert [(b, p, bytes(r)) for b, p, r, _ in rejected] == [(old, 0, payloads[0]),
                                                             (old, 2, payloads[2])]
    assert all(reason.startswith("quantity") for *_, reason in rejected)
    done = books(settings, rconn, pg)
    assert (done.accepted, done.orders, done.rejected, done.quarantined) == (6, 4, 2, 0)


def test_no_copy_of_the_payloads_left_is_reported_not_readmitted(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, cli_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`clear --queue` took the batch list before promotion: quarantined all the same, with
    the reason; `readmit` says it cannot bring it back, in one line."""
    [poison] = stage(settings, [[order(zip_code, "p1", customer_id=666)]])
    rconn.delete(keys.batch(poison))
    pg.execute(f"ALTER TABLE orders ADD CONSTRAINT {NO_666} CHECK (customer_id <> 666)")

    [batch] = pipeline.promote_staged(settings).quarantined

    assert batch.payloads == 0
    assert batch.error == (f"{CHECK_666}; its raw payloads were not available to keep "
                           "(batch list gone from Redis)")
    code, _, err = cli(capsys, "readmit", poison)
    assert code == 1
    assert one_error_line(err) == (
        f"orders-pipeline: error: 1 batches cannot be re-admitted, no copy of their raw "
        f"payloads is left (Redis lost them before quarantine): {poison}; push those orders "
        "again from their source")
    assert pg.execute("SELECT status FROM ingest_batches WHERE batch_id = %s",
                      (poison,)).fetchone()[0] == "quarantined"


# --- errors retrying could fix, and CLI failures ----------------------------------------------


def test_errors_that_are_not_poison_propagate_and_quarantine_nothing(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, cli_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    [batch] = stage(settings, [[order(zip_code, "o1"), order(zip_code, "o2")]])
    # A maintenance freeze: a trigger that refuses every insert (SQLSTATE P0001, not poison).
    pg.execute("CREATE FUNCTION maintenance_freeze() RETURNS trigger LANGUAGE plpgsql AS"
               " $$BEGIN RAISE EXCEPTION 'orders are frozen for maintenance'; END$$")
    pg.execute("CREATE TRIGGER maintenance_freeze BEFORE INSERT ON orders FOR EACH ROW"
               " EXECUTE FUNCTION maintenance_freeze()")

    with pytest.raises(psycopg.errors.RaiseException):
        pipeline.promote_staged(settings)
    code, _, err = cli(capsys, "promote")

    assert code == 1
    assert one_error_line(err) == (
        "orders-pipeline: error: promotion failed (SQLSTATE P0001: orders are frozen for "
        "maintenance); the failed step committed nothing; fix the cause, then run "
        "`orders-pipeline promote`")
    assert pg.execute("SELECT status FROM ingest_batches").fetchall() == [("staged",)]
    assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 2
    assert rconn.zrange(keys.staged, 0, -1) == [batch.encode()]

    pg.execute("DROP TRIGGER maintenance_freeze ON orders")
    assert pipeline.promote_staged(settings).promoted_batches == [batch]


def test_schema_older_than_quarantine_fails_in_one_line_until_init_db(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, cli_env: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    poison, good = stage(settings, [[order(zip_code, "p1", customer_id=666)],
                                    [order(zip_code, "g1")]])
    pg.execute(f"ALTER TABLE orders ADD CONSTRAINT {NO_666} CHECK (customer_id <> 666)")
    pg.execute("DROP TABLE quarantined_payloads")

    code, _, err = cli(capsys, "promote")

    assert code == 1
    assert one_error_line(err) == (
        f"orders-pipeline: error: database {settings.postgres.dbname!r} is not initialised: "
        "tables missing: quarantined_payloads (run `orders-pipeline init-db`)")
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 0
    assert cli(capsys, "init-db")[0] == 0
    code, out, _ = cli(capsys, "promote")
    assert code == 0 and "inserted 1 rows" in out and "1 batches quarantined" in out


def test_readmit_usage_and_unknown_batches_fail_in_one_line(
        settings: Settings, pg: psycopg.Connection, loaded_cache: LookupCache, zip_code: str,
        cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    [batch] = stage(settings, [[order(zip_code, "o1")]])
    pipeline.promote_staged(settings)
    for usage in (["readmit"], ["readmit", "--all", batch]):
        assert main(usage) == 2
        assert one_line(capsys.readouterr().err) == (
            "orders-pipeline readmit: error: name the batches to re-admit, or pass --all (not "
            "both) (see `orders-pipeline readmit --help`)")

    code, _, err = cli(capsys, "readmit", batch, "nope")

    assert code == 1
    assert one_error_line(err) == (
        f"orders-pipeline: error: not quarantined: {batch} (promoted), nope (no such batch); "
        "`orders-pipeline readmit --all --dry-run` lists the quarantined batches")


# --- Dagster: the run log and the asset check -------------------------------------------------


def test_promoted_orders_run_logs_one_warning_per_quarantined_batch(
        settings: Settings, pg: psycopg.Connection, loaded_cache: LookupCache,
        zip_code: str) -> None:
    poison, good = stage(settings, [[order(zip_code, "p1", customer_id=666),
                                     order(zip_code, "p2")], [order(zip_code, "g1")]])
    pg.execute(f"ALTER TABLE orders ADD CONSTRAINT {NO_666} CHECK (customer_id <> 666)")
    instance = dg.DagsterInstance.ephemeral()

    result = dg.materialize([orders.promoted_orders, checks.no_quarantined_batches],
                            resources=resources_for(settings), instance=instance)

    assert result.success  # the check is not blocking, and the other batch was promoted
    metadata = result.asset_materializations_for_node("promoted_orders")[0].metadata
    assert metadata["batches_promoted"].value == 1
    assert (metadata["batches_quarantined"].value, metadata["rows_quarantined"].value) == (1, 2)
    warnings = [e.user_message for e in instance.all_logs(result.run_id)
                if e.level == logging.WARNING and "quarantined" in e.user_message]
    assert warnings == [f"batch {poison} quarantined with 2 orders (2 raw payloads kept): "
                        f"{CHECK_666}; fix the cause, then run `orders-pipeline readmit "
                        f"{poison}`"]
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "no_quarantined_batches" and not check.passed
    assert [b["batch_id"] for b in check.metadata["batches"].value] == [poison]


# --- worst-case sums --------------------------------------------------------------------------

MAX_PRICE = "9999999999.9999"  # the largest unit_price the contract accepts (below 10^10)
MAX_QUANTITY = 1_000_000
MAX_RATE = Decimal("9999.99999999")  # the largest rate_to_usd below 10^4 (numeric(12, 8))


def test_worst_case_hour_and_day_sum_exactly(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        zip_code: str) -> None:
    """The dearest orders possible, many in one hour and one day: the views hold the exact sum
    (far above what numeric(22, 2), the width of one order's USD total, could hold)."""
    pg.execute("INSERT INTO currencies (currency_code, name, rate_to_usd)"
               " VALUES ('XTS', 'Testing code', %s)", (MAX_RATE,))
    LookupCache(rconn, keys, 3600).load_snapshot(pg)
    hours = {"2030-05-01T10": 1200, "2030-05-01T11": 300}
    payloads = [
        (f'{{"order_id":"max-{hour}-{i}","customer_id":1,"product_id":"P000001",'
         f'"quantity":{MAX_QUANTITY},"unit_price":{MAX_PRICE},"currency":"XTS",'
         f'"zip_code":"{zip_code}","order_timestamp":"{hour}:{i % 60:02d}:00Z"}}').encode()
        for hour, count in hours.items() for i in range(count)]
    queue = OrderQueue(rconn, keys)
    for start in range(0, len(payloads), 250):
        queue.push_batch(payloads[start:start + 250])
    pipeline.stage_queue(settings, workers=1, batch_size=250)

    result = pipeline.promote_staged(settings, max_batches_per_round=2)  # several rounds
    pipeline.refresh_all_views(settings)

    assert result.quarantined == [] and result.inserted_rows == 1500
    with localcontext(prec=60):  # exact: the default 28 digits would round the product
        usd = (Decimal(MAX_PRICE) * MAX_QUANTITY * MAX_RATE).quantize(Decimal("0.01"),
                                                                      rounding=ROUND_HALF_UP)
    assert usd < Decimal(10) ** 20  # one order still fits total_amount_usd numeric(22, 2)
    assert pg.execute("SELECT DISTINCT total_amount_usd FROM orders").fetchall() == [(usd,)]
    hourly = pg.execute("SELECT to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24'),"
                        " order_count, units_sold, revenue_usd FROM sales_hourly ORDER BY 1"
                        ).fetchall()
    assert hourly == [(hour, count, count * MAX_QUANTITY, count * usd)
                      for hour, count in hours.items()]
    assert hourly[0][3] > 1000 * Decimal(10) ** 20
    daily = pg.execute("SELECT day::text, order_count, units_sold, revenue_usd"
                       " FROM product_performance_daily").fetchall()
    assert daily == [("2030-05-01", 1500, 1500 * MAX_QUANTITY, 1500 * usd)]
    rollups = pg.execute("SELECT (SELECT sum(revenue_usd) FROM sales_hourly_rollup),"
                         " (SELECT sum(revenue_usd) FROM product_daily_rollup)").fetchone()
    assert rollups == (1500 * usd, 1500 * usd)


def test_older_databases_are_migrated_and_sum_widths_match_the_catalog(
        settings: Settings, pg: psycopg.Connection) -> None:
    """init-db widens the sums of a database created with the old widths, keeping its rows and
    recreating the views, and gives its ledger the quarantine; applied again, it changes
    nothing."""
    def types(relation: str) -> dict[str, str]:
        return dict(pg.execute(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (relation,)).fetchall())

    sums = ("order_count", "units_sold", "revenue_usd")
    for view, schema in (("sales_hourly", SALES_HOURLY_SCHEMA),
                         ("product_performance_daily", PRODUCT_DAILY_SCHEMA)):
        catalog = {c.name: c.type for c in schema.columns}
        assert {k: types(view)[k] for k in sums} == {k: catalog[k] for k in sums}
    with pg.transaction():  # the schema as an older release created it, with one row
        # Today's views: plain views over month views (none yet) or the whole-history view.
        pg.execute("DROP VIEW sales_hourly, product_performance_daily")
        pg.execute("DROP MATERIALIZED VIEW sales_hourly_legacy, product_performance_daily_legacy")
        for rollup in ("sales_hourly_rollup", "product_daily_rollup"):
            pg.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN units_sold TYPE bigint,"
                               " ALTER COLUMN revenue_usd TYPE numeric(22, 2)")
                       .format(sql.Identifier(rollup)))
        pg.execute("CREATE MATERIALIZED VIEW sales_hourly AS SELECT hour, category,"
                   " order_count, units_sold, revenue_usd FROM sales_hourly_rollup")
        pg.execute("CREATE MATERIALIZED VIEW product_performance_daily AS SELECT day,"
                   " product_id, order_count, units_sold, revenue_usd FROM product_daily_rollup")
        pg.execute("INSERT INTO sales_hourly_rollup VALUES"
                   " ('2030-05-01T10:00Z', 'Books', 2, 4, 12345678901234567890.12)")
        pg.execute("ALTER TABLE ingest_batches DROP COLUMN quarantine_error,"
                   " DROP COLUMN quarantined_at, DROP CONSTRAINT ingest_batches_status_check,"
                   " ADD CHECK (status IN ('staged', 'promoted', 'lost'))")
        pg.execute("DROP TABLE quarantined_payloads")
        pg.execute("INSERT INTO ingest_batches (batch_id, status, claimed_rows, staged_rows,"
                   " rejected_rows, duplicate_rows) VALUES ('old', 'staged', 1, 1, 0, 0)")
    assert types("sales_hourly")["revenue_usd"] == "numeric(22,2)"

    with pg_connect(settings.postgres) as conn:
        apply_schema(conn)
    widened = {"units_sold": "numeric(38,0)", "revenue_usd": "numeric(38,2)"}
    for relation in ("sales_hourly_rollup", "product_daily_rollup", "sales_hourly",
                     "product_performance_daily"):
        assert {k: types(relation)[k] for k in widened} == widened, relation
    assert pg.execute("SELECT units_sold, revenue_usd FROM sales_hourly").fetchall() == [
        (4, Decimal("12345678901234567890.12"))]
    pg.execute("UPDATE ingest_batches SET status = 'quarantined', quarantined_at = now(),"
               " quarantine_error = 'SQLSTATE 23514: x' WHERE batch_id = 'old'")
    pg.execute("INSERT INTO quarantined_payloads VALUES ('old', 0, '\\x7b7d')")
    view_oid = pg.execute("SELECT 'sales_hourly'::regclass::oid").fetchone()[0]
    with pg_connect(settings.postgres) as conn:
        apply_schema(conn)
    assert pg.execute("SELECT 'sales_hourly'::regclass::oid").fetchone()[0] == view_oid


# --- property: random rounds of good and poison batches ---------------------------------------

# How a user makes a batch poison, and the SQLSTATE its quarantine must record.
POISON_KINDS = {
    # customer 666: a CHECK constraint (integrity: check violation)
    666: "23514",
    # customer 777: a CHECK whose expression divides by zero (data exception)
    777: "22012",
    # customer 555 twice in a batch, at one time: a unique index on both (integrity: unique
    # violation; a unique index of partitioned `orders` must hold the partition key)
    555: "23505",
}
_POISON_DDL = [
    f"ALTER TABLE orders ADD CONSTRAINT {NO_666} CHECK (customer_id <> 666)",
    "ALTER TABLE orders ADD CONSTRAINT no_777"
    " CHECK (customer_id / (customer_id - 777) IS NOT NULL)",
    "CREATE UNIQUE INDEX one_order_of_555 ON orders (customer_id, order_timestamp)"
    " WHERE customer_id = 555",
]
_CURE_DDL = [f"ALTER TABLE orders DROP CONSTRAINT IF EXISTS {NO_666}",
             "ALTER TABLE orders DROP CONSTRAINT IF EXISTS no_777",
             "DROP INDEX IF EXISTS one_order_of_555"]


@st.composite
def rounds(draw: st.DrawFn) -> list[tuple[int | None, int]]:
    """Batches as (poison customer or None, number of good orders beside it)."""
    return draw(st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(sorted(POISON_KINDS))),
                                   st.integers(0, 3)), min_size=1, max_size=7))


@hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])
@given(batches=rounds(), per_round=st.integers(1, 4))
def test_every_good_batch_promoted_exactly_the_poison_ones_quarantined(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, batches: list[tuple[int | None, int]],
        per_round: int) -> None:
    for statement in _CURE_DDL:  # an earlier example that failed may have left them
        pg.execute(statement)
    example = fresh_example(settings, rconn, pg)
    pg.execute("TRUNCATE quarantined_payloads")
    keys = RedisKeys(example.redis.key_prefix)
    contents = []
    for n, (poison, good) in enumerate(batches):
        payloads = [order(zip_code, f"b{n}-g{i}") for i in range(good)]
        if poison is not None:  # one poison order (two for the unique index) among the good
            payloads[good // 2:good // 2] = [
                order(zip_code, f"b{n}-p{i}", customer_id=poison)
                for i in range(2 if poison == 555 else 1)]
        contents.append(payloads or [order(zip_code, f"b{n}-only")])
    ids = stage(example, contents)
    for statement in _POISON_DDL:
        pg.execute(statement)

    result = pipeline.promote_staged(example, max_batches_per_round=per_round)

    expected = {b: poison for b, (poison, _) in zip(ids, batches, strict=True)
                if poison is not None}
    assert sorted(result.promoted_batches) == sorted(b for b in ids if b not in expected)
    assert {q.batch_id: q.error[:len("SQLSTATE 23514")] for q in result.quarantined} == {
        b: f"SQLSTATE {POISON_KINDS[poison]}" for b, poison in expected.items()}
    for batch_id, payloads in zip(ids, contents, strict=True):
        if batch_id in expected:
            assert kept(pg, batch_id) == payloads
    promoted = {p for b, payloads in zip(ids, contents, strict=True) if b not in expected
                for p in payloads}
    assert set(orders_ids(pg)) == {json.loads(p)["order_id"] for p in promoted}
    assert rconn.smembers(keys.quarantined) == {b.encode() for b in expected}
    assert books(example, rconn, pg).quarantined == sum(
        len(p) for b, p in zip(ids, contents, strict=True) if b in expected)

    for statement in _CURE_DDL:
        pg.execute(statement)
    assert len(pipeline.readmit_quarantined(example).readmitted) == len(expected)
    pipeline.stage_queue(example, workers=1, batch_size=10)
    assert pipeline.promote_staged(example).quarantined == []
    assert orders_ids(pg) == sorted(json.loads(p)["order_id"] for c in contents for p in c)
    done = books(example, rconn, pg)
    assert done.quarantined == done.in_flight == done.awaiting_promotion == 0
    assert rconn.scard(keys.quarantined) == 0
    assert pg.execute("SELECT count(*) FROM quarantined_payloads").fetchone()[0] == 0

