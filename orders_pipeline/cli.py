"""`orders-pipeline`: run and inspect the pipeline from a shell.

`benchmark` is handed to the separate `benchmarks` package (`orders-pipeline-benchmark`).
Every other command reads its configuration from the environment (and `.env`), checks that the
servers it needs answer before doing anything, and turns the failures people actually meet
(server down, wrong password, schema or cache not initialised, bad config) into one line on
stderr and a non-zero exit code instead of a traceback.
"""

import argparse
import json
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

import psycopg
import redis
from psycopg_pool import PoolTimeout
from tqdm import tqdm

from orders_pipeline import generator, pipeline
from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.postgres_patterns.promotion import QuarantinedBatch, error_text
from orders_pipeline.postgres_patterns.schema import (
    SchemaFilesMissing,
    SchemaMissing,
    apply_schema,
    ensure_database,
    require_schema,
    sql_files,
)
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys, glob_escape, unlink_matching
from orders_pipeline.redis_patterns.lookup_cache import (
    LOOKUP_TABLES,
    LookupCache,
    LookupCacheMissing,
)
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.redis_patterns.signals import REFUSED_COUNTER, CompletionSignals
from orders_pipeline.settings import (
    BATCH_SIZE,
    BATCHES_PER_WORKER,
    WORKERS,
    Bound,
    ConfigError,
    PostgresSettings,
    Settings,
    load_env_file,
)
from orders_pipeline.stats import collect_stats, render_stats, throughput_line
from orders_pipeline.worker import BatchReport, StopRequest, WorkerStats

PROG = "orders-pipeline"
PREFLIGHT_TIMEOUT_SECONDS = 3
CLEAR_SCREEN = "\033[H\033[2J"


class CliError(Exception):
    """An expected failure, already phrased for the user."""


# ---------------------------------------------------------------------------- helpers


def _tty() -> bool:
    return sys.stderr.isatty()


def _out(line: str = "") -> None:
    print(line, flush=True)


def _endpoint(pg: PostgresSettings, *, via_pgbouncer: bool = False) -> str:
    """Which server a connection goes to, as users know it: "Postgres at host:port"."""
    params = pg.conninfo(via_pgbouncer=via_pgbouncer)
    server = "PgBouncer" if via_pgbouncer else "Postgres"
    return f"{server} at {params['host']}:{params['port']}"


def _postgres_error(exc: psycopg.OperationalError, pg: PostgresSettings, endpoint: str) -> str:
    """One line saying what went wrong reaching Postgres, without libpq's multi-line text."""
    text = " ".join(str(exc).split())
    # PgBouncer words a wrong SCRAM password as "SASL authentication failed".
    if any(failure in text for failure in ("password authentication failed",
                                           "SASL authentication failed",
                                           "no password supplied")):
        return f"password authentication failed for user {pg.user!r} ({endpoint})"
    if "does not exist" in text and "database" in text:
        return (f"database {pg.dbname!r} does not exist ({endpoint}); "
                f"run `{PROG} init-db`")
    reason = text.rsplit("failed: ", 1)[-1].split(" Is the server running")[0].strip()
    if reason.startswith("FATAL:"):
        return f"{endpoint} refused the connection ({reason[6:].strip()})"
    return f"cannot reach {endpoint} ({reason.rstrip('.')})"


def _redis_error(exc: redis.RedisError, settings: Settings) -> str:
    """One line naming the Redis problem; never the password (the server's text has none)."""
    endpoint = f"{settings.redis.host}:{settings.redis.port}"
    if isinstance(exc, redis.AuthenticationError):
        if settings.redis.password is None:
            return f"Redis at {endpoint} requires a password (set REDIS_PASSWORD): {exc}"
        user = f"user {settings.redis.username!r}" if settings.redis.username else "default user"
        return f"wrong Redis password for {user} at {endpoint} ({exc})"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (f"TLS certificate of Redis at {endpoint} failed verification "
                f"({cause.verify_message}); set REDIS_SSL_CA_CERTS to the CA that signed it")
    if isinstance(cause, OSError):
        reason = cause.strerror or str(cause) or type(cause).__name__
    else:
        reason = str(exc).rstrip(".") or type(exc).__name__
    return f"cannot reach Redis at {endpoint} ({reason})"


