"""The ingestion queue: producers push batches, workers claim whole batches under a lease.

A claimed batch moves atomically (one Lua call) from the ingestion list into its own list
`{P}:batch:{id}`, registered in the `{P}:inflight` sorted set with a lease deadline. It leaves
Redis only after its rows are in `orders` (see `release`): a worker that dies at any instant
leaves the batch in flight, and once its lease expires exactly one other worker reclaims it.
A batch that promotion hands back (`requeue`) comes with a completion signal of its own, so
a run comes to stage it again without waiting for new traffic.

How long the oldest queued order has waited is read without touching the orders (their
payloads are the producers' JSON and carry no queue time): the list is FIFO, so the n-th order
that ever entered it is the n-th claimed. `{P}:ingestion:dequeued` counts the claimed ones
(`_CLAIM`), and `{P}:ingestion:marks` dates the list: each mark says how many orders had
entered it by a moment of the Redis clock. `push_batch` marks every push exactly; orders that
other producers LPUSH themselves are dated by the next `gauges` reading (which marks what it
sees), so to within one reading. The oldest queued order entered no later than the first
mark above `dequeued`. `orders-pipeline clear --queue` removes the counter and the marks with
the list; a list deleted by hand loses its marks at the next push or reading, unless plain
LPUSHes have refilled it past its old length by then (those orders then read as older).
"""

import logging
import random
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis
import redis.cluster

