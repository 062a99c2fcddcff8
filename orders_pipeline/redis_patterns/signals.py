"""Completion signals: pub/sub for live listeners plus a stream as the durable record.

Pub/sub forgets what nobody hears, so every signal is also appended to `{P}:signals`; the
Dagster sensor reads that stream from its cursor without blocking. `bridge_published` copies
signals from upstream systems that can only PUBLISH into the stream.

A signal is one JSON object (DESIGN.md "Completion signals"), checked by `parse_signal`
wherever a signal enters: `record` builds only signals that pass it, `append` (the `listen`
bridge) refuses the rest with a log line and the counter `signals_refused`, and `read_after`
skips and reports stream entries that do not pass it (written by an older version or by
hand), so malformed data never stops the sensor.
"""

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from orders_pipeline import contract
from orders_pipeline.redis_patterns.keys import RedisKeys

log = logging.getLogger(__name__)

STREAM_MAX_LEN = 100_000
SEEN_TTL_SECONDS = 7 * 24 * 3600
MAX_SIGNAL_BYTES = 8192
MAX_BATCH_ID_LENGTH = 256
MAX_SIGNAL_COUNT = 2**63 - 1
REFUSED_COUNTER = "signals_refused"
# Where a discarded cursor restarts: before every entry (XADD never issues 0-0).
RESET_CURSOR = "0-0"
MAX_STREAM_ID_PART = 2**64 - 1

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_STREAM_ID = re.compile(r"(?P<ms>[0-9]{1,20})-(?P<seq>[0-9]{1,20})")

# KEYS: seen marker, stream   ARGV: ttl, maxlen, message
_APPEND_ONCE = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', tonumber(ARGV[1])) then return false end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[2]), '*',
                  'data', ARGV[3], 'bridged', '1')