def _check_postgres(settings: Settings, *, admin: bool = False, pooled: bool = False) -> None:
    """Fail within seconds when Postgres (or PgBouncer) is down, before any pool waits 15 s."""
    pg = settings.postgres
    targets = [False, True] if pooled and pg.use_pgbouncer else [False]
    for via_pgbouncer in targets:
        params = {**pg.conninfo(via_pgbouncer=via_pgbouncer),
                  "connect_timeout": PREFLIGHT_TIMEOUT_SECONDS}
        if admin:
            params["dbname"] = "postgres"
        try:
            psycopg.connect(**params).close()
        except psycopg.OperationalError as exc:
            raise CliError(_postgres_error(exc, pg, _endpoint(pg, via_pgbouncer=via_pgbouncer))
                           ) from exc


def _check_redis(settings: Settings) -> redis.Redis:
    client = redis_client(settings.redis)
    client.ping()
    return client


def _keys(settings: Settings) -> RedisKeys:
    return RedisKeys(settings.redis.key_prefix)


def _require_schema(settings: Settings) -> None:
    with pg_connect(settings.postgres) as conn:
        require_schema(conn)


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """A `should_stop` that turns true on Ctrl-C or SIGTERM, so loops can finish cleanly."""
    stopped = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopped
        stopped = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: stopped
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------- commands


def cmd_init_db(settings: Settings, args: argparse.Namespace) -> int:
    """Create the database if needed and apply the packaged DDL; CliError if there is none.

    The DDL is looked for first, so an install without it changes nothing on the server.
    """
    try:
        sql_files()
    except SchemaFilesMissing as exc:
        raise CliError(str(exc)) from exc
    _check_postgres(settings, admin=True)
    created = ensure_database(settings.postgres)
    with pg_connect(settings.postgres) as conn:
        applied = apply_schema(conn)
    state = "created" if created else "already existed"
    _out(f"database {settings.postgres.dbname!r} {state}")
    _out(f"applied (idempotent): {', '.join(applied)}")
    return 0


def cmd_init_cache(settings: Settings, args: argparse.Namespace) -> int:
    if args.all:
        cmd_init_db(settings, args)
    else:
        _check_postgres(settings)
    client = _check_redis(settings)
    cache = LookupCache(client, _keys(settings), settings.pipeline.lookup_ttl_seconds)
    with pg_connect(settings.postgres) as conn:
        require_schema(conn)
        info = cache.load_snapshot(conn)
    for table, rows in info.rows.items():
        _out(f"{table:<12} {rows:>8,} rows")
    _out(f"lookup snapshot loaded under {settings.redis.key_prefix}:lookup:* in "
         f"{info.seconds:.2f} s (TTL {settings.pipeline.lookup_ttl_seconds:,} s)")
    return 0


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    _check_postgres(settings)
    client = _check_redis(settings)
    with pg_connect(settings.postgres) as conn:
        require_schema(conn)
        refs = generator.References.load(conn)
    keys = _keys(settings)
    max_depth = settings.pipeline.max_queue_depth
    batch_size = args.batch_size or settings.pipeline.batch_size
    with tqdm(total=args.count, desc="push", unit="order", file=sys.stderr,
              disable=not _tty()) as bar:
        def on_wait(depth: int) -> None:
            tqdm.write(f"queue depth {depth:,} over MAX_QUEUE_DEPTH={max_depth:,}, waiting…",
                       file=sys.stderr)

        summary = generator.generate(
            OrderQueue(client, keys, settings.pipeline.claim_timeout_seconds),
            Backpressure(client, keys, max_depth), refs, args.count,
            batch_size=batch_size, duplicates=args.duplicates, invalid=args.invalid,
            burst=args.burst, seed=args.seed, on_progress=bar.update, on_wait=on_wait)
    _out(f"pushed {summary.pushed:,} orders onto {keys.ingestion} in {summary.batches:,} "
         f"batches of up to {batch_size:,}")
    _out(f"  unique valid {summary.unique_valid:,}, duplicates {summary.duplicates:,}, "
         f"invalid {summary.invalid:,}")
    _out(f"  {summary.seconds:.2f} s, {summary.rate:,.0f} orders/s"
         f" (waited {summary.backpressure_seconds:.1f} s for backpressure)")
    return 0


