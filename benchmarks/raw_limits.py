"""Raw limits: each stage's job done alone, "well" and "naively", on the benchmark's rows.

The pipeline's stage rates only mean something next to what this machine can do at best for
the same work, measured in the same run on the same rows. Each measurement here does one
stage's job with the least code that does it well (and, where the issue names one, the naive
way), in one process and one at a time, on scratch keys and tables inside the benchmark's own
key prefix and database, which it removes again. Rates are rows/s, the median of `repeats`.

`pipeline_alone` runs the product's own code on the same rows under the same conditions
(one process, one stage at a time, in a scratch database), so that the ratio of a stage to
its limit measures the code, not the CPU it shared with other stages in the overlapped run.
The worker's steps are timed here, by calling the functions a worker calls one step at a
time: the product reports whole batches only.
"""

import contextlib
import io
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import polars as pl
import psycopg
import redis
from psycopg import sql

from benchmarks.scratch import delete_keys, drop_database
from orders_pipeline import generator, pipeline, transform
from orders_pipeline.connections import pg_connect, pg_pool, redis_client
from orders_pipeline.postgres_patterns.promotion import ORDER_COLUMNS
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.postgres_patterns.staging import (
    STAGING_COLUMNS,
    StagingBatch,
    rows_to_csv,
    stage_batch,
)
from orders_pipeline.postgres_patterns.views import ROLLUPS, refresh_views
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape, unlink_matching
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.order_window import OrderRateWindow
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings

LARGE_COPY_ROWS = 100_000
NAIVE_INSERT_ROWS = 20_000
SCRATCH_STAGING = "raw_limit_staging"
SCRATCH_ORDERS = "raw_limit_orders"
FULL_VIEWS = {
    "raw_full_sales_hourly": """
        SELECT date_trunc('hour', order_timestamp, 'UTC') AS hour, category,
               count(*) AS order_count, sum(quantity) AS units_sold,
               sum(total_amount_usd) AS revenue_usd
        FROM orders GROUP BY 1, 2""",
    "raw_full_product_daily": """
        SELECT (order_timestamp AT TIME ZONE 'UTC')::date AS day, product_id,
               count(*) AS order_count, sum(quantity) AS units_sold,
               sum(total_amount_usd) AS revenue_usd
        FROM orders GROUP BY 1, 2""",
}
VIEW_OF_FULL = {"raw_full_sales_hourly": "sales_hourly",
                "raw_full_product_daily": "product_performance_daily"}

# Claim done well, and nothing else: pop up to ARGV[1] orders into the batch's own list.
# KEYS: source list, batch list
_CLAIM = """
local items = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not items then return {} end
for i = 1, #items, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 999, #items)))
end
return items
"""

# Dedup done well, and nothing else: one SET NX EX per id, one flag per id.
# KEYS: one per order id   ARGV: ttl, then one token per id
_DEDUP = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'EX', ARGV[1]) and 1 or 0
end
return out
"""


@dataclass(frozen=True)
class Sample:
    """The rows every measurement works on, cut into the pipeline's batches."""
    frames: list[pl.DataFrame]        # valid orders with the payload columns, per batch
    payloads: list[list[bytes]]       # the same orders as queue payloads, per batch
    staging: list[pl.DataFrame]       # the same orders as the pipeline stages them
    lookups: dict[str, pl.DataFrame]  # the lookup rows these orders refer to

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.payloads)


