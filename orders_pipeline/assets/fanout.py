"""The fan-out area: the stream of promoted orders as an external asset, observed on its clock.

`promoted_orders` relays every promotion into the Redis stream `{P}:promoted` (its metadata
`entries_published`); consumer groups outside Dagster read it (`orders-pipeline consume`,
`PromotedStream.consume`). `promoted_stream_observation_sensor` records, every minute and
without a run, the stream's length, the outbox backlog and each group's lag and pending
entries, and evaluates the check that the relay keeps up (also runnable from the UI).
"""

from dataclasses import dataclass
from datetime import timedelta

import dagster as dg

from orders_pipeline.assets import GROUP, OWNERS
from orders_pipeline.assets.catalog import REDIS_KEY
from orders_pipeline.assets.common import seconds
from orders_pipeline.assets.orders import PROMOTED_ORDERS
from orders_pipeline.postgres_patterns.promoted_outbox import Backlog, backlog
from orders_pipeline.redis_patterns.promoted_stream import GroupLag, PromotedStream
from orders_pipeline.resources import PostgresResource, RedisResource

PROMOTED_STREAM = dg.AssetSpec(
    "promoted_stream",
    group_name=GROUP,
    owners=OWNERS,
    kinds={"redis"},
    deps=[PROMOTED_ORDERS],
    description="""
**Promoted orders, fanned out**: the Redis stream `{P}:promoted`, one entry per order promoted
into `orders` (field `key`: the idempotency key, the order id; `order`: its row as JSON), for
any number of consumer groups to read at least once (`orders-pipeline consume --group NAME --
COMMAND`). Promotion lists the ids it inserted in the outbox table `promoted_outbox` in its
own transaction; the relay at the end of every `promoted_orders` step (and `orders-pipeline
relay`) publishes them. Entries every group acknowledged are trimmed. External: written by the
relay, read by consumers outside Dagster.

Observed every minute by `promoted_stream_observation_sensor`: `stream_length`, the outbox
backlog, and each group's `lag` (entries not delivered yet) and `pending` (delivered, not
acknowledged), also as the table `groups`.
""",
    metadata={REDIS_KEY: "{P}:promoted"},
)

MAX_RELAY_WAIT = timedelta(minutes=10)
OBSERVE_EVERY_SECONDS = 60
RELAY_CHECK = "promoted_orders_relayed"
_GROUPS_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("group", "string", description="consumer group"),
    dg.TableColumn("consumers", "int", description="consumers the group has seen"),
    dg.TableColumn("lag", "int", description="entries not delivered to the group yet "
                                             "(-1: unknown, entries were deleted by hand)"),
    dg.TableColumn("pending", "int", description="entries delivered, not acknowledged"),
])


@dataclass(frozen=True)
class StreamReading:
    """The stream's length, its consumer groups and the outbox backlog."""
    length: int
    groups: list[GroupLag]
    outbox: Backlog


def read_stream(redis: RedisResource, postgres: PostgresResource) -> StreamReading:
    stream = PromotedStream(redis.client(), redis.key_space())
    with postgres.connection() as conn:
        waiting = backlog(conn)
    return StreamReading(stream.length(), stream.groups(), waiting)


def observation(reading: StreamReading) -> dg.AssetObservation:
    """The numbers plotted for `promoted_stream`: totals, then `lag:<group>` and
    `pending:<group>` for each group."""
    metadata: dict[str, dg.MetadataValue] = {
        "stream_length": dg.MetadataValue.int(reading.length),
        "consumer_groups": dg.MetadataValue.int(len(reading.groups)),
        "outbox_rows": dg.MetadataValue.int(reading.outbox.rows),
        "outbox_orders": dg.MetadataValue.int(reading.outbox.orders),
        "oldest_outbox_wait_seconds": seconds(reading.outbox.oldest_seconds),
        "groups": dg.MetadataValue.table(schema=_GROUPS_SCHEMA, records=[
            dg.TableRecord({"group": g.name, "consumers": g.consumers,
                            "lag": -1 if g.lag is None else g.lag, "pending": g.pending})
            for g in reading.groups]),
    }
    for g in reading.groups:
        if g.lag is not None:
            metadata[f"lag:{g.name}"] = dg.MetadataValue.int(g.lag)
        metadata[f"pending:{g.name}"] = dg.MetadataValue.int(g.pending)
    return dg.AssetObservation(asset_key=PROMOTED_STREAM.key, metadata=metadata)


def relay_verdict(reading: StreamReading) -> tuple[bool, dict[str, dg.MetadataValue]]:
    """Passes unless an outbox row has waited longer than MAX_RELAY_WAIT for the relay."""
    waited, limit = reading.outbox.oldest_seconds, MAX_RELAY_WAIT.total_seconds()
    return waited <= limit, {
        "oldest_outbox_wait_seconds": seconds(waited),
        "max_relay_wait_seconds": seconds(limit),
        "outbox_rows": dg.MetadataValue.int(reading.outbox.rows),
        "outbox_orders": dg.MetadataValue.int(reading.outbox.orders),
    }


@dg.asset_check(asset=PROMOTED_STREAM.key, name=RELAY_CHECK, description=f"""
Fails when a promoted batch has waited longer than {MAX_RELAY_WAIT.total_seconds():g} seconds
in the outbox `promoted_outbox` for the relay to publish it to the stream: promotions stopped
relaying (Redis refuses the entries, e.g. full) and no `orders-pipeline relay` runs. Evaluated
every minute by `promoted_stream_observation_sensor`, without a run.""")
def promoted_orders_relayed(redis: RedisResource,
                            postgres: PostgresResource) -> dg.AssetCheckResult:
    passed, metadata = relay_verdict(read_stream(redis, postgres))
    return dg.AssetCheckResult(passed=passed, metadata=metadata)


@dg.sensor(
    name="promoted_stream_observation_sensor",
    minimum_interval_seconds=OBSERVE_EVERY_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"""Every {OBSERVE_EVERY_SECONDS} s, without launching a run: records an
observation of `promoted_stream` (length, outbox backlog, each consumer group's lag and
pending entries) and evaluates `{RELAY_CHECK}` (a batch waiting over
{MAX_RELAY_WAIT.total_seconds():g} seconds to be relayed fails).""",
)
def promoted_stream_observation_sensor(redis: RedisResource,
                                       postgres: PostgresResource) -> dg.SensorResult:
    reading = read_stream(redis, postgres)
    passed, metadata = relay_verdict(reading)
    return dg.SensorResult(asset_events=[observation(reading), dg.AssetCheckEvaluation(
        asset_key=PROMOTED_STREAM.key, check_name=RELAY_CHECK, passed=passed,
        metadata=metadata, severity=dg.AssetCheckSeverity.ERROR)])