def cmd_process(settings: Settings, args: argparse.Namespace) -> int:
    """Drain the queue into staging (`--follow`: stage as orders arrive until SIGTERM/Ctrl-C)."""
    if args.follow and args.iterations is not None:
        args.parser.error("--iterations and --follow exclude each other")
    _check_postgres(settings, pooled=True)
    client = _check_redis(settings)
    _require_schema(settings)
    workers = args.workers or settings.pipeline.worker_count
    batch_size = args.batch_size or settings.pipeline.batch_size
    if args.follow:
        return _follow(settings, workers, batch_size, args.grace)
    depth = OrderQueue(client, _keys(settings)).depth()
    with tqdm(total=depth, desc="stage", unit="order", file=sys.stderr,
              disable=not _tty()) as bar:
        stats = pipeline.stage_queue(settings, workers=workers, batch_size=batch_size,
                                     max_batches=args.iterations,
                                     on_batch=lambda report: bar.update(report.claimed))
    _out(f"staged with {workers} worker(s), batch size {batch_size:,}: "
         f"{stats.batches:,} batches ({stats.reclaimed_batches:,} reclaimed)")
    _out(f"  claimed {stats.claimed:,}, duplicates {stats.duplicates:,}, rejected "
         f"{stats.rejected:,}, staged {stats.staged:,}")
    _out(f"  {stats.seconds:.2f} s, {stats.rows_per_second:,.0f} rows/s")
    if stats.staged:
        _out(f"run `{PROG} promote` to move the staged rows into orders")
    return 0


def _follow(settings: Settings, workers: int, batch_size: int, grace: float) -> int:
    """`process --follow`: SIGTERM and SIGINT request the stop; one summary line at the end."""
    stop = StopRequest(grace)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.request()

    def log_batch(report: BatchReport) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {report.line()}", file=sys.stderr,
              flush=True)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"following {settings.redis.key_prefix}:ingestion with {workers} worker(s), batch "
          f"size {batch_size:,}; SIGTERM or Ctrl-C stops (grace {grace:g} s)", file=sys.stderr,
          flush=True)
    try:
        stats = pipeline.follow_queue(settings, workers=workers, batch_size=batch_size,
                                      stop=stop, on_batch=log_batch)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _out(_follow_summary(stats, settings))
    return 0


def _follow_summary(stats: WorkerStats, settings: Settings) -> str:
    left = (f"; {len(stats.left_in_flight)} batch(es) left leased, reclaimed when their lease "
            f"of CLAIM_TIMEOUT_SECONDS={settings.pipeline.claim_timeout_seconds} s ends: "
            f"{' '.join(stats.left_in_flight)}" if stats.left_in_flight else "")
    return (f"stopped after {stats.seconds:.1f} s with {stats.workers} worker(s): "
            f"{stats.batches:,} batches ({stats.reclaimed_batches:,} reclaimed), claimed "
            f"{stats.claimed:,}, duplicates {stats.duplicates:,}, rejected {stats.rejected:,}, "
            f"staged {stats.staged:,}{left}")


# SQLSTATEs of failing to reach or keep a connection, which `_run` words: connection
# exception, invalid authorization, unknown database, server shut down or not accepting.
_CONNECTION_SQLSTATES = ("08", "28", "3D", "57P")
_OLDER_SCHEMA_SQLSTATES = ("42P01", "42703")  # undefined table, undefined column


