"""The stream of promoted orders, `{P}:promoted`: publish, consume in groups, trim safely.

One entry per promoted order (README "Fan-out"), fields:
- `key`: the idempotency key, the order's `order_id`; every copy of an order carries it.
- `order`: the order's row of `orders` as a JSON object (UTF-8; money as exact JSON number
  literals: parse them with `Decimal`; timestamps ISO 8601 in UTC).
- `batch_id`: the batch that promoted it; `outbox_id`: the outbox row it was relayed from.

Any number of consumer groups read the stream, each at least once: `consume` reads with
XREADGROUP, hands each entry to a handler, and XACKs it only after the handler returned.
The lease on the entries a consumer holds (read, not yet handled) is renewed every third of
the lease; an entry whose consumer died (no renewal for `lease_seconds`) is taken over by
any consumer of the group with XAUTOCLAIM. A consumer restarted under the same name first
re-reads what it had been handed and not acknowledged. Redelivered entries carry the same
`key`, so a handler that makes its effect conditional on it (e.g. INSERT ... ON CONFLICT DO
NOTHING on the key) has it exactly once.

`trim` drops exactly the entries every group has acknowledged (XTRIM MINID to the oldest
entry some group has pending or not yet read), in one Lua script, so a slow group never loses
an entry it has not acknowledged, however reads, acks, claims and trims interleave.
"""

import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis

from orders_pipeline.faults import crash_point
from orders_pipeline.redis_patterns.keys import RedisKeys

log = logging.getLogger(__name__)

# Where a new group starts: after the newest entry, so it receives what is published after it
# was created (the stream holds only what existing groups have not acknowledged).
NEW_GROUP_START = "$"
MAX_NAME_LENGTH = 200
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

# KEYS: stream. Trim to the oldest entry that some group has pending (XPENDING's smallest id)
# or has not read yet (the one after its last-delivered-id); without groups nobody will read
# what is there (new groups start at `$`): trim it all. Returns entries removed.
_TRIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local keep_ms, keep_seq, keep_id = nil, nil, nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local id = info['last-delivered-id']
  local step = 1
  if info['pending'] > 0 then
    id = redis.call('XPENDING', KEYS[1], info['name'])[2]
    step = 0
  end
  local dash = string.find(id, '-', 1, true)
  local ms, seq = tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
  seq = seq + step
  if keep_ms == nil or ms < keep_ms or (ms == keep_ms and seq < keep_seq) then
    keep_ms, keep_seq = ms, seq
    keep_id = string.sub(id, 1, dash) .. string.format('%d', seq)
  end
