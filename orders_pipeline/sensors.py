"""The sensors that launch runs: ingest runs for completion signals, and automation.

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

import dagster as dg

from orders_pipeline.jobs import ingest_orders_job
from orders_pipeline.redis_patterns.signals import CompletionSignals
from orders_pipeline.resources import RedisResource

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


# Runs the assets' automation conditions (`lookup_cache` daily at 03:00 UTC, the views after
# promotions outside an ingest run). Dagster would add a sensor of this name by itself, but
# stopped; this one runs from the start.
automation_condition_sensor = dg.AutomationConditionSensorDefinition(
    "default_automation_condition_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the runs the assets' automation conditions ask for.",
)