@contextmanager
def _server_errors(action: str, again: str) -> Iterator[None]:
    """Turn an error Postgres or Redis reports during `action` into one CliError line.

    The line names the SQLSTATE and message and what to do (`again` is the command to re-run);
    connection failures go on to `_run`, which words them.
    """
    try:
        yield
    except psycopg.DatabaseError as exc:
        state = exc.sqlstate or ""
        if not state or state.startswith(_CONNECTION_SQLSTATES):
            raise
        hint = (f"the database schema is older than this release: run `{PROG} init-db`"
                if state in _OLDER_SCHEMA_SQLSTATES else f"fix the cause, then run `{again}`")
        raise CliError(f"{action} failed ({error_text(exc)}); the failed step committed "
                       f"nothing; {hint}") from exc
    except redis.ResponseError as exc:
        raise CliError(f"{action} failed: Redis refused a command ({exc}); fix the cause, "
                       f"then run `{again}`") from exc


def cmd_promote(settings: Settings, args: argparse.Namespace) -> int:
    """Promote staged batches; one warning line on stderr per batch quarantined as poison."""
    _check_postgres(settings, pooled=True)
    _check_redis(settings)
    _require_schema(settings)
    with _server_errors("promotion", f"{PROG} promote"):
        result = pipeline.promote_staged(settings)
    _out(f"promoted {len(result.promoted_batches):,} batches: inserted "
         f"{result.inserted_rows:,} rows into orders, {result.conflicts:,} conflicts "
         f"(already there), {len(result.lost_batches):,} lost batches requeued, "
         f"{len(result.quarantined):,} batches quarantined in {result.seconds:.2f} s")
    for batch in result.quarantined:
        print(f"{PROG}: warning: batch {batch.batch_id} quarantined with {batch.orders:,} "
              f"orders ({batch.payloads:,} raw payloads kept): {batch.error}; fix the cause, "
              f"then run `{PROG} readmit {batch.batch_id}`", file=sys.stderr)
    return 0


def cmd_readmit(settings: Settings, args: argparse.Namespace) -> int:
    """Re-admit quarantined batches (named, or `--all`); `--dry-run` only lists them.

    One error line if a named batch is not quarantined, or if a batch cannot be re-admitted
    because no copy of its raw payloads is left.
    """
    if bool(args.batch_ids) == args.all:
        args.parser.error("name the batches to re-admit, or pass --all (not both)")
    _check_postgres(settings, pooled=True)
    _check_redis(settings)
    _require_schema(settings)
    batch_ids = None if args.all else args.batch_ids
    unrecoverable: list[QuarantinedBatch] = []
    with _server_errors("re-admission", f"{PROG} readmit"):
        if args.dry_run:
            batches = pipeline.list_quarantined(settings, batch_ids)
        else:
            readmission = pipeline.readmit_quarantined(settings, batch_ids)
            batches, unrecoverable = readmission.readmitted, readmission.unrecoverable
    verb = "would re-admit" if args.dry_run else "re-admitted"
    for batch in batches:
        at = f"{batch.quarantined_at:%Y-%m-%d %H:%M:%S %Z}" if batch.quarantined_at else "-"
        _out(f"{verb} batch {batch.batch_id}: {batch.orders:,} orders, {batch.payloads:,} raw "
             f"payloads kept, quarantined {at}: {batch.error}")
    orders = sum(batch.orders for batch in batches)
    if args.dry_run:
        _out(f"{len(batches):,} quarantined batches ({orders:,} orders); run without "
             "--dry-run to re-admit them")
    elif batches:
        _out(f"re-admitted {len(batches):,} batches ({orders:,} orders) under their own ids: "
             f"run `{PROG} process`, then `{PROG} promote` (under Dagster their completion "
             "signal starts that run); a batch still poison is quarantined again")
    if unrecoverable:
        raise CliError(f"{len(unrecoverable):,} batches cannot be re-admitted, no copy of "
                       f"their raw payloads is left (Redis lost them before quarantine): "
                       f"{' '.join(b.batch_id for b in unrecoverable)}; push those orders "
                       "again from their source")
    if not batches:
        _out("no quarantined batches")
    return 0