end
if keep_id == nil then return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0) end
return redis.call('XTRIM', KEYS[1], 'MINID', keep_id)
"""

# KEYS: stream   ARGV: group, consumer, entry ids. Renew the lease on the entries this
# consumer still holds (reset their idle time), leaving those another consumer took over.
_RENEW = """
local claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    claim[#claim + 1] = ARGV[i]
  end
end
if #claim == 5 then return 0 end
claim[#claim + 1] = 'JUSTID'
redis.call(unpack(claim))
return #claim - 6
"""


class BadName(ValueError):
    """A group or consumer name that is empty, too long or holds control characters."""


def check_name(kind: str, name: str) -> str:
    """`name` if it is a usable group or consumer name (1..MAX_NAME_LENGTH characters, no
    control characters), else BadName naming `kind` and why."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise BadName(f"{kind} name must have 1 to {MAX_NAME_LENGTH} characters, got "
                      f"{len(name)}")
    if _CONTROL.search(name):
        raise BadName(f"{kind} name {name[:64]!r} contains a control character")
    return name


@dataclass(frozen=True)
class PromotedOrder:
    """One order to publish: its idempotency key and its row as JSON text."""
    key: str
    order_json: str


@dataclass(frozen=True)
class PromotedEntry:
    """One entry as a consumer receives it: `stream_id`, the idempotency `key` (order_id),
    the order's JSON text `order_json`, the `batch_id` and `outbox_id` it came from."""
    stream_id: str
    key: str
    order_json: str
    batch_id: str
    outbox_id: int

    @property
    def order(self) -> dict[str, Any]:
        """The order as a dict; numbers that have a fraction are exact `Decimal`s."""
        parsed: dict[str, Any] = json.loads(self.order_json, parse_float=Decimal)
        return parsed

    def document(self) -> bytes:
        """The entry as one JSON object (what `orders-pipeline consume` writes on a command's
        stdin): `stream_id`, `idempotency_key`, `batch_id`, `outbox_id`, and `order` exactly
        as published."""
        head = json.dumps({"stream_id": self.stream_id, "idempotency_key": self.key,
                           "batch_id": self.batch_id, "outbox_id": self.outbox_id},
                          separators=(",", ":"))
        return f'{head[:-1]},"order":{self.order_json}}}'.encode()


@dataclass(frozen=True)
class GroupLag:
    """One consumer group: `consumers`, `pending` (delivered, not acknowledged), `lag`
    (not delivered yet; None when Redis cannot tell, after entries were deleted by hand) and
    `last_delivered_id`."""
    name: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str


@dataclass
class ConsumeStats:
    """What one `consume` call did: entries handled and acknowledged, handled but left
    pending (the handler returned False), taken over from dead consumers (XAUTOCLAIM),
    re-read from this consumer's own pending list, and acknowledged without a handler call
    because their entry was gone (deleted by hand)."""
    acked: int = 0
    failed: int = 0
    taken_over: int = 0
    resumed: int = 0
    gone: int = 0


# One entry as XREADGROUP/XAUTOCLAIM return it: id, fields (None once deleted).
RawEntry = tuple[str, dict[bytes, bytes] | None]


# A handler receives an entry; returning False (or raising) leaves it unacknowledged.
Handler = Callable[[PromotedEntry], bool | None]


class PromotedStream:
    """Publish, consume and trim `{P}:promoted`."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.key = keys.promoted
        self._trim = client.register_script(_TRIM)
        self._renew = client.register_script(_RENEW)

    # ------------------------------------------------------------------ publishing

    def publish(self, outbox_id: int, batch_id: str, orders: Sequence[PromotedOrder]) -> int:
        """Add one entry per order, all in one MULTI (all or none); returns entries added."""
        if not orders:
            return 0
        pipe = self.client.pipeline(transaction=True)
        for order in orders:
            pipe.xadd(self.key, {"key": order.key, "order": order.order_json,
                                 "batch_id": batch_id, "outbox_id": outbox_id})
        pipe.execute()
        return len(orders)

    def trim(self) -> int:
        """Drop the entries every group has acknowledged (see `_TRIM`); returns how many."""
        return int(self._trim(keys=[self.key]))

    # ------------------------------------------------------------------ groups

    def ensure_group(self, group: str, start: str = NEW_GROUP_START) -> bool:
        """Create the consumer group (and the stream) unless it exists; True if created.
        Raises BadName for an unusable name."""
        check_name("group", group)
        try:
            self.client.xgroup_create(self.key, group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    def groups(self) -> list[GroupLag]:
        """Every consumer group with its backlog (empty if the stream does not exist)."""
        try:
            found = self.client.xinfo_groups(self.key)
        except redis.ResponseError as exc:
            if "no such key" not in str(exc):
                raise
            return []
        return [GroupLag(_text(g["name"]), int(g["consumers"]), int(g["pending"]),
                         None if g.get("lag") is None else int(g["lag"]),
                         _text(g["last-delivered-id"])) for g in found]

    def length(self) -> int:
        """Entries in the stream now."""
        return int(self.client.xlen(self.key))

    # ------------------------------------------------------------------ consuming

    def consume(self, group: str, consumer: str, handler: Handler, *,
                lease_seconds: float = 30.0, count: int = 100, block_seconds: float = 1.0,
                should_stop: Callable[[], bool] = lambda: False,
                drain: bool = False) -> ConsumeStats:
        """Hand every entry of `group` to `handler` as `consumer`, acknowledging each after it.

        Creates the group if needed (`ensure_group`). First re-reads the entries this consumer
        was handed and did not acknowledge (it was restarted under its name). Then, until
        `should_stop()`: takes over entries of the group idle for longer than `lease_seconds`
        (XAUTOCLAIM: their consumer died, or its handler failed), reads up to `count` new
        ones (blocking up to `block_seconds`), hands each to `handler` and XACKs it unless
        the handler returned False (then it stays pending, to be redelivered once its lease
        runs out). While they wait for the handler, the entries in hand have their lease
        renewed; `should_stop()` is also asked before each entry (what is left stays pending
        for this consumer, or for others once the lease runs out). After each read or take-over
        that handed entries over, `trim`. With `drain`, hands each entry over at most once and
        returns once a round has nothing to hand over: nothing new, nothing to take over but
        entries it refused already. An exception of the handler propagates, its entry left
        pending. Raises BadName for an unusable group or consumer name.
        """
        check_name("consumer", consumer)
        self.ensure_group(group)
        stats = ConsumeStats()
        lease_ms = max(1, round(lease_seconds * 1000))
        with _Lease(lambda ids: self._renew(keys=[self.key], args=[group, consumer, *ids]),
                    lease_seconds) as lease:
            refused: set[str] = set()  # in a drain: entries the handler refused once

            def handle(entries: list[RawEntry]) -> int:
                """Hand the entries over (in a drain, not those refused already), then trim;
                how many were handed over."""
                if drain:
                    entries = [entry for entry in entries if entry[0] not in refused]
                if not entries:
                    return 0
                failed = self._handle(group, entries, handler, lease, stats, should_stop)
                if drain:
                    refused.update(failed)
                self.trim()
                return len(entries)

            own = self._read(group, consumer, "0", count, None)
            while own:
                stats.resumed += len(own)
                handle(own)
                own = self._read(group, consumer, own[-1][0], count, None)
            while not should_stop():
                claimed = self._take_over(group, consumer, lease_ms, count, stats)
                taken = handle(claimed)
                stats.taken_over += taken
                block = None if drain or claimed else max(1, round(block_seconds * 1000))
                if not taken + handle(self._read(group, consumer, ">", count, block)) and drain:
                    break
        return stats

    def _read(self, group: str, consumer: str, after: str, count: int,
              block_ms: int | None) -> list[RawEntry]:
        """XREADGROUP: new entries (`after` = ">") or this consumer's pending ones after the
        id `after`; deleted pending entries come back with no fields (None)."""
        found = self.client.xreadgroup(group, consumer, {self.key: after}, count=count,
                                       block=block_ms)
        if not found:
            return []
        return [(_text(stream_id), fields or None) for stream_id, fields in found[0][1]]

    def _take_over(self, group: str, consumer: str, lease_ms: int, count: int,
                   stats: ConsumeStats) -> list[RawEntry]:
        """XAUTOCLAIM up to `count` entries idle for longer than `lease_ms`, scanning the
        whole pending list; entries deleted meanwhile are acknowledged and counted `gone`."""
        start, taken = "0-0", []
        while len(taken) < count:
            reply = self.client.xautoclaim(self.key, group, consumer, lease_ms,
                                           start_id=start, count=count - len(taken))
            start, claimed = _text(reply[0]), reply[1]
            deleted = [_text(d) for d in reply[2]] if len(reply) > 2 else []
            if deleted:
                self.client.xack(self.key, group, *deleted)
                stats.gone += len(deleted)
            taken += [(_text(stream_id), fields or None) for stream_id, fields in claimed]
            if start == "0-0":
                break
        return taken

    def _handle(self, group: str, entries: list[RawEntry], handler: Handler, lease: "_Lease",
                stats: ConsumeStats, should_stop: Callable[[], bool]) -> list[str]:
        """Hand the entries to `handler` in order, XACKing each it did not refuse; returns the
        ids it refused. Stops early when `should_stop()` (the rest stay pending: re-read by
        this consumer when it comes back, taken over by others once their lease runs out)."""
        refused: list[str] = []
        lease.hold([stream_id for stream_id, _ in entries])
        for stream_id, fields in entries:
            if should_stop():
                lease.release_all()
                break
            if fields is None:  # deleted while pending: nothing left to deliver
                outcome: bool | None = True
                stats.gone += 1
            else:
                outcome = handler(PromotedEntry(
                    stream_id, _text(fields[b"key"]), _text(fields[b"order"]),
                    _text(fields[b"batch_id"]), int(fields[b"outbox_id"])))
            lease.release(stream_id)
            if outcome is False:
                stats.failed += 1
                refused.append(stream_id)
                continue
            crash_point("after_consume_handler")
            self.client.xack(self.key, group, stream_id)
            stats.acked += fields is not None
        return refused


class _Lease:
    """Renews the lease on the entries a consumer holds: a thread calls `renew(ids)` every
    third of the lease with the entries between `hold` and `release`."""

    def __init__(self, renew: Callable[[list[str]], object], lease_seconds: float) -> None:
        self._renew = renew
        self._period = lease_seconds / 3
        self._held: dict[str, None] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promoted-lease", daemon=True)

    def hold(self, ids: list[str]) -> None:
        self._held.update(dict.fromkeys(ids))

    def release(self, stream_id: str) -> None:
        self._held.pop(stream_id, None)

    def release_all(self) -> None:
        self._held.clear()

    def _run(self) -> None:
        while not self._done.wait(self._period):
            held = list(self._held)
            if not held:
                continue
            try:
                self._renew(held)
            except redis.RedisError as exc:  # the handler goes on; the lease may lapse
                log.warning("could not renew the lease on %d entries: %s", len(held), exc)

    def __enter__(self) -> "_Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