def _rate(rows: int, seconds: list[float]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {"rows": rows, "seconds": round(median, 4),
            "rows_per_second": round(rows / median, 1) if median else 0.0,
            "runs_seconds": [round(s, 4) for s in seconds]}


def _repeat(repeats: int, run: Callable[[], float],
            reset: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each run; `reset` (untimed) puts the scratch state back before each."""
    out = []
    for _ in range(repeats):
        if reset is not None:
            reset()
        out.append(run())
    return out


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def build_sample(settings: Settings, rows: int, batch_size: int, seed: int) -> Sample:
    """The producer's first `rows` orders, regenerated from the same per-chunk seeds.

    Same ids, products, prices and quantities as the producer pushed (without duplicates
    or invalid payloads); timestamps differ by the seconds between the two generations.
    Staging rows come from the pipeline's own parse, validate and enrich.
    """
    keys = RedisKeys.of(settings.redis)
    cache = LookupCache(redis_client(settings.redis), keys, settings.pipeline.lookup_ttl_seconds)
    with pg_connect(settings.postgres) as conn:
        refs = generator.References.load(conn)
    chunks = [generator.valid_orders(refs, min(generator.GENERATE_CHUNK, rows - start),
                                     random.Random(seed + number))
              for number, start in enumerate(range(0, rows, generator.GENERATE_CHUNK))]
    frames = [chunk.slice(start, batch_size) for chunk in chunks
              for start in range(0, chunk.height, batch_size)]
    payloads = [generator.to_payloads(frame) for frame in frames]
    lookups = cache.fetch(transform.lookup_ids(pl.concat(chunks)))
    staging = []
    for number, batch in enumerate(payloads):
        valid, _ = transform.validate_values(transform.parse_payloads(batch).rows)
        enriched, _ = transform.enrich(valid, lookups)
        staging.append(enriched.with_columns(pl.lit(f"raw{number:06d}").alias("batch_id"))
                       .select(STAGING_COLUMNS))
    return Sample(frames, payloads, staging, lookups)


# ---------------------------------------------------------------------------- Redis


def _push(client: redis.Redis, key: str, sample: Sample, *, variadic: bool,
          serialise: bool) -> float:
    started = time.perf_counter()
    for frame, batch in zip(sample.frames, sample.payloads, strict=True):
        items = generator.to_payloads(frame) if serialise else batch
        if variadic:
            client.lpush(key, *items)
        else:
            pipe = client.pipeline(transaction=False)
            for item in items:
                pipe.lpush(key, item)
            pipe.execute()
    return time.perf_counter() - started


def _fill(client: redis.Redis, key: str, sample: Sample) -> None:
    client.delete(key)
    for batch in sample.payloads:
        client.lpush(key, *batch)


def _claim_lua(client: redis.Redis, source: str, prefix: str, batch_size: int) -> float:
    claim = client.register_script(_CLAIM)
    started = time.perf_counter()
    number = 0
    while claim(keys=[source, f"{prefix}:b:{number}"], args=[batch_size]):
        number += 1
    return time.perf_counter() - started


def _claim_lmove(client: redis.Redis, source: str, prefix: str, batch_size: int) -> float:
    started = time.perf_counter()
    number = 0
    while True:
        pipe = client.pipeline(transaction=False)
        for _ in range(batch_size):
            pipe.lmove(source, f"{prefix}:b:{number}", "RIGHT", "LEFT")
        if not any(pipe.execute()):
            break
        number += 1
    return time.perf_counter() - started


def _dedup_ids(sample: Sample) -> Iterator[tuple[list[str], list[str]]]:
    for number, frame in enumerate(sample.frames):
        ids = frame["order_id"].to_list()
        yield ids, [f"raw{number}:{p}" for p in range(len(ids))]


def _dedup_lua(client: redis.Redis, prefix: str, sample: Sample, ttl: int) -> float:
    dedup = client.register_script(_DEDUP)
    started = time.perf_counter()
    for ids, tokens in _dedup_ids(sample):
        dedup(keys=[f"{prefix}:{i}" for i in ids], args=[ttl, *tokens])
    return time.perf_counter() - started


def _dedup_set_nx(client: redis.Redis, prefix: str, sample: Sample, ttl: int) -> float:
    started = time.perf_counter()
    for ids, tokens in _dedup_ids(sample):
        pipe = client.pipeline(transaction=False)
        for order_id, token in zip(ids, tokens, strict=True):
            pipe.set(f"{prefix}:{order_id}", token, nx=True, ex=ttl)
        pipe.execute()
    return time.perf_counter() - started


def redis_limits(settings: Settings, sample: Sample, batch_size: int,
                 repeats: int) -> dict[str, dict[str, Any]]:
    client = redis_client(settings.redis)
    prefix = f"{settings.redis.key_prefix}:raw"
    source = f"{prefix}:queue"
    ttl = settings.pipeline.dedup_window_seconds

    def clear() -> None:
        unlink_matching(client, f"{glob_escape(prefix)}:*")

    rows = sample.rows
    runs = iter(range(10**9))  # a fresh dedup key space per run: every id is new
    try:
        return {
            "serialise": _rate(rows, _repeat(repeats, lambda: _timed(
                lambda: [generator.to_payloads(f) for f in sample.frames]))),
            "lpush_variadic": _rate(rows, _repeat(repeats, lambda: _push(
                client, source, sample, variadic=True, serialise=False), clear)),
            "serialise_lpush_variadic": _rate(rows, _repeat(repeats, lambda: _push(
                client, source, sample, variadic=True, serialise=True), clear)),
            "serialise_lpush_per_order": _rate(rows, _repeat(repeats, lambda: _push(
                client, source, sample, variadic=False, serialise=True), clear)),
            "claim_lua": _rate(rows, _repeat(repeats, lambda: _claim_lua(
                client, source, prefix, batch_size), lambda: (clear(), _fill(
                    client, source, sample)))),
            "claim_lmove": _rate(rows, _repeat(repeats, lambda: _claim_lmove(
                client, source, prefix, batch_size), lambda: (clear(), _fill(
                    client, source, sample)))),
            "dedup_lua": _rate(rows, _repeat(repeats, lambda: _dedup_lua(
                client, f"{prefix}:d{next(runs)}", sample, ttl), clear)),
            "dedup_set_nx": _rate(rows, _repeat(repeats, lambda: _dedup_set_nx(
                client, f"{prefix}:d{next(runs)}", sample, ttl), clear)),
        }
    finally:
        clear()


# ---------------------------------------------------------------------------- Polars


def _parse_ndjson(batch: list[bytes]) -> pl.DataFrame:
    return pl.read_ndjson(io.BytesIO(b"\n".join(batch)), schema=transform.RAW_SCHEMA)


def _parse_json_loop(batch: list[bytes]) -> pl.DataFrame:
    return pl.DataFrame([json.loads(p) for p in batch], schema=transform.RAW_SCHEMA)


def _transform(rows: pl.DataFrame, lookups: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Timestamps to UTC, the three lookup joins and the money columns; nothing else."""
    unit_price = pl.col("unit_price").cast(pl.Decimal(18, 4))
    total = (unit_price * pl.col("quantity")).cast(pl.Decimal(24, 4))
    return (rows
            .with_columns(pl.col("order_timestamp").str.to_datetime(
                "%Y-%m-%dT%H:%M:%S%.f%z", time_zone="UTC"))
            .join(lookups["products"], on="product_id", how="left")
            .join(lookups["currencies"], on="currency", how="left")
            .join(lookups["zip_codes"], on="zip_code", how="left")
            .with_columns(
                unit_price.alias("unit_price"),
                total.alias("total_amount"),
                (total * pl.col("rate_to_usd").cast(pl.Decimal(18, 8)))
                .round(2, mode="half_away_from_zero").cast(pl.Decimal(22, 2))
                .alias("total_amount_usd"),
                pl.col("shipping_zone").cast(pl.Int16))
            .drop("rate_to_usd"))


def polars_limits(sample: Sample, repeats: int) -> dict[str, dict[str, Any]]:
    rows = sample.rows
    parsed = [_parse_ndjson(batch) for batch in sample.payloads]
    return {
        "parse_read_ndjson": _rate(rows, _repeat(repeats, lambda: _timed(
            lambda: [_parse_ndjson(batch) for batch in sample.payloads]))),
        "parse_json_loop": _rate(rows, _repeat(repeats, lambda: _timed(
            lambda: [_parse_json_loop(batch) for batch in sample.payloads]))),
        "transform_polars": _rate(rows, _repeat(repeats, lambda: _timed(
            lambda: [_transform(frame, sample.lookups) for frame in parsed]))),
    }


# ---------------------------------------------------------------------------- Postgres


def _copy(conn: psycopg.Connection, table: str, frame: pl.DataFrame) -> None:
    data = rows_to_csv(frame, frame["batch_id"][0])
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, STAGING_COLUMNS)))
    with conn.cursor().copy(statement) as copy:
        copy.write(data)


