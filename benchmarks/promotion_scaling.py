"""`promotion-scaling`: promotion by queue shard with 1, 2 and 4 promoter processes.

On a scratch database of its own (removed afterwards) the benchmark builds N valid orders
once with the product's generator and transform (`generator.valid_orders`, `to_payloads`,
`transform.parse_payloads`, `validate_values`, `enrich` with the lookup tables read from
Postgres), routes each to one of K shards by a hash of its order id (as producers do) and cuts
each shard's orders into batches of B. Then, for each promoter count P:

1. empty `orders`, staging, the ledger, the rollups and the outbox; stage every batch with
   `stage_batch` (COPY, the ledger row records the batch's shard), shards interleaved as
   workers would stage them; VACUUM ANALYZE and CHECKPOINT, so every run starts alike;
2. start P promoter processes, each on its own direct connection and owning shards
   i, i+P, i+2P, …; at one signal each runs `promotion.promote_round(conn, max_batches,
   shard=s)` over its shards in turn until none has work (what one promoter per shard
   group does in a deployment); the run ends when the last one is done;
3. check the result: every order once in `orders`, the ledger all `promoted`, staging
   empty, both rollups equal to a recompute over `orders`.

First (unless `--no-baseline`) the same with one process running `promote_round(conn)` (all
shards per round, shard None): promotion as it was before shards.

Reported per run: wall seconds and orders/s (N / wall), speed-up over the first sharded run,
rounds, rounds tried again after a deadlock (`retries`), each promoter's busy seconds, and
CPU seconds by process from /proc during the promotion (Postgres backends of the scratch
database, Postgres' shared processes, the promoters, everything else on the host), with the
host's busy share. The load average before and after the whole benchmark goes into the JSON.
Results: BENCHMARKS.md "Promotion scale-out".
"""

import itertools
import multiprocessing as mp
import os
import queue
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

import polars as pl
import psycopg
from psycopg import sql

from benchmarks.host import ProcessSampler, machine_info
from benchmarks.scratch import bench_settings, drop_database
from orders_pipeline import generator, transform
from orders_pipeline.connections import close_all, pg_connect
from orders_pipeline.postgres_patterns.promotion import promote_round
from orders_pipeline.postgres_patterns.schema import apply_schema, ensure_database
from orders_pipeline.postgres_patterns.staging import StagingBatch, stage_batch
from orders_pipeline.postgres_patterns.views import ROLLUPS
from orders_pipeline.redis_patterns.lookup_cache import LOOKUP_TABLES
from orders_pipeline.settings import PostgresSettings, Settings

GENERATE_CHUNK = 100_000
# What each run empties before it stages again.
RUN_TABLES = ("orders", "order_ids", "orders_staging", "orders_rejected", "ingest_batches",
              "promotions", "promoted_outbox", "raw_batches", *ROLLUPS)
PROMOTER_TIMEOUT_SECONDS = 3600


class ScalingFailed(RuntimeError):
    """A promoter process failed, or a run's result is not what promotion guarantees."""


@dataclass(frozen=True)
class ScalingOptions:
    """`total` orders over `shards` shards in batches of `batch_size`; promoted by each
    count of processes in `promoters`, `max_batches` batches per round at most."""
    total: int = 1_000_000
    shards: int = 4
    batch_size: int = 5_000
    promoters: tuple[int, ...] = (1, 2, 4)
    max_batches: int = 400
    seed: int = 1
    baseline: bool = True  # first, one all-shards promoter (shard None), as before shards


@dataclass
class StagedBatches:
    """The batches to stage in every run, in staging order: (batch id, shard, rows)."""
    batches: list[tuple[str, int, pl.DataFrame]] = field(default_factory=list)
    build_seconds: float = 0.0

    @property
    def orders(self) -> int:
        return sum(rows.height for _, _, rows in self.batches)


def _lookups(conn: psycopg.Connection) -> dict[str, pl.DataFrame]:
    """The lookup snapshot as `transform.enrich` gets it from the cache: per table the id
    column and the value columns, all as strings (the cache's own queries)."""
    frames = {}
    for table in LOOKUP_TABLES:
        rows = conn.execute(table.query).fetchall()
        columns = (table.id_column, *table.value_columns)
        frames[table.name] = pl.DataFrame([[str(v) for v in row] for row in rows],
                                          schema=dict.fromkeys(columns, pl.String),
                                          orient="row")
    conn.rollback()
    return frames


