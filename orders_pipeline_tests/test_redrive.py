"""Issue 11, item 1: dead letters you can re-drive.

Rejected orders are sent through the pipeline again, byte for byte, each row at most once,
with what became of it recorded; an order still bad is rejected again with its new reason.
The lookup snapshot follows its source tables: a change is noticed and reloaded, and the
orders rejected for an unknown reference meanwhile are re-driven in one step. All against
the real servers; the crash tests SIGKILL a real process at the re-drive's fault points.
"""

import json
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import pipeline
from orders_pipeline.assets import lookup
from orders_pipeline.assets.redrive import redrive_rejected_job
from orders_pipeline.connections import pg_connect
from orders_pipeline.faults import CRASH_ENV, REDRIVE_CRASH_POINTS
from orders_pipeline.postgres_patterns.redrive import (
    UNKNOWN_REFERENCE_KINDS,
    RedriveRefused,
    RejectFilter,
)
from orders_pipeline.postgres_patterns.schema import apply_schema
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import REDRIVEN_COUNTER, OrderQueue
from orders_pipeline.sensors import LOOKUP_SOURCES_EVERY_SECONDS, lookup_sources_sensor
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import REPO, fresh_example, pipeline_env, resources_for
from orders_pipeline_tests.test_cli import one_error_line, one_usage_line
from orders_pipeline_tests.test_cli import run as cli
from orders_pipeline_tests.test_quarantine import (  # noqa: F401
    books,
    cli_env,
    order,
    stage,
    zip_code,
)

NEW_PRODUCT = "P900001"
EXAMPLES = 25


# --- helpers ----------------------------------------------------------------------------------


def add_product(pg: psycopg.Connection, product_id: str = NEW_PRODUCT) -> None:
    """What an upstream system does: a new product in `products`."""
    pg.execute("INSERT INTO products (product_id, name, category, base_price)"
               " VALUES (%s, 'Late Arrival', 'Electronics', 9.99)", (product_id,))


def ingest(settings: Settings, *batches: list[bytes]) -> list[str]:
    """Push each batch and stage it as a claimed batch of its own (`stage`), then promote;
    returns the claimed batch ids in order."""
    batch_ids = stage(settings, list(batches))
    pipeline.promote_staged(settings)
    return batch_ids


def drain(settings: Settings) -> None:
    """Stage and promote until nothing is queued, in flight or staged."""
    pipeline.stage_queue(settings, workers=1, batch_size=settings.pipeline.batch_size)
    pipeline.promote_staged(settings)


def rejected(pg: psycopg.Connection) -> list[tuple[str, int, bytes, str, str | None]]:
    """Rows of orders_rejected: (batch_id, position, raw payload, reason, order_id)."""
    return [(b, p, bytes(raw), reason, order_id) for b, p, raw, reason, order_id in pg.execute(
        "SELECT batch_id, batch_position, raw_payload, reason, order_id FROM orders_rejected"
        " ORDER BY rejected_at, batch_id, batch_position")]


def outcomes(pg: psycopg.Connection, redrive_id: str) -> dict[tuple[str, int], tuple[str, str]]:
    """(batch_id, position) of each re-driven row -> (outcome, new reason or '')."""
    return {(b, p): (outcome, new_reason or "") for b, p, outcome, new_reason in pg.execute(
        "SELECT batch_id, batch_position, outcome, new_reason FROM redrive_outcomes"
        " WHERE redrive_id = %s", (redrive_id,))}


def redriven_counter(rconn: redis.Redis, keys: RedisKeys) -> int:
    return int(rconn.hget(keys.counters, REDRIVEN_COUNTER) or 0)


def changed_state(pg: psycopg.Connection, rconn: redis.Redis, keys: RedisKeys) -> object:
    """Everything a re-drive could change, to show that a dry run changes none of it."""
    return ([pg.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
             for table in ("redrives", "redrive_batches", "redriven_rows", "orders",
                           "orders_rejected")],
            rconn.hgetall(keys.counters), rconn.zcard(keys.inflight),
            rconn.hgetall(keys.redriven), rconn.xlen(keys.signals_stream))