def _copy_large(conn: psycopg.Connection, sample: Sample) -> float:
    started = time.perf_counter()
    per_chunk = max(1, LARGE_COPY_ROWS // max(1, sample.staging[0].height))
    with conn.transaction():
        for start in range(0, len(sample.staging), per_chunk):
            _copy(conn, SCRATCH_STAGING, pl.concat(sample.staging[start:start + per_chunk]))
    return time.perf_counter() - started


def _copy_per_batch(conn: psycopg.Connection, sample: Sample) -> float:
    started = time.perf_counter()
    for frame in sample.staging:
        with conn.transaction():
            _copy(conn, SCRATCH_STAGING, frame)
    return time.perf_counter() - started


_ORDER_LIST = ", ".join(ORDER_COLUMNS)


def _insert_select(conn: psycopg.Connection, on_conflict: str = "") -> float:
    started = time.perf_counter()
    with conn.transaction():
        conn.execute(f"INSERT INTO {SCRATCH_ORDERS} ({_ORDER_LIST})"
                     f" SELECT {_ORDER_LIST} FROM {SCRATCH_STAGING} {on_conflict}")
    return time.perf_counter() - started


def _insert_rows(conn: psycopg.Connection, rows: list[tuple[Any, ...]]) -> float:
    placeholders = ", ".join(["%s"] * len(ORDER_COLUMNS))
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {SCRATCH_ORDERS} ({_ORDER_LIST}) VALUES ({placeholders})",
                        rows)
    return time.perf_counter() - started