from orders_pipeline.connections import (
    PUSH_ATTEMPTS,
    await_replication,
    queue_script,
    retry_transient,
)
from orders_pipeline.redis_patterns.keys import (
    RedisKeys,
    batch_id_in,
    shard_of_batch,
    shard_of_order,
)
from orders_pipeline.redis_patterns.signals import (
    SEEN_TTL_SECONDS,
    STREAM_MAX_LEN,
    CompletionSignals,
    signal_message,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# `{P}:counters` fields: orders put back in flight by a re-drive of rejected orders, and by a
# replay of archived batches.
REDRIVEN_COUNTER = "redriven"
REPLAYED_COUNTER = "replayed"
# How long a claim's marker lives: far longer than redis-py's retries of one call (minutes).
CLAIM_MARKER_TTL_SECONDS = 3600

# KEYS: ingestion, inflight, owners, batch, dequeued, marks, claim marker
# ARGV: count, lease_ms, batch_id, owner, marker ttl s
# Idempotent: a call under a batch id that claimed orders before (its marker, which outlives
# the batch's release) answers what its list holds now and claims nothing (redis-py sends a
# script again when the connection drops before its reply, possibly after the batch was
# reclaimed, promoted and released by another worker: never a second lot under that id).
_CLAIM = """
if redis.call('EXISTS', KEYS[7]) == 1 then return redis.call('LRANGE', KEYS[4], 0, -1) end
local items = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not items then return {} end
redis.call('SET', KEYS[7], 1, 'EX', tonumber(ARGV[5]))
local dequeued = redis.call('INCRBY', KEYS[5], #items)
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', dequeued)
for i = 1, #items, 1000 do
  redis.call('RPUSH', KEYS[4], unpack(items, i, math.min(i + 999, #items)))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
return items
"""

# KEYS: ingestion, dequeued, marks   ARGV: orders just pushed (0: a reading)
# -> {queued, now_ms, ms of the first mark above dequeued or -1 when nothing is queued}
# Marks above what had entered the list before these orders date orders that left it without
# a claim (`clear --queue`): dropped. A mark is added when orders entered that no mark covers.
_DATE_QUEUE_FUNCTION = """
local function date_queue(list, dequeued_key, marks, pushed)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local queued = redis.call('LLEN', list)
  local dequeued = tonumber(redis.call('GET', dequeued_key) or '0')
  local entered = dequeued + queued
  redis.call('ZREMRANGEBYSCORE', marks, '(' .. (entered - pushed), '+inf')
  local top = redis.call('ZRANGE', marks, 0, 0, 'REV', 'WITHSCORES')
  if queued > 0 and (#top == 0 or tonumber(top[2]) < entered) then
    redis.call('ZADD', marks, entered, string.format('%015d', now))
  end
  if queued == 0 then return {0, now, -1} end
  local first = redis.call('ZRANGE', marks, '(' .. dequeued, '+inf', 'BYSCORE', 'LIMIT', 0, 1)
  return {queued, now, tonumber(first[1])}
end
"""
_DATE_QUEUE = _DATE_QUEUE_FUNCTION + """
return date_queue(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
"""

# KEYS: the push's marker, ingestion, counters, dequeued, marks, then (signal in this slot)
#       the signal's stream
# ARGV: marker ttl s, signal message ('' when the signal lives in another slot), signal
#       channel, then the payloads
# -> 1 pushed, 0 already pushed under this id (nothing done). One atomic call, idempotent:
# the marker is set only with the orders, so a call sent again (redis-py resends after a
# connection drops before the reply; a producer retries) never pushes a batch twice.
_PUSH = _DATE_QUEUE_FUNCTION + f"""
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
local n = #ARGV - 3
for i = 4, #ARGV, 1000 do
  redis.call('LPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HINCRBY', KEYS[3], 'accepted', n)
date_queue(KEYS[2], KEYS[4], KEYS[5], n)
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', {STREAM_MAX_LEN}, '*', 'data', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[2])
end
return 1
"""

# KEYS: inflight, owners   ARGV: lease_ms, owner   -> batch id whose lease expired, or nil
_RECLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
if #expired == 0 then return false end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), expired[1])
redis.call('HSET', KEYS[2], expired[1], ARGV[2])
return expired[1]
"""

# KEYS: inflight, owners, staged   ARGV: batch_id, owner, staged_at
# Only the lease holder moves its batch; a batch already released stays released.
_MARK_STAGED = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""

# KEYS: inflight   -> {now_ms} or {now_ms, earliest lease deadline (ms)}
# The clock and the deadline in one call (a cluster MULTI cannot hold TIME: it has no key).
_EARLIEST_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return {now} end
return {now, first[2]}
"""

# KEYS: staged, quarantined   ARGV: batch ids
# Only batches still staged move: one that `readmit` handed back meanwhile stays in flight.
_QUARANTINE = """
local moved = 0
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('SADD', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""

# KEYS: batch   ARGV: the batch's payloads in order. Rebuilds a batch list Redis lost.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 1, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return #ARGV
"""


@dataclass(frozen=True)
class QueueGauges:
    """One reading of the queue, taken in one MULTI and timed by the Redis clock.

    `oldest_queued_wait_seconds`: how long the oldest queued order has waited (0.0 with none
    queued; for orders a producer pushed with a plain LPUSH, at least this long). Batches are
    claimed (a worker stages them under a lease), staged (their rows await promotion) or
    quarantined (set aside by promotion); `oldest_staged_wait_seconds` is the age of the
    oldest staged batch (0.0 with none).
    """
    queue_depth: int
    oldest_queued_wait_seconds: float
    claimed_batches: int
    staged_batches: int
    oldest_staged_wait_seconds: float
    quarantined_batches: int

    @property
    def in_flight_batches(self) -> int:
        """Batches taken from the queue and not released yet: claimed plus staged."""
        return self.claimed_batches + self.staged_batches

    @classmethod
    def combined(cls, shards: Sequence["QueueGauges"]) -> "QueueGauges":
        """The readings of every shard as one: counts summed, waits the longest."""
        return cls(
            queue_depth=sum(g.queue_depth for g in shards),
            oldest_queued_wait_seconds=max(g.oldest_queued_wait_seconds for g in shards),
            claimed_batches=sum(g.claimed_batches for g in shards),
            staged_batches=sum(g.staged_batches for g in shards),
            oldest_staged_wait_seconds=max(g.oldest_staged_wait_seconds for g in shards),
            quarantined_batches=sum(g.quarantined_batches for g in shards),
        )


@dataclass(frozen=True)
class ClaimedBatch:
    batch_id: str
    owner: str
    payloads: list[bytes]
    reclaimed: bool = False

    @property
    def shard(self) -> int:
        """The queue shard the batch was claimed from (read from its id)."""
        return shard_of_batch(self.batch_id)


class QueueShard:
    """One shard of the queue: a Redis list with per-batch leases, all under one hash tag.

    `keys` are the shard's own (`RedisKeys.shard_spaces`); completion signals go to `signals`,
    which live under the deployment's prefix. In shard 0 (the prefix itself) a push or
    requeue and its signal are one MULTI; in another shard they are two, shard first (a
    cluster refuses a MULTI across slots): if the process dies in between, the orders wait
    queued or in flight without a signal of their own until the next run drains the queue
    (any signal, `process --follow`, or the stalled-queue check `orders_wait_within_limit`).
    """

    def __init__(self, client: redis.Redis, keys: RedisKeys, lease_seconds: int = 60, *,
                 signals: CompletionSignals | None = None, shard: int = 0) -> None:
        self.client = client
        self.keys = keys
        self.shard = shard
        self.lease_ms = lease_seconds * 1000
        self.signals = signals or CompletionSignals(client, keys)
        self._signal_apart = self.signals.keys.prefix != keys.prefix
        self._claim = client.register_script(_CLAIM)
        self._date_queue = client.register_script(_DATE_QUEUE)
        self._push = client.register_script(_PUSH)
        self._reclaim = client.register_script(_RECLAIM)
        self._mark_staged = client.register_script(_MARK_STAGED)
        self._quarantine = client.register_script(_QUARANTINE)
        self._restore = client.register_script(_RESTORE)
        self._earliest_lease = client.register_script(_EARLIEST_LEASE)

    def push_batch(self, payloads: Sequence[bytes], batch_id: str | None = None) -> str:
        """Enqueue one batch with its accepted count and completion signal, idempotently;
        returns the batch id (`batch_id`, or a new one).

        One Lua call (`_PUSH`) queues the orders, counts them in `accepted`, dates the queue
        and sets the batch's marker, or, the marker being there already, does nothing: a batch
        id is queued at most once however often the call is sent (redis-py sends a script
        again when the connection drops before its reply; a producer retries). The marker is
        the signal's `{P}:signal:<id>` when the signals share this shard's slot (the signal is
        then recorded in the same call); in another shard it is `{P.n}:pushed:<id>` and the
        signal follows in a MULTI of its own unless it is recorded already. Either the orders,
        the count and the marker all land or (Redis full under `noeviction`) none does and
        this raises. One attempt: producers call `push_batch_once`.
        """
        if not payloads:
            raise ValueError("a batch holds at least one order")
        batch_id = batch_id or uuid.uuid4().hex
        signals = self.signals.keys
        dating = [self.keys.ingestion, self.keys.counters, self.keys.dequeued,
                  self.keys.queue_marks]
        if self._signal_apart:
            keys = [self.keys.pushed(batch_id), *dating]
            args = [SEEN_TTL_SECONDS, "", "", *payloads]
        else:
            keys = [signals.signal_seen(batch_id), *dating, signals.signals_stream]
            args = [SEEN_TTL_SECONDS, signal_message(batch_id, len(payloads)),
                    signals.signals_channel, *payloads]
        if not self._push(keys=keys, args=args):
            log.warning("push %s: already queued under this id; nothing pushed again (an id "
                        "names one batch for %d s: never reuse one for other orders)",
                        batch_id, SEEN_TTL_SECONDS)
        if self._signal_apart and not self.client.exists(signals.signal_seen(batch_id)):
            self.signals.record_alone(batch_id, len(payloads))
        # Acknowledged to the producer: on the replicas first (NotReplicated: whether the push
        # lasts is unknown until the master is settled; pushing again under the id tells).
        await_replication(self.client, self.keys.replication_probe)
        return batch_id

    def push_batch_once(self, payloads: Sequence[bytes], batch_id: str | None = None) -> str:
        """`push_batch` through transient errors (`connections.retry_transient`): the batch
        lands exactly once, what a producer should call.

        After an error the push may or may not have landed (a connection lost once the call
        was sent, a push no replica confirmed: NotReplicated); it is simply sent again under
        the same id, which queues nothing twice (`push_batch`). Raises the last transient
        error after PUSH_ATTEMPTS (about a minute), and `push_batch`'s other errors (e.g.
        Redis full) at once; a caller that keeps the batch and its id may send it again later
        (within SEEN_TTL_SECONDS, the marker's life) without doubling it.
        """
        batch_id = batch_id or uuid.uuid4().hex
        retry_transient(lambda: self.push_batch(payloads, batch_id),
                        what=f"push {batch_id[:12]}", attempts=PUSH_ATTEMPTS)
        return batch_id

    def _execute_with_signal(self, pipe: redis.client.Pipeline, signal_id: str,
                             orders: int) -> None:
        """Run `pipe` (a MULTI of this shard) with the completion signal for `orders`: in it,
        or right after it when the signals live in another slot."""
        if not self._signal_apart:
            self.signals.record(pipe, signal_id, orders)
            pipe.execute()
            return
        pipe.execute()
        self.signals.record_alone(signal_id, orders)

    @property
    def _dating_keys(self) -> list[str]:
        return [self.keys.ingestion, self.keys.dequeued, self.keys.queue_marks]

    def gauges(self) -> QueueGauges:
        """How deep the queue is, how long its oldest order has waited, and its batches.

        One MULTI, so every number belongs to the same instant. Dates orders that no push
        dated (see the module's docstring), so it writes one small mark now and then.
        """
        pipe = self.client.pipeline(transaction=True)
        queue_script(pipe, self._date_queue, self._dating_keys, [0])
        pipe.zcard(self.keys.inflight)
        pipe.zcard(self.keys.staged)
        pipe.zrange(self.keys.staged, 0, 0, withscores=True)
        pipe.scard(self.keys.quarantined)
        (queued, now_ms, entered_ms), claimed, staged, oldest_staged, quarantined = pipe.execute()
        return QueueGauges(
            queue_depth=int(queued),
            oldest_queued_wait_seconds=max(0, now_ms - entered_ms) / 1000 if queued else 0.0,
            claimed_batches=int(claimed),
            staged_batches=int(staged),
            oldest_staged_wait_seconds=(max(0.0, now_ms - oldest_staged[0][1]) / 1000
                                        if oldest_staged else 0.0),
            quarantined_batches=int(quarantined),
        )

    def claim_batch(self, max_items: int, owner: str, *,
                    token: str | None = None) -> ClaimedBatch | None:
        """Atomically move up to `max_items` orders into a new leased batch, named by `token`
        (32 hex digits, new by default, `batch_id_in`). A claim sent again under the same
        token answers the batch it made and claims nothing more (`_CLAIM`)."""
        batch_id = batch_id_in(self.shard, token or uuid.uuid4().hex)
        items = self._claim(
            keys=[self.keys.ingestion, self.keys.inflight, self.keys.owners,
                  self.keys.batch(batch_id), self.keys.dequeued, self.keys.queue_marks,
                  self.keys.claimed(batch_id)],
            args=[max_items, self.lease_ms, batch_id, owner, CLAIM_MARKER_TTL_SECONDS],
        )
        if not items:
            return None
        # Acted on (staged) at once: it must outlive a failover first. If the replicas do
        # not confirm it (NotReplicated), the batch stays leased, reclaimed when that ends.
        await_replication(self.client, self.keys.replication_probe)
        return ClaimedBatch(batch_id, owner, list(items))

    def reclaim_expired(self, owner: str) -> ClaimedBatch | None:
        """Take over one batch whose lease expired (its worker died or stalled)."""
        raw = self._reclaim(keys=[self.keys.inflight, self.keys.owners],
                            args=[self.lease_ms, owner])
        if raw is None:
            return None
        batch_id = raw.decode()
        await_replication(self.client, self.keys.replication_probe)
        payloads = self.client.lrange(self.keys.batch(batch_id), 0, -1)
        return ClaimedBatch(batch_id, owner, list(payloads), reclaimed=True)

    def extend_lease(self, batch: ClaimedBatch) -> bool:
        """Heartbeat: push the lease deadline out, only while we still own the batch."""
        if self.client.hget(self.keys.owners, batch.batch_id) != batch.owner.encode():
            return False
        self.client.zadd(self.keys.inflight, {batch.batch_id: self._now_ms() + self.lease_ms},
                         xx=True)
        return True

    def mark_staged(self, batch: ClaimedBatch) -> bool:
        """Its rows are committed to staging: stop the lease, keep the payloads until promotion."""
        return bool(self._mark_staged(
            keys=[self.keys.inflight, self.keys.owners, self.keys.staged],
            args=[batch.batch_id, batch.owner, self._now_ms()],
        ))

    def release(self, batch_ids: Sequence[str]) -> None:
        """Forget batches whose rows are in `orders`: the only place orders leave Redis."""
        if not batch_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.staged, *batch_ids)
        pipe.zrem(self.keys.inflight, *batch_ids)
        pipe.hdel(self.keys.owners, *batch_ids)
        pipe.delete(*(self.keys.batch(b) for b in batch_ids))
        pipe.execute()

    def requeue(self, batch_ids: Sequence[str]) -> str | None:
        """Hand batches back to be staged again, and ask for the run that will do it.

        For batches whose staged rows a Postgres crash erased, or whose ledger commit was
        lost. Each goes back in flight with lease deadline 0 and no owner, so the next drain
        reclaims it at once. In the same MULTI a completion signal `requeue:<uuid>` for the
        orders they hold is recorded (stream + pub/sub, as a producer's), so
        `completion_signal_sensor` launches an ingest run that stages and promotes them:
        recovery never waits for a producer's next traffic. `accepted` is not touched (these
        orders were counted when pushed).

        Why a signal and not a stage/promote loop inside the run that found the loss: the
        hand-back and the request to finish it are one atomic fact in Redis, which outlives
        whatever dies next. If the run (or the daemon, or the host) dies right after this
        call, the stream still holds the signal and the sensor reads it from its cursor when
        it next ticks; a loop would die with the run and leave the work waiting for traffic.
        If the caller dies before this call, nothing was handed back: the batches are still
        staged in Redis, the ledger says `lost` or has no row, and the next promotion's
        `pipeline.reconcile_batches` requeues them (Dagster's run retries relaunch a run
        that died). Returns the signal's batch id, or None when `batch_ids` is empty.
        """
        if not batch_ids:
            return None
        signal_id = f"requeue:{uuid.uuid4().hex}"
        orders = self.orders_in(batch_ids)
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.staged, *batch_ids)
        pipe.zadd(self.keys.inflight, dict.fromkeys(batch_ids, 0))
        pipe.hdel(self.keys.owners, *batch_ids)
        self._execute_with_signal(pipe, signal_id, orders)
        return signal_id

    def seconds_until_lease_expiry(self) -> float | None:
        """Seconds until the earliest lease in `{P}:inflight` runs out, by the Redis clock.

        0.0 when one already has (a dead worker's batch, or one requeued with deadline 0),
        None when no batch is claimed. The deadline and the clock are read in one script.
        """
        reply = self._earliest_lease(keys=[self.keys.inflight])
        if len(reply) < 2:
            return None
        return max(0.0, (float(reply[1]) - int(reply[0])) / 1000)

    def expired_batch_ids(self) -> list[str]:
        """Claimed batches whose lease has run out (deadline at or before the Redis clock)."""
        return [b.decode() for b in self.client.zrangebyscore(
            self.keys.inflight, "-inf", self._now_ms())]

    def batch_payloads(self, batch_id: str) -> list[bytes]:
        """The raw payloads of a claimed batch in claim order; empty if Redis holds none."""
        return list(self.client.lrange(self.keys.batch(batch_id), 0, -1))

    def quarantine(self, batch_ids: Sequence[str]) -> int:
        """Move poison batches from `{P}:staged` to `{P}:quarantined`, keeping their lists.

        One Lua call; only batches still in `{P}:staged` move, so one that `readmit` handed
        back meanwhile stays in flight. Returns how many moved.
        """
        if not batch_ids:
            return 0
        return int(self._quarantine(keys=[self.keys.staged, self.keys.quarantined],
                                    args=list(batch_ids)))

    def missing_batch_lists(self, batch_ids: Sequence[str]) -> list[str]:
        """The given batches whose payload list Redis does not hold (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.exists(self.keys.batch(batch_id))
        return [b for b, held in zip(batch_ids, pipe.execute(), strict=True) if not held]

    def readmit(self, batch_ids: Sequence[str],
                restore: Mapping[str, Sequence[bytes]]) -> str | None:
        """Hand quarantined batches back to be staged again under their own batch ids.

        First the batch list of each batch in `restore` is rebuilt from its payloads, unless
        Redis holds one again (one Lua call per batch); then the batches are requeued
        (`requeue`: in flight with lease deadline 0, plus a completion signal so that a run
        comes to stage them) and leave `{P}:quarantined`, in that order, so that a
        `quarantine` racing with this either finds them staged no more or is undone. Same
        ids, same positions: the dedup window recognises their tokens `batch_id:position` as
        theirs. Returns the signal's batch id (None for no batches).
        """
        if not batch_ids:
            return None
        for batch_id, payloads in restore.items():
            if payloads:
                self._restore(keys=[self.keys.batch(batch_id)], args=list(payloads))
        signal_id = self.requeue(batch_ids)
        self.client.srem(self.keys.quarantined, *batch_ids)
        return signal_id

    def push_redriven(self, batch_id: str, payloads: Sequence[bytes], *,
                      counter: str = REDRIVEN_COUNTER) -> bool:
        """Put a batch of re-driven (or replayed) payloads in flight under its own id, once.

        One MULTI under WATCH of `{P}:redriven`: the list `{P}:batch:<id>` (payloads in
        order), the batch in `{P}:inflight` with lease deadline 0 and no owner (the next drain
        reclaims it at once, as after `requeue`), `counter` (`redriven`, or `replayed` for a
        replay) in `{P}:counters` raised by its orders (conservation: deliveries beyond
        `accepted`), its completion signal (so a run comes to stage it) and its marker in
        `{P}:redriven`. If the marker is there already, an earlier call pushed the batch:
        nothing happens and this returns False.
        """
        def push(pipe: redis.client.Pipeline) -> bool:
            if pipe.hexists(self.keys.redriven, batch_id):
                return False
            pipe.multi()
            pipe.rpush(self.keys.batch(batch_id), *payloads)
            pipe.zadd(self.keys.inflight, {batch_id: 0})
            pipe.hincrby(self.keys.counters, counter, len(payloads))
            pipe.hset(self.keys.redriven, batch_id, len(payloads))
            self.signals.record(pipe, batch_id, len(payloads))
            return True

        return bool(self.client.transaction(push, self.keys.redriven, value_from_callable=True))

    def redriven_markers(self) -> list[str]:
        """Re-drive and replay batches pushed whose push their Postgres outbox may not record
        yet."""
        return [b.decode() for b in self.client.hkeys(self.keys.redriven)]

    def forget_redriven(self, batch_ids: Sequence[str]) -> None:
        """Drop the markers of batches their Postgres outbox records as pushed."""
        if batch_ids:
            self.client.hdel(self.keys.redriven, *batch_ids)

    def staged_batch_ids(self) -> list[str]:
        return [b.decode() for b in self.client.zrange(self.keys.staged, 0, -1)]

    def depth(self) -> int:
        return int(self.client.llen(self.keys.ingestion))

    def claimed_batch_ids(self) -> list[str]:
        return [b.decode() for b in self.client.zrange(self.keys.inflight, 0, -1)]

    def orders_in(self, batch_ids: Sequence[str]) -> int:
        """Orders held in the given batches' lists, in one round trip."""
        if not batch_ids:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.llen(self.keys.batch(batch_id))
        return sum(pipe.execute())

    def in_flight_orders(self) -> int:
        """Orders held in claimed or staged batches (not yet released)."""
        return self.orders_in(self.claimed_batch_ids() + self.staged_batch_ids())

    def claimed_batches(self) -> int:
        """Batches claimed and leased (in `{P}:inflight`), not yet staged."""
        return int(self.client.zcard(self.keys.inflight))

    def server_run_id(self) -> str:
        """The Redis process's random run id, new on every start.

        An acknowledged push is only as durable as the server's persistence: a producer that
        notes the run id with its pushes and later sees another knows the server restarted
        in between, and (without AOF) that what it pushed before may be gone.
        """
        if isinstance(self.client, redis.cluster.RedisCluster):  # the shard's master
            node = self.client.get_node_from_key(self.keys.ingestion)
            return str(self.client.info("server", target_nodes=node)["run_id"])
        return str(self.client.info("server")["run_id"])

    def _now_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000


