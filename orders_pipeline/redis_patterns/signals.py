"""Completion signals: pub/sub for live listeners plus a stream as the durable record.

Pub/sub forgets what nobody hears, so every signal is also appended to `{P}:signals`; the
Dagster sensor reads that stream from its cursor without blocking. `bridge_published` copies
signals from upstream systems that can only PUBLISH into the stream.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from orders_pipeline.redis_patterns.keys import RedisKeys

STREAM_MAX_LEN = 100_000
SEEN_TTL_SECONDS = 7 * 24 * 3600
MAX_BATCH_ID_LENGTH = 128

# KEYS: seen marker, stream   ARGV: ttl, maxlen, message
_APPEND_ONCE = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', tonumber(ARGV[1])) then return false end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[2]), '*',
                  'data', ARGV[3], 'bridged', '1')
"""


@dataclass(frozen=True)
class Signal:
    stream_id: str
    batch_id: str
    count: int
    published_at: str


def signal_message(batch_id: str, count: int) -> bytes:
    payload = {"batch_id": batch_id, "count": count,
               "published_at": datetime.now(UTC).isoformat()}
    return json.dumps(payload, separators=(",", ":")).encode()


class CompletionSignals:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self._append_once = client.register_script(_APPEND_ONCE)

    def record(self, pipe: redis.client.Pipeline, batch_id: str, count: int) -> None:
        """Queue the durable record and the broadcast of one signal on `pipe`."""
        message = signal_message(batch_id, count)
        pipe.set(self.keys.signal_seen(batch_id), 1, ex=SEEN_TTL_SECONDS)
        pipe.xadd(self.keys.signals_stream, {"data": message},
                  maxlen=STREAM_MAX_LEN, approximate=True)
        pipe.publish(self.keys.signals_channel, message)

    def append(self, message: bytes) -> str | None:
        """Record a signal heard on pub/sub unless its batch is already recorded.

        Returns the new stream id; None for a malformed or already-recorded signal.
        """
        try:
            body = json.loads(message)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(body, dict) or not isinstance(body.get("batch_id"), str):
            return None
        batch_id = body["batch_id"][:MAX_BATCH_ID_LENGTH]
        stream_id = self._append_once(
            keys=[self.keys.signal_seen(batch_id), self.keys.signals_stream],
            args=[SEEN_TTL_SECONDS, STREAM_MAX_LEN, message],
        )
        return stream_id.decode() if stream_id else None

    def read_after(self, cursor: str | None, limit: int = 1000) -> list[Signal]:
        """Signals recorded after `cursor` (exclusive); never blocks."""
        start = f"({cursor}" if cursor else "-"
        entries = self.client.xrange(self.keys.signals_stream, min=start, max="+", count=limit)
        signals = []
        for stream_id, fields in entries:
            try:
                body = json.loads(fields.get(b"data", b"{}"))
            except ValueError:
                body = {}
            signals.append(Signal(
                stream_id=stream_id.decode(),
                batch_id=str(body.get("batch_id", "")),
                count=int(body.get("count", 0) or 0),
                published_at=str(body.get("published_at", "")),
            ))
        return signals

    def bridge_published(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Subscribe to `{P}:ingested` and record the signals that were only published."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.keys.signals_channel)
        bridged = 0
        try:
            while not should_stop():
                message = pubsub.get_message(timeout=1.0)
                if message and message.get("type") == "message" and self.append(message["data"]):
                    bridged += 1
        finally:
            pubsub.close()
        return bridged