def cmd_refresh(settings: Settings, args: argparse.Namespace) -> int:
    _check_postgres(settings)
    _require_schema(settings)
    for view, seconds in pipeline.refresh_all_views(settings).items():
        _out(f"{view:<28} refreshed in {seconds:.3f} s")
    return 0


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    _check_postgres(settings)
    _check_redis(settings)
    if args.json:
        _out(json.dumps(collect_stats(settings), default=str))
        return 0
    if not args.watch:
        _out(render_stats(collect_stats(settings)))
        return 0
    previous: tuple[float, int] | None = None
    try:
        while True:
            stats = collect_stats(settings)
            now = time.monotonic()
            throughput = throughput_line(stats, previous, now)
            previous = (now, stats["orders_rows"])
            print(f"{CLEAR_SCREEN}{render_stats(stats)}\n\n{throughput}  "
                  f"(every {args.interval:g} s, Ctrl-C to stop)", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def run_benchmark_command(argv: list[str]) -> int:
    """`orders-pipeline benchmark ARGS`: `orders-pipeline-benchmark ARGS`, from the separate
    `benchmarks` package (one error line if it is not installed)."""
    try:
        from benchmarks.cli import main as benchmark_main  # the only import of benchmarks
    except ImportError as exc:
        if exc.name not in ("benchmarks", "benchmarks.cli"):
            raise
        print(f"{PROG}: error: the benchmarks package is not installed; install the project "
              "from its source tree (`pip install -e .`) to run `benchmark`", file=sys.stderr)
        return 1
    return benchmark_main(argv, prog=f"{PROG} benchmark")


def cmd_listen(settings: Settings, args: argparse.Namespace) -> int:
    """Bridge published signals into the stream until Ctrl-C/SIGTERM.

    Each malformed signal is refused with one warning line on stderr and counted in
    `{P}:counters` field `signals_refused`.
    """
    client = _check_redis(settings)
    keys = _keys(settings)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    print(f"bridging {keys.signals_channel} into {keys.signals_stream}; Ctrl-C to stop",
          file=sys.stderr, flush=True)
    with _stop_on_signals() as should_stop:
        bridged = CompletionSignals(client, keys).bridge_published(should_stop)
    refused = int(client.hget(keys.counters, REFUSED_COUNTER) or 0)
    _out(f"bridged {bridged:,} signals into {keys.signals_stream}; {refused:,} malformed "
         f"signals refused so far ({keys.counters} {REFUSED_COUNTER})")
    return 0


def _clear_queue(client: redis.Redis, keys: RedisKeys) -> dict[str, int]:
    """Queue state: pending and in-flight orders, counters, rate window, signal log."""
    prefix = glob_escape(keys.prefix)
    named = {name: getattr(keys, name) for name in
             ("ingestion", "dequeued", "queue_marks", "inflight", "owners", "staged",
              "counters", "order_window", "signals_stream")}
    removed = {key: int(client.unlink(key)) for key in named.values()}
    removed[f"{keys.prefix}:batch:*"] = unlink_matching(client, f"{prefix}:batch:*")
    removed[f"{keys.prefix}:signal:*"] = unlink_matching(client, f"{prefix}:signal:*")
    return removed


def cmd_clear(settings: Settings, args: argparse.Namespace) -> int:
    if not (args.cache or args.dedup or args.queue or args.all):
        args.parser.print_help(sys.stderr)
        return 2
    client = _check_redis(settings)
    keys = _keys(settings)
    if args.cache or args.all:
        cache = LookupCache(client, keys, settings.pipeline.lookup_ttl_seconds)
        present = int(client.exists(*(keys.lookup(t.name) for t in LOOKUP_TABLES),
                                    keys.lookup_meta))
        cache.clear()
        _out(f"lookup cache: removed {present} keys ({keys.prefix}:lookup:*)")
    if args.dedup or args.all:
        removed = DedupWindow(client, keys, settings.pipeline.dedup_window_seconds).clear()
        _out(f"dedup window: removed {removed:,} keys ({keys.dedup_id_prefix}*, "
             f"{keys.dedup_count_prefix}*)")
    if args.queue or args.all:
        for key, count in _clear_queue(client, keys).items():
            _out(f"queue: removed {count:,} x {key}")
    return 0


# ---------------------------------------------------------------------------- parser


def _bounded(convert: Callable[[str], float], what: str, minimum: float, *,
             exclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a number of the given kind, at least (or above) `minimum`."""
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < minimum or (exclusive and value == minimum):
            bound = "greater than" if exclusive else "at least"
            raise argparse.ArgumentTypeError(f"must be {bound} {minimum:g}, got {text}")
        return value
    return parse


def _within(bound: Bound) -> Callable[[str], int]:
    """An argparse type: an integer in `bound`, the range its env var and Dagster config share."""
    def parse(text: str) -> int:
        refusal = argparse.ArgumentTypeError(f"must be an integer from {bound.span()}, "
                                             f"got {text!r}")
        try:
            value = int(text)
        except ValueError:
            raise refusal from None
        if not bound.minimum <= value <= bound.maximum:
            raise refusal
        return value
    return parse


_positive_int = _bounded(int, "an integer", 1)
_positive_float = _bounded(float, "a number", 0, exclusive=True)
_workers = _within(WORKERS)
_batch_size = _within(BATCH_SIZE)
_batches_per_worker = _within(BATCHES_PER_WORKER)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: the problem and where help is."""

    def error(self, message: str) -> NoReturn:
        """Print `PROG [COMMAND]: error: MESSAGE (see ... --help)` on stderr and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Orders pipeline: Redis queue → Polars → Postgres staging → orders → "
                    "views. Configuration comes from environment variables and `.env` "
                    "(see .env.example).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[Settings, argparse.Namespace], int],
                help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    command("init-db", cmd_init_db,
            "Create the database if needed and apply the DDL shipped in the package "
            "(orders_pipeline/sql/*.sql, in file-name order; idempotent).")

    sub = command("init-cache", cmd_init_cache,
                  "Snapshot products, currencies and zip codes from Postgres into Redis.")
    sub.add_argument("--all", action="store_true", help="run init-db first")

    sub = command("generate", cmd_generate,
                  "Push realistic orders onto the ingestion queue, respecting backpressure.")
    sub.add_argument("--count", type=_positive_int, required=True, metavar="N",
                     help="number of payloads to push (duplicates and invalid included)")
    sub.add_argument("--duplicates", type=_fraction, default=0.0, metavar="F",
                     help="fraction of payloads that repeat an earlier order (default 0)")
    sub.add_argument("--invalid", type=_fraction, default=0.0, metavar="F",
                     help="fraction of payloads that must be rejected (default 0)")
    sub.add_argument("--burst", action="store_true",
                     help="stamp every order with the current time instead of spreading "
                          "them over the last hour")
    sub.add_argument("--batch-size", type=_batch_size, metavar="B",
                     help=f"orders per pushed batch and signal, {BATCH_SIZE.span()} "
                          f"(default BATCH_SIZE)")
    sub.add_argument("--seed", type=int, metavar="S",
                     help="random seed, for reproducible orders")

    sub = command("process", cmd_process,
                  "Drain the queue into orders_staging with N worker processes "
                  "(does not promote; run `promote` next); with --follow, keep staging "
                  "orders as they arrive until stopped.")
    sub.add_argument("--workers", type=_workers, metavar="N",
                     help=f"worker processes, {WORKERS.span()} (default WORKER_COUNT; "
                          f"1 = in this process)")
    sub.add_argument("--batch-size", type=_batch_size, metavar="B",
                     help=f"orders claimed per batch, {BATCH_SIZE.span()} (default BATCH_SIZE)")
    sub.add_argument("--iterations", type=_batches_per_worker, metavar="K",
                     help=f"stop each worker after K batches, {BATCHES_PER_WORKER.span()} "
                          f"(default: until the queue is empty)")
    sub.add_argument("--follow", action="store_true",
                     help="keep running: stage batches as they arrive until SIGTERM or "
                          "Ctrl-C, then finish the batch in hand and print a summary")
    sub.add_argument("--grace", type=_positive_float, default=10.0, metavar="SECONDS",
                     help="with --follow: how long a stopping worker may take to finish its "
                          "batch; past it the batch stays leased and is reclaimed when its "
                          "lease ends (default 10)")

    command("promote", cmd_promote,
            "Move staged batches into orders (idempotent) and release them from Redis; a "
            "poison batch (one retrying cannot promote) is quarantined, the rest promoted.")
    sub = command("readmit", cmd_readmit,
                  "Re-admit quarantined (poison) batches after their cause was fixed: each is "
                  "queued again under its own batch id, its raw payloads restored from "
                  "Postgres if Redis lost them; one still poison is quarantined again.")
    sub.add_argument("batch_ids", nargs="*", metavar="BATCH_ID",
                     help="batches to re-admit (`--all --dry-run` lists them)")
    sub.add_argument("--all", action="store_true", help="every quarantined batch")
    sub.add_argument("--dry-run", action="store_true",
                     help="only list the batches that would be re-admitted")
    command("refresh", cmd_refresh,
            "Refresh the materialized views concurrently (readers are not blocked).")

    sub = command("stats", cmd_stats, "Show queue, Redis, Postgres and view numbers.")
    sub.add_argument("--watch", action="store_true",
                     help="redraw every --interval seconds until Ctrl-C, with throughput")
    sub.add_argument("--interval", type=_positive_float, default=2.0, metavar="S",
                     help="seconds between redraws with --watch (default 2)")
    sub.add_argument("--json", action="store_true",
                     help="print one JSON object instead of the table")

    # Parsed by the benchmarks package (see `main`); listed here for `--help`.
    sub = commands.add_parser("benchmark", add_help=False,
                              help="Run the pipeline end to end beside the raw limit of each "
                                   "stage (`orders-pipeline benchmark --help`).")
    sub.add_argument("benchmark_args", nargs=argparse.REMAINDER)

    command("listen", cmd_listen,
            "Bridge completion signals that upstream systems only PUBLISH into the durable "
            "signal stream, until Ctrl-C.")

    sub = command("clear", cmd_clear,
                  "Delete Redis state of the configured key prefix only (nothing in "
                  "Postgres).")
    sub.add_argument("--cache", action="store_true", help="the lookup snapshot")
    sub.add_argument("--dedup", action="store_true", help="the dedup window")
    sub.add_argument("--queue", action="store_true",
                     help="queued, in-flight and staged batches, counters, rate window, "
                          "signal log (orders still queued are LOST)")
    sub.add_argument("--all", action="store_true", help="all of the above")
    return parser


# ---------------------------------------------------------------------------- entry point


def _run(args: argparse.Namespace) -> int:
    load_env_file()
    settings = Settings.from_env()
    try:
        return args.handler(settings, args)
    except psycopg.OperationalError as exc:
        raise CliError(_postgres_error(exc, settings.postgres,
                                       _endpoint(settings.postgres))) from exc
    except PoolTimeout as exc:
        endpoint = _endpoint(settings.postgres, via_pgbouncer=settings.postgres.use_pgbouncer)
        raise CliError(f"no connection from the pool to {endpoint} ({exc})") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise CliError(_redis_error(exc, settings)) from exc
    except SchemaMissing as exc:
        raise CliError(f"database {settings.postgres.dbname!r} is not initialised: {exc}"
                       ) from exc


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (argparse exits 2 on bad usage)."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["benchmark"]:
        return run_benchmark_command(arguments[1:])
    args = build_parser().parse_args(arguments)
    try:
        return _run(args)
    except (CliError, LookupCacheMissing, pipeline.WorkerFailed,
            SchemaFilesMissing) as exc:
        message, code = str(exc), 1
    except ConfigError as exc:
        message, code = f"bad configuration: {exc}", 1
    except ValueError as exc:
        message, code = str(exc), 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    finally:
        close_all()
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code
