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

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.signals import CompletionSignals

# `{P}:counters` fields: orders put back in flight by a re-drive of rejected orders, and by a
# replay of archived batches.
REDRIVEN_COUNTER = "redriven"
REPLAYED_COUNTER = "replayed"

# KEYS: ingestion, inflight, owners, batch, dequeued, marks
# ARGV: count, lease_ms, batch_id, owner
_CLAIM = """
local items = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not items then return {} end
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
_DATE_QUEUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local queued = redis.call('LLEN', KEYS[1])
local dequeued = tonumber(redis.call('GET', KEYS[2]) or '0')
local entered = dequeued + queued
redis.call('ZREMRANGEBYSCORE', KEYS[3], '(' .. (entered - tonumber(ARGV[1])), '+inf')
local top = redis.call('ZRANGE', KEYS[3], 0, 0, 'REV', 'WITHSCORES')
if queued > 0 and (#top == 0 or tonumber(top[2]) < entered) then
  redis.call('ZADD', KEYS[3], entered, string.format('%015d', now))
end
if queued == 0 then return {0, now, -1} end
local first = redis.call('ZRANGE', KEYS[3], '(' .. dequeued, '+inf', 'BYSCORE', 'LIMIT', 0, 1)
return {queued, now, tonumber(first[1])}
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


@dataclass(frozen=True)
class ClaimedBatch:
    batch_id: str
    owner: str
    payloads: list[bytes]
    reclaimed: bool = False


class OrderQueue:
    """Reliable batch queue on a Redis list with per-batch leases."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, lease_seconds: int = 60) -> None:
        self.client = client
        self.keys = keys
        self.lease_ms = lease_seconds * 1000
        self.signals = CompletionSignals(client, keys)
        self._claim = client.register_script(_CLAIM)
        self._date_queue = client.register_script(_DATE_QUEUE)
        self._reclaim = client.register_script(_RECLAIM)
        self._mark_staged = client.register_script(_MARK_STAGED)
        self._quarantine = client.register_script(_QUARANTINE)
        self._restore = client.register_script(_RESTORE)

    def push_batch(self, payloads: Sequence[bytes], batch_id: str | None = None) -> str:
        """Enqueue one batch atomically with its accepted count and completion signal.

        One MULTI transaction: either the orders, the `accepted` counter and the signal all
        land, or (e.g. Redis full under `noeviction`) none does and this raises.
        """
        batch_id = batch_id or uuid.uuid4().hex
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(self.keys.ingestion, *payloads)
        pipe.hincrby(self.keys.counters, "accepted", len(payloads))
        self.signals.record(pipe, batch_id, len(payloads))
        self._date_queue(keys=self._dating_keys, args=[len(payloads)], client=pipe)
        pipe.execute()
        return batch_id

    @property
    def _dating_keys(self) -> list[str]:
        return [self.keys.ingestion, self.keys.dequeued, self.keys.queue_marks]

    def gauges(self) -> QueueGauges:
        """How deep the queue is, how long its oldest order has waited, and its batches.

        One MULTI, so every number belongs to the same instant. Dates orders that no push
        dated (see the module's docstring), so it writes one small mark now and then.
        """
        pipe = self.client.pipeline(transaction=True)
        self._date_queue(keys=self._dating_keys, args=[0], client=pipe)
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

    def claim_batch(self, max_items: int, owner: str) -> ClaimedBatch | None:
        """Atomically move up to `max_items` orders into a new leased batch."""
        batch_id = uuid.uuid4().hex
        items = self._claim(
            keys=[self.keys.ingestion, self.keys.inflight, self.keys.owners,
                  self.keys.batch(batch_id), self.keys.dequeued, self.keys.queue_marks],
            args=[max_items, self.lease_ms, batch_id, owner],
        )
        if not items:
            return None
        return ClaimedBatch(batch_id, owner, list(items))

    def reclaim_expired(self, owner: str) -> ClaimedBatch | None:
        """Take over one batch whose lease expired (its worker died or stalled)."""
        raw = self._reclaim(keys=[self.keys.inflight, self.keys.owners],
                            args=[self.lease_ms, owner])
        if raw is None:
            return None
        batch_id = raw.decode()
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
        self.signals.record(pipe, signal_id, orders)
        pipe.execute()
        return signal_id

    def seconds_until_lease_expiry(self) -> float | None:
        """Seconds until the earliest lease in `{P}:inflight` runs out, by the Redis clock.

        0.0 when one already has (a dead worker's batch, or one requeued with deadline 0),
        None when no batch is claimed. The deadline and the clock are read in one MULTI.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.zrange(self.keys.inflight, 0, 0, withscores=True)
        pipe.time()
        earliest, (seconds, micros) = pipe.execute()
        if not earliest:
            return None
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return max(0.0, (earliest[0][1] - now_ms) / 1000)

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
        return str(self.client.info("server")["run_id"])

    def _now_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000
