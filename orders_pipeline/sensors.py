"""Launch an ingest run for completion signals, read from the durable signal stream.

The tick never blocks: it reads `{P}:signals` after its cursor with XRANGE and returns. All
signals found in one tick are coalesced into one run whose run key names the range of stream
ids it covers, so every signal leads to exactly one run, and signals recorded while the
daemon was down are picked up by the next tick.
"""

import dagster as dg

from orders_pipeline.jobs import ingest_orders_job
from orders_pipeline.redis_patterns.signals import CompletionSignals
from orders_pipeline.resources import RedisResource

MAX_SIGNALS_PER_RUN = 10_000


@dg.sensor(
    job=ingest_orders_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="One ingest run per batch of new completion signals in `{P}:signals`.",
)
def completion_signal_sensor(context: dg.SensorEvaluationContext,
                             redis: RedisResource) -> dg.SensorResult | dg.SkipReason:
    signals = CompletionSignals(redis.client(), redis.key_space())
    new = signals.read_after(context.cursor, limit=MAX_SIGNALS_PER_RUN)
    if not new:
        return dg.SkipReason("no new completion signals")
    first, last = new[0].stream_id, new[-1].stream_id
    orders = sum(s.count for s in new)
    context.log.info(f"{len(new)} signal(s) for {orders} orders: {first}..{last}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(
            run_key=f"signals:{first}..{last}",
            tags={"orders_pipeline/signals": str(len(new)),
                  "orders_pipeline/signal_orders": str(orders),
                  "orders_pipeline/first_signal": first,
                  "orders_pipeline/last_signal": last},
        )],
        cursor=last,
    )
