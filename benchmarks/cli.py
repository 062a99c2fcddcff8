"""`orders-pipeline-benchmark` (also `python -m benchmarks`, `orders-pipeline benchmark`).

With no subcommand it runs the end-to-end benchmark (`benchmarks.end_to_end`);
`orders-pipeline-benchmark promotion-scaling ...` runs promotion by shard with 1, 2 and 4
promoter processes (`benchmarks.promotion_scaling`); `orders-pipeline-benchmark scale-curve
...` grows one database through several sizes and measures at each
(`benchmarks.scale_curve`); `orders-pipeline-benchmark retention ...` times dropping old
months and promotion's wait beside it (`benchmarks.retention_stall`). Configuration comes
from the same environment variables (and `.env`) as `orders-pipeline`. Every expected
failure (bad option, bad configuration, a server down, a benchmark process that died) is one
line on stderr and a non-zero exit code, never a traceback.
"""

import json
import sys
from pathlib import Path
from typing import Any

import click
import psycopg
import redis

from benchmarks.end_to_end import BenchmarkFailed, BenchmarkOptions, run_benchmark
from benchmarks.promotion_scaling import (
    ScalingFailed,
    ScalingOptions,
    parse_counts,
    print_progress,
    render_scaling,
    run_scaling,
)
from benchmarks.report import render_benchmark
from benchmarks.retention_stall import RetentionOptions, render_retention, run_retention
from benchmarks.scale_curve import (
    DESIGNS,
    CurveOptions,
    ScaleCurveRefused,
    parse_sizes,
    plot_curve,
    render_curve,
    require_matplotlib,
    run_curve,
)
from benchmarks.scale_curve import OUTPUT as CURVE_OUTPUT
from orders_pipeline.connections import close_all, redis_client
from orders_pipeline.pipeline import WorkerFailed
from orders_pipeline.settings import (
    BATCH_SIZE,
    WORKERS,
    ConfigError,
    Settings,
    load_env_file,
)

PROG = "orders-pipeline-benchmark"
PREFLIGHT_TIMEOUT_SECONDS = 3
_POSITIVE = click.FloatRange(min=0, min_open=True)
_FRACTION = click.FloatRange(min=0, max=1, max_open=True)


def _preflight(settings: Settings) -> None:
    """Fail within seconds, in one line, when a server the benchmark needs does not answer."""
    pg = settings.postgres
    for via_pgbouncer in sorted({False, pg.use_pgbouncer}):
        params = {**pg.conninfo(via_pgbouncer=via_pgbouncer), "dbname": "postgres",
                  "connect_timeout": PREFLIGHT_TIMEOUT_SECONDS}
        server = "PgBouncer" if via_pgbouncer else "Postgres"
        try:
            psycopg.connect(**params).close()
        except psycopg.OperationalError as exc:
            raise click.ClickException(f"cannot use {server} at {params['host']}:"
                                       f"{params['port']} ({' '.join(str(exc).split())})"
                                       ) from exc
    try:
        redis_client(settings.redis).ping()
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot use Redis at {settings.redis.host}:"
                                   f"{settings.redis.port} ({exc})") from exc


@click.command(name=PROG, context_settings={"help_option_names": ["-h", "--help"],
                                            "max_content_width": 100})
@click.option("--total", type=click.IntRange(min=1), required=True, metavar="N",
              help="orders to push through the pipeline")
@click.option("--batch-size", type=click.IntRange(BATCH_SIZE.minimum, BATCH_SIZE.maximum),
              metavar="B", help="orders per batch (default BATCH_SIZE)")
@click.option("--workers", type=click.IntRange(WORKERS.minimum, WORKERS.maximum), metavar="N",
              help="staging worker processes (default WORKER_COUNT)")
@click.option("--duplicates", type=_FRACTION, default=0.0, show_default=True, metavar="F",
              help="fraction of duplicate payloads")
@click.option("--invalid", type=_FRACTION, default=0.0, show_default=True, metavar="F",
              help="fraction of invalid payloads")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmark-results.json"), show_default=True, metavar="PATH",
              help="where to write the JSON results")
@click.option("--preload", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="M", help="first COPY M orders straight into orders, spread over 90 days")
@click.option("--fresh-batch", type=click.IntRange(min=0), default=0, metavar="K",
              help="after the run, time promotion + refresh of one K-order batch "
                   "(default 0: skip)")
@click.option("--raw-sample", type=click.IntRange(min=0), metavar="R",
              help="orders for the raw limits (default min(N, 200000); 0: skip)")
@click.option("--raw-repeats", type=click.IntRange(min=1), default=3, show_default=True,
              metavar="K", help="runs of each raw limit; the median is reported")
@click.option("--refresh-every", type=_POSITIVE, default=1.0, show_default=True,
              metavar="SECONDS", help="least time between view refreshes while ingesting")
@click.option("--dashboard-interval", type=_POSITIVE, default=0.25, show_default=True,
              metavar="SECONDS", help="pause between dashboard queries")
