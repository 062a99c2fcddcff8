"""`orders-pipeline`: run and inspect the pipeline from a shell (a click group, rich output).

`benchmark` is handed, arguments untouched, to the separate `benchmarks` package
(`orders-pipeline-benchmark`). Every other command reads its configuration with
`Settings.from_env()` (environment and `.env`), checks that the servers it needs answer before
doing anything, and turns the failures people actually meet (server down, wrong password,
schema or cache not initialised, bad config) into one line on stderr instead of a traceback:

    orders-pipeline: error: WHAT IS WRONG[; WHAT FIXES IT]              exit 1 (130: Ctrl-C)
    orders-pipeline COMMAND: error: BAD USAGE (see `orders-pipeline COMMAND --help`)   exit 2

`main(argv)` runs the group and returns the exit code (the console script exits with it).
"""

import contextlib
import functools
import json
import logging
import math
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click
import psycopg
import redis
from psycopg_pool import PoolTimeout
from rich.console import Console
from rich.live import Live
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from orders_pipeline import backup, fanout, generator, pipeline
from orders_pipeline.connections import close_all, pg_connect, redis_client
from orders_pipeline.postgres_patterns.partitions import (
    MAX_KEEP_MONTHS,
    RetentionRefused,
    horizon_keeping,
    parse_month,
)
from orders_pipeline.postgres_patterns.promotion import QuarantinedBatch, error_text
from orders_pipeline.postgres_patterns.redrive import RedriveRefused, RejectFilter
from orders_pipeline.postgres_patterns.replay import ReplayRefused, Window
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
from orders_pipeline.redis_patterns.promoted_stream import PromotedEntry
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
from orders_pipeline.worker import BatchReport, StopRequest

PROG = "orders-pipeline"
PREFLIGHT_TIMEOUT_SECONDS = 3
# SQLSTATEs of failing to reach or keep a connection, which `_with_settings` words:
# connection exception, invalid authorization, unknown database, server shut down.
_CONNECTION_SQLSTATES = ("08", "28", "3D", "57P")
_OLDER_SCHEMA_SQLSTATES = ("42P01", "42703")  # undefined table, undefined column


_LINE_BREAK = re.compile(r"[ \t]*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+[ \t]*")


class CliError(click.ClickException):
    """An expected failure, already phrased for the user: `orders-pipeline: error: MESSAGE`."""

    def format_message(self) -> str:
        """The message on one line: each line break (with the blanks around it) becomes one
        space; other spacing is kept, e.g. inside a quoted value such as '  '."""
        return _LINE_BREAK.sub(" ", self.message.strip())

    def show(self, file: IO[Any] | None = None) -> None:
        """Print the one line on `file` (default stderr)."""
        click.echo(f"{PROG}: error: {self.format_message()}", file=file, err=True)


# ---------------------------------------------------------------------------- option types


def _within(bound: Bound) -> click.IntRange:
    """An integer option in `bound`, the range its env var and Dagster config share."""
    return click.IntRange(bound.minimum, bound.maximum)


class _FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (nan compares false, so it passes a range)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


_POSITIVE = _FiniteRange(min=0, min_open=True)
_FRACTION = _FiniteRange(min=0, max=1, max_open=True)


class _Instant(click.ParamType):
    """An ISO 8601 instant (`datetime.fromisoformat`); one without a UTC offset is refused by
    the re-drive itself (`RejectFilter.check`)."""
    name = "instant"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 instant", param, ctx)


class _Month(click.ParamType):
    """A UTC month as YYYY-MM; the first day of it."""
    name = "month"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> date:
        if isinstance(value, date):
            return value
        try:
            return parse_month(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _batch_size_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--batch-size", type=_within(BATCH_SIZE), metavar="B",
                        help=f"{what} (default BATCH_SIZE)")


# ---------------------------------------------------------------------------- the group


class _Commands(click.Group):
    """The `orders-pipeline` group: commands listed in workflow order, and a `main` that
    returns the exit code (0, 1 failure, 2 bad usage, 130 interrupted) after one error line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             **extra: Any) -> int:
        try:
            code = super().main(args, prog_name or PROG, standalone_mode=False, **extra)
        except click.UsageError as exc:  # one line instead of click's usage block
            where = exc.ctx.command_path if exc.ctx else PROG
            click.echo(f"{where}: error: {exc.format_message()} (see `{where} --help`)",
                       err=True)
            return exc.exit_code
        except click.ClickException as exc:
            exc.show()
            return exc.exit_code
        except click.Abort:  # Ctrl-C, except in `listen` and `process --follow`
            CliError("interrupted").show()
            return 130
        return code if isinstance(code, int) else 0


@click.group(PROG, cls=_Commands, no_args_is_help=False,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                               "max_content_width": 100})
def main() -> None:
    """Orders pipeline: Redis queue → Polars → Postgres staging → orders → views.
    Configuration comes from environment variables and `.env` (see .env.example)."""
    # Warnings of the pipeline's loggers (refused signals, stopping workers) on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")


def _with_settings(command: Callable[..., None]) -> Callable[..., None]:
    """A command body `command(settings, **options)` as a click callback `(**options)`.

    The settings come from `Settings.from_env()` after `.env` is read. Every expected failure
    leaves as one CliError line: `bad configuration: ...` for a ConfigError, the server and
    what went wrong (never a password) for an unreachable or refusing Postgres, PgBouncer or
    Redis, `init-db` for a missing schema. The connection pools are closed whatever happened.
    """
    @functools.wraps(command)
    def run(**options: Any) -> None:
        try:
            load_env_file()
            settings = Settings.from_env()
            pg = settings.postgres
            try:
                command(settings, **options)
            except psycopg.OperationalError as exc:
                raise CliError(_postgres_error(exc, pg, _endpoint(pg))) from exc
            except PoolTimeout as exc:
                endpoint = _endpoint(pg, via_pgbouncer=pg.use_pgbouncer)
                raise CliError(f"no connection from the pool to {endpoint} ({exc})") from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise CliError(_redis_error(exc, settings)) from exc
            except SchemaMissing as exc:
                raise CliError(f"database {pg.dbname!r} is not initialised: {exc}") from exc
        except ConfigError as exc:
            raise CliError(f"bad configuration: {exc}") from exc
        except (LookupCacheMissing, pipeline.WorkerFailed, SchemaFilesMissing,
                ValueError) as exc:
            raise CliError(str(exc)) from exc
        finally:
            close_all()
    return run


# ---------------------------------------------------------------------------- helpers


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


def _check_postgres(settings: Settings, *, admin: bool = False, pooled: bool = False,
                    schema: bool = False) -> None:
    """Fail within seconds when Postgres (or, `pooled`, PgBouncer too) is down, before any
    pool waits 15 s; `admin`: reach the `postgres` database instead of ours; `schema`: and
    SchemaMissing unless ours has the pipeline tables."""
    pg = settings.postgres
    for via_pgbouncer in [False, True] if pooled and pg.use_pgbouncer else [False]:
        params = {**pg.conninfo(via_pgbouncer=via_pgbouncer),
                  "connect_timeout": PREFLIGHT_TIMEOUT_SECONDS,
                  **({"dbname": "postgres"} if admin else {})}
        try:
            with psycopg.connect(**params) as conn:
                if schema and not via_pgbouncer:
                    require_schema(conn)
        except psycopg.OperationalError as exc:
            raise CliError(_postgres_error(exc, pg, _endpoint(pg, via_pgbouncer=via_pgbouncer))
                           ) from exc


def _check_redis(settings: Settings) -> redis.Redis:
    client = redis_client(settings.redis)
    client.ping()
    return client


def _keys(settings: Settings) -> RedisKeys:
    return RedisKeys.of(settings.redis)


@contextlib.contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar of `total` items on stderr, drawn only when stderr is a terminal;
    yields `advance(items)`. Lines written to stderr meanwhile appear above the bar."""
    console = Console(stderr=True)
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal,
                  redirect_stdout=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda items: bar.advance(task, items)