def _truncate(conn: psycopg.Connection, table: str) -> None:
    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
    conn.commit()


def _full_refresh(conn: psycopg.Connection) -> float:
    started = time.perf_counter()
    for view in FULL_VIEWS:
        conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(sql.Identifier(view)))
        conn.commit()
    return time.perf_counter() - started


def _views_match_full(conn: psycopg.Connection) -> bool:
    """Our views hold exactly what the full GROUP BY over `orders` computes."""
    differ = 0
    for full, ours in VIEW_OF_FULL.items():
        query = sql.SQL("SELECT count(*) FROM ((TABLE {a} EXCEPT ALL TABLE {b})"
                        " UNION ALL (TABLE {b} EXCEPT ALL TABLE {a})) AS d")
        differ += conn.execute(query.format(a=sql.Identifier(full),
                                            b=sql.Identifier(ours))).fetchone()[0]
    conn.commit()
    return differ == 0


def postgres_limits(settings: Settings, sample: Sample,
                    repeats: int) -> dict[str, dict[str, Any]]:
    rows = sample.rows
    with pg_connect(settings.postgres) as conn:
        conn.execute(f"CREATE UNLOGGED TABLE {SCRATCH_STAGING}"
                     " (LIKE orders_staging INCLUDING DEFAULTS)")
        conn.execute(f"CREATE TABLE {SCRATCH_ORDERS}"
                     " (LIKE orders INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)")
        for view, query in FULL_VIEWS.items():
            conn.execute(f"CREATE MATERIALIZED VIEW {view} AS {query} WITH NO DATA")
        conn.commit()
        try:
            out = {
                "copy_large_chunks": _rate(rows, _repeat(repeats, lambda: _copy_large(
                    conn, sample), lambda: _truncate(conn, SCRATCH_STAGING))),
                "copy_commit_per_batch": _rate(rows, _repeat(repeats, lambda: _copy_per_batch(
                    conn, sample), lambda: _truncate(conn, SCRATCH_STAGING))),
            }
            _truncate(conn, SCRATCH_STAGING)
            _copy_large(conn, sample)
            conn.execute(f"ANALYZE {SCRATCH_STAGING}")
            conn.commit()
            out["promote_insert_select"] = _rate(rows, _repeat(
                repeats, lambda: _insert_select(conn), lambda: _truncate(conn, SCRATCH_ORDERS)))
            # Not a limit: what the idempotent form the pipeline needs costs by itself (the
            # scratch table has `orders`' key, (order_id, order_timestamp), unpartitioned).
            out["promote_insert_select_on_conflict"] = _rate(rows, _repeat(
                repeats, lambda: _insert_select(conn, "ON CONFLICT DO NOTHING"),
                lambda: _truncate(conn, SCRATCH_ORDERS)))
            naive = conn.execute(f"SELECT {_ORDER_LIST} FROM {SCRATCH_STAGING} LIMIT %s",
                                 (NAIVE_INSERT_ROWS,)).fetchall()
            conn.commit()
            out["promote_row_inserts"] = _rate(len(naive), _repeat(
                repeats, lambda: _insert_rows(conn, naive),
                lambda: _truncate(conn, SCRATCH_ORDERS)))
            orders = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
            conn.commit()
            out["refresh_full_group_by"] = _rate(orders, _repeat(
                repeats, lambda: _full_refresh(conn)))
            out["refresh_incremental"] = _rate(orders, _repeat(
                repeats, lambda: sum(refresh_views(conn).values())))
            out["views_match_full_recompute"] = {"value": _views_match_full(conn)}
            return out
        finally:
            conn.rollback()
            for view in FULL_VIEWS:
                conn.execute(f"DROP MATERIALIZED VIEW IF EXISTS {view}")
            conn.execute(f"DROP TABLE IF EXISTS {SCRATCH_STAGING}, {SCRATCH_ORDERS}")
            conn.commit()