@click.option("--seed", type=int, default=1, show_default=True, help="generator seed")
def benchmark(total: int, batch_size: int | None, workers: int | None, duplicates: float,
              invalid: float, output: Path, preload: int, fresh_batch: int,
              raw_sample: int | None, raw_repeats: int, refresh_every: float,
              dashboard_interval: float, seed: int) -> None:
    """Run the pipeline end to end (producer, following workers, promoter and a dashboard at
    once) and the raw limit of each stage, on a throwaway database and key prefix (both
    removed afterwards); print the figures and write them as JSON.

    `orders-pipeline-benchmark promotion-scaling --help`: promotion with 1, 2 and 4
    promoter processes over queue shards."""
    load_env_file()
    settings = Settings.from_env()
    _preflight(settings)
    options = BenchmarkOptions(
        total=total, batch_size=batch_size or settings.pipeline.batch_size,
        workers=workers or settings.pipeline.worker_count, duplicates=duplicates,
        invalid=invalid, preload=preload, fresh_batch=fresh_batch, raw_sample=raw_sample,
        raw_repeats=raw_repeats, refresh_every=refresh_every,
        dashboard_interval=dashboard_interval, seed=seed)
    result = run_benchmark(settings, options, show_progress=sys.stderr.isatty())
    click.echo(render_benchmark(result))
    output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    click.echo(f"results written to {output}")
    orders = result["orders"]
    if not orders["verified"]:
        raise click.ClickException(f"benchmark lost orders: {orders['orders_rows']:,} in "
                                   f"orders, expected {orders['expected_rows']:,}")


SCALING = "promotion-scaling"
SCALING_OUTPUT = Path("benchmarks") / "results" / "promotion-scaling.json"


def _promoter_counts(_ctx: click.Context, _param: click.Parameter, value: str
                     ) -> tuple[int, ...]:
    try:
        return parse_counts(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command(name=SCALING, context_settings={"help_option_names": ["-h", "--help"],
                                               "max_content_width": 100})
@click.option("--total", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              metavar="N", help="orders to stage and promote in each run")
@click.option("--shards", type=click.IntRange(1, 64), default=4, show_default=True,
              metavar="K", help="queue shards the orders are spread over")
@click.option("--batch-size", type=click.IntRange(BATCH_SIZE.minimum, BATCH_SIZE.maximum),
              default=5_000, show_default=True, metavar="B", help="orders per staged batch")
@click.option("--promoters", default="1,2,4", show_default=True, metavar="P,P,...",
              callback=_promoter_counts, help="promoter process counts, one run each")
@click.option("--max-batches", type=click.IntRange(min=1), default=400, show_default=True,
              metavar="M", help="batches a promotion round takes at most")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="first, one all-shards promoter (shard None), as before shards")
@click.option("--seed", type=int, default=1, show_default=True, help="generator seed")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=SCALING_OUTPUT, show_default=True, metavar="PATH",
              help="where to write the JSON results (directories are created)")
def promotion_scaling(total: int, shards: int, batch_size: int, promoters: tuple[int, ...],
                      max_batches: int, baseline: bool, seed: int, output: Path) -> None:
    """Stage N orders over K shards and promote them with 1, 2 and 4 promoter processes
    (each owning shards i, i+P, ...), fresh staging each time, on a throwaway database
    (removed afterwards); print orders/s and CPU per run and write them as JSON."""
    load_env_file()
    settings = Settings.from_env()
    _preflight(settings)
    options = ScalingOptions(total=total, shards=shards, batch_size=batch_size,
                             promoters=promoters, max_batches=max_batches, seed=seed,
                             baseline=baseline)
    result = run_scaling(settings, options, progress=print_progress)
    click.echo(render_scaling(result))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    click.echo(f"results written to {output}")


CURVE = "scale-curve"


def _sizes(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return parse_sizes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command(name=CURVE, context_settings={"help_option_names": ["-h", "--help"],
                                             "max_content_width": 100})
@click.option("--sizes", default=",".join(str(s) for s in CurveOptions.sizes),
              show_default=True, metavar="N,N,...", callback=_sizes,
              help="orders present at each point of the curve, ascending")
@click.option("--run-orders", type=click.IntRange(min=1), default=CurveOptions.run_orders,
              show_default=True, metavar="N", help="orders of each measured run")
@click.option("--fresh-batch", type=click.IntRange(min=0), default=CurveOptions.fresh_batch,
              show_default=True, metavar="K",
              help="orders of the batch timed until the views are fresh (0: skip)")
@click.option("--history-days", type=click.IntRange(min=1),
              default=CurveOptions.history_days, show_default=True, metavar="DAYS",
              help="days (up to an hour ago) the preloaded orders are spread over")
@click.option("--design", type=click.Choice(DESIGNS), default=CurveOptions.design,
              show_default=True,
              help="partitioned: the product's orders; unpartitioned: raw inserts into a "
                   "single orders_flat table, promotion rate only")
@click.option("--workers", type=click.IntRange(WORKERS.minimum, WORKERS.maximum), metavar="N",
              help="staging worker processes (default WORKER_COUNT)")
@click.option("--batch-size", type=click.IntRange(BATCH_SIZE.minimum, BATCH_SIZE.maximum),
              metavar="B", help="orders per batch (default BATCH_SIZE)")
@click.option("--dashboard-interval", type=_POSITIVE, default=CurveOptions.dashboard_interval,
              show_default=True, metavar="SECONDS", help="pause between dashboard queries")
@click.option("--seed", type=int, default=1, show_default=True, help="generator seed")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=CURVE_OUTPUT, show_default=True, metavar="PATH",
              help="where to write the JSON results (directories are created)")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH.png",
              help="also draw the curve (needs matplotlib: the `bench` extra)")