"""


class SignalError(ValueError):
    """A message that is not a completion signal; the text is the one-line reason."""


@dataclass(frozen=True)
class SignalBody:
    """The fields of a valid signal: `count` orders in batch `batch_id`, sent at `published_at`."""
    batch_id: str
    count: int
    published_at: str


@dataclass(frozen=True)
class Signal:
    """A valid signal as recorded in the stream under `stream_id`."""
    stream_id: str
    batch_id: str
    count: int
    published_at: str


@dataclass(frozen=True)
class SkippedEntry:
    """A stream entry that is not a valid signal, and why."""
    stream_id: str
    reason: str


@dataclass(frozen=True)
class SignalPage:
    """What one `read_after` found.

    `signals` are the valid entries and `skipped` the others, both in stream order; `first_id`
    and `last_id` bound every entry read (None when none was). `cursor` is where the next read
    starts: `last_id`, else the cursor as given, or `RESET_CURSOR` when the given one was
    discarded, in which case `cursor_reset` says why.
    """
    signals: list[Signal]
    skipped: list[SkippedEntry]
    first_id: str | None
    last_id: str | None
    cursor: str | None
    cursor_reset: str | None = None


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    body: dict[str, object] = {}
    for key, value in pairs:
        if key in body:
            raise SignalError(f"signal repeats the key {key[:64]!r}")
        body[key] = value
    return body


def _reject_constant(name: str) -> float:
    raise SignalError(f"signal is not JSON: {name} is not a JSON number")


def _check_instant(value: object) -> str:
    """`value` if it is a string in the DESIGN.md timestamp grammar, else SignalError."""
    if not isinstance(value, str):
        raise SignalError(f"published_at is a JSON {_json_type(value)}, not a string")
    reason = contract.timestamp_reason(value, "published_at")
    if reason is not None:
        raise SignalError(f"{reason}: {value[:64]!r}")
    return value


def _check_batch_id(value: object) -> str:
    if not isinstance(value, str):
        raise SignalError(f"batch_id is a JSON {_json_type(value)}, not a string")
    if not value:
        raise SignalError("batch_id is empty")
    if len(value) > MAX_BATCH_ID_LENGTH:
        raise SignalError(f"batch_id has {len(value)} characters, more than "
                          f"{MAX_BATCH_ID_LENGTH}")
    if control := _CONTROL.search(value):
        raise SignalError(f"batch_id contains the control character U+{ord(control[0]):04X}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise SignalError("batch_id contains a lone surrogate (not encodable as UTF-8)"
                          ) from None
    return value


def _check_count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SignalError(f"count is a JSON {_json_type(value)}, not an integer")
    if not 0 <= value <= MAX_SIGNAL_COUNT:
        raise SignalError(f"count {value} is outside 0..{MAX_SIGNAL_COUNT}")
    return value


def parse_signal(message: bytes) -> SignalBody:
    """Check one signal message and return its fields.

    A signal is UTF-8 JSON, one object without repeated keys, holding `batch_id` (a string of
    1..MAX_BATCH_ID_LENGTH characters, no control characters), `count` (a JSON integer
    0..MAX_SIGNAL_COUNT, not a boolean or a string) and `published_at` (ISO 8601 date-time with
    an offset, grammar of DESIGN.md "Value rules"); other keys are ignored. The whole message
    is at most MAX_SIGNAL_BYTES bytes. Raises SignalError with a one-line reason otherwise.
    """
    if len(message) > MAX_SIGNAL_BYTES:
        raise SignalError(f"signal is {len(message)} bytes, more than {MAX_SIGNAL_BYTES}")
    try:
        text = message.decode()
    except UnicodeDecodeError as exc:
        raise SignalError(f"signal is not UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, object_pairs_hook=_unique_keys,
                          parse_constant=_reject_constant)
    except SignalError:
        raise
    except ValueError as exc:
        raise SignalError(f"signal is not JSON: {exc}") from None
    except RecursionError:
        raise SignalError("signal is not JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise SignalError(f"signal is a JSON {_json_type(body)}, not an object")
    missing = [f for f in ("batch_id", "count", "published_at") if f not in body]
    if missing:
        raise SignalError(f"signal has no {', '.join(missing)}")
    return SignalBody(_check_batch_id(body["batch_id"]), _check_count(body["count"]),
                      _check_instant(body["published_at"]))


def signal_message(batch_id: str, count: int) -> bytes:
    """The JSON signal for `count` orders of `batch_id`, published now.

    Raises SignalError if `batch_id` or `count` would make it invalid (see `parse_signal`).
    """
    payload = {"batch_id": batch_id, "count": count,
               "published_at": datetime.now(UTC).isoformat()}
    message = json.dumps(payload, separators=(",", ":")).encode()
    parse_signal(message)
    return message


def _stream_id(text: str) -> tuple[int, int] | None:
    """(ms, seq) of a complete stream id `ms-seq`, or None if `text` is not one."""
    match = _STREAM_ID.fullmatch(text)
    if match is None:
        return None
    ms, seq = int(match["ms"]), int(match["seq"])
    return (ms, seq) if ms <= MAX_STREAM_ID_PART and seq <= MAX_STREAM_ID_PART else None


def _cursor_problem(cursor: str) -> str | None:
    """Why reading after `cursor` would go wrong, or None if it is a usable cursor."""
    position = _stream_id(cursor)
    if position is None:
        return f"cursor {cursor[:64]!r} is not a stream id (ms-seq)"
    if position == (MAX_STREAM_ID_PART, MAX_STREAM_ID_PART):
        return f"cursor {cursor!r} is the largest stream id: nothing can follow it"
    return None


class CompletionSignals:
    """Record, bridge and read completion signals of one key space."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self._append_once = client.register_script(_APPEND_ONCE)

    def record(self, pipe: redis.client.Pipeline, batch_id: str, count: int) -> None:
        """Queue the durable record and the broadcast of one signal on `pipe`.

        Raises SignalError (before queueing anything) for a batch id or count that would not
        make a valid signal.
        """
        message = signal_message(batch_id, count)
        pipe.set(self.keys.signal_seen(batch_id), 1, ex=SEEN_TTL_SECONDS)
        pipe.xadd(self.keys.signals_stream, {"data": message},
                  maxlen=STREAM_MAX_LEN, approximate=True)
        # PUBLISH by name: a Redis Cluster pipeline refuses `pipe.publish` (redis-py blocks the
        # method), yet sends the command, routed by the channel's slot (the prefix's).
        pipe.execute_command("PUBLISH", self.keys.signals_channel, message)

    def record_alone(self, batch_id: str, count: int) -> None:
        """`record` in a MULTI of its own: for a signal whose writes share no slot with the
        caller's (another shard's push or requeue, a restore's signal)."""
        pipe = self.client.pipeline(transaction=True)
        self.record(pipe, batch_id, count)
        pipe.execute()

    def append(self, message: bytes) -> str | None:
        """Record a signal heard on pub/sub unless its batch is already recorded.

        A malformed signal is refused: one warning line with the reason, `signals_refused` in
        `{P}:counters` incremented, nothing recorded. Returns the new stream id; None for a
        refused or already-recorded signal.
        """
        try:
            body = parse_signal(message)
        except SignalError as exc:
            self.client.hincrby(self.keys.counters, REFUSED_COUNTER, 1)
            log.warning("refused a completion signal on %s: %s; message %r",
                        self.keys.signals_channel, exc, message[:200])
            return None
        stream_id = self._append_once(
            keys=[self.keys.signal_seen(body.batch_id), self.keys.signals_stream],
            args=[SEEN_TTL_SECONDS, STREAM_MAX_LEN, message],
        )
        return stream_id.decode() if stream_id else None

    def _ahead_of_stream(self, cursor: str) -> str | None:
        """Why `cursor` is past the newest entry (stream recreated or restored), or None."""
        newest = self.client.xrevrange(self.keys.signals_stream, count=1)
        if not newest:
            return None
        newest_id = newest[0][0].decode()
        newest_at, cursor_at = _stream_id(newest_id), _stream_id(cursor)
        if newest_at is not None and cursor_at is not None and newest_at < cursor_at:
            return f"cursor {cursor!r} is past the newest entry {newest_id}"
        return None

    def _entries_after(self, start: str | None, limit: int) -> list[tuple[bytes, dict]]:
        return self.client.xrange(self.keys.signals_stream,
                                  min=f"({start}" if start else "-", max="+", count=limit)

    def read_after(self, cursor: str | None, limit: int = 1000) -> SignalPage:
        """Up to `limit` stream entries after `cursor` (exclusive), split into valid signals
        and skipped entries; never blocks and never raises on data.

        A cursor that is not a complete stream id (e.g. "garbage", ""), or one past the newest
        entry (the stream was recreated, or restored from an older copy, so new entries would
        never pass it), is discarded and the read restarts from the oldest retained entry
        (`RESET_CURSOR`). That may hand some signals to a second run, never lose one: ingest
        runs are idempotent (a run drains what is queued and redoes nothing done), and a run
        key names a stream-id range, so a re-read range yields a new, harmless run. Resetting
        to the newest entry instead would drop every signal no run has handled yet.
        """
        reset = None if cursor is None else _cursor_problem(cursor)
        start = RESET_CURSOR if reset else cursor
        entries = self._entries_after(start, limit)
        if not entries and start and not reset:
            reset = self._ahead_of_stream(start)
            if reset:
                start = RESET_CURSOR
                entries = self._entries_after(start, limit)
        signals: list[Signal] = []
        skipped: list[SkippedEntry] = []
        for raw_id, fields in entries:
            stream_id = raw_id.decode()
            data = fields.get(b"data")
            if data is None:
                skipped.append(SkippedEntry(stream_id, "entry has no 'data' field"))
                continue
            try:
                body = parse_signal(data)
            except SignalError as exc:
                skipped.append(SkippedEntry(stream_id, str(exc)))
                continue
            signals.append(Signal(stream_id, body.batch_id, body.count, body.published_at))
        first_id = entries[0][0].decode() if entries else None
        last_id = entries[-1][0].decode() if entries else None
        return SignalPage(signals, skipped, first_id, last_id,
                          cursor=last_id or start, cursor_reset=reset)

    def latest_id(self) -> str:
        """Id of the newest stream entry (RESET_CURSOR when there is none): a mark for
        `wait_after`."""
        newest = self.client.xrevrange(self.keys.signals_stream, count=1)
        return newest[0][0].decode() if newest else RESET_CURSOR

    def wait_after(self, stream_id: str, timeout_seconds: float) -> bool:
        """Block until the stream holds an entry after `stream_id`, at most `timeout_seconds`
        (rounded up to whole ms); True if one arrived. For workers waiting for work, never
        for sensors (a tick must not block)."""
        block_ms = max(1, int(timeout_seconds * 1000 + 0.999))
        return bool(self.client.xread({self.keys.signals_stream: stream_id}, count=1,
                                      block=block_ms))

    def bridge_published(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Subscribe to `{P}:ingested` and record the signals that were only published.

        Returns how many were recorded; malformed ones are refused by `append`.
        """
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