def build_batches(conn: psycopg.Connection, options: ScalingOptions) -> StagedBatches:
    """`options.total` valid orders through the product's generator and transform, routed
    to shards by a hash of the order id, cut into batches per shard; batches of the shards
    interleaved in staging order. Raises ScalingFailed if the transform rejects any."""
    started = time.perf_counter()
    refs = generator.References.load(conn)
    lookups = _lookups(conn)
    rng = random.Random(options.seed)
    per_shard: list[list[pl.DataFrame]] = [[] for _ in range(options.shards)]
    for start in range(0, options.total, GENERATE_CHUNK):
        count = min(GENERATE_CHUNK, options.total - start)
        payloads = generator.to_payloads(generator.valid_orders(refs, count, rng))
        parsed = transform.parse_payloads(payloads)
        valid, invalid = transform.validate_values(parsed.rows)
        rows, unknown = transform.enrich(valid, lookups)
        if parsed.rejects.height or invalid.height or unknown.height or rows.height != count:
            raise ScalingFailed(f"the transform rejected generated orders: {parsed.rejects}, "
                                f"{invalid}, {unknown}")
        shard = (pl.col("order_id").hash(options.seed) % options.shards).alias("shard")
        for (number,), part in rows.with_columns(shard).partition_by(
                "shard", as_dict=True, maintain_order=True).items():
            per_shard[int(number)].append(part.drop("shard"))
    staged = StagedBatches()
    sliced = [list(pl.concat(parts).iter_slices(options.batch_size)) if parts else []
              for parts in per_shard]
    for round_robin in itertools.zip_longest(*sliced):
        for shard, piece in enumerate(round_robin):
            if piece is None:
                continue
            rows = piece.with_columns(pl.int_range(pl.len(), dtype=pl.Int32)
                                      .alias("batch_position"))
            staged.batches.append((f"scaling-{len(staged.batches) + 1:07d}.s{shard}", shard,
                                   rows))
    staged.build_seconds = time.perf_counter() - started
    return staged


def _stage(conn: psycopg.Connection, staged: StagedBatches) -> float:
    """Empty the run's tables, stage every batch (COPY), then VACUUM ANALYZE and CHECKPOINT;
    returns the staging seconds (COPY only)."""
    conn.execute(sql.SQL("TRUNCATE {}").format(
        sql.SQL(", ").join(map(sql.Identifier, RUN_TABLES))))
    conn.commit()
    started = time.perf_counter()
    for batch_id, shard, rows in staged.batches:
        stage_batch(conn, StagingBatch(batch_id, rows.height, rows, pl.DataFrame(), 0,
                                       shard=shard))
    seconds = time.perf_counter() - started
    conn.autocommit = True
    try:
        conn.execute("VACUUM ANALYZE orders_staging, ingest_batches, orders")
        conn.execute("CHECKPOINT")
    finally:
        conn.autocommit = False
    return seconds