def scale_curve(sizes: tuple[int, ...], run_orders: int, fresh_batch: int, history_days: int,
                design: str, workers: int | None, batch_size: int | None,
                dashboard_interval: float, seed: int, output: Path, plot: Path | None
                ) -> None:
    """Grow one throwaway database through --sizes orders present (COPY preloads spread over
    --history-days) and measure at each size: promotion of a run with UUIDv7 and with random
    UUIDv4 ids, views fresh after a batch, dashboard latency, sizes, WAL and memory; print a
    markdown table and write JSON (also after each size, `complete` false until the end) and
    a plot. The database is removed afterwards."""
    if plot is not None:
        try:
            require_matplotlib()
        except ModuleNotFoundError as exc:
            raise click.ClickException(str(exc)) from exc
    load_env_file()
    settings = Settings.from_env()
    _preflight(settings)
    options = CurveOptions(sizes=sizes, run_orders=run_orders, fresh_batch=fresh_batch,
                           history_days=history_days, design=design,
                           workers=workers or settings.pipeline.worker_count,
                           batch_size=batch_size or settings.pipeline.batch_size,
                           dashboard_interval=dashboard_interval, seed=seed)
    output.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:
        output.write_text(json.dumps(result, indent=2, default=str) + "\n")

    result = run_curve(settings, options, progress=print_progress,
                       show_progress=sys.stderr.isatty(), on_point=save)
    click.echo(render_curve(result))
    save(result)
    click.echo(f"results written to {output}")
    if plot is not None:
        plot_curve(result, plot)
        click.echo(f"plot drawn to {plot}")


RETENTION = "retention"
RETENTION_OUTPUT = Path("benchmarks") / "results" / "retention.json"


@click.command(name=RETENTION, context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.option("--orders", type=click.IntRange(min=1), default=RetentionOptions.orders,
              show_default=True, metavar="N", help="orders preloaded before the retention")
@click.option("--history-days", type=click.IntRange(min=1),
              default=RetentionOptions.history_days, show_default=True, metavar="DAYS",
              help="days (up to an hour ago) the preloaded orders are spread over")
@click.option("--keep-months", type=click.IntRange(min=1, max=1200),
              default=RetentionOptions.keep_months, show_default=True, metavar="N",
              help="months the retention keeps (the current one and N-1 before it)")
@click.option("--seed", type=int, default=1, show_default=True, help="generator seed")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=RETENTION_OUTPUT, show_default=True, metavar="PATH",
              help="where to write the JSON results (directories are created)")
def retention(orders: int, history_days: int, keep_months: int, seed: int,
              output: Path) -> None:
    """Preload --orders orders over --history-days into a throwaway database, run the
    product's retention keeping --keep-months, and measure how long it takes and how long a
    promotion round arriving meanwhile waits; print a markdown table and write JSON."""
    load_env_file()
    settings = Settings.from_env()
    _preflight(settings)
    result = run_retention(settings, RetentionOptions(
        orders=orders, history_days=history_days, keep_months=keep_months, seed=seed))
    click.echo(render_retention(result))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    click.echo(f"results written to {output}")


SUBCOMMANDS = {SCALING: promotion_scaling, CURVE: scale_curve, RETENTION: retention}


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the command on `argv` (default: the process's arguments); returns the exit code:
    0, 1 for a failure, 2 for bad usage, 130 when interrupted; the error is one line. A
    first argument naming a subcommand (SUBCOMMANDS) runs that one on the rest."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = benchmark
    if args and args[0] in SUBCOMMANDS:
        command, prog = SUBCOMMANDS[args[0]], f"{prog} {args[0]}"
        args = args[1:]
    try:
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.UsageError as exc:
        message, code = f"{exc.format_message()} (see `{prog} --help`)", 2
    except click.ClickException as exc:
        message, code = exc.format_message(), 1
    except ConfigError as exc:
        message, code = f"bad configuration: {exc}", 1
    except (BenchmarkFailed, ScalingFailed, ScaleCurveRefused, WorkerFailed, ValueError,
            OSError, psycopg.Error, redis.RedisError) as exc:
        message, code = " ".join(f"{type(exc).__name__}: {exc}".split()), 1
    except click.Abort:
        message, code = "interrupted", 130
    finally:
        close_all()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code