def tick(settings: Settings, cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    with dg.build_sensor_context(cursor=cursor, resources=resources_for(settings),
                                 instance=dg.DagsterInstance.ephemeral()) as context:
        return lookup_sources_sensor(context)


def reload_lookup(settings: Settings) -> None:
    """What the run the sensor requests does: materialize `lookup_cache`."""
    result = dg.materialize([lookup.lookup_cache], resources=resources_for(settings),
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success


# --- the example of the issue -------------------------------------------------------------


def test_product_added_after_the_snapshot_is_noticed_reloaded_and_its_orders_redriven_once(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str) -> None:  # noqa: F811
    assert isinstance(tick(settings, None), dg.SensorResult)  # first look: versions observed
    add_product(pg)  # after the snapshot was taken
    late = [order(zip_code, f"late-{i}", product_id=NEW_PRODUCT) for i in range(3)]
    still_bad = order(zip_code, "late-bad", product_id=NEW_PRODUCT, currency="XXX")
    [producer_batch] = ingest(settings, [*late, still_bad, order(zip_code, "on-time")])
    assert [(r[3], r[4]) for r in rejected(pg)] == [
        (f"unknown product_id: {NEW_PRODUCT}", i) for i in ("late-0", "late-1", "late-2",
                                                          "late-bad")]
    assert books(settings, rconn, pg).rejected == 4

    # The change is noticed: the sensor asks for one reload, keyed by the source versions.
    noticed = tick(settings, None)
    assert isinstance(noticed, dg.SensorResult)
    [request] = noticed.run_requests
    versions = json.loads(noticed.cursor)
    assert request.run_key == ("lookup-sources:" + ",".join(
        f"{t}={v}" for t, v in versions.items()))
    assert request.tags["orders_pipeline/lookup_tables_changed"] == "products"
    assert {e.asset_key.to_user_string(): e.metadata["version"].value
            for e in noticed.asset_events} == versions
    assert tick(settings, noticed.cursor).run_requests == [request]  # until it is reloaded
    reload_lookup(settings)
    quiet = tick(settings, noticed.cursor)
    assert not quiet.run_requests and not quiet.asset_events
    assert quiet.skip_reason and "follows its source tables" in str(quiet.skip_reason)

    # One step: the orders rejected for an unknown reference since the change.
    preset = RejectFilter(unknown_references=True)
    before = changed_state(pg, rconn, keys)
    dry = pipeline.redrive_rejected(settings, preset, dry_run=True)
    assert (dry.selected, dry.by_reason, dry.redrive_id) == (4, {"unknown product_id": 4}, None)
    assert changed_state(pg, rconn, keys) == before  # a dry run changes nothing
    done = pipeline.redrive_rejected(settings, preset)
    assert (done.selected, done.by_reason) == (4, {"unknown product_id": 4})
    assert done.selection.reason_kinds == UNKNOWN_REFERENCE_KINDS
    [batch] = done.batch_ids
    assert rconn.lrange(keys.batch(batch), 0, -1) == [*late, still_bad]  # byte for byte
    assert redriven_counter(rconn, keys) == 4
    assert books(settings, rconn, pg).in_flight == 4
    assert set(outcomes(pg, done.redrive_id).values()) == {("queued", "")}

    drain(settings)

    assert pg.execute("SELECT order_id, batch_id FROM orders ORDER BY order_id").fetchall() == [
        ("late-0", batch), ("late-1", batch), ("late-2", batch), ("on-time", producer_batch)]
    assert outcomes(pg, done.redrive_id) == {
        (producer_batch, 0): ("promoted", ""), (producer_batch, 1): ("promoted", ""),
        (producer_batch, 2): ("promoted", ""),
        (producer_batch, 3): ("rejected", "unknown currency: XXX")}
    report = pipeline.redrive_report(settings, done.redrive_id)
    assert report is not None and report.selected == 4
    assert report.outcomes == {"promoted": 3, "rejected": 1}
    assert report.new_reasons == {"unknown currency": 1}
    assert report.filters["unknown_references"] and report.filters["reason_kinds"]
    balance = books(settings, rconn, pg)
    assert (balance.accepted, balance.redriven, balance.orders, balance.rejected) == (5, 4, 4, 5)

    # Asking again re-drives nothing: the rows are done, the new reject came after the reload.
    again = pipeline.redrive_rejected(settings, preset)
    assert (again.selected, again.redrive_id, again.batch_ids) == (0, None, [])
    assert redriven_counter(rconn, keys) == 4
    assert pipeline.redrive_report(settings, "redrive-unknown") is None


def test_still_bad_orders_are_rejected_again_byte_for_byte_with_their_new_reason(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str) -> None:  # noqa: F811
    payloads = [b"\xff\xfe not UTF-8", b'{"order_id": "dup", "order_id": "dup"}',
                order(zip_code, "q0", quantity=0), order(zip_code, "ok")]
    [first] = ingest(settings, payloads)

    done = pipeline.redrive_rejected(settings, RejectFilter(batch_ids=(first,)))
    drain(settings)

    assert done.selected == 3
    assert done.by_reason == {"invalid JSON": 1, "payload is not valid UTF-8 (byte 0)": 1,
                              "quantity must be an integer from 1 to 1000000": 1}
    [batch] = done.batch_ids
    again = {(b, p): (raw, reason) for b, p, raw, reason, _ in rejected(pg) if b == batch}
    originals = {p: (raw, reason) for b, p, raw, reason, _ in rejected(pg) if b == first}
    assert sorted(again.values()) == sorted(originals.values())  # same bytes, same verdicts
    assert {o for o, _ in outcomes(pg, done.redrive_id).values()} == {"rejected"}
    assert pg.execute("SELECT count(*) FROM orders").fetchone()[0] == 1
    balance = books(settings, rconn, pg)
    assert (balance.rejected, balance.redriven) == (6, 3)
    # Re-driving the new rejects is a new request for new rows: allowed, once.
    assert pipeline.redrive_rejected(settings, RejectFilter(batch_ids=(batch,))).selected == 3
    assert pipeline.redrive_rejected(settings, RejectFilter(batch_ids=(first, batch))
                                     ).selected == 0


def test_refusals_and_filters_of_a_request(settings: Settings, pg: psycopg.Connection,
                                           loaded_cache: LookupCache) -> None:
    with pytest.raises(RedriveRefused, match="no filter given"):
        pipeline.redrive_rejected(settings, RejectFilter())
    with pytest.raises(RedriveRefused, match="has no UTC offset"):
        pipeline.redrive_rejected(settings, RejectFilter(since=datetime(2030, 1, 1)))
    with pytest.raises(RedriveRefused, match="picked up no change"):
        pipeline.redrive_rejected(settings, RejectFilter(unknown_references=True),
                                  dry_run=True)
    with pytest.raises(psycopg.errors.InvalidRegularExpression):
        pipeline.redrive_rejected(settings, RejectFilter(reason="(unclosed"))
    assert pg.execute("SELECT count(*) FROM redrives").fetchone()[0] == 0
    nothing = pipeline.redrive_rejected(settings, RejectFilter(everything=True))
    assert (nothing.selected, nothing.redrive_id) == (0, None)


# --- kill at every step of a re-drive -----------------------------------------------------

_REDRIVE_SCRIPT = """
from orders_pipeline import pipeline
from orders_pipeline.postgres_patterns.redrive import RejectFilter
from orders_pipeline.settings import Settings
pipeline.redrive_rejected(Settings.from_env(), RejectFilter(reason="^unknown product_id"))
"""


@pytest.mark.parametrize("resume", ["next_request", "next_promotion"])
@pytest.mark.parametrize("point", REDRIVE_CRASH_POINTS)
def test_redrive_killed_at_each_step_redrives_every_row_exactly_once(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, point: str,  # noqa: F811
        resume: str) -> None:
    add_product(pg)
    late = [order(zip_code, f"late-{i}", product_id=NEW_PRODUCT) for i in range(5)]
    ingest(settings, late[:2], late[2:])
    loaded_cache.load_snapshot(pg)

    killed = subprocess.run([sys.executable, "-c", _REDRIVE_SCRIPT], cwd=REPO,
                            env={**pipeline_env(settings, BATCH_SIZE="2"), CRASH_ENV: point},
                            capture_output=True, text=True, timeout=120)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [(redrive_id, selected)] = pg.execute("SELECT redrive_id, selected_rows FROM redrives")
    assert selected == 5
    pending = pg.execute("SELECT count(*) FROM redrive_batches WHERE pushed_at IS NULL"
                         ).fetchone()[0]
    assert pending == 3  # all of them: the first push was not recorded
    pushed_before = 2 if point == "after_redrive_push" else 0
    assert redriven_counter(rconn, keys) == pushed_before
    assert rconn.hlen(keys.redriven) == (1 if pushed_before else 0)
    assert books(settings, rconn, pg).in_flight == pushed_before

    if resume == "next_request":
        assert pipeline.redrive_rejected(settings, RejectFilter(reason="^unknown product_id")
                                         ).selected == 0  # the rows are taken: finished first
    drain(settings)  # promotion finishes pending re-drives too; then one more drain for them
    drain(settings)

    assert sorted(r[0] for r in pg.execute("SELECT order_id FROM orders")) == [
        f"late-{i}" for i in range(5)]
    assert {o for o, _ in outcomes(pg, redrive_id).values()} == {"promoted"}
    assert pg.execute("SELECT count(*) FROM redrive_batches WHERE pushed_at IS NULL"
                      ).fetchone()[0] == 0
    assert redriven_counter(rconn, keys) == 5 and rconn.hlen(keys.redriven) == 0
    assert books(settings, rconn, pg).redriven == 5


def test_concurrent_requests_never_take_the_same_row(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str) -> None:  # noqa: F811
    ingest(settings, [order(zip_code, f"bad-{i}", quantity=0) for i in range(40)])
    gate = threading.Barrier(4)
    results: list[pipeline.Redrive] = []

    def request() -> None:
        gate.wait()
        results.append(pipeline.redrive_rejected(settings, RejectFilter(reason="^quantity")))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.selected for r in results) == [0, 0, 0, 40]
    drain(settings)
    assert books(settings, rconn, pg).redriven == 40


# --- the lookup snapshot follows its sources ----------------------------------------------


def test_lookup_versions_count_real_changes_only(settings: Settings, pg: psycopg.Connection,
                                                 loaded_cache: LookupCache) -> None:
    def versions() -> dict[str, int]:
        return dict(pg.execute("SELECT table_name, version FROM lookup_source_versions"))

    start = versions()
    with pg_connect(settings.postgres) as conn:
        apply_schema(conn)  # the seed again: ON CONFLICT DO NOTHING inserts nothing
    pg.execute("UPDATE currencies SET rate_to_usd = 2 WHERE currency_code = 'ZZZ'")
    assert versions() == start
    pg.execute("UPDATE currencies SET rate_to_usd = rate_to_usd WHERE currency_code = 'EUR'")
    pg.execute("DELETE FROM zip_codes WHERE zip_code = (SELECT max(zip_code) FROM zip_codes)")
    assert versions() == {**start, "currencies": start["currencies"] + 1,
                          "zip_codes": start["zip_codes"] + 1}
    sources = loaded_cache.sources()
    assert sources is not None and sources.versions == start and sources.changes is None
    loaded_cache.load_snapshot(pg)
    reloaded = loaded_cache.sources()
    assert reloaded is not None and reloaded.versions == versions()
    assert reloaded.changes is not None and reloaded.changes.loaded_at == reloaded.loaded_at
    loaded_cache.load_snapshot(pg)  # a reload that picks up nothing keeps the last changes
    assert loaded_cache.sources().changes == reloaded.changes
    assert 0 < lookup_sources_sensor.minimum_interval_seconds == LOOKUP_SOURCES_EVERY_SECONDS
    assert LOOKUP_SOURCES_EVERY_SECONDS <= 30  # noticed and reloaded within a minute


# --- the Dagster job ----------------------------------------------------------------------


def test_redrive_job_with_config_reports_in_metadata(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str) -> None:  # noqa: F811
    ingest(settings, [order(zip_code, f"q{i}", quantity=0) for i in range(3)]
           + [b"not json"])

    def run(**config: object) -> dg.ExecuteInProcessResult:
        return redrive_rejected_job.execute_in_process(
            run_config={"ops": {"redrive": {"config": config}}},
            resources=resources_for(settings), instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False)

    dry = run(reason="^quantity", dry_run=True)
    assert dry.success
    [output] = [e for e in dry.events_for_node("redrive") if e.is_successful_output]
    metadata = {k: v.value for k, v in output.step_output_data.metadata.items()}
    assert (metadata["selected"], metadata["dry_run"], metadata["pushed_batches"]) == (
        3, True, 0)
    assert metadata["by_reason"] == {"quantity must be an integer from 1 to 1000000": 3}
    assert pg.execute("SELECT count(*) FROM redrives").fetchone()[0] == 0

    done = run(reason="^quantity")
    [observation] = done.asset_observations_for_node("redrive")
    assert observation.asset_key.to_user_string() == "orders_rejected"
    assert observation.metadata["selected"].value == 3
    assert observation.metadata["pushed_batches"].value == 1
    assert observation.metadata["redrive_id"].value.startswith("redrive-")

    for config, refusal in [({"reason": "("}, "InvalidRegularExpression"),
                            ({"since": "yesterday"}, "is not an ISO 8601 instant"),
                            ({}, "no filter given")]:
        failed = run(**config)
        assert not failed.success
        [failure] = [e for e in failed.all_events if e.is_step_failure]
        assert refusal in failure.step_failure_data.error.message
        assert len([e for e in failed.all_events if e.is_step_up_for_retry]) == 0
    drain(settings)
    assert books(settings, rconn, pg).redriven == 3


# --- property: selection and re-drive over generated filters ---------------------------------

PATTERNS = ["^unknown", "product_id", "JSON", "^(quantity|unknown currency)", "zzz"]


@st.composite
def filters(draw: st.DrawFn, rows: list[tuple[str, int, str, str | None]],
            base: datetime) -> RejectFilter:
    """A combination of filters over the example's rejected rows (batch, position, reason,
    order id); times as offsets of minutes from `base`."""
    order_ids = sorted({r[3] for r in rows if r[3] is not None} | {"no-such-order"})
    batch_ids = sorted({r[0] for r in rows} | {"no-such-batch"})
    minute = st.integers(min_value=-1, max_value=len(rows) + 1).map(
        lambda m: base + timedelta(minutes=m))
    fields = {"reason": st.sampled_from(PATTERNS), "since": minute, "until": minute,
              "order_ids": st.lists(st.sampled_from(order_ids), min_size=1, max_size=6,
                                    unique=True).map(tuple),
              "batch_ids": st.lists(st.sampled_from(batch_ids), min_size=1, max_size=2,
                                    unique=True).map(tuple)}
    applied = draw(st.sets(st.sampled_from(sorted(fields)), max_size=3))
    if not applied:
        return RejectFilter(everything=True)
    chosen = {name: draw(fields[name]) for name in sorted(applied)}
    if "since" in chosen and "until" in chosen and chosen["until"] < chosen["since"]:
        chosen["since"], chosen["until"] = chosen["until"], chosen["since"]
    return RejectFilter(**chosen)


def expected(rows: list[tuple[str, int, str, str | None, datetime]],
             selection: RejectFilter) -> set[tuple[str, int]]:
    """The selection computed independently, in Python."""
    return {(b, p) for b, p, reason, order_id, at in rows
            if (selection.reason is None or re.search(selection.reason, reason))
            and (selection.since is None or at >= selection.since)
            and (selection.until is None or at < selection.until)
            and (not selection.order_ids or order_id in selection.order_ids)
            and (not selection.batch_ids or b in selection.batch_ids)}


@hypothesis_settings(max_examples=EXAMPLES, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])
@given(data=st.data(), fix_product=st.booleans())
def test_any_filter_selects_exactly_its_rows_and_redrives_each_once(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, data: st.DataObject,  # noqa: F811
        fix_product: bool) -> None:
    pg.execute("TRUNCATE redrives, redrive_batches, redriven_rows")
    pg.execute("DELETE FROM products WHERE product_id = %s", (NEW_PRODUCT,))
    example = fresh_example(settings, rconn, pg)
    keys = RedisKeys(example.redis.key_prefix)
    late = {"product_id": NEW_PRODUCT}
    ingest(example,
           [order(zip_code, "a1", **late), order(zip_code, "a2", currency="XXX"),
            b"{", order(zip_code, "a1", **late), order(zip_code, "ok-a")],
           [order(zip_code, "b1", quantity=0), order(zip_code, "b2", **late),
            order(zip_code, "b3", **late, currency="XXX"), b"\x00"])
    base = datetime(2030, 5, 1, tzinfo=UTC)
    pg.execute("UPDATE orders_rejected r SET rejected_at = %s + o.n * interval '1 minute'"
               " FROM (SELECT batch_id, batch_position, row_number() OVER"
               " (ORDER BY batch_id, batch_position) AS n FROM orders_rejected) o"
               " WHERE (r.batch_id, r.batch_position) = (o.batch_id, o.batch_position)",
               (base,))
    rows = [(b, p, reason, order_id, at) for b, p, reason, order_id, at in pg.execute(
        "SELECT batch_id, batch_position, reason, order_id, rejected_at FROM orders_rejected")]
    selection = data.draw(filters([r[:4] for r in rows], base))
    wanted = expected(rows, selection)
    if fix_product:
        add_product(pg)
        LookupCache(rconn, keys, 3600).load_snapshot(pg)

    dry = pipeline.redrive_rejected(example, selection, dry_run=True)
    assert dry.by_reason == dict(Counter(
        reason.split(": ")[0] for b, p, reason, _, _ in rows if (b, p) in wanted))
    done = pipeline.redrive_rejected(example, selection)
    drain(example)

    taken = {(b, p) for b, p in pg.execute(
        "SELECT x.batch_id, x.batch_position FROM redriven_rows x JOIN redrive_batches d"
        " ON d.batch_id = x.redrive_batch_id WHERE d.redrive_id = %s", (done.redrive_id,))}
    assert taken == wanted and done.selected == len(wanted)
    became = outcomes(pg, done.redrive_id) if wanted else {}
    assert set(became) == wanted
    assert {o for o, _ in became.values()} <= {"promoted", "rejected", "duplicate"}
    promoted = sorted(r[0] for r in pg.execute(
        "SELECT order_id FROM orders WHERE batch_id = ANY(%s)", (done.batch_ids,)))
    assert len(promoted) == len(set(promoted))  # never doubled
    assert len(promoted) == sum(o == "promoted" for o, _ in became.values())
    again = pg.execute("SELECT count(*) FROM orders_rejected WHERE batch_id = ANY(%s)",
                       (done.batch_ids,)).fetchone()[0]
    assert again == sum(o == "rejected" for o, _ in became.values())  # never lost
    if not fix_product:
        assert promoted == []  # nothing selected is valid without the product
    balance = books(example, rconn, pg)
    assert balance.redriven == len(wanted) and balance.in_flight == balance.queued == 0
    second = pipeline.redrive_rejected(example, selection)  # the same request again
    assert not {(b, p) for b, p in pg.execute(
        "SELECT x.batch_id, x.batch_position FROM redriven_rows x JOIN redrive_batches d"
        " ON d.batch_id = x.redrive_batch_id WHERE d.redrive_id = %s",
        (second.redrive_id,))} & wanted