def _promoter(postgres: PostgresSettings, shards: list[int | None], max_batches: int,
              go: Event, reports: "mp.Queue[tuple[str, Any]]") -> None:
    """One promoter process: connect, report ready, wait for `go`, then promote its shards
    (None: all shards at once, `promote_round(conn)`) in turn until none has work; reports
    its figures (or its error) on `reports`."""
    try:
        with pg_connect(postgres) as conn:
            conn.execute("SELECT 1")
            conn.rollback()
            reports.put(("ready", os.getpid()))
            go.wait()
            started = time.monotonic()
            cpu = time.process_time()
            rounds = retries = batches = inserted = 0
            pending = list(shards)
            while pending:
                for shard in list(pending):
                    result = promote_round(conn, max_batches, shard=shard)
                    if not result.promoted_batches and not result.lost_batches:
                        pending.remove(shard)
                        continue
                    rounds += 1
                    retries += result.retries
                    batches += len(result.promoted_batches)
                    inserted += result.inserted_rows
            reports.put(("done", {"pid": os.getpid(), "shards": shards,
                                  "started": started, "ended": time.monotonic(),
                                  "rounds": rounds, "retries": retries,
                                  "batches": batches, "inserted_rows": inserted,
                                  "process_cpu_seconds": round(time.process_time() - cpu, 2)}))
    except BaseException as exc:
        reports.put(("error", f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
        raise


def _promote_with(postgres: PostgresSettings, owned: list[list[int | None]], max_batches: int,
                  database: str) -> dict[str, Any]:
    """Promote everything staged with one promoter process per entry of `owned` (the shards
    it promotes); their figures and the CPU used meanwhile. Raises ScalingFailed if one of
    them failed."""
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    reports: mp.Queue[tuple[str, Any]] = ctx.Queue()
    processes = len(owned)
    children = [ctx.Process(target=_promoter, name=f"promoter-{i}",
                            args=(postgres, owned[i], max_batches, go, reports))
                for i in range(processes)]
    for child in children:
        child.start()
    try:
        pids = [_report(reports, "ready", children) for _ in children]
        roles = {pid: "promoter" for pid in pids}
        sampler = ProcessSampler(lambda: roles, database, interval=0.25)
        started = time.monotonic()
        go.set()
        done = [_report(reports, "done", children) for _ in children]
        wall = max(d["ended"] for d in done) - started
        cpu = sampler.stop()
    except BaseException:
        for child in children:  # a failed run leaves no promoter behind
            if child.is_alive():
                child.kill()
        raise
    finally:
        for child in children:
            child.join(timeout=30)
    for promoter in done:
        promoter["busy_seconds"] = round(promoter.pop("ended") - promoter.pop("started"), 2)
    return {"wall_seconds": wall, "promoters": done, "cpu": cpu}


def _report(reports: "mp.Queue[tuple[str, Any]]", expected: str,
            children: list[BaseProcess]) -> Any:
    """The next report of a promoter, which must be `expected`; ScalingFailed if it is an
    error, if a promoter died without reporting, or after PROMOTER_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + PROMOTER_TIMEOUT_SECONDS
    while True:
        try:
            kind, value = reports.get(timeout=1)
            break
        except queue.Empty:
            dead = [c for c in children if c.exitcode not in (None, 0)]
            if dead:
                raise ScalingFailed(f"promoter {dead[0].name} died (exit code "
                                    f"{dead[0].exitcode}) without a report") from None
            if time.monotonic() > deadline:
                raise ScalingFailed(f"no promoter report for {PROMOTER_TIMEOUT_SECONDS} s"
                                    ) from None
    if kind != expected:
        raise ScalingFailed(f"a promoter failed: {value}")
    return value


_CHECK = f"""
SELECT (SELECT count(*) FROM orders),
       (SELECT count(*) FROM orders_staging),
       (SELECT count(*) FROM ingest_batches WHERE status <> 'promoted'),
       {" + ".join(f'''(SELECT count(*) FROM (
            (SELECT * FROM {rollup} EXCEPT ALL
             SELECT {expressions}, count(*), sum(quantity::bigint), sum(total_amount_usd)
             FROM orders GROUP BY 1, 2)
            UNION ALL
            (SELECT {expressions}, count(*), sum(quantity::bigint), sum(total_amount_usd)
             FROM orders GROUP BY 1, 2 EXCEPT ALL SELECT * FROM {rollup})) AS d)'''
                   for rollup, (_, expressions) in ROLLUPS.items())}
"""


def _verify(conn: psycopg.Connection, total: int) -> dict[str, Any]:
    """Every order once in `orders`, nothing left staged, the rollups exact."""
    orders, staging, unpromoted, rollup_differences = conn.execute(_CHECK).fetchone()
    conn.rollback()
    return {"orders_rows": int(orders), "staging_rows": int(staging),
            "unpromoted_batches": int(unpromoted),
            "rollup_rows_differing": int(rollup_differences),
            "verified": (int(orders) == total and not staging and not unpromoted
                         and not rollup_differences)}


def run_scaling(settings: Settings, options: ScalingOptions,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark on a scratch database, which it always drops; returns the figures as
    one JSON-able dict. Raises ScalingFailed when a promoter fails or a run's result is not
    exact, and lets server errors through."""
    say = progress or (lambda _: None)
    bench = bench_settings(settings)
    load_before = os.getloadavg()
    started_at = datetime.now(UTC).isoformat()
    runs: list[dict[str, Any]] = []
    try:
        ensure_database(bench.postgres)
        with pg_connect(bench.postgres) as conn:
            apply_schema(conn)
            machine = machine_info(bench)
            say(f"building {options.total:,} orders over {options.shards} shards")
            staged = build_batches(conn, options)
            say(f"built {len(staged.batches):,} batches in {staged.build_seconds:.1f} s")
            plan: list[tuple[str, list[list[int | None]]]] = (
                [("all", [[None]])] if options.baseline else [])
            plan += [(str(p), shards_of(p, options.shards)) for p in options.promoters]
            for label, owned in plan:
                staging_seconds = _stage(conn, staged)
                say(f"P={label}: staged {staged.orders:,} orders in "
                    f"{staging_seconds:.1f} s; promoting")
                measured = _promote_with(bench.postgres, owned, options.max_batches,
                                         bench.postgres.dbname)
                check = _verify(conn, staged.orders)
                if not check["verified"]:
                    raise ScalingFailed(f"P={label}: promotion result is wrong: {check}")
                wall = measured["wall_seconds"]
                runs.append({
                    "promoters": label, "processes": len(owned),
                    "wall_seconds": round(wall, 2),
                    "orders_per_second": round(staged.orders / wall, 1),
                    "rounds": sum(p["rounds"] for p in measured["promoters"]),
                    "retries": sum(p["retries"] for p in measured["promoters"]),
                    "staging_seconds": round(staging_seconds, 2),
                    "per_promoter": measured["promoters"], "cpu": measured["cpu"],
                    **check})
                say(f"P={label}: {wall:.2f} s, {staged.orders / wall:,.0f} orders/s, "
                    f"host busy {measured['cpu']['host_busy_percent']} %")
    finally:
        close_all()
        drop_database(bench.postgres)
    sharded = [run for run in runs if run["promoters"] != "all"]
    base = sharded[0]["orders_per_second"] if sharded else 0.0
    for run in runs:
        run["speedup"] = round(run["orders_per_second"] / base, 2) if base else None
    return {"benchmark": "promotion_scaling", "started_at": started_at,
            "database": bench.postgres.dbname, "options": dict(options.__dict__),
            "orders": staged.orders, "batches": len(staged.batches),
            "build_seconds": round(staged.build_seconds, 1),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "machine": machine, "runs": runs}


def render_scaling(result: dict[str, Any]) -> str:
    """The figures as an aligned table."""
    options = result["options"]
    lines = [f"{result['orders']:,} orders, {options['shards']} shards, "
             f"{result['batches']:,} batches of {options['batch_size']:,}, at most "
             f"{options['max_batches']} batches a round",
             "",
             f"{'P':>5}{'wall s':>9}{'orders/s':>11}{'speed-up':>10}{'rounds':>8}"
             f"{'retries':>9}{'PG CPU s':>10}{'prom. CPU s':>13}{'other CPU s':>13}"
             f"{'host busy':>11}"]
    for run in result["runs"]:
        by_role = run["cpu"]["cpu_seconds_by_role"]
        postgres = by_role.get("postgres", 0.0) + by_role.get("postgres_shared", 0.0)
        lines.append(
            f"{run['promoters']:>5}{run['wall_seconds']:>9.2f}"
            f"{run['orders_per_second']:>11,.0f}{run['speedup']:>9.2f}×{run['rounds']:>8}"
            f"{run['retries']:>9}{postgres:>10.1f}{by_role.get('promoter', 0.0):>13.1f}"
            f"{by_role.get('other', 0.0):>13.1f}{run['cpu']['host_busy_percent']:>10.1f}%")
    before = ", ".join(f"{v:.2f}" for v in result["load_average_before"])
    after = ", ".join(f"{v:.2f}" for v in result["load_average_after"])
    lines += ["(P all: one promoter, all shards per round (shard=None), as before shards; "
              "speed-up: over the first sharded run)",
              "(PG CPU: backends of the scratch database + Postgres' shared processes, during "
              "the promotion; other: every other process on the host)",
              f"load average before {before}; after {after}"]
    return "\n".join(lines)


def parse_counts(text: str) -> tuple[int, ...]:
    """`1,2,4` -> (1, 2, 4); ValueError unless positive integers."""
    counts = tuple(int(part) for part in text.split(",") if part.strip())
    if not counts or any(count < 1 for count in counts):
        raise ValueError(f"expected positive integers separated by commas, not {text!r}")
    return counts


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def shards_of(processes: int, shards: int) -> list[list[int | None]]:
    """The shards each of `processes` promoters owns: i, i+P, i+2P, …"""
    owned: list[list[int | None]] = [[] for _ in range(processes)]
    for shard in range(shards):
        owned[shard % processes].append(shard)
    return owned
