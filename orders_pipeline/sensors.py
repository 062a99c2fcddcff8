"""The sensors that launch runs: ingest runs for completion signals, lookup reloads, automation.

`completion_signal_sensor` launches an ingest run for completion signals, read from the
durable signal stream. The tick never blocks: it reads `{P}:signals` after its cursor with
XRANGE and returns. All signals found in one tick are coalesced into one run whose run key
names the range of stream ids it covers, so every signal leads to exactly one run, and
signals recorded while the daemon was down are picked up by the next tick.

No tick raises on data: a stream entry that is not a valid signal (written by an older
version or by hand) is skipped, logged with its id and reason and counted in the run's tags
(or the skip reason), and the cursor moves past it; a cursor that is not a usable stream id
is reset with a warning and reading restarts at the oldest retained entry, which may give
some signals a second, harmless run (ingest is idempotent; see `CompletionSignals.read_after`).
"""

import json

import dagster as dg
import psycopg

from orders_pipeline.assets.lookup import LOOKUP_TABLE_SPECS, lookup_cache
from orders_pipeline.jobs import ingest_orders_job
from orders_pipeline.redis_patterns.lookup_cache import LookupCache, source_versions
from orders_pipeline.redis_patterns.signals import CompletionSignals
from orders_pipeline.resources import PipelineResource, PostgresResource, RedisResource

MAX_SIGNALS_PER_RUN = 10_000


@dg.sensor(
    target=ingest_orders_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="One ingest run per burst of new completion signals in the Redis stream "
                "`<REDIS_KEY_PREFIX>:signals`.",
)
def completion_signal_sensor(context: dg.SensorEvaluationContext,
                             redis: RedisResource) -> dg.SensorResult | dg.SkipReason:
    """One RunRequest for the valid signals after the cursor, keyed by the stream-id range read.

    Tags: `orders_pipeline/signals` (valid signals), `orders_pipeline/signal_orders` (sum of
    their counts), `orders_pipeline/signals_skipped` (malformed entries passed over) and the
    first and last stream id of the range. The new cursor is the id of the last entry read,
    valid or not.
    """
    signals = CompletionSignals(redis.client(), redis.key_space())
    page = signals.read_after(context.cursor, limit=MAX_SIGNALS_PER_RUN)
    if page.cursor_reset:
        context.log.warning(f"sensor cursor reset to {page.cursor}: {page.cursor_reset}")
    for entry in page.skipped:
        context.log.warning(f"skipped signal stream entry {entry.stream_id}: {entry.reason}")
    if not page.signals:
        if page.cursor == context.cursor:
            return dg.SkipReason("no new completion signals")
        skipped = (f"skipped {len(page.skipped)} malformed signal stream entries "
                   f"({page.first_id}..{page.last_id})" if page.skipped else
                   f"cursor reset: {page.cursor_reset}")
        return dg.SensorResult(skip_reason=f"no valid completion signals; {skipped}",
                               cursor=page.cursor)
    first, last = page.first_id, page.last_id
    orders = sum(s.count for s in page.signals)
    context.log.info(f"{len(page.signals)} signal(s) for {orders} orders, "
                     f"{len(page.skipped)} malformed entries skipped: {first}..{last}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(
            run_key=f"signals:{first}..{last}",
            tags={"orders_pipeline/signals": str(len(page.signals)),
                  "orders_pipeline/signal_orders": str(orders),
                  "orders_pipeline/signals_skipped": str(len(page.skipped)),
                  "orders_pipeline/first_signal": str(first),
                  "orders_pipeline/last_signal": str(last)},
        )],
        cursor=page.cursor,
    )


LOOKUP_SOURCES_EVERY_SECONDS = 15


@dg.sensor(
    target=lookup_cache,
    minimum_interval_seconds=LOOKUP_SOURCES_EVERY_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"""Every {LOOKUP_SOURCES_EVERY_SECONDS} s: compares the change counters of
`products`, `currencies` and `zip_codes` (table `lookup_source_versions`, raised by a trigger on
every change) with the versions the live snapshot was copied from, and reloads `lookup_cache`
when Postgres is ahead (one run per set of versions), so a change reaches the workers within
a minute. Each new version is recorded as an observation of its table. Then
`orders-pipeline requeue-rejected --unknown-references` (or the `redrive_rejected` job with
`unknown_references: true`) re-drives the orders rejected for an unknown reference meanwhile.""",
)
def lookup_sources_sensor(context: dg.SensorEvaluationContext, redis: RedisResource,
                          postgres: PostgresResource,
                          pipeline: PipelineResource) -> dg.SensorResult | dg.SkipReason:
    """A run of `lookup_cache` keyed by the source versions, when the snapshot is behind them.

    Two small reads: the three counter rows in Postgres, the snapshot's `{P}:lookup:meta`
    hash in Redis. The cursor holds the versions already observed (JSON), so each version is
    observed once however many ticks the reload takes.
    """
    try:
        with postgres.connection() as conn:
            versions = source_versions(conn)
    except psycopg.errors.UndefinedTable:
        return dg.SkipReason("table lookup_source_versions is missing: run "
                             "`orders-pipeline init-db`")
    sources = LookupCache(redis.client(), redis.key_space(),
                          pipeline.settings().lookup_ttl_seconds).sources()
    covered = sources.versions if sources is not None else {}
    observed = json.loads(context.cursor) if context.cursor else {}
    named = ", ".join(f"{table} {version}" for table, version in versions.items())
    observations = [
        dg.AssetObservation(asset_key=spec.key, metadata={"version": versions[spec.key.path[-1]]})
        for spec in LOOKUP_TABLE_SPECS
        if observed.get(spec.key.path[-1]) != versions.get(spec.key.path[-1])]
    behind = sorted(table for table, version in versions.items()
                    if covered.get(table) != version)
    if not behind:
        return dg.SensorResult(
            skip_reason=f"the lookup snapshot follows its source tables (versions: {named})",
            asset_events=observations, cursor=json.dumps(versions))
    context.log.info(f"lookup snapshot behind on {', '.join(behind)} (versions: {named}): "
                     "reloading lookup_cache")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(
            run_key="lookup-sources:" + ",".join(f"{t}={v}" for t, v in versions.items()),
            tags={"orders_pipeline/lookup_tables_changed": ",".join(behind)})],
        asset_events=observations, cursor=json.dumps(versions))


# Runs the assets' automation conditions (`lookup_cache` daily at 03:00 UTC). The views need
# none: every promotion step refreshes the months it changed and records them as the views'
# partitions. Dagster would add a sensor of this name by itself, but stopped; this one runs
# from the start.
automation_condition_sensor = dg.AutomationConditionSensorDefinition(
    "default_automation_condition_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the runs the assets' automation conditions ask for.",
)