# --- the CLI: `orders-pipeline requeue-rejected` ------------------------------------------


def cli_out(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """Run one CLI command in-process; it must succeed without a word on stderr. Its stdout
    lines."""
    code, out, err = cli(capsys, *argv)
    assert (code, err) == (0, ""), err
    return out.splitlines()


def test_cli_redrives_unknown_references_after_a_reload_and_reports_what_became_of_them(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, cli_env: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    queue = OrderQueue(rconn, keys)
    queue.push_batch([order(zip_code, "early", product_id=NEW_PRODUCT)])  # before the product
    cli_out(capsys, "process", "--workers", "1")
    cli_out(capsys, "promote")
    add_product(pg)  # after the snapshot was taken: its orders are rejected until a reload
    late = [order(zip_code, f"late-{i}", product_id=NEW_PRODUCT) for i in range(3)]
    queue.push_batch([*late, order(zip_code, "late-bad", product_id=NEW_PRODUCT,
                                   currency="XXX"), order(zip_code, "on-time")])
    cli_out(capsys, "process", "--workers", "1")
    cli_out(capsys, "promote")
    cli_out(capsys, "init-cache")
    changes = loaded_cache.sources().changes
    assert changes is not None
    window = (f"unknown references rejected from "
              f"{datetime.fromtimestamp(changes.since, UTC):%Y-%m-%d %H:%M:%S} to "
              f"{datetime.fromtimestamp(changes.loaded_at, UTC):%Y-%m-%d %H:%M:%S} UTC")

    before = changed_state(pg, rconn, keys)
    assert cli_out(capsys, "requeue-rejected", "--unknown-references", "--dry-run") == [
        window, "would re-drive 4 unknown product_id",
        "4 rejected orders would be re-driven; run without --dry-run to re-drive them"]
    assert changed_state(pg, rconn, keys) == before  # "early" is not among them either

    out = cli_out(capsys, "requeue-rejected", "--unknown-references")
    [(redrive_id, requested_at)] = pg.execute("SELECT redrive_id, requested_at FROM redrives")
    assert out == [
        window, "re-drove 4 unknown product_id",
        f"re-drove 4 rejected orders as {redrive_id} in 1 batches: run `orders-pipeline "
        "process`, then `orders-pipeline promote` (under Dagster their completion signals "
        f"start that run); `orders-pipeline requeue-rejected --report {redrive_id}` shows "
        "what became of them"]
    head = f"re-drive {redrive_id} of {requested_at:%Y-%m-%d %H:%M:%S %Z}: 4 rows;"
    assert cli_out(capsys, "requeue-rejected", "--report", redrive_id) == [
        f"{head} 0 promoted, 0 rejected, 0 duplicate, 0 quarantined, 4 queued, 0 pending"]

    cli_out(capsys, "process", "--workers", "1")
    cli_out(capsys, "promote")

    assert cli_out(capsys, "requeue-rejected", "--report", redrive_id) == [
        f"{head} 3 promoted, 1 rejected, 0 duplicate, 0 quarantined, 0 queued, 0 pending",
        "rejected again: 1 unknown currency"]
    assert sorted(r[0] for r in pg.execute("SELECT order_id FROM orders")) == [
        "late-0", "late-1", "late-2", "on-time"]
    balance = json.loads("".join(cli_out(capsys, "stats", "--json")))["conservation"]
    assert balance["balanced"] and balance["difference"] == 0
    assert (balance["accepted"], balance["redriven"], balance["orders"],
            balance["rejected"]) == (6, 4, 4, 6)
    assert re.search(r"^\s*re-driven\s+4$", "\n".join(cli_out(capsys, "stats")), re.M)
    # Asked again: those rows are done; the new reject came after the reload.
    assert cli_out(capsys, "requeue-rejected", "--unknown-references")[1:] == [
        "no rejected orders match (none re-driven)"]
    assert redriven_counter(rconn, keys) == 4


def test_cli_requeue_rejected_refuses_bad_usage_in_one_line(
        settings: Settings, rconn: redis.Redis, keys: RedisKeys, pg: psycopg.Connection,
        loaded_cache: LookupCache, zip_code: str, cli_env: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    ingest(settings, [order(zip_code, "q0", quantity=0)])
    before = changed_state(pg, rconn, keys)
    usage = "orders-pipeline requeue-rejected: error: "
    for argv, message in [
        (["--since", "yesterday"], "Invalid value for '--since': 'yesterday' is not an ISO "
                                   "8601 instant"),
        (["--until", "2030-05-01T10:00:00"], "until 2030-05-01T10:00:00 has no UTC offset"),
        (["--reason", "(unclosed"], "--reason: invalid regular expression: parentheses () "
                                    "not balanced"),
        (["--report", "redrive-x", "--reason", "^q"], "--report shows an earlier re-drive "
                                                      "and takes no other option"),
        (["--report", "redrive-x", "--dry-run"], "--report shows an earlier re-drive and "
                                                 "takes no other option"),
        (["--dry-run"], "no filter given: "),
        (["--unknown-references"], "the lookup snapshot has picked up no change"),
    ]:
        code, out, err = cli(capsys, "requeue-rejected", *argv)
        assert (code, out) == (2, ""), (argv, err)
        assert one_usage_line(err, "requeue-rejected").startswith(usage + message), argv
    assert changed_state(pg, rconn, keys) == before

    code, _, err = cli(capsys, "requeue-rejected", "--report", "redrive-nope")
    assert code == 1
    assert one_error_line(err) == "orders-pipeline: error: no re-drive redrive-nope"

    bad_since = subprocess.run(
        [sys.executable, "-m", "orders_pipeline", "requeue-rejected", "--all", "--since",
         "2030-13-01T00:00:00Z"], env=pipeline_env(settings), capture_output=True, text=True,
        timeout=60)
    assert (bad_since.returncode, bad_since.stdout) == (2, "")
    assert "'--since': '2030-13-01T00:00:00Z' is not an ISO 8601 instant" in one_usage_line(
        bad_since.stderr, "requeue-rejected")

    rconn.hset(keys.redriven, "redrive-x-0000-00000000", 1)  # a push the outbox has not seen
    assert f"queue: removed 1 x {keys.redriven}" in cli_out(capsys, "clear", "--queue")
    assert not rconn.exists(keys.redriven)