@contextlib.contextmanager
def _stop_on_signals(on_signal: Callable[[], None]) -> Iterator[None]:
    """Call `on_signal` on Ctrl-C or SIGTERM instead of dying, so loops can finish cleanly."""
    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _server_errors(action: str, again: str) -> Iterator[None]:
    """Turn an error Postgres or Redis reports during `action` into one CliError line.

    The line names the SQLSTATE and message and what to do (`again` is the command to re-run);
    connection failures go on to `_with_settings`, which words them.
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


# ---------------------------------------------------------------------------- commands


def _init_db(settings: Settings) -> None:
    """Create the database and apply the packaged DDL (idempotent).

    The database is created only if missing; the DDL is orders_pipeline/sql/*.sql, shipped in
    the package, applied in file-name order.
    \f
    SchemaFilesMissing if the install has no DDL: looked for first, so the server is untouched.
    """
    sql_files()
    _check_postgres(settings, admin=True)
    created = ensure_database(settings.postgres)
    with pg_connect(settings.postgres) as conn:
        applied = apply_schema(conn)
    click.echo(f"database {settings.postgres.dbname!r} "
               f"{'created' if created else 'already existed'}")
    click.echo(f"applied (idempotent): {', '.join(applied)}")


main.command("init-db")(_with_settings(_init_db))  # also run by `init-cache --all`


@main.command("init-cache")
@click.option("--all", "with_db", is_flag=True, help="run init-db first")
@_with_settings
def cmd_init_cache(settings: Settings, with_db: bool) -> None:
    """Load the lookup snapshot into Redis.

    Products, currencies and zip codes, read from Postgres."""
    if with_db:
        _init_db(settings)
    else:
        _check_postgres(settings, schema=True)
    client = _check_redis(settings)
    ttl = settings.pipeline.lookup_ttl_seconds
    with pg_connect(settings.postgres) as conn:
        info = LookupCache(client, _keys(settings), ttl).load_snapshot(conn)
    for table, rows in info.rows.items():
        click.echo(f"{table:<12} {rows:>8,} rows")
    click.echo(f"lookup snapshot loaded under {settings.redis.key_prefix}:lookup:* in "
               f"{info.seconds:.2f} s (TTL {ttl:,} s)")


@main.command("generate")
@click.option("--count", type=click.IntRange(min=1), required=True, metavar="N",
              help="number of payloads to push (duplicates and invalid included)")
@click.option("--duplicates", type=_FRACTION, default=0.0, metavar="F",
              help="fraction of payloads that repeat an earlier order")
@click.option("--invalid", type=_FRACTION, default=0.0, metavar="F",
              help="fraction of payloads that must be rejected")
@click.option("--burst", is_flag=True,
              help="stamp every order with the current time instead of spreading them over "
                   "the last hour")
@_batch_size_option("orders per pushed batch and signal")
@click.option("--seed", type=int, metavar="S", help="random seed, for reproducible orders")
@_with_settings
def cmd_generate(settings: Settings, count: int, duplicates: float, invalid: float,
                 burst: bool, batch_size: int | None, seed: int | None) -> None:
    """Push realistic orders onto the ingestion queue.

    In batches, with one completion signal each, waiting while the queue is over
    MAX_QUEUE_DEPTH (backpressure)."""
    _check_postgres(settings, schema=True)
    client = _check_redis(settings)
    with pg_connect(settings.postgres) as conn:
        refs = generator.References.load(conn)
    keys, max_depth = _keys(settings), settings.pipeline.max_queue_depth
    batch_size = batch_size or settings.pipeline.batch_size
    with _progress("push", count) as advance:
        summary = generator.generate(
            OrderQueue(client, keys, settings.pipeline.claim_timeout_seconds),
            Backpressure(client, keys, max_depth), refs, count, batch_size=batch_size,
            duplicates=duplicates, invalid=invalid, burst=burst, seed=seed,
            on_progress=advance,
            on_wait=lambda depth: click.echo(f"queue depth {depth:,} over MAX_QUEUE_DEPTH="
                                             f"{max_depth:,}, waiting…", err=True))
    click.echo(f"pushed {summary.pushed:,} orders onto {keys.ingestion} in "
               f"{summary.batches:,} batches of up to {batch_size:,}")
    click.echo(f"  unique valid {summary.unique_valid:,}, duplicates {summary.duplicates:,}, "
               f"invalid {summary.invalid:,}")
    click.echo(f"  {summary.seconds:.2f} s, {summary.rate:,.0f} orders/s"
               f" (waited {summary.backpressure_seconds:.1f} s for backpressure)")


@main.command("process")
@click.option("--workers", type=_within(WORKERS), metavar="N",
              help="worker processes (default WORKER_COUNT; 1 = in this process)")
@_batch_size_option("orders claimed per batch")
@click.option("--iterations", type=_within(BATCHES_PER_WORKER), metavar="K",
              help="stop each worker after K batches (default: until the queue is empty)")
@click.option("--follow", is_flag=True,
              help="keep running: stage batches as they arrive until SIGTERM or Ctrl-C, then "
                   "finish the batch in hand and print a summary")
@click.option("--grace", type=_POSITIVE, default=10.0, metavar="SECONDS",
              help="with --follow: how long a stopping worker may take to finish its batch; "
                   "past it the batch stays leased and is reclaimed when its lease ends")
@_with_settings
def cmd_process(settings: Settings, workers: int | None, batch_size: int | None,
                iterations: int | None, follow: bool, grace: float) -> None:
    """Drain the queue into orders_staging.

    With N worker processes; does not promote (run `promote` next). With --follow, keep
    staging orders as they arrive until stopped."""
    if follow and iterations is not None:
        click.get_current_context().fail("--iterations and --follow exclude each other")
    _check_postgres(settings, pooled=True, schema=True)
    client = _check_redis(settings)
    workers = workers or settings.pipeline.worker_count
    batch_size = batch_size or settings.pipeline.batch_size
    if follow:
        _follow(settings, workers, batch_size, grace)
        return
    with _progress("stage", OrderQueue(client, _keys(settings)).depth()) as advance:
        stats = pipeline.stage_queue(settings, workers=workers, batch_size=batch_size,
                                     max_batches=iterations,
                                     on_batch=lambda report: advance(report.claimed))
    click.echo(f"staged with {workers} worker(s), batch size {batch_size:,}: "
               f"{stats.batches:,} batches ({stats.reclaimed_batches:,} reclaimed)")
    click.echo(f"  claimed {stats.claimed:,}, duplicates {stats.duplicates:,}, rejected "
               f"{stats.rejected:,}, staged {stats.staged:,}")
    click.echo(f"  {stats.seconds:.2f} s, {stats.rows_per_second:,.0f} rows/s")
    if stats.staged:
        click.echo(f"run `{PROG} promote` to move the staged rows into orders")


def _follow(settings: Settings, workers: int, batch_size: int, grace: float) -> None:
    """`process --follow`: SIGTERM and SIGINT request the stop; one summary line at the end."""
    stop = StopRequest(grace)

    def log_batch(report: BatchReport) -> None:
        click.echo(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {report.line()}", err=True)

    click.echo(f"following {settings.redis.key_prefix}:ingestion with {workers} worker(s), "
               f"batch size {batch_size:,}; SIGTERM or Ctrl-C stops (grace {grace:g} s)",
               err=True)
    with _stop_on_signals(stop.request):
        stats = pipeline.follow_queue(settings, workers=workers, batch_size=batch_size,
                                      stop=stop, on_batch=log_batch)
    left = (f"; {len(stats.left_in_flight)} batch(es) left leased, reclaimed when their lease "
            f"of CLAIM_TIMEOUT_SECONDS={settings.pipeline.claim_timeout_seconds} s ends: "
            f"{' '.join(stats.left_in_flight)}" if stats.left_in_flight else "")
    click.echo(f"stopped after {stats.seconds:.1f} s with {stats.workers} worker(s): "
               f"{stats.batches:,} batches ({stats.reclaimed_batches:,} reclaimed), claimed "
               f"{stats.claimed:,}, duplicates {stats.duplicates:,}, rejected "
               f"{stats.rejected:,}, staged {stats.staged:,}{left}")


@main.command("promote")
@click.option("--shard", "shards", type=click.IntRange(0, None), multiple=True,
              metavar="S", help="only the batches of queue shard S (repeat for several; "
                                "promoters of different shards run in parallel); default: all")
@_with_settings
def cmd_promote(settings: Settings, shards: tuple[int, ...]) -> None:
    """Move staged batches into orders.

    Idempotent; releases them from Redis. A poison batch (one retrying cannot promote) is
    quarantined, the rest promoted.
    \f
    One warning line on stderr per batch quarantined.
    """
    outside = [s for s in shards if s >= settings.redis.shards]
    if outside:
        raise click.UsageError(f"--shard {outside[0]}: REDIS_SHARDS is "
                               f"{settings.redis.shards}, so shards are 0 to "
                               f"{settings.redis.shards - 1}")
    _check_postgres(settings, pooled=True, schema=True)
    _check_redis(settings)
    with _server_errors("promotion", f"{PROG} promote"):
        result = pipeline.promote_staged(settings, shards=shards or None)
    click.echo(f"promoted {len(result.promoted_batches):,} batches: inserted "
               f"{result.inserted_rows:,} rows into orders, {result.conflicts:,} conflicts "
               f"(already there), {len(result.lost_batches):,} lost batches requeued, "
               f"{len(result.quarantined):,} batches quarantined in {result.seconds:.2f} s")
    if result.entries_published:
        click.echo(f"  published {result.entries_published:,} entries to "
                   f"{_keys(settings).promoted} for its consumer groups")
    for batch in result.quarantined:
        click.echo(f"{PROG}: warning: batch {batch.batch_id} quarantined with "
                   f"{batch.orders:,} orders ({batch.payloads:,} raw payloads kept): "
                   f"{batch.error}; fix the cause, then run `{PROG} readmit {batch.batch_id}`",
                   err=True)


@main.command("readmit")
@click.argument("batch_ids", nargs=-1, metavar="[BATCH_ID]...")
@click.option("--all", "every", is_flag=True, help="every quarantined batch")
@click.option("--dry-run", is_flag=True, help="only list the batches that would be re-admitted")
@_with_settings
def cmd_readmit(settings: Settings, batch_ids: tuple[str, ...], every: bool,
                dry_run: bool) -> None:
    """Re-admit quarantined (poison) batches.

    After their cause was fixed, each BATCH_ID (or --all) is queued again under its own batch
    id, its raw payloads restored from Postgres if Redis lost them; one still poison is
    quarantined again. `--all --dry-run` lists them.
    \f
    One error line if a named batch is not quarantined, or if a batch cannot be re-admitted
    because no copy of its raw payloads is left.
    """
    if bool(batch_ids) == every:
        click.get_current_context().fail(
            "name the batches to re-admit, or pass --all (not both)")
    _check_postgres(settings, pooled=True, schema=True)
    _check_redis(settings)
    chosen = None if every else batch_ids
    unrecoverable: list[QuarantinedBatch] = []
    with _server_errors("re-admission", f"{PROG} readmit"):
        if dry_run:
            batches = pipeline.list_quarantined(settings, chosen)
        else:
            readmission = pipeline.readmit_quarantined(settings, chosen)
            batches, unrecoverable = readmission.readmitted, readmission.unrecoverable
    verb = "would re-admit" if dry_run else "re-admitted"
    for batch in batches:
        at = f"{batch.quarantined_at:%Y-%m-%d %H:%M:%S %Z}" if batch.quarantined_at else "-"
        click.echo(f"{verb} batch {batch.batch_id}: {batch.orders:,} orders, "
                   f"{batch.payloads:,} raw payloads kept, quarantined {at}: {batch.error}")
    orders = sum(batch.orders for batch in batches)
    if dry_run:
        click.echo(f"{len(batches):,} quarantined batches ({orders:,} orders); run without "
                   "--dry-run to re-admit them")
    elif batches:
        click.echo(f"re-admitted {len(batches):,} batches ({orders:,} orders) under their own "
                   f"ids: run `{PROG} process`, then `{PROG} promote` (under Dagster their "
                   "completion signal starts that run); a batch still poison is quarantined "
                   "again")
    if unrecoverable:
        raise CliError(f"{len(unrecoverable):,} batches cannot be re-admitted, no copy of "
                       f"their raw payloads is left (Redis lost them before quarantine): "
                       f"{' '.join(b.batch_id for b in unrecoverable)}; push those orders "
                       "again from their source")
    if not batches:
        click.echo("no quarantined batches")


# Outcomes of re-driven rows (view `redrive_outcomes`), in the order `--report` lists them.
_REDRIVE_OUTCOMES = ("promoted", "rejected", "duplicate", "quarantined", "queued", "pending")


@main.command("requeue-rejected")
@click.option("--reason", metavar="REGEX",
              help="Postgres regular expression found in the reason (case-sensitive), e.g. "
                   "'^unknown product_id'")
@click.option("--since", type=_Instant(), metavar="INSTANT",
              help="rejected at or after this ISO 8601 instant with offset")
@click.option("--until", type=_Instant(), metavar="INSTANT",
              help="rejected before this ISO 8601 instant with offset")
@click.option("--order-id", "order_ids", multiple=True, metavar="ID",
              help="only rows of this order id (repeatable)")
@click.option("--batch-id", "batch_ids", multiple=True, metavar="ID",
              help="only rows of this batch (repeatable)")
@click.option("--unknown-references", is_flag=True,
              help="rejected for an unknown product, currency or zip code between the first "
                   "lookup change the last snapshot reload picked up and that reload")
@click.option("--all", "everything", is_flag=True,
              help="every rejected row not re-driven yet (no filter)")
@click.option("--dry-run", is_flag=True, help="only count, by reason, what would be re-driven")
@click.option("--report", metavar="REDRIVE_ID",
              help="show what became of the rows of an earlier re-drive (takes no other "
                   "option)")
@_with_settings
def cmd_requeue_rejected(settings: Settings, reason: str | None, since: datetime | None,
                         until: datetime | None, order_ids: tuple[str, ...],
                         batch_ids: tuple[str, ...], unknown_references: bool,
                         everything: bool, dry_run: bool, report: str | None) -> None:
    """Send rejected orders through the pipeline again.

    The rows of orders_rejected that every given filter selects (--all: every row) go back,
    byte for byte, under batch ids of their own, each row at most once ever; an order still
    bad is rejected again with its new reason. A re-drive a crash interrupted is finished
    first. --report REDRIVE_ID shows what became of a re-drive's rows.
    \f
    Usage errors (exit 2, one line): no filter without --all, a time without UTC offset, a
    reason pattern Postgres cannot compile, --unknown-references before the lookup snapshot
    picked up any change, --report with another option. An unknown REDRIVE_ID: one error line.
    """
    ctx = click.get_current_context()
    if report is not None:
        if any(value not in (None, False, ()) for name, value in ctx.params.items()
               if name != "report"):
            ctx.fail("--report shows an earlier re-drive and takes no other option")
        _check_postgres(settings, pooled=True, schema=True)
        _show_redrive_report(settings, report)
        return
    selection = RejectFilter(reason=reason, since=since, until=until, order_ids=order_ids,
                             batch_ids=batch_ids, unknown_references=unknown_references,
                             everything=everything)
    _check_postgres(settings, pooled=True, schema=True)
    _check_redis(settings)
    with _server_errors("re-drive", f"{PROG} requeue-rejected"):
        try:
            result = pipeline.redrive_rejected(settings, selection, dry_run=dry_run)
        except RedriveRefused as exc:
            ctx.fail(str(exc))
        except psycopg.errors.InvalidRegularExpression as exc:
            ctx.fail(f"--reason: {exc.diag.message_primary}")
    _show_redrive(result)


def _show_redrive(result: pipeline.Redrive) -> None:
    """What `requeue-rejected` selected, by reason, and what to run next (stdout)."""
    resolved = result.selection
    if resolved.unknown_references:  # resolved into a time range
        click.echo(f"unknown references rejected from "
                   f"{resolved.since.astimezone(UTC):%Y-%m-%d %H:%M:%S} to "
                   f"{resolved.until.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC")
    if result.resumed:
        click.echo(f"finished {len(result.resumed):,} pending batches of an interrupted "
                   "re-drive")
    verb = "would re-drive" if result.dry_run else "re-drove"
    for kind, rows in result.by_reason.items():
        click.echo(f"{verb} {rows:,} {kind}")
    if not result.selected:
        click.echo("no rejected orders match (none re-driven)")
    elif result.dry_run:
        click.echo(f"{result.selected:,} rejected orders would be re-driven; run without "
                   "--dry-run to re-drive them")
    else:
        click.echo(f"re-drove {result.selected:,} rejected orders as {result.redrive_id} in "
                   f"{len(result.batch_ids):,} batches: run `{PROG} process`, then `{PROG} "
                   "promote` (under Dagster their completion signals start that run); "
                   f"`{PROG} requeue-rejected --report {result.redrive_id}` shows what became "
                   "of them")


def _show_redrive_report(settings: Settings, redrive_id: str) -> None:
    """`requeue-rejected --report`: rows by outcome, then the new reasons of those rejected
    again (stdout); CliError for an unknown id."""
    with _server_errors("re-drive report", f"{PROG} requeue-rejected --report {redrive_id}"):
        found = pipeline.redrive_report(settings, redrive_id)
    if found is None:
        raise CliError(f"no re-drive {redrive_id}")
    outcomes = ", ".join(f"{found.outcomes.get(outcome, 0):,} {outcome}"
                         for outcome in _REDRIVE_OUTCOMES)
    click.echo(f"re-drive {redrive_id} of {found.requested_at:%Y-%m-%d %H:%M:%S %Z}: "
               f"{found.selected:,} rows; {outcomes}")
    for kind, rows in found.new_reasons.items():
        click.echo(f"rejected again: {rows:,} {kind}")


@main.command("refresh")
@click.option("--all", "every_month", is_flag=True,
              help="refresh every month view, changed or not (default: the months that changed)")
@_with_settings
def cmd_refresh(settings: Settings, every_month: bool) -> None:
    """Refresh the dashboard views: the month views whose months changed.

    Concurrently: readers are not blocked."""
    _check_postgres(settings, schema=True)
    for view, seconds in pipeline.refresh_all_views(settings, every_month=every_month).items():
        click.echo(f"{view:<28} refreshed in {seconds:.3f} s")


@main.command("retention")
@click.option("--before", "horizon", type=_Month(), metavar="YYYY-MM",
              help="drop every month before this one")
@click.option("--keep-months", type=click.IntRange(1, MAX_KEEP_MONTHS), metavar="N",
              help="keep the current UTC month and the N-1 before it; drop the older ones")
@click.option("--dry-run", is_flag=True, help="report what would be dropped; change nothing")
@_with_settings
def cmd_retention(settings: Settings, horizon: date | None, keep_months: int | None,
                  dry_run: bool) -> None:
    """Drop whole months of orders: their partitions of `orders`, their rollup rows and their
    month views, then their ids (promotion waits only for two short transactions).

    Orders dated before the horizon that arrive later are rejected (reason in
    `orders_rejected`). Give --before YYYY-MM or --keep-months N."""
    if (horizon is None) == (keep_months is None):
        raise CliError("give exactly one of --before YYYY-MM and --keep-months N; e.g. "
                       f"`{PROG} retention --keep-months 36 --dry-run`")
    if horizon is None:
        horizon = horizon_keeping(keep_months or 1)
    _check_postgres(settings, schema=True)
    try:
        result = pipeline.apply_retention(settings, horizon, dry_run=dry_run)
    except RetentionRefused as exc:
        raise CliError(str(exc)) from exc
    verb = "would drop" if dry_run else "dropped"
    click.echo(f"retention before {result.horizon.isoformat()[:7]}: {verb} "
               f"{len(result.partitions)} month partitions ({result.orders:,} orders, "
               f"{result.ids:,} ids) and {len(result.view_slices)} month views")
    for name in result.partitions:
        click.echo(f"  {name}")
    if not dry_run:
        click.echo(f"promotion waited {result.locked_seconds:.2f} s for the drops; the ids "
                   f"took {result.ids_seconds:.2f} s more, beside it")


@main.command("stats")
@click.option("--watch", is_flag=True,
              help="redraw every --interval seconds until Ctrl-C, with throughput")
@click.option("--interval", type=_POSITIVE, default=2.0, metavar="S",
              help="seconds between redraws with --watch")
@click.option("--json", "as_json", is_flag=True,
              help="print one JSON object instead of the table")
@_with_settings
def cmd_stats(settings: Settings, watch: bool, interval: float, as_json: bool) -> None:
    """Show queue, Redis, Postgres and view numbers."""
    _check_postgres(settings)
    _check_redis(settings)
    if as_json:
        click.echo(json.dumps(collect_stats(settings), default=str))
    elif watch:
        _watch(settings, interval)
    else:
        Console(soft_wrap=True).print(render_stats(collect_stats(settings)))


def _watch(settings: Settings, interval: float) -> None:
    """`stats --watch`: the stats and a throughput line, redrawn in place (rich Live) every
    `interval` seconds until Ctrl-C, which ends it normally (exit 0)."""
    previous: tuple[float, int] | None = None
    with contextlib.suppress(KeyboardInterrupt), \
            Live(console=Console(), auto_refresh=False) as live:
        while True:
            stats = collect_stats(settings)
            now = time.monotonic()
            throughput = (f"{throughput_line(stats, previous, now)}  (every {interval:g} s, "
                          "Ctrl-C to stop)")
            live.update(render_stats(stats, throughput), refresh=True)
            previous = (now, stats["orders_rows"])
            time.sleep(interval)


@main.command("benchmark", add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def cmd_benchmark(arguments: tuple[str, ...]) -> int:
    """Measure the pipeline end to end and each stage's raw limit.

    Options: `orders-pipeline benchmark --help`."""
    return run_benchmark_command(list(arguments))


def run_benchmark_command(argv: list[str]) -> int:
    """`orders-pipeline benchmark ARGS`: `orders-pipeline-benchmark ARGS`, from the separate
    `benchmarks` package; returns its exit code. CliError if that package is not installed."""
    try:
        from benchmarks.cli import main as benchmark_main  # the only import of benchmarks
    except ImportError as exc:
        if exc.name not in ("benchmarks", "benchmarks.cli"):
            raise
        raise CliError("the benchmarks package is not installed; install the project from "
                       "its source tree (`pip install -e .`) to run `benchmark`") from exc
    return benchmark_main(argv, prog=f"{PROG} benchmark")


@main.command("listen")
@_with_settings
def cmd_listen(settings: Settings) -> None:
    """Bridge published completion signals into the stream.

    For upstream systems that only PUBLISH them; records each in the durable signal stream
    until Ctrl-C.
    \f
    Each malformed signal is refused with one warning line on stderr and counted in
    `{P}:counters` field `signals_refused`.
    """
    client = _check_redis(settings)
    keys = _keys(settings)
    click.echo(f"bridging {keys.signals_channel} into {keys.signals_stream}; Ctrl-C to stop",
               err=True)
    stopped = threading.Event()
    with _stop_on_signals(stopped.set):
        bridged = CompletionSignals(client, keys).bridge_published(stopped.is_set)
    refused = int(client.hget(keys.counters, REFUSED_COUNTER) or 0)
    click.echo(f"bridged {bridged:,} signals into {keys.signals_stream}; {refused:,} malformed "
               f"signals refused so far ({keys.counters} {REFUSED_COUNTER})")


@main.command("backup")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), metavar="DIR")
@_with_settings
def cmd_backup(settings: Settings, directory: Path) -> None:
    """Back up Postgres and this prefix's Redis keys into DIR.

    DIR must be new or empty. Redis is copied first, the database (pg_dump, custom format) as
    of that moment; staging and promotion wait only while the queue state is copied.
    manifest.json, written last, marks the backup complete. Orders pushed after the Redis
    snapshot are not in it.
    \f
    One error line if DIR is not empty, pg_dump is missing or fails, or the ledger could not
    be held still within 30 s.
    """
    _check_postgres(settings, schema=True)
    _check_redis(settings)
    try:
        manifest = backup.backup(settings, directory)
    except backup.BackupError as exc:
        raise CliError(str(exc)) from exc
    rd, pg = manifest.redis, manifest.postgres
    ledger = ", ".join(f"{n:,} {status}" for status, n in sorted(pg.ledger.items())) or "empty"
    click.echo(f"backed up database {pg.database!r} ({pg.orders:,} orders, {pg.rejected:,} "
               f"rejected; ledger: {ledger}) and {rd.keys:,} Redis keys under {rd.key_prefix}: "
               f"({rd.queued_orders:,} queued orders; {rd.claimed_batches:,} claimed, "
               f"{rd.staged_batches:,} staged, {rd.quarantined_batches:,} quarantined batches "
               f"holding {rd.batch_orders:,} orders) into {directory} in {manifest.seconds:.2f} s")
    click.echo(f"  Redis snapshot at {rd.snapshot_at:%Y-%m-%d %H:%M:%S.%f %Z}: orders pushed "
               f"after it may be missing (resend them; a copy of one it holds is dropped as a "
               f"duplicate); staging and promotion waited "
               f"{pg.ledger_paused_seconds:.3f} s")
    click.echo("  " + ", ".join(f"{name} {entry.bytes:,} bytes"
                                for name, entry in manifest.files.items())
               + f"; {backup.MANIFEST_FILE} written last")
    click.echo(f"restore it onto empty servers with `{PROG} restore {directory}`")


@main.command("restore")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), metavar="DIR")
@click.option("--force", is_flag=True,
              help="replace a target that is not empty: DROP the database and delete this "
                   "prefix's Redis keys first")
@_with_settings
def cmd_restore(settings: Settings, directory: Path, force: bool) -> None:
    """Restore a backup onto empty servers and reconcile.

    Into the configured database (created) and key prefix, which must be empty. Then claimed
    batches are handed back and reconciliation brings Redis in line with the ledger; run
    `process` and `promote` to resume.
    \f
    One error line if DIR holds no complete backup or a file changed, the target is not empty
    (without --force), pg_restore is missing or fails, or the books do not balance after it.
    """
    _check_postgres(settings, admin=True)
    _check_redis(settings)
    try:
        report = backup.restore(settings, directory, force=force)
    except backup.BackupError as exc:
        raise CliError(str(exc)) from exc
    rd, pg, books = report.manifest.redis, report.manifest.postgres, report.books
    for replaced in report.replaced:
        click.echo(f"replaced (--force): {replaced}")
    click.echo(f"restored the backup of {report.manifest.finished_at:%Y-%m-%d %H:%M:%S %Z} "
               f"(Redis snapshot {rd.snapshot_at:%Y-%m-%d %H:%M:%S.%f %Z}) into database "
               f"{settings.postgres.dbname!r} ({pg.orders:,} orders) and "
               f"{report.keys_restored:,} Redis keys under {settings.redis.key_prefix}: "
               f"({report.keys_expired:,} keys skipped, their expiry had passed)")
    click.echo(f"  handed back {report.leases_handed_back:,} claimed batches (their workers "
               f"are not here); reconciliation released {report.reconciled.released:,} "
               f"promoted batches and requeued {report.reconciled.requeued:,} lost ones")
    if not books.balanced:
        raise CliError(f"restored, but the books do not balance: {books.as_dict()}; "
                       "investigate before resuming")
    click.echo("  books balanced: " + ", ".join(
        f"{name.replace('_', ' ')} {value:,}" for name, value in books.as_dict().items()
        if name not in ("balanced", "difference")))
    if report.signal:
        click.echo(f"resume: `{PROG} process`, then `{PROG} promote` (under Dagster the "
                   f"completion signal {report.signal} starts that run)")


# ---------------------------------------------------------------------------- fan-out


def _relayed(result: fanout.RelayResult, stream: str) -> str:
    """One line saying what a relay did."""
    return (f"relayed {result.rows:,} outbox rows: published {result.entries:,} entries to "
            f"{stream}, {result.unheard:,} orders promoted while no consumer group existed "
            f"(nobody to deliver them to), {result.missing:,} no longer in orders; trimmed "
            f"{result.trimmed:,} entries every group acknowledged, in {result.seconds:.2f} s")


@main.command("relay")
@click.option("--follow", is_flag=True,
              help="keep relaying every --interval seconds until SIGTERM or Ctrl-C")
@click.option("--interval", type=_POSITIVE, default=1.0, metavar="S",
              help="with --follow: seconds between looks at the outbox")
@_with_settings
def cmd_relay(settings: Settings, follow: bool, interval: float) -> None:
    """Publish promoted orders to the stream {P}:promoted.

    Moves the fan-out outbox that every promotion writes into the stream, one entry per order
    (its order_id is the idempotency key), oldest first, at least once; then trims the
    entries every consumer group acknowledged. Every promotion relays too; --follow keeps
    relaying, e.g. after a relay was killed.
    \f
    With --follow, one line on stderr per relay that moved something, one summary at the end.
    """
    _check_postgres(settings, pooled=True, schema=True)
    _check_redis(settings)
    stream = _keys(settings).promoted
    with _server_errors("relay", f"{PROG} relay"):
        if not follow:
            click.echo(_relayed(fanout.relay(settings), stream))
            return
        stop = threading.Event()
        click.echo(f"relaying promoted_outbox into {stream} every {interval:g} s; SIGTERM or "
                   "Ctrl-C stops", err=True)
        with _stop_on_signals(stop.set):
            total = fanout.follow_relay(
                settings, stop, interval, lambda result: click.echo(
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')} {_relayed(result, stream)}",
                    err=True))
    click.echo(f"stopped; {_relayed(total, stream)}")


@main.command("consume")
@click.option("--group", required=True, metavar="NAME",
              help="consumer group; created on first use, it receives the orders published "
                   "after that")
@click.option("--consumer", metavar="C",
              help="consumer name in the group (default HOST-PID); restarted under the same "
                   "name, a consumer first finishes what it was handed")
@click.option("--lease", type=_POSITIVE, default=30.0, metavar="S",
              help="seconds after which the entries of a consumer that stopped renewing its "
                   "lease (it died) are taken over")
@click.option("--count", type=click.IntRange(1, 10_000), default=10, metavar="N",
              help="entries read at a time")
@click.option("--drain", is_flag=True,
              help="stop once nothing is left to take over or read, instead of waiting")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_with_settings
def cmd_consume(settings: Settings, group: str, consumer: str | None, lease: float,
                count: int, drain: bool, command: tuple[str, ...]) -> None:
    """Run a command once per promoted order, for one consumer group.

    `consume --group NAME -- COMMAND [ARG]...`: each entry of {P}:promoted goes to COMMAND
    as one JSON object on stdin (stream_id, idempotency_key, batch_id, outbox_id, order),
    with ORDERS_PIPELINE_IDEMPOTENCY_KEY (the order id), ORDERS_PIPELINE_STREAM_ID and
    ORDERS_PIPELINE_GROUP set. Exit 0 acknowledges it; otherwise it is delivered again after
    the lease. At least once: make the effect conditional on the key. Runs until SIGTERM or
    Ctrl-C (finishing the entry in hand), or with --drain until nothing is left.
    \f
    One warning line on stderr per failed command, one summary line at the end.
    """
    _check_redis(settings)
    consumer = consumer or fanout.default_consumer()
    stream = fanout.promoted_stream(settings)

    def failed(entry: PromotedEntry, code: int) -> None:
        click.echo(f"{PROG}: warning: entry {entry.stream_id} (order {entry.key}): command "
                   f"exited with code {code}; left pending, delivered again after the lease "
                   f"of {lease:g} s", err=True)

    handler = fanout.command_handler(command, group, failed)
    stopped = threading.Event()
    if not drain:
        click.echo(f"consuming {stream.key} in group {group!r} as {consumer!r}; SIGTERM or "
                   "Ctrl-C stops", err=True)
    with _server_errors("consume", f"{PROG} consume"), _stop_on_signals(stopped.set):
        stats = stream.consume(group, consumer, handler, lease_seconds=lease, count=count,
                               should_stop=stopped.is_set, drain=drain)
    click.echo(f"consumed {stream.key} in group {group!r} as {consumer!r}: acknowledged "
               f"{stats.acked:,}, left pending {stats.failed:,} (command failed), took over "
               f"{stats.taken_over:,} from dead consumers, resumed {stats.resumed:,} of its own")


@main.command("replay")
@click.option("--from", "since", type=_Instant(), metavar="T1",
              help="start of the window (inclusive), an ISO 8601 instant with offset; a batch "
                   "is placed by when it was archived, i.e. staged")
@click.option("--to", "until", type=_Instant(), metavar="T2",
              help="end of the window (exclusive), an ISO 8601 instant with offset")
@click.option("--reprocess", is_flag=True,
              help="recompute the window's orders from their raw bytes with the current "
                   "transform and lookup snapshot, replacing their stored values and "
                   "correcting the views")
@click.option("--dry-run", is_flag=True, help="only show what the archive holds in the window")
@click.option("--prune", is_flag=True,
              help="first drop the archive's days older than RAW_RETENTION_DAYS (staging does "
                   "it once a day); alone, only that")
@_with_settings
def cmd_replay(settings: Settings, since: datetime | None, until: datetime | None,
               reprocess: bool, dry_run: bool, prune: bool) -> None:
    """Run the archived batches of a time window through the pipeline again.

    Every claimed batch's raw payloads are kept in Postgres (raw_batches, for
    RAW_RETENTION_DAYS). The promoted batches archived in [T1, T2) are replayed from those
    bytes, staged and promoted here, and the views refreshed: orders already stored change
    nothing, missing ones come in. --reprocess recomputes their stored values (after a
    transform fix or a corrected rate). A replay a crash interrupted is finished by the next
    one (the same window and mode resumes it).
    \f
    Usage errors (exit 2, one line): --from without --to or the reverse, a time without UTC
    offset, an empty window, no window without --prune, --prune with --dry-run.
    """
    ctx = click.get_current_context()
    if (since is None) != (until is None):
        ctx.fail("give both --from and --to")
    if prune and dry_run:
        ctx.fail("--prune changes the archive, --dry-run changes nothing: pass one of them")
    if since is None or until is None:
        if not prune or reprocess:
            ctx.fail("give the window to replay with --from and --to (or --prune alone)")
        window = None
    else:
        window = Window(since, until)
        try:
            window.check()
        except ReplayRefused as exc:
            ctx.fail(str(exc))
    _check_postgres(settings, pooled=True, schema=True)
    with _server_errors("replay", f"{PROG} replay"):
        if prune:
            dropped = pipeline.prune_archive(settings)
            click.echo(f"dropped {len(dropped):,} day partitions of raw_batches older than "
                       f"RAW_RETENTION_DAYS={settings.pipeline.raw_retention_days} days"
                       + (f": {' '.join(dropped)}" if dropped else ""))
        if window is None:
            return
        _check_redis(settings)
        result = pipeline.replay_window(settings, window, reprocess=reprocess, dry_run=dry_run)
    _show_replay(result)


def _show_replay(result: pipeline.Replay) -> None:
    """What `replay` found in the archive and what became of the batches it replayed."""
    found = result.contents
    click.echo(f"archived in [{result.window.since.isoformat()}, "
               f"{result.window.until.isoformat()}): {found.batches:,} batches, "
               f"{found.orders:,} orders ({found.raw_bytes:,} bytes raw, "
               f"{found.stored_bytes:,} stored); {found.replayable_batches:,} promoted "
               f"({found.replayable_orders:,} orders), "
               f"{found.batches - found.replayable_batches:,} still in the pipeline")
    if result.resumed:
        click.echo(f"finished {len(result.resumed):,} pending batches of an interrupted replay")
    if result.dry_run:
        click.echo(f"run without --dry-run to replay the {found.replayable_batches:,} promoted "
                   "batches")
        return
    done = result.outcome
    if done is None:
        click.echo("nothing to replay: no promoted batch was archived in the window")
        return
    resumed = " (the request a crash interrupted, resumed)" if result.resumed_request else ""
    waiting = done.batches - done.promoted_batches - done.quarantined_batches
    click.echo(f"{'reprocessed' if done.reprocess else 'replayed'} {done.batches:,} batches "
               f"({done.orders:,} orders) as {result.replay_id}{resumed}: "
               f"{done.promoted_batches:,} promoted, {done.quarantined_batches:,} quarantined"
               + (f", {waiting:,} still in flight" if waiting else "")
               + f"; {done.promoted_orders:,} orders reached promotion, {done.rejected:,} "
               f"rejected; {done.changed:,} order rows changed; views refreshed")


def _clear_queue(client: redis.Redis, keys: RedisKeys) -> dict[str, int]:
    """Queue state: pending and in-flight orders, counters, rate window, signal log, re-drive
    markers."""
    removed: dict[str, int] = {}
    for space in keys.shard_spaces:  # each shard's queue state, then the prefix's own keys
        for name in ("ingestion", "dequeued", "queue_marks", "inflight", "owners", "staged",
                     "redriven", "counters"):
            removed[getattr(space, name)] = int(client.unlink(getattr(space, name)))
        for family in ("batch", "claimed", "pushed"):  # batch lists and their markers
            removed[f"{space.prefix}:{family}:*"] = unlink_matching(
                client, f"{glob_escape(space.prefix)}:{family}:*")
    for key in (keys.order_window, keys.signals_stream):
        removed[key] = int(client.unlink(key))
    removed[f"{keys.prefix}:signal:*"] = unlink_matching(
        client, f"{glob_escape(keys.prefix)}:signal:*")
    return removed


@main.command("clear")
@click.option("--cache", is_flag=True, help="the lookup snapshot")
@click.option("--dedup", is_flag=True, help="the dedup window")
@click.option("--queue", is_flag=True,
              help="queued, in-flight and staged batches, counters, rate window, signal log, "
                   "re-drive markers (orders still queued are LOST)")
@click.option("--all", "everything", is_flag=True, help="all of the above")
@_with_settings
def cmd_clear(settings: Settings, cache: bool, dedup: bool, queue: bool,
              everything: bool) -> None:
    """Delete Redis state of the configured key prefix.

    Only this prefix's keys; nothing in Postgres.
    \f
    Without any of the flags: the help on stderr, exit code 2.
    """
    if not (cache or dedup or queue or everything):
        ctx = click.get_current_context()
        click.echo(ctx.get_help(), err=True)
        ctx.exit(2)
    client = _check_redis(settings)
    keys = _keys(settings)
    if cache or everything:
        present = int(client.exists(*(keys.lookup(t.name) for t in LOOKUP_TABLES),
                                    keys.lookup_meta))
        LookupCache(client, keys, settings.pipeline.lookup_ttl_seconds).clear()
        click.echo(f"lookup cache: removed {present} keys ({keys.prefix}:lookup:*)")
    if dedup or everything:
        removed = DedupWindow(client, keys, settings.pipeline.dedup_window_seconds).clear()
        click.echo(f"dedup window: removed {removed:,} keys ({keys.dedup_id_prefix}*, "
                   f"{keys.dedup_count_prefix}*)")
    if queue or everything:
        for key, count in _clear_queue(client, keys).items():
            click.echo(f"queue: removed {count:,} x {key}")
