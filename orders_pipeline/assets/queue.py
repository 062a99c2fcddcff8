"""The queue area: the Redis ingestion queue as an external asset, observed on its own clock.

Producers fill `{P}:ingestion` and ingest runs drain it, but whether orders are waiting must
not depend on those runs: with the completion sensor off, the daemon down or every run
failing, nothing would ever look. So `queue_observation_sensor` reads the queue every
`OBSERVE_EVERY_SECONDS` without launching a run: it records an observation of
`ingestion_queue` (depth, age of the oldest queued order, batches in flight and quarantined:
the asset's plots) and evaluates the queue's two checks. The same checks also run on demand
from the UI (`queue_checks`).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import dagster as dg

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.assets.catalog import REDIS_KEY
from orders_pipeline.assets.common import seconds
from orders_pipeline.redis_patterns.queue import OrderQueue, QueueGauges
from orders_pipeline.resources import PipelineResource, PostgresResource, RedisResource

INGESTION_QUEUE = dg.AssetSpec(
    "ingestion_queue",
    group_name=GROUP,
    owners=OWNERS,
    kinds={"redis"},
    description="""
**Ingestion queue**: the Redis list `{P}:ingestion` of raw JSON orders. Producers (the CLI's
`generate`, or any application) LPUSH batches and publish a completion signal per batch;
ingest runs claim whole batches from its other end. External: Dagster never writes it.

Observed every minute by `queue_observation_sensor`, whatever the runs do: `queue_depth`,
`oldest_queued_wait_seconds`, batches in flight (`claimed_batches` being staged,
`staged_batches` awaiting promotion, `oldest_staged_wait_seconds`) and
`quarantined_batches`, plotted under Metadata (Plots). Its checks warn when the queue is deeper
than `MAX_QUEUE_DEPTH` and fail when orders wait too long.
""",
    metadata={REDIS_KEY: "{P}:ingestion"},
)

MAX_ORDER_WAIT = timedelta(minutes=10)
OBSERVE_EVERY_SECONDS = 60
DEPTH_CHECK = "queue_depth_within_limit"
WAIT_CHECK = "orders_wait_within_limit"


@dataclass(frozen=True)
class QueueReading:
    """The queue's gauges, its depth limit, and how long ago promotion last moved a batch
    (None: never)."""
    gauges: QueueGauges
    max_queue_depth: int
    since_last_promotion_seconds: float | None


@dataclass(frozen=True)
class Verdict:
    """One check's outcome, for a run (`AssetCheckResult`) or a sensor tick (evaluation)."""
    check_name: str
    passed: bool
    severity: dg.AssetCheckSeverity
    metadata: dict[str, dg.MetadataValue]

    def result(self) -> dg.AssetCheckResult:
        """The outcome as a check step reports it."""
        return dg.AssetCheckResult(check_name=self.check_name, passed=self.passed,
                                   severity=self.severity, metadata=self.metadata)

    def evaluation(self) -> dg.AssetCheckEvaluation:
        """The outcome as a sensor reports it, without a run."""
        return dg.AssetCheckEvaluation(asset_key=INGESTION_QUEUE.key, check_name=self.check_name,
                                       passed=self.passed, severity=self.severity,
                                       metadata=self.metadata)


def read_queue(redis: RedisResource, postgres: PostgresResource,
               pipeline: PipelineResource) -> QueueReading:
    """One reading: the gauges (one MULTI) and the age of the last promotion (Postgres)."""
    gauges = OrderQueue(redis.client(), redis.key_space()).gauges()
    with postgres.connection() as conn:
        row = conn.execute("SELECT extract(epoch FROM now() - promoted_at)::float8"
                           " FROM promotions ORDER BY promotion_id DESC LIMIT 1").fetchone()
    return QueueReading(gauges, pipeline.max_queue_depth, None if row is None else row[0])


def observation(reading: QueueReading) -> dg.AssetObservation:
    """The numbers plotted for `ingestion_queue`."""
    g = reading.gauges
    return dg.AssetObservation(asset_key=INGESTION_QUEUE.key, metadata={
        "queue_depth": g.queue_depth,
        "oldest_queued_wait_seconds": seconds(g.oldest_queued_wait_seconds),
        "claimed_batches": g.claimed_batches,
        "staged_batches": g.staged_batches,
        "in_flight_batches": g.in_flight_batches,
        "oldest_staged_wait_seconds": seconds(g.oldest_staged_wait_seconds),
        "quarantined_batches": g.quarantined_batches,
    })