# ---------------------------------------------------------------------------- the pipeline alone

_RESET = ", ".join(("orders", "order_ids", "orders_staging", "orders_rejected",
                    "ingest_batches", "promotions", *ROLLUPS))


WORKER_STEPS = ("claim", "parse", "transform", "dedup", "copy", "hand_over")


@contextlib.contextmanager
def _clock(seconds: dict[str, float], step: str) -> Iterator[None]:
    """Add the seconds the block takes to `seconds[step]`."""
    started = time.perf_counter()
    yield
    seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - started


def _worker_steps(settings: Settings, prefix: str, sample: Sample,
                  batch_size: int) -> dict[str, float]:
    """Seconds of each step of a staging worker, over the sample, each step timed alone.

    The sample is pushed (untimed) under key prefix `prefix`, then claimed batch by batch and
    taken through the calls `StagingWorker.process` makes, in its order: claim, parse,
    validate and enrich ("transform", with the lookup fetch from the snapshot of `settings`),
    dedup marks, the rejects ("transform"), the staging COPY, the hand-over. No retries and
    no fault points; the staged rows stay in staging (the caller empties it).
    """
    client = redis_client(settings.redis)
    keys = RedisKeys(prefix)
    tuning = settings.pipeline
    queue = OrderQueue(client, keys, tuning.claim_timeout_seconds)
    dedup = DedupWindow(client, keys, tuning.dedup_window_seconds)
    window = OrderRateWindow(client, keys)
    cache = LookupCache(client, RedisKeys.of(settings.redis), tuning.lookup_ttl_seconds)
    generator.push_payloads(queue, Backpressure(client, keys, 10**12),
                            [p for batch in sample.payloads for p in batch], batch_size)
    seconds = dict.fromkeys(WORKER_STEPS, 0.0)
    while True:
        with _clock(seconds, "claim"):
            batch = queue.claim_batch(batch_size, "raw-limits")
        if batch is None:
            return seconds
        with _clock(seconds, "parse"):
            parsed = transform.parse_payloads(batch.payloads)
        with _clock(seconds, "transform"):
            valid, invalid = transform.validate_values(parsed.rows)
            enriched, unknown = transform.enrich(
                valid, cache.fetch(transform.lookup_ids(valid)))
        with _clock(seconds, "dedup"):
            tokens = [f"{batch.batch_id}:{p}" for p in enriched["batch_position"].to_list()]
            keep = dedup.check_and_mark(enriched["order_id"].to_list(), tokens)
        with _clock(seconds, "transform"):
            staged = enriched.filter(pl.Series(keep, dtype=pl.Boolean)) if keep else enriched
            rejects = pl.concat([parsed.rejects, transform.rejects_from(
                pl.concat([invalid, unknown]), batch.payloads)])
        with _clock(seconds, "copy"), pg_pool(settings.postgres).connection() as conn:
            stage_batch(conn, StagingBatch(batch.batch_id, len(batch.payloads), staged,
                                           rejects, enriched.height - staged.height))
        with _clock(seconds, "hand_over"):
            queue.mark_staged(batch)
            window.add_counts(batch.batch_id, transform.orders_per_minute(staged))


