"""Fan-out of promoted orders: the relay from the outbox to `{P}:promoted`, and consumers.

Promotion writes the ids of the orders it inserted to the outbox (`promoted_outbox`) in the
same transaction. `relay` moves them into the Redis stream, one entry per order, and every
consumer group reads the whole stream (`PromotedStream.consume`; from a shell,
`orders-pipeline consume --group NAME -- COMMAND`, which runs COMMAND once per entry).

Delivery is at least once, end to end: the relay deletes an outbox row only after its entries
are in Redis (killed in between, it publishes the row again: the copies carry the same
idempotency key, the order id), and a consumer acknowledges an entry only after its handler
returned (killed in between, the entry is handed out again). A handler that makes its effect
conditional on the key has it exactly once.
"""

import dataclasses
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orders_pipeline.connections import pg_pool, redis_client
from orders_pipeline.faults import crash_point
from orders_pipeline.postgres_patterns import promoted_outbox
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.promoted_stream import (
    Handler,
    PromotedEntry,
    PromotedOrder,
    PromotedStream,
)
from orders_pipeline.settings import Settings

# What `command_handler` tells the command besides the entry on stdin.
KEY_ENV = "ORDERS_PIPELINE_IDEMPOTENCY_KEY"
STREAM_ID_ENV = "ORDERS_PIPELINE_STREAM_ID"
GROUP_ENV = "ORDERS_PIPELINE_GROUP"


@dataclass
class RelayResult:
    """What `relay` did: outbox rows relayed (and deleted), stream entries published, orders
    promoted while no consumer group existed (not published: nobody to deliver them to),
    listed orders no longer in `orders` (deleted by hand since), entries trimmed, seconds."""
    rows: int = 0
    entries: int = 0
    unheard: int = 0
    missing: int = 0
    trimmed: int = 0
    seconds: float = 0.0

    def add(self, other: "RelayResult") -> None:
        """Add another relay's counts and seconds to these."""
        for name in (f.name for f in dataclasses.fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def promoted_stream(settings: Settings) -> PromotedStream:
    """The stream of this deployment's key prefix."""
    return PromotedStream(redis_client(settings.redis), RedisKeys.of(settings.redis))


def relay(settings: Settings) -> RelayResult:
    """Publish every outbox row, oldest first, then trim the stream; returns what it did.

    One transaction per row, under the relay lock: with no consumer group on the stream,
    every row up to the newest is deleted unpublished (a group receives the orders promoted
    after it was created; the rows were committed before the groups were looked at). Else
    the row's orders are read from `orders`, added to the stream in one MULTI, and the row
    is deleted. A relay killed after the MULTI publishes that row again: at least once.
    Redis or Postgres errors propagate; what was not deleted is published by the next call.
    """
    started = time.perf_counter()
    stream = promoted_stream(settings)
    result = RelayResult()
    with pg_pool(settings.postgres).connection() as conn:
        while True:
            with conn.transaction():
                promoted_outbox.lock_relay(conn)
                row = promoted_outbox.oldest(conn)
                if row is None:
                    break
                if not stream.groups():
                    rows, orders = promoted_outbox.delete_through(conn, row.newest_id)
                    result.rows += rows
                    result.unheard += orders
                    continue
                documents = promoted_outbox.order_documents(conn, row.outbox_id)
                result.entries += stream.publish(row.outbox_id, row.batch_id, [
                    PromotedOrder(order_id, document) for order_id, document in documents])
                crash_point("after_relay_publish")
                promoted_outbox.delete_through(conn, row.outbox_id)
                result.rows += 1
                result.missing += row.orders - len(documents)
    result.trimmed = stream.trim()
    result.seconds = time.perf_counter() - started
    return result


def follow_relay(settings: Settings, stop: threading.Event, interval_seconds: float,
                 on_relay: Callable[[RelayResult], None]) -> RelayResult:
    """`relay` every `interval_seconds` until `stop` is set; `on_relay` gets each result that
    relayed something. Returns the totals."""
    total = RelayResult()
    while True:
        result = relay(settings)
        total.add(result)
        if result.rows:
            on_relay(result)
        if stop.wait(interval_seconds):
            return total


def default_consumer() -> str:
    """A consumer name unique to this process: `HOST-PID`."""
    return f"{socket.gethostname()}-{os.getpid()}"


def command_handler(command: Sequence[str], group: str,
                    on_failure: Callable[[PromotedEntry, int], None]) -> Handler:
    """A handler that runs `command` once per entry: the entry's JSON document
    (`PromotedEntry.document`) on stdin, the idempotency key in `KEY_ENV`, the stream id in
    `STREAM_ID_ENV` and the group in `GROUP_ENV`; its stdout and stderr are the consumer's.
    Exit code 0 acknowledges the entry; any other is reported to `on_failure(entry, code)`
    and leaves it pending (redelivered after the lease). Raises ValueError, before anything
    runs, if `command` is empty or its program is not found."""
    if not command or shutil.which(command[0]) is None:
        raise ValueError(f"command not found: {command[0] if command else ''!r}")

    def run(entry: PromotedEntry) -> bool:
        env = {**os.environ, KEY_ENV: entry.key, STREAM_ID_ENV: entry.stream_id,
               GROUP_ENV: group}
        code = subprocess.run(list(command), input=entry.document(), env=env,
                              check=False).returncode
        if code != 0:
            on_failure(entry, code)
        return code == 0
    return run