def depth_verdict(reading: QueueReading) -> Verdict:
    """Warns while the queue is deeper than `MAX_QUEUE_DEPTH` (producers are held back)."""
    depth = reading.gauges.queue_depth
    return Verdict(DEPTH_CHECK, depth <= reading.max_queue_depth, dg.AssetCheckSeverity.WARN, {
        "queue_depth": dg.MetadataValue.int(depth),
        "max_queue_depth": dg.MetadataValue.int(reading.max_queue_depth)})


def wait_verdict(reading: QueueReading, max_wait: timedelta) -> Verdict:
    """Fails when an order has waited longer than `max_wait` to be staged or promoted.

    Severity ERROR when nothing was promoted within `max_wait` either (stalled: no run
    drains the queue), WARN when promotions go on but fall behind (add workers).
    """
    g, limit = reading.gauges, max_wait.total_seconds()
    waited = max(g.oldest_queued_wait_seconds, g.oldest_staged_wait_seconds)
    since = reading.since_last_promotion_seconds
    promoting = since is not None and since <= limit
    passed = waited <= limit
    if passed:
        verdict = "no order waits longer than the limit"
    elif promoting:
        verdict = ("orders wait longer than the limit while promotions go on: ingest falls "
                   "behind; add workers or look at the run durations")
    else:
        verdict = ("stalled: orders wait longer than the limit and nothing was promoted "
                   "meanwhile; is `completion_signal_sensor` running, the daemon up, do "
                   "`ingest_orders` runs fail?")
    metadata: dict[str, dg.MetadataValue] = {
        "waited_seconds": seconds(waited),
        "max_order_wait_seconds": seconds(limit),
        "oldest_queued_wait_seconds": seconds(g.oldest_queued_wait_seconds),
        "oldest_staged_wait_seconds": seconds(g.oldest_staged_wait_seconds),
        "queue_depth": dg.MetadataValue.int(g.queue_depth),
        "staged_batches": dg.MetadataValue.int(g.staged_batches),
        "promoted_within_limit": dg.MetadataValue.bool(promoting),
        "verdict": dg.MetadataValue.text(verdict),
    }
    if since is not None:
        metadata["seconds_since_last_promotion"] = seconds(since)
    lagging = promoting and not passed
    severity = dg.AssetCheckSeverity.WARN if lagging else dg.AssetCheckSeverity.ERROR
    return Verdict(WAIT_CHECK, passed, severity, metadata)


@dataclass(frozen=True)
class QueueMonitor:
    """The queue's checks (runnable from the UI) and the sensor that evaluates them."""
    checks: dg.AssetChecksDefinition
    sensor: dg.SensorDefinition


def queue_monitor(max_wait: timedelta = MAX_ORDER_WAIT) -> QueueMonitor:
    """The checks and observation sensor of `ingestion_queue`, failing past `max_wait`."""
    limit = f"{max_wait.total_seconds():g} seconds"

    @dg.multi_asset_check(
        name="queue_checks",
        specs=[
            dg.AssetCheckSpec(DEPTH_CHECK, asset=INGESTION_QUEUE.key, description="""
Warns while the ingestion queue is deeper than `MAX_QUEUE_DEPTH`, i.e. producers are held back
by backpressure: add workers or look for a stalled run."""),
            dg.AssetCheckSpec(WAIT_CHECK, asset=INGESTION_QUEUE.key, description=f"""
Fails when an order has waited longer than {limit} to be staged (oldest queued order) or
promoted (oldest staged batch). Severity ERROR when nothing was promoted in that time either
(stalled: sensor off, daemon down, runs failing), WARN when promotions go on but fall behind.
Evaluated every minute by `queue_observation_sensor`, without a run."""),
        ],
    )
    def queue_checks(redis: RedisResource, postgres: PostgresResource,
                     pipeline: PipelineResource) -> Iterator[dg.AssetCheckResult]:
        reading = read_queue(redis, postgres, pipeline)
        yield depth_verdict(reading).result()
        yield wait_verdict(reading, max_wait).result()

    @dg.sensor(
        name="queue_observation_sensor",
        minimum_interval_seconds=OBSERVE_EVERY_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"""Every {OBSERVE_EVERY_SECONDS} s, without launching a run: records an
observation of `ingestion_queue` (depth, oldest order's wait, batches in flight and
quarantined) and evaluates its checks (orders waiting longer than {limit} fail).""",
    )
    def queue_observation_sensor(redis: RedisResource, postgres: PostgresResource,
                                 pipeline: PipelineResource) -> dg.SensorResult:
        reading = read_queue(redis, postgres, pipeline)
        return dg.SensorResult(asset_events=[
            observation(reading), depth_verdict(reading).evaluation(),
            wait_verdict(reading, max_wait).evaluation()])

    return QueueMonitor(queue_checks, queue_observation_sensor)


MONITOR = queue_monitor()