def _pipeline_once(settings: Settings, sample: Sample, batch_size: int) -> dict[str, float]:
    """Seconds of each stage of the product on the sample, one stage at a time.

    Push (`generator.push_payloads`), stage (`pipeline.stage_queue` with one worker in this
    process: the seconds its batch reports add up to), promote, refresh; then the worker's
    steps one by one (`_worker_steps`, on a second copy of the sample under a sub-prefix).
    """
    client = redis_client(settings.redis)
    keys = RedisKeys.of(settings.redis)
    queue = OrderQueue(client, keys, settings.pipeline.claim_timeout_seconds)
    payloads = [p for batch in sample.payloads for p in batch]
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    generator.push_payloads(queue, Backpressure(client, keys, 10**12), payloads, batch_size)
    seconds["push"] = time.perf_counter() - started
    batches: list[float] = []
    pipeline.stage_queue(settings, workers=1, batch_size=batch_size,
                         on_batch=lambda report: batches.append(report.seconds))
    seconds["stage"] = sum(batches)
    started = time.perf_counter()
    pipeline.promote_staged(settings)
    seconds["promote"] = time.perf_counter() - started
    started = time.perf_counter()
    pipeline.refresh_all_views(settings)
    seconds["refresh"] = time.perf_counter() - started
    seconds.update(_worker_steps(settings, f"{keys.prefix}:steps", sample, batch_size))
    return seconds


def pipeline_alone(settings: Settings, sample: Sample, batch_size: int,
                   repeats: int) -> dict[str, dict[str, Any]]:
    """The product's stages on the sample, one at a time, in a scratch database."""
    postgres = replace(settings.postgres, dbname=f"{settings.postgres.dbname}_alone")
    runs: list[dict[str, float]] = []
    ensure_database(postgres)
    try:
        with pg_connect(postgres) as conn:
            apply_schema(conn)
        for number in range(repeats):
            alone = replace(settings, postgres=postgres, redis=replace(
                settings.redis, key_prefix=f"{settings.redis.key_prefix}:alone{number}"))
            with pg_connect(postgres) as conn:
                conn.execute(f"TRUNCATE {_RESET}")
                conn.commit()
                LookupCache(redis_client(alone.redis), RedisKeys.of(alone.redis),
                            alone.pipeline.lookup_ttl_seconds).load_snapshot(conn)
            runs.append(_pipeline_once(alone, sample, batch_size))
            delete_keys(alone.redis)
    finally:
        drop_database(postgres)
    return {stage: _rate(sample.rows, [run.get(stage, 0.0) for run in runs])
            for stage in runs[0]}


def measure(settings: Settings, rows: int, batch_size: int, repeats: int,
            seed: int) -> dict[str, Any]:
    """Every raw limit on the first `rows` orders of the run (see `build_sample`), and the
    pipeline's own stages alone on the same rows."""
    started = time.perf_counter()
    sample = build_sample(settings, rows, batch_size, seed)
    limits = {**redis_limits(settings, sample, batch_size, repeats),
              **polars_limits(sample, repeats),
              **postgres_limits(settings, sample, repeats)}
    alone = pipeline_alone(settings, sample, batch_size, repeats)
    return {"sample_rows": sample.rows, "batch_size": batch_size, "repeats": repeats,
            "seconds": round(time.perf_counter() - started, 2), "limits": limits,
            "pipeline_alone": alone}