class OrderQueue:
    """The ingestion queue of a deployment: its K shards (`RedisKeys.shards`) as one queue.

    Producers route each order to the shard of its id (`push_orders`) or push a whole batch to
    one shard (`push_batch`, shard 0 by default: the list `{P}:ingestion`). Workers claim from
    the shards in turn, starting at a random one; a batch's shard is part of its id, so every
    call naming batch ids goes to their shards. Readings (`gauges`, `depth`, ...) sum the
    shards; each shard's reading is one instant, the sum is not. With one shard this is
    exactly that shard.
    """

    def __init__(self, client: redis.Redis, keys: RedisKeys, lease_seconds: int = 60) -> None:
        self.client = client
        self.keys = keys
        self.signals = CompletionSignals(client, keys)
        self.shards = [QueueShard(client, space, lease_seconds, signals=self.signals, shard=n)
                       for n, space in enumerate(keys.shard_spaces)]
        self._turn = random.randrange(len(self.shards))

    @property
    def lease_ms(self) -> int:
        return self.shards[0].lease_ms

    def _by_shard(self, batch_ids: Iterable[str]) -> dict[int, list[str]]:
        grouped: dict[int, list[str]] = defaultdict(list)
        for batch_id in batch_ids:
            grouped[shard_of_batch(batch_id)].append(batch_id)
        return grouped

    def _each(self, call: Callable[[QueueShard], T]) -> list[T]:
        return [call(shard) for shard in self.shards]

    def _rotation(self) -> list[QueueShard]:
        self._turn = (self._turn + 1) % len(self.shards)
        return self.shards[self._turn:] + self.shards[:self._turn]

    def push_batch(self, payloads: Sequence[bytes], batch_id: str | None = None, *,
                   shard: int = 0) -> str:
        """Enqueue one batch in one shard exactly once, through transient errors
        (`QueueShard.push_batch_once`); returns its signal id."""
        return self.shards[shard].push_batch_once(payloads, batch_id)

    def push_orders(self, payloads: Sequence[bytes], order_ids: Sequence[bytes | None],
                    batch_id: str | None = None) -> list[str]:
        """Enqueue payloads, each in the shard of its order id (`keys.shard_of_order`; None,
        for a payload without a readable id, goes to shard 0), one batch and signal per shard
        used, in the given order within each, each exactly once through transient errors
        (`QueueShard.push_batch_once`). Returns the signal ids.

        `batch_id` (new by default) names the pushes: the batch itself with one shard, its
        part for shard n `<batch_id>.p<n>` with several; a caller that got an error may send
        the same payloads again under the same id, and no part already queued is queued
        again (`QueueShard.push_batch`)."""
        batch_id = batch_id or uuid.uuid4().hex
        if len(self.shards) == 1:
            return [self.push_batch(payloads, batch_id)]
        parts: dict[int, list[bytes]] = defaultdict(list)
        for payload, order_id in zip(payloads, order_ids, strict=True):
            parts[0 if order_id is None else shard_of_order(order_id, len(self.shards))
                  ].append(payload)
        return [self.push_batch(part, f"{batch_id}.p{n}", shard=n)
                for n, part in sorted(parts.items())]

    def gauges(self) -> QueueGauges:
        return QueueGauges.combined(self._each(QueueShard.gauges))

    def claim_batch(self, max_items: int, owner: str) -> ClaimedBatch | None:
        """Claim from the next shard that has orders (`QueueShard.claim_batch`)."""
        for shard in self._rotation():
            batch = shard.claim_batch(max_items, owner)
            if batch is not None:
                return batch
        return None

    def reclaim_expired(self, owner: str) -> ClaimedBatch | None:
        for shard in self._rotation():
            batch = shard.reclaim_expired(owner)
            if batch is not None:
                return batch
        return None

    def extend_lease(self, batch: ClaimedBatch) -> bool:
        return self.shards[batch.shard].extend_lease(batch)

    def mark_staged(self, batch: ClaimedBatch) -> bool:
        return self.shards[batch.shard].mark_staged(batch)

    def release(self, batch_ids: Sequence[str]) -> None:
        for n, ids in self._by_shard(batch_ids).items():
            self.shards[n].release(ids)

    def requeue(self, batch_ids: Sequence[str]) -> str | None:
        """`QueueShard.requeue` in each shard concerned; returns the last signal id."""
        signal_id = None
        for n, ids in self._by_shard(batch_ids).items():
            signal_id = self.shards[n].requeue(ids)
        return signal_id

    def quarantine(self, batch_ids: Sequence[str]) -> int:
        return sum(self.shards[n].quarantine(ids)
                   for n, ids in self._by_shard(batch_ids).items())

    def readmit(self, batch_ids: Sequence[str],
                restore: Mapping[str, Sequence[bytes]]) -> str | None:
        signal_id = None
        for n, ids in self._by_shard(batch_ids).items():
            signal_id = self.shards[n].readmit(ids, {b: restore[b] for b in ids if b in restore})
        return signal_id

    def missing_batch_lists(self, batch_ids: Sequence[str]) -> list[str]:
        missing = {b for n, ids in self._by_shard(batch_ids).items()
                   for b in self.shards[n].missing_batch_lists(ids)}
        return [b for b in batch_ids if b in missing]

    def batch_payloads(self, batch_id: str) -> list[bytes]:
        return self.shards[shard_of_batch(batch_id)].batch_payloads(batch_id)

    def orders_in(self, batch_ids: Sequence[str]) -> int:
        return sum(self.shards[n].orders_in(ids) for n, ids in self._by_shard(batch_ids).items())

    def push_redriven(self, batch_id: str, payloads: Sequence[bytes], *,
                      counter: str = REDRIVEN_COUNTER) -> bool:
        """Re-driven and replayed batches go to shard 0 (`QueueShard.push_redriven`)."""
        return self.shards[0].push_redriven(batch_id, payloads, counter=counter)

    def redriven_markers(self) -> list[str]:
        return self.shards[0].redriven_markers()

    def forget_redriven(self, batch_ids: Sequence[str]) -> None:
        self.shards[0].forget_redriven(batch_ids)

    def seconds_until_lease_expiry(self) -> float | None:
        """The earliest lease of any shard (see `QueueShard.seconds_until_lease_expiry`)."""
        found = [s for s in self._each(QueueShard.seconds_until_lease_expiry) if s is not None]
        return min(found, default=None)

    def expired_batch_ids(self) -> list[str]:
        return [b for ids in self._each(QueueShard.expired_batch_ids) for b in ids]

    def staged_batch_ids(self) -> list[str]:
        return [b for ids in self._each(QueueShard.staged_batch_ids) for b in ids]

    def claimed_batch_ids(self) -> list[str]:
        return [b for ids in self._each(QueueShard.claimed_batch_ids) for b in ids]

    def depth(self) -> int:
        return sum(self._each(QueueShard.depth))

    def in_flight_orders(self) -> int:
        return sum(self._each(QueueShard.in_flight_orders))

    def claimed_batches(self) -> int:
        return sum(self._each(QueueShard.claimed_batches))

    def counter(self, name: str) -> int:
        """A field of `{P}:counters` summed over the shards (e.g. `accepted`)."""
        return sum(int(self.client.hget(shard.keys.counters, name) or 0)
                   for shard in self.shards)

    def server_run_id(self) -> str:
        return self.shards[0].server_run_id()
